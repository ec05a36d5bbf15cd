"""One operation per datastore at a time, manual launches included: two `dagster asset
materialize` of one datastore's backup, launched while the first is still reading a
real Redis, do not overlap; the second waits for the datastore's pool."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ops_platform.assets.keys import backup_key, datastore_pool
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.local_servers import free_port
from ops_platform.resources.object_store import LocalObjectStore
from ops_platform.spec import DEFAULT_SPEC_PATH
from tests.fixtures.backup_sources import redis_backup_source  # noqa: F401

pytestmark = pytest.mark.slow
POOL = datastore_pool("redis_cache")
STEP = "backups__redis_cache"


def wait_until(condition, what: str, attempts: int = 3000, interval: float = 0.1):
    for _ in range(attempts):
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up waiting: {what}")


@pytest.fixture
def cli_env(redis_backup_source, tmp_path):  # noqa: F811
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        # What infra/dagster/dagster.yaml sets for production: every pool without a limit gets 1.
        "concurrency": {"pools": {"granularity": "op", "default_limit": 1}},
        "telemetry": {"enabled": False},
    }))
    spec = tmp_path / "platform.yaml"
    spec.write_text(yaml.safe_dump({
        "extends": str(DEFAULT_SPEC_PATH),
        "datastores": [{
            "name": "redis_cache", "engine": "redis", "method": "rdb",
            "connection": {"host": "127.0.0.1", "port": redis_backup_source.port, "password_env": "REDIS_PASSWORD"},
            "schedule": "15,45 * * * *",
            "retention": {"hourly": 24, "daily": 7, "weekly": 0},
            "restore_test": {"target": {"host": "127.0.0.1", "port": free_port(),
                                        "data_dir": str(tmp_path / "scratch")}},
        }],
    }))
    env = {**os.environ, "DAGSTER_HOME": str(home), "OPS_PLATFORM_SPEC": str(spec), "OPS_ENV": "local",
           "OPS_BACKUP_DIR": str(tmp_path / "store"), "REDIS_PASSWORD": redis_backup_source.password,
           "TMPDIR": str(tmp_path), "DAGSTER_DISABLE_TELEMETRY": "1"}
    for name in ("OPS_BACKUP_BUCKET", "OPS_PUSHGATEWAY_URL", "KUBECONFIG"):
        env.pop(name, None)
    return env, home, tmp_path / "store"


def launch(env, tmp_path: Path, name: str) -> subprocess.Popen:
    dagster = str(Path(sys.executable).parent / "dagster")
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [dagster, "asset", "materialize", "-m", "ops_platform.definitions", "--select", "backups/redis_cache"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def test_a_second_backup_of_the_same_datastore_waits_for_the_first(cli_env, redis_backup_source):  # noqa: F811
    env, home, store_dir = cli_env
    # Redis's own test knob: the RDB the backup reads is written slowly, so the first run is
    # still reading when the second is launched.
    redis_backup_source.client().config_set("rdb-key-save-delay", 50000)
    instance = dg.DagsterInstance.from_config(str(home))
    first = launch(env, home, "first")
    try:
        wait_until(lambda: instance.event_log_storage.get_concurrency_info(POOL).active_slot_count == 1,
                   "the first backup holds the datastore's pool")
        [holder] = instance.event_log_storage.get_concurrency_info(POOL).claimed_slots
        second = launch(env, home, "second")
        try:
            blocked = wait_until(
                lambda: [run.run_id for run in instance.get_runs() if run.run_id != holder.run_id and any(
                    f"blocked by limit for pool {POOL}" in (record.event_log_entry.dagster_event.message or "")
                    for record in instance.get_records_for_run(
                        run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records)],
                "the second backup waits for the pool")
            assert first.poll() is None, "the first backup ended before the second was launched"
            assert second.wait(timeout=300) == 0, (home / "second.log").read_text()[-2000:]
        finally:
            second.kill()
        assert first.wait(timeout=300) == 0, (home / "first.log").read_text()[-2000:]
    finally:
        first.kill()
        redis_backup_source.client().config_set("rdb-key-save-delay", 0)
    assert len(blocked) == 1
    records = instance.fetch_materializations(backup_key("redis_cache"), limit=10).records
    spans = sorted((r.asset_materialization.metadata["started_at"].value,
                    r.asset_materialization.metadata["finished_at"].value) for r in records)
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0]  # the two never read the datastore at once
    # Retention kept the newer (same hour); the catalog holds exactly what the last run verified.
    newest = BackupCatalog(LocalObjectStore(store_dir), "redis_cache").latest_verified()
    assert newest.started_at.timestamp() == pytest.approx(spans[1][0])
    runs = {run.run_id: run for run in instance.get_runs()}
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs.values())
