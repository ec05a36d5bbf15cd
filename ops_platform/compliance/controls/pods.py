"""The pod specs of the app workloads, and judging them: the one walker every pod control uses.

A :class:`PodTemplate` is the pod a workload runs (a Pod itself, or the
template of a Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob)
with its containers of the three lists (init, regular, ephemeral), each named
for findings: ``container app``, ``init container migrate``, ``container #0
(unnamed)``. Objects a controller owns (a Job of a CronJob, the ReplicaSet
of a Deployment, a Pod of a ReplicaSet) are judged through their owner.

:func:`judge_pods` gives one outcome per workload from a function listing its
problems; :func:`per_container` makes such a function from a check of one
container. A pod spec that cannot be read fails every pod control with the
reason, and so does a container field of the wrong shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ops_platform.compliance.controls.shapes import ShapeError, mapping, mappings, text
from ops_platform.compliance.evidence import KIND_API_VERSIONS, Evidence, Obj, namespace_of, ref
from ops_platform.compliance.model import ControlConfig, Outcome

POD_KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")
LONG_RUNNING_KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
INIT, REGULAR, EPHEMERAL = "initContainers", "containers", "ephemeralContainers"
ALL_CONTAINERS = (INIT, REGULAR, EPHEMERAL)
_LABELS = {INIT: "init container", REGULAR: "container", EPHEMERAL: "ephemeral container"}


def listable(*kinds: str) -> tuple[str, ...]:
    """The kinds the cluster collector can list; the others are judged where manifests hold them."""
    return tuple(kind for kind in kinds if kind in KIND_API_VERSIONS)


POD_READS = ("Namespace", *listable(*POD_KINDS))


@dataclass(frozen=True)
class Container:
    label: str
    """How findings name it: ``container app``, ``init container #1 (unnamed)``."""
    spec: Obj
    list: str
    """``containers``, ``initContainers`` or ``ephemeralContainers``."""

    def security(self, key: str) -> Any:
        return mapping(self.spec.get("securityContext"), f"{self.label} securityContext").get(key)


@dataclass(frozen=True)
class PodTemplate:
    workload: Obj
    spec: Obj
    metadata: Obj
    containers: tuple[Container, ...] = ()
    problem: str | None = None
    """Why the pod spec cannot be read; every pod control fails the workload with it."""

    def of(self, lists: Iterable[str] = ALL_CONTAINERS) -> list[Container]:
        wanted = set(lists)
        return [container for container in self.containers if container.list in wanted]

    def pod_security(self, key: str) -> Any:
        return mapping(self.spec.get("securityContext"), "spec.securityContext").get(key)

    def effective(self, container: Container, key: str) -> Any:
        """A securityContext setting of a container: its own, else the pod's."""
        own = container.security(key)
        return own if own is not None else self.pod_security(key)

    def labels(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in mapping(self.metadata.get("labels"), "pod labels").items()}

    def annotations(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in mapping(self.metadata.get("annotations"), "pod annotations").items()}


def _template_path(kind: str) -> tuple[str, ...]:
    if kind == "Pod":
        return ()
    if kind == "CronJob":
        return ("spec", "jobTemplate", "spec", "template")
    return ("spec", "template")


def pod_template(workload: Obj) -> PodTemplate:
    """The pod of a workload; ``problem`` says why it cannot be read."""
    path = _template_path(str(workload.get("kind")))
    try:
        node: Obj = workload
        for depth, key in enumerate(path):
            node = mapping(node.get(key), ".".join(path[: depth + 1]))
        prefix = ".".join(path)
        metadata = mapping(node.get("metadata"), f"{prefix}.metadata".lstrip("."))
        spec = mapping(node.get("spec"), f"{prefix}.spec".lstrip("."))
        found: list[Container] = []
        for field in ALL_CONTAINERS:
            where = f"{prefix}.spec.{field}".lstrip(".")
            for index, container in enumerate(mappings(spec.get(field), where)):
                name = text(container.get("name"), f"{where}[{index}].name")
                shown = name if name else f"#{index} (unnamed)"
                found.append(Container(f"{_LABELS[field]} {shown}", container, field))
    except ShapeError as exc:
        return PodTemplate(workload, {}, {}, problem=str(exc))
    return PodTemplate(workload, spec, metadata, tuple(found))


def is_owned(obj: Obj, *, by_controller: bool = True) -> bool:
    """Made by a controller (or, with ``by_controller=False``, owned by anything)."""
    metadata = obj.get("metadata")
    owners = metadata.get("ownerReferences") if isinstance(metadata, dict) else None
    if not isinstance(owners, list):
        return False
    return any(isinstance(owner, dict) and (owner.get("controller") or not by_controller) for owner in owners)


def app_pod_templates(
    evidence: Evidence, config: ControlConfig, kinds: Iterable[str] = POD_KINDS
) -> Iterator[PodTemplate]:
    """The pod of every workload of ``kinds`` in an app namespace that no controller owns.

    Read once per evidence (its index cache, cleared when an object is added) for all pod controls.
    """
    key = ("controls.pods.app_pod_templates", tuple(kinds), config.app_namespace_label, config.app_namespaces)
    cache: dict[Any, Any] = getattr(evidence, "_index", {})
    if key not in cache:
        namespaces = set(evidence.app_namespaces(config))
        cache[key] = [
            pod_template(workload)
            for workload in evidence.of(*key[1])
            if namespace_of(workload) in namespaces and not is_owned(workload)
        ]
    return iter(cache[key])


PodProblems = Callable[[PodTemplate], Iterable[str]]


def judge_pods(
    evidence: Evidence,
    config: ControlConfig,
    problems: PodProblems,
    passing: str,
    *,
    kinds: Iterable[str] = POD_KINDS,
) -> Iterator[Outcome]:
    """One outcome per app workload: failing with ``problems(template)`` joined, if any."""
    for template in app_pod_templates(evidence, config, kinds):
        subject = ref(template.workload)
        if template.problem is not None:
            yield Outcome(subject, False, f"not judged: {template.problem}")
            continue
        try:
            found = list(problems(template))
        except ShapeError as exc:
            found = [f"not judged: {exc}"]
        yield Outcome(subject, not found, "; ".join(found) if found else passing)


ContainerCheck = Callable[[Container, PodTemplate], str | None]


def per_container(check: ContainerCheck, lists: Iterable[str] = ALL_CONTAINERS) -> PodProblems:
    """Problems of a pod from ``check(container, template)`` (None: the container is fine)."""
    wanted = tuple(lists)

    def problems(template: PodTemplate) -> list[str]:
        found = []
        for container in template.of(wanted):
            try:
                problem = check(container, template)
            except ShapeError as exc:
                problem = f"not judged: {exc}"
            if problem is not None:
                found.append(f"{container.label}: {problem}")
        return found

    return problems


def volumes(template: PodTemplate) -> list[Obj]:
    return mappings(template.spec.get("volumes"), "spec.volumes")


def volume_name(volume: Obj, index: int) -> str:
    name = text(volume.get("name"), f"spec.volumes[{index}].name")
    return name if name else f"#{index} (unnamed)"
