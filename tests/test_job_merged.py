"""`tuner run --merged-image`: after the adapter image, the base model with the adapter merged goes
to a real registry as a second image, read back with skopeo (the independent client) and loaded
with plain transformers; a retried pod re-pushes it without training or merging again."""

from __future__ import annotations

import json

import pytest
import torch

from job_support import ROWS, configmap, sha256_of, workspace
from registry_support import skopeo, skopeo_auth_args
from tuner import cli
from tuner.oci.unpack import unpack_data_dir

PROMPTS = ["Question 2?", "Answer 4.", "Once upon a time"]


@pytest.fixture()
def served_rows(http_server) -> list[str]:
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return [f"{base}/rows.jsonl"]


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS]


def test_run_pushes_the_merged_model_as_a_second_image_and_a_retry_reuses_it(
        tmp_path, tiny_model_dir, served_rows, registry_plain, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "secret")))
    host, work = registry_plain.host, tmp_path / "work"
    adapter_ref, merged_ref = f"{host}/e2e/adapter:1", f"{host}/e2e/merged:1"
    argv = ["run", str(workspace(tmp_path, served_rows)), "--config", str(configmap(tmp_path, tiny_model_dir)),
            "--work-dir", str(work), "--output", adapter_ref, "--merged-image", merged_ref,
            "--allow-private-urls", "--insecure-registry", host]
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    result = json.loads((work / "result.json").read_text())
    assert result["image"]["reference"] == adapter_ref and result["merged_image"]["reference"] == merged_ref
    assert "merge" in result["stage_seconds"] and f"merged_image {merged_ref}@{result['merged_image']['digest']}" in log

    adapter_info = json.loads(skopeo("inspect", *skopeo_auth_args(registry_plain), f"docker://{adapter_ref}"))
    merged_info = json.loads(skopeo("inspect", *skopeo_auth_args(registry_plain), f"docker://{merged_ref}"))
    assert adapter_info["Digest"] == result["image"]["digest"]
    assert merged_info["Digest"] == result["merged_image"]["digest"] != adapter_info["Digest"]
    labels = merged_info["Labels"]
    assert (merged_info["Os"], merged_info["Architecture"]) == ("linux", "amd64")
    assert labels["dev.tuner.merged-dtype"] == "float32"  # the dtype this CPU trained in
    assert labels["org.opencontainers.image.title"] == "e2e merged model"
    assert labels["dev.tuner.config-digest"] == result["config_digest"]

    skopeo("copy", *skopeo_auth_args(registry_plain, "src"), f"docker://{merged_ref}", f"dir:{tmp_path / 'copy'}")
    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    assert len(manifest["layers"]) == 1
    layer = manifest["layers"][0]
    files = unpack_data_dir([(tmp_path / "copy" / layer["digest"].split(":")[1], layer["mediaType"])],
                            tmp_path / "pulled")
    pulled = {p.name for p in files if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge_summary.json"} <= pulled
    assert pulled == {p.name for p in (work / "merged").iterdir()}
    for name in pulled:
        assert sha256_of(tmp_path / "pulled" / name) == sha256_of(work / "merged" / name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "pulled").eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pulled")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          work / "adapter").eval()
    for got, want in zip(logits(merged, tokenizer), logits(reference, tokenizer), strict=True):
        assert (got - want).abs().max() < 1e-3

    # a retried pod: the finished adapter and the finished merge are reused, both images pushed again
    stamp = (work / "merged" / "model.safetensors").stat().st_mtime_ns
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "train: skipped" in log and f"merge: skipped: {work / 'merged'} already holds this adapter" in log
    assert f"push: done: {merged_ref}@{result['merged_image']['digest']}, 0.0 MB uploaded" in log
    assert (work / "merged" / "model.safetensors").stat().st_mtime_ns == stamp
    again = json.loads((work / "result.json").read_text())
    assert again["merged_image"] == result["merged_image"] and again["image"] == result["image"]
