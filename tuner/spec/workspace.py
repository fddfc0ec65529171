"""The Workspace's tuning spec, exactly as Kaito users write it, validated with field paths."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from tuner.errors import UserError, UserErrors, quote
from tuner.spec import k8s_names
from tuner.spec.image_ref import InvalidReference, parse_docker_ref
from tuner.spec.yamlio import field_path, load_yaml_file

# Hostnames of cloud instance-metadata services: reading them from a Job leaks node credentials.
METADATA_HOSTS = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata.azure.com", "metadata",
    "instance-data", "instance-data.ec2.internal", "metadata.tencentyun.com",
})
METADATA_IPS = frozenset({"169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"})
MAX_NODES = 256  # resource.count: an Indexed Job of this many training nodes is already far past any use seen


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metadata(BaseModel):
    """Kubernetes object metadata; only `name` and `namespace` matter to tuner, the rest is kept as given."""

    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > k8s_names.WORKSPACE_NAME_MAX and len(value) <= k8s_names.DNS1123_LABEL_MAX:
            raise ValueError(f"{value!r} is {len(value)} characters: Kaito allows 63, but tuner's Job "
                             f"{value}-tuning and its pods' host names ({value}-tuning-<index>) would pass "
                             f"Kubernetes' 63; use at most {k8s_names.WORKSPACE_NAME_MAX}")
        return k8s_names.dns1123_label(value, "metadata.name", k8s_names.WORKSPACE_NAME_MAX)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return value if value is None else k8s_names.dns1123_label(value, "metadata.namespace")


class NodeSelectorRequirement(_Strict):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] = Field(default_factory=list)

    _check_key = field_validator("key")(lambda v: k8s_names.label_key(v))

    @model_validator(mode="after")
    def _values_fit_operator(self) -> "NodeSelectorRequirement":
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Gt", "Lt") and (len(self.values) != 1 or not self.values[0].lstrip("-").isdigit()):
            raise ValueError(f"operator {self.operator} needs exactly one integer value")
        for value in self.values:
            k8s_names.label_value(value, self.key)
        return self


class LabelSelector(_Strict):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list, alias="matchExpressions")

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            k8s_names.label_value(value, k8s_names.label_key(key))
        return labels


class Resource(_Strict):
    instance_type: str | None = Field(default=None, alias="instanceType")
    count: StrictInt = Field(default=1, ge=1, le=MAX_NODES)
    label_selector: LabelSelector | None = Field(default=None, alias="labelSelector")
    preferred_nodes: list[str] = Field(default_factory=list, alias="preferredNodes")

    _check_nodes = field_validator("preferred_nodes")(
        lambda nodes: [k8s_names.dns1123_subdomain(n, "preferredNodes entry") for n in nodes])


class PresetRef(_Strict):
    name: str = Field(min_length=1)
    preset_options: dict[str, Any] | None = Field(default=None, alias="presetOptions")

    @property
    def model_access_secret(self) -> str | None:
        """Kaito's presetOptions.modelAccessSecret: a Secret whose key HF_TOKEN opens gated models."""
        return (self.preset_options or {}).get("modelAccessSecret")

    @field_validator("preset_options")
    @classmethod
    def _access_secret_is_a_name(cls, options: dict[str, Any] | None) -> dict[str, Any] | None:
        secret = (options or {}).get("modelAccessSecret")
        if secret is not None:
            if not isinstance(secret, str):
                raise ValueError(f"modelAccessSecret must be a Secret name, not {quote(secret)}")
            k8s_names.dns1123_subdomain(secret, "Secret name")
        return options


def _parsable(image: str, direction: str) -> str:
    """Kaito's webhook check of an image reference (ParseDockerRef), with its reason."""
    try:
        parse_docker_ref(image)
    except InvalidReference as exc:
        raise ValueError(f"unable to parse {direction} image reference {quote(image)}: {exc} (write it as "
                         "[REGISTRY/]REPOSITORY[:TAG][@DIGEST] with a lowercase repository, e.g. "
                         "myregistry.azurecr.io/datasets/chat:v1)") from None
    return image


# Kubernetes' volume sources (core/v1 Volume), with the fields each one cannot do without.
_VOLUME_TYPES: dict[str, tuple[str, ...]] = {
    "hostPath": ("path",), "persistentVolumeClaim": ("claimName",), "nfs": ("server", "path"),
    "configMap": ("name",), "secret": ("secretName",), "emptyDir": (), "csi": ("driver",),
    "azureFile": ("secretName", "shareName"), "azureDisk": ("diskName", "diskURI"), "ephemeral": (),
    "awsElasticBlockStore": ("volumeID",), "gcePersistentDisk": ("pdName",), "cephfs": ("monitors",),
    "cinder": ("volumeID",), "fc": (), "flexVolume": ("driver",), "glusterfs": ("endpoints", "path"),
    "iscsi": ("targetPortal", "iqn", "lun"), "projected": (), "rbd": ("monitors", "image"), "image": (),
    "downwardAPI": (), "portworxVolume": ("volumeID",), "quobyte": ("registry", "volume"),
    "scaleIO": ("gateway", "system", "secretRef"), "storageos": (), "vsphereVolume": ("volumePath",),
    "photonPersistentDisk": ("pdID",), "flocker": (), "gitRepo": ("repository",),
}


def _one_volume(value: dict[str, Any]) -> dict[str, Any]:
    """One Kubernetes volume source, shaped as the API server takes it (it refuses the pod otherwise)."""
    if len(value) != 1:
        raise ValueError("a volumeSource holds exactly one volume type (e.g. hostPath, persistentVolumeClaim)")
    kind, spec = next(iter(value.items()))
    if kind not in _VOLUME_TYPES:
        raise ValueError(f"{quote(kind)} is not a Kubernetes volume type (the API server refuses the pod); use one "
                         "of hostPath, persistentVolumeClaim, nfs, csi, azureFile, ...")
    if not isinstance(spec, dict):
        fields = f" ({', '.join(_VOLUME_TYPES[kind])})" if _VOLUME_TYPES[kind] else ""
        raise ValueError(f"{kind} must be a mapping of its fields{fields}, not {quote(spec)}")
    missing = [f for f in _VOLUME_TYPES[kind] if spec.get(f) in (None, "")]
    if missing:
        raise ValueError(f"{kind} needs {', '.join(missing)} (the API server refuses the pod without it)")
    if kind == "persistentVolumeClaim":
        k8s_names.dns1123_subdomain(str(spec["claimName"]), "claimName")
    return value


class DataSource(_Strict):
    """`tuning.input`: exactly one of urls, image, volumeSource."""

    name: str | None = None
    urls: list[str] | None = None
    image: str | None = None
    volume_source: dict[str, Any] | None = Field(default=None, alias="volumeSource")
    image_pull_secrets: list[str] = Field(default_factory=list, alias="imagePullSecrets")

    _check_image = field_validator("image")(lambda v: v if not v else _parsable(v, "input"))
    _check_secrets = field_validator("image_pull_secrets")(
        lambda names: [k8s_names.dns1123_subdomain(n, "Secret name") for n in names])
    _check_volume = field_validator("volume_source")(lambda v: v if v is None else _one_volume(v))

    @model_validator(mode="after")
    def _exactly_one(self) -> "DataSource":
        given = [k for k, v in (("urls", self.urls), ("image", self.image), ("volumeSource", self.volume_source)) if v]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of urls, image, volumeSource (found {', '.join(given) or 'none'})")
        return self


class DataDestination(_Strict):
    """`tuning.output`: an image with its push secret, or a volumeSource."""

    image: str | None = None
    image_push_secret: str | None = Field(default=None, alias="imagePushSecret")
    volume_source: dict[str, Any] | None = Field(default=None, alias="volumeSource")

    _check_image = field_validator("image")(lambda v: v if not v else _parsable(v, "output"))
    _check_secret = field_validator("image_push_secret")(
        lambda name: name if name is None else k8s_names.dns1123_subdomain(name, "Secret name"))
    _check_volume = field_validator("volume_source")(lambda v: v if v is None else _one_volume(v))

    @model_validator(mode="after")
    def _exactly_one(self) -> "DataDestination":
        if bool(self.image) == bool(self.volume_source):
            raise ValueError("give exactly one of image (with imagePushSecret) or volumeSource")
        if self.image and not self.image_push_secret:
            raise ValueError("output.image needs imagePushSecret, the Secret tuner pushes the adapter with")
        return self


class Tuning(_Strict):
    preset: PresetRef
    method: Literal["lora", "qlora"]
    config: str | None = None
    input: DataSource
    output: DataDestination

    @field_validator("method", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Workspace(_Strict):
    """A Kaito Workspace; tuner acts on its `tuning` section."""

    api_version: Literal["kaito.sh/v1alpha1", "kaito.sh/v1beta1"] = Field(alias="apiVersion")
    kind: Literal["Workspace"]
    metadata: Metadata
    resource: Resource = Field(default_factory=Resource)
    tuning: Tuning | None = None
    inference: dict[str, Any] | None = None
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _tuning_xor_inference(self) -> "Workspace":
        if self.tuning and self.inference:
            raise ValueError("tuning and inference are exclusive: a Workspace holds one of them")
        if not self.tuning:
            raise ValueError("this Workspace has no tuning section; tuner runs tuning Workspaces")
        return self


def check_url(url: str, allow_private: bool, where: str) -> None:
    """Refuse URLs that are not http(s), hold control characters, or point inside the cluster or at
    metadata services."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise UserError(f"{quote(url)} holds a control character (a NUL byte, a newline)", where=where,
                        fix="percent-encode it (%00, %0A) or remove it")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{quote(url)} is not an http(s) URL", where=where, fix="use an http:// or https:// URL")
    if allow_private:
        return
    host = parts.hostname.lower().rstrip(".")
    fix = "use a public URL, or pass --allow-private-urls for local use"
    if host == "localhost" or host.endswith(".localhost") or host in METADATA_HOSTS:
        raise UserError(f"{quote(url)} points at {host}, which is not allowed", where=where, fix=fix)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if str(address) in METADATA_IPS or not address.is_global:
        raise UserError(f"{quote(url)} points at a private, loopback or link-local address", where=where, fix=fix)


def local_host_path(volume: dict[str, Any], base_dir: Path, where: str) -> Path:
    """The folder a `volumeSource` names for a local run: only hostPath, relative to `base_dir`."""
    kind, spec = next(iter(volume.items()))
    if kind != "hostPath" or not isinstance(spec, dict) or "path" not in spec:
        raise UserError(f"a local run uses only hostPath volumes, not {kind}", where=where,
                        fix="use hostPath: {path: DIR} (relative paths are relative to the Workspace file)")
    return (base_dir / spec["path"]).resolve()


def load_workspace(path: Path, *, allow_private_urls: bool = False) -> Workspace:
    """Read and validate a Workspace YAML file; every problem is a UserError naming the field."""
    document = load_yaml_file(path, "Workspace")
    if not isinstance(document, dict):
        raise UserError(f"Workspace file {path} must hold a YAML mapping (apiVersion, kind, ...)",
                        fix="start from ../shared/seed-examples or the README example")
    try:
        workspace = Workspace.model_validate(document)
    except ValidationError as exc:  # every problem at once, one line each
        errors = [UserError(_describe(error), where=f"{path}") for error in exc.errors()]
        raise errors[0] if len(errors) == 1 else UserErrors(errors) from None
    for index, url in enumerate(workspace.tuning.input.urls or []):
        check_url(url, allow_private_urls, f"tuning.input.urls[{index}]")
    return workspace


def image_notes(workspace: Workspace, sides: tuple[str, ...] = ("input", "output")) -> list[str]:
    """One line per image reference of `sides` that Kaito's normalisation changes (`data:v1` is
    Docker Hub's `docker.io/library/data:v1`), so the user sees which registry tuner will talk to."""
    tuning = workspace.tuning
    images = {"input": tuning.input.image, "output": tuning.output.image}
    return [note for side in sides if images[side]
            and (note := normalisation_note(f"tuning.{side}.image", images[side])) is not None]


def normalisation_note(where: str, image: str) -> str | None:
    """The note for one reference (already validated), or None when Kaito reads it as written."""
    normalised = str(parse_docker_ref(image))
    return None if normalised == image else f"{where}: {image} normalised to {normalised}, as Kaito reads it"


def _describe(error: dict[str, Any]) -> str:
    """One line for a pydantic error: field path, what is wrong, how to fix it."""
    loc = field_path(tuple(error["loc"]))
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown field; remove it or check its spelling"
    if kind == "missing":
        return f"{loc}: required field is missing; add it (see the Kaito Workspace examples)"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{loc}: {quote(error['input'])} is not allowed; use {expected}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":  # one of tuner's own rules: the message states it
        fix = "change the Workspace to follow that rule"
    else:  # a wrong type or range: pydantic's message says what is expected
        fix = f"change the value ({quote(error.get('input'))} was given)"
    return f"{loc}: {message}; {fix}" if loc else f"{message}; {fix}"
