"""WORK/prepared, kept for the next run: the example store, the train/eval split and a record of
what made them.

The record (`RECORD_FILE`) is written last and holds a key over everything preparation reads:
the dataset files (names and sha256s), the tokenizer (vocabulary, merges, normalisation, special
tokens, chat template), the DatasetConfig section, `max_length` and the store's format. A run
whose key matches reuses the folder without reading a row; anything else prepares again, after
deleting the record first, so a preparation cut short is never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tuner import __version__
from tuner.data.fetch import InputFile
from tuner.data.prepare import STORE_FILE, DataStats, Dropped, FileReport, IndexedExamples, PreparedData, prepare
from tuner.data.store import ExampleStore
from tuner.observe import events
from tuner.spec.config_sections import DatasetSection
from tuner.workdir import atomic_write_json

RECORD_FILE = "prepared.json"
SPLIT_FILE = "split.npz"  # the stored rows that train and that evaluate
STORE_FORMAT = 1  # bump when the store's layout or the encoding of a row changes


def cache_key(files: list[tuple[str, str]], tokenizer, dataset_config: dict[str, Any], max_length: int) -> str:
    """The key of one preparation: `files` are (file name, sha256) in reading order."""
    content = {
        "files": [list(f) for f in files],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset_config": dataset_config,
        "max_length": max_length,
        "store_format": STORE_FORMAT,
        "tuner_version": __version__,
    }
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything in a tokenizer that changes the token ids of a rendered chat."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole pipeline: normaliser, pre-tokeniser, model, post-processor
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {"class": type(tokenizer).__name__, "chat_template": tokenizer.chat_template,
                "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def load(out_dir: Path, key: str | None = None) -> PreparedData | None:
    """The data prepared into `out_dir`, if its record is complete and (given a key) matches it."""
    record = _read_record(out_dir)
    if record is None or (key is not None and record.get("key") != key):
        return None
    store_file, split_file = out_dir / STORE_FILE, out_dir / SPLIT_FILE
    if not store_file.is_file() or store_file.stat().st_size != record.get("store_bytes") or not split_file.is_file():
        return None
    store = ExampleStore(store_file)
    with np.load(split_file) as split:
        return PreparedData(IndexedExamples(store, split["train"]), IndexedExamples(store, split["eval"]),
                            _stats_from(record["stats"]))


def forget(out_dir: Path) -> None:
    """Delete the record before `out_dir` is prepared again."""
    (out_dir / RECORD_FILE).unlink(missing_ok=True)


def save(out_dir: Path, key: str, prepared: PreparedData) -> None:
    """Write the split, then the record (last, atomically), so the next run can reuse `out_dir`."""
    np.savez(out_dir / SPLIT_FILE, train=prepared.train.indices, eval=prepared.eval.indices)
    atomic_write_json(out_dir / RECORD_FILE, {"key": key, "store_bytes": (out_dir / STORE_FILE).stat().st_size,
                                                  "stats": asdict(prepared.stats)})


def _read_record(out_dir: Path) -> dict | None:
    try:
        record = json.loads((out_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "stats" in record else None


def _stats_from(recorded: dict) -> DataStats:
    return DataStats(**(recorded | {"files": [FileReport(**f) for f in recorded["files"]],
                                    "dropped": {k: Dropped(**v) for k, v in recorded["dropped"].items()}}))


def prepare_once(inputs: list[InputFile], tokenizer, dataset: DatasetSection, max_length: int,
                 out_dir: Path) -> PreparedData:
    """Prepare the inputs into `out_dir`, or reuse what a run with the same inputs, tokenizer and
    DatasetConfig prepared there before."""
    key = cache_key([(f.path.name, f.sha256) for f in inputs], tokenizer, dataset.values(), max_length)
    prepared = load(out_dir, key)
    if prepared is not None:
        events.info(f"prepare: reusing the data prepared earlier in {out_dir} (same inputs, tokenizer and config)")
        return prepared
    forget(out_dir)
    prepared = prepare([f.path for f in inputs], tokenizer, max_length=max_length, out_dir=out_dir, dataset=dataset)
    save(out_dir, key, prepared)
    return prepared
