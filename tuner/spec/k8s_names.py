"""Kubernetes' name and label rules (apimachinery's validation.IsDNS1123Label/Subdomain and
IsQualifiedName/IsValidLabelValue), applied to the Workspace before anything is rendered, so the
API server never refuses an object tuner built from it."""

from __future__ import annotations

import re

from tuner.errors import quote

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
# tuner's objects are named `<workspace>-tuning` (Job, ConfigMap, `-tuning-nodes` Service,
# `-tuning-work` PVC) and an Indexed Job's pods are hosts `<job>-<index>`: a host name and the
# `job-name` label value it carries are DNS labels, so the workspace name keeps room for
# "-tuning" (7) and "-<index>" with up to 5 digits (6).
WORKSPACE_NAME_MAX = DNS1123_LABEL_MAX - len("-tuning") - 6


def dns1123_label(value: str, what: str, limit: int = DNS1123_LABEL_MAX) -> str:
    if not _LABEL.fullmatch(value) or len(value) > limit:
        raise ValueError(f"{what} {quote(value)} is not a valid name: at most {limit} lowercase letters, digits "
                         "and '-', starting and ending with a letter or digit")
    return value


def dns1123_subdomain(value: str, what: str) -> str:
    if not _SUBDOMAIN.fullmatch(value) or len(value) > DNS1123_SUBDOMAIN_MAX:
        raise ValueError(f"{what} {quote(value)} is not a valid Kubernetes name (the API server refuses a pod "
                         f"that uses it): at most {DNS1123_SUBDOMAIN_MAX} lowercase letters, digits, '-' and '.', "
                         "starting and ending with a letter or digit")
    return value


def label_key(key: str) -> str:
    """`[prefix/]name`: prefix a DNS subdomain, name at most 63 of letters, digits, '-', '_', '.'."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        dns1123_subdomain(prefix, f"label key prefix of {quote(key)}:")
    if not _QUALIFIED_NAME.fullmatch(name) or len(name) > DNS1123_LABEL_MAX:
        raise ValueError(f"label key {quote(key)} is not valid: [PREFIX/]NAME, NAME at most 63 letters, digits, "
                         "'-', '_' and '.', starting and ending with a letter or digit")
    return key


def label_value(value: str, key: str) -> str:
    if value and (not _QUALIFIED_NAME.fullmatch(value) or len(value) > DNS1123_LABEL_MAX):
        raise ValueError(f"label value {quote(value)} of {quote(key)} is not valid: at most 63 letters, digits, "
                         "'-', '_' and '.', starting and ending with a letter or digit (or empty)")
    return value
