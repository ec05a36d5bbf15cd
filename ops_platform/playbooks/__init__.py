"""Remediation playbooks, one module each; :data:`PLAYBOOKS` maps a spec's playbook name to it.

Run one from an alert with :func:`run_playbook`::

    result = run_playbook("expand_pvc", PlaybookContext(kube, dry_run=False, allowed_namespaces=["data"]),
                          alert_labels, limit="2Ti")

To add a playbook: copy a sibling module (``Params`` read from labels,
``run(ctx, params, **options)``), register it here and in ``spec.Playbook``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ops_platform.playbooks import (
    expand_pvc,
    renew_certificate,
    rerun_backup,
    restart_workload,
    rollback_deployment,
    scale_workload,
)
from ops_platform.playbooks.base import (
    PlaybookContext,
    PlaybookFailed,
    PlaybookParams,
    PlaybookRefused,
    PlaybookResult,
)


@dataclass(frozen=True)
class PlaybookDefinition:
    name: str
    params: type[PlaybookParams]
    run: Callable[..., PlaybookResult]
    description: str


def _definition(module: Any, params: type[PlaybookParams]) -> PlaybookDefinition:
    description = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return PlaybookDefinition(module.NAME, params, module.run, description)


PLAYBOOKS: dict[str, PlaybookDefinition] = {
    definition.name: definition
    for definition in (
        _definition(restart_workload, restart_workload.RestartParams),
        _definition(scale_workload, scale_workload.ScaleParams),
        _definition(renew_certificate, renew_certificate.RenewParams),
        _definition(rerun_backup, rerun_backup.RerunBackupParams),
        _definition(expand_pvc, expand_pvc.ExpandParams),
        _definition(rollback_deployment, rollback_deployment.RollbackParams),
    )
}


def run_playbook(name: str, ctx: PlaybookContext, labels: Mapping[str, Any], **options: Any) -> PlaybookResult:
    """Read the playbook's parameters from the alert's ``labels`` and run it with the remediation's ``options``."""
    definition = PLAYBOOKS.get(name)
    if definition is None:
        raise PlaybookRefused(f"unknown playbook {name!r}; known: {sorted(PLAYBOOKS)}")
    return definition.run(ctx, definition.params.from_labels(labels), **options)


__all__ = [
    "PLAYBOOKS",
    "PlaybookContext",
    "PlaybookDefinition",
    "PlaybookFailed",
    "PlaybookParams",
    "PlaybookRefused",
    "PlaybookResult",
    "run_playbook",
]
