"""Kubernetes API audit logging (infra plan §13.3).

Two kinds of evidence prove it: on EKS, the control-plane log types enabled
on the cluster (``Evidence.cluster_logging_types``, from ``describe-cluster``);
on a self-managed control plane, the flags of the kube-apiserver static pods
in kube-system.
"""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.controls.pods import pod_template
from ops_platform.compliance.controls.shapes import ShapeError, labels, sequence
from ops_platform.compliance.evidence import Evidence, Obj, namespace_of, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

AUDIT_REF = "Cluster audit-logging"


def apiserver_flags(pod: Obj) -> dict[str, str]:
    """``--name=value`` and ``--name value`` flags of the kube-apiserver container."""
    flags: dict[str, str] = {}
    for container in pod_template(pod).of():
        try:
            command = sequence(container.spec.get("command"), "command") + sequence(container.spec.get("args"), "args")
        except ShapeError:
            continue
        tokens = [str(token) for token in command]
        if not any("kube-apiserver" in token for token in tokens) and container.spec.get("name") != "kube-apiserver":
            continue
        for position, token in enumerate(tokens):
            if not token.startswith("--"):
                continue
            name, has_value, value = token[2:].partition("=")
            if not has_value and position + 1 < len(tokens) and not tokens[position + 1].startswith("--"):
                value = tokens[position + 1]
            flags[name] = value
    return flags


def _component(pod: Obj) -> str | None:
    try:
        return labels(pod).get("component")
    except ShapeError:
        return None


def _apiserver_pods(evidence: Evidence) -> list[Obj]:
    return [
        pod
        for pod in evidence.of("Pod")
        if namespace_of(pod) == "kube-system" and _component(pod) == "kube-apiserver"
    ]


@control(
    id="OPS-AUDIT-001",
    title="API server audit logging is on",
    severity="ERROR",
    requirement="infra plan §13.3 (Requirements 12.3, 12.5): Kubernetes audit logs enabled",
    framework="CIS 1.2.17, 3.2.1 (EKS: CIS EKS 2.1.1)",
    remediation="""EKS: enable the "audit" control-plane log type (aws eks update-cluster-config
        --logging). Self-managed: start kube-apiserver with --audit-policy-file and
        --audit-log-path (or --audit-webhook-config-file).""",
    evidence=("cluster",),
    reads=("Pod",),
)
def audit_logging_on(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    if evidence.cluster_logging_types is not None:
        enabled = ", ".join(evidence.cluster_logging_types) or "none"
        if "audit" in evidence.cluster_logging_types:
            yield Outcome(AUDIT_REF, True, f"EKS control-plane log types enabled: {enabled}")
        else:
            yield Outcome(AUDIT_REF, False, f"EKS control-plane log type 'audit' is off (enabled: {enabled})")
        return
    pods = _apiserver_pods(evidence)
    if not pods:
        yield Outcome(
            AUDIT_REF,
            False,
            "no evidence: no kube-apiserver pod in kube-system and no EKS logging types "
            "(pass cluster_logging_types from describe-cluster on EKS)",
        )
        return
    for pod in pods:
        flags = apiserver_flags(pod)
        sink = flags.get("audit-log-path") or flags.get("audit-webhook-config-file")
        missing = [
            name
            for name, present in (("--audit-policy-file", flags.get("audit-policy-file")),
                                  ("--audit-log-path or --audit-webhook-config-file", sink))
            if not present
        ]
        if missing:
            yield Outcome(ref(pod), False, f"kube-apiserver without {' and '.join(missing)}")
        else:
            yield Outcome(ref(pod), True, f"audit policy {flags['audit-policy-file']}, log {sink}")


CONTROLS = [audit_logging_on]
