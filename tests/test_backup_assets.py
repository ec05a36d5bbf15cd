"""`backups/<datastore>` and `restore_tests/<datastore>` in Dagster, on a real Redis
and the local object store: every check comes from the run that did the work (a
refused restore test leaves failed checks, never the last green ones), backups
cannot be filed under a past day, freshness is the age of the newest verified
backup, and the faults around them."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import requests
from dagster._core.definitions.freshness import FreshnessState
from dagster._core.definitions.freshness_evaluator import TimeWindowFreshnessPolicyEvaluator
from dagster._core.loader import LoadingContextForTest
from dagster._core.test_utils import freeze_time

from ops_platform.assets import backups as backup_assets
from ops_platform.assets.compliance import graph_evidence
from ops_platform.assets.keys import backup_key, restore_test_key
from ops_platform.backups import metrics
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.compliance.controls.graph import backups_within_rpo, restore_tests_within_rto
from ops_platform.compliance.evidence import Evidence
from ops_platform.compliance.model import ControlConfig
from ops_platform.local_servers import free_port
from ops_platform.resources.alerting import PushgatewayResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore, ObjectStoreResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.fixtures.backup_sources import redis_backup_source  # noqa: F401

BASE = load_spec(DEFAULT_SPEC_PATH)


@pytest.fixture
def setup(redis_backup_source, tmp_path, monkeypatch, pushgateway_server):
    monkeypatch.setenv("REDIS_PASSWORD", redis_backup_source.password)
    store = BASE.datastores[0].model_validate({
        "name": "redis_cache", "engine": "redis", "method": "rdb",
        "connection": {"host": "127.0.0.1", "port": redis_backup_source.port, "password_env": "REDIS_PASSWORD"},
        "retention": {"hourly": 24, "daily": 2, "weekly": 0},
        "restore_test": {"target": {"host": "127.0.0.1", "port": free_port(),
                                    "data_dir": str(tmp_path / "scratch")},
                         "verify_keys": ["ontology:schema_version", "concept:*"]},
    })
    spec = BASE.model_copy(update={"datastores": [store], "layers": [], "volumes": [], "images": None})
    for job in (metrics.BACKUP_JOB, metrics.RESTORE_TEST_JOB):  # each test starts with no pushed results
        requests.delete(f"{pushgateway_server.url}/metrics/job/{job}/datastore/redis_cache", timeout=5)
    resources = {
        "object_store": ObjectStoreResource(local_dir=str(tmp_path / "store")),
        "kubernetes": KubernetesResource(),
        "pushgateway": PushgatewayResource(url=pushgateway_server.url),
    }
    return spec, resources, LocalObjectStore(tmp_path / "store")


def pushed(resources, job: str) -> dict[str, float]:
    """The gauges the Pushgateway holds for redis_cache in ``job``, by name."""
    text = requests.get(f"{resources['pushgateway'].url}/metrics", timeout=5).text
    values = {}
    for line in text.splitlines():
        if not line.startswith("#") and f'job="{job}"' in line and 'datastore="redis_cache"' in line:
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            values[name] = float(value)
    return values


def run_backup(spec, resources, instance=None):
    return dg.materialize(backup_assets.build_backup_assets(spec), resources=resources, instance=instance,
                          raise_on_error=False)


def run_restore_test(spec, resources, instance):
    return dg.materialize(backup_assets.build_restore_test_assets(spec), resources=resources, instance=instance,
                          raise_on_error=False)


def latest_check(instance, key, name):
    """The latest evaluation of a check, as the UI shows it."""
    record = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(key, name), limit=1)[0]
    return record.status.value, record.event.dagster_event.event_specific_data


def check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def failure_message(result) -> str:
    failure = next(event for event in result.all_events if event.is_step_failure)
    return failure.step_failure_data.error.message


def test_backup_records_metadata_and_its_run_yields_the_checksum_check(setup):
    spec, resources, store = setup
    result = run_backup(spec, resources)
    assert result.success
    [event] = result.asset_materializations_for_node("backups__redis_cache")
    metadata = event.metadata
    assert metadata["stored_bytes"].value > 0
    assert metadata["duration_seconds"].value > 0
    assert metadata["stored_mib_per_second"].value > 0
    assert len(metadata["sha256"].value) == 64
    assert metadata["artifact_url"].value.startswith("file://")
    assert "keys:db0" in metadata["counts"].value
    catalog = BackupCatalog(store, "redis_cache")
    latest = catalog.latest_verified()
    assert latest.backup_id == metadata["backup_id"].value
    assert metadata["recovery_point"].value == latest.recovery_point.timestamp()
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "artifact_checksum" and check.passed
    assert check.metadata["backup_id"].value == latest.backup_id
    assert check.metadata["recovery_point"].value == latest.recovery_point.timestamp()
    assert latest.backup_id in catalog.listing().verified
    # One step does the backup and its check: no process started per check.
    assert {e.step_key for e in result.all_events if e.step_key} == {"backups__redis_cache"}
    assert metadata["metrics"].value.startswith("pushed 4 gauges to ")
    gauges = pushed(resources, metrics.BACKUP_JOB)
    assert gauges["ops_platform_backup_last_success_timestamp_seconds"] == latest.finished_at.timestamp()
    assert gauges["ops_platform_backup_size_bytes"] == latest.bytes


def test_a_backup_cannot_be_filed_under_a_past_day(setup):
    spec, resources, store = setup
    [asset] = backup_assets.build_backup_assets(spec)
    assert asset.partitions_def is None
    with pytest.raises(Exception, match="no PartitionsDefinition"):  # refused before any step starts
        dg.materialize([asset], resources=resources, partition_key="2026-11-01")
    assert list(store.list("backups/")) == []
    # The day folder is the day the backup was taken, in the platform's timezone.
    assert run_backup(spec, resources).success
    manifest = BackupCatalog(store, "redis_cache").latest_verified()
    assert manifest.partition == manifest.started_at.astimezone(ZoneInfo(spec.platform.timezone)).date().isoformat()


def test_freshness_is_the_age_of_the_newest_verified_backup(setup, redis_backup_source):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    key = backup_key("redis_cache")
    node = dg.Definitions(assets=backup_assets.build_backup_assets(spec), resources=resources).resolve_asset_graph().get(key)
    rpo = timedelta(minutes=spec.rpo_minutes(spec.datastores[0]))
    assert node.freshness_policy.fail_window.to_timedelta() == rpo

    def freshness(at):
        with freeze_time(at):
            return asyncio.run(TimeWindowFreshnessPolicyEvaluator().evaluate_freshness(
                LoadingContextForTest(instance), node))

    now = datetime.now(UTC)
    assert freshness(now + rpo - timedelta(minutes=1)) == FreshnessState.PASS
    # The next backup fails: nothing materializes, so the backup goes stale past its RPO.
    redis_backup_source.stop()
    assert not run_backup(spec, resources, instance).success
    assert freshness(now + rpo + timedelta(minutes=1)) == FreshnessState.FAIL


def test_freshness_window_of_a_point_in_time_datastore_is_its_base_backup_interval():
    store = BASE.datastore("postgres_main")
    assert store.method == "pgbackrest" and store.schedule == "0 2 * * *"
    assert backup_assets.backup_freshness_window(BASE, store) == timedelta(hours=24, minutes=BASE.rpo_minutes(store))
    redis = BASE.datastore("redis_cache")
    assert backup_assets.backup_freshness_window(BASE, redis) == timedelta(minutes=60)


def test_a_refused_restore_test_leaves_failed_checks_not_the_last_green_ones(setup):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    assert run_restore_test(spec, resources, instance).success
    key = restore_test_key("redis_cache")
    assert latest_check(instance, key, "data_verified")[0] == "SUCCEEDED"

    catalog = BackupCatalog(store, "redis_cache")
    manifest = catalog.latest_verified()
    artifact = manifest.artifact_list()[0]
    data = store.get_bytes(artifact.key)
    store.put(artifact.key, io.BytesIO(data[:-10] + b"0123456789"))
    result = run_restore_test(spec, resources, instance)
    assert not result.success
    message = failure_message(result)
    assert "failed its checksum" in message and "nothing was restored or deleted" in message
    assert message.count("restore test of 'redis_cache'") == 1
    checks = check_results(result)
    assert set(checks) == {"data_verified", "rto_within_objective", "rpo_within_objective"}
    assert not any(check.passed for check in checks.values())
    assert all("failed its checksum" in check.description for check in checks.values())
    for name in checks:  # what the UI and compliance read: the latest evaluation, failed
        status, evaluation = latest_check(instance, key, name)
        assert status == "FAILED" and not evaluation.passed
    assert result.asset_materializations_for_node("restore_tests__redis_cache") == []
    assert store.head(artifact.key) is not None
    assert catalog.latest_verified() == manifest
    assert pushed(resources, metrics.RESTORE_TEST_JOB)["ops_platform_restore_test_passed"] == 0
    # Compliance reads the same verdicts: the latest restore test failed, whatever passed before.
    evidence = Evidence(source="test", kinds=frozenset({"graph"}), graph=graph_evidence(spec, instance, datetime.now(UTC)))
    [outcome] = restore_tests_within_rto.check(evidence, ControlConfig.from_spec(spec))
    assert not outcome.passed and "failed its checksum" in outcome.message
    [backup_outcome] = backups_within_rpo.check(evidence, ControlConfig.from_spec(spec))
    assert backup_outcome.passed and manifest.backup_id in backup_outcome.message


def test_restore_test_measures_and_its_run_yields_the_checks(setup):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    result = run_restore_test(spec, resources, instance)
    assert result.success, failure_message(result)
    [event] = result.asset_materializations_for_node("restore_tests__redis_cache")
    assert event.metadata["verified"].value is True
    assert event.metadata["restore_seconds"].value > 0
    checks = check_results(result)
    assert checks["rto_within_objective"].passed
    assert checks["rpo_within_objective"].passed
    assert checks["data_verified"].passed
    newest = BackupCatalog(store, "redis_cache").latest_verified()
    assert all(check.metadata["backup_id"].value == newest.backup_id for check in checks.values())
    # Redis restores the backup itself: the point proven is the backup's own recovery point.
    assert checks["rpo_within_objective"].metadata["recovery_point"].value == newest.recovery_point.timestamp()
    assert {e.step_key for e in result.all_events if e.step_key} == {"restore_tests__redis_cache"}
    assert not (Path(spec.datastores[0].restore_test.target.data_dir)).exists()
    gauges = pushed(resources, metrics.RESTORE_TEST_JOB)
    assert gauges["ops_platform_restore_test_passed"] == 1
    assert gauges["ops_platform_restore_test_restore_seconds"] == pytest.approx(
        event.metadata["restore_seconds"].value, abs=0.001)


def test_restore_test_whose_data_does_not_match_fails_with_the_reason(setup, redis_backup_source):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    catalog = BackupCatalog(store, "redis_cache")
    manifest = catalog.latest_verified()
    # A manifest that claims more keys than the backup holds: the restored data cannot match it.
    tampered = manifest.model_copy(update={"counts": {**manifest.counts, "keys:db0": 999}})
    store.put_bytes(catalog.manifest_key(manifest.partition, manifest.backup_id), tampered.to_json())
    result = run_restore_test(spec, resources, instance)
    assert not result.success
    checks = check_results(result)
    assert not checks["data_verified"].passed
    assert "keys:db0" in checks["data_verified"].description
    assert checks["rto_within_objective"].passed
    assert "keys:db0" in failure_message(result)
    assert result.asset_materializations_for_node("restore_tests__redis_cache") == []


def test_rpo_is_judged_on_the_point_the_restore_proved(setup, redis_backup_source):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    # The newest backup is older than the RPO when the restore test runs (backups stopped):
    store_spec = spec.datastores[0].model_copy(update={"rpo_minutes": 1})
    stale = spec.model_copy(update={"datastores": [store_spec]})
    catalog = BackupCatalog(store, "redis_cache")
    manifest = catalog.latest_verified()
    old = manifest.model_copy(update={"recovery_point": manifest.recovery_point - timedelta(minutes=5)})
    store.put_bytes(catalog.manifest_key(manifest.partition, manifest.backup_id), old.to_json())
    result = run_restore_test(stale, resources, instance)
    assert not result.success
    checks = check_results(result)
    assert checks["data_verified"].passed and checks["rto_within_objective"].passed
    rpo = checks["rpo_within_objective"]
    assert not rpo.passed and "RPO 1 min" in rpo.description
    assert rpo.metadata["data_loss_seconds"].value >= 300


def test_restore_test_restores_the_newest_verified_backup_past_newer_unverified_ones(setup):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    catalog = BackupCatalog(store, "redis_cache")
    verified = catalog.latest_verified()
    # Newer than it: a garbled manifest, and a backup whose verification never passed (no marker).
    store.put_bytes(f"{catalog.root}{verified.partition}/"
                    "29991231T000000Z-aaaaaa/manifest.json", b"{not json")
    unverified = verified.model_copy(update={"backup_id": "29991231T000001Z-bbbbbb",
                                             "finished_at": verified.finished_at + timedelta(minutes=1)})
    store.put_bytes(catalog.manifest_key(verified.partition, unverified.backup_id), unverified.to_json())
    before = sorted(obj.key for obj in store.list("backups/"))
    result = run_restore_test(spec, resources, instance)
    assert result.success, failure_message(result)
    assert check_results(result)["data_verified"].metadata["backup_id"].value == verified.backup_id
    assert sorted(obj.key for obj in store.list("backups/")) == before


def test_restore_test_with_no_verified_backup_is_refused(setup):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    result = run_restore_test(spec, resources, instance)
    assert not result.success
    assert "no verified backup of 'redis_cache'" in failure_message(result)
    assert not any(check.passed for check in check_results(result).values())


def test_restore_target_equal_to_source_is_refused_before_writing(setup, tmp_path):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    datastore = spec.datastores[0]
    # localhost resolves to the source's 127.0.0.1: the same server under another name.
    target = datastore.restore_test.target.model_copy(update={"host": "localhost", "port": datastore.connection.port})
    same = datastore.model_copy(update={"restore_test": datastore.restore_test.model_copy(update={"target": target})})
    spec = spec.model_copy(update={"datastores": [same]})
    result = run_restore_test(spec, resources, instance)
    assert not result.success
    assert "refused before writing anything" in failure_message(result)
    assert not check_results(result)["data_verified"].passed
    assert not Path(target.data_dir).exists()


def test_failed_backup_keeps_the_previous_as_newest_verified(setup, redis_backup_source):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    previous = BackupCatalog(store, "redis_cache").latest_verified()
    redis_backup_source.stop()
    result = run_backup(spec, resources, instance)
    assert not result.success
    failure = next(event for event in result.all_events if event.is_step_failure)
    message = failure.step_failure_data.error.message
    assert f"127.0.0.1:{spec.datastores[0].connection.port}" in message
    assert message.count("backup of 'redis_cache' failed") == 1
    assert failure.step_failure_data.user_failure_data.metadata["newest_verified_backup"].value == previous.backup_id
    [check] = result.get_asset_check_evaluations()
    assert not check.passed and "no backup was committed" in check.description
    assert result.asset_materializations_for_node("backups__redis_cache") == []
    assert BackupCatalog(store, "redis_cache").latest_verified() == previous
    # The alert's gauge still says when the last good backup finished; the failure has its own.
    gauges = pushed(resources, metrics.BACKUP_JOB)
    assert gauges["ops_platform_backup_last_success_timestamp_seconds"] == previous.finished_at.timestamp()
    assert gauges["ops_platform_backup_last_failure_timestamp_seconds"] > previous.finished_at.timestamp()


def test_retention_runs_after_verification_and_records_what_it_pruned(setup):
    spec, resources, store = setup
    one = spec.datastores[0].model_copy(update={"retention": spec.datastores[0].retention.model_copy(
        update={"hourly": 0, "daily": 1, "weekly": 0})})
    spec = spec.model_copy(update={"datastores": [one]})
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, instance).success
    first = BackupCatalog(store, "redis_cache").latest_verified()
    result = run_backup(spec, resources, instance)
    assert result.success
    catalog = BackupCatalog(store, "redis_cache")
    assert [m.backup_id for m in catalog.listing().manifests] == [catalog.latest_verified().backup_id]
    [observation] = [e.event_specific_data.asset_observation for e in result.all_events
                     if e.event_type_value == "ASSET_OBSERVATION"]
    assert observation.metadata["pruned_backup_ids"].value == first.backup_id
    [event] = result.asset_materializations_for_node("backups__redis_cache")
    assert "pruned" in event.metadata["retention"].value and event.metadata["retention_errors"].value == "none"


def test_object_store_down_fails_the_backup_clearly(setup, monkeypatch):
    spec, _, _ = setup
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    resources = {
        "object_store": ObjectStoreResource(
            bucket="backups", endpoint_url=f"http://127.0.0.1:{free_port()}", region="ap-northeast-2",
            max_attempts=1, connect_timeout_seconds=1,
        ),
        "kubernetes": KubernetesResource(),
        "pushgateway": PushgatewayResource(),  # OPS_PUSHGATEWAY_URL unset: results are not pushed, nothing fails
    }
    result = run_backup(spec, resources)
    assert not result.success
    message = failure_message(result)
    assert "AWS_ENDPOINT_URL" in message
    failure = next(event for event in result.all_events if event.is_step_failure)
    assert failure.step_failure_data.user_failure_data.metadata["metrics"].value == \
        "not pushed: OPS_PUSHGATEWAY_URL is not set"
    assert not result.get_asset_check_evaluations()[0].passed


def test_a_backup_whose_secret_is_missing_is_refused_by_its_preflight(setup, monkeypatch):
    spec, resources, store = setup
    monkeypatch.delenv("REDIS_PASSWORD")
    result = run_backup(spec, resources)
    assert not result.success
    assert "REDIS_PASSWORD" in failure_message(result)
    assert list(store.list("backups/")) == []
