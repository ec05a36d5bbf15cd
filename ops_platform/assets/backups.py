"""`backups/<datastore>` (daily partitions) and `restore_tests/<datastore>`."""


import dagster as dg

from ops_platform.assets.keys import (
    BACKUPS_GROUP,
    RESTORE_TESTS_GROUP,
    backup_key,
    connection_resource_key,
    layer_key,
    restore_test_key,
)
from ops_platform.errors import NotImplementedYetError
from ops_platform.spec import ENGINE_KIND, Datastore, Spec

BACKUP_ISSUE = "the backups, snapshots and restore tests issue"
# Engines whose connection is a Dagster resource of its own (resources/datastores.py).
ENGINES_WITH_CONNECTION_RESOURCE = ("postgresql", "redis")


def daily_partitions(spec: Spec) -> dg.DailyPartitionsDefinition:
    # end_offset=1: today's partition exists, so a backup taken today lands in it.
    return dg.DailyPartitionsDefinition(
        start_date=spec.platform.history_start.isoformat(),
        timezone=spec.platform.timezone,
        end_offset=1,
    )


def build_backup_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    partitions = daily_partitions(spec)
    return [_backup_asset(spec, store, partitions) for store in spec.datastores]


def build_restore_test_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_restore_test_asset(spec, store) for store in spec.datastores if store.restore_test]


def _resource_keys(store: Datastore) -> set[str]:
    keys = {"object_store"}
    if store.engine in ENGINES_WITH_CONNECTION_RESOURCE:
        keys.add(connection_resource_key(store.name))
    if store.engine == "velero":
        keys.add("kubernetes")
    return keys


def _backup_asset(
    spec: Spec, store: Datastore, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    resource_keys = _resource_keys(store)

    @dg.asset(
        key=backup_key(store.name),
        deps=[layer_key(store.layer)] if store.layer else [],
        partitions_def=partitions,
        group_name=BACKUPS_GROUP,
        kinds={ENGINE_KIND[store.engine], "s3"},
        owners=[store.owner or spec.platform.owner],
        required_resource_keys=resource_keys,
        description=(
            f"Daily {store.method} backup of the {store.engine} datastore `{store.name}` "
            f"(schedule `{store.schedule}`, keep {store.retention.daily} daily / "
            f"{store.retention.weekly} weekly)."
        ),
        metadata={"engine": store.engine, "method": store.method, "schedule": store.schedule},
    )
    def _backup(context: dg.AssetExecutionContext) -> None:
        for key in sorted(resource_keys):
            getattr(context.resources, key)
        raise NotImplementedYetError(
            "backups",
            f"the {store.method} backup of '{store.name}' for {context.partition_key}",
            BACKUP_ISSUE,
        )

    return _backup


def _restore_test_asset(spec: Spec, store: Datastore) -> dg.AssetsDefinition:
    assert store.restore_test is not None

    @dg.asset(
        key=restore_test_key(store.name),
        deps=[backup_key(store.name)],
        group_name=RESTORE_TESTS_GROUP,
        kinds={ENGINE_KIND[store.engine]},
        owners=[store.owner or spec.platform.owner],
        required_resource_keys={"object_store"},
        description=(
            f"Restores the latest backup of `{store.name}` into a scratch target, verifies "
            f"it and measures the restore time against RTO {spec.objectives.rto_minutes} min "
            f"and the backup age against RPO {spec.objectives.rpo_minutes} min."
        ),
        metadata={"schedule": store.restore_test.schedule},
    )
    def _restore_test(context: dg.AssetExecutionContext) -> None:
        context.resources.object_store
        raise NotImplementedYetError(
            "restore tests", f"the restore test of '{store.name}'", BACKUP_ISSUE
        )

    return _restore_test
