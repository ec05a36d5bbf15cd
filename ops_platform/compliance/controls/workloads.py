"""Workloads of the app namespaces: security context, resources and images (InfraSpec §2, §3.2).

Each control judges a workload (Deployment, StatefulSet, DaemonSet, CronJob,
and Jobs and Pods no controller owns) once, naming the containers (init
containers included) that fail. Platform namespaces run upstream charts and
are out of scope here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from ops_platform.compliance.evidence import (
    WORKLOAD_KINDS,
    Evidence,
    Obj,
    containers,
    is_controlled,
    namespace_of,
    pod_spec,
    ref,
)
from ops_platform.compliance.model import ControlConfig, Outcome, control

ANY_ECR = re.compile(r"^[0-9]{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/")
GIT_SHA_TAG = re.compile(r"^[0-9a-f]{7,40}$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
RESOURCE_FIELDS = ("requests.cpu", "requests.memory", "limits.cpu", "limits.memory")


def app_workloads(evidence: Evidence, config: ControlConfig) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) of every workload in an app namespace."""
    namespaces = set(evidence.app_namespaces(config))
    for workload in evidence.of(*WORKLOAD_KINDS):
        if namespace_of(workload) in namespaces and not is_controlled(workload):
            yield workload, pod_spec(workload)


def _judge(
    evidence: Evidence,
    config: ControlConfig,
    problem: Callable[[Obj, Obj], str | None],
    passing: str,
) -> Iterator[Outcome]:
    """One outcome per workload from ``problem(container, pod spec)`` (None: the container is fine)."""
    for workload, spec in app_workloads(evidence, config):
        problems = [
            f"container {container.get('name')}: {found}"
            for container in containers(spec)
            if (found := problem(container, spec)) is not None
        ]
        if problems:
            yield Outcome(ref(workload), False, "; ".join(problems))
        else:
            yield Outcome(ref(workload), True, passing)


def _effective(container: Obj, spec: Obj, key: str) -> object:
    """A security context setting: the container's own, else the pod's."""
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (spec.get("securityContext") or {}).get(key)


def _root_problem(container: Obj, spec: Obj) -> str | None:
    user = _effective(container, spec, "runAsUser")
    if user == 0:
        return "runAsUser is 0 (root)"
    if isinstance(user, int) and user > 0:
        return None
    if _effective(container, spec, "runAsNonRoot") is True:
        return None
    return "may run as root (neither runAsNonRoot: true nor runAsUser > 0)"


@control(
    id="OPS-WL-001",
    title="Containers run as non-root",
    severity="ERROR",
    requirement="InfraSpec §2.2 (non-root user); infra plan §6.4 (Requirements 5.4)",
    framework="CIS 5.2.7",
    remediation="""Set securityContext.runAsNonRoot: true (pod or container) and a non-zero
        runAsUser, and build the image with a non-root USER.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", *WORKLOAD_KINDS),
)
def non_root(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _judge(evidence, config, _root_problem, "every container runs as non-root")


@control(
    id="OPS-WL-002",
    title="Containers are not privileged",
    severity="ERROR",
    requirement="infra plan §6.4 (Requirements 5.4), §14.3 privilege escalation tests",
    framework="CIS 5.2.2",
    remediation="Remove securityContext.privileged: true; grant only the capabilities the container needs.",
    evidence=("cluster", "manifests"),
    reads=("Namespace", *WORKLOAD_KINDS),
)
def not_privileged(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Obj, spec: Obj) -> str | None:
        privileged = (container.get("securityContext") or {}).get("privileged") is True
        return "privileged: true" if privileged else None

    return _judge(evidence, config, problem, "no privileged container")


@control(
    id="OPS-WL-003",
    title="Containers forbid privilege escalation",
    severity="ERROR",
    requirement="infra plan §6.4 (Requirements 5.4), §14.3 privilege escalation tests",
    framework="CIS 5.2.6",
    remediation="Set securityContext.allowPrivilegeEscalation: false on every container (it defaults to true).",
    evidence=("cluster", "manifests"),
    reads=("Namespace", *WORKLOAD_KINDS),
)
def no_privilege_escalation(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Obj, spec: Obj) -> str | None:
        value = (container.get("securityContext") or {}).get("allowPrivilegeEscalation")
        if value is False:
            return None
        return "allowPrivilegeEscalation is true" if value else "allowPrivilegeEscalation not set (defaults to true)"

    return _judge(evidence, config, problem, "every container forbids privilege escalation")


def _limit_range_defaults(evidence: Evidence, namespace: str) -> set[str]:
    """Resource fields a LimitRange of the namespace fills in for containers that omit them."""
    filled: set[str] = set()
    for limit_range in evidence.by_namespace("LimitRange").get(namespace, []):
        for limit in (limit_range.get("spec") or {}).get("limits") or []:
            if limit.get("type") != "Container":
                continue
            for field, section in (("limits", "default"), ("requests", "defaultRequest")):
                filled.update(f"{field}.{resource}" for resource in (limit.get(section) or {}))
    return filled


@control(
    id="OPS-WL-004",
    title="Containers set CPU and memory requests and limits",
    severity="WARN",
    requirement="InfraSpec §3.2 (resource requests/limits in values); infra plan §13.2 (Requirements 12.2)",
    framework=None,
    remediation="""Set resources.requests and resources.limits for cpu and memory on every
        container (or defaults in the namespace's LimitRange).""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "LimitRange", *WORKLOAD_KINDS),
)
def resources_set(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    defaults_by_namespace: dict[str, set[str]] = {}

    for workload, spec in app_workloads(evidence, config):
        namespace = namespace_of(workload)
        if namespace not in defaults_by_namespace:
            defaults_by_namespace[namespace] = _limit_range_defaults(evidence, namespace)
        defaults = defaults_by_namespace[namespace]
        problems = []
        for container in containers(spec):
            resources = container.get("resources") or {}
            limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
            present = {f"limits.{r}" for r in limits} | {f"requests.{r}" for r in requests}
            # A request left out defaults to the limit.
            present |= {f"requests.{r}" for r in limits}
            missing = [field for field in RESOURCE_FIELDS if field not in present and field not in defaults]
            if missing:
                problems.append(f"container {container.get('name')}: no {', '.join(missing)}")
        if problems:
            yield Outcome(ref(workload), False, "; ".join(problems))
        else:
            yield Outcome(ref(workload), True, "cpu and memory requests and limits set")


def _registry_problem(config: ControlConfig) -> Callable[[Obj, Obj], str | None]:
    def problem(container: Obj, spec: Obj) -> str | None:
        image = str(container.get("image") or "")
        if config.registries:
            if any(image.startswith(prefix) for prefix in config.registries):
                return None
            return f"image {image or '(none)'} is not from {' or '.join(config.registries)}"
        return None if ANY_ECR.match(image) else f"image {image or '(none)'} is not from an ECR registry"

    return problem


@control(
    id="OPS-IMG-001",
    title="Images come from the platform registry",
    severity="ERROR",
    requirement="InfraSpec §2.3 (ECR, scanned with Trivy); infra plan §7.2 (Requirements 6.2)",
    framework="CIS 5.5.1",
    remediation="""Push the image through CI to the platform's ECR registry
        (<account>.dkr.ecr.<region>.amazonaws.com/<service>-<environment>) and deploy it from there.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", *WORKLOAD_KINDS),
)
def platform_registry(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _judge(evidence, config, _registry_problem(config), "every image comes from the platform registry")


def pin_problem(image: str) -> str | None:
    """Why an image reference is not pinned by git sha tag or digest (None: it is)."""
    if DIGEST.search(image):
        return None
    last_part = image.rsplit("/", 1)[-1]
    _, has_tag, tag = last_part.partition(":")
    if not has_tag:
        return f"image {image or '(none)'} has no tag (means :latest)"
    if tag == "latest":
        return f"image {image} uses :latest"
    if not GIT_SHA_TAG.match(tag):
        return f"image {image}: tag {tag!r} is not a git sha (7-40 hex) and there is no digest"
    return None


@control(
    id="OPS-IMG-002",
    title="Images are pinned by git sha or digest, never :latest",
    severity="ERROR",
    requirement="InfraSpec §2.3 (<service>-<environment>:<git-sha>); infra plan §7.4 (Requirements 6.5) rollback",
    framework=None,
    remediation="Deploy the image by its git sha tag (as CI pushes it) or by digest (@sha256:...).",
    evidence=("cluster", "manifests"),
    reads=("Namespace", *WORKLOAD_KINDS),
)
def pinned_images(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _judge(
        evidence, config, lambda container, spec: pin_problem(str(container.get("image") or "")),
        "every image is pinned",
    )


CONTROLS = [
    non_root,
    not_privileged,
    no_privilege_escalation,
    resources_set,
    platform_registry,
    pinned_images,
]
