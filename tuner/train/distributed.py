"""Running under torchrun (DDP): ranks from the launcher's environment, the process group, and
"each node's local rank 0 does the node's shared work first, the node's other ranks wait".

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and GROUP_RANK (the node) for every worker; a plain
`tuner run` has none of them and is rank 0 of 1. Ranks are numbered node by node, so a node's
local rank 0 has global rank RANK - LOCAL_RANK.

`python -m tuner.distributed TORCHRUN-ARGS` is torchrun that exits with its failed worker's code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from tuner.errors import EXIT_INTERNAL, EXIT_OK, UserError

SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
DEFAULT_GRACE_SECONDS = 600  # the Job's terminationGracePeriodSeconds
LAUNCHER_EXIT_SECONDS = 30  # of the grace period, kept for the launcher itself to exit
Local = TypeVar("Local")
Shared = TypeVar("Shared")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that logs, writes the adapter and publishes it."""
        return self.rank == 0

    @property
    def is_node_leader(self) -> bool:
        return self.local_rank == 0

    @property
    def node_leader(self) -> int:
        """The global rank of this node's local rank 0."""
        return self.rank - self.local_rank

    def devices(self) -> str:
        """What trains: "2 processes x NVIDIA A100 80GB PCIe", "1x Tesla V100-PCIE-16GB", "cpu (2 cores)"."""
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(self.local_rank)
            return f"{self.world_size} processes x {name}" if self.distributed else f"1x {name}"
        return f"cpu ({os.cpu_count()} cores)" + (f" x {self.world_size} processes" if self.distributed else "")


def ranks_from_env() -> Ranks:
    """This process's ranks as torchrun set them (rank 0 of 1 outside torchrun)."""
    env = os.environ
    return Ranks(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                 world_size=int(env.get("WORLD_SIZE", 1)), node=int(env.get("GROUP_RANK", 0)))


def ddp_backend() -> str:
    """nccl between GPUs, gloo between CPU processes."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def process_group(ranks: Ranks, timeout: timedelta) -> Iterator[None]:
    """Join torchrun's process group for the block (the Trainer reuses it); a no-op for one process.

    On a GPU node the rank's device is selected first, so the model loads onto it. `timeout` bounds
    every wait, including the wait for the node leader's data preparation.
    """
    if not ranks.distributed:
        yield
        return
    import torch
    import torch.distributed as dist

    backend = ddp_backend()
    device = None
    if backend == "nccl":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timeout, device_id=device)
    try:
        yield
    finally:
        dist.destroy_process_group()


def leader_first(ranks: Ranks, lead: Callable[[], tuple[Local, Shared]]) -> tuple[Local | None, dict[int, Shared]]:
    """Run `lead` on every node's leader while the other ranks wait, then hand out what it shares.

    `lead` returns (a value kept by the leader, a small picklable value for every rank). Returns
    (the kept value, or None on a non-leader; every node leader's shared value by global rank). If
    `lead` fails on any node, every rank stops: the failing leader re-raises its error and the
    others raise one naming it (a UserError if it was one), so no rank is left waiting.
    """
    if not ranks.distributed:
        local, shared = lead()
        return local, {0: shared}
    import torch.distributed as dist

    kept: Local | None = None
    outcome: tuple[Shared | None, str | None, bool] = (None, None, False)  # (shared, error, a user error?)
    failure: BaseException | None = None
    if ranks.is_node_leader:
        try:
            kept, shared = lead()
            outcome = (shared, None, False)
        except BaseException as exc:  # re-raised below, once the other ranks have heard of it
            failure = exc
            user_error = isinstance(exc, UserError)
            outcome = (None, str(exc) if user_error else f"{type(exc).__name__}: {exc}", user_error)
    gathered: list[tuple[Shared | None, str | None, bool]] = [outcome] * ranks.world_size
    dist.all_gather_object(gathered, outcome)
    if failure is not None:
        raise failure
    for rank, (_, error, user_error) in enumerate(gathered):
        if error is not None:
            message = f"rank {rank} failed before training: {error}"
            raise UserError(message) if user_error else RuntimeError(message)
    return kept, {rank: shared for rank, (shared, _, _) in enumerate(gathered) if shared is not None}


@contextlib.contextmanager
def quiet_unless_main(ranks: Ranks) -> Iterator[None]:
    """Silence stdout (progress lines) on every rank but 0, so the job log has each line once.

    stderr, where errors go, is left alone.
    """
    if ranks.is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def shutdown_seconds(grace_seconds: int = DEFAULT_GRACE_SECONDS) -> int:
    """How long the launcher lets its workers save and exit after SIGTERM, within the pod's grace period."""
    return max(grace_seconds - LAUNCHER_EXIT_SECONDS, 1)


def launch(argv: list[str]) -> int:
    """torchrun with `argv`, exiting with the first failed worker's exit code (torchrun's own is 1),
    so a Job can tell a user error (2) from a fault.

    On SIGTERM torchrun passes the signal to its workers and kills them `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`
    seconds later (torch's default: 30); tuner's default, `shutdown_seconds()`, leaves them time to
    finish the step and save a checkpoint. The launcher then exits with 128 + the signal (143 for
    SIGTERM: retry and resume).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    os.environ.setdefault(SHUTDOWN_ENV, str(shutdown_seconds()))
    try:
        main(argv)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else EXIT_INTERNAL
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
