"""RBAC: least privilege (infra plan §6.1, InfraSpec §3.3).

Besides wildcards, the grants that lead to more than they name (the escalation
paths of the Kubernetes RBAC good practices): reading Secrets, bind /
escalate / impersonate, and exec or attach into pods. Roles in
``ControlConfig.admin_roles`` may hold them; the bindings to any role that
does (or to cluster-admin) must name the break-glass group only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ops_platform.compliance.controls.shapes import judge_each, labels, mapping, mappings, strings, text
from ops_platform.compliance.evidence import Evidence, Obj, name_of, namespace_of, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

# The API server's own bootstrap policy (cluster-admin, system:*): it recreates
# these objects at every start, so they are not ours to judge.
BOOTSTRAP_LABEL = ("kubernetes.io/bootstrapping", "rbac-defaults")
BOOTSTRAP_NAMES = ("cluster-admin", "admin", "edit", "view")
SECRET_READ_VERBS = ("get", "list", "watch")
ESCALATION_VERBS = ("bind", "escalate", "impersonate")
POD_SHELL_RESOURCES = ("pods/exec", "pods/attach")
POD_SHELL_VERBS = ("create", "get")
CORE_GROUPS = ("", "*")


def _bootstrap(obj: Obj) -> bool:
    key, value = BOOTSTRAP_LABEL
    name = name_of(obj)
    return labels(obj).get(key) == value and (name.startswith("system:") or name in BOOTSTRAP_NAMES)


@dataclass(frozen=True)
class Rule:
    number: int
    api_groups: list[str]
    resources: list[str]
    verbs: list[str]
    resource_names: list[str]


def rules_of(role: Obj) -> list[Rule]:
    found = []
    for index, rule in enumerate(mappings(role.get("rules"), "rules")):
        where = f"rules[{index}]"
        found.append(Rule(
            index + 1,
            strings(rule.get("apiGroups"), f"{where}.apiGroups"),
            strings(rule.get("resources"), f"{where}.resources"),
            strings(rule.get("verbs"), f"{where}.verbs"),
            strings(rule.get("resourceNames"), f"{where}.resourceNames"),
        ))
    return found


def _wildcards(rule: Rule) -> list[str]:
    return [f"rule {rule.number} {field}" for field in ("verbs", "resources") if "*" in getattr(rule, field)]


def _escalations(rule: Rule) -> list[str]:
    verbs = [verb for verb in ESCALATION_VERBS if verb in rule.verbs]
    return [f"rule {rule.number} grants {', '.join(verbs)} on {', '.join(rule.resources) or '(none)'}"] if verbs else []


def _secret_reads(rule: Rule) -> list[str]:
    if rule.resource_names or "secrets" not in rule.resources or not set(CORE_GROUPS) & set(rule.api_groups):
        return []
    verbs = [verb for verb in SECRET_READ_VERBS if verb in rule.verbs]
    return [f"rule {rule.number} grants {', '.join(verbs)} on secrets"] if verbs else []


def _pod_shells(rule: Rule) -> list[str]:
    if not set(CORE_GROUPS) & set(rule.api_groups):
        return []
    resources = [resource for resource in POD_SHELL_RESOURCES if resource in rule.resources]
    verbs = [verb for verb in POD_SHELL_VERBS if verb in rule.verbs]
    return [f"rule {rule.number} grants {', '.join(verbs)} on {', '.join(resources)}"] if resources and verbs else []


def _judge_roles(
    evidence: Evidence, config: ControlConfig, finds: Callable[[Rule], list[str]], failing: str, passing: str
) -> Iterator[Outcome]:
    def judge(role: Obj) -> Outcome | None:
        if name_of(role) in config.admin_roles or _bootstrap(role):
            return None
        found = [finding for rule in rules_of(role) for finding in finds(rule)]
        if found:
            return Outcome(ref(role), False, f"{failing}: {'; '.join(found)}")
        return Outcome(ref(role), True, passing)

    return judge_each(evidence.of("Role", "ClusterRole"), judge)


@control(
    id="OPS-RBAC-001",
    title="No wildcard verbs or resources in Roles and ClusterRoles outside admin roles",
    severity="ERROR",
    requirement="infra plan §6.1 (Requirements 5.1); InfraSpec §3.3 least privilege",
    framework="CIS 5.1.3",
    source="kube-linter wildcard-in-rules: rules[*].verbs, rules[*].resources",
    remediation="""List the verbs and resources the role needs instead of "*", or bind the
        subjects to an admin role (ControlConfig.admin_roles) if they really administer.""",
    evidence=("cluster", "manifests"),
    reads=("Role", "ClusterRole"),
)
def no_wildcard_rules(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def judge(role: Obj) -> Outcome | None:
        if name_of(role) in config.admin_roles or _bootstrap(role):
            return None
        wildcards = [finding for rule in rules_of(role) for finding in _wildcards(rule)]
        if wildcards:
            return Outcome(ref(role), False, f"wildcard in {', '.join(wildcards)}")
        return Outcome(ref(role), True, "no wildcard verbs or resources")

    return judge_each(evidence.of("Role", "ClusterRole"), judge)


def _powers(role: Obj | None, ref_kind: str, ref_name: str) -> str | None:
    """Why a bound role amounts to administering the cluster (None: it does not)."""
    if ref_kind == "ClusterRole" and ref_name == "cluster-admin":
        return "cluster-admin"
    if role is None:
        return None
    rules = rules_of(role)
    reasons = [r for rule in rules for r in _wildcards(rule)] + [r for rule in rules for r in _escalations(rule)]
    return f"{ref_kind} {ref_name} ({'; '.join(reasons)})" if reasons else None


@control(
    id="OPS-RBAC-002",
    title="cluster-admin, and roles with wildcards or escalation verbs, are bound only to the break-glass group",
    severity="ERROR",
    requirement="infra plan §6.1 (Requirements 5.1): developer, operator and admin roles separated",
    framework="CIS 5.1.1, 5.1.8",
    source="kube-linter cluster-admin-role-binding: ClusterRoleBinding and RoleBinding roleRef, subjects",
    remediation="""Bind users and service accounts to a narrower role; keep cluster-admin, and
        roles with "*" or bind/escalate/impersonate, for the break-glass group
        (ControlConfig.break_glass_groups). A RoleBinding to cluster-admin makes its subjects
        admins of the namespace, Secrets and RBAC included.""",
    evidence=("cluster", "manifests"),
    reads=("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"),
)
def cluster_admin_break_glass_only(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    cluster_roles = {name_of(role): role for role in evidence.of("ClusterRole")}
    roles = {(namespace_of(role), name_of(role)): role for role in evidence.of("Role")}

    def judge(binding: Obj) -> Outcome | None:
        if _bootstrap(binding):
            return None
        role_ref = mapping(binding.get("roleRef"), "roleRef")
        kind = text(role_ref.get("kind"), "roleRef.kind") or ""
        name = text(role_ref.get("name"), "roleRef.name") or ""
        if kind == "ClusterRole":
            role = cluster_roles.get(name)
        else:
            role = roles.get((namespace_of(binding), name)) if binding.get("kind") == "RoleBinding" else None
        power = _powers(role, kind, name)
        if power is None:
            return None
        others = [
            f"{subject.get('kind')} {subject.get('name')}"
            for subject in mappings(binding.get("subjects"), "subjects")
            if not (subject.get("kind") == "Group" and subject.get("name") in config.break_glass_groups)
        ]
        if others:
            return Outcome(ref(binding), False, f"grants {power} to {', '.join(others)}")
        return Outcome(ref(binding), True, f"grants {power} to the break-glass group only")

    return judge_each(evidence.of("ClusterRoleBinding", "RoleBinding"), judge)


@control(
    id="OPS-RBAC-003",
    title="Roles outside admin roles do not read Secrets",
    severity="ERROR",
    requirement="infra plan §6.1 (Requirements 5.1), §6.3 (Requirements 5.3): least privilege, secrets",
    framework="CIS 5.1.2",
    source="kube-linter access-to-secrets: rules[*] get/list/watch on secrets",
    remediation="""Remove get, list and watch on secrets, or narrow get to the Secrets the
        subject needs with resourceNames; list and watch return every Secret of the scope.""",
    evidence=("cluster", "manifests"),
    reads=("Role", "ClusterRole"),
)
def no_secret_reads(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _judge_roles(evidence, config, _secret_reads, "reads Secrets", "reads no Secret")


@control(
    id="OPS-RBAC-004",
    title="Roles outside admin roles grant no bind, escalate or impersonate",
    severity="ERROR",
    requirement="infra plan §6.1 (Requirements 5.1); §14.3 privilege escalation tests",
    framework="CIS 5.1.8",
    source="Kubernetes RBAC good practices (escalate, bind, impersonate verbs): rules[*].verbs",
    remediation="""Remove the bind, escalate and impersonate verbs: with them a subject grants
        itself any permission or acts as another user.""",
    evidence=("cluster", "manifests"),
    reads=("Role", "ClusterRole"),
)
def no_escalation_verbs(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _judge_roles(evidence, config, _escalations, "escalation", "no bind, escalate or impersonate")


@control(
    id="OPS-RBAC-005",
    title="Roles outside admin roles do not exec or attach into pods",
    severity="ERROR",
    requirement="infra plan §6.1 (Requirements 5.1); §14.3 privilege escalation tests",
    framework="CIS 5.1.4",
    source="Kubernetes RBAC good practices (pods/exec, pods/attach): rules[*] create/get on pods/exec, pods/attach",
    remediation="""Remove create and get on pods/exec and pods/attach: a shell in a pod has its
        ServiceAccount token, its mounted Secrets and its network access.""",
    evidence=("cluster", "manifests"),
    reads=("Role", "ClusterRole"),
)
def no_pod_shells(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _judge_roles(evidence, config, _pod_shells, "shell into pods", "no exec or attach into pods")


CONTROLS = [no_wildcard_rules, cluster_admin_break_glass_only, no_secret_reads, no_escalation_verbs, no_pod_shells]
