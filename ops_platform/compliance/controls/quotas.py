"""Resource boundaries and availability of the apps (infra plan §12, §13.2; InfraSpec §3.3).

Per app namespace: a ResourceQuota and a LimitRange (OPS-QUOTA-*). Per app
Deployment: a PodDisruptionBudget selecting its pods and a
HorizontalPodAutoscaler scaling it (OPS-AVAIL-*).
"""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.evidence import Evidence, name_of, namespace_of, pod_labels, ref, selector_matches
from ops_platform.compliance.model import ControlConfig, Outcome, control


def _namespaces_having(evidence: Evidence, config: ControlConfig, kind: str) -> Iterator[Outcome]:
    present = evidence.by_namespace(kind)
    for namespace in evidence.app_namespaces(config):
        names = sorted(name_of(obj) for obj in present.get(namespace, []))
        if names:
            yield Outcome(f"Namespace {namespace}", True, f"{kind} {', '.join(names)}")
        else:
            yield Outcome(f"Namespace {namespace}", False, f"no {kind} in the namespace")


@control(
    id="OPS-QUOTA-001",
    title="Every app namespace has a ResourceQuota",
    severity="WARN",
    requirement="infra plan §13.2 (Requirements 12.2); InfraSpec §3.3 ResourceQuota per namespace",
    framework=None,
    remediation="""Add a ResourceQuota to the namespace (requests.cpu, requests.memory,
        limits.cpu, limits.memory, pods) sized from the capacity plan.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "ResourceQuota"),
)
def resource_quota_per_namespace(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _namespaces_having(evidence, config, "ResourceQuota")


@control(
    id="OPS-QUOTA-002",
    title="Every app namespace has a LimitRange",
    severity="WARN",
    requirement="infra plan §13.2 (Requirements 12.2): LimitRange limits pod resources",
    framework=None,
    remediation="""Add a LimitRange of type Container with default and defaultRequest for cpu
        and memory, so a container without resources still gets bounded ones.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "LimitRange"),
)
def limit_range_per_namespace(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return _namespaces_having(evidence, config, "LimitRange")


def _app_deployments(evidence: Evidence, config: ControlConfig) -> Iterator[dict]:
    by_namespace = evidence.by_namespace("Deployment")
    for namespace in evidence.app_namespaces(config):
        yield from by_namespace.get(namespace, [])


@control(
    id="OPS-AVAIL-001",
    title="Every app Deployment has a PodDisruptionBudget",
    severity="WARN",
    requirement="InfraSpec §3.3 (PodDisruptionBudget maxUnavailable: 1); infra plan §12 autoscaling layer",
    framework=None,
    remediation="""Add a PodDisruptionBudget (maxUnavailable: 1) whose selector matches the
        Deployment's pod labels, so node drains keep the service up.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "Deployment", "PodDisruptionBudget"),
)
def pdb_per_deployment(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    budgets = evidence.by_namespace("PodDisruptionBudget")
    for deployment in _app_deployments(evidence, config):
        labels = pod_labels(deployment)
        matching = sorted(
            name_of(pdb)
            for pdb in budgets.get(namespace_of(deployment), [])
            if selector_matches((pdb.get("spec") or {}).get("selector"), labels)
        )
        if matching:
            yield Outcome(ref(deployment), True, f"PodDisruptionBudget {', '.join(matching)}")
        else:
            yield Outcome(ref(deployment), False, "no PodDisruptionBudget selects its pods")


@control(
    id="OPS-AVAIL-002",
    title="Every app Deployment has a HorizontalPodAutoscaler",
    severity="WARN",
    requirement="infra plan §12.1 (Requirements 11.1); InfraSpec §3.3 HPA CPU 60%, minReplicas 2, maxReplicas 10",
    framework=None,
    remediation="""Add a HorizontalPodAutoscaler (autoscaling/v2) with scaleTargetRef
        kind: Deployment and the Deployment's name.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "Deployment", "HorizontalPodAutoscaler"),
)
def hpa_per_deployment(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    scaled: dict[tuple[str, str], str] = {}
    for hpa in evidence.of("HorizontalPodAutoscaler"):
        target = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        if target.get("kind") == "Deployment":
            scaled.setdefault((namespace_of(hpa), target.get("name") or ""), name_of(hpa))
    for deployment in _app_deployments(evidence, config):
        hpa_name = scaled.get((namespace_of(deployment), name_of(deployment)))
        if hpa_name:
            yield Outcome(ref(deployment), True, f"HorizontalPodAutoscaler {hpa_name}")
        else:
            yield Outcome(ref(deployment), False, "no HorizontalPodAutoscaler targets it")


CONTROLS = [resource_quota_per_namespace, limit_range_per_namespace, pdb_per_deployment, hpa_per_deployment]
