"""`backups/<datastore>` (daily partitions) and `restore_tests/<datastore>`, with their checks."""

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from ops_platform.assets.keys import (
    BACKUPS_GROUP,
    RESTORE_TESTS_GROUP,
    backup_key,
    layer_key,
    restore_test_key,
)
from ops_platform.backups import metrics
from ops_platform.backups.base import BackupError
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.drivers import DriverServices, build_driver, current_recovery_point
from ops_platform.backups.manifest import BackupManifest, ManifestError
from ops_platform.backups.restore_test import RestoreTestResult, result_rows, run_restore_test
from ops_platform.environment import get_environment
from ops_platform.errors import OpsPlatformError
from ops_platform.metadata import human_bytes, table
from ops_platform.resources.alerting import PushgatewayResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import ObjectStoreResource
from ops_platform.spec import ENGINE_KIND, Datastore, Spec

ARTIFACT_CHECKSUM = "artifact_checksum"
RTO_WITHIN_OBJECTIVE = "rto_within_objective"
RPO_WITHIN_OBJECTIVE = "rpo_within_objective"
DATA_VERIFIED = "data_verified"


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


def build_backup_checks(spec: Spec) -> list[dg.AssetChecksDefinition]:
    return [_checksum_check(store) for store in spec.datastores]


def build_restore_test_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_restore_test_asset(spec, store) for store in spec.datastores if store.restore_test]


def build_restore_test_checks(spec: Spec) -> list[dg.AssetChecksDefinition]:
    checks: list[dg.AssetChecksDefinition] = []
    for store in spec.datastores:
        if store.restore_test:
            checks += _restore_test_checks(spec, store)
    return checks


def _services(kubernetes: KubernetesResource, object_store: ObjectStoreResource) -> DriverServices:
    return DriverServices(kubernetes=kubernetes.get_client, object_store=object_store)


def manifest_metadata(manifest: BackupManifest) -> dict[str, object]:
    duration = max(manifest.duration_seconds, 1e-6)
    artifacts = manifest.artifact_list()
    metadata: dict[str, object] = {
        "backup_id": manifest.backup_id,
        "size_bytes": dg.MetadataValue.int(manifest.bytes),
        "size": human_bytes(manifest.bytes),
        "duration_seconds": dg.MetadataValue.float(round(manifest.duration_seconds, 3)),
        "throughput_mib_per_second": dg.MetadataValue.float(round(manifest.bytes / duration / 2**20, 2)),
        "sha256": manifest.sha256 or "",
        "source_version": manifest.source_version,
        "recovery_point": manifest.recovery_point.isoformat(),
        "encryption": manifest.encryption or "none",
        "artifacts": table(
            [{"name": a.name, "size": human_bytes(a.size), "sha256": a.sha256[:16] + "…", "url": a.url}
             for a in artifacts]
        ),
        "counts": table([{"what": k, "count": v} for k, v in sorted(manifest.counts.items())]),
    }
    if artifacts:
        metadata["artifact_url"] = dg.MetadataValue.url(artifacts[0].url)
    return metadata


def _backup_asset(spec: Spec, store: Datastore, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=backup_key(store.name),
        deps=[layer_key(store.layer)] if store.layer else [],
        partitions_def=partitions,
        group_name=BACKUPS_GROUP,
        kinds={ENGINE_KIND[store.engine], "s3"},
        owners=[store.owner or spec.platform.owner],
        pool="backup_io",
        description=(
            f"Daily {store.method} backup of the {store.engine} datastore `{store.name}` "
            f"(schedule `{store.schedule}`, keep {store.retention.daily} daily / "
            f"{store.retention.weekly} weekly). A failed backup commits nothing: the previous "
            "one stays the latest."
        ),
        metadata={"engine": store.engine, "method": store.method, "schedule": store.schedule},
    )
    def _backup(
        context: dg.AssetExecutionContext,
        object_store: ObjectStoreResource,
        kubernetes: KubernetesResource,
        pushgateway: PushgatewayResource,
    ) -> dg.MaterializeResult:
        catalog = BackupCatalog(object_store.get_store(), store.name)
        services = _services(kubernetes, object_store)
        driver = build_driver(store, services)
        with tempfile.TemporaryDirectory(prefix=f"ops-backup-{store.name}-") as work_dir:
            try:
                manifest = catalog.run_backup(
                    driver, store, context.partition_key,
                    password=services.password(store),
                    work_dir=Path(work_dir),
                )
            except (BackupError, OpsPlatformError) as error:
                pushed = _push(context, pushgateway, metrics.BACKUP_JOB, store.name, metrics.backup_failed(
                    store.engine, store.method, get_environment(), datetime.now(UTC)))
                raise dg.Failure(
                    f"backup of '{store.name}' failed: {error}",
                    metadata={"latest_good_backup": _latest_backup_id(catalog), "metrics": pushed},
                ) from None
        plan = catalog.prune(store.retention)
        context.log.info(f"backup {manifest.backup_id} committed; pruned {len(plan.delete)}")
        pushed = _push(context, pushgateway, metrics.BACKUP_JOB, store.name,
                       metrics.backup_succeeded(manifest, get_environment()))
        return dg.MaterializeResult(
            metadata={
                **manifest_metadata(manifest),
                "metrics": pushed,
                "manifest_url": dg.MetadataValue.url(
                    catalog.store.url(catalog.manifest_key(manifest.partition, manifest.backup_id))
                ),
                "retention": table(
                    [{"backup": m.backup_id, "kept because": plan.reasons[m.backup_id]} for m in plan.keep]
                    + [{"backup": m.backup_id, "kept because": "pruned"} for m in plan.delete]
                ),
            }
        )

    return _backup


def _push(
    context: dg.AssetExecutionContext, pushgateway: PushgatewayResource, job: str, datastore: str,
    samples: list[metrics.Sample],
) -> str:
    outcome = metrics.push_results(pushgateway.get_client(), job, datastore, samples)
    (context.log.info if outcome.startswith("pushed") else context.log.warning)(f"metrics {outcome}")
    return outcome


def _latest_backup_id(catalog: BackupCatalog) -> str:
    try:
        latest = catalog.latest()
    except OpsPlatformError as error:
        return f"unknown: {error}"
    return latest.backup_id if latest else "none"


def _checksum_check(store: Datastore) -> dg.AssetChecksDefinition:
    # Not a partitioned check (a Dagster preview that cannot run on its own): in a backup
    # run it checks that run's partition, run alone it checks the newest backup.
    @dg.asset_check(
        asset=backup_key(store.name),
        name=ARTIFACT_CHECKSUM,
        blocking=True,
        description="Re-reads the backup's artifacts from the store and compares size and sha256 with the "
        "manifest; then the tool's own verification. A failure blocks downstream work.",
    )
    def _check(
        context: dg.AssetCheckExecutionContext,
        object_store: ObjectStoreResource,
        kubernetes: KubernetesResource,
    ) -> dg.AssetCheckResult:
        catalog = BackupCatalog(object_store.get_store(), store.name)
        partition = context.run.tags.get("dagster/partition")
        try:
            manifest = catalog.latest_in_partition(partition) if partition else catalog.latest()
        except ManifestError as error:
            return dg.AssetCheckResult(passed=False, description=str(error))
        if manifest is None:
            garbled = [str(e) for e in catalog.listing().garbled if not partition or f"/{partition}/" in e.url]
            where = f" in {partition}" if partition else ""
            return dg.AssetCheckResult(
                passed=False,
                description=garbled[0] if garbled else f"no committed backup of '{store.name}'{where}",
            )
        problems = catalog.verify_artifacts(manifest)
        checked: dict[str, object] = {}
        if not problems:
            verification = build_driver(store, _services(kubernetes, object_store)).verify(manifest, catalog.store)
            problems = list(verification.problems)
            checked = {k: str(v) for k, v in verification.checked.items()}
        return dg.AssetCheckResult(
            passed=not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(problems) or f"backup {manifest.backup_id}: artifacts match the manifest",
            metadata={"backup_id": manifest.backup_id, "artifacts": len(manifest.artifacts), **checked},
        )

    return _check


def _restore_test_asset(spec: Spec, store: Datastore) -> dg.AssetsDefinition:
    assert store.restore_test is not None

    @dg.asset(
        key=restore_test_key(store.name),
        deps=[backup_key(store.name)],
        group_name=RESTORE_TESTS_GROUP,
        kinds={ENGINE_KIND[store.engine]},
        owners=[store.owner or spec.platform.owner],
        pool="backup_io",
        description=(
            f"Restores the latest backup of `{store.name}` into a scratch target, verifies "
            f"it and measures the restore time against RTO {spec.objectives.rto_minutes} min "
            f"and the backup age against RPO {spec.objectives.rpo_minutes} min."
        ),
        metadata={"schedule": store.restore_test.schedule},
    )
    def _restore_test(
        context: dg.AssetExecutionContext,
        object_store: ObjectStoreResource,
        kubernetes: KubernetesResource,
        pushgateway: PushgatewayResource,
    ) -> dg.MaterializeResult:
        services = _services(kubernetes, object_store)
        driver = build_driver(store, services)
        catalog = BackupCatalog(object_store.get_store(), store.name)
        with tempfile.TemporaryDirectory(prefix=f"ops-restore-{store.name}-") as work_dir:
            try:
                result = run_restore_test(
                    store, driver, catalog, Path(work_dir),
                    current_recovery_point=current_recovery_point(driver, store, services),
                )
            except OpsPlatformError as error:  # refused, failed restore, store or manifest problem
                pushed = _push(context, pushgateway, metrics.RESTORE_TEST_JOB, store.name,
                               metrics.restore_test_failed(get_environment(), datetime.now(UTC)))
                raise dg.Failure(str(error), metadata={"metrics": pushed}) from None
        pushed = _push(context, pushgateway, metrics.RESTORE_TEST_JOB, store.name, metrics.restore_test_finished(
            result, get_environment(), spec.objectives.rto_minutes * 60, datetime.now(UTC)))
        return dg.MaterializeResult(metadata={**restore_test_metadata(result), "metrics": pushed})

    return _restore_test


def restore_test_metadata(result: RestoreTestResult) -> dict[str, object]:
    return {
        "backup_id": result.backup_id,
        "target": result.target,
        "restore_seconds": dg.MetadataValue.float(round(result.restore_seconds, 3)),
        "total_seconds": dg.MetadataValue.float(round(result.total_seconds, 3)),
        "recovery_point": result.recovery_point.isoformat(),
        "backup_age_seconds": dg.MetadataValue.float(round(result.backup_age_seconds, 1)),
        "verified": result.verified,
        "problems": "\n".join(result.problems) or "none",
        "counts": table(result_rows(result)),
        "queries": table([{"query": q.query, "value": q.value, "ok": q.ok} for q in result.queries]),
    }


def _latest_metadata(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> dict:
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def _restore_test_checks(spec: Spec, store: Datastore) -> list[dg.AssetChecksDefinition]:
    key = restore_test_key(store.name)
    rto_seconds = spec.objectives.rto_minutes * 60
    rpo_seconds = spec.objectives.rpo_minutes * 60

    @dg.asset_check(asset=key, name=RTO_WITHIN_OBJECTIVE,
                    description=f"Measured restore time ≤ RTO ({spec.objectives.rto_minutes} min).")
    def _rto(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        seconds = _latest_metadata(context, key).get("restore_seconds")
        if seconds is None:
            return dg.AssetCheckResult(passed=False, description="no restore test has been recorded")
        return dg.AssetCheckResult(
            passed=seconds <= rto_seconds,
            description=f"restored and verified in {seconds:.1f} s (RTO {rto_seconds} s)",
            metadata={"restore_seconds": seconds, "rto_seconds": rto_seconds},
        )

    @dg.asset_check(asset=key, name=RPO_WITHIN_OBJECTIVE,
                    description=f"Age of the newest restorable point ≤ RPO ({spec.objectives.rpo_minutes} min).")
    def _rpo(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        metadata = _latest_metadata(context, key)
        if "recovery_point" not in metadata:
            return dg.AssetCheckResult(passed=False, description="no restore test has been recorded")
        recovery_point = datetime.fromisoformat(metadata["recovery_point"])
        age = (datetime.now(UTC) - recovery_point).total_seconds()
        return dg.AssetCheckResult(
            passed=age <= rpo_seconds,
            description=f"newest restorable point {recovery_point.isoformat()} is {age / 60:.1f} min old "
            f"(RPO {spec.objectives.rpo_minutes} min)",
            metadata={"backup_age_seconds": round(age, 1), "rpo_seconds": rpo_seconds},
        )

    @dg.asset_check(asset=key, name=DATA_VERIFIED,
                    description="Counts match the manifest and every verification query passed.")
    def _verified(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        metadata = _latest_metadata(context, key)
        if "verified" not in metadata:
            return dg.AssetCheckResult(passed=False, description="no restore test has been recorded")
        return dg.AssetCheckResult(
            passed=bool(metadata["verified"]),
            description="restored data matches the backup" if metadata["verified"] else metadata["problems"],
        )

    return [_rto, _rpo, _verified]
