"""`tuner render --merged-image REF`: the Job's `tuner run` is told to push the merged model too, with
the Workspace's push secret; a reference a Job cannot push to is refused before anything is printed."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from job_support import seed_workspace
from tuner import cli

K8S_VERSION = kubernetes_validate.latest_version()


def render(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["render", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tuner_container(documents: list[dict]) -> dict:
    job = next(d for d in documents if d["kind"] == "Job")
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "tuner")


def test_the_jobs_run_pushes_the_merged_model_with_the_push_secret(tmp_path, capsys):
    code, out, _ = render([str(seed_workspace(tmp_path)), "--merged-image", "myacr.azurecr.io/models/phi3-merged:1"],
                          capsys)
    assert code == 0
    documents = list(yaml.safe_load_all(out))
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    tuner = tuner_container(documents)
    args = tuner["args"]
    assert args[args.index("--merged-image") + 1] == "myacr.azurecr.io/models/phi3-merged:1"
    assert {"name": "DOCKER_CONFIG", "value": "/etc/tuner/push-secret"} in tuner["env"]
    assert {"name": "push-secret", "mountPath": "/etc/tuner/push-secret", "readOnly": True} in tuner["volumeMounts"]


def test_a_short_reference_is_passed_normalised_and_the_note_says_so(tmp_path, capsys):
    code, out, _ = render([str(seed_workspace(tmp_path)), "--merged-image", "merged"], capsys)
    assert code == 0
    assert "# --merged-image: merged normalised to docker.io/library/merged:latest, as Kaito reads it" in out
    args = tuner_container(list(yaml.safe_load_all(out)))["args"]
    assert args[args.index("--merged-image") + 1] == "docker.io/library/merged:latest"


def test_a_workspace_without_a_push_secret_warns_that_the_merged_push_is_anonymous(tmp_path, capsys):
    path = seed_workspace(tmp_path, output={"volumeSource": {"persistentVolumeClaim": {"claimName": "adapters"}}})
    code, out, _ = render([str(path), "--merged-image", "myacr.azurecr.io/models/merged:1"], capsys)
    assert code == 0
    assert ("# warning: --merged-image: the push will be anonymous: the Job pushes with "
            "tuning.output.imagePushSecret, and the Workspace sets none") in out
    assert not [e for e in tuner_container(list(yaml.safe_load_all(out)))["env"] if e["name"] == "DOCKER_CONFIG"]


def test_without_merged_image_the_job_merges_nothing(tmp_path, capsys):
    code, out, _ = render([str(seed_workspace(tmp_path))], capsys)
    assert code == 0 and "--merged-image" not in tuner_container(list(yaml.safe_load_all(out)))["args"]


@pytest.mark.parametrize("reference, expected", [
    ("oci:/tmp/merged", "error: --merged-image: 'oci:/tmp/merged' is an OCI layout, which would stay inside the "
                        "Job's pod; name a registry image: REGISTRY/REPOSITORY:TAG"),
    ("myacr.azurecr.io/adapters/phi3:0.0.1", "error: --merged-image: 'myacr.azurecr.io/adapters/phi3:0.0.1' is also "
                                             "where the adapter image goes"),
    ("myacr.azurecr.io/Models/x:1", "error: --merged-image: 'myacr.azurecr.io/Models/x:1' is not a valid image "
                                    "reference"),
])
def test_a_reference_the_job_cannot_push_to_is_one_error_line(tmp_path, capsys, reference, expected):
    code, out, err = render([str(seed_workspace(tmp_path)), "--merged-image", reference], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), err
