"""Inputs reach the work directory: URLs downloaded with their sha256, volumes listed."""

from __future__ import annotations

import hashlib
import socket

import pytest

from tuner.data.fetch import fetch_inputs
from tuner.errors import UserError
from tuner.spec.workspace import DataSource


def test_every_url_is_downloaded_with_its_sha256(http_server, tmp_path):
    root, base = http_server
    (root / "a.jsonl").write_bytes(b'{"prompt": "p", "completion": "c"}\n')
    (root / "b.jsonl").write_bytes(b'{"prompt": "q", "completion": "d"}\n')
    source = DataSource(urls=[f"{base}/a.jsonl", f"{base}/b.jsonl?token=secret"])
    files = fetch_inputs(source, tmp_path / "inputs", base_dir=tmp_path, allow_private_urls=True)
    assert [f.path.name for f in files] == ["000-a.jsonl", "001-b.jsonl"]
    assert files[1].sha256 == hashlib.sha256(b'{"prompt": "q", "completion": "d"}\n').hexdigest()
    assert "secret" not in files[1].source


def test_a_url_without_a_data_suffix_is_named_by_its_content(http_server, tmp_path, shared_dir):
    root, base = http_server
    (root / "download").write_bytes((shared_dir / "data" / "prompt-completion" / "chatterbot-prompt-completion.parquet").read_bytes())
    files = fetch_inputs(DataSource(urls=[f"{base}/download?x=1"]), tmp_path, base_dir=tmp_path,
                         allow_private_urls=True)
    assert files[0].path.name == "000-download.parquet"


def test_404_fails_with_the_url_and_status(http_server, tmp_path):
    _, base = http_server
    with pytest.raises(UserError, match=r"tuning.input.urls\[0\].*missing.parquet answered HTTP 404"):
        fetch_inputs(DataSource(urls=[f"{base}/missing.parquet"]), tmp_path, base_dir=tmp_path,
                     allow_private_urls=True)


def test_a_name_resolving_to_a_private_address_is_refused(tmp_path, monkeypatch):
    # DNS is the one thing faked here: the check must refuse before any connection is made.
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: [(2, 1, 6, "", ("10.0.0.7", 0))])
    url = "https://data.example.com/train.parquet"
    with pytest.raises(UserError, match="data.example.com resolves to the non-public address 10.0.0.7"):
        fetch_inputs(DataSource(urls=[url]), tmp_path, base_dir=tmp_path)


def test_host_path_volume_lists_data_files_recursively(tmp_path):
    (tmp_path / "data" / "nested").mkdir(parents=True)
    (tmp_path / "data" / "a.parquet").write_bytes(b"x")
    (tmp_path / "data" / "nested" / "b.jsonl").write_bytes(b"y")
    (tmp_path / "data" / "notes.txt").write_bytes(b"z")
    source = DataSource(volumeSource={"hostPath": {"path": "data"}})
    files = fetch_inputs(source, tmp_path / "inputs", base_dir=tmp_path)
    assert [f.path.relative_to(tmp_path / "data").as_posix() for f in files] == ["a.parquet", "nested/b.jsonl"]


def test_missing_host_path_is_named(tmp_path):
    source = DataSource(volumeSource={"hostPath": {"path": "nowhere"}})
    with pytest.raises(UserError, match=r"volumeSource.hostPath.path.*nowhere: dataset path not found"):
        fetch_inputs(source, tmp_path, base_dir=tmp_path)
