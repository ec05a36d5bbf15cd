"""Failures reach people: `ops_alert_sensor` on a real ephemeral Dagster instance, real runs of tiny
assets and checks defined here, and the real Alertmanager of tests/fixtures/monitoring.py.

Alerts cannot be deleted from Alertmanager, so every test names its assets and jobs with a suffix
of its own and looks only at the alerts carrying it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import dagster as dg
import pytest

from ops_platform.errors import OpsPlatformError
from ops_platform.local_servers import free_port
from ops_platform.resources.alerting import Alert, Alertmanager, AlertmanagerResource
from ops_platform.sensing.run_failures import ALERTNAMES, ERROR_LIMIT, FIRING_FOR
from ops_platform.sensors.run_failures import AlertDeliveryError, build_ops_alert_sensors
from ops_platform.spec import Alerting, Spec

# The sensor reads only the spec's alerting section: the rest of the spec is not built here.
SPEC = Spec.model_construct(alerting=Alerting(
    severity={"restore_tests": "critical", "backups": "critical", "reports": "info"}, default_severity="warning",
))
UI_URL = "https://dagster.ops.example"
SCHEDULE = "weekly_restore_tests"
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
RESTORE_FAILED = ("restore test of redis_cache: 0 of 3 keys restored "
                  "(check restore_test.target in infra/platform.yaml)")


def restore_test_assets(suffix: str, outcome: str) -> list[dg.AssetsDefinition]:
    """backups/<suffix> -> restore_tests/<suffix> -> reports/<suffix>; the restore test (and its check)
    passes or fails."""

    @dg.asset(key=["backups", suffix])
    def backup() -> None:
        pass

    key = ["restore_tests", suffix]

    @dg.asset(key=key, deps=[backup], check_specs=[dg.AssetCheckSpec("rows_restored", asset=key)])
    def restore_test():
        if outcome == "fail":
            # As the project's restore tests do: every check "not proven" with the cause, then the Failure.
            yield dg.AssetCheckResult(check_name="rows_restored", passed=False,
                                      description=f"not proven: {RESTORE_FAILED}")
            raise dg.Failure(description=RESTORE_FAILED)
        yield dg.MaterializeResult(check_results=[dg.AssetCheckResult(check_name="rows_restored", passed=True)])

    @dg.asset(key=["reports", suffix], deps=[restore_test])
    def report() -> None:
        pass

    return [backup, restore_test, report]


def scheduled_restore_test(suffix: str, outcome: str) -> dg.JobDefinition:
    """The job a schedule targeting assets runs: Dagster names it `__anonymous_asset_job_<schedule>`."""
    assets = restore_test_assets(suffix, outcome)
    schedule = dg.ScheduleDefinition(name=SCHEDULE, cron_schedule="0 4 * * 0",
                                     target=dg.AssetSelection.assets(*assets))
    return dg.Definitions(assets=assets, schedules=[schedule]).resolve_job_def(schedule.job_name)


def run_as_the_schedule(instance: dg.DagsterInstance, suffix: str, outcome: str) -> dg.DagsterRun:
    """A run of the schedule's job, tagged with the schedule as the daemon tags it."""
    return scheduled_restore_test(suffix, outcome).execute_in_process(
        instance=instance, tags={"dagster/schedule_name": SCHEDULE}, raise_on_error=False).dagster_run


def nightly(suffix: str) -> dg.JobDefinition:
    """A named asset job: two assets fail (a backup, a report), one passes."""

    @dg.asset(key=["backups", suffix])
    def backup() -> None:
        raise dg.Failure(description="pg_dump: connection refused at 10.0.3.4:5432 (check connection.host)")

    @dg.asset(key=["reports", suffix])
    def report() -> None:
        raise dg.Failure(description="object store: bucket ops-reports does not exist (check OPS_BACKUP_BUCKET)")

    @dg.asset(key=["certificates", suffix])
    def inventory() -> None:
        pass

    job = dg.define_asset_job(f"nightly_{suffix}")
    return dg.Definitions(assets=[backup, report, inventory], jobs=[job]).resolve_job_def(job.name)


def checked_restore_test(suffix: str, *, rows_restored: bool, blocking: bool = False) -> dg.AssetsDefinition:
    """A restore test whose checks are declared on it and yielded by its own run: `rows_restored`
    (ERROR) passes or fails, `restore_within_rto` (WARN) always fails."""
    key = ["restore_tests", suffix]

    @dg.asset(key=key, check_specs=[
        dg.AssetCheckSpec("rows_restored", asset=key, blocking=blocking),
        dg.AssetCheckSpec("restore_within_rto", asset=key),
    ])
    def restore_test() -> dg.MaterializeResult:
        return dg.MaterializeResult(check_results=[
            dg.AssetCheckResult(
                check_name="rows_restored", passed=rows_restored, severity=dg.AssetCheckSeverity.ERROR,
                description="3 of 3 rows restored" if rows_restored else "0 of 3 rows of concept restored",
            ),
            dg.AssetCheckResult(
                check_name="restore_within_rto", passed=False, severity=dg.AssetCheckSeverity.WARN,
                description="restore took 16 minutes, rto_minutes is 15",
            ),
        ])

    return restore_test


def playbook_job(suffix: str, *, fails: bool) -> dg.JobDefinition:
    @dg.op
    def restart() -> None:
        if fails:
            raise RuntimeError("disk full: " + "x" * 5000)

    @dg.job(name=f"playbook_{suffix}")
    def playbook() -> None:
        restart()

    return playbook


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def suffix() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(autouse=True)
def ui_url(monkeypatch):
    monkeypatch.setenv("DAGSTER_UI_URL", UI_URL + "/")


def tick(instance, cursor, url, clock=None, runs_per_tick=50) -> dg.SensorResult:
    sensor = build_ops_alert_sensors(SPEC, clock=clock, runs_per_tick=runs_per_tick)[0]
    resources = {"alertmanager": AlertmanagerResource(url=url)}
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor.evaluate_tick(context)


def started(instance, url) -> str:
    first = tick(instance, None, url)
    assert first.skip_message.startswith("started: ")
    return first.cursor


def ours(alertmanager: Alertmanager, suffix: str) -> list[Alert]:
    """Our alerts carrying this test's suffix, in any state but resolved."""
    alerts = alertmanager.alerts(filters=[f'alertname=~"{"|".join(ALERTNAMES)}"'],
                                 active=True, silenced=True, inhibited=True, unprocessed=True)
    return [a for a in alerts if suffix in a.labels.get("asset", "") + a.labels.get("job", "")]


def newest_status_change(instance, event_type) -> dg.EventLogRecord:
    return instance.fetch_run_status_changes(event_type, limit=1).records[0]


def test_failed_scheduled_run_pages_its_failing_asset_with_the_cause_until_a_rerun_passes(
    instance, suffix, alertmanager, alertmanager_server
):
    url = alertmanager_server.url
    cursor = started(instance, url)
    run = run_as_the_schedule(instance, suffix, "fail")
    assert run.job_name == f"__anonymous_asset_job_{SCHEDULE}" and not run.asset_selection

    result = tick(instance, cursor, url)

    [alert] = ours(alertmanager, suffix)
    assert dict(alert.labels) == {
        "alertname": "OpsRunFailed",
        "asset": f"restore_tests/{suffix}",
        "job": SCHEDULE,
        "severity": "critical",
    }
    assert alert.annotations["description"] == RESTORE_FAILED
    assert alert.annotations["run_id"] == run.run_id
    assert alert.generator_url == f"{UI_URL}/runs/{run.run_id}"
    failure = newest_status_change(instance, dg.DagsterEventType.RUN_FAILURE)
    failed_at = datetime.fromtimestamp(failure.timestamp, UTC)
    assert abs(alert.starts_at - failed_at).total_seconds() < 0.001
    assert abs(alert.ends_at - (failed_at + FIRING_FOR)).total_seconds() < 0.001
    assert result.cursor == str(failure.storage_id)
    assert result.skip_message == "1 finished run(s): 1 alert(s) posted, 0 resolved"

    assert tick(instance, result.cursor, url).skip_message == f"no run finished after storage id {result.cursor}"
    assert len(ours(alertmanager, suffix)) == 1

    # Rerun by hand: another job name, the same asset.
    dg.materialize(restore_test_assets(suffix, "pass")[1:2], instance=instance)
    rerun_at = datetime.now(UTC)
    result = tick(instance, result.cursor, url, clock=lambda: rerun_at)

    assert ours(alertmanager, suffix) == []
    assert result.skip_message == "1 finished run(s): 0 alert(s) posted, 1 resolved"
    assert result.cursor == str(newest_status_change(instance, dg.DagsterEventType.RUN_SUCCESS).storage_id)


@pytest.mark.parametrize("blocking", [False, True], ids=["non-blocking", "blocking"])
def test_failed_error_check_pages_once_and_a_passing_evaluation_resolves_it(
    instance, suffix, alertmanager, alertmanager_server, blocking
):
    url = alertmanager_server.url
    cursor = started(instance, url)
    result = dg.materialize([checked_restore_test(suffix, rows_restored=False, blocking=blocking)],
                            instance=instance, raise_on_error=False)
    # A failed check does not fail its run (dagster#29896) unless it blocks.
    assert result.success is not blocking

    after_failure = tick(instance, cursor, url)

    [alert] = ours(alertmanager, suffix)  # no OpsRunFailed, and the WARN check does not page
    assert dict(alert.labels) == {
        "alertname": "OpsCheckFailed",
        "asset": f"restore_tests/{suffix}",
        "check": "rows_restored",
        "job": f"materialize restore_tests/{suffix}",
        "severity": "critical",
    }
    assert alert.annotations["description"] == "0 of 3 rows of concept restored"
    assert alert.generator_url == f"{UI_URL}/runs/{result.run_id}"

    dg.materialize([checked_restore_test(suffix, rows_restored=True, blocking=blocking)], instance=instance)
    passed_at = datetime.now(UTC)
    after_pass = tick(instance, after_failure.cursor, url, clock=lambda: passed_at)

    assert ours(alertmanager, suffix) == []
    assert after_pass.skip_message == "1 finished run(s): 0 alert(s) posted, 1 resolved"


def test_failed_op_job_pages_without_asset_with_the_spec_default_severity(
    instance, suffix, alertmanager, alertmanager_server
):
    url = alertmanager_server.url
    cursor = started(instance, url)
    failed = playbook_job(suffix, fails=True).execute_in_process(instance=instance, raise_on_error=False)

    cursor = tick(instance, cursor, url).cursor

    [alert] = ours(alertmanager, suffix)
    assert dict(alert.labels) == {"alertname": "OpsRunFailed", "job": f"playbook_{suffix}", "severity": "warning"}
    assert alert.annotations["description"].startswith("RuntimeError: disk full: xxx")
    assert len(alert.annotations["description"]) <= ERROR_LIMIT
    assert alert.annotations["run_id"] == failed.run_id

    playbook_job(suffix, fails=False).execute_in_process(instance=instance)
    tick(instance, cursor, url)
    assert ours(alertmanager, suffix) == []


def test_whole_job_run_pages_each_failing_asset_with_its_group_severity(
    instance, suffix, alertmanager, alertmanager_server
):
    url = alertmanager_server.url
    cursor = started(instance, url)
    # As the daemon launches a schedule's or sensor's run of a whole job: no asset_selection.
    job = dg.build_reconstructable_job(__name__, nightly.__name__, (suffix,))
    with dg.execute_job(job, instance=instance, run_config=IN_PROCESS, raise_on_error=False) as result:
        assert result.dagster_run.asset_selection is None

    tick(instance, cursor, url)

    alerts = sorted(ours(alertmanager, suffix), key=lambda a: a.labels["asset"])
    described = [(a.labels["asset"], a.labels["job"], a.labels["severity"], a.annotations["description"])
                 for a in alerts]
    assert described == [
        (f"backups/{suffix}", f"nightly_{suffix}", "critical",
         "pg_dump: connection refused at 10.0.3.4:5432 (check connection.host)"),
        (f"reports/{suffix}", f"nightly_{suffix}", "info",
         "object store: bucket ops-reports does not exist (check OPS_BACKUP_BUCKET)"),
    ]


def test_a_tick_takes_failures_and_successes_in_the_order_they_happened(
    instance, suffix, alertmanager, alertmanager_server
):
    url = alertmanager_server.url
    cursor = started(instance, url)
    run_as_the_schedule(instance, suffix, "fail")
    failure = newest_status_change(instance, dg.DagsterEventType.RUN_FAILURE)
    run_as_the_schedule(instance, suffix, "pass")

    first = tick(instance, cursor, url, runs_per_tick=1)
    assert first.cursor == str(failure.storage_id)
    assert [a.labels["asset"] for a in ours(alertmanager, suffix)] == [f"restore_tests/{suffix}"]

    second = tick(instance, first.cursor, url, runs_per_tick=1)
    assert second.cursor == str(newest_status_change(instance, dg.DagsterEventType.RUN_SUCCESS).storage_id)
    assert ours(alertmanager, suffix) == []


def test_a_run_that_failed_before_any_step_pages_each_planned_asset_with_the_run_failure(
    instance, suffix, alertmanager, alertmanager_server
):
    url = alertmanager_server.url
    cursor = started(instance, url)
    run = instance.create_run_for_job(scheduled_restore_test(suffix, "pass"), tags={"dagster/schedule_name": SCHEDULE})
    instance.report_run_failed(run, "run worker pod dagster-run-1 was evicted (node under memory pressure)")

    tick(instance, cursor, url)

    alerts = sorted(ours(alertmanager, suffix), key=lambda a: a.labels["asset"])
    assert [a.labels["asset"] for a in alerts] == [f"backups/{suffix}", f"reports/{suffix}", f"restore_tests/{suffix}"]
    assert {a.labels["job"] for a in alerts} == {SCHEDULE}
    assert {a.annotations["description"] for a in alerts} == {
        "run worker pod dagster-run-1 was evicted (node under memory pressure)"}


def test_alertmanager_down_fails_the_tick_naming_the_setting_and_keeps_the_cursor(
    instance, suffix, alertmanager, alertmanager_server
):
    down = f"http://127.0.0.1:{free_port()}"
    cursor = started(instance, down)
    run_as_the_schedule(instance, suffix, "fail")

    sensor = build_ops_alert_sensors(SPEC)[0]
    resources = {"alertmanager": AlertmanagerResource(url=down)}
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        with pytest.raises(AlertDeliveryError, match=r"could not post the alerts of run .*ALERTMANAGER_URL") as failed:
            sensor.evaluate_tick(context)
    assert f"connection refused at {down} (check ALERTMANAGER_URL)" in str(failed.value)
    assert f"retries from storage id {cursor}" in str(failed.value)
    assert context.cursor == cursor
    assert ours(alertmanager, suffix) == []

    tick(instance, cursor, alertmanager_server.url)
    assert [a.labels["asset"] for a in ours(alertmanager, suffix)] == [f"restore_tests/{suffix}"]


def test_without_alertmanager_url_the_sensor_skips_with_the_reason(instance):
    result = tick(instance, "12", None)
    assert result.skip_message == "ALERTMANAGER_URL is not set: failed runs and checks are not posted"
    assert result.cursor == "12"


def test_history_before_the_first_tick_is_not_paged(instance, suffix, alertmanager, alertmanager_server):
    run_as_the_schedule(instance, suffix, "fail")
    cursor = started(instance, alertmanager_server.url)
    assert cursor == str(newest_status_change(instance, dg.DagsterEventType.RUN_FAILURE).storage_id)
    tick(instance, cursor, alertmanager_server.url)
    assert ours(alertmanager, suffix) == []


def test_a_run_gone_from_the_run_storage_is_skipped_and_the_next_still_posted(
    instance, suffix, alertmanager, alertmanager_server
):
    url = alertmanager_server.url
    cursor = started(instance, url)
    gone = run_as_the_schedule(instance, f"gone{suffix}", "fail")
    instance.run_storage.delete_run(gone.run_id)  # its events stay, as after a partial purge
    run_as_the_schedule(instance, suffix, "fail")

    result = tick(instance, cursor, url)

    assert result.skip_message == (
        "2 finished run(s): 1 alert(s) posted, 0 resolved; "
        f"1 run(s) no longer in the run storage skipped: {gone.run_id}"
    )
    assert result.cursor == str(newest_status_change(instance, dg.DagsterEventType.RUN_FAILURE).storage_id)
    assert [a.labels["asset"] for a in ours(alertmanager, suffix)] == [f"restore_tests/{suffix}"]


def test_a_garbled_cursor_fails_the_tick_saying_how_to_reset_it(instance, alertmanager_server):
    with pytest.raises(OpsPlatformError, match=r"cursor 'not-a-number' is not a storage id; reset it with "
                                        r"`dagster sensor cursor ops_alert_sensor --delete`"):
        tick(instance, "not-a-number", alertmanager_server.url)


def test_a_playbook_run_its_guard_refused_pages_no_one_and_a_real_failure_does():
    from ops_platform.playbooks.base import REFUSED_TAG
    from ops_platform.sensing.run_failures import FinishedRun, run_alerts
    from ops_platform.spec import Alerting

    when = datetime(2026, 12, 1, tzinfo=UTC)
    failed = FinishedRun(run_id="r1", job_name="playbook_restart_workload", tags={}, failed=True, ended_at=when,
                         url="http://ui/runs/r1", step_failures={"run_restart_workload": "pod not found"})
    [alert] = run_alerts(failed, Alerting()).firing
    assert alert.labels["severity"] == "critical" and alert.annotations["description"] == "pod not found"
    refused = FinishedRun(run_id="r2", job_name="playbook_restart_workload", tags={REFUSED_TAG: "cooldown"},
                          failed=True, ended_at=when, url="http://ui/runs/r2",
                          step_failures={"run_restart_workload": "target is cooling down until 10:30"})
    assert run_alerts(refused, Alerting()).firing == []
