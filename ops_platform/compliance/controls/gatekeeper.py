"""OPA Gatekeeper: installed, enforcing, and its audit finds nothing (infra plan §6.4, §13.1).

Violations are counted from ``status.totalViolations``: ``status.violations``
lists at most ``--constraint-violations-limit`` (20 by default) of them.
"""

from __future__ import annotations

from collections.abc import Iterator

from ops_platform.compliance.controls.shapes import judge_each, mapping, mappings, text
from ops_platform.compliance.evidence import CONSTRAINTS, Evidence, Obj, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control

GATEKEEPER_REF = "Cluster gatekeeper"


def _action(constraint: Obj) -> str:
    spec = constraint.get("spec")
    action = spec.get("enforcementAction") if isinstance(spec, dict) else None
    return str(action or "deny")


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
    enforcing = [c for c in constraints if _action(c) == "deny"]
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
    def judge(constraint: Obj) -> Outcome:
        status = mapping(constraint.get("status"), "status")
        total = status.get("totalViolations")
        action = _action(constraint)
        if total is None:
            return Outcome(ref(constraint), False, "no status.totalViolations: Gatekeeper's audit has not reported on it")
        if total:
            shown = []
            for violation in mappings(status.get("violations"), "status.violations")[:3]:
                namespace = text(violation.get("namespace"), "violation namespace")
                shown.append(f"{violation.get('kind')} {namespace + '/' if namespace else ''}{violation.get('name')}")
            more = f" (e.g. {', '.join(shown)})" if shown else ""
            return Outcome(ref(constraint), False, f"{total} violation(s), enforcementAction {action}{more}")
        return Outcome(ref(constraint), True, f"0 violations at audit {status.get('auditTimestamp', '?')}")

    return judge_each(evidence.constraints(), judge)


CONTROLS = [gatekeeper_enforcing, no_constraint_violations]
