"""`backups/<datastore>` and `restore_tests/<datastore>`, each with the checks its own run yields.

A backup is not replayable, so the backup assets are not partitioned: each
materialization is one backup, taken now, verified, and only then counted by
retention. A materialization exists only for a verified backup, so the
asset's freshness (its RPO) is the age of the newest verified backup. A
restore test materializes only when it passed; a refused or failed one
yields its checks failed, with the reason, and fails the run.
"""

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from ops_platform.assets.failures import failure, prefixed
from ops_platform.assets.keys import (
    BACKUPS_GROUP,
    RESTORE_TESTS_GROUP,
    backup_key,
    datastore_pool,
    layer_key,
    restore_test_key,
)
from ops_platform.backups import metrics
from ops_platform.backups.catalog import BackupCatalog, RetentionPlan, day_folder
from ops_platform.backups.drivers import DriverServices, build_driver
from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.preflight import require_preflight
from ops_platform.backups.restore_test import RestoreTestResult, result_rows, run_restore_test
from ops_platform.cron import max_gap_minutes
from ops_platform.environment import get_environment
from ops_platform.errors import OpsPlatformError
from ops_platform.metadata import human_bytes, table
from ops_platform.resources.alerting import PushgatewayResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import ObjectStoreResource
from ops_platform.spec import ENGINE_KIND, POINT_IN_TIME_METHODS, Datastore, Spec

ARTIFACT_CHECKSUM = "artifact_checksum"
RTO_WITHIN_OBJECTIVE = "rto_within_objective"
RPO_WITHIN_OBJECTIVE = "rpo_within_objective"
DATA_VERIFIED = "data_verified"
RESTORE_TEST_CHECKS = (DATA_VERIFIED, RTO_WITHIN_OBJECTIVE, RPO_WITHIN_OBJECTIVE)
# A restore test is due on its schedule; it is stale when a whole interval and this much more has passed.
RESTORE_TEST_GRACE = timedelta(days=1)


def build_backup_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_backup_asset(spec, store) for store in spec.datastores]


def build_restore_test_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_restore_test_asset(spec, store) for store in spec.datastores if store.restore_test]


def backup_freshness_window(spec: Spec, store: Datastore) -> timedelta:
    """How old the newest verified backup may get before the asset is stale.

    The RPO, except where a continuous archive holds the RPO between base
    backups (pgBackRest's WAL archive): there the base backup's own interval
    plus the RPO.
    """
    rpo = spec.rpo_minutes(store)
    gap = max_gap_minutes(store.schedule)
    if store.method in POINT_IN_TIME_METHODS and gap > rpo:
        return timedelta(minutes=gap + rpo)
    return timedelta(minutes=rpo)


def _services(kubernetes: KubernetesResource, object_store: ObjectStoreResource) -> DriverServices:
    return DriverServices(kubernetes=kubernetes.get_client, object_store=object_store)


def manifest_metadata(manifest: BackupManifest) -> dict[str, object]:
    duration = max(manifest.duration_seconds, 1e-6)
    artifacts = manifest.artifact_list()
    metadata: dict[str, object] = {
        "backup_id": manifest.backup_id,
        "stored_bytes": dg.MetadataValue.int(manifest.bytes),
        "stored": human_bytes(manifest.bytes),
        "duration_seconds": dg.MetadataValue.float(round(manifest.duration_seconds, 3)),
        "stored_mib_per_second": dg.MetadataValue.float(round(manifest.bytes / duration / 2**20, 2)),
        "sha256": manifest.sha256 or "",
        "source_version": manifest.source_version,
        "started_at": dg.MetadataValue.timestamp(manifest.started_at.timestamp()),
        "finished_at": dg.MetadataValue.timestamp(manifest.finished_at.timestamp()),
        "recovery_point": dg.MetadataValue.timestamp(manifest.recovery_point.timestamp()),
        "encryption": manifest.encryption or "none",
        "artifacts": table(
            [{"name": a.name, "size": human_bytes(a.size), "sha256": a.sha256[:16] + "…", "url": a.url}
             for a in artifacts]
        ),
        "counts": table([{"what": k, "count": v} for k, v in sorted(manifest.counts.items())]),
    }
    if manifest.source_bytes is not None:
        metadata["source_bytes"] = dg.MetadataValue.int(manifest.source_bytes)
        metadata["source"] = human_bytes(manifest.source_bytes)
        metadata["read_mib_per_second"] = dg.MetadataValue.float(round(manifest.source_bytes / duration / 2**20, 2))
    if artifacts:
        metadata["artifact_url"] = dg.MetadataValue.url(artifacts[0].url)
    return metadata


def _backup_asset(spec: Spec, store: Datastore) -> dg.AssetsDefinition:
    key = backup_key(store.name)
    retention = store.retention

    @dg.asset(
        key=key,
        deps=[layer_key(store.layer)] if store.layer else [],
        group_name=BACKUPS_GROUP,
        kinds={ENGINE_KIND[store.engine], "s3"},
        owners=[store.owner or spec.platform.owner],
        pool=datastore_pool(store.name),
        freshness_policy=dg.FreshnessPolicy.time_window(fail_window=backup_freshness_window(spec, store)),
        check_specs=[dg.AssetCheckSpec(
            ARTIFACT_CHECKSUM, asset=key, blocking=True,
            description="This run's backup, re-read from the store against its manifest (size, sha256), then "
            "the tool's own verification. Only a verified backup counts for retention and restore tests.",
        )],
        description=(
            f"One {store.method} backup of the {store.engine} datastore `{store.name}` per run (schedule "
            f"`{store.schedule}`, RPO {spec.rpo_minutes(store)} min; keep {retention.hourly} hourly / "
            f"{retention.daily} daily / {retention.weekly} weekly verified backups). A materialization is a "
            "verified backup: a failed or unverified one materializes nothing, the previous stays the newest."
        ),
        metadata={"engine": store.engine, "method": store.method, "schedule": store.schedule},
    )
    def _backup(
        context: dg.AssetExecutionContext,
        object_store: ObjectStoreResource,
        kubernetes: KubernetesResource,
        pushgateway: PushgatewayResource,
    ):
        prefix = f"backup of '{store.name}' failed"
        environment = get_environment()
        try:
            catalog = BackupCatalog(object_store.get_store(), store.name)
            services = _services(kubernetes, object_store)
            driver = build_driver(store, services)
            require_preflight(store, driver, services, operation="backup")
            with tempfile.TemporaryDirectory(prefix=f"ops-backup-{store.name}-") as work_dir:
                started = datetime.now(UTC)
                manifest = catalog.run_backup(
                    driver, store, day_folder(started, spec.platform.timezone),
                    password=services.password(store), work_dir=Path(work_dir),
                )
        except OpsPlatformError as error:
            pushed = _push(context, pushgateway, metrics.BACKUP_JOB, store.name, metrics.backup_failed(
                store.engine, store.method, environment, datetime.now(UTC)))
            yield dg.AssetCheckResult(
                check_name=ARTIFACT_CHECKSUM, passed=False,
                description=prefixed(f"no backup was committed: {prefix}", str(error)),
            )
            raise failure(prefix, error, {"newest_verified_backup": _newest_verified_id(object_store, store),
                                          "metrics": pushed}) from None

        problems, checked = _verify(catalog, driver, manifest)
        check_metadata = {
            "backup_id": manifest.backup_id,
            "recovery_point": dg.MetadataValue.timestamp(manifest.recovery_point.timestamp()),
            "finished_at": dg.MetadataValue.timestamp(manifest.finished_at.timestamp()),
            "manifest_url": dg.MetadataValue.url(
                catalog.store.url(catalog.manifest_key(manifest.partition, manifest.backup_id))),
            "artifacts": len(manifest.artifacts),
            **checked,
        }
        if problems:
            pushed = _push(context, pushgateway, metrics.BACKUP_JOB, store.name, metrics.backup_failed(
                store.engine, store.method, environment, datetime.now(UTC)))
            reason = "; ".join(problems)
            yield dg.AssetCheckResult(check_name=ARTIFACT_CHECKSUM, passed=False,
                                      description=f"backup {manifest.backup_id}: {reason}", metadata=check_metadata)
            raise dg.Failure(
                f"backup {manifest.backup_id} of '{store.name}' was written but failed its verification ({reason}); "
                "it is not counted as verified and nothing was pruned",
                metadata={"newest_verified_backup": _newest_verified_id(object_store, store), "metrics": pushed},
            )
        catalog.mark_verified(manifest, checked, datetime.now(UTC))
        pushed = _push(context, pushgateway, metrics.BACKUP_JOB, store.name,
                       metrics.backup_succeeded(manifest, environment))
        plan = _prune(context, catalog, store, driver, spec.platform.timezone)
        if plan.pruned:
            # Earlier materializations link to these objects: say in the UI that they are gone.
            context.log_event(dg.AssetObservation(asset_key=key, metadata={
                "pruned": table([{"backup": p.backup_id, "manifest (deleted)": p.manifest_url,
                                  "engine": p.engine or "-"} for p in plan.pruned]),
                "pruned_backup_ids": ", ".join(p.backup_id for p in plan.pruned),
            }))
        yield dg.MaterializeResult(
            metadata={
                **manifest_metadata(manifest),
                "metrics": pushed,
                "manifest_url": check_metadata["manifest_url"],
                "catalog_url": dg.MetadataValue.url(catalog.store.url(catalog.root.rstrip("/"))),
                "retention": _retention_table(plan),
                "retention_errors": "\n".join(plan.errors) or "none",
            },
            check_results=[dg.AssetCheckResult(
                check_name=ARTIFACT_CHECKSUM, passed=True,
                description=f"backup {manifest.backup_id}: artifacts match the manifest"
                + (" and the tool's verification passed" if checked else ""),
                metadata=check_metadata,
            )],
        )

    return _backup


def _verify(catalog: BackupCatalog, driver, manifest: BackupManifest) -> tuple[list[str], dict[str, str]]:
    """Our checksum, then (when it holds) the tool's own verification."""
    try:
        problems = catalog.verify_artifacts(manifest)
        if problems:
            return problems, {}
        verification = driver.verify(manifest, catalog.store)
    except OpsPlatformError as error:
        return [f"verification could not run: {error}"], {}
    return list(verification.problems), {k: str(v) for k, v in verification.checked.items()}


def _prune(context, catalog: BackupCatalog, store: Datastore, driver, timezone: str) -> RetentionPlan:
    """Retention after verification; what it cannot delete is a warning, never a failed backup."""
    try:
        plan = catalog.prune(store.retention, timezone=timezone, expire=getattr(driver, "expire", None))
    except OpsPlatformError as error:
        context.log.warning(f"retention of '{store.name}' did not run: {error}; the backup stays committed")
        return RetentionPlan([], [], errors=[f"retention did not run: {error}"])
    for error in plan.errors:
        context.log.warning(f"retention of '{store.name}': could not prune {error}")
    context.log.info(f"retention of '{store.name}': pruned {len(plan.pruned)}, kept {len(plan.keep)}")
    return plan


def _retention_table(plan: RetentionPlan) -> dg.MetadataValue:
    pruned = {p.backup_id for p in plan.pruned}
    rows = [{"backup": m.backup_id, "kept because": plan.reasons[m.backup_id]} for m in plan.keep]
    rows += [{"backup": m.backup_id, "kept because": "pruned" if m.backup_id in pruned else "prune failed"}
             for m in plan.delete]
    return table(rows)


def _push(
    context: dg.AssetExecutionContext, pushgateway: PushgatewayResource, job: str, datastore: str,
    samples: list[metrics.Sample],
) -> str:
    outcome = metrics.push_results(pushgateway.get_client(), job, datastore, samples)
    (context.log.info if outcome.startswith("pushed") else context.log.warning)(f"metrics {outcome}")
    return outcome


def _newest_verified_id(object_store: ObjectStoreResource, store: Datastore) -> str:
    try:
        newest = BackupCatalog(object_store.get_store(), store.name).latest_verified()
    except OpsPlatformError as error:
        return f"unknown: {error}"
    return newest.backup_id if newest else "none"


def _restore_test_asset(spec: Spec, store: Datastore) -> dg.AssetsDefinition:
    assert store.restore_test is not None
    key = restore_test_key(store.name)
    rto_minutes, rpo_minutes = spec.rto_minutes(store), spec.rpo_minutes(store)
    rto_seconds, rpo_seconds = rto_minutes * 60, rpo_minutes * 60
    interval = timedelta(minutes=max_gap_minutes(store.restore_test.schedule))

    @dg.asset(
        key=key,
        deps=[backup_key(store.name)],
        group_name=RESTORE_TESTS_GROUP,
        kinds={ENGINE_KIND[store.engine]},
        owners=[store.owner or spec.platform.owner],
        pool=datastore_pool(store.name),
        freshness_policy=dg.FreshnessPolicy.time_window(fail_window=interval + RESTORE_TEST_GRACE),
        check_specs=[
            dg.AssetCheckSpec(DATA_VERIFIED, asset=key,
                              description="This run restored the newest verified backup; counts match the "
                              "manifest and every verification query passed."),
            dg.AssetCheckSpec(RTO_WITHIN_OBJECTIVE, asset=key,
                              description=f"This run's measured restore time ≤ RTO ({rto_minutes} min)."),
            dg.AssetCheckSpec(RPO_WITHIN_OBJECTIVE, asset=key,
                              description=f"The point this run's restore proved is ≤ RPO ({rpo_minutes} min) "
                              "older than the test's start."),
        ],
        description=(
            f"Restores the newest verified backup of `{store.name}` into a scratch target, verifies it and "
            f"measures the restore time against RTO {rto_minutes} min and the proven recovery point against "
            f"RPO {rpo_minutes} min. Materializes only when all three hold."
        ),
        metadata={"schedule": store.restore_test.schedule},
    )
    def _restore_test(
        context: dg.AssetExecutionContext,
        object_store: ObjectStoreResource,
        kubernetes: KubernetesResource,
        pushgateway: PushgatewayResource,
    ):
        environment = get_environment()
        prefix = f"restore test of '{store.name}'"
        try:
            services = _services(kubernetes, object_store)
            driver = build_driver(store, services)
            catalog = BackupCatalog(object_store.get_store(), store.name)
            with tempfile.TemporaryDirectory(prefix=f"ops-restore-{store.name}-") as work_dir:
                result = run_restore_test(store, driver, catalog, Path(work_dir))
        except OpsPlatformError as error:  # refused, failed restore, store or manifest problem
            pushed = _push(context, pushgateway, metrics.RESTORE_TEST_JOB, store.name,
                           metrics.restore_test_failed(environment, datetime.now(UTC)))
            reason = prefixed(prefix, str(error))
            for name in RESTORE_TEST_CHECKS:
                yield dg.AssetCheckResult(check_name=name, passed=False, description=f"not proven: {reason}")
            raise failure(prefix, error, {"metrics": pushed}) from None

        pushed = _push(context, pushgateway, metrics.RESTORE_TEST_JOB, store.name, metrics.restore_test_finished(
            result, environment, rto_seconds, datetime.now(UTC), rpo_seconds))
        checks = restore_test_checks(result, rto_seconds, rpo_seconds)
        metadata = {**restore_test_metadata(result), "metrics": pushed}
        failed = [check for check in checks if not check.passed]
        if failed:
            for check in checks:
                yield check
            raise dg.Failure(
                f"{prefix} failed: " + "; ".join(check.description or check.check_name for check in failed),
                metadata=metadata,
            )
        yield dg.MaterializeResult(metadata=metadata, check_results=checks)

    return _restore_test


def restore_test_checks(result: RestoreTestResult, rto_seconds: int, rpo_seconds: int) -> list[dg.AssetCheckResult]:
    """The three verdicts of one restore test, from its own measurements."""
    point = dg.MetadataValue.timestamp(result.recovery_point.timestamp())
    return [
        dg.AssetCheckResult(
            check_name=DATA_VERIFIED, passed=result.verified,
            description=(f"backup {result.backup_id}: restored data matches the backup" if result.verified
                         else f"backup {result.backup_id}: " + "; ".join(result.problems)),
            metadata={"backup_id": result.backup_id, "target": result.target},
        ),
        dg.AssetCheckResult(
            check_name=RTO_WITHIN_OBJECTIVE, passed=result.restore_seconds <= rto_seconds,
            description=f"backup {result.backup_id} restored and verified in {result.restore_seconds:.1f} s "
            f"(RTO {rto_seconds} s)",
            metadata={"backup_id": result.backup_id, "restore_seconds": round(result.restore_seconds, 3),
                      "rto_seconds": rto_seconds},
        ),
        dg.AssetCheckResult(
            check_name=RPO_WITHIN_OBJECTIVE, passed=result.backup_age_seconds <= rpo_seconds,
            description=f"the restore proved {result.recovery_point.isoformat()}, "
            f"{result.backup_age_seconds / 60:.1f} min before the test started (RPO {rpo_seconds // 60} min)",
            metadata={"backup_id": result.backup_id, "recovery_point": point,
                      "data_loss_seconds": round(result.backup_age_seconds, 1), "rpo_seconds": rpo_seconds},
        ),
    ]


def restore_test_metadata(result: RestoreTestResult) -> dict[str, object]:
    return {
        "backup_id": result.backup_id,
        "target": result.target,
        "restore_seconds": dg.MetadataValue.float(round(result.restore_seconds, 3)),
        "total_seconds": dg.MetadataValue.float(round(result.total_seconds, 3)),
        "recovery_point": dg.MetadataValue.timestamp(result.recovery_point.timestamp()),
        "data_loss_seconds": dg.MetadataValue.float(round(result.backup_age_seconds, 1)),
        "recovery_note": result.recovery_note or "the backup's own recovery point",
        "verified": result.verified,
        "problems": "\n".join(result.problems) or "none",
        "counts": table(result_rows(result)),
        "queries": table([{"query": q.query, "value": q.value, "ok": q.ok} for q in result.queries]),
    }
