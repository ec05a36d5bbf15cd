"""Backup and restore-test results as Pushgateway gauges, for the platform's alert rules.

``infra/prometheus/ops-alerts.yml`` reads them: ``BackupTooOld`` fires when
``ops_platform_backup_last_success_timestamp_seconds`` is more than 26 h old,
``RestoreTestFailed`` when ``ops_platform_restore_test_passed`` is 0. Each
datastore is its own group (``job`` + ``datastore``), one job for backups and
one for restore tests. A failed backup pushes only its failure time: POST
replaces metrics by name, so the last success stays what it was.

Pushing is best effort: a run whose backup committed does not fail because the
Pushgateway is down; :func:`push_results` says what happened, and the run
records it in its metadata and log.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.restore_test import RestoreTestResult
from ops_platform.errors import OpsPlatformError
from ops_platform.resources.alerting import PUSHGATEWAY_URL_SETTING, Pushgateway, Sample

BACKUP_JOB = "ops_platform_backup"
RESTORE_TEST_JOB = "ops_platform_restore_test"


def backup_succeeded(manifest: BackupManifest, environment: str) -> list[Sample]:
    labels = _backup_labels(manifest.engine, manifest.method, environment)
    return [
        Sample("ops_platform_backup_last_success_timestamp_seconds", manifest.finished_at.timestamp(), labels,
               "When the newest committed backup finished (Unix time)."),
        Sample("ops_platform_backup_recovery_point_timestamp_seconds", manifest.recovery_point.timestamp(), labels,
               "The point in time the newest committed backup restores to (Unix time)."),
        Sample("ops_platform_backup_size_bytes", manifest.bytes, labels, "Size of the newest committed backup."),
        Sample("ops_platform_backup_duration_seconds",
               (manifest.finished_at - manifest.started_at).total_seconds(), labels,
               "How long the newest committed backup took."),
    ]


def backup_failed(engine: str, method: str, environment: str, at: datetime) -> list[Sample]:
    labels = _backup_labels(engine, method, environment)
    return [Sample("ops_platform_backup_last_failure_timestamp_seconds", at.timestamp(), labels,
                   "When the latest failed backup attempt ended (Unix time).")]


def _backup_labels(engine: str, method: str, environment: str) -> dict[str, str]:
    return {"engine": engine, "method": method, "environment": environment}


def restore_test_finished(result: RestoreTestResult, environment: str, rto_seconds: float,
                          at: datetime, rpo_seconds: float | None = None) -> list[Sample]:
    """``passed`` is 1 when the data was verified, restored within the RTO and the proven point within the RPO."""
    labels = {"environment": environment}
    passed = result.verified and result.restore_seconds <= rto_seconds and (
        rpo_seconds is None or result.backup_age_seconds <= rpo_seconds)
    return [
        *_restore_test_outcome(passed, at, labels),
        Sample("ops_platform_restore_test_restore_seconds", result.restore_seconds, labels,
               "Restore and verification time of the latest restore test."),
        Sample("ops_platform_restore_test_backup_age_seconds", result.backup_age_seconds, labels,
               "Age of the restored recovery point when the latest restore test ran."),
    ]


def restore_test_failed(environment: str, at: datetime) -> list[Sample]:
    """A restore test that could not run to the end (refused, restore failed): it did not pass."""
    return _restore_test_outcome(False, at, {"environment": environment})


def _restore_test_outcome(passed: bool, at: datetime, labels: dict[str, str]) -> list[Sample]:
    return [
        Sample("ops_platform_restore_test_passed", 1 if passed else 0, labels,
               "1 when the latest restore test verified the data within the RTO, else 0."),
        Sample("ops_platform_restore_test_last_run_timestamp_seconds", at.timestamp(), labels,
               "When the latest restore test ended (Unix time)."),
    ]


def push_results(pushgateway: Pushgateway | None, job: str, datastore: str, samples: Sequence[Sample]) -> str:
    """Push ``samples`` to the datastore's group; what happened, in one line (never raises)."""
    if pushgateway is None:
        return f"not pushed: {PUSHGATEWAY_URL_SETTING} is not set"
    try:
        path = pushgateway.push(job, {"datastore": datastore}, samples)
    except OpsPlatformError as error:
        return f"not pushed: {error}"
    return f"pushed {len(samples)} gauges to {pushgateway.base_url}{path}"
