"""A small cluster through the fake Kubernetes API: collect the evidence, evaluate, check the report."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from ops_platform.compliance.controls import CATALOGUE
from ops_platform.compliance.evidence import collect_cluster_evidence
from ops_platform.compliance.exceptions import parse_exceptions
from ops_platform.compliance.report import evaluate
from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers import free_port
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesError, KubernetesResource
from tests.fakes.kube_api import KubeApiServer
from tests.test_compliance_controls import (
    CONFIG,
    REGISTRY,
    apiserver_pod,
    cluster_admin_binding,
    default_deny,
    deployment,
    hpa,
    ingress_of,
    limit_range,
    namespace,
    pdb,
    peer_authentication,
    quota,
    role,
    secure_container,
)

NOW = datetime(2026, 5, 4, 7, 0, tzinfo=UTC)


def crd(group: str, kind: str, plural: str, version: str, scope: str = "Namespaced") -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {"group": group, "scope": scope, "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                 "versions": [{"name": version, "served": True, "storage": True, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object"}}}]},
    }


def constraint_template(kind: str) -> dict[str, Any]:
    return {"apiVersion": "templates.gatekeeper.sh/v1", "kind": "ConstraintTemplate",
            "metadata": {"name": kind.lower()},
            "spec": {"crd": {"spec": {"names": {"kind": kind}}},
                     "targets": [{"target": "admission.k8s.gatekeeper.sh", "rego": "package x"}]}}


@pytest.fixture
def kube(kubeconfig_path) -> KubernetesClient:
    return KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake", request_timeout=5).get_client()


def install_istio(kube: KubernetesClient) -> None:
    kube.apply(crd("security.istio.io", "PeerAuthentication", "peerauthentications", "v1"))


def install_gatekeeper(kube: KubernetesClient, kube_api: KubeApiServer, violations: dict[str, int]) -> None:
    kube.apply(crd("templates.gatekeeper.sh", "ConstraintTemplate", "constrainttemplates", "v1", "Cluster"))
    for kind, total in violations.items():
        kube.apply(constraint_template(kind))
        kube.apply(crd("constraints.gatekeeper.sh", kind, kind.lower(), "v1beta1", "Cluster"))
        kube.apply({"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": kind,
                    "metadata": {"name": f"{kind.lower()}-all"}, "spec": {"enforcementAction": "deny"}})
        listed = [{"kind": "Pod", "namespace": "ontology-editor", "name": f"p{i}", "message": "no"}
                  for i in range(min(total, 20))]
        kube_api.set_status("constraints.gatekeeper.sh/v1beta1", kind.lower(), f"{kind.lower()}-all", None,
                            {"auditTimestamp": "2026-05-04T06:00:00Z", "totalViolations": total,
                             "violations": listed})


def build_cluster(kube: KubernetesClient) -> None:
    """Two app namespaces: ontology-editor is compliant, data is not; monitoring is a platform namespace."""
    for ns in (namespace("ontology-editor"), namespace("data"), namespace("monitoring", app=False)):
        kube.apply(ns)
    for obj in (
        default_deny("ontology-editor"), quota("ontology-editor"), limit_range("ontology-editor"),
        deployment("onto-backend"), pdb("onto-backend", "ontology-editor", {"matchLabels": {"app": "onto-backend"}}),
        hpa("onto-backend", "ontology-editor", "onto-backend"),
        ingress_of("onto", ["onto.company.com"], ["onto.company.com"]),
        role("reader", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]),
        cluster_admin_binding("break-glass", [{"kind": "Group", "name": "ops-platform:break-glass"}]),
        # data: no default deny, quota or limits; a root container from Docker Hub on :latest; plain HTTP.
        deployment("cache", ns="data", containers=[{"name": "redis", "image": "redis:latest"}]),
        ingress_of("admin", ["admin.company.com"], None, ns="data"),
        role("sloppy", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], ns="data"),
        cluster_admin_binding("ci", [{"kind": "ServiceAccount", "name": "deployer", "namespace": "data"}]),
        # monitoring is no app namespace: its upstream workloads are not judged.
        deployment("prometheus", ns="monitoring", containers=[{"name": "p", "image": "quay.io/prometheus:v2"}]),
        apiserver_pod("kube-apiserver-node1", ["--audit-policy-file=/etc/audit.yaml", "--audit-log-path=-"]),
    ):
        kube.apply(obj)


def test_whole_cluster_scores_and_findings(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    install_istio(kube)
    install_gatekeeper(kube, kube_api, {"K8sRequiredLabels": 0, "K8sAllowedRepos": 57})
    build_cluster(kube)
    kube.apply(namespace("istio-system", app=False))
    kube.apply(peer_authentication("default", "istio-system", "STRICT"))
    kube.apply(peer_authentication("cache", "data", "UNSET", selector={"app": "cache"}))

    evidence = collect_cluster_evidence(kube)
    assert evidence.not_installed == {}
    assert evidence.source == f"cluster {kube_api.url}"
    assert {d["metadata"]["name"] for d in evidence.of("Deployment")} == {"onto-backend", "cache", "prometheus"}
    assert all(d["kind"] == "Deployment" and d["apiVersion"] == "apps/v1" for d in evidence.of("Deployment"))
    assert [p["metadata"]["name"] for p in evidence.of("Pod")] == ["kube-apiserver-node1"]

    exceptions = parse_exceptions(
        [{"control": "OPS-IMG-*", "object": "Deployment data/cache", "owner": "team:data",
          "justification": "upstream redis until the ECR mirror lands", "expires": "2026-06-30"}],
        "exceptions.yaml",
    )
    report = evaluate(evidence, CATALOGUE, exceptions, now=NOW, config=CONFIG)

    scores = {result.control.id: result.score for result in report.results}
    assert scores["OPS-NET-001"] == 0.5
    assert scores["OPS-QUOTA-001"] == scores["OPS-QUOTA-002"] == 0.5
    assert scores["OPS-WL-001"] == 0.5 and scores["OPS-WL-004"] == 0.5
    assert scores["OPS-IMG-001"] == scores["OPS-IMG-002"] == 1.0  # excepted
    assert report.result("OPS-IMG-002").excepted == 1
    assert scores["OPS-AVAIL-001"] == scores["OPS-AVAIL-002"] == 0.5
    assert scores["OPS-ING-001"] == 0.5
    assert scores["OPS-RBAC-001"] == scores["OPS-RBAC-002"] == 0.5
    assert scores["OPS-NET-002"] == 1.0 and scores["OPS-AUDIT-001"] == 1.0 and scores["OPS-GK-001"] == 1.0
    assert scores["OPS-GK-002"] == 0.5
    assert "OPS-BACKUP-001" not in scores  # no graph evidence given

    open_errors = {(f.control_id, f.object): f.message for f in report.open_findings("ERROR")}
    assert open_errors[("OPS-GK-002", "K8sAllowedRepos k8sallowedrepos-all")].startswith("57 violation(s)")
    assert ("OPS-WL-001", "Deployment data/cache") in open_errors
    assert ("OPS-RBAC-002", "ClusterRoleBinding ci") in open_errors
    no_deny = "no NetworkPolicy denies all ingress to the namespace's pods"
    assert open_errors[("OPS-NET-001", "Namespace data")] == no_deny
    assert not [f for f in report.open_findings() if "monitoring" in f.object]

    as_json = json.loads(report.to_json())
    assert as_json["overall_score"] == pytest.approx(report.overall_score)
    assert as_json["summary"]["open_by_severity"]["ERROR"] == len(open_errors)


def test_missing_crds_are_reported_not_a_crash(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    build_cluster(kube)
    evidence = collect_cluster_evidence(kube)
    assert set(evidence.not_installed) == {"PeerAuthentication", "ConstraintTemplate"}

    report = evaluate(evidence, CATALOGUE, now=NOW, config=CONFIG)
    gatekeeper = report.result("OPS-GK-001")
    assert [(f.object, f.passed) for f in gatekeeper.findings] == [("Cluster gatekeeper", False)]
    assert "Gatekeeper is not installed" in gatekeeper.findings[0].message
    assert report.result("OPS-GK-002").score is None
    assert "ConstraintTemplate" in (report.result("OPS-GK-002").note or "")
    mtls = report.result("OPS-NET-002")
    assert "Istio is not installed" in mtls.findings[0].message and not mtls.findings[0].passed


def test_older_served_version_is_used(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    kube.apply(crd("security.istio.io", "PeerAuthentication", "peerauthentications", "v1beta1"))
    kube.apply(namespace("istio-system", app=False))
    kube.apply(peer_authentication("default", "istio-system", "STRICT") | {"apiVersion": "security.istio.io/v1beta1"})
    evidence = collect_cluster_evidence(kube, ["PeerAuthentication"])
    assert [p["apiVersion"] for p in evidence.of("PeerAuthentication")] == ["security.istio.io/v1beta1"]
    report = evaluate(evidence, CATALOGUE, now=NOW, config=CONFIG)
    assert [(f.object, f.passed) for f in report.result("OPS-NET-002").findings] == [
        ("PeerAuthentication istio-system/default", True)]


def test_template_whose_constraint_kind_is_not_served(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    kube.apply(crd("templates.gatekeeper.sh", "ConstraintTemplate", "constrainttemplates", "v1", "Cluster"))
    kube.apply(constraint_template("K8sBlockNodePort"))
    evidence = collect_cluster_evidence(kube, ["ConstraintTemplate", "Constraint"])
    assert "K8sBlockNodePort" in evidence.not_installed
    report = evaluate(evidence, CATALOGUE, now=NOW, config=CONFIG)
    assert not report.result("OPS-GK-001").findings[0].passed


def test_refused_listing_is_an_error_not_a_missing_kind(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    kube_api.fail_next("GET", r"/clusterrolebindings", 403, message="clusterrolebindings is forbidden")
    with pytest.raises(KubernetesError, match="refused \\(403.*RBAC"):
        collect_cluster_evidence(kube)


def test_api_server_down_names_host_and_setting(tmp_path, kube_api: KubeApiServer) -> None:
    config = kube_api.kubeconfig("t", "down")
    port = free_port()
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    client = KubernetesResource(kubeconfig=str(path), context="down", request_timeout=2).get_client()
    with pytest.raises(ServerUnreachableError, match=f"127.0.0.1:{port}.*KUBECONFIG"):
        collect_cluster_evidence(client)


def test_images_of_the_registry_pass_through_the_cluster(kube: KubernetesClient, kube_api: KubeApiServer) -> None:
    kube.apply(namespace("ontology-editor"))
    kube.apply(deployment("digest", containers=[secure_container(image=f"{REGISTRY}x@sha256:{'c' * 64}")]))
    evidence = collect_cluster_evidence(kube, ["Namespace", "Deployment"])
    report = evaluate(evidence, CATALOGUE, now=NOW, config=CONFIG)
    assert report.result("OPS-IMG-001").score == report.result("OPS-IMG-002").score == 1.0
