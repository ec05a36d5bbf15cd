"""Backup and restore-test results pushed to a real Pushgateway, scraped by a real
Prometheus that evaluates the platform's own rule file (infra/prometheus/ops-alerts.yml):
the gauges we push are the ones BackupTooOld and RestoreTestFailed read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import yaml

from ops_platform.backups import metrics
from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.restore_test import RestoreTestResult
from ops_platform.local_servers import free_port
from ops_platform.local_servers.process import ServerProcess
from ops_platform.resources.alerting import Pushgateway, PushgatewayResource, Sample, exposition

RULES = Path(__file__).resolve().parent.parent / "infra" / "prometheus" / "ops-alerts.yml"


def rule(name: str) -> dict:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return next(r for group in groups for r in group["rules"] if r.get("alert") == name)


@pytest.fixture(scope="module")
def platform_prometheus(tmp_path_factory: pytest.TempPathFactory, pushgateway_server: ServerProcess) -> Iterator[str]:
    from tests.fixtures.monitoring import start_prometheus

    home = tmp_path_factory.mktemp("platform-prometheus")
    with start_prometheus(home, RULES, pushgateway_port=pushgateway_server.port).start() as server:
        yield server.url


def query(prometheus: str, promql: str) -> list[dict]:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def eventually(probe, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    """Poll ``probe`` until it returns something truthy (Prometheus scrapes and evaluates every second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def manifest(datastore: str, finished_at: datetime) -> BackupManifest:
    return BackupManifest(
        backup_id=f"{datastore}-{int(finished_at.timestamp())}", datastore=datastore, engine="postgresql",
        method="pg_dump", partition=finished_at.date().isoformat(), started_at=finished_at - timedelta(minutes=3),
        finished_at=finished_at, recovery_point=finished_at - timedelta(minutes=3), bytes=123_456,
        source_version="15.8",
    )


def restore_result(datastore: str, *, restore_seconds: float, problems: list[str]) -> RestoreTestResult:
    return RestoreTestResult(
        datastore=datastore, backup_id="b1", partition="2026-11-22", target="127.0.0.1:55433",
        restore_seconds=restore_seconds, total_seconds=restore_seconds + 1, recovery_point=datetime.now(UTC),
        backup_age_seconds=600.0, expected_counts={}, observed_counts={}, queries=[], problems=problems,
    )


def series_of(results: list[dict], datastore: str) -> list[dict]:
    return [r for r in results if r["metric"].get("datastore") == datastore]


def test_a_stale_backup_and_a_failed_restore_test_are_what_the_platform_rules_alert_on(
    pushgateway_server: ServerProcess, platform_prometheus: str
) -> None:
    gateway = Pushgateway(pushgateway_server.url)
    stale = datetime.now(UTC) - timedelta(hours=27)
    fresh_store, stale_store = "pg_fresh", "pg_stale"

    outcomes = [
        metrics.push_results(gateway, metrics.BACKUP_JOB, stale_store,
                             metrics.backup_succeeded(manifest(stale_store, stale), "dev")),
        metrics.push_results(gateway, metrics.BACKUP_JOB, fresh_store,
                             metrics.backup_succeeded(manifest(fresh_store, datetime.now(UTC)), "dev")),
        metrics.push_results(gateway, metrics.RESTORE_TEST_JOB, stale_store,
                             metrics.restore_test_failed("dev", datetime.now(UTC))),
        metrics.push_results(gateway, metrics.RESTORE_TEST_JOB, fresh_store, metrics.restore_test_finished(
            restore_result(fresh_store, restore_seconds=42.0, problems=[]), "dev", 900, datetime.now(UTC))),
    ]

    assert all(outcome.startswith("pushed ") for outcome in outcomes), outcomes
    too_old = eventually(lambda: series_of(query(platform_prometheus, rule("BackupTooOld")["expr"]), stale_store))
    assert [s["metric"]["engine"] for s in too_old] == ["postgresql"]
    assert series_of(query(platform_prometheus, rule("BackupTooOld")["expr"]), fresh_store) == []

    def firing_restore_alerts() -> list[dict]:
        alerts = requests.get(f"{platform_prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "RestoreTestFailed" and a["state"] == "firing"]

    firing = eventually(firing_restore_alerts)
    assert [a["labels"]["datastore"] for a in firing] == [stale_store]
    assert firing[0]["labels"]["severity"] == "critical"


def test_a_failed_backup_keeps_the_last_success_and_adds_its_failure_time(
    pushgateway_server: ServerProcess, platform_prometheus: str
) -> None:
    gateway = Pushgateway(pushgateway_server.url)
    succeeded = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    failed = datetime.now(UTC).replace(microsecond=0)
    metrics.push_results(gateway, metrics.BACKUP_JOB, "redis_keep",
                         metrics.backup_succeeded(manifest("redis_keep", succeeded), "dev"))
    metrics.push_results(gateway, metrics.BACKUP_JOB, "redis_keep",
                         metrics.backup_failed("redis", "rdb", "dev", failed))

    def values() -> dict[str, float]:
        found = query(platform_prometheus, '{__name__=~"ops_platform_backup_last_.*", datastore="redis_keep"}')
        return {r["metric"]["__name__"]: float(r["value"][1]) for r in found} if len(found) == 2 else {}

    assert eventually(values) == {
        "ops_platform_backup_last_success_timestamp_seconds": succeeded.timestamp(),
        "ops_platform_backup_last_failure_timestamp_seconds": failed.timestamp(),
    }


def test_a_slow_or_unverified_restore_test_does_not_pass() -> None:
    def passed(result: RestoreTestResult) -> float:
        samples = metrics.restore_test_finished(result, "dev", 900, datetime.now(UTC))
        return next(s.value for s in samples if s.name == "ops_platform_restore_test_passed")

    assert passed(restore_result("a", restore_seconds=899.0, problems=[])) == 1
    assert passed(restore_result("a", restore_seconds=901.0, problems=[])) == 0
    assert passed(restore_result("a", restore_seconds=10.0, problems=["count of keys:db0 is 3, expected 4"])) == 0


def test_exposition_escapes_labels_and_refuses_bad_names(pushgateway_server: ServerProcess) -> None:
    gateway = Pushgateway(pushgateway_server.url)
    tricky = 'say "hi"\\ and\nbye'
    path = gateway.push("ops_platform_test", {"datastore": "a/b c"}, [Sample("ops_test_value", 2.5, {"note": tricky})])
    scraped = requests.get(f"{pushgateway_server.url}/metrics", timeout=5).text

    assert path == "/metrics/job/ops_platform_test/datastore@base64/YS9iIGM="
    labels = 'datastore="a/b c",instance="",job="ops_platform_test",note="say \\"hi\\"\\\\ and\\nbye"'
    assert f"ops_test_value{{{labels}}} 2.5" in scraped
    with pytest.raises(ValueError, match="not a Prometheus metric name"):
        exposition([Sample("ops-test", 1)])
    with pytest.raises(ValueError, match="not Prometheus label names"):
        exposition([Sample("ops_test", 1, {"bad-label": "x"})])
    assert exposition([Sample("ops_test", float("nan")), Sample("ops_test", float("inf"))]).splitlines()[1:] == [
        "ops_test NaN", "ops_test +Inf"]


def test_pushgateway_down_or_unset_is_reported_not_raised() -> None:
    down = Pushgateway(f"http://127.0.0.1:{free_port()}", timeout=1)
    samples = metrics.restore_test_failed("dev", datetime.now(UTC))

    outcome = metrics.push_results(down, metrics.RESTORE_TEST_JOB, "pg", samples)

    assert outcome.startswith("not pushed: ") and "OPS_PUSHGATEWAY_URL" in outcome and "127.0.0.1" in outcome
    assert metrics.push_results(PushgatewayResource().get_client(), metrics.RESTORE_TEST_JOB, "pg", samples) == \
        "not pushed: OPS_PUSHGATEWAY_URL is not set"


def test_a_push_the_pushgateway_refuses_names_its_answer(pushgateway_server: ServerProcess) -> None:
    gateway = Pushgateway(pushgateway_server.url)
    # The same metric name pushed with another type in another group is inconsistent for the Pushgateway.
    requests.post(f"{pushgateway_server.url}/metrics/job/ops_conflict",
                  data="# TYPE ops_conflict_total counter\nops_conflict_total 1\n", timeout=5).raise_for_status()

    outcome = metrics.push_results(gateway, metrics.BACKUP_JOB, "pg", [Sample("ops_conflict_total", 1)])

    assert outcome.startswith("not pushed: pushgateway: POST ") and "HTTP 400" in outcome
