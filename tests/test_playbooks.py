"""Remediation playbooks against the real API server, run as the code location's ServiceAccount.

The code runs as ``ops-platform`` (tests/fixtures/kube_server.py); what it acts on is made as
admin, or by the real controllers: the Deployment controller rolls out ReplicaSets (their pods
readied by the ``kubelet`` stand-in), the StatefulSet controller makes the claims that
``expand_pvc`` grows and the PV controller binds them. What the code sent is read from the
server's audit log. No cert-manager runs here: :func:`play_cert_manager` plays its part, as admin.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from ops_platform.playbooks import (
    PLAYBOOKS,
    PlaybookContext,
    PlaybookRefused,
    run_playbook,
)
from ops_platform.playbooks.base import PLAYBOOK_FIELD_MANAGER
from ops_platform.playbooks.expand_pvc import format_quantity, parse_quantity
from ops_platform.playbooks.restart_workload import RESTARTED_AT
from ops_platform.releases import REVISION_ANNOTATION
from ops_platform.resources.kubernetes import (
    FieldConflict,
    FieldOwner,
    KubernetesClient,
    KubernetesResource,
)
from ops_platform.spec import PLAYBOOKS as SPEC_PLAYBOOKS
from tests.fixtures.cert_manager import play_cert_manager, rfc3339
from tests.fixtures.kube_server import KubeCluster

AT = datetime(2026, 3, 1, 12, 30, 0, tzinfo=UTC)
IMAGE = "123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/onto-backend-dev"
APP = {"app.kubernetes.io/name": "onto-backend"}
CM = "cert-manager.io/v1"
# 1.20 serves HorizontalPodAutoscaler up to autoscaling/v2beta2: the release applies it in that version there.
HPA_SETUP_API = "autoscaling/v2beta2"
CONTEXT = "kind-test"
WRITES = ("create", "update", "patch", "delete", "deletecollection")


def app_labels(namespace: str) -> dict[str, str]:
    return {"namespace": namespace, "deployment": "onto-backend", "alertname": "X", "severity": "critical"}


def pvc_labels(namespace: str) -> dict[str, str]:
    return {"namespace": namespace, "persistentvolumeclaim": "data-pg-0", "alertname": "PersistentVolumeFillingUp"}


def kube_playbook_labels(name: str, namespace: str) -> dict[str, str]:
    if name == "expand_pvc":
        return pvc_labels(namespace)
    if name == "renew_certificate":
        return {"namespace": namespace, "name": "onto"}
    return app_labels(namespace)


KUBE_PLAYBOOKS = ["expand_pvc", "renew_certificate", "restart_workload", "rollback_deployment", "scale_workload"]


@pytest.fixture(scope="module")
def kubeconfig(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("playbooks") / "kubeconfig"
    return kube_cluster.write_kubeconfig(path, "ops-platform", context=CONTEXT)


@pytest.fixture(scope="module")
def kube(kubeconfig: Path) -> KubernetesClient:
    return KubernetesResource(kubeconfig=str(kubeconfig), context=CONTEXT, request_timeout=10).get_client()


def ctx(kube: KubernetesClient | None, *, dry_run: bool = False, allowed: list[str] | None = None) -> PlaybookContext:
    return PlaybookContext(kube, dry_run=dry_run, allowed_namespaces=allowed or [], clock=lambda: AT)


def release(kube: KubernetesClient, namespace: str, tag: str, replicas: int = 2) -> dict[str, Any]:
    """Apply the Deployment as a release does (field manager ops-platform)."""
    return kube.apply({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "onto-backend", "namespace": namespace, "labels": APP},
        "spec": {"replicas": replicas, "selector": {"matchLabels": APP},
                 "template": {"metadata": {"labels": APP},
                              "spec": {"containers": [{"name": "api", "image": f"{IMAGE}:{tag}"}]}}},
    }).object


def live_deployment(kube_cluster: KubeCluster, namespace: str) -> dict[str, Any]:
    found = kube_cluster.get_object("apps/v1", "Deployment", "onto-backend", namespace)
    assert found is not None
    return found


def wait_for_revision(kube_cluster: KubeCluster, namespace: str, revision: str) -> dict[str, Any]:
    return kube_cluster.wait_for(f"the Deployment controller at revision {revision}", lambda: (
        (live := live_deployment(kube_cluster, namespace))["metadata"].get("annotations") or {}).get(
            REVISION_ANNOTATION) == revision and live)


def wait_for_rollout(kube_cluster: KubeCluster, namespace: str, replicas: int) -> dict[str, Any]:
    """The rollout done: every replica updated and available (pods readied by the kubelet stand-in)."""
    def done() -> dict[str, Any] | None:
        live = live_deployment(kube_cluster, namespace)
        status = live.get("status") or {}
        finished = (status.get("observedGeneration") == live["metadata"]["generation"]
                    and status.get("updatedReplicas") == replicas == status.get("availableReplicas")
                    and status.get("replicas") == replicas)
        return live if finished else None

    return kube_cluster.wait_for(f"the rollout of {replicas} replicas", done)


def writes_since(kube_cluster: KubeCluster, mark: tuple[int, str], resource: str | None = None) -> list[dict[str, Any]]:
    """The writes ops-platform sent since ``mark`` (of one resource when given), from the audit log."""
    return [event for event in kube_cluster.audit_events_since(mark) if event["verb"] in WRITES
            and resource in (None, (event.get("objectRef") or {}).get("resource"))]


def logged_writes(kube_cluster: KubeCluster, mark: tuple[int, str], count: int,
                  resource: str | None = None) -> list[dict[str, Any]]:
    """The writes since ``mark`` once ``count`` of them are in the audit log."""
    return kube_cluster.wait_for(f"{count} write(s) in the audit log", lambda: len(
        found := writes_since(kube_cluster, mark, resource)) >= count and found)


def query(event: dict[str, Any]) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(event["requestURI"]).query).items()}


def put_hpa(kube_cluster: KubeCluster, namespace: str, min_replicas: int, max_replicas: int, *,
            manager: str = "ops-platform") -> None:
    """The HPA of InfraSpec §3.3, applied as its release applies it (or by another ``manager``)."""
    kube_cluster.put_object({
        "apiVersion": HPA_SETUP_API, "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "onto-backend-hpa", "namespace": namespace},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onto-backend"},
                 "minReplicas": min_replicas, "maxReplicas": max_replicas,
                 "metrics": [{"type": "Resource", "resource": {
                     "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}],
                 "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}}},
    }, manager=manager)


def live_hpa(kube_cluster: KubeCluster, namespace: str) -> dict[str, Any]:
    found = kube_cluster.get_object(HPA_SETUP_API, "HorizontalPodAutoscaler", "onto-backend-hpa", namespace)
    assert found is not None
    return found


@pytest.fixture
def storage(kube_cluster: KubeCluster, kube_namespace: str) -> Iterator[Storage]:
    made = Storage(kube_cluster, kube_namespace)
    yield made
    for volume in made.volumes:
        kube_cluster.delete_object("v1", "PersistentVolume", volume)
    kube_cluster.delete_object("storage.k8s.io/v1", "StorageClass", made.class_name)


class Storage:
    """A StorageClass of the test and the claim ``data-pg-0`` its StatefulSet ``pg`` makes, bound to a volume."""

    def __init__(self, kube_cluster: KubeCluster, namespace: str) -> None:
        self.kube_cluster = kube_cluster
        self.namespace = namespace
        self.class_name = f"{namespace}-gp3"
        self.volumes: list[str] = []

    def put(self, *, expandable: bool | None, size: str = "10Gi") -> None:
        storage_class: dict[str, Any] = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                                         "metadata": {"name": self.class_name}, "provisioner": "ebs.csi.aws.com"}
        if expandable is not None:
            storage_class["allowVolumeExpansion"] = expandable
        self.kube_cluster.put_object(storage_class)
        self.kube_cluster.put_object({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "pg", "namespace": self.namespace},
            "spec": {"serviceName": "pg", "replicas": 1, "selector": {"matchLabels": {"app": "pg"}},
                     "template": {"metadata": {"labels": {"app": "pg"}},
                                  "spec": {"containers": [{"name": "pg", "image": "postgres:16"}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                         "accessModes": ["ReadWriteOnce"], "storageClassName": self.class_name,
                         "resources": {"requests": {"storage": size}}}}]},
        })
        self.volumes += self.kube_cluster.provide_volumes([(self.namespace, "data-pg-0", size)])

    def request(self) -> str:
        pvc = self.kube_cluster.get_object("v1", "PersistentVolumeClaim", "data-pg-0", self.namespace)
        assert pvc is not None
        return pvc["spec"]["resources"]["requests"]["storage"]


def test_registry_has_every_playbook_of_the_spec() -> None:
    assert set(PLAYBOOKS) == set(SPEC_PLAYBOOKS)
    assert all(definition.description for definition in PLAYBOOKS.values())
    assert sorted(set(PLAYBOOKS) - {"rerun_backup"}) == KUBE_PLAYBOOKS


def test_restart_rolls_the_pods_and_keeps_the_release(kube, kube_cluster, kube_namespace, kubelet) -> None:
    kubelet.run(kube_namespace, APP, "ready")
    release(kube, kube_namespace, "0123abc")
    wait_for_revision(kube_cluster, kube_namespace, "1")
    wait_for_rollout(kube_cluster, kube_namespace, 2)
    mark = kube_cluster.audit_mark()

    result = run_playbook("restart_workload", ctx(kube, allowed=[kube_namespace]), app_labels(kube_namespace))

    wait_for_revision(kube_cluster, kube_namespace, "2")
    live = wait_for_rollout(kube_cluster, kube_namespace, 2)
    template = live["spec"]["template"]
    assert template["metadata"]["annotations"][RESTARTED_AT] == "2026-03-01T12:30:00Z"
    assert template["spec"]["containers"][0]["image"] == f"{IMAGE}:0123abc", "the release's fields are kept"
    assert live["spec"]["replicas"] == 2 and live["metadata"]["labels"] == APP
    assert result.changed and not result.dry_run
    assert result.before["restartedAt"] is None and result.after["restartedAt"] == "2026-03-01T12:30:00Z"
    assert result.target == f"Deployment {kube_namespace}/onto-backend"
    [applied] = logged_writes(kube_cluster, mark, 1, "deployments")
    assert query(applied)["fieldManager"] == PLAYBOOK_FIELD_MANAGER
    pods = kube_cluster.list_objects("v1", "Pod", kube_namespace, "app.kubernetes.io/name=onto-backend")
    restarted = [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")
                 and (pod["metadata"].get("annotations") or {}).get(RESTARTED_AT)]
    assert len(restarted) == 2, "the Deployment controller replaced the pods"


@pytest.mark.parametrize("name", ["restart_workload", "scale_workload", "rollback_deployment", "expand_pvc"])
def test_dry_run_writes_nothing(name: str, kube, kube_cluster, kube_namespace, storage) -> None:
    if name == "expand_pvc":
        storage.put(expandable=True)
    else:
        release(kube, kube_namespace, "0123abc")
        wait_for_revision(kube_cluster, kube_namespace, "1")
    if name == "rollback_deployment":
        release(kube, kube_namespace, "4567def")
        wait_for_revision(kube_cluster, kube_namespace, "2")
    before = kube_cluster.get_object("apps/v1", "Deployment", "onto-backend", kube_namespace)
    mark = kube_cluster.audit_mark()

    result = run_playbook(name, ctx(kube, dry_run=True), kube_playbook_labels(name, kube_namespace))

    assert result.dry_run and result.changed and result.summary.startswith("would ")
    sent = logged_writes(kube_cluster, mark, 1)
    assert all(query(event).get("dryRun") == "All" for event in sent), [e["requestURI"] for e in sent]
    if before is not None:
        after = live_deployment(kube_cluster, kube_namespace)
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"] == before["spec"]
    else:
        assert storage.request() == "10Gi"


@pytest.mark.parametrize("name", KUBE_PLAYBOOKS)
def test_target_outside_the_allow_list_is_refused_before_any_request(name: str, kube, kube_cluster,
                                                                     kube_namespace) -> None:
    labels = kube_playbook_labels(name, kube_namespace)
    mark = kube_cluster.audit_mark()
    with pytest.raises(PlaybookRefused, match="is not in the allow-list") as refused:
        run_playbook(name, ctx(kube, allowed=["somewhere-else"]), labels)
    assert repr(kube_namespace) in str(refused.value)
    assert kube_cluster.audit_events_since(mark) == []


@pytest.mark.parametrize(("name", "labels", "missing"), [
    ("restart_workload", {"namespace": "ontology-editor"}, "deployment"),
    ("scale_workload", {"deployment": "onto-backend"}, "namespace"),
    ("expand_pvc", {"namespace": "data", "persistentvolumeclaim": ""}, "persistentvolumeclaim"),
    ("renew_certificate", {"namespace": "apps"}, "name"),
    ("rerun_backup", {"alertname": "BackupTooOld"}, "datastore"),
])
def test_missing_label_is_refused_naming_it(name: str, labels: dict[str, str], missing: str, kube,
                                            kube_cluster) -> None:
    mark = kube_cluster.audit_mark()
    with pytest.raises(PlaybookRefused, match=f"the alert has no label '{missing}'"):
        run_playbook(name, ctx(kube), labels, datastores=["postgres_main"])
    assert kube_cluster.audit_events_since(mark) == []


def test_malformed_label_and_unknown_playbook_are_refused(kube) -> None:
    with pytest.raises(PlaybookRefused, match="label 'deployment'"):
        run_playbook("restart_workload", ctx(kube), {"namespace": "ontology-editor", "deployment": "Not_A/Name"})
    with pytest.raises(PlaybookRefused, match="not a mapping"):
        run_playbook("restart_workload", ctx(kube), ["namespace"])  # type: ignore[arg-type]
    with pytest.raises(PlaybookRefused, match="unknown playbook 'reboot_node'"):
        run_playbook("reboot_node", ctx(kube), app_labels("ontology-editor"))


def test_without_a_cluster_kube_playbooks_refuse_naming_the_setting() -> None:
    with pytest.raises(PlaybookRefused, match="KUBECONFIG / OPS_KUBE_CONTEXT"):
        run_playbook("restart_workload", ctx(None), app_labels("ontology-editor"))


def test_missing_target_is_refused(kube, kube_namespace) -> None:
    with pytest.raises(PlaybookRefused, match=f"Deployment {kube_namespace}/onto-backend does not exist"):
        run_playbook("scale_workload", ctx(kube), app_labels(kube_namespace))


def test_scale_steps_within_min_and_max(kube, kube_cluster, kube_namespace, kubelet) -> None:
    kubelet.run(kube_namespace, APP, "ready")
    labels = app_labels(kube_namespace)
    release(kube, kube_namespace, "0123abc", replicas=3)

    result = run_playbook("scale_workload", ctx(kube), labels)
    assert (result.before, result.after, result.changed) == ({"replicas": 3}, {"replicas": 4}, True)
    assert "took over .spec.replicas from 'ops-platform'" in result.summary, "the release's field, said so"
    live = wait_for_rollout(kube_cluster, kube_namespace, 4)
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == f"{IMAGE}:0123abc"

    result = run_playbook("scale_workload", ctx(kube), labels, replicas=50, max_replicas=6)
    assert result.after == {"replicas": 6} and "50 wanted" in result.summary
    mark = kube_cluster.audit_mark()
    result = run_playbook("scale_workload", ctx(kube), labels, max_replicas=6)
    assert not result.changed and writes_since(kube_cluster, mark) == []
    assert live_deployment(kube_cluster, kube_namespace)["spec"]["replicas"] == 6
    result = run_playbook("scale_workload", ctx(kube), labels, replicas=0)
    assert result.after == {"replicas": 2}, "never below min_replicas (default 2)"
    with pytest.raises(PlaybookRefused, match="1 <= min <= max"):
        run_playbook("scale_workload", ctx(kube), labels, min_replicas=5, max_replicas=3)


def test_scale_raises_the_hpa_floor_instead_of_fighting_it(kube, kube_cluster, kube_namespace) -> None:
    labels = app_labels(kube_namespace)
    release(kube, kube_namespace, "0123abc", replicas=2)
    put_hpa(kube_cluster, kube_namespace, min_replicas=2, max_replicas=5)
    mark = kube_cluster.audit_mark()

    result = run_playbook("scale_workload", ctx(kube), labels, step=2)

    assert result.target == f"HorizontalPodAutoscaler {kube_namespace}/onto-backend-hpa"
    assert (result.before, result.after) == ({"minReplicas": 2, "maxReplicas": 5}, {"minReplicas": 4, "maxReplicas": 5})
    assert "took over .spec.minReplicas from 'ops-platform'" in result.summary
    hpa = live_hpa(kube_cluster, kube_namespace)["spec"]
    assert hpa["minReplicas"] == 4 and hpa["scaleTargetRef"]["name"] == "onto-backend"
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"], "the release's v2 metrics are kept"
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert writes_since(kube_cluster, mark, "deployments") == [], "the HPA owns the replica count"
    result = run_playbook("scale_workload", ctx(kube), labels, step=3)
    assert result.after["minReplicas"] == 5, "capped at the HPA's maxReplicas"
    assert not run_playbook("scale_workload", ctx(kube), labels).changed


def test_a_field_another_manager_applied_is_reported_by_name_and_left_alone(kube, kube_cluster,
                                                                            kube_namespace) -> None:
    release(kube, kube_namespace, "0123abc", replicas=2)
    put_hpa(kube_cluster, kube_namespace, min_replicas=3, max_replicas=6, manager="platform-admin")
    mark = kube_cluster.audit_mark()

    with pytest.raises(PlaybookRefused) as refused:
        run_playbook("scale_workload", ctx(kube), app_labels(kube_namespace))
    with pytest.raises(FieldConflict) as conflict:
        kube.apply({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": "onto-backend-hpa", "namespace": kube_namespace},
                    "spec": {"maxReplicas": 9}}, force=False)

    assert f"HorizontalPodAutoscaler {kube_namespace}/onto-backend-hpa: .spec.minReplicas is owned by field " \
        "manager 'platform-admin'; the playbook left it unchanged" in str(refused.value)
    assert live_hpa(kube_cluster, kube_namespace)["spec"]["minReplicas"] == 3
    applies = logged_writes(kube_cluster, mark, 2, "horizontalpodautoscalers")
    assert len(applies) == 2 and all(query(e).get("force", "false").lower() == "false" for e in applies)
    assert all(e["responseStatus"]["code"] == 409 for e in applies)
    assert conflict.value.conflicts == (FieldOwner("platform-admin", ".spec.maxReplicas"),)
    assert ".spec.maxReplicas (owned by 'platform-admin'); nothing was changed" in str(conflict.value)


def test_replicas_another_manager_updated_are_reported_and_left_alone(kube, kube_cluster, kube_namespace) -> None:
    release(kube, kube_namespace, "0123abc", replicas=2)
    # Someone's Update (not an apply) of the replica count, as a controller scaling it writes it.
    kube_cluster.dynamic().resources.get(api_version="apps/v1", kind="Deployment").patch(
        body={"spec": {"replicas": 3}}, name="onto-backend", namespace=kube_namespace,
        content_type="application/merge-patch+json", field_manager="hpa-controller")

    with pytest.raises(PlaybookRefused) as refused:
        run_playbook("scale_workload", ctx(kube), app_labels(kube_namespace))

    assert ".spec.replicas is owned by field manager 'hpa-controller'" in str(refused.value)
    assert "rather than take it from hpa-controller" in str(refused.value)
    assert live_deployment(kube_cluster, kube_namespace)["spec"]["replicas"] == 3


def test_rollback_returns_to_the_previous_replicaset(kube, kube_cluster, kube_namespace, kubelet) -> None:
    kubelet.run(kube_namespace, APP, "ready")
    release(kube, kube_namespace, "0123abc")
    wait_for_revision(kube_cluster, kube_namespace, "1")
    first_rs = {rs["metadata"]["name"] for rs in kube_cluster.list_objects("apps/v1", "ReplicaSet", kube_namespace)}
    release(kube, kube_namespace, "4567def")
    wait_for_revision(kube_cluster, kube_namespace, "2")
    wait_for_rollout(kube_cluster, kube_namespace, 2)

    result = run_playbook("rollback_deployment", ctx(kube, allowed=[kube_namespace]), app_labels(kube_namespace))

    live = wait_for_revision(kube_cluster, kube_namespace, "3")
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == f"{IMAGE}:0123abc"
    assert "pod-template-hash" not in live["spec"]["template"]["metadata"]["labels"]
    assert result.after["replicaset"] in first_rs and result.after["revision"] == "1"
    assert result.before == {"revision": "2", "images": [f"{IMAGE}:4567def"]}
    wait_for_rollout(kube_cluster, kube_namespace, 2)
    replicasets = {rs["metadata"]["name"] for rs in kube_cluster.list_objects("apps/v1", "ReplicaSet", kube_namespace)}
    assert first_rs < replicasets and len(replicasets) == 2, "the old ReplicaSet is re-adopted, no third one"


def test_rollback_without_an_older_revision_is_refused(kube, kube_cluster, kube_namespace) -> None:
    release(kube, kube_namespace, "0123abc")
    wait_for_revision(kube_cluster, kube_namespace, "1")
    with pytest.raises(PlaybookRefused, match="no ReplicaSet older than revision 1"):
        run_playbook("rollback_deployment", ctx(kube), app_labels(kube_namespace))


def test_expand_pvc_grows_the_claim_its_statefulset_made(kube, kube_namespace, storage) -> None:
    storage.put(expandable=True, size="10Gi")
    result = run_playbook("expand_pvc", ctx(kube, allowed=[kube_namespace, "logging"]), pvc_labels(kube_namespace))
    assert storage.request() == "12Gi"
    assert (result.before["storage"], result.after["storage"], result.changed) == ("10Gi", "12Gi", True)
    assert "took over .spec.resources.requests.storage from 'kube-controller-manager'" in result.summary
    run_playbook("expand_pvc", ctx(kube), pvc_labels(kube_namespace), step_percent=1)
    assert storage.request() == "13Gi", "at least min_step (1Gi)"


def test_expand_pvc_is_capped_at_the_limit(kube, kube_cluster, kube_namespace, storage) -> None:
    storage.put(expandable=True, size="900Gi")
    result = run_playbook("expand_pvc", ctx(kube), pvc_labels(kube_namespace))
    assert storage.request() == "1Ti" and "capped at the limit 1Ti" in result.summary
    mark = kube_cluster.audit_mark()
    result = run_playbook("expand_pvc", ctx(kube), pvc_labels(kube_namespace))
    assert not result.changed and "already at the limit" in result.summary
    assert writes_since(kube_cluster, mark) == []


@pytest.mark.parametrize("expandable", [False, None])
def test_expand_pvc_refuses_a_class_without_expansion(expandable, kube, kube_cluster, kube_namespace,
                                                      storage) -> None:
    storage.put(expandable=expandable)
    mark = kube_cluster.audit_mark()
    with pytest.raises(PlaybookRefused, match=f"StorageClass '{storage.class_name}' of PersistentVolumeClaim "
                                              f"{kube_namespace}/data-pg-0 does not allow volume expansion"):
        run_playbook("expand_pvc", ctx(kube), pvc_labels(kube_namespace))
    assert storage.request() == "10Gi" and writes_since(kube_cluster, mark) == []


def test_expand_pvc_refuses_a_garbled_limit(kube, kube_cluster, kube_namespace) -> None:
    mark = kube_cluster.audit_mark()
    with pytest.raises(PlaybookRefused, match="not a Kubernetes quantity: '1 TB' .*min_step / limit"):
        run_playbook("expand_pvc", ctx(kube), pvc_labels(kube_namespace), limit="1 TB")
    assert kube_cluster.audit_events_since(mark) == []


@pytest.mark.parametrize(("quantity", "size", "formatted"), [
    ("10Gi", 10 * 1024**3, "10Gi"), ("1.5Ti", 1536 * 1024**3, "1536Gi"), ("500M", 500_000_000, "500000000"),
    ("1e3", 1000, "1000"), ("512Mi", 512 * 1024**2, "512Mi"), ("2048", 2048, "2Ki"),
])
def test_quantities(quantity: str, size: int, formatted: str) -> None:
    assert parse_quantity(quantity) == size
    assert format_quantity(size) == formatted


def test_a_garbled_quantity_is_not_read() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity: 'lots'"):
        parse_quantity("lots")


def test_renew_certificate_triggers_cert_manager(tls_ca, kube, kube_cluster, kube_crds, kube_namespace) -> None:
    intermediate = tls_ca.intermediate()
    old = intermediate.issue(["onto.test"], days=5)
    kube_cluster.put_object({"apiVersion": CM, "kind": "Certificate",
                             "metadata": {"name": "onto", "namespace": kube_namespace},
                             "spec": {"secretName": "onto-tls", "dnsNames": ["onto.test"],
                                      "issuerRef": {"kind": "ClusterIssuer", "name": "platform-ca"}}})
    kube_cluster.set_status(CM, "Certificate", "onto", kube_namespace, {
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                        "message": "Certificate is up to date and has not expired",
                        "lastTransitionTime": rfc3339(datetime.now(UTC) - timedelta(days=85)),
                        "observedGeneration": 1}],
        "revision": 1, "notAfter": rfc3339(old.certificate.not_valid_after_utc)})
    kube_cluster.put_object(old.tls_secret(kube_namespace, "onto-tls"))
    new = intermediate.issue(["onto.test"], days=90)
    labels = {"namespace": kube_namespace, "name": "onto"}
    mark = kube_cluster.audit_mark()

    dry = run_playbook("renew_certificate", ctx(kube, dry_run=True, allowed=[kube_namespace]), labels,
                       trust_roots=[])
    assert not dry.changed and dry.after["action"] == "would renew"
    assert writes_since(kube_cluster, mark) == []

    thread, seen = play_cert_manager(kube_cluster, kube_namespace, "onto", new)
    result = run_playbook("renew_certificate", PlaybookContext(kube, allowed_namespaces=[kube_namespace]), labels,
                          trust_roots=[], wait_timeout=5, poll_interval=0.05)
    thread.join(timeout=5)
    assert seen["issuing"]["reason"] == "ManuallyTriggered"
    assert result.changed and (result.before["revision"], result.after["revision"]) == (1, 2)
    assert result.after["fingerprint"] == new.fingerprint and result.before["fingerprint"] == old.fingerprint
    assert kube_cluster.get_object(CM, "Certificate", "onto", kube_namespace)["status"]["revision"] == 2
    [triggered] = logged_writes(kube_cluster, mark, 1)
    assert triggered["objectRef"]["subresource"] == "status" and triggered["verb"] == "patch"

    with pytest.raises(PlaybookRefused, match=f"no cert-manager Certificate {kube_namespace}/other"):
        run_playbook("renew_certificate", ctx(kube), {"namespace": kube_namespace, "name": "other"},
                     trust_roots=[])


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
