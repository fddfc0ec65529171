"""What the end-to-end job tests share: Workspaces (the seed's, and one for a tiny model with its
training ConfigMap), the rows they train on, and a reader for the adapter image they write."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from conftest import SHARED
from tuner.oci.image import LAYER_MEDIA_TYPE, blob_path, read_oci_layout
from tuner.oci.unpack import unpack_data_dir
from tuner.spec.targets import OciLayoutTarget

SEED = SHARED / "seed-examples" / "workspace-phi-3-mini-tuning.yaml"  # the Workspace users start from
PUSH = {"image": "myacr.azurecr.io/adapters/phi3:0.0.1", "imagePushSecret": "acr-push"}
ROWS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(6)
]


def workspace(tmp_path: Path, urls: list[str], method: str = "lora", preset: str = "smollm2-135m-instruct") -> Path:
    doc = {
        "apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": "e2e"},
        "resource": {"instanceType": "Standard_NC6s_v3"},
        "tuning": {"preset": {"name": preset}, "method": method, "config": "e2e-params",
                   "input": {"urls": urls},
                   "output": {"image": "registry.example.com/e2e/adapter:1", "imagePushSecret": "push"}},
    }
    path = tmp_path / "workspace.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def configmap(tmp_path: Path, model_dir: Path) -> Path:
    body = {"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(model_dir)},
        "TrainingArguments": {"max_steps": 6, "logging_steps": 2, "learning_rate": 0.01, "max_length": 64},
    }}
    path = tmp_path / "cm.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "e2e-params"},
                                    "data": {"training_config.yaml": yaml.safe_dump(body)}}))
    return path


def unpack_layout(layout: Path, dest: Path) -> list[Path]:
    """The files of the adapter image tagged v1 in an OCI layout, unpacked into dest."""
    image = read_oci_layout(OciLayoutTarget(layout, "v1"))
    return unpack_data_dir([(blob_path(layout, image.layer.digest), LAYER_MEDIA_TYPE)], dest)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_workspace(tmp_path: Path, *, instance: str = "Standard_NC6s_v3", count: int = 1, input_: dict | None = None,
                   output: dict | None = None, name: str = "phi3-qlora") -> Path:
    """The seed's tuning example with a valid image name, varied where a test says."""
    doc = yaml.safe_load(SEED.read_text())
    doc["metadata"]["name"] = name
    doc["resource"]["instanceType"] = instance
    doc["resource"]["count"] = count
    doc["tuning"]["output"] = output or PUSH
    if input_ is not None:
        doc["tuning"]["input"] = input_
    path = tmp_path / "workspace.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
