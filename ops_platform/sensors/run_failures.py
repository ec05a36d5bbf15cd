"""`ops_alert_sensor`: failed ops runs and failed asset checks become alerts in Alertmanager, routed
like any other, and are resolved when a later run or evaluation of the same asset or check passes.

What fires and what resolves is decided in :mod:`ops_platform.sensing.run_failures`; this module
reads each finished run into a :class:`FinishedRun` and talks to Alertmanager.

Why one hand-rolled sensor rather than Dagster's ``run_failure_sensor`` and
``run_status_sensor(SUCCESS)``:

- A failed asset check does not fail its run (dagster issue 29896), so a run-failure sensor never
  sees it, and Dagster has no check-failure sensor.
- ``run_status_sensor`` advances its cursor even when its function raises ("side effects that we
  don't want to repeat", dagster/_daemon/sensor.py), so a failure posted while Alertmanager is
  down would be lost. Here the tick fails and the cursor stays before the unposted run.
- Two sensors have two cursors: a success could be handled before the older failure it should
  resolve, leaving that failure firing. One stream, in storage order, cannot.
- Reading ``ASSET_CHECK_EVALUATION`` records across runs with a storage-id cursor
  (``instance.get_event_records``) is deprecated and raises on the run-sharded SQLite storage that
  ``make run`` uses. Run status changes are mirrored in every storage's index
  (``instance.fetch_run_status_changes``, what ``run_status_sensor`` reads), and a run's own events
  are read per run. Our checks are yielded by the asset's own run, so reading each finished run's
  evaluations sees them all, when the run ends.

The cursor is the storage id of the last run status change handled (RUN_SUCCESS, RUN_FAILURE).
The first tick starts after the newest one, so history is not paged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import dagster as dg

from ops_platform.environment import sensor_status
from ops_platform.errors import OpsPlatformError
from ops_platform.resources.alerting import ALERTMANAGER_URL_SETTING, Alertmanager, AlertmanagerResource
from ops_platform.sensing.run_failures import (
    ALERTNAMES,
    CheckEvaluation,
    FinishedRun,
    RunAlerts,
    run_alerts,
)
from ops_platform.spec import Alerting, Spec

if TYPE_CHECKING:
    from dagster_shared.error import SerializableErrorInfo

SENSOR_NAME = "ops_alert_sensor"
UI_URL_SETTING = "DAGSTER_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:3000"
RUNS_PER_TICK = 50
_FINISHED = (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE)
_RUN_EVENTS = {
    dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
    dg.DagsterEventType.ASSET_MATERIALIZATION,
    dg.DagsterEventType.STEP_FAILURE,
    dg.DagsterEventType.ASSET_CHECK_EVALUATION,
}


class AlertDeliveryError(OpsPlatformError):
    """Alertmanager did not take the alerts of a finished run; the next tick posts them again."""


def build_ops_alert_sensors(
    spec: Spec,
    environment: str = "local",
    *,
    clock: Callable[[], datetime] | None = None,
    runs_per_tick: int = RUNS_PER_TICK,
) -> list[dg.SensorDefinition]:
    """The sensor posting failed runs (``OpsRunFailed``) and failed ERROR checks (``OpsCheckFailed``)
    to Alertmanager, with ``spec.alerting``'s severity; needs the ``alertmanager`` resource."""
    return [_ops_alert_sensor(spec.alerting, sensor_status(environment), clock or _utc_now, runs_per_tick)]


def _ops_alert_sensor(
    alerting: Alerting, status: dg.DefaultSensorStatus, clock: Callable[[], datetime], runs_per_tick: int
) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=30,
        default_status=status,
        description=(
            "Posts each failed run (OpsRunFailed, one per failing asset) and each failed ERROR check "
            "(OpsCheckFailed) to Alertmanager with the cause, the run link and the spec's severity; "
            "resolves them when the asset or check passes again."
        ),
    )
    def ops_alert_sensor(context: dg.SensorEvaluationContext, alertmanager: AlertmanagerResource):
        if not alertmanager.url:
            return dg.SkipReason(f"{ALERTMANAGER_URL_SETTING} is not set: failed runs and checks are not posted")
        instance = context.instance
        if context.cursor is None:
            start = _newest_status_change(instance)
            return dg.SensorResult(
                skip_reason=f"started: runs that finish after storage id {start} will be posted", cursor=str(start)
            )
        after = _parsed_cursor(context.cursor)
        changes = _status_changes(instance, after, runs_per_tick)
        if not changes:
            return dg.SkipReason(f"no run finished after storage id {after}")
        runs = {
            record.dagster_run.run_id: record.dagster_run
            for record in instance.get_run_records(
                filters=dg.RunsFilter(run_ids=list({change.run_id for change in changes}))
            )
        }
        client = alertmanager.get_client()
        ui_url = os.environ.get(UI_URL_SETTING, DEFAULT_UI_URL).rstrip("/")
        fired = resolved = 0
        missing: list[str] = []
        for change in changes:
            run = runs.get(change.run_id)
            if run is None:
                context.log.warning(
                    f"run {change.run_id} (status change {change.storage_id}) is no longer in the run storage; "
                    "its alerts are not posted"
                )
                missing.append(change.run_id)
                continue
            if not _in_this_code_location(context, run):
                continue
            alerts = run_alerts(_finished_run(instance, run, change, ui_url), alerting)
            try:
                resolved += _deliver(client, alerts, clock())
            except OpsPlatformError as error:
                # Raising fails the tick and keeps its cursor, so this run (and any handled before
                # it in this tick: posting the same alert twice is harmless) is posted again.
                raise AlertDeliveryError(
                    f"could not post the alerts of run {run.run_id} ({run.job_name}): {error}; "
                    f"the sensor retries from storage id {after} on its next tick"
                ) from None
            fired += len(alerts.firing)
        summary = f"{len(changes)} finished run(s): {fired} alert(s) posted, {resolved} resolved"
        if missing:
            summary += f"; {len(missing)} run(s) no longer in the run storage skipped: {', '.join(missing)}"
        return dg.SensorResult(skip_reason=summary, cursor=str(changes[-1].storage_id))

    return ops_alert_sensor


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _parsed_cursor(cursor: str) -> int:
    try:
        return int(cursor)
    except ValueError:
        raise OpsPlatformError(
            f"{SENSOR_NAME}: cursor {cursor!r} is not a storage id; reset it with "
            f"`dagster sensor cursor {SENSOR_NAME} --delete` (the sensor then starts after the newest run)"
        ) from None


def _newest_status_change(instance: dg.DagsterInstance) -> int:
    newest = [
        record.storage_id
        for event_type in _FINISHED
        for record in instance.fetch_run_status_changes(event_type, limit=1).records
    ]
    return max(newest, default=-1)


def _status_changes(instance: dg.DagsterInstance, after: int, limit: int) -> list[dg.EventLogRecord]:
    """Run successes and failures after storage id ``after``, oldest first, at most ``limit`` of each;
    when one kind fills its limit, none past its last, so the two stay in storage order."""
    changes: list[dg.EventLogRecord] = []
    bounds: list[int] = []
    for event_type in _FINISHED:
        records = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type=event_type, after_storage_id=after),
            limit=limit, ascending=True,
        ).records
        changes.extend(records)
        if len(records) == limit:
            bounds.append(records[-1].storage_id)
    bound = min(bounds, default=None)
    changes.sort(key=lambda record: record.storage_id)
    return [record for record in changes if bound is None or record.storage_id <= bound]


def _in_this_code_location(context: dg.SensorEvaluationContext, run: dg.DagsterRun) -> bool:
    """As ``run_status_sensor(monitor_all_code_locations=False)``: runs of this location and repository
    (a run executed in process, as in tests, has no origin and matches a context without one)."""
    origin = run.remote_job_origin
    location = context.code_location_origin.location_name if context.code_location_origin else None
    if origin is None:
        return location is None
    return (
        origin.repository_origin.code_location_origin.location_name == location
        and origin.repository_origin.repository_name == context.repository_name
    )


def _finished_run(
    instance: dg.DagsterInstance, run: dg.DagsterRun, change: dg.EventLogRecord, ui_url: str
) -> FinishedRun:
    """What the run planned and did, from its own events (not ``run.asset_selection``, which is None
    for a whole-job run and empty for one executed in process)."""
    planned: dict[str, str | None] = {}
    materialized: set[str] = set()
    step_failures: dict[str, str] = {}
    checks: list[CheckEvaluation] = []
    for record in instance.get_records_for_run(run.run_id, of_type=_RUN_EVENTS).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED and event.asset_key:
            planned.setdefault(event.asset_key.to_user_string(), event.step_key)
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION and event.asset_key:
            materialized.add(event.asset_key.to_user_string())
        elif event.event_type == dg.DagsterEventType.STEP_FAILURE and event.step_key:
            step_failures.setdefault(event.step_key, _step_failure_cause(event))
        elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.asset_check_evaluation_data
            checks.append(CheckEvaluation(
                asset=evaluation.asset_key.to_user_string(),
                check=evaluation.check_name,
                passed=evaluation.passed,
                severity=evaluation.severity.value,
                description=evaluation.description or event.message or "",
                at=datetime.fromtimestamp(entry.timestamp, UTC),
            ))
    status_event = change.event_log_entry.dagster_event
    failed = status_event is not None and status_event.event_type == dg.DagsterEventType.RUN_FAILURE
    return FinishedRun(
        run_id=run.run_id,
        job_name=run.job_name,
        tags=dict(run.tags),
        failed=failed,
        ended_at=datetime.fromtimestamp(change.event_log_entry.timestamp, UTC),
        url=f"{ui_url}/runs/{run.run_id}",
        planned=planned,
        materialized=frozenset(materialized),
        step_failures=step_failures,
        run_failure=_run_failure_cause(status_event) if failed else "",
        checks=checks,
    )


def _step_failure_cause(event: dg.DagsterEvent) -> str:
    """The user's message: a ``dg.Failure``'s description, else the exception the step raised."""
    data = event.step_failure_data
    if data is None:
        return event.message or ""
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    return _error_text(data.error) or event.message or ""


def _run_failure_cause(event: dg.DagsterEvent | None) -> str:
    if event is None:
        return ""
    data = event.job_failure_data  # None when the failure was reported, not raised (run monitoring)
    return (_error_text(data.error) if data is not None else "") or event.message or ""


def _error_text(error: SerializableErrorInfo | None) -> str:
    # Dagster wraps what user code raises (DagsterExecutionStepExecutionError "Error occurred while
    # executing op ...", DagsterResourceFunctionError, ...); the user's exception is the cause.
    while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
        error = error.cause
    return error.message.strip() if error is not None else ""


def _deliver(client: Alertmanager, alerts: RunAlerts, now: datetime) -> int:
    """Resolve what the run ended, then post what it fired; returns how many alerts were resolved.

    The firing alerts are read from Alertmanager (any state but resolved) so that what resolves is
    what is actually firing, whichever job raised it.
    """
    ending = []
    if alerts.resolving:
        firing = client.alerts(
            filters=[f'alertname=~"{"|".join(ALERTNAMES)}"'],
            active=True, silenced=True, inhibited=True, unprocessed=True,
        )
        ending = [alert for alert in firing if any(r.matches(alert.labels) for r in alerts.resolving)]
    if ending:
        client.resolve(ending, at=now)
    if alerts.firing:
        client.post_alerts(alerts.firing)
    return len(ending)
