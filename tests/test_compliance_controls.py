"""Each compliance control on passing and failing objects.

The builders at the top make the objects as the API (or a manifest) holds
them; the other compliance test modules use them too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ops_platform.compliance.controls import CATALOGUE, audit, availability, gatekeeper, graph, images, ingress
from ops_platform.compliance.controls import kinds_read_by, network, quotas, rbac, workloads
from ops_platform.compliance.controls.index import selects
from ops_platform.compliance.evidence import (
    BackupEvidence,
    CertificateEvidence,
    Evidence,
    FailedRun,
    GraphEvidence,
    RestoreTestEvidence,
)
from ops_platform.compliance.model import Control, ControlConfig, Outcome

REGISTRY = "123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/"
SHA = "3f9a1c2"
CONFIG = ControlConfig(registries=(REGISTRY,))
NOW = datetime(2026, 5, 4, 7, 0, tzinfo=UTC)
Obj = dict[str, Any]


def namespace(name: str, *, app: bool = True) -> Obj:
    labels = {"ops-platform/app-namespace": "true", "pod-security.kubernetes.io/enforce": "restricted"} if app else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def secure_container(name: str = "app", image: str = f"{REGISTRY}onto-backend-prod:{SHA}", **overrides: Any) -> Obj:
    container = {
        "name": name,
        "image": image,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
    }
    container.update(overrides)
    return container


def deployment(name: str, ns: str = "ontology-editor", *, containers: list[Obj] | None = None,
               pod_security: Obj | None = None, labels: Obj | None = None) -> Obj:
    """Two replicas spread over zones, seccomp RuntimeDefault, no ServiceAccount token: compliant."""
    labels = labels or {"app": name}
    pod_spec: Obj = {
        "containers": containers if containers is not None else [secure_container()],
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, **(pod_security or {})},
        "automountServiceAccountToken": False,
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": labels}}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }


def network_policy(name: str, ns: str, spec: Obj) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def default_deny(ns: str, name: str = "default-deny") -> Obj:
    return network_policy(name, ns, {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})


def quota(ns: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "quota", "namespace": ns},
            "spec": {"hard": {"requests.cpu": "20", "pods": "100"}}}


def limit_range(ns: str, *, defaults: bool = True) -> Obj:
    limit: Obj = {"type": "Container"}
    if defaults:
        limit |= {"default": {"cpu": "500m", "memory": "512Mi"}, "defaultRequest": {"cpu": "100m", "memory": "128Mi"}}
    return {"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "limits", "namespace": ns},
            "spec": {"limits": [limit]}}


def pdb(name: str, ns: str, selector: Obj | None) -> Obj:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name, "namespace": ns},
            "spec": {"maxUnavailable": 1, "selector": selector}}


def hpa(name: str, ns: str, target: str, kind: str = "Deployment") -> Obj:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
                     "minReplicas": 2, "maxReplicas": 10}}


def role(name: str, rules: list[Obj], *, ns: str | None = "ontology-editor", labels: Obj | None = None) -> Obj:
    metadata: Obj = {"name": name, "labels": labels or {}}
    if ns:
        metadata["namespace"] = ns
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role" if ns else "ClusterRole",
            "metadata": metadata, "rules": rules}


def cluster_admin_binding(name: str, subjects: list[Obj], labels: Obj | None = None) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels or {}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": subjects}


def peer_authentication(name: str, ns: str, mode: str | None, *, selector: Obj | None = None,
                        ports: Obj | None = None) -> Obj:
    spec: Obj = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = ports
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ingress_of(name: str, hosts: list[str], tls_hosts: list[str] | None, ns: str = "ontology-editor") -> Obj:
    spec: Obj = {"rules": [{"host": host, "http": {"paths": []}} for host in hosts]}
    if tls_hosts is not None:
        spec["tls"] = [{"hosts": tls_hosts, "secretName": f"{name}-tls"}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def constraint(kind: str, name: str, *, total: int | None, listed: int = 0, action: str = "deny") -> Obj:
    status: Obj = {}
    if total is not None:
        status = {"auditTimestamp": "2026-05-04T06:00:00Z", "totalViolations": total,
                  "violations": [{"kind": "Pod", "namespace": "ontology-editor", "name": f"pod-{i}",
                                  "message": "missing label"} for i in range(listed)]}
    return {"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": kind, "metadata": {"name": name},
            "spec": {"enforcementAction": action}, "status": status}


def apiserver_pod(name: str, flags: list[str]) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "kube-system", "labels": {"component": "kube-apiserver"}},
            "spec": {"containers": [{"name": "kube-apiserver", "image": "registry.k8s.io/kube-apiserver:v1.31.0",
                                     "command": ["kube-apiserver", *flags]}]}}


def run(control: Control, *objects: Obj, config: ControlConfig = CONFIG, **facts: Any) -> dict[str, Outcome]:
    evidence = Evidence.from_objects(objects, **facts)
    assert control.check is not None
    return {outcome.object: outcome for outcome in control.check(evidence, config)}


def verdicts(outcomes: dict[str, Outcome]) -> dict[str, bool]:
    return {name: outcome.passed for name, outcome in outcomes.items()}


def test_the_catalogue_describes_every_control() -> None:
    ids = [control.id for control in CATALOGUE]
    assert len(ids) == len(set(ids)) >= 20
    for control in CATALOGUE:
        assert control.id.startswith("OPS-") and control.title and control.remediation
        assert control.severity in ("ERROR", "WARN", "INFO")
        assert "§" in control.requirement, control.id
        assert control.evidence <= {"cluster", "graph", "manifests"}
    assert {"Namespace", "Deployment", "ClusterRoleBinding", "PeerAuthentication", "ConstraintTemplate",
            "Constraint", "Pod"} <= set(kinds_read_by(CATALOGUE))


def test_rbac_wildcards_outside_admin_roles_fail() -> None:
    outcomes = run(
        rbac.no_wildcard_rules,
        role("reader", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]),
        role("sloppy", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}]),
        role("everything", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]}], ns=None),
        role("ops-platform:admin", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], ns=None),
        role("system:controller:gc", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]}], ns=None,
             labels={"kubernetes.io/bootstrapping": "rbac-defaults"}),
    )
    assert verdicts(outcomes) == {
        "Role ontology-editor/reader": True,
        "Role ontology-editor/sloppy": False,
        "ClusterRole everything": False,
    }
    assert outcomes["Role ontology-editor/sloppy"].message == "wildcard in rule 1 verbs"


def test_cluster_admin_only_for_break_glass_group() -> None:
    outcomes = run(
        rbac.cluster_admin_break_glass_only,
        cluster_admin_binding("break-glass", [{"kind": "Group", "name": "ops-platform:break-glass"}]),
        cluster_admin_binding("ci", [{"kind": "ServiceAccount", "name": "deployer", "namespace": "ci"},
                                     {"kind": "Group", "name": "ops-platform:break-glass"}]),
        cluster_admin_binding("cluster-admin", [{"kind": "Group", "name": "system:masters"}],
                              labels={"kubernetes.io/bootstrapping": "rbac-defaults"}),
    )
    assert verdicts(outcomes) == {"ClusterRoleBinding break-glass": True, "ClusterRoleBinding ci": False}
    assert "ServiceAccount deployer" in outcomes["ClusterRoleBinding ci"].message


@pytest.mark.parametrize(
    ("spec", "denies"),
    [
        ({"podSelector": {}, "policyTypes": ["Ingress"]}, True),
        ({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, True),
        ({"podSelector": {}}, True),  # policyTypes defaults to Ingress
        ({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}, True),
        ({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}, False),  # one rule allowing all
        ({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}, False),
        ({"podSelector": {}, "policyTypes": ["Egress"]}, False),
        ({"podSelector": {}, "policyTypes": ["Ingress"],
          "ingress": [{"from": [{"namespaceSelector": {}}]}]}, False),
    ],
)
def test_default_deny_recognised_without_rules_polaris_1088(spec: Obj, denies: bool) -> None:
    outcomes = run(network.default_deny_per_namespace, namespace("ontology-editor"),
                   network_policy("p", "ontology-editor", spec))
    assert verdicts(outcomes) == {"Namespace ontology-editor": denies}


def test_default_deny_needed_in_every_app_namespace_only() -> None:
    outcomes = run(
        network.default_deny_per_namespace,
        namespace("ontology-editor"), namespace("data"),
        namespace("monitoring", app=False), namespace("extra", app=False),
        default_deny("ontology-editor"), network_policy("web", "data", {"podSelector": {"matchLabels": {"a": "b"}}}),
        config=ControlConfig(app_namespaces=("extra", "absent")),
    )
    assert verdicts(outcomes) == {"Namespace ontology-editor": True, "Namespace data": False, "Namespace extra": False}
    assert outcomes["Namespace ontology-editor"].message == (
        "NetworkPolicy default-deny denies ingress and egress by default")


def test_strict_mtls_mesh_wide_and_no_weaker_override() -> None:
    good = run(network.strict_mtls, peer_authentication("default", "istio-system", "STRICT"),
               peer_authentication("db", "data", "UNSET", selector={"app": "db"}))
    assert verdicts(good) == {"PeerAuthentication istio-system/default": True, "PeerAuthentication data/db": True}

    bad = run(
        network.strict_mtls,
        peer_authentication("default", "istio-system", None),
        peer_authentication("legacy", "ontology-editor", "PERMISSIVE"),
        peer_authentication("metrics", "data", "STRICT", ports={"9090": {"mode": "DISABLE"}}),
    )
    assert verdicts(bad) == {
        "PeerAuthentication istio-system/default": False,
        "PeerAuthentication ontology-editor/legacy": False,
        "PeerAuthentication data/metrics": False,
    }
    assert "PERMISSIVE" in bad["PeerAuthentication istio-system/default"].message
    assert "port 9090 DISABLE" in bad["PeerAuthentication data/metrics"].message


def test_mtls_missing_policy_and_missing_istio_fail_on_a_cluster() -> None:
    assert verdicts(run(network.strict_mtls, namespace("x"))) == {"PeerAuthentication istio-system/(mesh-wide)": False}
    missing = run(network.strict_mtls, not_installed={"PeerAuthentication": "not served"})
    assert "Istio is not installed" in missing["PeerAuthentication istio-system/(mesh-wide)"].message
    # Manifests may hold part of the mesh: only what they contain is judged.
    assert run(network.strict_mtls, namespace("x"), kinds=("manifests",)) == {}


def test_quota_and_limit_range_per_app_namespace() -> None:
    objects = [namespace("ontology-editor"), namespace("data"), quota("ontology-editor"), limit_range("data")]
    assert verdicts(run(quotas.resource_quota_per_namespace, *objects)) == {
        "Namespace ontology-editor": True, "Namespace data": False}
    assert verdicts(run(quotas.limit_range_per_namespace, *objects)) == {
        "Namespace ontology-editor": False, "Namespace data": True}


def test_pdb_matched_by_selector() -> None:
    outcomes = run(
        availability.pdb_per_deployment,
        namespace("ontology-editor"), namespace("data"),
        deployment("backend", labels={"app": "backend", "tier": "api"}),
        deployment("frontend"),
        deployment("worker"),
        deployment("db", ns="data"),
        pdb("backend", "ontology-editor", {"matchLabels": {"app": "backend"}}),
        pdb("frontend", "ontology-editor", {"matchExpressions": [{"key": "app", "operator": "In",
                                                                  "values": ["frontend", "x"]}]}),
        pdb("worker", "data", {"matchLabels": {"app": "worker"}}),  # other namespace
        pdb("all-data", "data", {}),  # empty selector: every pod of the namespace
    )
    assert verdicts(outcomes) == {
        "Deployment ontology-editor/backend": True,
        "Deployment ontology-editor/frontend": True,
        "Deployment ontology-editor/worker": False,
        "Deployment data/db": True,
    }


def test_hpa_matched_by_scale_target() -> None:
    outcomes = run(
        availability.hpa_per_deployment,
        namespace("ontology-editor"),
        deployment("backend"), deployment("frontend"), deployment("worker"),
        hpa("backend", "ontology-editor", "backend"),
        hpa("frontend", "ontology-editor", "frontend", kind="StatefulSet"),
        hpa("worker", "data", "worker"),
    )
    assert verdicts(outcomes) == {
        "Deployment ontology-editor/backend": True,
        "Deployment ontology-editor/frontend": False,
        "Deployment ontology-editor/worker": False,
    }


def test_selector_semantics() -> None:
    labels = {"app": "web", "tier": "front"}
    assert selects({}, labels)
    assert not selects(None, labels)
    assert selects({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)
    assert not selects({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, labels)
    assert selects({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["web"]}]}, labels)
    # Invalid selectors (the API server refuses them) select nothing.
    assert not selects({"matchExpressions": [{"key": "app", "operator": "In"}]}, labels)
    assert not selects({"matchExpressions": [{"key": "app", "operator": "Matches", "values": ["w"]}]}, labels)
    assert not selects({"matchLabels": ["app"]}, labels)


def test_non_root_at_pod_or_container_level() -> None:
    plain = {"name": "app", "image": f"{REGISTRY}x:{SHA}"}
    outcomes = run(
        workloads.non_root,
        namespace("ontology-editor"),
        deployment("container-level"),
        deployment("pod-level", containers=[plain], pod_security={"runAsNonRoot": True}),
        deployment("uid", containers=[plain], pod_security={"runAsUser": 1001}),
        deployment("unset", containers=[plain]),
        deployment("root", containers=[secure_container(securityContext={"runAsUser": 0})]),
        deployment("override", containers=[{**plain, "securityContext": {"runAsNonRoot": False}}],
                   pod_security={"runAsNonRoot": True}),
        deployment("elsewhere", ns="monitoring", containers=[plain]),
    )
    assert verdicts(outcomes) == {
        "Deployment ontology-editor/container-level": True,
        "Deployment ontology-editor/pod-level": True,
        "Deployment ontology-editor/uid": True,
        "Deployment ontology-editor/unset": False,
        "Deployment ontology-editor/root": False,
        "Deployment ontology-editor/override": False,
    }
    assert outcomes["Deployment ontology-editor/root"].message == "container app: runAsUser is 0 (root)"


def test_init_containers_cronjobs_and_owned_objects() -> None:
    init_root = deployment("with-init")
    init_root["spec"]["template"]["spec"]["initContainers"] = [{"name": "migrate", "image": f"{REGISTRY}x:{SHA}"}]
    job_pod = {"template": {"spec": {"containers": [{"name": "job", "image": "x"}]}}}
    cronjob = {"apiVersion": "batch/v1", "kind": "CronJob",
               "metadata": {"name": "report", "namespace": "ontology-editor"},
               "spec": {"jobTemplate": {"spec": job_pod}}}
    owned_job = {"apiVersion": "batch/v1", "kind": "Job",
                 "metadata": {"name": "report-1", "namespace": "ontology-editor",
                              "ownerReferences": [{"kind": "CronJob", "name": "report", "controller": True}]},
                 "spec": {"template": {"spec": {"containers": [{"name": "job", "image": "x"}]}}}}
    outcomes = run(workloads.non_root, namespace("ontology-editor"), init_root, cronjob, owned_job)
    assert verdicts(outcomes) == {"Deployment ontology-editor/with-init": False,
                                  "CronJob ontology-editor/report": False}
    assert "container migrate" in outcomes["Deployment ontology-editor/with-init"].message


def test_privileged_and_privilege_escalation() -> None:
    objects = [
        namespace("ontology-editor"),
        deployment("good"),
        deployment("privileged", containers=[secure_container(
            securityContext={"runAsNonRoot": True, "privileged": True, "allowPrivilegeEscalation": False})]),
        deployment("escalates", containers=[secure_container(securityContext={"runAsNonRoot": True})]),
    ]
    assert verdicts(run(workloads.not_privileged, *objects)) == {
        "Deployment ontology-editor/good": True,
        "Deployment ontology-editor/privileged": False,
        "Deployment ontology-editor/escalates": True,
    }
    escalation = run(workloads.no_privilege_escalation, *objects)
    assert verdicts(escalation) == {
        "Deployment ontology-editor/good": True,
        "Deployment ontology-editor/privileged": True,
        "Deployment ontology-editor/escalates": False,
    }
    assert "defaults to true" in escalation["Deployment ontology-editor/escalates"].message


def test_resources_set_directly_or_by_limit_range_defaults() -> None:
    bare = {"name": "app", "image": f"{REGISTRY}x:{SHA}"}
    limits_only = secure_container(resources={"limits": {"cpu": "1", "memory": "1Gi"}})
    no_cpu_limit = secure_container(resources={"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}})
    outcomes = run(
        workloads.resources_set,
        namespace("ontology-editor"), namespace("data"), limit_range("data"),
        deployment("full"), deployment("limits-only", containers=[limits_only]),
        deployment("bare", containers=[bare]), deployment("no-cpu-limit", containers=[no_cpu_limit]),
        deployment("bare-with-defaults", ns="data", containers=[bare]),
    )
    assert verdicts(outcomes) == {
        "Deployment ontology-editor/full": True,
        "Deployment ontology-editor/limits-only": True,  # requests default to limits
        "Deployment ontology-editor/bare": False,
        "Deployment ontology-editor/no-cpu-limit": False,
        "Deployment data/bare-with-defaults": True,
    }
    assert outcomes["Deployment ontology-editor/no-cpu-limit"].message == "container app: no limits.cpu"


@pytest.mark.parametrize(
    ("image", "registry_ok", "pinned"),
    [
        (f"{REGISTRY}onto-backend-prod:{SHA}", True, True),
        (f"{REGISTRY}onto-backend-prod:{'a' * 40}", True, True),
        (f"{REGISTRY}onto-backend-prod@sha256:{'b' * 64}", True, True),
        (f"{REGISTRY}onto-backend-prod:v1.2@sha256:{'b' * 64}", True, True),
        (f"{REGISTRY}onto-backend-prod:latest", True, False),
        (f"{REGISTRY}onto-backend-prod", True, False),
        (f"{REGISTRY}onto-backend-prod:v1.2.3", True, False),
        (f"{REGISTRY}onto-backend-prod:{'a' * 41}", True, False),
        (f"{REGISTRY}onto-backend-prod:3F9A1C2", True, False),
        (f"nginx:{SHA}", False, True),
        (f"999999999999.dkr.ecr.us-east-1.amazonaws.com/x:{SHA}", False, True),
        ("localhost:5000/app", False, False),
    ],
)
def test_images_from_platform_registry_pinned(image: str, registry_ok: bool, pinned: bool) -> None:
    objects = [namespace("ontology-editor"), deployment("svc", containers=[secure_container(image=image)])]
    assert run(images.platform_registry, *objects)["Deployment ontology-editor/svc"].passed is registry_ok
    assert run(images.pinned_images, *objects)["Deployment ontology-editor/svc"].passed is pinned


def test_any_ecr_registry_accepted_when_none_configured() -> None:
    objects = [namespace("ontology-editor"),
               deployment("svc", containers=[secure_container(
                   image=f"999999999999.dkr.ecr.us-east-1.amazonaws.com/x:{SHA}")]),
               deployment("hub", containers=[secure_container(image=f"docker.io/library/nginx:{SHA}")])]
    assert verdicts(run(images.platform_registry, *objects, config=ControlConfig())) == {
        "Deployment ontology-editor/svc": True, "Deployment ontology-editor/hub": False}


def test_tls_covers_every_ingress_host() -> None:
    outcomes = run(
        ingress.tls_on_every_ingress,
        ingress_of("web", ["onto.company.com"], ["onto.company.com"]),
        ingress_of("wild", ["api.company.com", "ONTO.company.com"], ["*.company.com"]),
        ingress_of("partial", ["onto.company.com", "admin.company.com"], ["onto.company.com"]),
        ingress_of("deep", ["a.b.company.com"], ["*.company.com"]),
        ingress_of("plain", ["onto.company.com"], None),
    )
    assert verdicts(outcomes) == {
        "Ingress ontology-editor/web": True,
        "Ingress ontology-editor/wild": True,
        "Ingress ontology-editor/partial": False,
        "Ingress ontology-editor/deep": False,
        "Ingress ontology-editor/plain": False,
    }
    assert outcomes["Ingress ontology-editor/partial"].message == "no TLS for host(s) admin.company.com"


def test_gatekeeper_counts_total_violations_not_the_capped_list() -> None:
    outcomes = run(
        gatekeeper.no_constraint_violations,
        constraint("K8sRequiredLabels", "owner-label", total=0),
        constraint("K8sAllowedRepos", "platform-registry", total=57, listed=20),
        constraint("K8sPSPPrivileged", "no-privileged", total=None),
    )
    assert verdicts(outcomes) == {
        "K8sRequiredLabels owner-label": True,
        "K8sAllowedRepos platform-registry": False,
        "K8sPSPPrivileged no-privileged": False,
    }
    assert outcomes["K8sAllowedRepos platform-registry"].message.startswith("57 violation(s)")
    assert "audit has not reported" in outcomes["K8sPSPPrivileged no-privileged"].message


def test_gatekeeper_must_be_installed_and_enforcing() -> None:
    installed = run(gatekeeper.gatekeeper_enforcing, constraint("K8sRequiredLabels", "a", total=0),
                    constraint("K8sAllowedRepos", "b", total=0, action="dryrun"))
    assert verdicts(installed) == {"Cluster gatekeeper": True}
    dry_run_only = run(gatekeeper.gatekeeper_enforcing, constraint("K8sAllowedRepos", "b", total=0, action="warn"))
    assert verdicts(dry_run_only) == {"Cluster gatekeeper": False}
    missing = run(gatekeeper.gatekeeper_enforcing, not_installed={"ConstraintTemplate": "not served"})
    assert "not installed" in missing["Cluster gatekeeper"].message


def test_audit_logging_from_apiserver_flags() -> None:
    outcomes = run(
        audit.audit_logging_on,
        apiserver_pod("kube-apiserver-a", ["--audit-policy-file=/etc/audit/policy.yaml",
                                           "--audit-log-path", "/var/log/audit.log"]),
        apiserver_pod("kube-apiserver-b", ["--audit-log-path=/var/log/audit.log"]),
        apiserver_pod("kube-apiserver-c", ["--profiling=false"]),
    )
    assert verdicts(outcomes) == {
        "Pod kube-system/kube-apiserver-a": True,
        "Pod kube-system/kube-apiserver-b": False,
        "Pod kube-system/kube-apiserver-c": False,
    }
    assert outcomes["Pod kube-system/kube-apiserver-b"].message == "kube-apiserver without --audit-policy-file"


def test_audit_logging_from_eks_log_types_or_no_evidence() -> None:
    on = run(audit.audit_logging_on, cluster_logging_types=("api", "audit", "authenticator"))
    off = run(audit.audit_logging_on, cluster_logging_types=("api",))
    none = run(audit.audit_logging_on)
    assert verdicts(on) == {"Cluster audit-logging": True}
    assert verdicts(off) == {"Cluster audit-logging": False}
    assert "no evidence" in none["Cluster audit-logging"].message


def graph_evidence(**overrides: Any) -> GraphEvidence:
    values: dict[str, Any] = dict(
        backups=[
            BackupEvidence("postgres_main", "b-old", NOW - timedelta(hours=30), "run-1", "http://dagster/runs/run-1"),
            BackupEvidence("postgres_main", "b-new", NOW - timedelta(minutes=20), "run-2", "http://dagster/runs/run-2"),
            BackupEvidence("redis_cache", "r-1", NOW - timedelta(hours=3), "run-3", None),
        ],
        restore_tests=[
            RestoreTestEvidence("postgres_main", True, 300, NOW - timedelta(days=2), "run-4",
                                "http://dagster/runs/run-4"),
            RestoreTestEvidence("redis_cache", True, 1200, NOW - timedelta(days=2), "run-5", None),
            RestoreTestEvidence("etcd", False, 10, NOW - timedelta(days=1), "run-6", None),
            RestoreTestEvidence("etcd", True, 10, NOW - timedelta(days=8), "run-0", None),
        ],
        certificates=[CertificateEvidence("onto.company.com:443", 60, "run-7", "http://dagster/runs/run-7"),
                      CertificateEvidence("api.company.com:443", 3.5, "run-7", "http://dagster/runs/run-7")],
        rpo_minutes=60, rto_minutes=15, fail_below_days=14, now=NOW,
        datastores=["postgres_main", "redis_cache", "neo4j"], restore_tested=["postgres_main"],
    )
    values.update(overrides)
    return GraphEvidence(**values)


def test_backups_within_rpo_link_their_run() -> None:
    outcomes = run(graph.backups_within_rpo, graph=graph_evidence(), kinds=("graph",))
    assert verdicts(outcomes) == {"Datastore postgres_main": True, "Datastore redis_cache": False,
                                  "Datastore neo4j": False}
    assert outcomes["Datastore postgres_main"].link == "http://dagster/runs/run-2"
    assert "b-new" in outcomes["Datastore postgres_main"].message
    assert outcomes["Datastore redis_cache"].link == "run run-3"
    assert outcomes["Datastore neo4j"].message == "no verified backup found"


def test_rpo_is_per_datastore_and_a_failed_latest_backup_is_named_without_deciding() -> None:
    evidence = graph_evidence(
        rpo_minutes_by_datastore={"redis_cache": 240, "postgres_main": 15},
        failed_backups={"redis_cache": FailedRun("sha256 mismatch in dump.rdb", "run-9", None),
                        "neo4j": FailedRun("connection refused", "run-8", "http://dagster/runs/run-8")},
    )
    outcomes = run(graph.backups_within_rpo, graph=evidence, kinds=("graph",))
    # postgres_main: 20 min old against its own RPO of 15; redis_cache: 3 h against 240 min.
    assert verdicts(outcomes) == {"Datastore postgres_main": False, "Datastore redis_cache": True,
                                  "Datastore neo4j": False}
    assert "RPO 15 min" in outcomes["Datastore postgres_main"].message
    redis = outcomes["Datastore redis_cache"]
    assert "RPO 240 min" in redis.message and redis.link == "run run-3"
    assert "the latest backup run failed: sha256 mismatch in dump.rdb (run run-9)" in redis.message
    neo4j = outcomes["Datastore neo4j"]
    assert neo4j.message.startswith("no verified backup found; the latest backup run failed: connection refused")
    assert neo4j.link == "http://dagster/runs/run-8"


def test_latest_restore_test_must_pass_within_rto() -> None:
    outcomes = run(graph.restore_tests_within_rto, graph=graph_evidence(), kinds=("graph",))
    assert verdicts(outcomes) == {"Datastore postgres_main": True, "Datastore redis_cache": False,
                                  "Datastore etcd": False}
    assert "over the RTO of 15 min" in outcomes["Datastore redis_cache"].message
    assert "failed" in outcomes["Datastore etcd"].message and outcomes["Datastore etcd"].link == "run run-6"


def test_rto_is_per_datastore_and_a_failed_test_says_why() -> None:
    refused = RestoreTestEvidence("etcd", False, None, NOW - timedelta(hours=1), "run-10", None,
                                  description="not proven: restore test of 'etcd': target is the source")
    evidence = graph_evidence(rto_minutes_by_datastore={"redis_cache": 30, "postgres_main": 4},
                              restore_tests=[*graph_evidence().restore_tests, refused])
    outcomes = run(graph.restore_tests_within_rto, graph=evidence, kinds=("graph",))
    assert verdicts(outcomes) == {"Datastore postgres_main": False, "Datastore redis_cache": True,
                                  "Datastore etcd": False}
    assert "over the RTO of 4 min" in outcomes["Datastore postgres_main"].message
    assert "(RTO 30 min)" in outcomes["Datastore redis_cache"].message
    etcd = outcomes["Datastore etcd"]
    assert etcd.message.endswith("failed: not proven: restore test of 'etcd': target is the source")
    assert etcd.link == "run run-10"


def test_certificates_near_expiry_fail() -> None:
    outcomes = run(graph.certificates_not_expiring, graph=graph_evidence(), kinds=("graph",))
    assert verdicts(outcomes) == {"Certificate onto.company.com:443": True, "Certificate api.company.com:443": False}
    assert outcomes["Certificate api.company.com:443"].link == "http://dagster/runs/run-7"


def test_not_yet_valid_and_unreadable_certificates_fail() -> None:
    certificates = [
        CertificateEvidence("early.company.com:443", 95, "run-7", None, not_before=NOW + timedelta(days=5),
                            not_after=NOW + timedelta(days=95)),
        CertificateEvidence("apps/garbled", None, "run-7", None),
        CertificateEvidence("apps/fine", 80, "run-7", None, not_before=NOW - timedelta(days=10),
                            not_after=NOW + timedelta(days=80)),
    ]
    outcomes = run(graph.certificates_not_expiring, graph=graph_evidence(certificates=certificates), kinds=("graph",))
    assert verdicts(outcomes) == {"Certificate early.company.com:443": False, "Certificate apps/garbled": False,
                                  "Certificate apps/fine": True}
    assert outcomes["Certificate early.company.com:443"].message == "not valid until 2026-05-09 07:00 UTC"
    assert "expiry unknown" in outcomes["Certificate apps/garbled"].message


def test_a_failed_or_missing_inventory_fails_the_certificate_control() -> None:
    failed = graph_evidence(certificates=[], failed_inventory=FailedRun(
        "not judged: certificate inventory failed: kubernetes: list Secret was refused (403 Forbidden)",
        "run-11", "http://dagster/runs/run-11"))
    outcomes = run(graph.certificates_not_expiring, graph=failed, kinds=("graph",))
    assert verdicts(outcomes) == {"Certificate inventory": False}
    assert "the latest certificate inventory run failed: not judged" in outcomes["Certificate inventory"].message
    assert outcomes["Certificate inventory"].link == "http://dagster/runs/run-11"
    never = run(graph.certificates_not_expiring, graph=graph_evidence(certificates=[], inventory_taken=False),
                kinds=("graph",))
    assert verdicts(never) == {"Certificate inventory": False}
    assert "no certificate inventory has run" in never["Certificate inventory"].message
