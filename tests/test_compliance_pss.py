"""The Pod Security Standards controls, the workload and RBAC controls besides them, the PDB and HPA
semantics, the image reference grammar, and every control on odd but valid YAML.

Each control is run on a compliant workload (the builders of test_compliance_controls pass every
control) and on the same workload with one field changed: the first passes, the second fails
naming what is wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from ops_platform.compliance.controls import CATALOGUE, availability, images, pod_security, rbac, workloads
from ops_platform.compliance.controls.index import SelectorIndex
from ops_platform.compliance.evidence import Evidence
from ops_platform.compliance.model import Control, ControlConfig
from tests.test_compliance_controls import (
    CONFIG,
    REGISTRY,
    SHA,
    deployment,
    hpa,
    namespace,
    pdb,
    role,
    run,
    secure_container,
    verdicts,
)

Obj = dict[str, Any]
NS = "ontology-editor"
GOOD, BAD = f"Deployment {NS}/good", f"Deployment {NS}/bad"


def pod_spec(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]


def first_container(obj: Obj) -> Obj:
    return pod_spec(obj)["containers"][0]


def changed(mutate: Callable[[Obj], None], name: str = "bad") -> Obj:
    obj = deployment(name)
    mutate(obj)
    return obj


def judge(control: Control, mutate: Callable[[Obj], None], *extra: Obj) -> tuple[dict[str, bool], str]:
    outcomes = run(control, namespace(NS), deployment("good"), changed(mutate), *extra)
    return verdicts(outcomes), outcomes[BAD].message


def container_security(**settings: Any) -> Callable[[Obj], None]:
    return lambda obj: first_container(obj)["securityContext"].update(settings)


def pod_security_context(**settings: Any) -> Callable[[Obj], None]:
    return lambda obj: pod_spec(obj)["securityContext"].update(settings)


def pod_field(**settings: Any) -> Callable[[Obj], None]:
    return lambda obj: pod_spec(obj).update(settings)


def add_container(field: str, **settings: Any) -> Callable[[Obj], None]:
    def mutate(obj: Obj) -> None:
        container = secure_container("extra")
        for key, value in settings.items():
            if key == "securityContext":
                container["securityContext"].update(value)
            else:
                container[key] = value
        pod_spec(obj).setdefault(field, []).append(container)

    return mutate


def volume(**source: Any) -> Callable[[Obj], None]:
    return lambda obj: pod_spec(obj).setdefault("volumes", []).append({"name": "v", **source})


def test_every_control_names_its_source_remediation_and_requirement() -> None:
    for control in CATALOGUE:
        assert control.remediation and "§" in control.requirement, control.id
    judged = [c for c in CATALOGUE if c.id.startswith(("OPS-PSS-", "OPS-WL-", "OPS-RBAC-", "OPS-AVAIL-", "OPS-IMG-"))]
    assert all(c.source for c in judged), [c.id for c in judged if not c.source]
    assert all(c.source.startswith(("PSS ", "Pod Security Admission")) for c in pod_security.CONTROLS)
    assert pod_security.no_host_namespaces.source == (
        "PSS baseline (host namespaces): spec.hostNetwork, spec.hostPID, spec.hostIPC")


# --- Pod Security Standards ----------------------------------------------------------------------

PSS_CASES = [
    (pod_security.no_host_namespaces, pod_field(hostNetwork=True), "hostNetwork: true"),
    (pod_security.no_host_namespaces, pod_field(hostPID=True), "hostPID: true"),
    (pod_security.no_host_namespaces, pod_field(hostIPC=True), "hostIPC: true"),
    (pod_security.no_host_path, volume(hostPath={"path": "/var/run/docker.sock"}),
     "volume v is hostPath /var/run/docker.sock"),
    (pod_security.no_host_ports, lambda o: first_container(o).update(ports=[{"containerPort": 80, "hostPort": 80}]),
     "container app: hostPort 80"),
    (pod_security.no_host_ports, add_container("initContainers", ports=[{"containerPort": 1, "hostPort": 9000}]),
     "init container extra: hostPort 9000"),
    (pod_security.baseline_capabilities, container_security(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
     "container app: adds SYS_ADMIN (privileged-equivalent)"),
    (pod_security.baseline_capabilities, container_security(capabilities={"add": ["NET_RAW"]}),
     "container app: adds NET_RAW"),
    (pod_security.baseline_capabilities, add_container("ephemeralContainers",
                                                       securityContext={"capabilities": {"add": ["SYS_PTRACE"]}}),
     "ephemeral container extra: adds SYS_PTRACE (privileged-equivalent)"),
    (pod_security.no_host_process, pod_security_context(windowsOptions={"hostProcess": True}),
     "pod windowsOptions.hostProcess: true"),
    (pod_security.no_host_process, container_security(windowsOptions={"hostProcess": True}),
     "container app: windowsOptions.hostProcess: true"),
    (pod_security.apparmor_not_unconfined,
     lambda o: o["spec"]["template"]["metadata"].update(
         annotations={"container.apparmor.security.beta.kubernetes.io/app": "unconfined"}),
     "annotation container.apparmor.security.beta.kubernetes.io/app: unconfined"),
    (pod_security.apparmor_not_unconfined, pod_security_context(appArmorProfile={"type": "Unconfined"}),
     "spec.securityContext.appArmorProfile.type Unconfined"),
    (pod_security.apparmor_not_unconfined, container_security(appArmorProfile={"type": "Unconfined"}),
     "container app: appArmorProfile.type Unconfined"),
    (pod_security.selinux_container_types, pod_security_context(seLinuxOptions={"type": "spc_t"}),
     "spec.securityContext.seLinuxOptions.type spc_t"),
    (pod_security.selinux_container_types, container_security(seLinuxOptions={"user": "system_u"}),
     "container app: seLinuxOptions.user system_u"),
    (pod_security.selinux_container_types, container_security(seLinuxOptions={"role": "sysadm_r"}),
     "container app: seLinuxOptions.role sysadm_r"),
    (pod_security.default_proc_mount, container_security(procMount="Unmasked"), "container app: procMount Unmasked"),
    (pod_security.safe_sysctls, pod_security_context(sysctls=[{"name": "kernel.msgmax", "value": "65536"}]),
     "unsafe sysctl kernel.msgmax"),
    (pod_security.seccomp_profile, lambda o: pod_spec(o)["securityContext"].pop("seccompProfile"),
     "container app: no seccompProfile (on the container or the pod)"),
    (pod_security.seccomp_profile, container_security(seccompProfile={"type": "Unconfined"}),
     "container app: seccompProfile Unconfined"),
    (pod_security.seccomp_profile, pod_security_context(seccompProfile={"type": "Unconfined"}),
     "container app: seccompProfile Unconfined"),
    (pod_security.restricted_capabilities, container_security(capabilities={}),
     "container app: does not drop ALL capabilities"),
    (pod_security.restricted_capabilities, container_security(capabilities={"drop": ["ALL"], "add": ["CHOWN"]}),
     "container app: adds CHOWN"),
    (pod_security.restricted_capabilities, add_container("initContainers", securityContext={"capabilities": None}),
     "init container extra: does not drop ALL capabilities"),
    (pod_security.restricted_volume_types, volume(nfs={"server": "10.0.0.1", "path": "/"}), "volume v is nfs"),
    (pod_security.restricted_volume_types, volume(hostPath={"path": "/"}), "volume v is hostPath"),
]


@pytest.mark.parametrize(("control", "mutate", "message"), PSS_CASES,
                         ids=[f"{c.id}-{m[:30]}" for c, _, m in PSS_CASES])
def test_pod_security_standards_fail_the_field_and_pass_the_compliant_pod(
    control: Control, mutate: Callable[[Obj], None], message: str
) -> None:
    found, said = judge(control, mutate)
    assert found == {GOOD: True, BAD: False}
    assert message in said


@pytest.mark.parametrize(
    ("control", "mutate"),
    [
        (pod_security.baseline_capabilities, container_security(capabilities={"drop": ["ALL"], "add": ["CHOWN"]})),
        (pod_security.restricted_capabilities,
         container_security(capabilities={"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]})),
        (pod_security.apparmor_not_unconfined,
         lambda o: o["spec"]["template"]["metadata"].update(
             annotations={"container.apparmor.security.beta.kubernetes.io/app": "localhost/strict"})),
        (pod_security.apparmor_not_unconfined, container_security(appArmorProfile={"type": "RuntimeDefault"})),
        (pod_security.selinux_container_types, pod_security_context(seLinuxOptions={"type": "container_t",
                                                                                    "level": "s0:c1,c2"})),
        (pod_security.default_proc_mount, container_security(procMount="Default")),
        (pod_security.safe_sysctls, pod_security_context(sysctls=[{"name": "net.ipv4.tcp_syncookies", "value": "1"}])),
        (pod_security.seccomp_profile, lambda o: (pod_spec(o)["securityContext"].pop("seccompProfile"),
                                                  container_security(seccompProfile={"type": "Localhost",
                                                                                     "localhostProfile": "p"})(o))),
        (pod_security.restricted_volume_types,
         lambda o: pod_spec(o).update(volumes=[
             {"name": "a", "configMap": {"name": "c"}}, {"name": "b", "secret": {"secretName": "s"}},
             {"name": "c", "emptyDir": {}}, {"name": "d", "persistentVolumeClaim": {"claimName": "p"}},
             {"name": "e", "projected": {"sources": []}}, {"name": "f", "downwardAPI": {"items": []}},
             {"name": "g", "csi": {"driver": "d"}}, {"name": "h", "ephemeral": {}}, {"name": "i"}])),
        (pod_security.no_host_namespaces, pod_field(hostNetwork=False, hostPID=False)),
        (pod_security.no_host_ports, lambda o: first_container(o).update(ports=[{"containerPort": 80, "hostPort": 0}])),
    ],
)
def test_pod_security_standards_allowed_values_pass(control: Control, mutate: Callable[[Obj], None]) -> None:
    found, _ = judge(control, mutate)
    assert found == {GOOD: True, BAD: True}


def test_every_pod_kind_and_every_container_list_is_judged() -> None:
    privileged = {**secure_container("debug"), "securityContext": {"privileged": True}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "naked", "namespace": NS},
           "spec": {"containers": [secure_container()], "ephemeralContainers": [privileged]}}
    template = {"metadata": {"labels": {"app": "x"}}, "spec": {"initContainers": [privileged],
                                                                "containers": [secure_container()]}}
    replica_set = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs", "namespace": NS},
                   "spec": {"template": template}}
    owned_replica_set = copy.deepcopy(replica_set)
    owned_replica_set["metadata"] = {"name": "owned", "namespace": NS,
                                     "ownerReferences": [{"kind": "Deployment", "name": "d", "controller": True}]}
    kinds = {kind: {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": kind.lower(), "namespace": NS},
                    "spec": {"template": template}} for kind in ("StatefulSet", "DaemonSet", "Job")}
    cronjob = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cron", "namespace": NS},
               "spec": {"jobTemplate": {"spec": {"template": template}}}}
    outcomes = run(workloads.not_privileged, namespace(NS), pod, replica_set, owned_replica_set, cronjob,
                   *kinds.values())
    assert verdicts(outcomes) == {f"{k} {NS}/{n}": False for k, n in [
        ("Pod", "naked"), ("ReplicaSet", "rs"), ("CronJob", "cron"), ("StatefulSet", "statefulset"),
        ("DaemonSet", "daemonset"), ("Job", "job")]}
    assert outcomes[f"Pod {NS}/naked"].message == "ephemeral container debug: privileged: true"
    assert outcomes[f"CronJob {NS}/cron"].message == "init container debug: privileged: true"


@pytest.mark.parametrize(
    ("labels", "passed", "message"),
    [
        ({"pod-security.kubernetes.io/enforce": "restricted"}, True, "enforces restricted"),
        ({"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/warn": "restricted"}, True,
         "enforces baseline (warn restricted)"),
        ({"pod-security.kubernetes.io/enforce": "privileged"}, False, "privileged enforces nothing"),
        ({"pod-security.kubernetes.io/enforce": "strict"}, False, "strict is not one of"),
        ({"pod-security.kubernetes.io/warn": "restricted"}, False, "no pod-security.kubernetes.io/enforce label"),
    ],
)
def test_app_namespaces_enforce_a_pod_security_level(labels: Obj, passed: bool, message: str) -> None:
    ns = namespace(NS)
    ns["metadata"]["labels"] = {"ops-platform/app-namespace": "true", **labels}
    outcomes = run(pod_security.namespaces_enforce_pod_security, ns, namespace("monitoring", app=False))
    assert verdicts(outcomes) == {f"Namespace {NS}": passed}
    assert message in outcomes[f"Namespace {NS}"].message


# --- workload controls besides the PSS -----------------------------------------------------------

WORKLOAD_CASES = [
    (workloads.read_only_root_filesystem, container_security(readOnlyRootFilesystem=False),
     "container app: readOnlyRootFilesystem is false"),
    (workloads.read_only_root_filesystem, lambda o: first_container(o)["securityContext"].pop("readOnlyRootFilesystem"),
     "container app: readOnlyRootFilesystem not set"),
    (workloads.no_root_group, container_security(runAsGroup=0), "container app: runAsGroup is 0 (root)"),
    (workloads.no_root_group, pod_security_context(runAsGroup=0), "container app: runAsGroup is 0 (root)"),
    (workloads.no_root_group, pod_security_context(fsGroup=0), "fsGroup is 0 (root)"),
    (workloads.no_root_group, pod_security_context(supplementalGroups=[1000, 0]), "supplementalGroups include 0"),
    (workloads.no_service_account_token, pod_field(automountServiceAccountToken=True),
     "automountServiceAccountToken: true"),
    (workloads.no_service_account_token, lambda o: pod_spec(o).pop("automountServiceAccountToken"),
     "ServiceAccount default is not in the evidence"),
    (workloads.secrets_as_files,
     lambda o: first_container(o).update(env=[{"name": "DB_PASSWORD",
                                               "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]),
     "container app: env DB_PASSWORD from Secret db"),
    (workloads.secrets_as_files, lambda o: first_container(o).update(envFrom=[{"secretRef": {"name": "creds"}}]),
     "container app: envFrom Secret creds"),
    (workloads.probes_set, lambda o: first_container(o).pop("livenessProbe"), "container app: no livenessProbe"),
    (workloads.probes_set, lambda o: (first_container(o).pop("livenessProbe"), first_container(o).pop("readinessProbe")),
     "container app: no readinessProbe or livenessProbe"),
    (workloads.non_root, add_container("ephemeralContainers", securityContext={"runAsUser": 0}),
     "ephemeral container extra: runAsUser is 0 (root)"),
]


@pytest.mark.parametrize(("control", "mutate", "message"), WORKLOAD_CASES,
                         ids=[f"{c.id}-{m[:30]}" for c, _, m in WORKLOAD_CASES])
def test_workload_controls_fail_the_field_and_pass_the_compliant_pod(
    control: Control, mutate: Callable[[Obj], None], message: str
) -> None:
    found, said = judge(control, mutate)
    assert found == {GOOD: True, BAD: False}
    assert message in said


def service_account(name: str, automount: bool | None) -> Obj:
    account: Obj = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}}
    if automount is not None:
        account["automountServiceAccountToken"] = automount
    return account


def test_service_account_token_is_judged_from_the_pod_or_its_service_account() -> None:
    def uses(name: str) -> Callable[[Obj], None]:
        return lambda obj: (pod_spec(obj).pop("automountServiceAccountToken"),
                            pod_spec(obj).update(serviceAccountName=name))

    objects = [namespace(NS), changed(uses("quiet"), "quiet"), changed(uses("chatty"), "chatty"),
               service_account("quiet", False), service_account("chatty", None)]
    outcomes = run(workloads.no_service_account_token, *objects)
    assert verdicts(outcomes) == {f"Deployment {NS}/quiet": True, f"Deployment {NS}/chatty": False}
    assert "ServiceAccount chatty is mounted" in outcomes[f"Deployment {NS}/chatty"].message


def test_config_map_env_is_no_secret_and_jobs_need_no_probes() -> None:
    config_env = changed(lambda o: first_container(o).update(
        env=[{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "mode"}}}]), "config")
    assert verdicts(run(workloads.secrets_as_files, namespace(NS), config_env)) == {f"Deployment {NS}/config": True}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once", "namespace": NS},
           "spec": {"template": {"spec": {"containers": [{"name": "job", "image": "x"}]}}}}
    assert run(workloads.probes_set, namespace(NS), job) == {}


def test_naked_pods_in_app_namespaces_fail() -> None:
    naked = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "naked", "namespace": NS}, "spec": {}}
    owned = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "web-1", "namespace": NS, "ownerReferences": [{"kind": "ReplicaSet", "name": "web", "controller": True}]},
        "spec": {}}
    elsewhere = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "monitoring"}, "spec": {}}
    outcomes = run(workloads.no_naked_pods, namespace(NS), naked, owned, elsewhere)
    assert verdicts(outcomes) == {f"Pod {NS}/naked": False, f"Pod {NS}/web-1": True}
    assert outcomes[f"Pod {NS}/web-1"].message == "owned by ReplicaSet web"


# --- PodDisruptionBudget, HPA and replica semantics -------------------------------------------------


def budget(**spec: Any) -> Obj:
    obj = pdb("budget", NS, {"matchLabels": {"app": "svc"}})
    obj["spec"] = {"selector": obj["spec"]["selector"], **spec}
    return obj


def service(replicas: int | None) -> Obj:
    obj = deployment("svc")
    if replicas is None:
        obj["spec"].pop("replicas")
    else:
        obj["spec"]["replicas"] = replicas
    return obj


def autoscaler(minimum: int | None, maximum: int = 10) -> Obj:
    obj = hpa("svc", NS, "svc")
    obj["spec"]["maxReplicas"] = maximum
    if minimum is None:
        obj["spec"].pop("minReplicas")
    else:
        obj["spec"]["minReplicas"] = minimum
    return obj


@pytest.mark.parametrize(
    ("spec", "replicas", "hpa_min", "passed", "message"),
    [
        ({"maxUnavailable": 0}, 3, None, False, "allows no disruption at 3 replica(s) (replicas)"),
        ({"minAvailable": "100%"}, 3, None, False, "allows no disruption at 3"),
        ({"minAvailable": 3}, 3, None, False, "allows no disruption at 3"),
        ({"minAvailable": 2}, 3, None, True, "lets 1 of 3 pod(s) (replicas) go at a time"),
        ({"maxUnavailable": 1}, 2, None, True, "lets 1 of 2"),
        ({"maxUnavailable": "50%"}, 3, None, True, "lets 2 of 3"),  # 1.5 rounded up
        ({"minAvailable": "50%"}, 3, None, True, "lets 1 of 3"),  # keeps 2 (1.5 rounded up)
        ({"maxUnavailable": "10%"}, 2, None, True, "lets 1 of 2"),  # 0.2 rounded up to 1
        ({"minAvailable": "50%"}, 1, None, False, "allows no disruption at 1"),
        ({"maxUnavailable": "100%"}, 3, None, False, "lets all 3 pods (replicas) go at once"),
        ({}, 2, None, False, "neither minAvailable nor maxUnavailable) lets all 2 pods"),
        ({"minAvailable": 1, "maxUnavailable": 1}, 2, None, False, "sets both minAvailable and maxUnavailable"),
        ({"minAvailable": "half"}, 2, None, False, "'half' is neither an integer nor a percentage"),
        ({"maxUnavailable": "5"}, 2, None, False, "neither an integer nor a percentage"),
        ({"minAvailable": 2}, None, 2, False, "allows no disruption at 2 replica(s) (HPA svc minReplicas)"),
        ({"minAvailable": 2}, None, 3, True, "lets 1 of 3 pod(s) (HPA svc minReplicas)"),
        ({"minAvailable": 1}, 4, 1, False, "allows no disruption at 1 replica(s) (HPA svc minReplicas)"),
        ({"maxUnavailable": 1}, 0, None, True, "scaled to 0 replicas"),
    ],
)
def test_pdb_must_let_one_pod_go_and_keep_one_up(
    spec: Obj, replicas: int | None, hpa_min: int | None, passed: bool, message: str
) -> None:
    objects = [namespace(NS), service(replicas), budget(**spec)]
    if hpa_min is not None:
        objects.append(autoscaler(hpa_min))
    outcome = run(availability.pdb_per_deployment, *objects)[f"Deployment {NS}/svc"]
    assert (outcome.passed, message in outcome.message) == (passed, True), outcome.message


def test_two_budgets_on_the_same_pods_block_eviction_and_v1beta1_empty_selects_nothing() -> None:
    second = pdb("second", NS, {"matchExpressions": [{"key": "app", "operator": "Exists"}]})
    outcome = run(availability.pdb_per_deployment, namespace(NS), service(2), budget(maxUnavailable=1), second)
    assert not outcome[f"Deployment {NS}/svc"].passed
    assert "2 PodDisruptionBudgets select its pods (budget, second)" in outcome[f"Deployment {NS}/svc"].message
    legacy = {**pdb("legacy", NS, {}), "apiVersion": "policy/v1beta1"}
    outcome = run(availability.pdb_per_deployment, namespace(NS), service(2), legacy)
    assert outcome[f"Deployment {NS}/svc"].message == "no PodDisruptionBudget selects its pods"


def test_statefulsets_need_a_budget_too() -> None:
    stateful = {**deployment("db"), "kind": "StatefulSet"}
    outcomes = run(availability.pdb_per_deployment, namespace(NS), stateful,
                   pdb("db", NS, {"matchLabels": {"app": "db"}}))
    assert verdicts(outcomes) == {f"StatefulSet {NS}/db": True}


@pytest.mark.parametrize(
    ("hpas", "passed", "message"),
    [
        ([autoscaler(2)], True, "scales it from 2 to 10 replicas"),
        ([autoscaler(1)], False, "minReplicas 1: one pod down is the service down"),
        ([autoscaler(None)], False, "minReplicas 1"),  # the API's default
        ([autoscaler(3, maximum=2)], False, "maxReplicas 2 below minReplicas 3"),
        ([autoscaler(2), {**autoscaler(2), "metadata": {"name": "other", "namespace": NS}}], False,
         "2 HorizontalPodAutoscalers target it (other, svc)"),
        ([], False, "no HorizontalPodAutoscaler targets it"),
    ],
)
def test_hpa_keeps_two_replicas(hpas: list[Obj], passed: bool, message: str) -> None:
    outcome = run(availability.hpa_per_deployment, namespace(NS), service(None), *hpas)[f"Deployment {NS}/svc"]
    assert (outcome.passed, message in outcome.message) == (passed, True), outcome.message


@pytest.mark.parametrize(
    ("mutate", "extra", "passed", "message"),
    [
        (lambda o: None, [], True, "2 replicas (replicas), topologySpreadConstraints on topology.kubernetes.io/zone"),
        (lambda o: o["spec"].update(replicas=1), [], False, "runs 1 replica(s) (replicas)"),
        (lambda o: o["spec"].pop("replicas"), [autoscaler(3)], True, "3 replicas (HPA svc minReplicas)"),
        (lambda o: pod_spec(o).pop("topologySpreadConstraints"), [], False,
         "no topologySpreadConstraints or podAntiAffinity selecting its own pods"),
        (lambda o: pod_spec(o)["topologySpreadConstraints"][0].update(labelSelector={"matchLabels": {"app": "x"}}),
         [], False, "no topologySpreadConstraints"),
        (lambda o: (pod_spec(o).pop("topologySpreadConstraints"), pod_spec(o).update(affinity={"podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "svc"}}}}]}})),
         [], True, "podAntiAffinity on kubernetes.io/hostname"),
    ],
)
def test_replicas_spread_over_nodes_or_zones(
    mutate: Callable[[Obj], None], extra: list[Obj], passed: bool, message: str
) -> None:
    obj = service(2)
    mutate(obj)
    outcome = run(availability.replicas_spread, namespace(NS), obj, *extra)[f"Deployment {NS}/svc"]
    assert (outcome.passed, message in outcome.message) == (passed, True), outcome.message


class Rendered(dict):  # type: ignore[type-arg]
    """An object as a Helm chart rendering holds it: the environment it was rendered for."""

    def __init__(self, obj: Obj, environment: str) -> None:
        super().__init__(obj)
        self.environment = environment


def test_selector_index_gives_few_candidates_and_keeps_environments_apart() -> None:
    budgets = [pdb(f"pdb-{i}", NS, {"matchLabels": {"app": f"svc-{i}", "tier": "api"}}) for i in range(2000)]
    expressions = pdb("by-expression", NS, {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["api"]}]})
    index = SelectorIndex([*budgets, expressions], lambda obj: obj["spec"]["selector"])
    workload = deployment("svc-7")
    assert len(index.candidates(workload, {"app": "svc-7", "tier": "api"})) <= 3
    assert [b["metadata"]["name"] for b in index.selecting(workload, {"app": "svc-7", "tier": "api"})] == [
        "by-expression", "pdb-7"]

    dev, prod = Rendered(service(2), "dev"), Rendered(service(2), "prod")
    evidence = Evidence.from_objects([namespace(NS), dev, prod, Rendered(budget(maxUnavailable=0), "dev"),
                                      Rendered(budget(maxUnavailable=1), "prod")])
    outcomes = list(availability.pdb_per_deployment.check(evidence, CONFIG))  # type: ignore[misc]
    assert [(o.passed, o.message.split(" (")[0]) for o in outcomes] == [
        (False, "PodDisruptionBudget budget"), (True, "PodDisruptionBudget budget")]
    assert "allows no disruption" in outcomes[0].message and "lets 1 of 2" in outcomes[1].message


# --- image references ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (f"{REGISTRY}app:{SHA}", None),
        (f"{REGISTRY}app@sha256:{'b' * 64}", None),
        (f"{REGISTRY}app:v1.2@sha256:{'b' * 64}", None),
        (f"{REGISTRY}app@sha512:{'c' * 128}", None),
        ("localhost:5000/team/app:3f9a1c2", None),
        (f"{REGISTRY}app@sha256:deadbeefcafe", "not a valid reference: digest 'sha256:deadbeefcafe'"),
        (f"{REGISTRY}app@sha512:{'a' * 32}", "is not sha512:<128 lowercase hex digits>"),
        (f"{REGISTRY}app@sha256:{'a' * 63}", "is not sha256:<64 lowercase hex digits>"),
        (f"{REGISTRY}app@sha256:{'A' * 64}", "is not sha256:<64 lowercase hex digits>"),
        (f"{REGISTRY}app@md5:{'a' * 32}", "digest algorithm 'md5' is not one the OCI image spec registers"),
        (f"{REGISTRY}app:tag@", "not a valid reference: digest ''"),
        ("localhost:5000/app", "has no tag"),
        (f"{REGISTRY}app:latest", "uses :latest"),
        (f"{REGISTRY}app:-rc1", "tag '-rc1' is not"),
        (f"{REGISTRY}app:{'a' * 129}", "is not [A-Za-z0-9_]"),
        (f"{REGISTRY}App:{SHA}", "repository path component 'App'"),
        (f"{REGISTRY}app:deadbeefcafe", None),  # a 12-digit git sha tag
        (f"{REGISTRY}app:v1.2.3", "is not a git sha"),
        ("", "is not a valid reference: empty image reference"),
    ],
)
def test_image_references_follow_the_distribution_grammar(image: str, problem: str | None) -> None:
    found = images.pin_problem(image)
    assert (found is None) if problem is None else (problem in (found or "")), found


# --- RBAC short of "*" -----------------------------------------------------------------------------


def binding(kind: str, name: str, role_kind: str, role_name: str, subjects: list[Obj], ns: str = NS) -> Obj:
    metadata: Obj = {"name": name} | ({"namespace": ns} if kind == "RoleBinding" else {})
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": metadata,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role_name},
            "subjects": subjects}


def test_bindings_to_admin_equivalent_roles_only_for_break_glass() -> None:
    user = [{"kind": "User", "name": "alice"}]
    glass = [{"kind": "Group", "name": "ops-platform:break-glass"}]
    outcomes = run(
        rbac.cluster_admin_break_glass_only,
        role("binder", [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["bind"]}]),
        role("reader", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]),
        role("all", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], ns=None),
        binding("RoleBinding", "ns-admin", "ClusterRole", "cluster-admin", user),
        binding("RoleBinding", "binder", "Role", "binder", user),
        binding("RoleBinding", "reader", "Role", "reader", user),
        binding("ClusterRoleBinding", "all-glass", "ClusterRole", "all", glass),
        binding("ClusterRoleBinding", "all-user", "ClusterRole", "all", user),
    )
    assert verdicts(outcomes) == {
        f"RoleBinding {NS}/ns-admin": False,
        f"RoleBinding {NS}/binder": False,
        "ClusterRoleBinding all-glass": True,
        "ClusterRoleBinding all-user": False,
    }
    assert outcomes[f"RoleBinding {NS}/ns-admin"].message == "grants cluster-admin to User alice"
    assert "rule 1 grants bind on roles" in outcomes[f"RoleBinding {NS}/binder"].message


@pytest.mark.parametrize(
    ("control", "rule", "passed", "message"),
    [
        (rbac.no_secret_reads, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}, False,
         "reads Secrets: rule 1 grants list on secrets"),
        (rbac.no_secret_reads, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                                "resourceNames": ["app-tls"]}, True, "reads no Secret"),
        (rbac.no_secret_reads, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}, True, ""),
        (rbac.no_escalation_verbs, {"apiGroups": [""], "resources": ["users", "groups"], "verbs": ["impersonate"]},
         False, "rule 1 grants impersonate on users, groups"),
        (rbac.no_escalation_verbs, {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
                                    "verbs": ["escalate", "bind"]}, False, "grants bind, escalate on clusterroles"),
        (rbac.no_escalation_verbs, {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, True, ""),
        (rbac.no_pod_shells, {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}, False,
         "shell into pods: rule 1 grants create on pods/exec"),
        (rbac.no_pod_shells, {"apiGroups": [""], "resources": ["pods/attach"], "verbs": ["get"]}, False,
         "grants get on pods/attach"),
        (rbac.no_pod_shells, {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}, True, ""),
    ],
)
def test_rbac_escalation_paths_short_of_wildcards(control: Control, rule: Obj, passed: bool, message: str) -> None:
    outcomes = run(control, role("r", [rule]), role("onto-admin", [rule], ns=None),
                   config=ControlConfig(admin_roles=("onto-admin",)))
    assert verdicts(outcomes) == {f"Role {NS}/r": passed}
    assert message in outcomes[f"Role {NS}/r"].message


# --- odd but valid YAML ----------------------------------------------------------------------------


def workload(kind: str, spec: object, name: str = "odd") -> Obj:
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


ODD_OBJECTS = [
    workload("Deployment", "a string"),
    workload("Deployment", [1, 2], "spec-list"),
    workload("Deployment", {"template": "x"}, "template-string"),
    workload("Deployment", {"template": {"metadata": None, "spec": {"containers": [None]}}}, "null-container"),
    workload("Deployment", {"replicas": "two", "template": {"metadata": {"labels": ["a"]},
                                                            "spec": {"containers": "c"}}}, "odd-replicas"),
    workload("StatefulSet", {"template": {"spec": {"containers": [{"securityContext": "x", "ports": "80",
                                                                   "env": [None], "resources": []}],
                                                   "volumes": [None], "securityContext": 7}}}, "odd-fields"),
    workload("DaemonSet", {"template": {"spec": {"containers": [{"name": 7, "image": ["x"]}],
                                                 "topologySpreadConstraints": "x", "affinity": []}}}),
    workload("CronJob", {"jobTemplate": {"spec": None}}),
    workload("CronJob", {"jobTemplate": "x"}, "job-template-string"),
    workload("Job", None),
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "odd", "namespace": NS, "ownerReferences": "x",
                                                     "annotations": ["x"]},
     "spec": {"ephemeralContainers": [{"name": "dbg", "securityContext": {"capabilities": {"add": "SYS_ADMIN"}}}]}},
    role("odd", [None]),
    role("odd-rules", "rules"),  # type: ignore[arg-type]
    {**role("odd-verbs", [{"verbs": "*", "resources": None}]), "kind": "ClusterRole"},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "odd", "namespace": NS},
     "roleRef": "cluster-admin", "subjects": [None]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "odd"},
     "roleRef": {"kind": "ClusterRole", "name": "cluster-admin"}, "subjects": "everyone"},
    {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "odd", "namespace": NS},
     "spec": {"selector": {"matchLabels": ["x"]}}},
    {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "odd2", "namespace": NS},
     "spec": "x"},
    {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "odd", "namespace": NS},
     "spec": {"scaleTargetRef": "x"}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "odd", "namespace": NS},
     "spec": {"podSelector": "x", "ingress": "all"}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "odd", "namespace": NS},
     "spec": {"tls": [None], "rules": "x"}},
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "odd", "namespace": NS},
     "spec": {"mtls": "STRICT", "portLevelMtls": ["x"]}},
    {"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "odd", "namespace": NS}, "spec": {"limits": [None]}},
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": NS}},
    {"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": "K8sPSPPrivileged", "metadata": {"name": "odd"},
     "spec": "x", "status": {"totalViolations": 2, "violations": [None]}},
]


def test_no_control_crashes_on_odd_but_valid_yaml() -> None:
    evidence = Evidence.from_objects([namespace(NS), *copy.deepcopy(ODD_OBJECTS)], kinds=("cluster", "manifests"))
    for control in CATALOGUE:
        if control.check is not None and "graph" not in control.evidence:
            list(control.check(evidence, CONFIG))


def test_odd_shapes_are_findings_with_the_field_named() -> None:
    evidence = Evidence.from_objects([namespace(NS), *copy.deepcopy(ODD_OBJECTS)])
    privileged = {o.object: o for o in workloads.not_privileged.check(evidence, CONFIG)}  # type: ignore[misc]
    assert privileged[f"Deployment {NS}/odd"].message == "not judged: spec is the string 'a string', not an object"
    assert privileged[f"Deployment {NS}/null-container"].message == (
        "not judged: spec.template.spec.containers[0] is null, not an object")
    assert not privileged[f"CronJob {NS}/job-template-string"].passed
    assert privileged[f"StatefulSet {NS}/odd-fields"].message == (
        "container #0 (unnamed): not judged: container #0 (unnamed) securityContext is the string 'x', not an object")
    assert privileged[f"Pod {NS}/odd"].passed  # an ephemeral container with no securityContext.privileged
    capabilities = {o.object: o for o in pod_security.baseline_capabilities.check(evidence, CONFIG)}  # type: ignore
    assert "capabilities.add is the string 'SYS_ADMIN', not a list" in capabilities[f"Pod {NS}/odd"].message
    roles = {o.object: o for o in rbac.no_wildcard_rules.check(evidence, CONFIG)}  # type: ignore[misc]
    assert roles[f"Role {NS}/odd"].message == "not judged: rules[0] is null, not an object"
    assert roles[f"Role {NS}/odd-rules"].message == "not judged: rules is the string 'rules', not a list"
    bindings = {o.object: o for o in rbac.cluster_admin_break_glass_only.check(evidence, CONFIG)}  # type: ignore
    assert bindings[f"RoleBinding {NS}/odd"].message == "not judged: roleRef is the string 'cluster-admin', not an object"
    assert bindings["ClusterRoleBinding odd"].message == "not judged: subjects is the string 'everyone', not a list"


def test_unnamed_containers_are_named_by_their_place() -> None:
    unnamed = changed(lambda o: first_container(o).pop("name"), "unnamed")
    unnamed["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    outcomes = run(workloads.not_privileged, namespace(NS), unnamed)
    assert outcomes[f"Deployment {NS}/unnamed"].message == "container #0 (unnamed): privileged: true"
