"""Remediation playbooks against the fake Kubernetes API over HTTP.

The Deployment controller is played by :class:`tests.test_releases.DeploymentController`
(ReplicaSets with revisions), cert-manager by :func:`tests.test_certificates.play_cert_manager`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from kubernetes import client as k8s_client

from ops_platform.playbooks import PLAYBOOKS, PlaybookContext, PlaybookRefused, run_playbook
from ops_platform.playbooks.base import PLAYBOOK_FIELD_MANAGER
from ops_platform.playbooks.expand_pvc import format_quantity, parse_quantity
from ops_platform.playbooks.restart_workload import RESTARTED_AT
from ops_platform.releases import REVISION_ANNOTATION
from ops_platform.resources.kubernetes import FieldConflict, FieldOwner, KubernetesClient
from ops_platform.spec import PLAYBOOKS as SPEC_PLAYBOOKS
from tests.fakes.kube_api import KubeApiServer
from tests.test_certificates import CERTIFICATE_CRD, CM, certificate_object, play_cert_manager
from tests.test_releases import NAMESPACE, DeploymentController

AT = datetime(2026, 3, 1, 12, 30, 0, tzinfo=timezone.utc)
IMAGE = "123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/onto-backend-dev"
APP_LABELS = {"namespace": NAMESPACE, "deployment": "onto-backend", "alertname": "X", "severity": "critical"}
PVC_LABELS = {"namespace": "data", "persistentvolumeclaim": "pg-data", "alertname": "PersistentVolumeFillingUp"}
KUBE_PLAYBOOK_LABELS = {
    "restart_workload": APP_LABELS,
    "scale_workload": APP_LABELS,
    "rollback_deployment": APP_LABELS,
    "expand_pvc": PVC_LABELS,
    "renew_certificate": {"namespace": "apps", "name": "onto"},
}


@pytest.fixture
def kube(kube_api: KubeApiServer, kube_api_client: k8s_client.ApiClient) -> KubernetesClient:
    for namespace in (NAMESPACE, "data", "apps"):
        kube_api.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    return KubernetesClient(kube_api_client, request_timeout=5)


@pytest.fixture
def controller(kube_api: KubeApiServer, kube_api_client: k8s_client.ApiClient) -> Iterator[DeploymentController]:
    with DeploymentController(kube_api, kube_api_client) as running:
        yield running


def ctx(kube: KubernetesClient | None, *, dry_run: bool = False, allowed: list[str] | None = None) -> PlaybookContext:
    return PlaybookContext(kube, dry_run=dry_run, allowed_namespaces=allowed or [], clock=lambda: AT)


def release(kube: KubernetesClient, tag: str, replicas: int = 3) -> dict[str, Any]:
    """Apply the Deployment as a release does (field manager ops-platform)."""
    labels = {"app.kubernetes.io/name": "onto-backend"}
    return kube.apply({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "onto-backend", "namespace": NAMESPACE, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "api", "image": f"{IMAGE}:{tag}"}]}}},
    }).object


def live_deployment(kube_api: KubeApiServer) -> dict[str, Any]:
    found = kube_api.get_object("apps/v1", "deployments", "onto-backend", NAMESPACE)
    assert found is not None
    return found


def wait_for_revision(kube_api: KubeApiServer, revision: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        live = live_deployment(kube_api)
        if (live["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION) == revision:
            return live
        time.sleep(0.02)
    raise AssertionError(f"the controller never reached revision {revision}")


def writes(kube_api: KubeApiServer) -> list[Any]:
    return [r for r in kube_api.requests if r.method not in ("GET", "HEAD")]


def put_storage(kube_api: KubeApiServer, *, expandable: bool | None, size: str = "10Gi") -> None:
    storage_class: dict[str, Any] = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                                     "metadata": {"name": "gp3"}, "provisioner": "ebs.csi.aws.com"}
    if expandable is not None:
        storage_class["allowVolumeExpansion"] = expandable
    kube_api.put_object(storage_class)
    kube_api.put_object({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "pg-data", "namespace": "data"},
        "spec": {"storageClassName": "gp3", "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": size}}},
        "status": {"phase": "Bound", "capacity": {"storage": size}},
    })


def put_hpa(kube_api: KubeApiServer, min_replicas: int, max_replicas: int) -> None:
    kube_api.put_object({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "onto-backend-hpa", "namespace": NAMESPACE},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onto-backend"},
                 "minReplicas": min_replicas, "maxReplicas": max_replicas},
    })


def pvc_request(kube_api: KubeApiServer) -> str:
    pvc = kube_api.get_object("v1", "persistentvolumeclaims", "pg-data", "data")
    assert pvc is not None
    return pvc["spec"]["resources"]["requests"]["storage"]


def test_registry_has_every_playbook_of_the_spec() -> None:
    assert set(PLAYBOOKS) == set(SPEC_PLAYBOOKS)
    assert all(definition.description for definition in PLAYBOOKS.values())


def test_restart_sets_the_restarted_at_annotation_and_keeps_the_release(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    release(kube, "0123abc")
    wait_for_revision(kube_api, "1")
    result = run_playbook("restart_workload", ctx(kube, allowed=[NAMESPACE]), APP_LABELS)
    live = wait_for_revision(kube_api, "2")
    template = live["spec"]["template"]
    assert template["metadata"]["annotations"][RESTARTED_AT] == "2026-03-01T12:30:00Z"
    assert template["spec"]["containers"][0]["image"] == f"{IMAGE}:0123abc", "the release's fields are kept"
    assert live["spec"]["replicas"] == 3 and live["metadata"]["labels"]
    assert result.changed and not result.dry_run
    assert result.before["restartedAt"] is None and result.after["restartedAt"] == "2026-03-01T12:30:00Z"
    assert result.target == f"Deployment {NAMESPACE}/onto-backend"
    applies = [r for r in writes(kube_api) if r.path.endswith("/deployments/onto-backend")]
    assert applies[-1].query["fieldManager"] == PLAYBOOK_FIELD_MANAGER


@pytest.mark.parametrize("name", ["restart_workload", "scale_workload", "rollback_deployment", "expand_pvc"])
def test_dry_run_writes_nothing(
    name: str, kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    release(kube, "0123abc")
    wait_for_revision(kube_api, "1")
    release(kube, "4567def")
    wait_for_revision(kube_api, "2")
    put_storage(kube_api, expandable=True)
    deployment_before = live_deployment(kube_api)
    kube_api.requests.clear()
    result = run_playbook(name, ctx(kube, dry_run=True), KUBE_PLAYBOOK_LABELS[name])
    assert result.dry_run and result.changed and result.summary.startswith("would ")
    sent = writes(kube_api)
    assert sent, "a dry run still asks the server to validate the change"
    assert all(r.query.get("dryRun") == "All" for r in sent), [(r.method, r.path, r.query) for r in sent]
    assert live_deployment(kube_api) == deployment_before
    assert pvc_request(kube_api) == "10Gi"


@pytest.mark.parametrize("name", sorted(KUBE_PLAYBOOK_LABELS))
def test_target_outside_the_allow_list_is_refused_before_any_request(
    name: str, kube: KubernetesClient, kube_api: KubeApiServer
) -> None:
    kube_api.requests.clear()
    with pytest.raises(PlaybookRefused, match="is not in the allow-list") as refused:
        run_playbook(name, ctx(kube, allowed=["somewhere-else"]), KUBE_PLAYBOOK_LABELS[name])
    assert repr(KUBE_PLAYBOOK_LABELS[name]["namespace"]) in str(refused.value)
    assert kube_api.requests == []


@pytest.mark.parametrize(("name", "labels", "missing"), [
    ("restart_workload", {"namespace": NAMESPACE}, "deployment"),
    ("scale_workload", {"deployment": "onto-backend"}, "namespace"),
    ("expand_pvc", {"namespace": "data", "persistentvolumeclaim": ""}, "persistentvolumeclaim"),
    ("renew_certificate", {"namespace": "apps"}, "name"),
    ("rerun_backup", {"alertname": "BackupTooOld"}, "datastore"),
])
def test_missing_label_is_refused_naming_it(name: str, labels: dict[str, str], missing: str,
                                            kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    kube_api.requests.clear()
    with pytest.raises(PlaybookRefused, match=f"the alert has no label '{missing}'"):
        run_playbook(name, ctx(kube), labels, datastores=["postgres_main"])
    assert kube_api.requests == []


def test_malformed_label_and_unknown_playbook_are_refused(kube: KubernetesClient) -> None:
    with pytest.raises(PlaybookRefused, match="label 'deployment'"):
        run_playbook("restart_workload", ctx(kube), {"namespace": NAMESPACE, "deployment": "Not_A/Name"})
    with pytest.raises(PlaybookRefused, match="not a mapping"):
        run_playbook("restart_workload", ctx(kube), ["namespace"])  # type: ignore[arg-type]
    with pytest.raises(PlaybookRefused, match="unknown playbook 'reboot_node'"):
        run_playbook("reboot_node", ctx(kube), APP_LABELS)


def test_without_a_cluster_kube_playbooks_refuse_naming_the_setting() -> None:
    with pytest.raises(PlaybookRefused, match="KUBECONFIG / OPS_KUBE_CONTEXT"):
        run_playbook("restart_workload", ctx(None), APP_LABELS)


def test_missing_target_is_refused(kube: KubernetesClient) -> None:
    with pytest.raises(PlaybookRefused, match=f"Deployment {NAMESPACE}/onto-backend does not exist"):
        run_playbook("scale_workload", ctx(kube), APP_LABELS)


def test_scale_steps_within_min_and_max(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    release(kube, "0123abc", replicas=3)
    result = run_playbook("scale_workload", ctx(kube), APP_LABELS)
    assert (result.before, result.after, result.changed) == ({"replicas": 3}, {"replicas": 4}, True)
    assert "took over .spec.replicas from 'ops-platform'" in result.summary, "the release's field, said so"
    assert live_deployment(kube_api)["spec"]["replicas"] == 4
    assert live_deployment(kube_api)["spec"]["template"]["spec"]["containers"], "the release's fields are kept"

    result = run_playbook("scale_workload", ctx(kube), APP_LABELS, replicas=50, max_replicas=6)
    assert result.after == {"replicas": 6} and "50 wanted" in result.summary
    result = run_playbook("scale_workload", ctx(kube), APP_LABELS, max_replicas=6)
    assert not result.changed and live_deployment(kube_api)["spec"]["replicas"] == 6
    result = run_playbook("scale_workload", ctx(kube), APP_LABELS, replicas=0)
    assert result.after == {"replicas": 2}, "never below min_replicas (default 2)"
    with pytest.raises(PlaybookRefused, match="1 <= min <= max"):
        run_playbook("scale_workload", ctx(kube), APP_LABELS, min_replicas=5, max_replicas=3)


def test_scale_raises_the_hpa_floor_instead_of_fighting_it(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    release(kube, "0123abc", replicas=2)
    put_hpa(kube_api, min_replicas=2, max_replicas=5)
    result = run_playbook("scale_workload", ctx(kube), APP_LABELS, step=2)
    assert result.target == f"HorizontalPodAutoscaler {NAMESPACE}/onto-backend-hpa"
    assert result.before == {"minReplicas": 2, "maxReplicas": 5} and result.after == {"minReplicas": 4,
                                                                                       "maxReplicas": 5}
    hpa = kube_api.get_object("autoscaling/v2", "horizontalpodautoscalers", "onto-backend-hpa", NAMESPACE)
    assert hpa["spec"]["minReplicas"] == 4 and hpa["spec"]["scaleTargetRef"]["name"] == "onto-backend"
    assert live_deployment(kube_api)["spec"]["replicas"] == 2, "the HPA owns the replica count"
    result = run_playbook("scale_workload", ctx(kube), APP_LABELS, step=3)
    assert result.after["minReplicas"] == 5, "capped at the HPA's maxReplicas"
    assert not run_playbook("scale_workload", ctx(kube), APP_LABELS).changed


def test_a_field_another_manager_owns_is_reported_by_name_and_left_alone(
    kube: KubernetesClient, kube_api: KubeApiServer, kube_api_client: k8s_client.ApiClient
) -> None:
    release(kube, "0123abc", replicas=2)
    person = KubernetesClient(kube_api_client, field_manager="platform-admin", request_timeout=5)
    person.apply({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                  "metadata": {"name": "onto-backend-hpa", "namespace": NAMESPACE},
                  "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onto-backend"},
                           "minReplicas": 3, "maxReplicas": 6}})
    kube_api.requests.clear()

    with pytest.raises(PlaybookRefused) as refused:
        run_playbook("scale_workload", ctx(kube), APP_LABELS)
    with pytest.raises(FieldConflict) as conflict:
        kube.apply({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": "onto-backend-hpa", "namespace": NAMESPACE}, "spec": {"maxReplicas": 9}},
                   force=False)

    assert f"HorizontalPodAutoscaler {NAMESPACE}/onto-backend-hpa: .spec.minReplicas is owned by field manager " \
        "'platform-admin'; the playbook left it unchanged" in str(refused.value)
    hpa = kube_api.get_object("autoscaling/v2", "horizontalpodautoscalers", "onto-backend-hpa", NAMESPACE)
    assert hpa["spec"]["minReplicas"] == 3
    applies = [r for r in writes(kube_api) if "horizontalpodautoscalers" in r.path]
    assert applies and all(r.query.get("force", "false").lower() == "false" for r in applies)
    assert conflict.value.conflicts == (FieldOwner("platform-admin", ".spec.maxReplicas"),)
    assert ".spec.maxReplicas (owned by 'platform-admin'); nothing was changed" in str(conflict.value)


def test_rollback_returns_to_the_previous_replicaset(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    release(kube, "0123abc")
    wait_for_revision(kube_api, "1")
    first_rs = {rs["metadata"]["name"] for rs in kube.list("apps/v1", "ReplicaSet", NAMESPACE)}
    release(kube, "4567def")
    wait_for_revision(kube_api, "2")
    result = run_playbook("rollback_deployment", ctx(kube, allowed=[NAMESPACE]), APP_LABELS)
    live = wait_for_revision(kube_api, "3")
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == f"{IMAGE}:0123abc"
    assert "pod-template-hash" not in live["spec"]["template"]["metadata"]["labels"]
    assert result.after["replicaset"] in first_rs and result.after["revision"] == "1"
    assert result.before == {"revision": "2", "images": [f"{IMAGE}:4567def"]}
    replicasets = {rs["metadata"]["name"] for rs in kube.list("apps/v1", "ReplicaSet", NAMESPACE)}
    assert len(replicasets) == 2, "the old ReplicaSet is re-adopted, no third one"


def test_rollback_without_an_older_revision_is_refused(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    release(kube, "0123abc")
    wait_for_revision(kube_api, "1")
    with pytest.raises(PlaybookRefused, match="no ReplicaSet older than revision 1"):
        run_playbook("rollback_deployment", ctx(kube), APP_LABELS)


def test_expand_pvc_grows_by_a_step(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    put_storage(kube_api, expandable=True, size="10Gi")
    result = run_playbook("expand_pvc", ctx(kube, allowed=["data", "logging"]), PVC_LABELS)
    assert pvc_request(kube_api) == "12Gi"
    assert (result.before["storage"], result.after["storage"], result.changed) == ("10Gi", "12Gi", True)
    run_playbook("expand_pvc", ctx(kube), PVC_LABELS, step_percent=1)
    assert pvc_request(kube_api) == "13Gi", "at least min_step (1Gi)"


def test_expand_pvc_is_capped_at_the_limit(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    put_storage(kube_api, expandable=True, size="900Gi")
    result = run_playbook("expand_pvc", ctx(kube), PVC_LABELS)
    assert pvc_request(kube_api) == "1Ti" and "capped at the limit 1Ti" in result.summary
    kube_api.requests.clear()
    result = run_playbook("expand_pvc", ctx(kube), PVC_LABELS)
    assert not result.changed and "already at the limit" in result.summary
    assert writes(kube_api) == []


@pytest.mark.parametrize("expandable", [False, None])
def test_expand_pvc_refuses_a_class_without_expansion(
    expandable: bool | None, kube: KubernetesClient, kube_api: KubeApiServer
) -> None:
    put_storage(kube_api, expandable=expandable)
    with pytest.raises(PlaybookRefused, match="StorageClass 'gp3' of PersistentVolumeClaim data/pg-data does not "
                                              "allow volume expansion"):
        run_playbook("expand_pvc", ctx(kube), PVC_LABELS)
    assert pvc_request(kube_api) == "10Gi" and writes(kube_api) == []


def test_expand_pvc_refuses_a_garbled_size_or_limit(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    put_storage(kube_api, expandable=True, size="lots")
    with pytest.raises(PlaybookRefused, match="not a Kubernetes quantity: 'lots'"):
        run_playbook("expand_pvc", ctx(kube), PVC_LABELS)
    with pytest.raises(PlaybookRefused, match="min_step / limit"):
        run_playbook("expand_pvc", ctx(kube), PVC_LABELS, limit="1 TB")


@pytest.mark.parametrize(("quantity", "size", "formatted"), [
    ("10Gi", 10 * 1024**3, "10Gi"), ("1.5Ti", 1536 * 1024**3, "1536Gi"), ("500M", 500_000_000, "500000000"),
    ("1e3", 1000, "1000"), ("512Mi", 512 * 1024**2, "512Mi"), ("2048", 2048, "2Ki"),
])
def test_quantities(quantity: str, size: int, formatted: str) -> None:
    assert parse_quantity(quantity) == size
    assert format_quantity(size) == formatted


def test_renew_certificate_triggers_cert_manager(tls_ca: Any, kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    kube.apply(CERTIFICATE_CRD)
    intermediate = tls_ca.intermediate()
    old = intermediate.issue(["onto.test"], days=5)
    kube_api.put_object(certificate_object("apps", "onto", "onto-tls", ["onto.test"], revision=1,
                                           not_after=old.certificate.not_valid_after_utc))
    kube_api.put_object(old.tls_secret("apps", "onto-tls"))
    new = intermediate.issue(["onto.test"], days=90)

    dry = run_playbook("renew_certificate", ctx(kube, dry_run=True, allowed=["apps"]),
                       {"namespace": "apps", "name": "onto"}, trust_roots=[])
    assert not dry.changed and dry.after["action"] == "would renew"
    assert not [r for r in writes(kube_api) if "certificates/onto" in r.path]

    thread, seen = play_cert_manager(kube_api, "apps", "onto", new)
    result = run_playbook("renew_certificate", PlaybookContext(kube, allowed_namespaces=["apps"]),
                          {"namespace": "apps", "name": "onto"}, trust_roots=[], wait_timeout=5,
                          poll_interval=0.05)
    thread.join(timeout=5)
    assert seen["issuing"]["reason"] == "ManuallyTriggered"
    assert result.changed and (result.before["revision"], result.after["revision"]) == (1, 2)
    assert result.after["fingerprint"] == new.fingerprint and result.before["fingerprint"] == old.fingerprint
    assert kube_api.get_object(CM, "certificates", "onto", "apps")["status"]["revision"] == 2

    with pytest.raises(PlaybookRefused, match="no cert-manager Certificate apps/other"):
        run_playbook("renew_certificate", ctx(kube), {"namespace": "apps", "name": "other"}, trust_roots=[])


def test_rerun_backup_names_the_asset() -> None:
    labels = {"datastore": "postgres_main", "alertname": "BackupTooOld"}
    result = run_playbook("rerun_backup", ctx(None), labels, datastores=["postgres_main", "redis"])
    assert result.after == {"asset_key": ["backups", "postgres_main"]}
    assert result.changed and result.target == "backups/postgres_main"
    dry = run_playbook("rerun_backup", ctx(None, dry_run=True), labels, datastores=["postgres_main"])
    assert not dry.changed and dry.summary.startswith("would materialize")


def test_rerun_backup_refuses_an_unknown_datastore() -> None:
    with pytest.raises(PlaybookRefused, match=r"unknown datastore 'mysql'; the spec has \['postgres_main'\]"):
        run_playbook("rerun_backup", ctx(None), {"datastore": "mysql"}, datastores=["postgres_main"])
