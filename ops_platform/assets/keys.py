"""Asset keys and groups of every domain, in one place (DESIGN.md)."""

from __future__ import annotations

import dagster as dg

INFRA_GROUP = "infra"
APPS_GROUP = "apps"
BACKUPS_GROUP = "backups"
SNAPSHOTS_GROUP = "snapshots"
RESTORE_TESTS_GROUP = "restore_tests"


def layer_key(layer: str) -> dg.AssetKey:
    return dg.AssetKey(["infra", layer])


def backup_key(datastore: str) -> dg.AssetKey:
    return dg.AssetKey(["backups", datastore])


def restore_test_key(datastore: str) -> dg.AssetKey:
    return dg.AssetKey(["restore_tests", datastore])


def snapshot_key(volume_group: str) -> dg.AssetKey:
    return dg.AssetKey(["snapshots", volume_group])


def release_key(service: str, environment: str) -> dg.AssetKey:
    return dg.AssetKey(["apps", service, environment])


# Run tag of the jobs and schedules that read and write datastores; the instance's run queue limits
# how many such runs go at once (infra/dagster/dagster.yaml, tag_concurrency_limits).
IO_POOL_TAG = "ops-platform/pool"
BACKUP_IO = "backup_io"


def datastore_pool(datastore: str) -> str:
    """The op-level pool of every operation on one datastore: backup, restore test, rerun_backup.

    Pools are enforced for every run, manual launches included; the instance's
    ``concurrency.pools.default_limit: 1`` makes it one operation per datastore at a time.
    """
    return f"datastore-{datastore}"


def release_pool(service: str, environment: str) -> str:
    """The op-level pool of the releases of one service to one environment (default limit 1):
    two releases of one target never roll the same Deployment at once, manual launches included."""
    return f"release-{service}-{environment}"


def connection_resource_key(datastore: str) -> str:
    """Resource key of a datastore's connection (PostgreSQL and Redis)."""
    return f"{datastore}_connection"
