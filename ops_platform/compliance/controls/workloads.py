"""Workloads of the app namespaces: security context, resources, credentials, probes (InfraSpec §2, §3.2).

Each control judges a workload (Deployment, StatefulSet, DaemonSet,
ReplicaSet, CronJob, and Jobs and Pods no controller owns) once, naming the
containers (init and ephemeral containers included) that fail; the walker
is :mod:`ops_platform.compliance.controls.pods`. The Pod Security Standards
are in :mod:`~ops_platform.compliance.controls.pod_security`; these are the
controls besides them. Platform namespaces run upstream charts and are out
of scope here.
"""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.controls.index import ScopedNames
from ops_platform.compliance.controls.pods import (
    INIT,
    LONG_RUNNING_KINDS,
    POD_READS,
    REGULAR,
    Container,
    PodTemplate,
    judge_pods,
    listable,
    per_container,
)
from ops_platform.compliance.controls.shapes import judge_each, mapping, mappings, sequence, text
from ops_platform.compliance.evidence import Evidence, Obj, name_of, namespace_of, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

RESOURCE_FIELDS = ("requests.cpu", "requests.memory", "limits.cpu", "limits.memory")


def is_root_id(value: object) -> bool:
    """A uid or gid of 0 (YAML's false is not one)."""
    return value == 0 and not isinstance(value, bool)


def _root_problem(container: Container, template: PodTemplate) -> str | None:
    user = template.effective(container, "runAsUser")
    if is_root_id(user):
        return "runAsUser is 0 (root)"
    if isinstance(user, int) and not isinstance(user, bool) and user > 0:
        return None
    if template.effective(container, "runAsNonRoot") is True:
        return None
    return "may run as root (neither runAsNonRoot: true nor runAsUser > 0)"


@control(
    id="OPS-WL-001",
    title="Containers run as non-root",
    severity="ERROR",
    requirement="InfraSpec §2.2 (non-root user); infra plan §6.4 (Requirements 5.4)",
    framework="CIS 5.2.7",
    source="PSS restricted: spec.securityContext.runAsNonRoot, containers[*].securityContext.runAsNonRoot, "
    "runAsUser (a non-zero runAsUser is accepted here; Gatekeeper asks for runAsNonRoot)",
    remediation="""Set securityContext.runAsNonRoot: true (pod or container) and a non-zero
        runAsUser, and build the image with a non-root USER.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def non_root(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return judge_pods(evidence, config, per_container(_root_problem), "every container runs as non-root")


@control(
    id="OPS-WL-002",
    title="Containers are not privileged",
    severity="ERROR",
    requirement="infra plan §6.4 (Requirements 5.4), §14.3 privilege escalation tests",
    framework="CIS 5.2.2",
    source="PSS baseline: containers[*].securityContext.privileged",
    remediation="Remove securityContext.privileged: true; grant only the capabilities the container needs.",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def not_privileged(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        return "privileged: true" if container.security("privileged") is True else None

    return judge_pods(evidence, config, per_container(problem), "no privileged container")


@control(
    id="OPS-WL-003",
    title="Containers forbid privilege escalation",
    severity="ERROR",
    requirement="infra plan §6.4 (Requirements 5.4), §14.3 privilege escalation tests",
    framework="CIS 5.2.6",
    source="PSS restricted: containers[*].securityContext.allowPrivilegeEscalation",
    remediation="Set securityContext.allowPrivilegeEscalation: false on every container (it defaults to true).",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def no_privilege_escalation(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        value = container.security("allowPrivilegeEscalation")
        if value is False:
            return None
        return "allowPrivilegeEscalation is true" if value else "allowPrivilegeEscalation not set (defaults to true)"

    return judge_pods(evidence, config, per_container(problem), "every container forbids privilege escalation")


def _limit_range_defaults(evidence: Evidence, namespace: str) -> set[str]:
    """Resource fields a LimitRange of the namespace fills in for containers that omit them."""
    filled: set[str] = set()
    for limit_range in evidence.by_namespace("LimitRange").get(namespace, []):
        spec = limit_range.get("spec")
        limits = spec.get("limits") if isinstance(spec, dict) else None
        for limit in limits if isinstance(limits, list) else []:
            if not isinstance(limit, dict) or limit.get("type") != "Container":
                continue
            for field, section in (("limits", "default"), ("requests", "defaultRequest")):
                values = limit.get(section)
                filled.update(f"{field}.{resource}" for resource in (values if isinstance(values, dict) else {}))
    return filled


@control(
    id="OPS-WL-004",
    title="Containers set CPU and memory requests and limits",
    severity="WARN",
    requirement="InfraSpec §3.2 (resource requests/limits in values); infra plan §13.2 (Requirements 12.2)",
    framework=None,
    source="kube-score container-resources; kube-linter unset-cpu-requirements, unset-memory-requirements",
    remediation="""Set resources.requests and resources.limits for cpu and memory on every
        container (or defaults in the namespace's LimitRange).""",
    evidence=("cluster", "manifests"),
    reads=(*POD_READS, "LimitRange"),
)
def resources_set(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    defaults_by_namespace: dict[str, set[str]] = {}

    def problem(container: Container, template: PodTemplate) -> str | None:
        namespace = namespace_of(template.workload)
        if namespace not in defaults_by_namespace:
            defaults_by_namespace[namespace] = _limit_range_defaults(evidence, namespace)
        resources = mapping(container.spec.get("resources"), f"{container.label} resources")
        limits = mapping(resources.get("limits"), f"{container.label} resources.limits")
        requests = mapping(resources.get("requests"), f"{container.label} resources.requests")
        present = {f"limits.{r}" for r in limits} | {f"requests.{r}" for r in requests}
        # A request left out defaults to the limit.
        present |= {f"requests.{r}" for r in limits}
        missing = [f for f in RESOURCE_FIELDS if f not in present and f not in defaults_by_namespace[namespace]]
        return f"no {', '.join(missing)}" if missing else None

    # Ephemeral containers may not set resources: the pod's are fixed once it runs.
    return judge_pods(evidence, config, per_container(problem, (INIT, REGULAR)),
                      "cpu and memory requests and limits set")


@control(
    id="OPS-WL-005",
    title="Containers run on a read-only root filesystem",
    severity="WARN",
    requirement="infra plan §6.4 (Requirements 5.4): container hardening; InfraSpec §2.2 (minimal image)",
    framework="CIS 5.7.3",
    source="kube-linter no-read-only-root-fs; kube-score container-security-context-readonlyrootfilesystem; "
    "NSA/CISA Kubernetes Hardening Guide (immutable container file systems)",
    remediation="""Set securityContext.readOnlyRootFilesystem: true and mount an emptyDir where
        the process writes (/tmp, caches).""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def read_only_root_filesystem(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        value = container.security("readOnlyRootFilesystem")
        if value is True:
            return None
        return "readOnlyRootFilesystem is false" if value is False else "readOnlyRootFilesystem not set (writable)"

    return judge_pods(evidence, config, per_container(problem), "every root filesystem is read-only")


@control(
    id="OPS-WL-006",
    title="Containers do not run with the root group",
    severity="WARN",
    requirement="InfraSpec §2.2 (non-root user); infra plan §6.4 (Requirements 5.4)",
    framework="CIS 5.7.3",
    source="kube-score container-security-context-user-group-id; securityContext runAsGroup, fsGroup, "
    "supplementalGroups",
    remediation="""Set runAsGroup (and fsGroup) to the image's non-root group, and leave 0 out
        of supplementalGroups: files the root group can write are then out of reach.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def no_root_group(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def container_problem(container: Container, template: PodTemplate) -> str | None:
        group = template.effective(container, "runAsGroup")
        return "runAsGroup is 0 (root)" if is_root_id(group) else None

    def problems(template: PodTemplate) -> list[str]:
        found = []
        if is_root_id(template.pod_security("fsGroup")):
            found.append("fsGroup is 0 (root)")
        supplemental = sequence(template.pod_security("supplementalGroups"), "spec.securityContext.supplementalGroups")
        if any(is_root_id(group) for group in supplemental):
            found.append("supplementalGroups include 0 (root)")
        return found + per_container(container_problem)(template)

    return judge_pods(evidence, config, problems, "no root group")


def _service_account(template: PodTemplate) -> str:
    name = text(template.spec.get("serviceAccountName"), "spec.serviceAccountName")
    return name or text(template.spec.get("serviceAccount"), "spec.serviceAccount") or "default"


@control(
    id="OPS-WL-007",
    title="Pods mount a ServiceAccount token only when they call the API",
    severity="WARN",
    requirement="InfraSpec §3.3 (ServiceAccount per pod, least privilege); infra plan §6.1 (Requirements 5.1)",
    framework="CIS 5.1.6",
    source="spec.automountServiceAccountToken, ServiceAccount automountServiceAccountToken",
    remediation="""Set automountServiceAccountToken: false on the pod spec (or on its
        ServiceAccount); a pod that calls the API keeps its token through an exception naming why.""",
    evidence=("cluster", "manifests"),
    reads=(*POD_READS, *listable("ServiceAccount")),
)
def no_service_account_token(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    accounts = ScopedNames(evidence.of("ServiceAccount"), name_of)

    def problems(template: PodTemplate) -> list[str]:
        mounted = template.spec.get("automountServiceAccountToken")
        if mounted is False:
            return []
        if mounted is True:
            return ["automountServiceAccountToken: true"]
        name = _service_account(template)
        account = next(iter(accounts.get(template.workload, name)), None)
        if account is None:
            return [f"automountServiceAccountToken not set and ServiceAccount {name} is not in the evidence "
                    "(the token is mounted by default)"]
        if account.get("automountServiceAccountToken") is False:
            return []
        return [f"the token of ServiceAccount {name} is mounted (automountServiceAccountToken set on neither "
                "the pod nor the ServiceAccount)"]

    return judge_pods(evidence, config, problems, "no ServiceAccount token mounted")


def _secret_env_problem(container: Container, template: PodTemplate) -> str | None:
    found = []
    for index, variable in enumerate(mappings(container.spec.get("env"), f"{container.label} env")):
        value_from = mapping(variable.get("valueFrom"), f"{container.label} env[{index}].valueFrom")
        secret = mapping(value_from.get("secretKeyRef"), f"{container.label} env[{index}].valueFrom.secretKeyRef")
        if secret:
            found.append(f"env {variable.get('name')} from Secret {secret.get('name')}")
    for index, source in enumerate(mappings(container.spec.get("envFrom"), f"{container.label} envFrom")):
        secret = mapping(source.get("secretRef"), f"{container.label} envFrom[{index}].secretRef")
        if secret:
            found.append(f"envFrom Secret {secret.get('name')}")
    return ", ".join(found) or None


@control(
    id="OPS-WL-008",
    title="Secrets reach containers as files, not environment variables",
    severity="WARN",
    requirement="InfraSpec §3.3 (ConfigMap / Secret separated), §6.2 (secret management); infra plan §6.3 "
    "(Requirements 5.3)",
    framework="CIS 5.4.1",
    source="kube-linter env-var-secret, read-secret-from-env-var: env[*].valueFrom.secretKeyRef, "
    "envFrom[*].secretRef",
    remediation="""Mount the Secret as a volume (secret: {secretName: ...}, readOnly) and read the
        file: environment variables leak into crash dumps, child processes and `kubectl describe`.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def secrets_as_files(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return judge_pods(evidence, config, per_container(_secret_env_problem), "no Secret in environment variables")


def _probe_problem(container: Container, template: PodTemplate) -> str | None:
    missing = [
        probe for probe in ("readinessProbe", "livenessProbe")
        if not mapping(container.spec.get(probe), f"{container.label} {probe}")
    ]
    return f"no {' or '.join(missing)}" if missing else None


@control(
    id="OPS-WL-009",
    title="Long-running containers have readiness and liveness probes",
    severity="WARN",
    requirement="InfraSpec §8.1 (health checks: readiness and liveness probes); infra plan §14.2 self-healing",
    framework=None,
    source="kube-score pod-probes; Polaris readinessProbeMissing, livenessProbeMissing",
    remediation="""Add a readinessProbe (traffic only to pods that can serve) and a livenessProbe
        (restart a hung process) to every container of Deployments, StatefulSets and DaemonSets;
        add a startupProbe when the process starts slowly.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def probes_set(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return judge_pods(evidence, config, per_container(_probe_problem, (REGULAR,)),
                      "every container has readiness and liveness probes", kinds=LONG_RUNNING_KINDS)


@control(
    id="OPS-WL-010",
    title="No naked Pods in the app namespaces",
    severity="WARN",
    requirement="infra plan §14.2 (Requirements 10.2, 11.2): self-healing; InfraSpec §3.2 (workloads from the chart)",
    framework=None,
    source="Kubernetes configuration good practices (naked Pods vs Deployments and Jobs): metadata.ownerReferences",
    remediation="""Run the Pod from a Deployment, StatefulSet or Job: a naked Pod is not
        rescheduled when its node fails or is drained.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "Pod"),
)
def no_naked_pods(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    namespaces = set(evidence.app_namespaces(config))

    def judge(pod: Obj) -> Outcome | None:
        if namespace_of(pod) not in namespaces:
            return None
        owners = sequence(mapping(pod.get("metadata"), "metadata").get("ownerReferences"),
                          "metadata.ownerReferences")
        if owners:
            return Outcome(ref(pod), True, "owned by " + ", ".join(
                f"{owner.get('kind')} {owner.get('name')}" for owner in owners if isinstance(owner, dict)))
        return Outcome(ref(pod), False, "no ownerReferences: nothing recreates it")

    return judge_each(evidence.of("Pod"), judge)


CONTROLS = [
    non_root,
    not_privileged,
    no_privilege_escalation,
    resources_set,
    read_only_root_filesystem,
    no_root_group,
    no_service_account_token,
    secrets_as_files,
    probes_set,
    no_naked_pods,
]
