"""Ask for the backup of a datastore to be taken again, for the stale-backup alert.

It does not touch Dagster: the result's ``after`` names the asset key
(``backups/<datastore>``) to materialize, which the sensor or job turns into
a run request of that datastore's backup job (a new backup, taken now).
"""

from __future__ import annotations

from collections.abc import Sequence

from ops_platform.playbooks.base import PlaybookContext, PlaybookParams, PlaybookRefused, PlaybookResult

NAME = "rerun_backup"


class RerunBackupParams(PlaybookParams):
    PLAYBOOK = NAME
    datastore: str


def run(ctx: PlaybookContext, params: RerunBackupParams, *, datastores: Sequence[str]) -> PlaybookResult:
    """``datastores``: the spec's datastore names."""
    if params.datastore not in datastores:
        raise PlaybookRefused(f"playbook {NAME}: unknown datastore {params.datastore!r}; the spec has "
                              f"{sorted(datastores)} (datastores in infra/platform.yaml)")
    asset_key = f"backups/{params.datastore}"
    verb = "would materialize" if ctx.dry_run else "materialize"
    return PlaybookResult(
        NAME, asset_key, ctx.dry_run, not ctx.dry_run,
        before={},
        after={"asset_key": ["backups", params.datastore]},
        summary=f"{verb} {asset_key} (a new backup)",
    )
