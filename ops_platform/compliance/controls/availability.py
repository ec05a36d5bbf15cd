"""Availability of the app workloads through drains and load (InfraSpec §3.3; infra plan §12).

InfraSpec §3.3 asks for an HPA at 60 % CPU from 2 to 10 replicas and a
PodDisruptionBudget of maxUnavailable 1. The controls judge what the objects
do, not only that they exist: a budget must let at least one pod go (one that
allows none, such as ``maxUnavailable: 0`` or ``minAvailable: 100%``, blocks
every eviction and so every node drain) and keep at least one up, at the
replicas the workload runs and, when an HPA scales it, at the HPA's
minReplicas; an HPA must keep 2 replicas; the replicas must be spread so
that one node or zone does not hold them all.

Allowed disruptions follow the disruption controller: ``maxUnavailable`` N
(or P %, rounded up) lets N go; ``minAvailable`` M (or P %, rounded up) keeps M
and lets the rest go; a budget with neither keeps nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ops_platform.compliance.controls.index import ScopedNames, SelectorIndex, selects
from ops_platform.compliance.controls.pods import pod_template
from ops_platform.compliance.controls.shapes import ShapeError, judge_each, mapping, mappings, text
from ops_platform.compliance.evidence import Evidence, Obj, name_of, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

MIN_REPLICAS = 2
PERCENT = re.compile(r"^([0-9]+)%$")


def _app(evidence: Evidence, config: ControlConfig, *kinds: str) -> list[Obj]:
    namespaces = evidence.app_namespaces(config)
    return [obj for kind in kinds for namespace in namespaces for obj in evidence.by_namespace(kind).get(namespace, [])]


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShapeError(f"{where} {value!r} is not a non-negative integer")
    return value


def scaled(value: object, replicas: int, where: str) -> int:
    """An IntOrString of a budget against ``replicas``: N as is, P % of the replicas rounded up."""
    if isinstance(value, str):
        match = PERCENT.match(value)
        if not match or int(match.group(1)) > 100:
            raise ShapeError(f"{where} {value!r} is neither an integer nor a percentage (0-100%)")
        return math.ceil(replicas * int(match.group(1)) / 100)
    return _count(value, where)


def allowed_disruptions(pdb: Obj, replicas: int) -> int:
    """How many of ``replicas`` healthy pods a PodDisruptionBudget lets be evicted at once."""
    spec = mapping(pdb.get("spec"), "spec")
    max_unavailable, min_available = spec.get("maxUnavailable"), spec.get("minAvailable")
    if max_unavailable is not None and min_available is not None:
        raise ShapeError("spec sets both minAvailable and maxUnavailable (the API server refuses it)")
    if max_unavailable is not None:
        desired_healthy = max(replicas - scaled(max_unavailable, replicas, "maxUnavailable"), 0)
    elif min_available is not None:
        desired_healthy = scaled(min_available, replicas, "minAvailable")
    else:
        desired_healthy = 0
    return max(replicas - desired_healthy, 0)


def _budget(pdb: Obj) -> str:
    spec = pdb.get("spec") if isinstance(pdb.get("spec"), dict) else {}
    for field in ("maxUnavailable", "minAvailable"):
        if spec.get(field) is not None:
            return f"PodDisruptionBudget {name_of(pdb)} ({field} {spec[field]})"
    return f"PodDisruptionBudget {name_of(pdb)} (neither minAvailable nor maxUnavailable)"


@dataclass(frozen=True)
class Scale:
    """The replica counts a workload runs at: its own, and its HPA's minReplicas."""

    counts: tuple[tuple[int, str], ...]
    hpa: Obj | None = None

    @property
    def lowest(self) -> tuple[int, str]:
        return min(self.counts)


def _scale_target(hpa: Obj) -> tuple[str, str] | None:
    target = mapping(mapping(hpa.get("spec"), "spec").get("scaleTargetRef"), "spec.scaleTargetRef")
    return (str(target.get("kind")), str(target.get("name"))) if target else None


def hpa_index(evidence: Evidence) -> ScopedNames:
    """HorizontalPodAutoscalers by (target kind, target name): ``.get(workload, (kind, name))``."""
    return ScopedNames(evidence.of("HorizontalPodAutoscaler"), _scale_target)


def hpas_targeting(hpas: ScopedNames, workload: Obj) -> list[Obj]:
    return hpas.get(workload, (str(workload.get("kind")), name_of(workload)))


def min_replicas(hpa: Obj) -> int:
    value = mapping(hpa.get("spec"), "spec").get("minReplicas")
    return 1 if value is None else _count(value, f"HorizontalPodAutoscaler {name_of(hpa)} minReplicas")


def scale_of(workload: Obj, hpas: ScopedNames) -> Scale:
    spec = mapping(workload.get("spec"), "spec")
    own = spec.get("replicas")
    targeting = hpas_targeting(hpas, workload)
    counts: list[tuple[int, str]] = []
    if own is not None or not targeting:
        counts.append((1 if own is None else _count(own, "spec.replicas"), "replicas"))
    if targeting:
        counts.append((min_replicas(targeting[0]), f"HPA {name_of(targeting[0])} minReplicas"))
    return Scale(tuple(counts), targeting[0] if targeting else None)


def _pdb_selector(pdb: Obj) -> object:
    selector = mapping(pdb.get("spec"), "spec").get("selector")
    if pdb.get("apiVersion") == "policy/v1beta1" and selector == {}:
        return None  # policy/v1beta1: an empty selector selects no pod (policy/v1: every pod)
    return selector


@control(
    id="OPS-AVAIL-001",
    title="Every app Deployment and StatefulSet has a PodDisruptionBudget that lets one pod go and keeps one up",
    severity="WARN",
    requirement="InfraSpec §3.3 (PodDisruptionBudget maxUnavailable: 1); infra plan §12 autoscaling layer",
    framework=None,
    source="Gatekeeper library k8spoddisruptionbudget; Kyverno pdb-minavailable; kube-score "
    "deployment-has-poddisruptionbudget: spec.minAvailable, spec.maxUnavailable, spec.selector",
    remediation="""Add one PodDisruptionBudget with maxUnavailable: 1 whose selector matches the
        pod labels, with at least 2 replicas (HPA minReplicas 2): then a node drain evicts one
        pod at a time. maxUnavailable: 0 or minAvailable equal to the replicas (or 100%) blocks
        every drain; two budgets on the same pods make the eviction API refuse them all.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "Deployment", "StatefulSet", "PodDisruptionBudget", "HorizontalPodAutoscaler"),
)
def pdb_per_deployment(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    budgets = SelectorIndex(evidence.of("PodDisruptionBudget"), _pdb_selector)
    hpas = hpa_index(evidence)

    def judge(workload: Obj) -> Outcome:
        subject = ref(workload)
        template = pod_template(workload)
        if template.problem:
            return Outcome(subject, False, f"not judged: {template.problem}")
        matching = budgets.selecting(workload, template.labels())
        scale = scale_of(workload, hpas)
        if scale.lowest[0] == 0:
            return Outcome(subject, True, "scaled to 0 replicas: nothing to disrupt")
        if not matching:
            return Outcome(subject, False, "no PodDisruptionBudget selects its pods")
        if len(matching) > 1:
            names = ", ".join(sorted(name_of(pdb) for pdb in matching))
            return Outcome(subject, False, f"{len(matching)} PodDisruptionBudgets select its pods ({names}): the "
                           "eviction API refuses to evict a pod with more than one, so drains block")
        [pdb] = matching
        try:
            verdicts = [(count, why, allowed_disruptions(pdb, count)) for count, why in scale.counts]
        except ShapeError as exc:
            return Outcome(subject, False, f"{_budget(pdb)}: {exc}")
        for count, why, allowed in verdicts:
            if allowed == 0:
                return Outcome(subject, False, f"{_budget(pdb)} allows no disruption at {count} replica(s) "
                               f"({why}): it blocks every eviction and node drain")
            if count >= 2 and allowed >= count:
                return Outcome(subject, False, f"{_budget(pdb)} lets all {count} pods ({why}) go at once: it "
                               "keeps none up")
        count, why, allowed = min(verdicts)
        return Outcome(subject, True, f"{_budget(pdb)} lets {allowed} of {count} pod(s) ({why}) go at a time")

    return judge_each(_app(evidence, config, "Deployment", "StatefulSet"), judge)


@control(
    id="OPS-AVAIL-002",
    title="Every app Deployment has a HorizontalPodAutoscaler keeping 2 replicas or more",
    severity="WARN",
    requirement="infra plan §12.1 (Requirements 11.1); InfraSpec §3.3 HPA CPU 60%, minReplicas 2, maxReplicas 10",
    framework=None,
    source="HorizontalPodAutoscaler spec.scaleTargetRef, spec.minReplicas (1 when unset), spec.maxReplicas",
    remediation="""Add one HorizontalPodAutoscaler (autoscaling/v2) with scaleTargetRef kind:
        Deployment and the Deployment's name, minReplicas: 2 and maxReplicas: 10 (InfraSpec §3.3).""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "Deployment", "HorizontalPodAutoscaler"),
)
def hpa_per_deployment(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    hpas = hpa_index(evidence)

    def judge(deployment: Obj) -> Outcome:
        subject = ref(deployment)
        targeting = hpas_targeting(hpas, deployment)
        if not targeting:
            return Outcome(subject, False, "no HorizontalPodAutoscaler targets it")
        if len(targeting) > 1:
            names = ", ".join(sorted(name_of(hpa) for hpa in targeting))
            return Outcome(subject, False, f"{len(targeting)} HorizontalPodAutoscalers target it ({names}): they "
                           "fight over its replicas")
        [hpa] = targeting
        least = min_replicas(hpa)
        most = mapping(hpa.get("spec"), "spec").get("maxReplicas")
        name = f"HorizontalPodAutoscaler {name_of(hpa)}"
        if least < MIN_REPLICAS:
            return Outcome(subject, False, f"{name} has minReplicas {least}: one pod down is the service down "
                           f"(InfraSpec §3.3: {MIN_REPLICAS})")
        if most is None or _count(most, "maxReplicas") < least:
            return Outcome(subject, False, f"{name} has maxReplicas {most} below minReplicas {least}")
        return Outcome(subject, True, f"{name} scales it from {least} to {most} replicas")

    return judge_each(_app(evidence, config, "Deployment"), judge)


def _spreads_own_pods(template_spec: Obj, labels: dict[str, str]) -> str | None:
    """How the pod spec spreads the pods it makes (None: it does not)."""
    constraints = mappings(template_spec.get("topologySpreadConstraints"), "topologySpreadConstraints")
    for constraint in constraints:
        key = text(constraint.get("topologyKey"), "topologySpreadConstraints[].topologyKey")
        if key and selects(constraint.get("labelSelector"), labels):
            return f"topologySpreadConstraints on {key}"
    affinity = mapping(mapping(template_spec.get("affinity"), "affinity").get("podAntiAffinity"),
                       "affinity.podAntiAffinity")
    required = mappings(affinity.get("requiredDuringSchedulingIgnoredDuringExecution"), "podAntiAffinity.required")
    preferred = [
        mapping(term.get("podAffinityTerm"), "podAntiAffinity.preferred[].podAffinityTerm")
        for term in mappings(affinity.get("preferredDuringSchedulingIgnoredDuringExecution"),
                             "podAntiAffinity.preferred")
    ]
    for term in [*required, *preferred]:
        key = text(term.get("topologyKey"), "podAntiAffinity topologyKey")
        if key and selects(term.get("labelSelector"), labels):
            return f"podAntiAffinity on {key}"
    return None


@control(
    id="OPS-AVAIL-003",
    title="App Deployments run 2 replicas or more, spread over nodes or zones",
    severity="WARN",
    requirement="InfraSpec §3.3 (minReplicas 2); infra plan §1.3 (worker node groups over zones), §12",
    framework=None,
    source="kube-score deployment-replicas, deployment-has-host-podantiaffinity; kube-linter no-anti-affinity: "
    "spec.replicas, spec.template.spec.topologySpreadConstraints, affinity.podAntiAffinity",
    remediation="""Run at least 2 replicas (replicas, or the HPA's minReplicas) and add a
        topologySpreadConstraint (topologyKey topology.kubernetes.io/zone or kubernetes.io/hostname)
        or a podAntiAffinity whose labelSelector matches the Deployment's own pod labels.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "Deployment", "HorizontalPodAutoscaler"),
)
def replicas_spread(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    hpas = hpa_index(evidence)

    def judge(deployment: Obj) -> Outcome:
        subject = ref(deployment)
        template = pod_template(deployment)
        if template.problem:
            return Outcome(subject, False, f"not judged: {template.problem}")
        count, why = scale_of(deployment, hpas).lowest
        spread = _spreads_own_pods(template.spec, template.labels())
        problems = []
        if count < MIN_REPLICAS:
            problems.append(f"runs {count} replica(s) ({why})")
        if spread is None:
            problems.append("no topologySpreadConstraints or podAntiAffinity selecting its own pods")
        if problems:
            return Outcome(subject, False, "; ".join(problems))
        return Outcome(subject, True, f"{count} replicas ({why}), {spread}")

    return judge_each(_app(evidence, config, "Deployment"), judge)


CONTROLS = [pdb_per_deployment, hpa_per_deployment, replicas_spread]
