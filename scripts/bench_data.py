"""Data preparation speed and memory: tuner vs a per-row `datasets.map` baseline.

Generates dolly-like parquet files (instruction, context, response, category) of 100k and 1M
rows, then, in the same run and with the same tokenizer (SmolLM2-135M-Instruct's):
- tuner's preparation (`tuner.data.prepare`: stream, render, batch-tokenize, mask, write) on both;
- the baseline on the 100k file: `datasets.map` over rows, tokenizing each the way TRL's
  SFTTrainer does for prompt/completion data: the prompt with a generation prompt, then prompt +
  completion, the loss mask being the completion part. That is the same output tuner produces
  (token ids and an assistant-only loss mask); an ids-only variant is reported too;
- the tokenizer's own limit on the 100k file: bare `encode_batch` (the Rust tokenizer, every core) over
  the same rendered texts in the same chunks, rendering untimed: what preparation cannot beat.
Each measurement runs in its own process, so peak RSS is that run's alone.

Targets: tuner rows/s >= 5x the baseline's and >= 0.9x bare encode_batch; tuner's peak RSS at 1M rows <= 1.5x at 100k.
Usage: HF_HUB_OFFLINE=1 python scripts/bench_data.py [--sizes 100000 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the cluster node deploy release image adapter model token train data batch window team "
         "service region storage volume secret registry network policy quota metric alert rollout "
         "version config schedule queue worker shard replica backup restore latency budget").split()
CATEGORIES = ("open_qa", "closed_qa", "brainstorming", "summarization", "classification", "creative_writing")


def generate(path: Path, rows: int, seed: int = 0, group: int = 50_000) -> None:
    """Write a dolly-like parquet in row groups (bounded memory), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)

    def sentences(count: int, low: int, high: int) -> list[str]:
        sizes = rng.integers(low, high, size=count)
        flat = words[rng.integers(0, len(words), size=int(sizes.sum()))]
        cuts = np.cumsum(sizes)[:-1]
        return [" ".join(part).capitalize() + "." for part in np.split(flat, cuts)]

    schema = pa.schema([("instruction", pa.string()), ("context", pa.string()),
                        ("response", pa.string()), ("category", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            context = sentences(n, 20, 80)
            has_context = rng.random(n) < 0.4
            writer.write_table(pa.table({
                "instruction": sentences(n, 6, 20),
                "context": [c if keep else "" for c, keep in zip(context, has_context, strict=True)],
                "response": sentences(n, 15, 90),
                "category": [CATEGORIES[i] for i in rng.integers(0, len(CATEGORIES), size=n)],
            }, schema=schema))


def measure_tuner(path: Path, work: Path) -> dict:
    from tuner.data import prepare
    from tuner.spec.training_config import build_config
    from tuner.train.base_model import load_tokenizer

    tokenizer = load_tokenizer(_model_dir(), build_config("lora").model)
    started = time.perf_counter()
    prepared = prepare.prepare([path], tokenizer, max_length=1024, out_dir=work)
    seconds = time.perf_counter() - started
    return {"rows": prepared.stats.rows_read, "kept": prepared.stats.rows_kept, "seconds": round(seconds, 2),
            "tokens": prepared.stats.tokens}


def measure_encode(path: Path) -> dict:
    """Bare `encode_batch` over the texts tuner renders, chunk by chunk as tuner reads them."""
    from tuner.data import formats, readers
    from tuner.data.encode import Encoder
    from tuner.data.prepare import _detect_formats, row_limits
    from tuner.spec.config_sections import DatasetSection
    from tuner.spec.training_config import build_config
    from tuner.train.base_model import load_tokenizer

    tokenizer = load_tokenizer(_model_dir(), build_config("lora").model)
    encoder = Encoder(tokenizer, 1024, "truncate")
    [(_, fmt)] = _detect_formats([path], DatasetSection().mapping())
    chunks = [[encoder._render(formats.to_sample(row, fmt))[0] for row in chunk.rows]
              for chunk in readers.iter_chunks(path, 2048, row_limits(tokenizer, 1024)[0])]
    started = time.perf_counter()
    tokens = sum(len(e.ids) for texts in chunks for e in encoder.backend.encode_batch(texts, add_special_tokens=False))
    return {"rows": sum(map(len, chunks)), "seconds": round(time.perf_counter() - started, 2), "tokens": tokens}


def measure_baseline(path: Path, ids_only: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    dataset = Dataset.from_parquet(str(path))

    def prompt_of(row: dict) -> list[dict]:
        text = row["instruction"] + (f"\n\n{row['context']}" if row["context"] else "")
        return [{"role": "user", "content": text}]

    def tokenize(row: dict) -> dict:
        prompt = prompt_of(row)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": row["response"]}],
                                             tokenize=True, return_dict=False)
        if ids_only:
            return {"input_ids": full}
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        return {"input_ids": full, "completion_mask": [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))}

    started = time.perf_counter()
    out = dataset.map(tokenize, remove_columns=dataset.column_names, keep_in_memory=False)
    seconds = time.perf_counter() - started
    return {"rows": len(out), "seconds": round(seconds, 2)}


def _model_dir() -> Path:
    from tuner.spec.presets import get_preset
    from tuner.train.base_model import resolve_base_model

    return resolve_base_model(get_preset("smollm2-135m-instruct"))


def _child(kind: str, path: Path, work: Path) -> dict:
    from tuner.observe import events

    events.quiet_libraries()
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if kind == "tuner":
        result = measure_tuner(path, work)
    elif kind == "encode":
        result = measure_encode(path)
    else:
        result = measure_baseline(path, ids_only=kind == "baseline-ids")
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["rows_per_s"] = round(result["rows"] / result["seconds"])
    return result


def run(kind: str, path: Path, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(work)], check=True,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({"run": kind, "file": path.name, **result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FILE", "WORK"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        files = {}
        for size in args.sizes:
            files[size] = root / f"dolly-{size}.parquet"
            generate(files[size], size)
        small, large = min(args.sizes), max(args.sizes)
        tuner = {size: run("tuner", files[size], root / f"work-{size}") for size in args.sizes}
        baseline = run("baseline", files[small], root / "unused")
        baseline_ids = run("baseline-ids", files[small], root / "unused")
        encode = run("encode", files[small], root / "unused")
    print(f"rows/s at {small:,} rows: tuner / baseline x{tuner[small]['rows_per_s'] / baseline['rows_per_s']:.2f} "
          f"(ids-only baseline x{tuner[small]['rows_per_s'] / baseline_ids['rows_per_s']:.2f}; "
          f"bare encode_batch x{tuner[small]['rows_per_s'] / encode['rows_per_s']:.2f}); "
          f"tuner at {large:,} rows: {tuner[large]['rows_per_s']:,} rows/s")
    print(f"peak RSS: tuner at {large:,} / at {small:,} rows x{tuner[large]['peak_rss_mb'] / tuner[small]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
