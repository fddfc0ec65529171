"""No secret reaches a log, the work directory, the summary or the image: a full job runs with
known secret values (push credentials, a URL token, a hub token) and everything it wrote is scanned."""

from __future__ import annotations

import base64
import json

import yaml

from job_support import ROWS, configmap
from registry_support import skopeo, skopeo_auth_args
from tuner import cli

URL_TOKEN = "sig-url-token-5e1f0c"
HUB_TOKEN = "hf_hubtoken9a8b7c6d5e4f"


def test_a_full_job_writes_no_secret_anywhere(tmp_path, tiny_model_dir, http_server, registry_plain, capsys,
                                             monkeypatch):
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "secret")))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    ref = f"{registry_plain.host}/secrets/adapter:1"
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": "secrets"},
        "resource": {"instanceType": "Standard_NC6s_v3"},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "e2e-params",
                   "input": {"urls": [f"{base}/rows.jsonl?sig={URL_TOKEN}&se=2030-01-01"]},
                   "output": {"image": ref, "imagePushSecret": "push"}}}))
    work = tmp_path / "work"
    code = cli.main(["--debug", "run", str(workspace), "--config", str(configmap(tmp_path, tiny_model_dir)),
                     "--work-dir", str(work), "--allow-private-urls", "--insecure-registry", registry_plain.host])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    secrets = [registry_plain.password, URL_TOKEN, HUB_TOKEN,
               base64.b64encode(f"{registry_plain.username}:{registry_plain.password}".encode()).decode()]

    written = {"stdout": captured.out.encode(), "stderr": captured.err.encode()}
    written |= {str(p): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    image = skopeo_auth_args(registry_plain)
    written["manifest"] = skopeo("inspect", "--raw", *image, f"docker://{ref}").encode()
    written["config"] = skopeo("inspect", "--config", *image, f"docker://{ref}").encode()
    assert "adapter/training_summary.json" in " ".join(written) and len(written) > 10
    leaks = [(where, secret) for where, data in written.items() for secret in secrets if secret.encode() in data]
    assert leaks == []
