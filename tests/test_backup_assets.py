"""`backups/<datastore>` and `restore_tests/<datastore>` in Dagster, on a real Redis
and the local object store: the backup, its blocking checksum check, the restore
test and its RTO / RPO / data checks, and the faults around them."""

from __future__ import annotations

import io
from pathlib import Path

import dagster as dg
import pytest
import requests

from ops_platform.assets import backups as backup_assets
from ops_platform.assets.keys import backup_key
from ops_platform.backups import metrics
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.local_servers import free_port
from ops_platform.resources.alerting import PushgatewayResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore, ObjectStoreResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.fixtures.backup_sources import redis_backup_source  # noqa: F401

PARTITION = "2026-11-22"
BASE = load_spec(DEFAULT_SPEC_PATH)


@pytest.fixture
def setup(redis_backup_source, tmp_path, monkeypatch, pushgateway_server):
    monkeypatch.setenv("REDIS_PASSWORD", redis_backup_source.password)
    store = BASE.datastores[0].model_validate({
        "name": "redis_cache", "engine": "redis", "method": "rdb",
        "connection": {"host": "127.0.0.1", "port": redis_backup_source.port, "password_env": "REDIS_PASSWORD"},
        "retention": {"daily": 2, "weekly": 0},
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


def run_backup(spec, resources, partition=PARTITION):
    return dg.materialize(
        [*backup_assets.build_backup_assets(spec), *backup_assets.build_backup_checks(spec)],
        resources=resources, partition_key=partition, raise_on_error=False,
    )


def run_restore_test(spec, resources, instance):
    assets = [*backup_assets.build_restore_test_assets(spec), *backup_assets.build_restore_test_checks(spec)]
    return dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False)


def check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def failure_message(result) -> str:
    failure = next(event for event in result.all_events if event.is_step_failure)
    return failure.step_failure_data.error.message


def test_backup_records_metadata_and_passes_its_checksum_check(setup):
    spec, resources, store = setup
    result = run_backup(spec, resources)
    assert result.success
    [event] = result.asset_materializations_for_node("backups__redis_cache")
    metadata = event.metadata
    assert metadata["size_bytes"].value > 0
    assert metadata["duration_seconds"].value > 0
    assert metadata["throughput_mib_per_second"].value > 0
    assert len(metadata["sha256"].value) == 64
    assert metadata["artifact_url"].value.startswith("file://")
    assert "keys:db0" in metadata["counts"].value
    checks = check_results(result)
    assert checks["artifact_checksum"].passed
    latest = BackupCatalog(store, "redis_cache").latest()
    assert latest.backup_id == metadata["backup_id"].value
    assert metadata["metrics"].value.startswith("pushed 4 gauges to ")
    gauges = pushed(resources, metrics.BACKUP_JOB)
    assert gauges["ops_platform_backup_last_success_timestamp_seconds"] == latest.finished_at.timestamp()
    assert gauges["ops_platform_backup_size_bytes"] == latest.bytes


def test_corrupt_artifact_fails_the_check_and_the_restore_test_refuses(setup):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources).success
    catalog = BackupCatalog(store, "redis_cache")
    manifest = catalog.latest()
    artifact = manifest.artifact_list()[0]
    data = store.get_bytes(artifact.key)
    store.put(artifact.key, io.BytesIO(data[:-10] + b"0123456789"))

    # The check alone, as the UI's "Execute check" runs it: on the newest backup.
    check = dg.materialize(
        [*backup_assets.build_backup_assets(spec), *backup_assets.build_backup_checks(spec)],
        resources=resources, instance=instance, raise_on_error=False,
        selection=dg.AssetSelection.checks_for_assets(backup_key("redis_cache")),
    )
    evaluation = check_results(check)["artifact_checksum"]
    assert not evaluation.passed
    assert "does not match the manifest" in evaluation.description

    result = run_restore_test(spec, resources, instance)
    assert not result.success
    message = failure_message(result)
    assert "failed its checksum" in message and "nothing was restored or deleted" in message
    assert store.head(artifact.key) is not None
    assert catalog.latest() == manifest
    assert pushed(resources, metrics.RESTORE_TEST_JOB)["ops_platform_restore_test_passed"] == 0


def test_restore_test_measures_and_passes_its_checks(setup):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources).success
    result = run_restore_test(spec, resources, instance)
    assert result.success, failure_message(result)
    [event] = result.asset_materializations_for_node("restore_tests__redis_cache")
    assert event.metadata["verified"].value is True
    assert event.metadata["restore_seconds"].value > 0
    checks = check_results(result)
    assert checks["rto_within_objective"].passed
    assert checks["rpo_within_objective"].passed
    assert checks["data_verified"].passed
    assert not (Path(spec.datastores[0].restore_test.target.data_dir)).exists()
    gauges = pushed(resources, metrics.RESTORE_TEST_JOB)
    assert gauges["ops_platform_restore_test_passed"] == 1
    assert gauges["ops_platform_restore_test_restore_seconds"] == pytest.approx(
        event.metadata["restore_seconds"].value, abs=0.001)


def test_restore_test_reports_data_that_does_not_match(setup, redis_backup_source):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources).success
    catalog = BackupCatalog(store, "redis_cache")
    manifest = catalog.latest()
    # A manifest that claims more keys than the backup holds: the restored data cannot match it.
    tampered = manifest.model_copy(update={"counts": {**manifest.counts, "keys:db0": 999}})
    store.put_bytes(catalog.manifest_key(manifest.partition, manifest.backup_id), tampered.to_json())
    result = run_restore_test(spec, resources, instance)
    assert result.success
    checks = check_results(result)
    assert not checks["data_verified"].passed
    assert "keys:db0" in checks["data_verified"].description


def test_garbled_newest_manifest_refuses_the_restore_and_keeps_everything(setup):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources, "2026-11-21").success
    assert run_backup(spec, resources, "2026-11-22").success
    catalog = BackupCatalog(store, "redis_cache")
    newest = catalog.latest()
    key = catalog.manifest_key(newest.partition, newest.backup_id)
    store.put_bytes(key, b"{not json")
    before = sorted(obj.key for obj in store.list("backups/"))
    result = run_restore_test(spec, resources, instance)
    assert not result.success
    assert "cannot be read" in failure_message(result) and "not JSON" in failure_message(result)
    assert sorted(obj.key for obj in store.list("backups/")) == before


def test_restore_target_equal_to_source_is_refused_before_writing(setup, tmp_path):
    spec, resources, store = setup
    instance = dg.DagsterInstance.ephemeral()
    assert run_backup(spec, resources).success
    datastore = spec.datastores[0]
    # localhost resolves to the source's 127.0.0.1: the same server under another name.
    target = datastore.restore_test.target.model_copy(update={"host": "localhost", "port": datastore.connection.port})
    same = datastore.model_copy(update={"restore_test": datastore.restore_test.model_copy(update={"target": target})})
    spec = spec.model_copy(update={"datastores": [same]})
    result = run_restore_test(spec, resources, instance)
    assert not result.success
    assert "refused before writing anything" in failure_message(result)
    assert not Path(target.data_dir).exists()


def test_failed_backup_keeps_the_previous_as_latest(setup, redis_backup_source):
    spec, resources, store = setup
    assert run_backup(spec, resources, "2026-11-21").success
    previous = BackupCatalog(store, "redis_cache").latest()
    redis_backup_source.stop()
    result = run_backup(spec, resources, "2026-11-22")
    assert not result.success
    failure = next(event for event in result.all_events if event.is_step_failure)
    assert f"127.0.0.1:{spec.datastores[0].connection.port}" in failure.step_failure_data.error.message
    assert failure.step_failure_data.user_failure_data.metadata["latest_good_backup"].value == previous.backup_id
    assert BackupCatalog(store, "redis_cache").latest() == previous
    # The alert's gauge still says when the last good backup finished; the failure has its own.
    gauges = pushed(resources, metrics.BACKUP_JOB)
    assert gauges["ops_platform_backup_last_success_timestamp_seconds"] == previous.finished_at.timestamp()
    assert gauges["ops_platform_backup_last_failure_timestamp_seconds"] > previous.finished_at.timestamp()


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
