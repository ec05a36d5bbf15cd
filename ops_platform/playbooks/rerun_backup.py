"""Ask for the backup of a datastore to be taken again, for the stale-backup alert.

It does not touch Dagster: the result's ``after`` names the asset key
(``backups/<datastore>``) and the partition to materialize, which the
sensor or job turns into a run request. ``partition`` is today's date in the
platform's timezone, given by the caller (the partitions of the backup assets
are daily, keyed ``YYYY-MM-DD``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from ops_platform.playbooks.base import PlaybookContext, PlaybookParams, PlaybookRefused, PlaybookResult

NAME = "rerun_backup"


class RerunBackupParams(PlaybookParams):
    PLAYBOOK = NAME
    datastore: str


def run(ctx: PlaybookContext, params: RerunBackupParams, *, datastores: Sequence[str],
        partition: str) -> PlaybookResult:
    """``datastores``: the spec's datastore names; ``partition``: the daily partition key to materialize."""
    if params.datastore not in datastores:
        raise PlaybookRefused(f"playbook {NAME}: unknown datastore {params.datastore!r}; the spec has "
                              f"{sorted(datastores)} (datastores in infra/platform.yaml)")
    try:
        date.fromisoformat(partition)
    except ValueError:
        raise PlaybookRefused(f"playbook {NAME}: partition {partition!r} is not a daily partition key "
                              "(YYYY-MM-DD)") from None
    asset_key = f"backups/{params.datastore}"
    verb = "would materialize" if ctx.dry_run else "materialize"
    return PlaybookResult(
        NAME, asset_key, ctx.dry_run, not ctx.dry_run,
        before={},
        after={"asset_key": ["backups", params.datastore], "partition": partition},
        summary=f"{verb} {asset_key} partition {partition}",
    )
