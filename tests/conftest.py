"""Shared fixtures: offline hub, a cached SmolLM2 model, a tiny random model, the shared data."""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import kmock as kmocklib
import pytest
from kubernetes import client

from registry_support import FaultProxy, RegistryServer, TokenAuthProxy

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The real datasets in ../shared/data, one per format tuner detects (folder = format).
SHARED_DATASETS = {
    "messages": "messages/chitchat-messages.parquet",
    "dolly": "dolly/chitchat-dolly.parquet",
    "prompt-completion": "prompt-completion/chatterbot-prompt-completion.parquet",
    "alpaca": "alpaca/llamafactory-alpaca_en_demo.json",
    "sharegpt": "sharegpt/llamafactory-glaive_toolcall_en_demo.json",
    "text": "text/llamafactory-c4_demo.jsonl",
}

# Hub downloads cannot work here; models are built locally or converted from the shipped GGUF.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The converted SmolLM2 folder is reused across runs (conversion takes ~30 s).
os.environ.setdefault("TUNER_CACHE_DIR", str(REPO / ".cache" / "tuner"))
os.environ.pop("TUNER_LOG_FORMAT", None)  # tests choose the log form themselves


@pytest.fixture(autouse=True)
def plain_text_log() -> Iterator[None]:
    """Each test starts with text log lines and no event record, whatever a test before it chose."""
    from tuner.observe import events

    events.configure("text")
    yield
    events.record_to(None)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared data folder (`../shared`), present in CI beside the checkout."""
    assert SHARED.is_dir(), f"{SHARED} is missing: tests need ../shared beside the checkout"
    return SHARED


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, SmolLM2-135M-Instruct, converted from its GGUF (cached)."""
    from tuner.spec.presets import get_preset
    from tuner.train.base_model import resolve_base_model

    return resolve_base_model(get_preset("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """SmolLM2 cut to its first 2 of 30 layers: real embeddings and tokenizer, trains ~15x faster.

    Real embeddings matter: a randomly initialised tiny model's logits are too flat for a few
    LoRA steps to move the loss, so "the loss falls" would test nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, num_hidden_layers=2)
    out = tmp_path_factory.mktemp("smollm2-2-layers")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out)
    return out


def _trained_work_dir(tmp_path_factory, model_dir: Path, method: str) -> Path:
    """The work directory of a real `tuner run` (6 steps of `method` on `model_dir`, rows from a volume)."""
    import json

    import yaml

    from tuner import cli

    root = tmp_path_factory.mktemp(f"trained-{method}")
    (root / "data").mkdir()
    (root / "data" / "rows.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
        for i in range(6)))
    (root / "workspace.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": f"trained-{method}"},
        "resource": {"instanceType": "Standard_NC6s_v3"},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": method,
                   "input": {"volumeSource": {"hostPath": {"path": "data"}}},
                   "output": {"volumeSource": {"hostPath": {"path": "out"}}}}}))
    (root / "training_config.yaml").write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(model_dir)},
        "TrainingArguments": {"max_steps": 6, "logging_steps": 2, "learning_rate": 0.01, "max_length": 64}}}))
    work = root / "work"
    assert cli.main(["run", str(root / "workspace.yaml"), "--config", str(root / "training_config.yaml"),
                     "--work-dir", str(work)]) == 0
    return work


@pytest.fixture(scope="session")
def lora_work_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A finished `tuner run` work directory: a LoRA adapter of the tiny model (treat it as read-only)."""
    return _trained_work_dir(tmp_path_factory, tiny_model_dir, "lora")


@pytest.fixture(scope="session")
def qlora_work_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """Likewise, a QLoRA adapter (bitsandbytes 4-bit NF4 base on the CPU)."""
    return _trained_work_dir(tmp_path_factory, tiny_model_dir, "qlora")


@contextlib.contextmanager
def serving_with(handler) -> Iterator[str]:
    """A real threaded HTTP server on 127.0.0.1 answering with `handler` for the block; yields
    HOST:PORT. Its threads are daemons, so a handler that never returns cannot hold the test."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serving(root: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `root` for the block; yields its base URL."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    with serving_with(functools.partial(QuietHandler, directory=str(root))) as host:
        yield f"http://{host}"


@pytest.fixture()
def http_server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a fresh folder; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("served")
    with serving(root) as base:
        yield root, base


# Real OCI registries (docker-registry 2.8 with htpasswd auth) and proxies in front of them.


@pytest.fixture(scope="session")
def registry_tls(tmp_path_factory) -> Iterator[RegistryServer]:
    """A registry over HTTPS (certificate from a throwaway CA, `ca_cert`), shared by the session."""
    with RegistryServer(tmp_path_factory.mktemp("registry-tls"), tls=True) as server:
        yield server


@pytest.fixture(scope="session")
def registry_plain(tmp_path_factory) -> Iterator[RegistryServer]:
    """A registry over plain HTTP, shared by the session: use repository names of your own."""
    with RegistryServer(tmp_path_factory.mktemp("registry-plain"), tls=False) as server:
        yield server


@pytest.fixture()
def fault_proxy(registry_plain: RegistryServer) -> Iterator[FaultProxy]:
    """A fresh fault-injecting, request-recording proxy in front of `registry_plain`."""
    with FaultProxy(registry_plain) as proxy:
        yield proxy


@pytest.fixture()
def token_proxy(registry_plain: RegistryServer) -> Iterator[TokenAuthProxy]:
    """A fresh bearer-token proxy (Docker Hub style auth) in front of `registry_plain`."""
    with TokenAuthProxy(registry_plain) as proxy:
        yield proxy


# ---------------------------------------------------------------------- kmock as the Kubernetes API server


@pytest.fixture
def cluster(kmock):
    """kmock, plus what an API server does that kmock does not (see kube_support)."""
    counter = itertools.count(1)

    def stamp(request):
        metadata = request.data["metadata"]
        obj = kmock.objects[request.resource, request.namespace or metadata.get("namespace"), metadata["name"]]
        obj.patch({"metadata": {"uid": str(uuid.uuid4()), "resourceVersion": str(next(counter)),
                                "creationTimestamp": f"2026-01-01T00:00:{next(counter):02d}Z"}})
        return obj.raw

    # Below the tests' own reactions (priority 0), above kmock's built-in fallbacks (-inf).
    (kmock ** -1)[kmock.action.CREATE] << 201 << stamp
    kmock.resources["v1/pods"] = {}
    return kmock


@pytest.fixture
def api(kmock) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=str(kmock.url).rstrip("/")))


@pytest.fixture
def pod_logs(kmock):
    """Canned container logs: {(pod, container): text, or a list of chunks streamed with follow=true}."""
    store: dict[tuple[str, str], str | list[str]] = {}

    def serve(request):
        log = store.get((request.name, request.params.get("container")))
        if log is None:
            # Raised, not returned as kmock.Response(status=400): a returned Response's status sticks to
            # the reaction and would answer every later request 400 too.
            raise kmocklib.KubernetesError(400, "BadRequest", f'container "{request.params.get("container")}" '
                                                              f'in pod "{request.name}" is waiting to start: '
                                                              "PodInitializing")
        if isinstance(log, list):
            if request.params.get("follow") == "true":
                return tuple(chunk.encode() for chunk in log)  # a tuple is streamed chunk by chunk
            log = "".join(log)
        if "tailLines" in request.params:
            log = "".join(log.splitlines(keepends=True)[-int(request.params["tailLines"]):])
        return log.encode()

    kmock["get", kmock.resource("v1/pods"), kmock.subresource("log")] << serve
    return store
