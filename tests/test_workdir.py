"""tuner.workdir: one owner of the work directory's paths, writes that are whole or absent, and
scratch folders that never outlive their process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tuner.workdir import WorkDir, atomic_output, atomic_write, atomic_write_json, scratch_dir, sweep


def test_every_path_of_the_layout_is_under_the_root(tmp_path):
    work = WorkDir(tmp_path / "w")
    paths = [work.inputs, work.fetched_marker, work.prepared, work.checkpoints, work.adapter, work.summary,
             work.curve, work.image, work.events, work.result]
    assert all(path.is_relative_to(work.root) for path in paths) and len(set(paths)) == len(paths)
    assert work.summary.parent == work.curve.parent == work.adapter  # they travel with the adapter


def test_an_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "deep" / "record.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["record.json"]


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_a_scratch_folder_is_removed_on_an_error(tmp_path):
    with pytest.raises(ValueError), scratch_dir("tuner-test-", tmp_path) as folder:
        (folder / "big").write_bytes(b"x" * 1000)
        raise ValueError("stop")
    assert list(tmp_path.iterdir()) == []


def test_the_scratch_of_a_killed_process_is_swept_and_a_live_ones_is_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"tuner-test-{dead.stdout.strip()}-abc").mkdir()
    (tmp_path / f"tuner-test-{os.getpid()}-def").mkdir()
    assert [p.name for p in sweep("tuner-test-", tmp_path)] == [f"tuner-test-{dead.stdout.strip()}-abc"]
    assert [p.name for p in tmp_path.iterdir()] == [f"tuner-test-{os.getpid()}-def"]
