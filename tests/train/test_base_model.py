"""tuner.models: where the base weights come from, and the ModelConfig keys that choose it."""

from __future__ import annotations

import pytest

from tuner.errors import UserError
from tuner.spec.presets import get_preset
from tuner.train.base_model import resolve_base_model


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_users_revision_replaces_the_presets_pin(capsys):
    preset = get_preset("phi-3-mini-4k-instruct")
    with pytest.raises(UserError) as caught:
        resolve_base_model(preset, hub_options={"revision": "5fa34190089f0ee40f9cce3cbe0aa5db62dc6e7b"})
    assert "microsoft/Phi-3-mini-4k-instruct@5fa34190089f" in str(caught.value)
    assert ("model: microsoft/Phi-3-mini-4k-instruct at revision 5fa34190089f0ee40f9cce3cbe0aa5db62dc6e7b "
            "(ModelConfig.revision; the preset pins") in capsys.readouterr().out


def test_local_files_only_is_applied_and_named_when_the_cache_lacks_the_model():
    with pytest.raises(UserError, match="is not in the model cache and ModelConfig.local_files_only is true; "
                                        "remove local_files_only"):
        resolve_base_model(get_preset("phi-3-mini-4k-instruct"), hub_options={"local_files_only": True})


def test_hub_keys_are_named_where_no_hub_download_happens(tiny_model_dir, capsys):
    preset = get_preset("smollm2-135m-instruct")
    assert resolve_base_model(preset, str(tiny_model_dir), {"revision": "main", "cache_dir": "/x"}) == tiny_model_dir
    assert ("warning: ModelConfig.cache_dir, ModelConfig.revision not applied: the weights come from a local model "
            "folder, not the Hugging Face hub") in capsys.readouterr().out


def test_a_second_job_waits_for_the_one_filling_the_model_cache(tmp_path, capsys):
    """Two jobs on one cache volume never write one model at once: the second waits, and says so."""
    import subprocess
    import sys

    from tuner.train.base_model import model_lock

    target = tmp_path / "models" / "phi-4"
    target.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, pathlib, sys, time\nf = open(sys.argv[1], 'w')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(1)\n"
                               "pathlib.Path(sys.argv[2]).write_text('filled')",
         str(target.with_name("phi-4.lock")), str(tmp_path / "first-job-done")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with model_lock(target):
        assert (tmp_path / "first-job-done").read_text() == "filled"  # the lock came once the first job let go
    holder.wait(timeout=30)
    assert "another job is filling" in capsys.readouterr().out
