"""The catalogue of controls: one module per family, each control one small function.

To add a control, copy a sibling in the family's module (or a new module with
its own ``CONTROLS`` list added below): the ``@control`` decorator carries its
id, title, severity, the seed requirement it proves, the CIS id, the other
standard it follows (``source``: the Pod Security Standards profile and
field, a policy checker's rule), the remediation, the evidence it judges and
the object kinds it reads. Controls over pods walk them with
:mod:`~ops_platform.compliance.controls.pods`, read fields through
:mod:`~ops_platform.compliance.controls.shapes` (an odd shape is a finding,
never a crash) and match selectors through
:mod:`~ops_platform.compliance.controls.index`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ops_platform.compliance.controls import (
    audit,
    availability,
    gatekeeper,
    graph,
    images,
    ingress,
    network,
    pod_security,
    quotas,
    rbac,
    workloads,
)
from ops_platform.compliance.exceptions import EXPIRED_EXCEPTION
from ops_platform.compliance.model import Control

CATALOGUE: tuple[Control, ...] = (
    *rbac.CONTROLS,
    *network.CONTROLS,
    *quotas.CONTROLS,
    *availability.CONTROLS,
    *workloads.CONTROLS,
    *pod_security.CONTROLS,
    *images.CONTROLS,
    *ingress.CONTROLS,
    *gatekeeper.CONTROLS,
    *audit.CONTROLS,
    *graph.CONTROLS,
    EXPIRED_EXCEPTION,
)


def kinds_read_by(controls: Iterable[Control]) -> list[str]:
    """Every object kind the controls read, in catalogue order (what the cluster collector lists)."""
    return list(dict.fromkeys(kind for control in controls for kind in control.reads))


def control_ids(controls: Iterable[Control] = CATALOGUE) -> set[str]:
    return {control.id for control in controls}


def _check_unique(controls: Iterable[Control]) -> None:
    seen: set[str] = set()
    for control in controls:
        if control.id in seen:
            raise ValueError(f"compliance: two controls with id {control.id}")
        seen.add(control.id)


_check_unique(CATALOGUE)
