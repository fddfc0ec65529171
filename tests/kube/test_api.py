"""tuner.kube.api: every API failure as one error line, and loading a client from a kubeconfig."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes import client

from kube_support import JOB, NS, closed_port, manifests, one_line, write_kubeconfig
from tuner.errors import UserError
from tuner.kube import api as kube_api
from tuner.kube import submit, watch


@pytest.mark.asyncio
@pytest.mark.parametrize("call", ["status", "logs", "cancel"])
async def test_a_missing_job_is_one_line(cluster, api, call):
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread({"status": watch.status, "logs": watch.logs, "cancel": submit.cancel}[call], api, "nope", NS)
    assert one_line(exc).startswith(f"no tuning job nope in namespace {NS}; check the name and --namespace")


def forbidden(verb: str, resource: str, group: str = "") -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": f'{resource}{"." + group if group else ""} is forbidden: User "alice" cannot {verb} '
                       f'resource "{resource}" in API group "{group}" in the namespace "{NS}"'}


@pytest.mark.asyncio
async def test_forbidden_create_names_verb_resource_namespace_and_the_rbac_fix(cluster, api):
    cluster["post", cluster.resource("v1/configmaps")] << 403 << forbidden("create", "configmaps")
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    text = one_line(exc)
    assert text.startswith(f"not allowed to create configmaps in namespace {NS}: configmaps is forbidden: "
                           'User "alice" cannot create resource "configmaps"')
    assert f"kubectl auth can-i create configmaps -n {NS}" in text


@pytest.mark.asyncio
async def test_forbidden_read_of_jobs(cluster, api):
    cluster["get", cluster.resource("batch/v1/jobs")] << 403 << forbidden("get", "jobs", "batch")
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(watch.status, api, JOB, NS)
    text = one_line(exc)
    assert text.startswith(f"not allowed to get jobs.batch in namespace {NS}: ")
    assert f"granting 'get' on 'jobs.batch' in namespace {NS}" in text


@pytest.mark.asyncio
async def test_a_conflict_is_one_line(cluster, api):
    # Another client creates the Job between tuner's read and its create.
    cluster["post", cluster.resource("batch/v1/jobs")] << 409 << {
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "AlreadyExists", "code": 409,
        "message": f'jobs.batch "{JOB}" already exists'}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert one_line(exc) == (f'conflict on jobs.batch {JOB} in namespace {NS}: jobs.batch "{JOB}" already exists; '
                             "something else changed it at the same moment; run the command again")


@pytest.mark.asyncio
async def test_an_invalid_manifest_is_one_line(cluster, api):
    cluster["post", cluster.resource("batch/v1/jobs")] << 422 << {
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
        "message": f'Job.batch "{JOB}" is invalid: spec.template.spec.containers[0].image: Required value'}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert one_line(exc).startswith(f"the API server refused to create jobs.batch {JOB} in namespace {NS}: "
                                    f'Job.batch "{JOB}" is invalid')





def test_an_unreachable_server_names_the_url_and_the_kubeconfig(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    config = write_kubeconfig(tmp_path, url)
    api = kube_api.load_client(config, None)
    with pytest.raises(UserError) as exc:
        watch.status(api, JOB, NS)
    text = one_line(exc)
    assert text.startswith(f"cannot reach the Kubernetes API server at {url}: ")
    assert "Connection refused" in text and f"kubeconfig {config}" in text


@pytest.mark.asyncio
async def test_a_tls_failure_names_the_url(kmock):
    url = f"https://127.0.0.1:{kmock.url.port}"  # kmock speaks plain HTTP
    api = client.ApiClient(client.Configuration(host=url))
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.cancel, api, JOB, NS)
    text = one_line(exc)
    assert text.startswith(f"TLS with the Kubernetes API server at {url} failed: ") and "SSL" in text
    assert "check the server URL and certificate-authority data" in text


def test_an_unknown_host_names_the_url():
    url = "https://tuner-test.invalid:6443"  # .invalid never resolves (RFC 6761)
    api = client.ApiClient(client.Configuration(host=url))
    with pytest.raises(UserError) as exc:
        watch.status(api, JOB, NS)
    assert one_line(exc).startswith(f"cannot reach the Kubernetes API server at {url}: cannot resolve the host name")


@pytest.mark.asyncio
async def test_load_client_from_a_kubeconfig_and_context(cluster, tmp_path):
    api = kube_api.load_client(write_kubeconfig(tmp_path, str(cluster.url).rstrip("/")), "other")
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert {r.headers.get("Authorization") for r in cluster} == {"Bearer t0ken"}


@pytest.mark.asyncio
async def test_load_client_reads_the_kubeconfig_environment_variable(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, str(cluster.url).rstrip("/"))))
    api = kube_api.load_client(None, None)
    result = await asyncio.to_thread(submit.submit, api, manifests(pvc=False), NS)
    assert result.created


def test_load_client_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError) as exc:
        kube_api.load_client(tmp_path / "missing", None)
    assert one_line(exc) == (f"kubeconfig {tmp_path / 'missing'} does not exist; "
                             "pass --kubeconfig PATH of a kubeconfig file")

    config = write_kubeconfig(tmp_path, "https://k8s.example:6443")
    with pytest.raises(UserError) as exc:
        kube_api.load_client(config, "nope")
    assert one_line(exc).startswith(f"cannot use context 'nope' of kubeconfig {config}: ")

    broken = tmp_path / "broken"
    broken.write_text("clusters: [unclosed\n")
    with pytest.raises(UserError) as exc:
        kube_api.load_client(broken, None)
    assert one_line(exc).startswith(f"cannot use kubeconfig {broken}: ")

    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(UserError) as exc:
        kube_api.load_client(empty, None)
    assert one_line(exc).startswith(f"cannot use kubeconfig {empty}: ")

    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as exc:
        kube_api.load_client(None, None)
    assert one_line(exc).startswith("no Kubernetes configuration: KUBECONFIG is unset, ~/.kube/config does not exist")

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as exc:
        kube_api.load_client(None, None)
    assert one_line(exc).startswith(f"KUBECONFIG={tmp_path / 'nowhere'} names no existing file")
