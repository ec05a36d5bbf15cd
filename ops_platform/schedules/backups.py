"""Backups (at the datastore's cron, often enough for its RPO), volume snapshots and weekly restore tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

from ops_platform.assets.keys import BACKUP_IO, IO_POOL_TAG, backup_key, restore_test_key, snapshot_key
from ops_platform.environment import schedule_status
from ops_platform.spec import Datastore, Spec

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


def backup_job_name(datastore: str) -> str:
    return f"backup_{datastore}"


def build_backup_jobs(spec: Spec) -> list[UnresolvedAssetJobDefinition]:
    return [
        dg.define_asset_job(
            backup_job_name(store.name),
            selection=dg.AssetSelection.assets(backup_key(store.name)),
            description=f"Back up {store.name} ({store.engine}, {store.method}).",
            tags={IO_POOL_TAG: BACKUP_IO},
        )
        for store in spec.datastores
    ]


def build_schedules(
    spec: Spec, backup_jobs: list[UnresolvedAssetJobDefinition], environment: str = "local"
) -> list[dg.ScheduleDefinition]:
    timezone = spec.platform.timezone
    status = schedule_status(environment)
    jobs = {job.name: job for job in backup_jobs}
    schedules: list[dg.ScheduleDefinition] = []
    for store in spec.datastores:
        schedules.append(_backup_schedule(store, jobs[backup_job_name(store.name)], timezone, status))
        if store.restore_test is not None:
            schedules.append(
                dg.ScheduleDefinition(
                    name=f"restore_test_{store.name}",
                    cron_schedule=store.restore_test.schedule,
                    execution_timezone=timezone,
                    target=dg.AssetSelection.assets(restore_test_key(store.name)),
                    description=f"Weekly restore test of {store.name}.",
                    tags={IO_POOL_TAG: BACKUP_IO},
                    default_status=status,
                )
            )
    for group in spec.volumes:
        schedules.append(
            dg.ScheduleDefinition(
                name=f"snapshot_{group.name}",
                cron_schedule=group.schedule,
                execution_timezone=timezone,
                target=dg.AssetSelection.assets(snapshot_key(group.name)),
                description=f"Volume snapshots of group {group.name}.",
                default_status=status,
            )
        )
    return schedules


def _backup_schedule(
    store: Datastore, job: UnresolvedAssetJobDefinition, timezone: str, status: dg.DefaultScheduleStatus
) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"backup_{store.name}_schedule",
        cron_schedule=store.schedule,
        execution_timezone=timezone,
        job=job,
        description=f"Back up {store.name} at `{store.schedule}` ({timezone}).",
        default_status=status,
    )
