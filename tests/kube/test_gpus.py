"""GPU SKUs: GPUs per node, per-GPU memory and bf16 support across clouds; unknown types need flags."""

from __future__ import annotations

import pytest

from tuner.errors import UserError
from tuner.kube.gpus import GpuSku, known_instance_types, lookup, smallest_with


@pytest.mark.parametrize(("name", "count", "model", "memory"), [
    ("Standard_NC6s_v3", 1, "V100", 15.8),
    ("Standard_NC24s_v3", 4, "V100", 15.8),
    ("Standard_NC24ads_A100_v4", 1, "A100-80GB", 80.0),
    ("Standard_ND96asr_v4", 8, "A100-40GB", 39.6),
    ("Standard_NC40ads_H100_v5", 1, "H100-NVL", 93.6),
    ("Standard_NC64as_T4_v3", 4, "T4", 15.0),
    ("g4dn.12xlarge", 4, "T4", 15.0),
    ("g5.48xlarge", 8, "A10G", 22.5),
    ("p4de.24xlarge", 8, "A100-80GB", 80.0),
    ("p5.48xlarge", 8, "H100-80GB", 79.6),
    ("g6e.xlarge", 1, "L40S", 45.0),
    ("a2-highgpu-4g", 4, "A100-40GB", 39.6),
    ("a2-ultragpu-8g", 8, "A100-80GB", 80.0),
    ("a3-highgpu-8g", 8, "H100-80GB", 79.6),
    ("g2-standard-16", 1, "L4", 22.5),
])
def test_known_skus_across_clouds(name, count, model, memory):
    assert lookup(name) == GpuSku(name, count, model, memory, bf16=model not in ("V100", "T4"))


@pytest.mark.parametrize("name", ["Standard_NC6s_v3", "g4dn.xlarge", "p3.2xlarge", "Standard_NC16as_T4_v3"])
def test_v100_and_t4_have_no_bf16(name):
    assert lookup(name).bf16 is False


def test_names_are_case_insensitive_and_come_back_canonical():
    assert lookup("STANDARD_nc24ADS_a100_V4").name == "Standard_NC24ads_A100_v4"
    assert lookup("  G5.XLARGE ").name == "g5.xlarge"


def test_unknown_sku_names_the_field_the_flags_and_known_types():
    with pytest.raises(UserError) as caught:
        lookup("Custom_GPU_Box")
    message = str(caught.value)
    assert message.startswith("resource.instanceType: tuner does not know instance type 'Custom_GPU_Box'")
    assert "--gpus N" in message and "--gpu-memory GIB" in message and "Standard_NC24ads_A100_v4" in message


def test_a_near_miss_suggests_the_known_spelling():
    with pytest.raises(UserError, match="did you mean 'Standard_NC6s_v3'"):
        lookup("Standard_NC6s_v2")


def test_no_instance_type_is_treated_as_unknown():
    with pytest.raises(UserError, match="resource.instanceType: no instance type is set"):
        lookup(None)


def test_unknown_sku_with_only_one_flag_asks_for_the_other():
    with pytest.raises(UserError, match="--gpu-memory GIB") as caught:
        lookup("Custom_GPU_Box", gpu_count=2)
    assert "--gpus N" not in str(caught.value)


def test_unknown_sku_with_both_flags_is_accepted():
    assert lookup("Custom_GPU_Box", gpu_count=2, gpu_memory_gib=48) == GpuSku(
        "Custom_GPU_Box", 2, "unknown", 48.0, bf16=True)


def test_explicit_values_override_the_table():
    sku = lookup("Standard_NC24s_v3", gpu_count=2, gpu_memory_gib=32)
    assert (sku.name, sku.gpu_count, sku.gpu_model, sku.gpu_memory_gib, sku.bf16) == (
        "Standard_NC24s_v3", 2, "V100", 32.0, False)


@pytest.mark.parametrize(("kwargs", "where"), [({"gpu_count": 0}, "--gpus"), ({"gpu_memory_gib": -1}, "--gpu-memory")])
def test_nonsense_overrides_are_refused(kwargs, where):
    with pytest.raises(UserError, match=f"^{where}:"):
        lookup("g5.xlarge", **kwargs)


def test_every_table_entry_resolves():
    assert all(lookup(name).gpu_count >= 1 for name in known_instance_types())


def test_smallest_with_picks_the_smallest_gpu_that_has_the_memory():
    assert smallest_with(40).gpu_model == "L40S"
    assert smallest_with(90).name == "Standard_NC40ads_H100_v5"
    assert smallest_with(1000) is None
