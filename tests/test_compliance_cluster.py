"""Compliance evidence read from a live cluster: the real API server, as the code location's identity.

The cluster is the session's kube-apiserver (tests/fixtures/kube_server.py)
with the CRDs of infra/crds. What other teams and operators made (the app
namespaces, the governance layer's ConstraintTemplates, constraints of their
kinds) is put there as admin; Gatekeeper's audit controller is not running, so
the test stands in for it by writing the constraints' status. The server holds
other tests' objects and its own bootstrap policy too, so the assertions name
this test's objects (see :class:`Cluster`), and a few are about what only a
real server has: the bootstrap RBAC, list items without apiVersion and kind.

The 1.20 server serves no policy/v1 PodDisruptionBudget, autoscaling/v2
HorizontalPodAutoscaler or batch/v1 CronJob: those objects are made in the
older versions it serves (as on an older cluster), which the collector falls
back to.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from ops_platform.compliance.controls import CATALOGUE, kinds_read_by
from ops_platform.compliance.evidence import collect_cluster_evidence
from ops_platform.compliance.exceptions import parse_exceptions
from ops_platform.compliance.model import ControlConfig
from ops_platform.compliance.report import evaluate
from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers import free_port
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesError, KubernetesResource
from tests.fixtures.kube_server import REPO_ROOT, KubeCluster
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
GOVERNANCE = REPO_ROOT / "infra" / "layers" / "governance"
TEMPLATE_API, CONSTRAINT_API = "templates.gatekeeper.sh/v1", "constraints.gatekeeper.sh/v1beta1"


@dataclass
class Cluster:
    """This test's objects on the shared server: namespaces and cluster-scoped names of its own, deleted after."""

    server: KubeCluster
    prefix: str
    made: list[tuple[str, str, str, str | None]] = field(default_factory=list)  # apiVersion, kind, name, namespace

    @property
    def onto(self) -> str:
        return f"{self.prefix}-onto"

    @property
    def data(self) -> str:
        return f"{self.prefix}-data"

    @property
    def monitoring(self) -> str:
        return f"{self.prefix}-monitoring"

    @property
    def istio(self) -> str:
        return f"{self.prefix}-istio"

    @property
    def config(self) -> ControlConfig:
        return ControlConfig(registries=CONFIG.registries, istio_root_namespace=self.istio)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Apply as admin; remember what to delete after: what is not in this test's namespaces and was not
        there before (the governance templates may be another test's)."""
        metadata = obj["metadata"]
        key = (obj["apiVersion"], obj["kind"], metadata["name"], metadata.get("namespace"))
        inside = obj["kind"] == "Namespace" or (metadata.get("namespace") or "").startswith(f"{self.prefix}-")
        if obj["kind"] == "Namespace" or (not inside and self.server.get_object(*key) is None):
            self.made.append(key)
        return self.server.put_object(obj)

    def clean_up(self) -> None:
        for key in reversed(self.made):
            self.server.delete_object(*key)


@pytest.fixture
def cluster(kube_cluster: KubeCluster, kube_crds: list[str]) -> Iterator[Cluster]:
    made = Cluster(kube_cluster, f"k{uuid.uuid4().hex[:6]}")
    yield made
    made.clean_up()


@pytest.fixture
def kube(kube_cluster: KubeCluster, tmp_path: Path) -> Iterator[KubernetesClient]:
    path = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform")
    client = KubernetesResource(kubeconfig=str(path), request_timeout=10).get_client()
    yield client
    client.api_client.close()


def in_namespace(obj: dict[str, Any], ns: str) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "namespace": ns}}


def routed(ingress: dict[str, Any]) -> dict[str, Any]:
    """The Ingress with a path to a backend on each rule, as the API server requires of an http rule."""
    path = {"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": ingress["metadata"]["name"], "port": {"number": 80}}}}
    rules = [{**rule, "http": {"paths": [path]}} for rule in ingress["spec"]["rules"]]
    return {**ingress, "spec": {**ingress["spec"], "rules": rules}}


def build_cluster(c: Cluster) -> None:
    """Two app namespaces: onto is compliant, data is not; monitoring is a platform namespace."""
    for ns in (namespace(c.onto), namespace(c.data), namespace(c.monitoring, app=False)):
        c.put(ns)
    for obj in (
        default_deny(c.onto), quota(c.onto), limit_range(c.onto),
        deployment("onto-backend", ns=c.onto),
        pdb("onto-backend", c.onto, {"matchLabels": {"app": "onto-backend"}}) | {"apiVersion": "policy/v1beta1"},
        hpa("onto-backend", c.onto, "onto-backend") | {"apiVersion": "autoscaling/v2beta2"},
        routed(ingress_of("onto", ["onto.company.com"], ["onto.company.com"], ns=c.onto)),
        role("reader", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}], ns=c.onto),
        cluster_admin_binding(f"{c.prefix}-break-glass", [{"kind": "Group", "name": "ops-platform:break-glass"}]),
        # data: no default deny, quota or limits; a root container from Docker Hub on :latest; plain HTTP.
        deployment("cache", ns=c.data, containers=[{"name": "redis", "image": "redis:latest"}]),
        {"apiVersion": "batch/v1beta1", "kind": "CronJob", "metadata": {"name": "flush", "namespace": c.data},
         "spec": {"schedule": "0 4 * * *", "jobTemplate": {"spec": {"template": {"spec": {
             "restartPolicy": "Never", "containers": [{"name": "flush", "image": "redis:latest"}]}}}}}},
        routed(ingress_of("admin", ["admin.company.com"], None, ns=c.data)),
        role("sloppy", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], ns=c.data),
        cluster_admin_binding(f"{c.prefix}-ci", [{"kind": "ServiceAccount", "name": "deployer", "namespace": c.data}]),
        # monitoring is no app namespace: its upstream workloads are not judged.
        deployment("prometheus", ns=c.monitoring, containers=[{"name": "p", "image": "quay.io/prometheus:v2"}]),
        apiserver_pod(f"kube-apiserver-{c.prefix}", ["--audit-policy-file=/etc/audit.yaml", "--audit-log-path=-"]),
    ):
        c.put(obj)


def install_governance(c: Cluster, violations: dict[str, int]) -> list[dict[str, Any]]:
    """The governance layer's ConstraintTemplates, and a constraint of each kind in ``violations`` with what
    Gatekeeper's audit would report for it (its totalViolations).

    The constraint kinds are served by the CRDs of infra/crds/constraints.gatekeeper.sh (what Gatekeeper
    generates from the templates). The constraints are this test's own, matching Deployments: the shipped ones
    match Pods (``apiGroups: [""]``), and the test server refuses an empty string in a custom object's string
    list as null (its build decodes it so; a released 1.20 accepts it).
    """
    for template in yaml.safe_load_all((GOVERNANCE / "constraint-templates.yaml").read_text()):
        if template:
            c.put(template)
    constraints = []
    for kind, total in violations.items():
        constraint = {"apiVersion": CONSTRAINT_API, "kind": kind,
                      "metadata": {"name": f"{c.prefix}-{kind.lower()}"},
                      "spec": {"enforcementAction": "deny",
                               "match": {"kinds": [{"apiGroups": ["apps"], "kinds": ["Deployment"]}]}}}
        c.put(constraint)
        listed = [{"kind": "Deployment", "namespace": c.data, "name": f"d{i}", "message": "no"}
                  for i in range(min(total, 20))]
        c.server.set_status(CONSTRAINT_API, kind, constraint["metadata"]["name"], None,
                            {"auditTimestamp": "2026-05-04T06:00:00Z", "totalViolations": total,
                             "violations": listed})
        constraints.append(constraint)
    return constraints


def verdicts(report, control_id: str, c: Cluster) -> dict[str, bool]:
    """This test's objects as the control judged them."""
    return {f.object: f.passed for f in report.result(control_id).findings if c.prefix in f.object}


def test_cluster_evidence_and_findings_on_the_real_server(kube: KubernetesClient, cluster: Cluster) -> None:
    constraints = install_governance(cluster, {"K8sAllowedRepos": 57, "K8sRequiredLabels": 0})
    build_cluster(cluster)
    cluster.put(namespace(cluster.istio, app=False))
    cluster.put(peer_authentication("default", cluster.istio, "STRICT"))
    cluster.put(peer_authentication("cache", cluster.data, "UNSET", selector={"app": "cache"}))

    evidence = collect_cluster_evidence(kube)

    governance_kinds = {doc["spec"]["crd"]["spec"]["names"]["kind"] for doc in yaml.safe_load_all(
        (GOVERNANCE / "constraint-templates.yaml").read_text()) if doc}
    assert not set(evidence.not_installed) & (set(kinds_read_by(CATALOGUE)) | governance_kinds)
    assert {(obj["kind"], obj["apiVersion"]) for obj in evidence.of("PodDisruptionBudget", "HorizontalPodAutoscaler",
                                                                    "CronJob")} == {
        ("PodDisruptionBudget", "policy/v1beta1"), ("HorizontalPodAutoscaler", "autoscaling/v2beta2"),
        ("CronJob", "batch/v1beta1")}
    assert evidence.source == f"cluster {cluster.server.url}"
    deployments = {d["metadata"]["name"] for d in evidence.of("Deployment")
                   if d["metadata"]["namespace"].startswith(cluster.prefix)}
    assert deployments == {"onto-backend", "cache", "prometheus"}
    assert all(d["kind"] == "Deployment" and d["apiVersion"] == "apps/v1" for d in evidence.of("Deployment"))
    assert f"kube-apiserver-{cluster.prefix}" in [p["metadata"]["name"] for p in evidence.of("Pod")]
    assert {(obj["kind"], obj["metadata"]["name"]) for obj in evidence.constraints()} >= {
        (doc["kind"], doc["metadata"]["name"]) for doc in constraints}

    exceptions = parse_exceptions(
        [{"control": "OPS-IMG-*", "object": f"Deployment {cluster.data}/cache", "owner": "team:data",
          "justification": "upstream redis until the ECR mirror lands", "expires": "2026-06-30"}],
        "exceptions.yaml",
    )
    report = evaluate(evidence, CATALOGUE, exceptions, now=NOW, config=cluster.config)

    onto, data = cluster.onto, cluster.data
    assert verdicts(report, "OPS-NET-001", cluster) == {f"Namespace {onto}": True, f"Namespace {data}": False}
    assert verdicts(report, "OPS-QUOTA-001", cluster) == {f"Namespace {onto}": True, f"Namespace {data}": False}
    assert verdicts(report, "OPS-QUOTA-002", cluster) == {f"Namespace {onto}": True, f"Namespace {data}": False}
    assert verdicts(report, "OPS-WL-001", cluster) == {f"Deployment {onto}/onto-backend": True,
                                                       f"Deployment {data}/cache": False,
                                                       f"CronJob {data}/flush": False}
    for control_id in ("OPS-AVAIL-001", "OPS-AVAIL-002"):
        assert verdicts(report, control_id, cluster) == {f"Deployment {onto}/onto-backend": True,
                                                         f"Deployment {data}/cache": False}, control_id
    assert {f.object: (f.passed, f.excepted_by is not None) for f in report.result("OPS-IMG-002").findings
            if cluster.prefix in f.object} == {f"Deployment {onto}/onto-backend": (True, False),
                                               f"Deployment {data}/cache": (False, True),
                                               f"CronJob {data}/flush": (False, False)}
    assert verdicts(report, "OPS-ING-001", cluster) == {f"Ingress {onto}/onto": True, f"Ingress {data}/admin": False}
    assert verdicts(report, "OPS-RBAC-001", cluster) == {f"Role {onto}/reader": True, f"Role {data}/sloppy": False}
    rbac_002 = verdicts(report, "OPS-RBAC-002", cluster)
    assert rbac_002[f"ClusterRoleBinding {cluster.prefix}-break-glass"] is True
    assert rbac_002[f"ClusterRoleBinding {cluster.prefix}-ci"] is False
    assert verdicts(report, "OPS-NET-002", cluster) == {f"PeerAuthentication {cluster.istio}/default": True,
                                                        f"PeerAuthentication {data}/cache": True}  # UNSET: inherits
    assert verdicts(report, "OPS-AUDIT-001", cluster) == {f"Pod kube-system/kube-apiserver-{cluster.prefix}": True}
    gatekeeper = {f.object: (f.passed, f.message) for f in report.result("OPS-GK-002").findings}
    assert gatekeeper[f"K8sAllowedRepos {cluster.prefix}-k8sallowedrepos"][0] is False
    assert gatekeeper[f"K8sAllowedRepos {cluster.prefix}-k8sallowedrepos"][1].startswith("57 violation(s)")
    assert all(gatekeeper[f"{doc['kind']} {doc['metadata']['name']}"][0] for doc in constraints
               if doc["kind"] != "K8sAllowedRepos")
    assert report.result("OPS-GK-001").score == 1.0
    assert "OPS-BACKUP-001" not in {result.control.id for result in report.results}  # no graph evidence given
    assert not [f for f in report.open_findings() if cluster.monitoring in f.object]

    # The server's own bootstrap policy (cluster-admin to system:masters, system:* roles with wildcards)
    # is the API server's, recreated at every start: never a finding.
    bootstrap = {f"{obj['kind']} {obj['metadata']['name']}"
                 for obj in evidence.of("ClusterRole", "ClusterRoleBinding")
                 if (obj["metadata"].get("labels") or {}).get("kubernetes.io/bootstrapping") == "rbac-defaults"}
    assert "ClusterRoleBinding cluster-admin" in bootstrap
    assert not [f for f in report.open_findings() if f.object in bootstrap]

    as_json = json.loads(report.to_json())
    assert as_json["overall_score"] == pytest.approx(report.overall_score)


def test_missing_crds_are_reported_not_a_crash(kube: KubernetesClient, cluster: Cluster) -> None:
    removed = cluster.server.remove_crds("peerauthentications.security.istio.io",
                                         "constrainttemplates.templates.gatekeeper.sh")
    try:
        evidence = collect_cluster_evidence(kube)
    finally:
        cluster.server.reinstall_crds(removed)
    assert {"PeerAuthentication", "ConstraintTemplate"} <= set(evidence.not_installed)
    assert "Constraint" not in evidence.not_installed and evidence.constraints() == []

    report = evaluate(evidence, CATALOGUE, now=NOW, config=cluster.config)
    gatekeeper = report.result("OPS-GK-001")
    assert [(f.object, f.passed) for f in gatekeeper.findings] == [("Cluster gatekeeper", False)]
    assert "Gatekeeper is not installed" in gatekeeper.findings[0].message
    assert report.result("OPS-GK-002").score is None
    assert "ConstraintTemplate" in (report.result("OPS-GK-002").note or "")
    mtls = report.result("OPS-NET-002")
    assert "Istio is not installed" in mtls.findings[0].message and not mtls.findings[0].passed


def test_older_served_version_is_used(kube: KubernetesClient, cluster: Cluster) -> None:
    """A cluster whose Istio serves PeerAuthentication in v1beta1 only (Istio before 1.22)."""
    removed = cluster.server.remove_crds("peerauthentications.security.istio.io")
    try:
        [installed] = removed
        older = {**installed["spec"], "versions": [
            {**version, "storage": True} for version in installed["spec"]["versions"] if version["name"] == "v1beta1"]}
        cluster.server.reinstall_crds([{**installed, "spec": older}])
        cluster.put(namespace(cluster.istio, app=False))
        cluster.put(peer_authentication("default", cluster.istio, "STRICT")
                    | {"apiVersion": "security.istio.io/v1beta1"})
        evidence = collect_cluster_evidence(kube, ["PeerAuthentication"])
        cluster.server.remove_crds("peerauthentications.security.istio.io")
    finally:
        cluster.server.reinstall_crds(removed)
    assert {p["apiVersion"] for p in evidence.of("PeerAuthentication")} == {"security.istio.io/v1beta1"}
    report = evaluate(evidence, CATALOGUE, now=NOW, config=cluster.config)
    assert verdicts(report, "OPS-NET-002", cluster) == {f"PeerAuthentication {cluster.istio}/default": True}


def test_template_whose_constraint_kind_is_not_served(kube: KubernetesClient, cluster: Cluster) -> None:
    """A ConstraintTemplate Gatekeeper has not made a CRD for (its status would say created: false)."""
    kind = f"K8sBlockNodePort{cluster.prefix.capitalize()}"
    cluster.put({"apiVersion": TEMPLATE_API, "kind": "ConstraintTemplate", "metadata": {"name": kind.lower()},
                 "spec": {"crd": {"spec": {"names": {"kind": kind}}},
                          "targets": [{"target": "admission.k8s.gatekeeper.sh", "rego": "package x"}]}})
    evidence = collect_cluster_evidence(kube, ["ConstraintTemplate", "Constraint"])
    assert kind in evidence.not_installed and "is the template's status created: true?" in evidence.not_installed[kind]
    report = evaluate(evidence, CATALOGUE, now=NOW, config=cluster.config)
    assert report.result("OPS-GK-001").findings


def test_refused_listing_is_an_error_not_a_missing_kind(kube_cluster: KubeCluster, kube_namespace: str,
                                                        tmp_path: Path) -> None:
    """An identity RBAC grants nothing: the first listing is refused (403), and that is an error."""
    admin = k8s.CoreV1Api(kube_cluster.admin_client())
    admin.create_namespaced_service_account(kube_namespace, k8s.V1ServiceAccount(
        metadata=k8s.V1ObjectMeta(name="nobody")))
    token = admin.create_namespaced_service_account_token("nobody", kube_namespace, k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(audiences=["https://kubernetes.default.svc.cluster.local"],
                                    expiration_seconds=3600))).status.token
    config = kube_cluster.kubeconfig("ops-platform")
    config["users"][0]["user"]["token"] = token
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    nobody = KubernetesResource(kubeconfig=str(path), request_timeout=5).get_client()
    try:
        with pytest.raises(KubernetesError, match=r"refused \(403.*RBAC"):
            collect_cluster_evidence(nobody)
    finally:
        nobody.api_client.close()


def test_api_server_down_names_host_and_setting(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "down",
        "clusters": [{"name": "down", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "down", "context": {"cluster": "down", "user": "down"}}],
    }))
    client = KubernetesResource(kubeconfig=str(path), context="down", request_timeout=2).get_client()
    with pytest.raises(ServerUnreachableError, match=f"127.0.0.1:{port}.*KUBECONFIG"):
        collect_cluster_evidence(client)


def test_images_of_the_registry_pass_through_the_cluster(kube: KubernetesClient, cluster: Cluster) -> None:
    cluster.put(namespace(cluster.onto))
    cluster.put(deployment("digest", ns=cluster.onto,
                           containers=[secure_container(image=f"{REGISTRY}x@sha256:{'c' * 64}")]))
    evidence = collect_cluster_evidence(kube, ["Namespace", "Deployment"])
    report = evaluate(evidence, CATALOGUE, now=NOW, config=cluster.config)
    for control_id in ("OPS-IMG-001", "OPS-IMG-002"):
        assert verdicts(report, control_id, cluster) == {f"Deployment {cluster.onto}/digest": True}, control_id
