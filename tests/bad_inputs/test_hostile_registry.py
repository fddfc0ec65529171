"""A hostile registry: `tuner pull` against a server on loopback that answers with endless,
oversized and malformed manifests. Each ends in one short `error:` line naming the registry and the
field, exit 2, in bounded memory (the child runs under an address-space limit) and disk."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from conftest import serving_with

MEMORY_LIMIT = 2 << 30
GOOD_LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 10,
              "digest": "sha256:" + "a" * 64}
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2, "digest": "sha256:" + "b" * 64}
MANIFESTS: dict[str, object] = {
    "empty-list": [],
    "a-string": "manifest",
    "digest-seven": {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                     "config": CONFIG, "layers": [{**GOOD_LAYER, "digest": 7}]},
    "size-words": {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "config": CONFIG, "layers": [{**GOOD_LAYER, "size": "big"}]},
    "config-missing": {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "layers": [GOOD_LAYER]},
    "index-not-a-list": {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": {"digest": "sha256:" + "c" * 64}},
    "index-entry-digest": {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                          "size": 1, "digest": "../../etc/passwd"}]},
}


class HostileRegistry(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.split("/")[3] if self.path.startswith("/v2/") and self.path.count("/") >= 4 else ""
        try:
            if name == "endless":  # a manifest that never ends, without a Content-Length
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.end_headers()
                self.wfile.write(b'{"layers": [')
                while True:
                    self.wfile.write(b'{"digest": "sha256:' + b"0" * 64 + b'"},' * 1000)
            if name == "huge":  # one that says up front it is 8 GB
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Content-Length", str(8 << 30))
                self.end_headers()
                self.wfile.write(b"{" * 1000)
                return
            if name in MANIFESTS:
                body = json.dumps(MANIFESTS[name]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200 if self.path == "/v2/" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass


@pytest.fixture(scope="module")
def registry() -> Iterator[str]:
    with serving_with(HostileRegistry) as host:
        yield host


def pull(host: str, name: str, dest: Path) -> subprocess.CompletedProcess:
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([sys.executable, "-m", "tuner.cli", "pull", f"{host}/adapters/{name}:v1", str(dest),
                           "--insecure-registry", host], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_memory)


@pytest.mark.parametrize("name, expected", [
    ("endless", "is over the 4,194,304 byte limit (read no further)"),
    ("huge", "is 8,589,934,592 bytes, over the 4,194,304 byte limit"),
    ("empty-list", "is list [], not a JSON object"),
    ("a-string", "is str 'manifest', not a JSON object"),
    ("digest-seven", "the manifest's layers[0].digest is 7, not a sha256:<64 hex digits> digest"),
    ("size-words", "the manifest's layers[0].size is 'big', not a byte count"),
    ("config-missing", "the manifest's config is None, not a descriptor object"),
    ("index-not-a-list", "the index's manifests is {'digest':"),
    ("index-entry-digest", "the index's manifests[0].digest is '../../etc/passwd', not a sha256"),
])
def test_a_hostile_manifest_is_one_line_naming_the_registry_and_the_field(registry, tmp_path, name, expected):
    done = pull(registry, name, tmp_path / "adapter")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert expected in lines[0] and registry in lines[0] and len(lines[0]) < 400, lines[0]
    assert not (tmp_path / "adapter").exists() and list(tmp_path.iterdir()) == []  # nothing left on disk
