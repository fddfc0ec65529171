"""The Job image's Dockerfile stays in step with what the tests run: pins, user, entrypoint."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", dep).groups() for dep in PYPROJECT["project"]["dependencies"])


def test_base_image_torch_equals_the_pinned_torch():
    base = re.search(r"ARG BASE_IMAGE=pytorch/pytorch:(\S+?)-cuda", DOCKERFILE)
    assert base is not None, "the base image must be a pytorch/pytorch CUDA runtime image"
    assert base.group(1) == pins()["torch"]
    assert f"startswith('{pins()['torch']}')" in DOCKERFILE  # the build checks it too


def test_packages_installed_by_hand_match_the_test_setup():
    by_hand = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', DOCKERFILE))
    setup = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (REPO / "scripts" / "setup.sh").read_text()))
    assert by_hand and all(setup.get(name) == version for name, version in by_hand.items())
    assert not set(by_hand) & set(pins()), "pyproject's pins are installed by `pip install .`, not repeated"


def test_every_bundled_folder_is_copied_into_the_build():
    bundled = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    for folder in [*bundled, "tuner", "pyproject.toml"]:
        assert re.search(rf"^COPY {re.escape(folder)} ", DOCKERFILE, re.MULTILINE), folder


def test_runs_as_the_non_root_user_the_job_expects():
    from tuner.kube.render import templates_dir

    assert re.search(r"^USER 1000$", DOCKERFILE, re.MULTILINE)
    assert "runAsUser: 1000" in (templates_dir() / "job.yaml").read_text()


def test_entrypoint_is_the_tuner_cli():
    assert re.search(r'^ENTRYPOINT \["tuner"\]$', DOCKERFILE, re.MULTILINE)
