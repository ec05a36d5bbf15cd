"""OPA Gatekeeper: installed, enforcing, and its audit finds nothing (infra plan §6.4, §13.1).

Violations are counted from ``status.totalViolations``: ``status.violations``
lists at most ``--constraint-violations-limit`` (20 by default) of them.
"""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.evidence import CONSTRAINTS, Evidence, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

GATEKEEPER_REF = "Cluster gatekeeper"


@control(
    id="OPS-GK-001",
    title="Gatekeeper is installed and enforces at least one constraint",
    severity="ERROR",
    requirement="infra plan §13.1 (Requirements 12.1), §6.4 (Requirements 5.4): OPA Gatekeeper policy engine",
    framework="CIS 5.2.1",
    remediation="""Install OPA Gatekeeper (infra/layers/governance) and apply its constraint
        templates and constraints with enforcementAction: deny.""",
    evidence=("cluster",),
    reads=("ConstraintTemplate", CONSTRAINTS),
)
def gatekeeper_enforcing(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    if "ConstraintTemplate" in evidence.not_installed:
        yield Outcome(
            GATEKEEPER_REF, False, "Gatekeeper is not installed: the cluster does not serve ConstraintTemplate"
        )
        return
    constraints = evidence.constraints()
    enforcing = [c for c in constraints if ((c.get("spec") or {}).get("enforcementAction") or "deny") == "deny"]
    unserved = sorted(kind for kind, why in evidence.not_installed.items() if "ConstraintTemplate" in why)
    if not enforcing:
        yield Outcome(GATEKEEPER_REF, False, f"{len(constraints)} constraint(s), none with enforcementAction deny")
    elif unserved:
        yield Outcome(GATEKEEPER_REF, False, f"template kinds not served (template not ready): {', '.join(unserved)}")
    else:
        yield Outcome(GATEKEEPER_REF, True, f"{len(enforcing)} of {len(constraints)} constraint(s) enforce (deny)")


@control(
    id="OPS-GK-002",
    title="Gatekeeper constraints report no violations",
    severity="ERROR",
    requirement="infra plan §13.1 (Requirements 12.1): policy violations detected and alerted",
    framework=None,
    remediation="""Fix the objects listed in the constraint's status.violations (kubectl get
        <kind> <name> -o yaml), or narrow the constraint's match with a recorded exception.""",
    evidence=("cluster",),
    reads=("ConstraintTemplate", CONSTRAINTS),
)
def no_constraint_violations(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    for constraint in evidence.constraints():
        status = constraint.get("status") or {}
        total = status.get("totalViolations")
        action = (constraint.get("spec") or {}).get("enforcementAction") or "deny"
        if total is None:
            yield Outcome(
                ref(constraint), False, "no status.totalViolations: Gatekeeper's audit has not reported on it"
            )
        elif total:
            shown = [
                f"{v.get('kind')} {v.get('namespace') + '/' if v.get('namespace') else ''}{v.get('name')}"
                for v in (status.get("violations") or [])[:3]
            ]
            more = f" (e.g. {', '.join(shown)})" if shown else ""
            yield Outcome(ref(constraint), False, f"{total} violation(s), enforcementAction {action}{more}")
        else:
            yield Outcome(ref(constraint), True, f"0 violations at audit {status.get('auditTimestamp', '?')}")


CONTROLS = [gatekeeper_enforcing, no_constraint_violations]
