"""HTTPS on every ingress (InfraSpec §6.2; infra plan §10.1)."""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.controls.shapes import judge_each, mapping, mappings, strings, text
from ops_platform.compliance.evidence import Evidence, Obj, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control


def host_covered(host: str, tls_hosts: list[str]) -> bool:
    """Whether a TLS host list covers ``host``; ``*.example.com`` covers one label, as in X.509."""
    host = host.lower()
    for tls_host in tls_hosts:
        tls_host = tls_host.lower()
        if tls_host == host:
            return True
        if tls_host.startswith("*.") and "." in host and host.split(".", 1)[1] == tls_host[2:]:
            return True
    return False


@control(
    id="OPS-ING-001",
    title="Every Ingress serves TLS for all its hosts",
    severity="ERROR",
    requirement="InfraSpec §6.2 (HTTPS forced at the ingress, HSTS); infra plan §10.1 (Requirements 9.1, 9.4)",
    framework=None,
    remediation="""Add spec.tls listing every host of the Ingress rules with a secretName
        (annotate cert-manager.io/cluster-issuer so cert-manager issues it).""",
    evidence=("cluster", "manifests"),
    reads=("Ingress",),
)
def tls_on_every_ingress(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    def judge(ingress: Obj) -> Outcome:
        spec = mapping(ingress.get("spec"), "spec")
        tls = mappings(spec.get("tls"), "spec.tls")
        if not tls:
            return Outcome(ref(ingress), False, "no spec.tls: served over plain HTTP")
        tls_hosts = [host for i, entry in enumerate(tls) for host in strings(entry.get("hosts"), f"spec.tls[{i}].hosts")]
        hosts = sorted({
            host for i, rule in enumerate(mappings(spec.get("rules"), "spec.rules"))
            if (host := text(rule.get("host"), f"spec.rules[{i}].host"))
        })
        uncovered = [host for host in hosts if not host_covered(host, tls_hosts)]
        if uncovered:
            return Outcome(ref(ingress), False, f"no TLS for host(s) {', '.join(uncovered)}")
        return Outcome(ref(ingress), True, f"TLS for {', '.join(hosts) or 'the default host'}")

    return judge_each(evidence.of("Ingress"), judge)


CONTROLS = [tls_on_every_ingress]
