"""Benchmark: push a ~200 MB adapter layer to a loopback registry, tuner vs `skopeo copy`.

Both clients copy the same image from the same OCI layout into a docker-registry (htpasswd auth)
over plain HTTP and over TLS. Every repetition starts a fresh registry: skopeo remembers where it
pushed a blob and mounts it into other repositories of the same registry without uploading, which
would measure its cache rather than the upload. Also pushes the unchanged image again and reports
the layer bytes that re-push uploaded (target: 0).

Usage: python scripts/bench_push.py [--mb 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from registry_support import RegistryServer, skopeo, skopeo_auth_args  # noqa: E402
from tuner.oci.image import OciLayoutTarget  # noqa: E402
from tuner.oci.publish import package  # noqa: E402
from tuner.oci.registry import push_layout  # noqa: E402
from tuner.spec.targets import RegistryOptions


def make_adapter(folder: Path, megabytes: int) -> Path:
    """An adapter folder whose weights are `megabytes` of bf16-like random values (little to compress)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64}')
    rows = megabytes * (1 << 20) // (4 * 4096)
    weights = np.random.default_rng(0).standard_normal((rows, 4096), dtype=np.float32) * 0.02
    save_file({"base_model.model.lora_A.weight": weights}, str(folder / "adapter_model.safetensors"))
    return folder


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench(root: Path, tls: bool, layout: OciLayoutTarget, layer_bytes: int, repeats: int) -> dict:
    tuner_s, skopeo_s, repush_s, repush_bytes = [], [], [], []
    for rep in range(repeats):
        folder = root / f"{'https' if tls else 'http'}-{rep}"
        folder.mkdir()
        with RegistryServer(folder, tls=tls) as server:
            options = RegistryOptions(insecure_registries=frozenset() if tls else frozenset({server.host}),
                                      ca_cert=server.ca_cert, config_file=server.docker_config(folder / "docker"))
            ref = f"{server.host}/bench/tuner:v1"
            tuner_s.append(timed(functools.partial(push_layout, layout, ref, options)))
            skopeo_s.append(timed(lambda: skopeo("copy", *skopeo_auth_args(server, "dest"),
                                                 f"oci:{layout.path}:{layout.tag}",
                                                 f"docker://{server.host}/bench/skopeo:v1")))
            started = time.perf_counter()
            repush_bytes.append(push_layout(layout, ref, options).uploaded_bytes)
            repush_s.append(time.perf_counter() - started)
    tuner_mb_s = layer_bytes / statistics.median(tuner_s) / 1e6
    skopeo_mb_s = layer_bytes / statistics.median(skopeo_s) / 1e6
    return {"tuner_s": tuner_s, "skopeo_s": skopeo_s, "tuner_mb_s": tuner_mb_s, "skopeo_mb_s": skopeo_mb_s,
            "ratio": tuner_mb_s / skopeo_mb_s, "repush_uploaded_bytes": max(repush_bytes),
            "repush_s": statistics.median(repush_s)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="adapter weights size in MB (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="pushes per client and transport (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-push-") as scratch:
        root = Path(scratch)
        adapter = make_adapter(root / "adapter", args.mb)
        layout = OciLayoutTarget(root / "layout", "v1")
        build_s = timed(lambda: package(adapter, layout))
        layer_bytes = max(p.stat().st_size for p in (layout.path / "blobs" / "sha256").iterdir())
        print(f"layer: {layer_bytes / 1e6:,.1f} MB (built in {build_s:.1f}s); median of {args.repeats} pushes each")
        for tls in (False, True):
            r = bench(root, tls, layout, layer_bytes, args.repeats)
            name = "https" if tls else "http"
            print(f"{name}: tuner {r['tuner_mb_s']:,.0f} MB/s ({', '.join(f'{s:.2f}' for s in r['tuner_s'])} s) | "
                  f"skopeo {r['skopeo_mb_s']:,.0f} MB/s ({', '.join(f'{s:.2f}' for s in r['skopeo_s'])} s) | "
                  f"tuner/skopeo x{r['ratio']:.2f} | unchanged re-push: {r['repush_uploaded_bytes']} layer bytes "
                  f"in {r['repush_s']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
