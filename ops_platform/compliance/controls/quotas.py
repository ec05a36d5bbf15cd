"""Resource boundaries of the apps: a ResourceQuota and a LimitRange per app namespace
(infra plan §13.2; InfraSpec §3.3). Availability (PDB, HPA) is in
:mod:`~ops_platform.compliance.controls.availability`.
"""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.evidence import Evidence, name_of
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


CONTROLS = [resource_quota_per_namespace, limit_range_per_namespace]
