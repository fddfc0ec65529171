"""tuner.kube.submit: `tuner submit` and `tuner cancel` against kmock."""

from __future__ import annotations

import asyncio

import pytest

from kube_support import JOB, NS, WS, job_uid, manifests, mutations, one_line
from tuner.errors import UserError
from tuner.kube import submit


@pytest.mark.asyncio
async def test_submit_creates_configmap_service_job_then_owned_pvc(cluster, api):
    given = manifests()
    result = await asyncio.to_thread(submit.submit, api, given, NS)

    assert result.created == [f"ConfigMap/{JOB}", f"Service/{JOB}", f"Job/{JOB}", f"PersistentVolumeClaim/{WS}-work"]
    assert result.unchanged == [] and result.replaced == [] and result.changed
    assert mutations(cluster) == [f"POST /api/v1/namespaces/{NS}/configmaps", f"POST /api/v1/namespaces/{NS}/services",
                                  f"POST /apis/batch/v1/namespaces/{NS}/jobs",
                                  f"POST /api/v1/namespaces/{NS}/persistentvolumeclaims"]
    job = cluster.objects["batch/v1/jobs", NS, JOB]
    assert job["metadata"]["annotations"] == {submit.SPEC_DIGEST: result.digest}
    assert dict(job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]) == {"nvidia.com/gpu": 1}
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, f"{WS}-work"]
    assert pvc["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": JOB,
                                                   "uid": job_uid(cluster), "blockOwnerDeletion": False,
                                                   "controller": False}]
    assert pvc["metadata"]["namespace"] == NS
    assert given == manifests()  # the caller's dicts are not modified


@pytest.mark.asyncio
async def test_resubmitting_the_same_spec_changes_nothing(cluster, api):
    first = await asyncio.to_thread(submit.submit, api, manifests(), NS)
    before = len(list(cluster))
    again = await asyncio.to_thread(submit.submit, api, manifests(), NS)

    assert again.digest == first.digest and not again.changed
    assert again.unchanged == first.created
    assert mutations(cluster, before) == []


@pytest.mark.asyncio
async def test_a_changed_spec_needs_replace(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    before = len(list(cluster))
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(lr="1e-4"), NS)
    text = one_line(exc)
    assert f"Job {JOB} in namespace {NS} exists with a different spec" in text and "--replace" in text
    assert mutations(cluster, before) == []


@pytest.mark.asyncio
async def test_replace_deletes_the_old_job_and_its_pvc_then_creates_the_new_spec(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    old_uid = job_uid(cluster)
    before = len(list(cluster))
    result = await asyncio.to_thread(submit.submit, api, manifests(lr="1e-4"), NS, replace=True, poll_interval=0.01)

    assert sorted(result.replaced) == sorted([f"ConfigMap/{JOB}", f"Service/{JOB}", f"Job/{JOB}",
                                              f"PersistentVolumeClaim/{WS}-work"])
    assert result.created == [] and result.unchanged == []
    deletes = [r for r in list(cluster)[before:] if r.method.value == "DELETE"]
    assert deletes[0].url.path == f"/apis/batch/v1/namespaces/{NS}/jobs/{JOB}"
    assert deletes[0].params["propagationPolicy"] == "Foreground"
    assert deletes[0].data["preconditions"] == {"uid": old_uid}  # only the Job it compared against
    assert deletes[1].url.path == f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{WS}-work"
    new_uid = job_uid(cluster)
    assert new_uid != old_uid
    assert cluster.objects["batch/v1/jobs", NS, JOB]["metadata"]["annotations"][submit.SPEC_DIGEST] == result.digest
    assert cluster.objects["v1/configmaps", NS, JOB]["data"]["training_config.yaml"] == "learning_rate: 1e-4\n"
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, f"{WS}-work"]
    assert [ref["uid"] for ref in pvc["metadata"]["ownerReferences"]] == [new_uid]


@pytest.mark.asyncio
async def test_replace_gives_up_when_the_old_job_is_not_deleted_in_time(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    lingering = dict(cluster.objects["batch/v1/jobs", NS, JOB].raw)
    # A Job whose pods do not terminate: it stays (with a deletionTimestamp) however often it is read.
    cluster["get", cluster.resource("batch/v1/jobs"), cluster.name(JOB)] << lingering
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(lr="1e-4"), NS, replace=True,
                                wait_timeout=0.3, poll_interval=0.05)
    assert f"Job {JOB} in namespace {NS} is still being deleted after 0.3s" in one_line(exc)
    assert len([r for r in cluster if r.method.value == "GET" and r.url.path.endswith(f"/jobs/{JOB}")]) > 2


@pytest.mark.asyncio
async def test_submit_after_cancel_recreates_the_pvc_left_for_the_garbage_collector(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    await asyncio.to_thread(submit.cancel, api, JOB, NS)
    # kmock has no garbage collector: the PVC owned by the deleted Job is still there, as right after a
    # real `cancel`. The same spec again must not keep it (it would be collected under the new Job).
    result = await asyncio.to_thread(submit.submit, api, manifests(), NS, poll_interval=0.01)

    assert result.created == [f"Job/{JOB}"]
    assert sorted(result.unchanged) == [f"ConfigMap/{JOB}", f"Service/{JOB}"]
    assert result.replaced == [f"PersistentVolumeClaim/{WS}-work"]
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, f"{WS}-work"]
    assert [ref["uid"] for ref in pvc["metadata"]["ownerReferences"]] == [job_uid(cluster)]


@pytest.mark.asyncio
async def test_a_job_not_made_by_tuner_is_never_replaced(cluster, api):
    cluster.objects["batch/v1/jobs", NS, JOB] = {"metadata": {"name": JOB, "namespace": NS, "uid": "u1"}}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS, replace=True)
    assert f"Job {JOB} in namespace {NS} exists and was not created by tuner" in one_line(exc)
    assert mutations(cluster) == []


@pytest.mark.asyncio
async def test_a_foreign_configmap_of_the_same_name_is_refused(cluster, api):
    cluster.objects["v1/configmaps", NS, JOB] = {"metadata": {"name": JOB, "namespace": NS}, "data": {}}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert f"ConfigMap {JOB} in namespace {NS} exists and was not created by tuner" in one_line(exc)
    assert mutations(cluster) == []


def test_spec_digest_ignores_order_and_its_own_annotation():
    objects = manifests()
    digest = submit.spec_digest(objects)
    assert submit.spec_digest(list(reversed(objects))) == digest
    annotated = manifests()
    annotated[0]["metadata"]["annotations"] = {submit.SPEC_DIGEST: "stale"}
    assert submit.spec_digest(annotated) == digest
    assert submit.spec_digest(manifests(lr="1e-4")) != digest


@pytest.mark.asyncio
async def test_cancel_deletes_the_job_in_the_background(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    uid = job_uid(cluster)
    await asyncio.to_thread(submit.cancel, api, JOB, NS)

    assert cluster.objects["batch/v1/jobs", NS, JOB].deleted
    (delete,) = [r for r in cluster if r.method.value == "DELETE"]
    assert delete.url.path == f"/apis/batch/v1/namespaces/{NS}/jobs/{JOB}"
    assert delete.params["propagationPolicy"] == "Background"
    assert delete.data == {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
