"""tuner.train.precision: the dtype that really runs on the device the process landed on, and that
the fp16 the renderer wrote for a GPU without bf16 is what training reads."""

from __future__ import annotations

import pytest
import torch
import yaml

from tuner.kube.gpus import lookup
from tuner.kube.sku_precision import for_sku
from tuner.spec.training_config import build_config
from tuner.train.precision import choose_precision


def fake_cuda(monkeypatch, *, bf16: bool, name: str):
    """Pretend a CUDA GPU is present; bf16 only natively (emulation is what a V100 or T4 reports)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_runtime_on_a_v100_trains_in_fp16(monkeypatch):
    fake_cuda(monkeypatch, bf16=False, name="Tesla V100-PCIE-16GB")
    precision = choose_precision("bfloat16")
    assert (precision.dtype, precision.device, precision.mixed_fp16, precision.mixed_bf16) == (
        torch.float16, "cuda", True, False)
    assert precision.reason == "bfloat16 requested, but Tesla V100-PCIE-16GB has no bfloat16: training in float16"


def test_runtime_auto_on_a_t4_is_fp16(monkeypatch):
    fake_cuda(monkeypatch, bf16=False, name="Tesla T4")
    assert choose_precision("auto").dtype == torch.float16


def test_runtime_on_an_a100_keeps_bf16(monkeypatch):
    fake_cuda(monkeypatch, bf16=True, name="NVIDIA A100-SXM4-80GB")
    precision = choose_precision("bfloat16")
    assert precision.dtype == torch.bfloat16 and precision.mixed_bf16 and precision.reason == ""


@pytest.mark.parametrize("requested", ["float16", "float32"])
def test_runtime_keeps_an_explicit_non_bf16_dtype_on_a_v100(monkeypatch, requested):
    fake_cuda(monkeypatch, bf16=False, name="Tesla V100-PCIE-16GB")
    assert choose_precision(requested).name == requested


def test_runtime_on_cpu_is_still_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision = choose_precision("bfloat16")
    assert (precision.dtype, precision.device) == (torch.float32, "cpu")
    assert "no fast bfloat16" in precision.reason


def test_a_configured_compute_dtype_is_kept_on_a_gpu_that_runs_it(monkeypatch):
    from tuner.train.trainer import quantization_config

    fake_cuda(monkeypatch, bf16=True, name="NVIDIA A100-SXM4-80GB")
    config = build_config("qlora", {"QuantizationConfig": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}})
    assert quantization_config(config).bnb_4bit_compute_dtype == torch.float32  # not the model's bfloat16
    assert quantization_config(build_config("qlora")).bnb_4bit_compute_dtype == torch.bfloat16


def test_a_bf16_compute_dtype_becomes_fp16_on_a_v100_and_says_so(monkeypatch, capsys):
    from tuner.train.trainer import quantization_config

    fake_cuda(monkeypatch, bf16=False, name="Tesla V100-PCIE-16GB")
    assert quantization_config(build_config("qlora")).bnb_4bit_compute_dtype == torch.float16
    assert ("precision: QuantizationConfig.bnb_4bit_compute_dtype: bfloat16 requested, but Tesla V100-PCIE-16GB "
            "has no bfloat16: training in float16") in capsys.readouterr().out


def training_arguments(config, tmp_path):
    from tuner.train.trainer import _training_arguments

    return _training_arguments(config, choose_precision(config.model.torch_dtype), tmp_path,
                               has_eval=False, packed=False)


def test_a_users_mixed_precision_flag_is_honoured_not_overwritten(tmp_path, capsys):
    config = build_config("lora", {"ModelConfig": {"torch_dtype": "float32"}, "TrainingArguments": {"bf16": True}})
    args = training_arguments(config, tmp_path)
    assert (args.bf16, args.fp16) == (True, False)
    assert "bf16/fp16 on a CPU: half-precision autocast is applied as asked" in capsys.readouterr().out
    plain = training_arguments(build_config("lora"), tmp_path)
    assert (plain.bf16, plain.fp16) == (False, False)  # without a flag, the device's choice (float32 on a CPU)


def test_the_fp16_render_writes_for_a_v100_is_read_at_run_time(tmp_path):
    from tuner.spec.training_config import load_config_file

    rendered, _ = for_sku(build_config("lora"), lookup("Standard_NC6s_v3"))
    path = tmp_path / "training_config.yaml"  # what the ConfigMap holds and `tuner run --config` reads
    path.write_text(yaml.safe_dump({"training_config": rendered.as_sections()}))
    args = training_arguments(build_config("lora", load_config_file(path)), tmp_path)
    assert args.fp16 is True and args.bf16 is False
