"""Failed ops runs and failed checks, as alerts for the platform's Alertmanager (which routes them
to Slack or PagerDuty), and the passing runs and checks that resolve them.

The sensor (``ops_platform/sensors/run_failures.py``) reads what a finished run did from its
events into a :class:`FinishedRun`; :func:`run_alerts` says which alerts that run fires and which
firing ones it resolves:

- ``OpsRunFailed``, one per asset whose step failed without materializing it (labels ``asset``,
  ``job``, ``severity``). Assets skipped because an upstream failed are not alerted: the upstream
  is. An op job (a playbook) has no asset: its alert has no ``asset`` label.
- ``OpsCheckFailed``, one per check evaluated ``passed=False`` with ERROR severity, blocking or
  not (labels ``asset``, ``check``, ``job``, ``severity``). A failed blocking check fails its
  run, but its asset was materialized, so it pages once, as a check. WARN failures never page.
  Nor do the checks of an asset whose own step failed: our assets then fail every check "not
  proven: <cause>" before raising, and that asset's ``OpsRunFailed`` already carries the cause.
- An asset materialized again resolves its ``OpsRunFailed``; a check evaluated again and passing
  resolves its ``OpsCheckFailed``; a successful run of an op job resolves that job's alert. A
  WARN failure leaves an ERROR alert firing.

``severity`` is ``spec.alerting.severity_of(group)``, the group being the first part of the asset
key (``restore_tests/redis_cache`` -> ``restore_tests``). ``job`` is what a person would call the
run (:func:`job_label`). The description is the real cause: the failed step's ``dg.Failure``
description or exception, the check's description.

Alerts carry an explicit ``endsAt`` (:data:`FIRING_FOR` after they start): without it Alertmanager
resolves an alert ``resolve_timeout`` (5 minutes by default) after the last post, and these are
posted once, so a failed weekly restore test would stop paging long before the next run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ops_platform.playbooks.base import REFUSED_TAG
from ops_platform.resources.alerting import PostableAlert
from ops_platform.spec import Alerting

RUN_FAILED_ALERTNAME = "OpsRunFailed"
CHECK_FAILED_ALERTNAME = "OpsCheckFailed"
ALERTNAMES = (RUN_FAILED_ALERTNAME, CHECK_FAILED_ALERTNAME)
# Longer than the weekly cadence of restore tests, so their failure stays firing until the next
# run passes; an alert no run ever resolves (asset removed) ends by itself.
FIRING_FOR = timedelta(days=8)
ERROR_LIMIT = 1000
# Dagster's run tags naming what launched a run.
_LAUNCHED_BY = (
    ("dagster/schedule_name", "{}"), ("dagster/sensor_name", "{}"), ("dagster/backfill", "backfill {}"),
)


@dataclass(frozen=True)
class CheckEvaluation:
    """One evaluation of an asset check, as Dagster recorded it."""

    asset: str
    check: str
    passed: bool
    severity: str  # Dagster's AssetCheckSeverity: "ERROR" or "WARN"
    description: str
    at: datetime


@dataclass(frozen=True)
class FinishedRun:
    """What one finished run planned and did, read from its events.

    ``planned`` maps each asset the run planned to the step planned to materialize it;
    ``step_failures`` maps each failed step to its cause; ``run_failure`` is the run's own
    failure message, the cause when no step failed (the run could not start, its worker died).
    """

    run_id: str
    job_name: str
    tags: Mapping[str, str]
    failed: bool
    ended_at: datetime
    url: str
    planned: Mapping[str, str | None] = field(default_factory=dict)
    materialized: frozenset[str] = frozenset()
    step_failures: Mapping[str, str] = field(default_factory=dict)
    run_failure: str = ""
    checks: Sequence[CheckEvaluation] = ()


@dataclass(frozen=True)
class Resolution:
    """Which firing alerts a passing run or check ends: matched on alertname, asset and check,
    never on job, so a failure from the schedule is resolved by a manual rerun."""

    alertname: str
    asset: str | None
    check: str | None = None
    job: str | None = None  # only for an op job's alert, which has no asset

    def matches(self, labels: Mapping[str, str]) -> bool:
        if labels.get("alertname") != self.alertname or labels.get("asset", "") != (self.asset or ""):
            return False
        if self.check is not None and labels.get("check") != self.check:
            return False
        return self.job is None or labels.get("job") == self.job


@dataclass(frozen=True)
class RunAlerts:
    firing: list[PostableAlert]
    resolving: list[Resolution]


def job_label(job_name: str, tags: Mapping[str, str], assets: Sequence[str]) -> str:
    """The job a person would name: the job itself, unless Dagster made it up.

    Names starting with ``__`` are Dagster's own (``__ASSET_JOB``, ``__anonymous_asset_job_<schedule>``,
    ``__ephemeral_asset_job__``); then the schedule, sensor or backfill that launched the run, else
    ``materialize <assets>`` (a run started by hand from the UI).
    """
    if not job_name.startswith("__"):
        return job_name
    for tag, label in _LAUNCHED_BY:
        if tags.get(tag):
            return label.format(tags[tag])
    return " ".join(["materialize", ", ".join(sorted(assets))]).strip()


def failing_assets(run: FinishedRun) -> dict[str | None, str]:
    """Each asset the run failed to materialize because its own step failed, with the cause; when no
    step failed (the run never started, its worker died), each planned asset it did not materialize,
    with the run's failure. The key ``None`` stands for a failure of no asset (an op job's step).
    """
    if not run.failed:
        return {}
    failing: dict[str | None, str] = {}
    for step, cause in run.step_failures.items():
        assets = [asset for asset, planned_step in run.planned.items() if planned_step == step]
        if not assets:
            failing.setdefault(None, cause)
        for asset in assets:
            if asset not in run.materialized:
                failing.setdefault(asset, cause)
    if not run.step_failures:
        unmaterialized = [asset for asset in run.planned if asset not in run.materialized]
        for asset in unmaterialized or [None]:
            failing.setdefault(asset, run.run_failure)
    return failing


def run_alerts(run: FinishedRun, alerting: Alerting, *, firing_for: timedelta = FIRING_FOR) -> RunAlerts:
    """The alerts ``run`` fires and the resolutions it brings (see the module docstring)."""
    # A playbook run its own guard refused (cooldown, allow-list) changed nothing and pages no one:
    # the alert that asked for it is still firing in Alertmanager.
    failing = {} if run.tags.get(REFUSED_TAG) else failing_assets(run)
    firing = [
        _run_failed(run, asset, cause, alerting, firing_for)
        for asset, cause in sorted(failing.items(), key=lambda item: item[0] or "")
    ]
    resolving = [Resolution(RUN_FAILED_ALERTNAME, asset) for asset in sorted(run.materialized)]
    if not run.failed and not run.planned:
        resolving.append(Resolution(RUN_FAILED_ALERTNAME, None, job=job_label(run.job_name, run.tags, [])))
    for evaluation in run.checks:
        if evaluation.passed:
            resolving.append(Resolution(CHECK_FAILED_ALERTNAME, evaluation.asset, evaluation.check))
        elif evaluation.severity == "ERROR" and evaluation.asset not in failing:
            firing.append(_check_failed(run, evaluation, alerting, firing_for))
    return RunAlerts(firing, resolving)


def _run_failed(
    run: FinishedRun, asset: str | None, cause: str, alerting: Alerting, firing_for: timedelta
) -> PostableAlert:
    job = job_label(run.job_name, run.tags, [asset] if asset else [])
    group = _group(asset) or ("playbooks" if run.job_name.startswith("playbook_") else None)
    labels = {"alertname": RUN_FAILED_ALERTNAME, "job": job, "severity": alerting.severity_of(group)}
    if asset:
        labels["asset"] = asset
    return PostableAlert(
        labels=labels,
        annotations={
            "summary": f"{asset} failed in {job}" if asset else f"ops run of {job} failed",
            "description": _truncated(cause.strip() or "(no error message)"),
            "run_id": run.run_id,
        },
        starts_at=run.ended_at,
        ends_at=run.ended_at + firing_for,
        generator_url=run.url,
    )


def _check_failed(
    run: FinishedRun, evaluation: CheckEvaluation, alerting: Alerting, firing_for: timedelta
) -> PostableAlert:
    job = job_label(run.job_name, run.tags, [evaluation.asset])
    return PostableAlert(
        labels={
            "alertname": CHECK_FAILED_ALERTNAME,
            "asset": evaluation.asset,
            "check": evaluation.check,
            "job": job,
            "severity": alerting.severity_of(_group(evaluation.asset)),
        },
        annotations={
            "summary": f"check {evaluation.check} of {evaluation.asset} failed in {job}",
            "description": _truncated(evaluation.description.strip() or f"check {evaluation.check} did not pass"),
            "run_id": run.run_id,
        },
        starts_at=evaluation.at,
        ends_at=evaluation.at + firing_for,
        generator_url=run.url,
    )


def _group(asset: str | None) -> str | None:
    return asset.split("/", 1)[0] if asset else None


def _truncated(text: str) -> str:
    if len(text) <= ERROR_LIMIT:
        return text
    kept = text[: ERROR_LIMIT - 40].rstrip()
    return f"{kept} ... [{len(text) - len(kept)} chars cut]"
