"""RBAC: least privilege (infra plan §6.1, InfraSpec §3.3)."""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.evidence import Evidence, Obj, labels_of, name_of, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

# The API server's own bootstrap policy (cluster-admin, system:*): it recreates
# these objects at every start, so they are not ours to judge.
BOOTSTRAP_LABEL = ("kubernetes.io/bootstrapping", "rbac-defaults")
BOOTSTRAP_NAMES = ("cluster-admin", "admin", "edit", "view")


def _bootstrap(obj: Obj) -> bool:
    key, value = BOOTSTRAP_LABEL
    name = name_of(obj)
    return labels_of(obj).get(key) == value and (name.startswith("system:") or name in BOOTSTRAP_NAMES)


@control(
    id="OPS-RBAC-001",
    title="No wildcard verbs or resources in Roles and ClusterRoles outside admin roles",
    severity="ERROR",
    requirement="infra plan §6.1 (Requirements 5.1); InfraSpec §3.3 least privilege",
    framework="CIS 5.1.3",
    remediation="""List the verbs and resources the role needs instead of "*", or bind the
        subjects to an admin role (ControlConfig.admin_roles) if they really administer.""",
    evidence=("cluster", "manifests"),
    reads=("Role", "ClusterRole"),
)
def no_wildcard_rules(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    for role in evidence.of("Role", "ClusterRole"):
        if name_of(role) in config.admin_roles or _bootstrap(role):
            continue
        wildcards = []
        for number, rule in enumerate(role.get("rules") or [], start=1):
            for field in ("verbs", "resources"):
                if "*" in (rule.get(field) or []):
                    wildcards.append(f"rule {number} {field}")
        if wildcards:
            yield Outcome(ref(role), False, f"wildcard in {', '.join(wildcards)}")
        else:
            yield Outcome(ref(role), True, "no wildcard verbs or resources")


@control(
    id="OPS-RBAC-002",
    title="cluster-admin is bound only to the break-glass group",
    severity="ERROR",
    requirement="infra plan §6.1 (Requirements 5.1): developer, operator and admin roles separated",
    framework="CIS 5.1.1",
    remediation="""Bind users and service accounts to a narrower ClusterRole (or a namespaced
        Role); keep cluster-admin for the break-glass group (ControlConfig.break_glass_groups).""",
    evidence=("cluster", "manifests"),
    reads=("ClusterRoleBinding",),
)
def cluster_admin_break_glass_only(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    for binding in evidence.of("ClusterRoleBinding"):
        role = binding.get("roleRef") or {}
        if role.get("kind") != "ClusterRole" or role.get("name") != "cluster-admin" or _bootstrap(binding):
            continue
        others = [
            f"{subject.get('kind')} {subject.get('name')}"
            for subject in binding.get("subjects") or []
            if not (subject.get("kind") == "Group" and subject.get("name") in config.break_glass_groups)
        ]
        if others:
            yield Outcome(ref(binding), False, f"grants cluster-admin to {', '.join(others)}")
        else:
            yield Outcome(ref(binding), True, "grants cluster-admin to the break-glass group only")


CONTROLS = [no_wildcard_rules, cluster_admin_break_glass_only]
