"""`tuner submit`, `status` and `cancel` from the command line, against kmock."""

from __future__ import annotations

import asyncio

import pytest

from job_support import seed_workspace
from kube_support import NS, write_kubeconfig


@pytest.mark.asyncio
async def test_cli_submit_renders_and_creates_then_status_reports(cluster, tmp_path, capsys):
    from tuner import cli

    config = write_kubeconfig(tmp_path, str(cluster.url).rstrip("/"))
    argv = ["submit", str(seed_workspace(tmp_path)), "--kubeconfig", str(config), "-n", NS]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "created: Job/phi3-qlora-tuning" in out and "created: PersistentVolumeClaim/phi3-qlora-tuning-work" in out
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, "phi3-qlora-tuning-work"]
    assert pvc["metadata"]["ownerReferences"][0]["name"] == "phi3-qlora-tuning"
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert "unchanged: Job/phi3-qlora-tuning" in capsys.readouterr().out
    status = ["status", "phi3-qlora", "--kubeconfig", str(config), "-n", NS]
    assert await asyncio.to_thread(cli.main, status) == 0
    assert f"{NS}/phi3-qlora-tuning: Pending" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_cli_cancel_of_a_missing_job_is_one_error_line(cluster, tmp_path, capsys):
    from tuner import cli

    config = write_kubeconfig(tmp_path, str(cluster.url).rstrip("/"))
    code = await asyncio.to_thread(cli.main, ["cancel", "nope", "--kubeconfig", str(config), "-n", NS])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nope-tuning" in err
