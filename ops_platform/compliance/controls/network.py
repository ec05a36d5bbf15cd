"""Network isolation: default-deny NetworkPolicies and mesh-wide mTLS (infra plan §3.2, §6.2)."""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.controls.shapes import ShapeError, judge_each, mapping, sequence, strings, text
from ops_platform.compliance.evidence import Evidence, Obj, name_of, namespace_of, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

WEAK_MTLS_MODES = ("PERMISSIVE", "DISABLE")


def denied_directions(policy: Obj) -> set[str]:
    """The directions (Ingress, Egress) a NetworkPolicy denies for every pod of its namespace.

    It must select every pod (an empty podSelector) and list the direction in
    policyTypes with no rule for it: a policy with no rules denies, it does
    not "miss" rules (Polaris issue 1088). ``ingress: [{}]`` is one rule that
    allows everything, not a deny. Without policyTypes the API server assumes
    Ingress, and Egress only when egress rules are given.
    """
    spec = mapping(policy.get("spec"), "spec")
    selector = mapping(spec.get("podSelector"), "spec.podSelector")
    if selector.get("matchLabels") or selector.get("matchExpressions"):
        return set()
    types = strings(spec.get("policyTypes"), "spec.policyTypes") or (
        ["Ingress", "Egress"] if sequence(spec.get("egress"), "spec.egress") else ["Ingress"]
    )
    return {
        direction for direction in ("Ingress", "Egress")
        if direction in types and not sequence(spec.get(direction.lower()), f"spec.{direction.lower()}")
    }


@control(
    id="OPS-NET-001",
    title="Every app namespace has a default-deny NetworkPolicy",
    severity="ERROR",
    requirement="infra plan §6.2 (Requirements 5.2); InfraSpec §3.3 (default deny), §6.1",
    framework="CIS 5.3.2",
    remediation="""Add to the namespace a NetworkPolicy with `podSelector: {}`,
        `policyTypes: [Ingress, Egress]` and no rules, then allow each flow the service
        needs with its own policy.""",
    evidence=("cluster", "manifests"),
    reads=("Namespace", "NetworkPolicy"),
)
def default_deny_per_namespace(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    policies = evidence.by_namespace("NetworkPolicy")
    for namespace in evidence.app_namespaces(config):
        denied = {}
        for policy in policies.get(namespace, []):
            try:
                denied[name_of(policy)] = denied_directions(policy)
            except ShapeError:
                denied[name_of(policy)] = set()  # the API server refuses it: it denies nothing
        denying = {name: directions for name, directions in denied.items() if "Ingress" in directions}
        subject = f"Namespace {namespace}"
        if not denying:
            yield Outcome(subject, False, "no NetworkPolicy denies all ingress to the namespace's pods")
            continue
        name, directions = sorted(denying.items())[0]
        scope = "ingress and egress" if "Egress" in directions else "ingress (egress left open)"
        yield Outcome(subject, True, f"NetworkPolicy {name} denies {scope} by default")


@control(
    id="OPS-NET-002",
    title="Mesh-wide mTLS is STRICT and no PeerAuthentication weakens it",
    severity="ERROR",
    requirement="infra plan §3.2 (Requirements 2.1, 5.1): cluster-wide mTLS with PeerAuthentication",
    framework=None,
    remediation="""Apply a PeerAuthentication without selector in the Istio root namespace
        (istio-system) with `mtls: {mode: STRICT}`, and remove PERMISSIVE or DISABLE modes
        (also in portLevelMtls) from the other PeerAuthentications.""",
    evidence=("cluster", "manifests"),
    reads=("PeerAuthentication",),
)
def strict_mtls(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    root = config.istio_root_namespace
    mesh_wide_ref = f"PeerAuthentication {root}/(mesh-wide)"
    if "PeerAuthentication" in evidence.not_installed:
        yield Outcome(mesh_wide_ref, False, "Istio is not installed: the cluster does not serve PeerAuthentication")
        return
    mesh_wide_seen = False

    def judge(policy: Obj) -> Outcome:
        nonlocal mesh_wide_seen
        spec = mapping(policy.get("spec"), "spec")
        mode = text(mapping(spec.get("mtls"), "spec.mtls").get("mode"), "spec.mtls.mode") or "UNSET"
        port_modes = {
            str(port): text(mapping(setting, f"spec.portLevelMtls.{port}").get("mode"), "mode") or "UNSET"
            for port, setting in mapping(spec.get("portLevelMtls"), "spec.portLevelMtls").items()
        }
        weak_ports = [f"port {port} {m}" for port, m in sorted(port_modes.items()) if m in WEAK_MTLS_MODES]
        selector = mapping(spec.get("selector"), "spec.selector")
        mesh_wide = namespace_of(policy) == root and not selector.get("matchLabels")
        if mesh_wide:
            mesh_wide_seen = True
            if mode != "STRICT" or weak_ports:
                shown = mode if mode != "UNSET" else "UNSET (Istio's default: PERMISSIVE)"
                return Outcome(ref(policy), False, "mesh-wide mTLS mode is " + ", ".join([shown, *weak_ports]))
            return Outcome(ref(policy), True, "mesh-wide mTLS mode is STRICT")
        if mode in WEAK_MTLS_MODES or weak_ports:
            weakened = ([f"mode {mode}"] if mode in WEAK_MTLS_MODES else []) + weak_ports
            return Outcome(ref(policy), False, f"overrides mesh-wide STRICT with {', '.join(weakened)}")
        return Outcome(ref(policy), True, f"mode {mode} keeps STRICT")

    yield from judge_each(evidence.of("PeerAuthentication"), judge)
    # Manifests may hold only part of the mesh config; only a cluster proves the mesh-wide policy is missing.
    if not mesh_wide_seen and "cluster" in evidence.kinds:
        yield Outcome(mesh_wide_ref, False, f"no PeerAuthentication without selector in {root}")


CONTROLS = [default_deny_per_namespace, strict_mtls]
