"""The Kubernetes Pod Security Standards, baseline and restricted, on the app workloads (infra plan §6.4).

One control per PSS policy, named after the fields it reads as the PSS page
lists them (kubernetes.io/docs/concepts/security/pod-security-standards),
judging the pod of every app workload (:mod:`~ops_platform.compliance.controls.pods`)
with its init, regular and ephemeral containers. The privileged, run-as-root
and privilege-escalation policies are :mod:`~ops_platform.compliance.controls.workloads`'
OPS-WL-001 to 003. Gatekeeper enforces the restricted set at admission in
the app namespace (infra/layers/governance); these controls judge what is
already there, and manifests before they are applied.
"""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.controls.pods import (
    POD_READS,
    Container,
    PodTemplate,
    judge_pods,
    per_container,
    volume_name,
    volumes,
)
from ops_platform.compliance.controls.shapes import judge_each, labels, mapping, mappings, strings, text
from ops_platform.compliance.evidence import Evidence, Obj, name_of
from ops_platform.compliance.model import ControlConfig, Outcome, control

REQUIREMENT = "infra plan §6.4 (Requirements 5.4): security policies; §14.3 privilege escalation tests"
BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
})
RESTRICTED_ADDABLE = frozenset({"NET_BIND_SERVICE"})
# Each one alone lets a process leave the container or take the node (mount, load modules, ptrace, raw I/O).
PRIVILEGED_EQUIVALENT = frozenset({
    "ALL", "SYS_ADMIN", "SYS_MODULE", "SYS_RAWIO", "SYS_PTRACE", "SYS_BOOT", "DAC_READ_SEARCH", "BPF", "PERFMON",
    "NET_ADMIN", "MAC_ADMIN", "MAC_OVERRIDE",
})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
RESTRICTED_VOLUME_TYPES = (
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
)
SECCOMP_TYPES = ("RuntimeDefault", "Localhost")
APPARMOR_TYPES = ("RuntimeDefault", "Localhost")
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
PSA_LEVELS = ("privileged", "baseline", "restricted")


@control(
    id="OPS-PSS-001",
    title="Pods do not share the host's network, PID or IPC namespace",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework="CIS 5.2.3, 5.2.4, 5.2.5",
    source="PSS baseline (host namespaces): spec.hostNetwork, spec.hostPID, spec.hostIPC",
    remediation="""Remove hostNetwork, hostPID and hostIPC (or set them false); expose the
        service through a Service and read node facts through the API or a node exporter.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def no_host_namespaces(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problems(template: PodTemplate) -> list[str]:
        return [f"{field}: true" for field in ("hostNetwork", "hostPID", "hostIPC") if template.spec.get(field) is True]

    return judge_pods(evidence, config, problems, "no host namespace shared")


@control(
    id="OPS-PSS-002",
    title="Pods mount no hostPath volume",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework="CIS 5.2.12",
    source="PSS baseline (HostPath volumes): spec.volumes[*].hostPath",
    remediation="""Replace the hostPath volume with an emptyDir, a ConfigMap/Secret or a
        PersistentVolumeClaim; node agents that must read the node get an exception.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def no_host_path(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problems(template: PodTemplate) -> list[str]:
        found = []
        for index, volume in enumerate(volumes(template)):
            if volume.get("hostPath") is not None:
                path = mapping(volume["hostPath"], f"spec.volumes[{index}].hostPath").get("path")
                found.append(f"volume {volume_name(volume, index)} is hostPath {path}")
        return found

    return judge_pods(evidence, config, problems, "no hostPath volume")


@control(
    id="OPS-PSS-003",
    title="Containers bind no host port",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework="CIS 5.2.13",
    source="PSS baseline (host ports): containers[*].ports[*].hostPort",
    remediation="Remove ports[*].hostPort; reach the container through a Service.",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def no_host_ports(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        ports = [
            text(port.get("hostPort"), f"{container.label} ports[{index}].hostPort")
            for index, port in enumerate(mappings(container.spec.get("ports"), f"{container.label} ports"))
        ]
        bound = [port for port in ports if port not in (None, "0")]
        return f"hostPort {', '.join(bound)}" if bound else None

    return judge_pods(evidence, config, per_container(problem), "no host port")


def _capabilities(container: Container, field: str) -> list[str]:
    capabilities = mapping(container.security("capabilities"), f"{container.label} securityContext.capabilities")
    return strings(capabilities.get(field), f"{container.label} securityContext.capabilities.{field}")


def _privileged_equivalent(capability: str) -> bool:
    return capability.upper().removeprefix("CAP_") in PRIVILEGED_EQUIVALENT


def _shown_capabilities(added: list[str]) -> str:
    return ", ".join(f"{c} (privileged-equivalent)" if _privileged_equivalent(c) else c for c in added)


@control(
    id="OPS-PSS-004",
    title="Containers add no capability beyond the baseline set",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework="CIS 5.2.9",
    source="PSS baseline (capabilities): containers[*].securityContext.capabilities.add",
    remediation="""Remove the added capabilities outside AUDIT_WRITE, CHOWN, DAC_OVERRIDE,
        FOWNER, FSETID, KILL, MKNOD, NET_BIND_SERVICE, SETFCAP, SETGID, SETPCAP, SETUID and
        SYS_CHROOT; SYS_ADMIN, SYS_PTRACE, SYS_MODULE and the like are as good as privileged.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def baseline_capabilities(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        extra = [c for c in _capabilities(container, "add") if c not in BASELINE_CAPABILITIES]
        return f"adds {_shown_capabilities(extra)}" if extra else None

    return judge_pods(evidence, config, per_container(problem), "only baseline capabilities added")


@control(
    id="OPS-PSS-005",
    title="No Windows HostProcess container",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework="CIS 5.2.11",
    source="PSS baseline (HostProcess): spec.securityContext.windowsOptions.hostProcess, "
    "containers[*].securityContext.windowsOptions.hostProcess",
    remediation="Remove windowsOptions.hostProcess: true (pod and containers).",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def no_host_process(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problems(template: PodTemplate) -> list[str]:
        pod = mapping(template.pod_security("windowsOptions"), "spec.securityContext.windowsOptions")
        found = ["pod windowsOptions.hostProcess: true"] if pod.get("hostProcess") is True else []

        def problem(container: Container, _: PodTemplate) -> str | None:
            own = mapping(container.security("windowsOptions"), f"{container.label} securityContext.windowsOptions")
            return "windowsOptions.hostProcess: true" if own.get("hostProcess") is True else None

        return found + per_container(problem)(template)

    return judge_pods(evidence, config, problems, "no HostProcess container")


@control(
    id="OPS-PSS-006",
    title="AppArmor is not turned off",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework=None,
    source="PSS baseline (AppArmor): spec.securityContext.appArmorProfile.type, "
    "containers[*].securityContext.appArmorProfile.type, "
    "metadata.annotations['container.apparmor.security.beta.kubernetes.io/*']",
    remediation="""Remove the Unconfined AppArmor profile: leave it unset, or use RuntimeDefault
        (runtime/default) or a Localhost profile (localhost/<name>).""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def apparmor_not_unconfined(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def profile_problem(profile: object, where: str) -> str | None:
        kind = text(mapping(profile, where).get("type"), f"{where}.type")
        return None if kind is None or kind in APPARMOR_TYPES else f"{where}.type {kind}"

    def problems(template: PodTemplate) -> list[str]:
        found = []
        for key, value in sorted(template.annotations().items()):
            if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" and not value.startswith("localhost/"):
                found.append(f"annotation {key}: {value}")
        pod = profile_problem(template.pod_security("appArmorProfile"), "spec.securityContext.appArmorProfile")
        found += [pod] if pod else []
        return found + per_container(
            lambda container, _: profile_problem(container.security("appArmorProfile"), "appArmorProfile")
        )(template)

    return judge_pods(evidence, config, problems, "AppArmor left on")


@control(
    id="OPS-PSS-007",
    title="SELinux options keep the container types",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework=None,
    source="PSS baseline (SELinux): spec.securityContext.seLinuxOptions.type/user/role, "
    "containers[*].securityContext.seLinuxOptions.type/user/role",
    remediation="""Leave seLinuxOptions.user and role unset and the type unset or one of
        container_t, container_init_t, container_kvm_t, container_engine_t.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def selinux_container_types(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def options_problem(options: object, where: str) -> str | None:
        values = mapping(options, where)
        found = []
        kind = text(values.get("type"), f"{where}.type")
        if kind is not None and kind not in SELINUX_TYPES:
            found.append(f"{where}.type {kind}")
        for field in ("user", "role"):
            if text(values.get(field), f"{where}.{field}"):
                found.append(f"{where}.{field} {values[field]}")
        return ", ".join(found) or None

    def problems(template: PodTemplate) -> list[str]:
        pod = options_problem(template.pod_security("seLinuxOptions"), "spec.securityContext.seLinuxOptions")
        return ([pod] if pod else []) + per_container(
            lambda container, _: options_problem(container.security("seLinuxOptions"), "seLinuxOptions")
        )(template)

    return judge_pods(evidence, config, problems, "SELinux options allowed")


@control(
    id="OPS-PSS-008",
    title="Containers mount /proc with the default mask",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework=None,
    source="PSS baseline (/proc mount type): containers[*].securityContext.procMount",
    remediation="Remove securityContext.procMount or set it to Default.",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def default_proc_mount(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        mount = text(container.security("procMount"), f"{container.label} securityContext.procMount")
        return None if mount in (None, "Default") else f"procMount {mount}"

    return judge_pods(evidence, config, per_container(problem), "default /proc mount")


@control(
    id="OPS-PSS-009",
    title="Pods set only safe sysctls",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework=None,
    source="PSS baseline (sysctls): spec.securityContext.sysctls[*].name",
    remediation="""Remove the sysctls outside the safe set (kernel.shm_rmid_forced,
        net.ipv4.ip_local_port_range, net.ipv4.ip_unprivileged_port_start, net.ipv4.tcp_syncookies,
        net.ipv4.ping_group_range, ...); tune the node instead.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def safe_sysctls(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problems(template: PodTemplate) -> list[str]:
        where = "spec.securityContext.sysctls"
        names = [text(s.get("name"), f"{where}[{i}].name") or ""
                 for i, s in enumerate(mappings(template.pod_security("sysctls"), where))]
        unsafe = [name for name in names if name not in SAFE_SYSCTLS]
        return [f"unsafe sysctl {', '.join(unsafe)}"] if unsafe else []

    return judge_pods(evidence, config, problems, "only safe sysctls")


@control(
    id="OPS-PSS-010",
    title="Containers run with the RuntimeDefault or a Localhost seccomp profile",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework="CIS 5.7.2",
    source="PSS restricted (seccomp; baseline forbids Unconfined): spec.securityContext.seccompProfile.type, "
    "containers[*].securityContext.seccompProfile.type",
    remediation="""Set spec.securityContext.seccompProfile.type: RuntimeDefault on the pod (or
        Localhost with a localhostProfile), and no Unconfined profile on a container.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def seccomp_profile(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        own = mapping(container.security("seccompProfile"), f"{container.label} securityContext.seccompProfile")
        pod = mapping(template.pod_security("seccompProfile"), "spec.securityContext.seccompProfile")
        kind = text(own.get("type"), "seccompProfile.type") or text(pod.get("type"), "seccompProfile.type")
        if kind in SECCOMP_TYPES:
            return None
        return f"seccompProfile {kind}" if kind else "no seccompProfile (on the container or the pod)"

    return judge_pods(evidence, config, per_container(problem), "seccomp RuntimeDefault or Localhost")


@control(
    id="OPS-PSS-011",
    title="Containers drop ALL capabilities and add at most NET_BIND_SERVICE",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework="CIS 5.2.8, 5.2.10",
    source="PSS restricted (capabilities): containers[*].securityContext.capabilities.drop, "
    "containers[*].securityContext.capabilities.add",
    remediation="""Set securityContext.capabilities: {drop: [ALL]} on every container; add back
        only NET_BIND_SERVICE, when the process binds a port below 1024.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def restricted_capabilities(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        found = []
        if "ALL" not in _capabilities(container, "drop"):
            found.append("does not drop ALL capabilities")
        extra = [c for c in _capabilities(container, "add") if c not in RESTRICTED_ADDABLE]
        if extra:
            found.append(f"adds {_shown_capabilities(extra)}")
        return ", ".join(found) or None

    return judge_pods(evidence, config, per_container(problem), "drops ALL, adds at most NET_BIND_SERVICE")


@control(
    id="OPS-PSS-012",
    title="Pods use only the volume types of the restricted profile",
    severity="ERROR",
    requirement=REQUIREMENT,
    framework=None,
    source="PSS restricted (volume types): spec.volumes[*]",
    remediation="""Use only configMap, csi, downwardAPI, emptyDir, ephemeral,
        persistentVolumeClaim, projected and secret volumes; reach other storage through a
        PersistentVolumeClaim.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def restricted_volume_types(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def problems(template: PodTemplate) -> list[str]:
        found = []
        for index, volume in enumerate(volumes(template)):
            types = sorted(
                key for key, value in volume.items()
                if key != "name" and value is not None and key not in RESTRICTED_VOLUME_TYPES
            )
            if types:
                found.append(f"volume {volume_name(volume, index)} is {', '.join(types)}")
        return found

    return judge_pods(evidence, config, problems, "only restricted volume types")


@control(
    id="OPS-PSS-013",
    title="App namespaces enforce a Pod Security Standard",
    severity="ERROR",
    requirement="infra plan §6.4 (Requirements 5.4), §13.1 (Requirements 12.1): policies enforced at admission",
    framework="CIS 5.2.1",
    source="Pod Security Admission: metadata.labels['pod-security.kubernetes.io/enforce']",
    remediation="""Label the namespace pod-security.kubernetes.io/enforce: restricted (or baseline
        while a workload needs more, with warn and audit: restricted).""",
    evidence=("cluster", "manifests"),
    reads=("Namespace",),
)
def namespaces_enforce_pod_security(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    app = set(evidence.app_namespaces(config))

    def judge(namespace: Obj) -> Outcome | None:
        if name_of(namespace) not in app:
            return None
        found = labels(namespace)
        level = found.get(PSA_ENFORCE)
        others = ", ".join(f"{mode} {found[key]}" for mode in ("warn", "audit")
                           if (key := f"pod-security.kubernetes.io/{mode}") in found)
        shown = f" ({others})" if others else ""
        subject = f"Namespace {name_of(namespace)}"
        if level is None:
            return Outcome(subject, False, f"no {PSA_ENFORCE} label: Pod Security Admission admits anything{shown}")
        if level not in PSA_LEVELS:
            return Outcome(subject, False, f"{PSA_ENFORCE}: {level} is not one of {', '.join(PSA_LEVELS)}")
        if level == "privileged":
            return Outcome(subject, False, f"{PSA_ENFORCE}: privileged enforces nothing{shown}")
        return Outcome(subject, True, f"enforces {level}{shown}")

    return judge_each(evidence.of("Namespace"), judge)


CONTROLS = [
    no_host_namespaces,
    no_host_path,
    no_host_ports,
    baseline_capabilities,
    no_host_process,
    apparmor_not_unconfined,
    selinux_container_types,
    default_proc_mount,
    safe_sysctls,
    seccomp_profile,
    restricted_capabilities,
    restricted_volume_types,
    namespaces_enforce_pod_security,
]
