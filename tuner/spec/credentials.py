"""Registry credentials from a docker config file, found the way docker finds it.

In the Job, the Workspace's `imagePushSecret` (a `kubernetes.io/dockerconfigjson` Secret) is
mounted as `$DOCKER_CONFIG/config.json`; locally the same lookup finds the user's docker login.
Error messages name the file and the registry, never a credential.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tuner.errors import UserError

_DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """What a docker config holds for one registry; `source` is the file it came from."""

    registry: str
    source: Path
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def secrets(self) -> list[str]:
        """Every secret value, for scrubbing them out of messages."""
        return [s for s in (self.password, self.identity_token) if s]


def docker_config_file(explicit: Path | None = None) -> Path | None:
    """The docker config to read: `explicit` (a file, or a directory holding config.json), else
    `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; None when there is none."""
    if explicit is not None:
        path = explicit / "config.json" if explicit.is_dir() else explicit
        if not path.is_file():
            raise UserError(f"registry config {explicit} does not exist",
                            fix="pass a docker config.json (or the directory holding it), e.g. the mounted "
                                "imagePushSecret")
        return path
    if os.environ.get("DOCKER_CONFIG"):
        path = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    else:
        path = Path.home() / ".docker" / "config.json"
    return path if path.is_file() else None


def registry_key(name: str) -> str:
    """Normalise an `auths` key or a reference's registry to HOST[:PORT], as docker does."""
    if "://" in name:
        name = urlsplit(name).netloc
    host = name.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB_ALIASES else host


def load_credentials(registry: str, config_file: Path | None) -> Credentials | None:
    """Credentials for `registry` (HOST[:PORT]) from config_file, or None when it has none."""
    if config_file is None:
        return None
    try:
        document = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"registry config {config_file} is not readable JSON ({type(e).__name__})",
                        fix="it must be a docker config.json / .dockerconfigjson with an \"auths\" object") from None
    if not isinstance(document, dict):
        raise UserError(f"registry config {config_file} is not a JSON object",
                        fix="it must be a docker config.json / .dockerconfigjson with an \"auths\" object")
    # `.dockerconfigjson` and config.json nest entries under "auths"; the legacy `.dockercfg` does not.
    auths = document.get("auths", document if "auths" not in document and "credsStore" not in document else {})
    if not isinstance(auths, dict):
        raise UserError(f"registry config {config_file}: \"auths\" is not an object")
    wanted = registry_key(registry)
    entry = next((value for key, value in auths.items() if registry_key(key) == wanted), None)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise UserError(f"registry config {config_file}: the entry for {wanted} is not an object")
    return _parse_entry(entry, wanted, config_file)


def _parse_entry(entry: dict, registry: str, source: Path) -> Credentials:
    where = f"registry config {source}, entry {registry}"
    if entry.get("identitytoken"):
        return Credentials(registry, source, username=entry.get("username") or "<token>",
                           identity_token=str(entry["identitytoken"]))
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise UserError("\"auth\" is not base64", where=where,
                            fix="it must be base64 of USER:PASSWORD (kubectl create secret docker-registry does this)"
                            ) from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise UserError("\"auth\" does not decode to USER:PASSWORD", where=where,
                            fix="it must be base64 of USER:PASSWORD")
        return Credentials(registry, source, username=username, password=password)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(registry, source, username=str(entry["username"]), password=str(entry["password"]))
    raise UserError("has no \"auth\", \"username\"/\"password\" or \"identitytoken\"", where=where,
                    fix="recreate the secret with kubectl create secret docker-registry")
