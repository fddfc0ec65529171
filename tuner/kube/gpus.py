"""GPU instance types (SKUs): how many GPUs a node has, which model, and how much memory each.

`resource.instanceType` of a Kaito Workspace names a cloud VM size; the Job asks for that many
`nvidia.com/gpu` and the memory check sizes the run against one GPU of it.

Memory is per GPU, in GiB, as CUDA reports it (`nvidia-smi --query-gpu=memory.total`), which is
below the marketing figure: a "16 GB" T4 reports 15360 MiB = 15.0 GiB, a "24 GB" A10G 23028 MiB,
an "80 GB" H100 SXM 81559 MiB. `bf16` is true from compute capability 8.0 (Ampere) on; a V100
(7.0) or a T4 (7.5) can only emulate bfloat16, so training there runs in float16.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from tuner.errors import UserError


@dataclass(frozen=True)
class GpuSku:
    """One node type: `gpu_count` GPUs of `gpu_model`, each with `gpu_memory_gib` GiB."""

    name: str
    gpu_count: int
    gpu_model: str
    gpu_memory_gib: float
    bf16: bool


# model: (GiB per GPU as CUDA reports it, bfloat16 support)
_GPUS: dict[str, tuple[float, bool]] = {
    "T4": (15.0, False),            # 15360 MiB, sm75
    "V100": (15.8, False),          # 16160 MiB (16 GB), sm70
    "V100-32GB": (31.7, False),     # 32510 MiB, sm70
    "A10": (22.5, True),            # 23028 MiB, sm86
    "A10G": (22.5, True),           # 23028 MiB, sm86
    "L4": (22.5, True),             # 23034 MiB, sm89
    "L40S": (45.0, True),           # 46068 MiB, sm89
    "A100-40GB": (39.6, True),      # 40536 MiB (SXM4), sm80
    "A100-80GB": (80.0, True),      # 81920 MiB, sm80
    "H100-80GB": (79.6, True),      # 81559 MiB (SXM5 HBM3), sm90
    "H100-NVL": (93.6, True),       # 95830 MiB (94 GB), sm90
    "H200": (140.4, True),          # 143771 MiB (141 GB), sm90
}

# instance type: (GPUs per node, GPU model)
_SKUS: dict[str, tuple[int, str]] = {
    # Azure
    "Standard_NC6s_v3": (1, "V100"),
    "Standard_NC12s_v3": (2, "V100"),
    "Standard_NC24s_v3": (4, "V100"),
    "Standard_NC24rs_v3": (4, "V100"),
    "Standard_ND40rs_v2": (8, "V100-32GB"),
    "Standard_NC4as_T4_v3": (1, "T4"),
    "Standard_NC8as_T4_v3": (1, "T4"),
    "Standard_NC16as_T4_v3": (1, "T4"),
    "Standard_NC64as_T4_v3": (4, "T4"),
    "Standard_NV36ads_A10_v5": (1, "A10"),
    "Standard_NV72ads_A10_v5": (2, "A10"),
    "Standard_NC24ads_A100_v4": (1, "A100-80GB"),
    "Standard_NC48ads_A100_v4": (2, "A100-80GB"),
    "Standard_NC96ads_A100_v4": (4, "A100-80GB"),
    "Standard_ND96asr_v4": (8, "A100-40GB"),
    "Standard_ND96amsr_A100_v4": (8, "A100-80GB"),
    "Standard_NC40ads_H100_v5": (1, "H100-NVL"),
    "Standard_NC80adis_H100_v5": (2, "H100-NVL"),
    "Standard_ND96isr_H100_v5": (8, "H100-80GB"),
    "Standard_ND96isr_H200_v5": (8, "H200"),
    # AWS
    **{f"g4dn.{size}": (1, "T4") for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g4dn.12xlarge": (4, "T4"),
    "g4dn.metal": (8, "T4"),
    **{f"g5.{size}": (1, "A10G") for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g5.12xlarge": (4, "A10G"),
    "g5.24xlarge": (4, "A10G"),
    "g5.48xlarge": (8, "A10G"),
    **{f"g6.{size}": (1, "L4") for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6.12xlarge": (4, "L4"),
    "g6.24xlarge": (4, "L4"),
    "g6.48xlarge": (8, "L4"),
    **{f"g6e.{size}": (1, "L40S") for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6e.12xlarge": (4, "L40S"),
    "g6e.24xlarge": (4, "L40S"),
    "g6e.48xlarge": (8, "L40S"),
    "p3.2xlarge": (1, "V100"),
    "p3.8xlarge": (4, "V100"),
    "p3.16xlarge": (8, "V100"),
    "p3dn.24xlarge": (8, "V100-32GB"),
    "p4d.24xlarge": (8, "A100-40GB"),
    "p4de.24xlarge": (8, "A100-80GB"),
    "p5.48xlarge": (8, "H100-80GB"),
    "p5e.48xlarge": (8, "H200"),
    # GCP
    "a2-highgpu-1g": (1, "A100-40GB"),
    "a2-highgpu-2g": (2, "A100-40GB"),
    "a2-highgpu-4g": (4, "A100-40GB"),
    "a2-highgpu-8g": (8, "A100-40GB"),
    "a2-megagpu-16g": (16, "A100-40GB"),
    "a2-ultragpu-1g": (1, "A100-80GB"),
    "a2-ultragpu-2g": (2, "A100-80GB"),
    "a2-ultragpu-4g": (4, "A100-80GB"),
    "a2-ultragpu-8g": (8, "A100-80GB"),
    "a3-highgpu-8g": (8, "H100-80GB"),
    "a3-megagpu-8g": (8, "H100-80GB"),
    **{f"g2-standard-{cpus}": (1, "L4") for cpus in (4, 8, 12, 16, 32)},
    "g2-standard-24": (2, "L4"),
    "g2-standard-48": (4, "L4"),
    "g2-standard-96": (8, "L4"),
}
_BY_LOWER = {name.lower(): name for name in _SKUS}
_EXAMPLES = ("Standard_NC6s_v3", "Standard_NC24ads_A100_v4", "g5.xlarge", "p4d.24xlarge", "a2-highgpu-1g")


def known_instance_types() -> list[str]:
    """Every instance type in the table, in its canonical spelling."""
    return sorted(_SKUS)


def smallest_with(min_gib: float) -> GpuSku | None:
    """A known SKU whose GPUs have at least `min_gib` GiB each: the smallest such GPU, fewest per node."""
    models = sorted((memory, model) for model, (memory, _) in _GPUS.items() if memory >= min_gib)
    if not models:
        return None
    model = models[0][1]
    candidates = [(count, index, name) for index, (name, (count, m)) in enumerate(_SKUS.items()) if m == model]
    return lookup(min(candidates)[2])


def lookup(instance_type: str | None, *, gpu_count: int | None = None, gpu_memory_gib: float | None = None,
           bf16: bool | None = None) -> GpuSku:
    """The SKU for `instance_type` (case-insensitive); explicit values override the table.

    An instance type the table does not know (or none) needs both `gpu_count` and `gpu_memory_gib`
    (the CLI's `--gpus N --gpu-memory GIB`); its GPU model is "unknown" and bf16 is assumed unless
    `bf16` says otherwise (at run time tuner still falls back to float16 on a GPU without it).
    """
    _check_override(gpu_count, gpu_memory_gib)
    canonical = _BY_LOWER.get((instance_type or "").strip().lower())
    if canonical is None:
        if gpu_count is None or gpu_memory_gib is None:
            raise _unknown(instance_type, gpu_count, gpu_memory_gib)
        return GpuSku(name=instance_type or "custom", gpu_count=gpu_count, gpu_model="unknown",
                      gpu_memory_gib=float(gpu_memory_gib), bf16=True if bf16 is None else bf16)
    count, model = _SKUS[canonical]
    memory, has_bf16 = _GPUS[model]
    sku = GpuSku(name=canonical, gpu_count=count, gpu_model=model, gpu_memory_gib=memory, bf16=has_bf16)
    overrides = {key: value for key, value in
                 (("gpu_count", gpu_count), ("gpu_memory_gib", gpu_memory_gib), ("bf16", bf16)) if value is not None}
    if "gpu_memory_gib" in overrides:
        overrides["gpu_memory_gib"] = float(overrides["gpu_memory_gib"])
    return dataclasses.replace(sku, **overrides)


def _check_override(gpu_count: int | None, gpu_memory_gib: float | None) -> None:
    if gpu_count is not None and (isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or gpu_count < 1):
        raise UserError(f"{gpu_count!r} is not a GPU count", where="--gpus", fix="give a whole number >= 1")
    if gpu_memory_gib is not None and (isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float))
                                       or not gpu_memory_gib > 0):
        raise UserError(f"{gpu_memory_gib!r} is not a memory size", where="--gpu-memory",
                        fix="give each GPU's memory in GiB, e.g. --gpu-memory 80")


def _unknown(instance_type: str | None, gpu_count: int | None, gpu_memory_gib: float | None) -> UserError:
    missing = " and ".join(flag for flag, value in (("--gpus N", gpu_count), ("--gpu-memory GIB", gpu_memory_gib))
                           if value is None)
    if instance_type:
        message = f"tuner does not know instance type {instance_type!r}"
        close = difflib.get_close_matches(instance_type.lower(), list(_BY_LOWER), n=1, cutoff=0.8)
        hint = f"did you mean {_BY_LOWER[close[0]]!r}? Otherwise give " if close else "give "
    else:
        message, hint = "no instance type is set", "set one, or give "
    return UserError(
        message, where="resource.instanceType",
        fix=f"{hint}its GPUs with {missing} (GPUs per node and each GPU's memory in GiB), "
            f"or use a known instance type such as {', '.join(_EXAMPLES)}")
