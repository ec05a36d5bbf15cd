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


def connection_resource_key(datastore: str) -> str:
    """Resource key of a datastore's connection (PostgreSQL and Redis)."""
    return f"{datastore}_connection"
