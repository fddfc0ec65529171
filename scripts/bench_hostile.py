"""Hostile inputs against a baseline, in one invocation: wall time and peak RSS of `tuner check-data`
on each hostile file, as ratios to the same command on a one-row good file (the import and model
load floor). Bounded means ratios near 1x: the bomb costs what the good file costs.

    python scripts/bench_hostile.py [--tokenizer DIR] [--timeout S]

PYTHONPATH=OTHER_CHECKOUT runs another tuner through the same cases (e.g. a release before the limits).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def cases(folder: Path) -> dict[str, Path]:
    """The hostile files of tests/bad_inputs/test_hostile_data_and_servers.py, and the baseline."""
    made = {}
    good = folder / "good.jsonl"
    good.write_text(json.dumps(GOOD) + "\n")
    made["baseline: 1 good row"] = good
    zeros = bytes(64 << 20)
    for name, packed in (("bomb.jsonl.gz", gzip.compress(zeros, 9)),
                         ("bomb.jsonl.zst", zstandard.ZstdCompressor(level=19).compress(zeros))):
        path = folder / name
        path.write_bytes(packed * 64)
        made[f"{name}: 4 GiB of zeros"] = path
    giant = folder / "giant.jsonl"
    with giant.open("w") as out:
        out.write(json.dumps(GOOD) + "\n" + '{"messages": [{"role": "user", "content": "' + "a" * (200 << 20)
                  + '"}]}\n')
    made["one JSON line of 200 MB"] = giant
    cell = folder / "cell.parquet"
    pq.write_table(pa.table({"prompt": ["Hi", "x" * (50 << 20)], "completion": ["Hello", "y"]}), cell,
                   row_group_size=1)
    made["a parquet cell of 50 MB"] = cell
    deep = folder / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    made["JSON nested 100,000 levels"] = deep
    turns = folder / "turns.jsonl"
    turns.write_text(json.dumps({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"}
                                              for i in range(100_000)]}) + "\n" + json.dumps(GOOD) + "\n")
    made["a conversation of 100,000 turns"] = turns
    return made


def measure(path: Path, tokenizer: str, timeout: float) -> tuple[float, float, int | str]:
    """(seconds, peak RSS in MiB, exit code or "killed") of one `tuner check-data` process."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", "check-data", str(path), "--tokenizer", tokenizer],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    killed = False
    while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
        if time.monotonic() - started > timeout:
            proc.kill()
            killed = True
            waited = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    _, status, usage = waited
    return time.monotonic() - started, usage.ru_maxrss / 1024, "killed" if killed else os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(Path.home() / ".cache/tuner/models/smollm2-135m-instruct"))
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a case is killed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {name: measure(path, args.tokenizer, args.timeout) for name, path in cases(Path(folder)).items()}
    base_seconds, base_rss, _ = results["baseline: 1 good row"]
    print(f"{'case':36} {'exit':>4} {'seconds':>8} {'x base':>7} {'peak RSS MiB':>13} {'x base':>7}")
    for name, (seconds, rss, code) in results.items():
        print(f"{name:36} {code:>4} {seconds:>8.1f} {seconds / base_seconds:>6.2f}x {rss:>13,.0f} "
              f"{rss / base_rss:>6.2f}x")


if __name__ == "__main__":
    main()
