"""TrainingArguments.report_to: transformers' integrations, checked before any work."""

from __future__ import annotations

import pytest
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from tuner.errors import UserError
from tuner.spec import trackers
from tuner.spec.training_config import build_config


def test_the_known_trackers_are_the_pinned_transformers_integrations():
    assert set(trackers.INTEGRATIONS) == set(INTEGRATION_TO_CALLBACK)


def test_the_trackers_tuner_ships_are_installed():
    assert all(trackers.installed(name) for name in trackers.SHIPPED)


@pytest.mark.parametrize(("value", "expected"), [
    ("none", ()), (None, ()), ([], ()), (["none"], ()),
    ("mlflow", ("mlflow",)), (["tensorboard", "wandb", "tensorboard"], ("tensorboard", "wandb")),
])
def test_report_to_is_read_as_transformers_reads_it(value, expected):
    assert trackers.report_to(value) == expected


def test_all_means_every_installed_integration():
    assert set(trackers.SHIPPED) <= set(trackers.report_to("all"))
    assert all(trackers.installed(name) for name in trackers.report_to("all"))


@pytest.mark.parametrize(("value", "message"), [
    ("comet_ml", "comet_ml is not installed; pip install comet-ml into the tuner image"),
    (["mlflow", "tensorbord"], "unknown tracker 'tensorbord'"),
    (["all", "wandb"], '"all" cannot be combined with other trackers'),
])
def test_an_unknown_or_missing_tracker_is_refused_naming_the_key(value, message):
    with pytest.raises(UserError) as error:
        build_config("lora", {"TrainingArguments": {"report_to": value}})
    assert str(error.value).startswith(f"{trackers.WHERE}: {message}")


def test_the_default_reports_nowhere():
    assert build_config("lora").training_arguments.trackers == ()
