"""What the live-cluster collector lists for the pod controls, on the real API server as the code location.

The objects are made as admin (as the teams' releases and the controllers
would); the collector reads as the ServiceAccount ops-platform, with the RBAC
of infra/dagster/rbac.yaml. The controller-manager of the test cluster makes
the ReplicaSets of Deployments and the Pods of ReplicaSets; no Pod runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ops_platform.compliance.controls import CATALOGUE, kinds_read_by
from ops_platform.compliance.controls.workloads import no_naked_pods, no_service_account_token
from ops_platform.compliance.evidence import Evidence, collect_cluster_evidence, namespace_of
from ops_platform.compliance.model import ControlConfig
from ops_platform.compliance.report import evaluate
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from tests.fixtures.kube_server import KubeCluster

NOW = datetime(2026, 5, 4, 7, 0, tzinfo=UTC)
KINDS = kinds_read_by([no_service_account_token, no_naked_pods])
CONTAINERS = [{"name": "app", "image": "registry.example/app:1"}]


@pytest.fixture
def kube(kube_cluster: KubeCluster, tmp_path: Path) -> Iterator[KubernetesClient]:
    path = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform")
    client = KubernetesResource(kubeconfig=str(path), request_timeout=10).get_client()
    yield client
    client.api_client.close()


def pod_template(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"labels": {"app": name}}, "spec": {"containers": CONTAINERS, **spec}}


def workloads(ns: str) -> list[dict[str, Any]]:
    """A ServiceAccount that mounts no token; a naked Pod and a ReplicaSet no Deployment owns, both using it;
    a Deployment on the default ServiceAccount."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "quiet", "namespace": ns},
         "automountServiceAccountToken": False},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "naked", "namespace": ns},
         "spec": {"serviceAccountName": "quiet", "containers": CONTAINERS}},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "orphan", "namespace": ns},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "orphan"}},
                  "template": pod_template("orphan", serviceAccountName="quiet")}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "served", "namespace": ns},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "served"}}, "template": pod_template("served")}},
    ]


def owned_pods(kube_cluster: KubeCluster, ns: str) -> list[str] | None:
    """The names of the Pods the ReplicaSets made, once there is one for each."""
    names = sorted(pod["metadata"]["name"] for pod in kube_cluster.list_objects("v1", "Pod", ns)
                   if pod["metadata"].get("ownerReferences"))
    return names if len(names) == 2 else None


def verdicts(evidence: Evidence, config: ControlConfig, control_id: str, ns: str) -> dict[str, tuple[bool, str]]:
    report = evaluate(evidence, CATALOGUE, now=NOW, config=config)
    return {f.object: (f.passed, f.message) for f in report.result(control_id).findings if f" {ns}/" in f.object}


def test_pod_controls_see_service_accounts_replica_sets_and_the_app_namespaces_pods(
    kube_cluster: KubeCluster, kube_namespace: str, kube: KubernetesClient
) -> None:
    ns = kube_namespace
    for obj in workloads(ns):
        kube_cluster.put_object(obj)
    owned = kube_cluster.wait_for("the Pods of both ReplicaSets", lambda: owned_pods(kube_cluster, ns))
    config = ControlConfig(app_namespaces=(ns,))

    evidence = collect_cluster_evidence(kube, KINDS, config=config)
    # Other tests' app namespaces (labelled so) share the session's server: only app namespaces and kube-system.
    listed = {namespace_of(pod) for pod in evidence.of("Pod")}
    assert ns in listed
    assert listed <= set(evidence.app_namespaces(config)) | {ns, "kube-system"}, "other namespaces' Pods"
    assert [pod["metadata"]["name"] for pod in evidence.of("Pod") if namespace_of(pod) == ns] == sorted(
        ["naked", *owned])

    tokens = verdicts(evidence, config, "OPS-WL-007", ns)
    assert tokens == {
        f"Pod {ns}/naked": (True, "no ServiceAccount token mounted"),
        f"ReplicaSet {ns}/orphan": (True, "no ServiceAccount token mounted"),
        f"Deployment {ns}/served": (False, (
            "the token of ServiceAccount default is mounted (automountServiceAccountToken set on neither the pod "
            "nor the ServiceAccount)")),
    }, "the Pods and the ReplicaSet a controller owns are judged through their owner"

    naked = verdicts(evidence, config, "OPS-WL-010", ns)
    assert naked.pop(f"Pod {ns}/naked") == (False, "no ownerReferences: nothing recreates it")
    assert set(naked) == {f"Pod {ns}/{name}" for name in owned}
    assert sorted(message.rsplit("-", 1)[0] for passed, message in naked.values() if passed) == [
        "owned by ReplicaSet orphan", "owned by ReplicaSet served"]


def test_the_app_namespace_label_chooses_where_pods_are_listed(
    kube_cluster: KubeCluster, kube_namespace: str, kube: KubernetesClient
) -> None:
    ns = kube_namespace
    kube_cluster.put_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "naked", "namespace": ns},
                             "spec": {"containers": CONTAINERS}})
    assert [pod for pod in collect_cluster_evidence(kube, ["Namespace", "Pod"]).of("Pod")
            if namespace_of(pod) == ns] == [], "not an app namespace: its Pods are not listed"

    kube_cluster.create_namespace(ns, {"ops-platform/app-namespace": "true"})
    evidence = collect_cluster_evidence(kube, ["Namespace", "Pod"])
    assert [pod["metadata"]["name"] for pod in evidence.of("Pod") if namespace_of(pod) == ns] == ["naked"]
    assert verdicts(evidence, ControlConfig(), "OPS-WL-010", ns) == {
        f"Pod {ns}/naked": (False, "no ownerReferences: nothing recreates it")}
