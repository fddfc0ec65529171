"""The Workspace tuning spec: the seed examples parse, and every rule names the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuner.errors import UserError
from tuner.spec.workspace import check_url, image_notes, load_workspace

SEED_TUNING = ("workspace-phi-3-mini-tuning.yaml", "workspace-phi-3-mini-128k-tuning.yaml")


def workspace(**tuning_changes) -> dict:
    doc = {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "ws"},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"app": "x"}}},
        "tuning": {
            "preset": {"name": "phi-3-mini-4k-instruct"},
            "method": "qlora",
            "input": {"urls": ["https://example.com/data/train.parquet"]},
            "output": {"image": "example.azurecr.io/adapters/phi3:0.0.1", "imagePushSecret": "push"},
        },
    }
    doc["tuning"].update(tuning_changes)
    return doc


def write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def error_of(tmp_path: Path, doc, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        load_workspace(write(tmp_path, doc), **kwargs)
    return str(caught.value)


@pytest.mark.parametrize("name", SEED_TUNING)
def test_seed_tuning_examples_parse_once_their_placeholder_image_is_filled_in(shared_dir, tmp_path, name):
    doc = yaml.safe_load((shared_dir / "seed-examples" / name).read_text())
    # Kaito's webhook refuses the image placeholder as it stands (uppercase repository), and so does tuner;
    # the API server would refuse the secret placeholder in the pod: both are named at once
    message = error_of(tmp_path, doc)
    assert "tuning.output.imagePushSecret: Secret name 'ACR_REGISTRY_SECRET_HERE' is not a valid" in message
    assert "repository name (IMAGE_NAME_HERE) must be lowercase" in message
    doc["tuning"]["output"] = {"image": "myacr.azurecr.io/adapters/phi3:0.0.1", "imagePushSecret": "acr-push"}
    ws = load_workspace(write(tmp_path, doc))
    assert ws.tuning.method == "qlora"
    assert ws.tuning.preset.name.startswith("phi-3-mini-")
    assert ws.tuning.output.image_push_secret == "acr-push"
    assert ws.tuning.input.urls[0].startswith("https://huggingface.co/datasets/philschmid/dolly-15k-oai-style/")
    assert ws.resource.instance_type == "Standard_NC6s_v3"
    assert ws.resource.label_selector.match_labels == {"app": "phi-3-adapter"}


def test_seed_inference_example_is_refused_as_not_tuning(shared_dir):
    with pytest.raises(UserError, match="no tuning section"):
        load_workspace(shared_dir / "seed-examples" / "workspace-phi-3-mini-inference.yaml")


def test_method_is_case_insensitive(tmp_path):
    assert load_workspace(write(tmp_path, workspace(method="QLoRA"))).tuning.method == "qlora"


def test_v1beta1_is_accepted(tmp_path):
    doc = workspace()
    doc["apiVersion"] = "kaito.sh/v1beta1"
    assert load_workspace(write(tmp_path, doc)).api_version == "kaito.sh/v1beta1"


def test_unknown_method_names_the_field_and_the_choices(tmp_path):
    message = error_of(tmp_path, workspace(method="sft"))
    assert "tuning.method" in message and "'sft'" in message and "'lora'" in message


def test_wrong_api_version_names_the_field(tmp_path):
    doc = workspace()
    doc["apiVersion"] = "kaito.sh/v2"
    assert "apiVersion" in error_of(tmp_path, doc)


def test_tuning_and_inference_are_exclusive(tmp_path):
    doc = workspace()
    doc["inference"] = {"preset": {"name": "phi-3-mini-4k-instruct"}}
    assert "exclusive" in error_of(tmp_path, doc)


def test_input_needs_exactly_one_source(tmp_path):
    both = {"urls": ["https://example.com/a.parquet"], "image": "example.com/data:1"}
    message = error_of(tmp_path, workspace(input=both))
    assert "tuning.input" in message and "urls, image" in message


def test_input_with_no_source_is_refused(tmp_path):
    assert "found none" in error_of(tmp_path, workspace(input={"name": "x"}))


def test_output_image_needs_push_secret(tmp_path):
    message = error_of(tmp_path, workspace(output={"image": "example.com/a/b:1"}))
    assert "tuning.output" in message and "imagePushSecret" in message


def test_output_needs_exactly_one_destination(tmp_path):
    both = {"image": "example.com/a/b:1", "imagePushSecret": "s", "volumeSource": {"emptyDir": {}}}
    assert "tuning.output" in error_of(tmp_path, workspace(output=both))


def test_unknown_field_is_named(tmp_path):
    message = error_of(tmp_path, workspace(epochs=3))
    assert "tuning.epochs" in message and "unknown field" in message


def test_missing_preset_is_named(tmp_path):
    doc = workspace()
    del doc["tuning"]["preset"]
    assert "tuning.preset: required field is missing" in error_of(tmp_path, doc)


def test_bad_url_index_is_named(tmp_path):
    urls = ["https://example.com/ok.parquet", "ftp://example.com/data.parquet"]
    message = error_of(tmp_path, workspace(input={"urls": urls}))
    assert "tuning.input.urls[1]" in message and "http(s)" in message


@pytest.mark.parametrize("url", [
    "http://localhost:8000/a.parquet",
    "http://127.0.0.1/a.parquet",
    "http://10.1.2.3/a.parquet",
    "http://192.168.0.5/a.parquet",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://[::1]/a.parquet",
    "http://[fe80::1]/a.parquet",
])
def test_private_and_metadata_urls_are_refused(url):
    with pytest.raises(UserError, match="--allow-private-urls"):
        check_url(url, allow_private=False, where="tuning.input.urls[0]")


def test_private_urls_are_allowed_on_request(tmp_path):
    doc = workspace(input={"urls": ["http://127.0.0.1:8080/a.parquet"]})
    assert load_workspace(write(tmp_path, doc), allow_private_urls=True).tuning.input.urls


def test_unreadable_yaml_names_the_line(tmp_path):
    path = tmp_path / "ws.yaml"
    path.write_text("apiVersion: kaito.sh/v1alpha1\nkind: [Workspace\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        load_workspace(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_workspace(tmp_path / "nope.yaml")


def test_metadata_name_must_be_a_kubernetes_name(tmp_path):
    doc = workspace()
    doc["metadata"]["name"] = "Not_Valid"
    assert "metadata.name" in error_of(tmp_path, doc)


@pytest.mark.parametrize(("field", "image"), [
    ("input", "Example.com/Datasets/chat:v1"),  # uppercase repository
    ("input", "example.com/data sets:v1"),  # a space
    ("input", "example.com/data:bad@tag"),
    ("input", "example.com/data@sha256:1234"),  # a short digest
    ("output", "example.com/a..b:1"),
    ("output", "oci:/tmp/layout:v1"),  # a local layout is for --output, not the Workspace
])
def test_image_references_kaito_cannot_parse_are_refused_naming_the_field(tmp_path, field, image):
    source = {"image": image} if field == "input" else {"image": image, "imagePushSecret": "push"}
    message = error_of(tmp_path, workspace(**{field: source}))
    assert f"tuning.{field}.image: unable to parse {field} image reference {image!r}: " in message
    assert "[REGISTRY/]REPOSITORY[:TAG][@DIGEST]" in message


def test_references_without_a_registry_host_are_normalised_like_kaito(tmp_path):
    doc = workspace(input={"image": "data-image:latest"}, output={"image": "org/adapter", "imagePushSecret": "p"})
    ws = load_workspace(write(tmp_path, doc))
    assert image_notes(ws) == [
        "tuning.input.image: data-image:latest normalised to docker.io/library/data-image:latest, as Kaito reads it",
        "tuning.output.image: org/adapter normalised to docker.io/org/adapter:latest, as Kaito reads it"]
    assert image_notes(load_workspace(write(tmp_path, workspace()))) == []


def test_a_huge_bad_value_is_quoted_by_a_short_prefix(tmp_path):
    """A bad value can be hundreds of kilobytes (files are capped at 1 MiB): the line shows its head and size."""
    message = error_of(tmp_path, workspace(output={"image": "example.com/" + "A" * 500_000, "imagePushSecret": "p"}))
    assert len(message) < 600 and "(500,012 characters)" in message
    doc = workspace()
    doc["metadata"]["name"] = "X" * 500_000
    message = error_of(tmp_path, doc)
    assert len(message) < 600 and "(500,000 characters)" in message
