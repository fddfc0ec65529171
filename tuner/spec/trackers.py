"""`TrainingArguments.report_to`: the experiment trackers a run reports to, checked before any work.

The reporting itself is transformers' own integrations (TensorBoardCallback, MLflowCallback,
WandbCallback...): tuner names them, checks them, and gives them the job's names and provenance
(tuner.train.trackers). This module runs on the submit side too, so it imports neither
transformers nor any tracker: a tracker counts as installed when its module can be found
(`importlib.util.find_spec`, which loads nothing). `INTEGRATIONS` mirrors the pinned transformers'
`INTEGRATION_TO_CALLBACK` (a test compares them).
"""

from __future__ import annotations

import importlib.util

from tuner.errors import UserError

WHERE = "training_config.TrainingArguments.report_to"
# transformers' integration name -> (the module it imports, what to install for it)
INTEGRATIONS: dict[str, tuple[str, str]] = {
    "azure_ml": ("azureml.core", "azureml-core"),
    "clearml": ("clearml", "clearml"),
    "codecarbon": ("codecarbon", "codecarbon"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "dagshub": ("dagshub", "dagshub"),
    "dvclive": ("dvclive", "dvclive"),
    "flyte": ("flytekit", "flytekit"),
    "kubeflow": ("kubeflow.trainer", "kubeflow"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "neptune": ("neptune", "neptune"),
    "swanlab": ("swanlab", "swanlab"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}
SHIPPED = ("tensorboard", "mlflow", "wandb")  # installed with tuner (pyproject.toml), so in the Job image


def installed(name: str) -> bool:
    module = INTEGRATIONS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def report_to(value: str | list[str] | None) -> tuple[str, ...]:
    """The integrations a `report_to` value names, as transformers reads it ("none" and [] mean none,
    "all" every installed one); an unknown or uninstalled one is a UserError naming the fix."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], []):
        return ()
    if names == ["all"]:
        return tuple(name for name in INTEGRATIONS if installed(name))
    chosen: list[str] = []
    for name in names:
        if name in ("none", "all"):
            raise UserError(f'"{name}" cannot be combined with other trackers', where=WHERE,
                            fix=f'give "{name}" alone, or a list of trackers')
        if name not in INTEGRATIONS:
            raise UserError(f"unknown tracker {name!r}", where=WHERE,
                            fix=f"use one of transformers' integrations: {', '.join(sorted(INTEGRATIONS))}")
        if not installed(name):
            raise UserError(f"{name} is not installed", where=WHERE,
                            fix=f"pip install {INTEGRATIONS[name][1]} into the tuner image (tuner ships "
                                f"{', '.join(SHIPPED)})")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)
