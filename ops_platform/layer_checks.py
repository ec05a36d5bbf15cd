"""The infra plan's requirements, checked against the live cluster, per layer.

Plain Python, no Dagster import: each check is ``(kube) -> CheckOutcome``
and :data:`LAYER_CHECKS` says which layer's asset carries it. A check whose
kind the cluster does not serve (its CRD is missing) fails and names the CRD.

App namespaces are the Namespaces labelled :data:`APP_NAMESPACE_LABEL`
(infra/layers/cluster/namespaces.yaml); a check over app namespaces fails
when there is none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ops_platform.resources.kubernetes import KindNotServed, KubernetesClient

Severity = Literal["ERROR", "WARN"]
Row = dict[str, Any]

APP_NAMESPACE_LABEL = "ops-platform/app-namespace=true"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
ZONE_LABEL = "topology.kubernetes.io/zone"
EKS_NODE_GROUP_LABEL = "eks.amazonaws.com/nodegroup"
# The first of these a node carries names its group (infra/layers/cluster/node-groups.yaml uses node-group).
NODE_GROUP_LABELS = ("ops-platform/node-group", "node-group", EKS_NODE_GROUP_LABEL)
CONTROL_PLANE_NODES = 3
CONTROL_PLANE_MIN_ZONES = 2
NODE_GROUP_SIZES: dict[str, tuple[int, int]] = {"app": (3, 10), "data": (3, 6), "platform": (2, 4)}
STORAGE_CLASSES = ("fast-ssd", "standard-ssd", "backup-hdd")
MESH_ROOT_NAMESPACE = "istio-system"
ALERTMANAGER_MIN_REPLICAS = 2

CONTROL_PLANE_CHECK = "control_plane_nodes"
NODE_GROUPS_CHECK = "node_group_sizes"
STORAGE_CLASSES_CHECK = "storage_classes_present"
MTLS_CHECK = "mtls_strict"
DEFAULT_DENY_CHECK = "default_deny_in_app_namespaces"
ALERTMANAGER_CHECK = "alertmanager_replicas"
GATEKEEPER_AUDIT_CHECK = "gatekeeper_audit_clean"
QUOTAS_CHECK = "quota_and_limit_range_in_app_namespaces"


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    severity: Severity
    description: str
    rows: list[Row] = field(default_factory=list)


def _crd_missing(crd_name: str, what: str) -> CheckOutcome:
    return CheckOutcome(
        False, "ERROR", f"cannot check {what}: the cluster does not serve its kind (CRD {crd_name} not installed)"
    )


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _name(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def control_plane_nodes(kube: KubernetesClient) -> CheckOutcome:
    """3 control-plane nodes across at least 2 zones; on EKS the control plane is managed and not visible."""
    nodes = kube.list("v1", "Node")
    control_plane = [node for node in nodes if CONTROL_PLANE_LABEL in _labels(node)]
    if not control_plane and any(EKS_NODE_GROUP_LABEL in _labels(node) for node in nodes):
        return CheckOutcome(
            True,
            "ERROR",
            "managed control plane (EKS): AWS runs the API servers and etcd across 3 availability "
            "zones and shows no control-plane nodes",
        )
    rows = [{"node": _name(node), "zone": _labels(node).get(ZONE_LABEL, "")} for node in control_plane]
    zones = {row["zone"] for row in rows if row["zone"]}
    passed = len(control_plane) >= CONTROL_PLANE_NODES and len(zones) >= CONTROL_PLANE_MIN_ZONES
    return CheckOutcome(
        passed,
        "ERROR",
        f"{len(control_plane)} control-plane nodes in {len(zones)} zones "
        f"(required: {CONTROL_PLANE_NODES} in at least {CONTROL_PLANE_MIN_ZONES})",
        rows,
    )


def _node_group(node: dict[str, Any]) -> str | None:
    labels = _labels(node)
    for label in NODE_GROUP_LABELS:
        if label in labels:
            return labels[label]
    return None


def node_group_sizes(kube: KubernetesClient) -> CheckOutcome:
    """Node groups app / data / platform each within their size range (:data:`NODE_GROUP_SIZES`)."""
    counts = Counter(
        _node_group(node) for node in kube.list("v1", "Node") if CONTROL_PLANE_LABEL not in _labels(node)
    )
    rows = [
        {"node_group": group, "nodes": counts.get(group, 0), "min": low, "max": high,
         "ok": low <= counts.get(group, 0) <= high}
        for group, (low, high) in NODE_GROUP_SIZES.items()
    ]
    outside = [f"{row['node_group']} has {row['nodes']} (range {row['min']}-{row['max']})" for row in rows
               if not row["ok"]]
    description = (
        "node groups outside their size range: " + "; ".join(outside)
        if outside
        else "node groups app / data / platform within their size ranges"
    )
    return CheckOutcome(not outside, "ERROR", description, rows)


def storage_classes_present(kube: KubernetesClient) -> CheckOutcome:
    present = {_name(sc) for sc in kube.list("storage.k8s.io/v1", "StorageClass")}
    rows = [{"storage_class": name, "present": name in present} for name in STORAGE_CLASSES]
    missing = [row["storage_class"] for row in rows if not row["present"]]
    description = f"storage classes missing: {', '.join(missing)}" if missing else "all storage classes present"
    return CheckOutcome(not missing, "ERROR", description, rows)


def mtls_strict(kube: KubernetesClient) -> CheckOutcome:
    """The mesh-wide PeerAuthentication ``default`` in the Istio root namespace has mTLS mode STRICT."""
    try:
        policy = kube.get("security.istio.io/v1", "PeerAuthentication", "default", MESH_ROOT_NAMESPACE)
    except KindNotServed:
        return _crd_missing("peerauthentications.security.istio.io", "mTLS")
    if policy is None:
        return CheckOutcome(
            False, "ERROR", f"no PeerAuthentication 'default' in {MESH_ROOT_NAMESPACE}: mTLS is PERMISSIVE"
        )
    mode = ((policy.get("spec") or {}).get("mtls") or {}).get("mode", "PERMISSIVE (unset)")
    return CheckOutcome(
        mode == "STRICT",
        "ERROR",
        f"mesh-wide mTLS mode {mode}",
        [{"policy": f"{MESH_ROOT_NAMESPACE}/default", "mode": mode}],
    )


def _app_namespaces(kube: KubernetesClient) -> list[str]:
    return sorted(_name(ns) for ns in kube.list("v1", "Namespace", label_selector=APP_NAMESPACE_LABEL))


def _no_app_namespaces(what: str) -> CheckOutcome:
    return CheckOutcome(False, "ERROR", f"no namespace labelled {APP_NAMESPACE_LABEL}: cannot check {what}")


def is_default_deny(policy: dict[str, Any]) -> bool:
    """Empty podSelector, both policy types, no rules: all traffic in and out of the namespace denied."""
    spec = policy.get("spec") or {}
    return (
        not (spec.get("podSelector") or {})
        and {"Ingress", "Egress"} <= set(spec.get("policyTypes") or [])
        and not spec.get("ingress")
        and not spec.get("egress")
    )


def default_deny_in_app_namespaces(kube: KubernetesClient) -> CheckOutcome:
    namespaces = _app_namespaces(kube)
    if not namespaces:
        return _no_app_namespaces("default-deny NetworkPolicies")
    rows = []
    for namespace in namespaces:
        denying = [_name(p) for p in kube.list("networking.k8s.io/v1", "NetworkPolicy", namespace)
                   if is_default_deny(p)]
        rows.append({"namespace": namespace, "default_deny_policy": ", ".join(denying), "ok": bool(denying)})
    missing = [row["namespace"] for row in rows if not row["ok"]]
    description = (
        f"app namespaces without a default-deny NetworkPolicy: {', '.join(missing)}"
        if missing
        else f"default-deny NetworkPolicy in all {len(rows)} app namespaces"
    )
    return CheckOutcome(not missing, "ERROR", description, rows)


def alertmanager_replicas(kube: KubernetesClient) -> CheckOutcome:
    """Alertmanager runs highly available: the Prometheus Operator's Alertmanager, else its StatefulSet."""
    try:
        found = [
            {"alertmanager": f"{m['metadata'].get('namespace')}/{_name(m)}",
             "replicas": (m.get("spec") or {}).get("replicas", 1)}
            for m in kube.list("monitoring.coreos.com/v1", "Alertmanager")
        ]
    except KindNotServed:
        found = [
            {"alertmanager": f"{s['metadata'].get('namespace')}/{_name(s)}",
             "replicas": (s.get("spec") or {}).get("replicas", 1)}
            for s in kube.list("apps/v1", "StatefulSet", label_selector="app.kubernetes.io/name=alertmanager")
        ]
        if not found:
            return _crd_missing("alertmanagers.monitoring.coreos.com", "Alertmanager replicas (and no "
                                "StatefulSet labelled app.kubernetes.io/name=alertmanager)")
    if not found:
        return CheckOutcome(False, "ERROR", "no Alertmanager in the cluster")
    most = max(row["replicas"] for row in found)
    return CheckOutcome(
        most >= ALERTMANAGER_MIN_REPLICAS,
        "ERROR",
        f"Alertmanager with {most} replicas (required: at least {ALERTMANAGER_MIN_REPLICAS})",
        found,
    )


def gatekeeper_audit_clean(kube: KubernetesClient) -> CheckOutcome:
    """Gatekeeper's audit found no violation of any constraint (sum of status.totalViolations is 0)."""
    try:
        templates = kube.list("templates.gatekeeper.sh/v1", "ConstraintTemplate")
    except KindNotServed:
        return _crd_missing("constrainttemplates.templates.gatekeeper.sh", "the Gatekeeper audit")
    rows: list[Row] = []
    problems: list[str] = []
    for template in templates:
        kind = (((template.get("spec") or {}).get("crd") or {}).get("spec") or {}).get("names", {}).get("kind")
        try:
            constraints = kube.list("constraints.gatekeeper.sh/v1beta1", kind)
        except KindNotServed:
            problems.append(f"constraint kind {kind} not served (template {_name(template)} not processed)")
            continue
        for constraint in constraints:
            violations = (constraint.get("status") or {}).get("totalViolations")
            rows.append({"constraint": f"{kind}/{_name(constraint)}", "violations": violations})
            if violations is None:
                problems.append(f"{kind}/{_name(constraint)} not audited yet")
    total = sum(row["violations"] or 0 for row in rows)
    if not rows and not problems:
        problems.append("no Gatekeeper constraints in the cluster")
    passed = total == 0 and not problems
    description = f"{total} violations across {len(rows)} constraints" + (
        f"; {'; '.join(problems)}" if problems else ""
    )
    return CheckOutcome(passed, "ERROR", description, rows)


def quota_and_limit_range_in_app_namespaces(kube: KubernetesClient) -> CheckOutcome:
    namespaces = _app_namespaces(kube)
    if not namespaces:
        return _no_app_namespaces("ResourceQuotas and LimitRanges")
    rows = [
        {"namespace": namespace,
         "resource_quotas": len(kube.list("v1", "ResourceQuota", namespace)),
         "limit_ranges": len(kube.list("v1", "LimitRange", namespace))}
        for namespace in namespaces
    ]
    missing = [
        f"{row['namespace']} lacks " + " and ".join(
            kind for kind, count in (("a ResourceQuota", row["resource_quotas"]),
                                     ("a LimitRange", row["limit_ranges"])) if not count)
        for row in rows if not (row["resource_quotas"] and row["limit_ranges"])
    ]
    description = "; ".join(missing) if missing else f"ResourceQuota and LimitRange in all {len(rows)} app namespaces"
    return CheckOutcome(not missing, "ERROR", description, rows)


LayerCheck = Callable[[KubernetesClient], CheckOutcome]

LAYER_CHECKS: dict[str, list[tuple[str, LayerCheck]]] = {
    "cluster": [(CONTROL_PLANE_CHECK, control_plane_nodes), (NODE_GROUPS_CHECK, node_group_sizes)],
    "storage": [(STORAGE_CLASSES_CHECK, storage_classes_present)],
    "service_mesh": [(MTLS_CHECK, mtls_strict)],
    "security": [(DEFAULT_DENY_CHECK, default_deny_in_app_namespaces)],
    "monitoring": [(ALERTMANAGER_CHECK, alertmanager_replicas)],
    "governance": [
        (GATEKEEPER_AUDIT_CHECK, gatekeeper_audit_clean),
        (QUOTAS_CHECK, quota_and_limit_range_in_app_namespaces),
    ],
}
