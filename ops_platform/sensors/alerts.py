"""`alert_sensor` and the remediation job it starts.

A firing alert (not silenced, not inhibited) that the spec maps to a playbook
starts `remediation` with the alert's labels; one firing episode triggers once
(run key = fingerprint + startsAt), a target rests for its cooldown, and at most
``max_concurrent_remediations`` run at once. While a playbook runs, its alert is
silenced in Alertmanager; the silence is expired when it ends. `rerun_backup`
materializes the backup asset's partition of today instead.
"""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from ops_platform.assets.snapshots import dry_run_requested
from ops_platform.environment import get_environment
from ops_platform.schedules.backups import backup_job_name
from ops_platform.errors import MissingSettingError, OpsPlatformError
from ops_platform.playbooks import PlaybookContext, PlaybookRefused, run_playbook
from ops_platform.resources.alerting import AlertmanagerResource, PrometheusResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.sensing.alerts import (
    RemediationRequest,
    RemediationState,
    alerts_from_prometheus,
    fetch_firing_alerts,
    select_remediations,
)
from ops_platform.spec import Spec

REMEDIATION_JOB = "remediation"
RUN_KEY_TAG = "ops_platform/remediation"
SILENCE_MINUTES = 60


class RemediationConfig(dg.Config):
    playbook: str
    labels: dict[str, str]
    alertname: str
    run_key: str
    dry_run: bool | None = None  # unset: OPS_DRY_RUN


def build_remediation_job(spec: Spec) -> dg.JobDefinition:
    allowed = {r.playbook: list(r.namespaces) for r in spec.remediations}

    @dg.op(name="run_playbook", description="Runs one playbook for one alert, with its alert silenced meanwhile.")
    def run_playbook_op(
        context: dg.OpExecutionContext,
        config: RemediationConfig,
        kubernetes: KubernetesResource,
        alertmanager: AlertmanagerResource,
    ) -> dg.Output:
        dry_run = dry_run_requested(config.dry_run)
        try:
            kube = kubernetes.get_client()
        except MissingSettingError:
            kube = None
        silence_id = _silence(alertmanager, config, context)
        try:
            result = run_playbook(
                config.playbook,
                PlaybookContext(kube, dry_run=dry_run, allowed_namespaces=allowed.get(config.playbook, [])),
                config.labels,
            )
        except OpsPlatformError as error:
            raise dg.Failure(f"playbook {config.playbook} for {config.alertname}: {error}",
                             metadata={"labels": dg.MetadataValue.json(config.labels)}) from None
        finally:
            if silence_id:
                try:
                    alertmanager.get_client().expire_silence(silence_id)
                except OpsPlatformError as error:
                    context.log.warning(f"could not expire silence {silence_id}: {error}")
        return dg.Output(None, metadata={
            "playbook": result.playbook, "target": result.target, "dry_run": result.dry_run,
            "changed": result.changed, "summary": result.summary,
            "before": dg.MetadataValue.json(result.before), "after": dg.MetadataValue.json(result.after),
        })

    @dg.job(name=REMEDIATION_JOB, description="Runs the playbook the spec maps to a firing alert.")
    def remediation() -> None:
        run_playbook_op()

    return remediation


def _silence(alertmanager: AlertmanagerResource, config: RemediationConfig, context: dg.OpExecutionContext) -> str | None:
    if not alertmanager.url:
        return None
    matchers = {"alertname": config.alertname}
    for name in ("namespace", "deployment", "persistentvolumeclaim", "name", "datastore"):
        if name in config.labels:
            matchers[name] = config.labels[name]
    try:
        return alertmanager.get_client().create_silence(
            matchers, duration=timedelta(minutes=SILENCE_MINUTES), created_by="ops-platform",
            comment=f"playbook {config.playbook} running (run {context.run_id})",
        )
    except OpsPlatformError as error:
        context.log.warning(f"could not silence {config.alertname} while the playbook runs: {error}")
        return None


def build_alert_sensor(spec: Spec, remediation_job: dg.JobDefinition, backup_jobs: list) -> list[dg.SensorDefinition]:
    if not spec.remediations:
        return []

    @dg.sensor(
        name="alert_sensor",
        jobs=[remediation_job, *backup_jobs],
        minimum_interval_seconds=30,
        description="Starts the playbook the spec maps to each firing alert (Alertmanager; Prometheus ALERTS "
        "as a fallback).",
    )
    def alert_sensor(context: dg.SensorEvaluationContext, alertmanager: AlertmanagerResource,
                     prometheus: PrometheusResource):
        now = datetime.now(UTC)
        try:
            state = RemediationState.from_json(context.cursor)
        except ValueError as error:
            context.log.warning(str(error))
            state = RemediationState()
        _finish_ended_runs(context, state)
        try:
            alerts, problems = _firing_alerts(alertmanager, prometheus, now)
        except OpsPlatformError as error:
            return dg.SkipReason(f"no alerts read: {error}")
        for problem in problems:
            context.log.warning(f"skipped a malformed alert: {problem}")
        decision = select_remediations(
            alerts, spec.remediations, state, now=now, environment=get_environment(),
            max_concurrent=spec.max_concurrent_remediations,
        )
        for skipped in decision.skipped:
            context.log.debug(f"{skipped.alert}: {skipped.reason}")
        context.update_cursor(decision.state.to_json())
        requests = [_run_request(spec, request, now) for request in decision.requests]
        return [r for r in requests if r is not None] or dg.SkipReason(
            f"{len(alerts)} firing alert(s), none to remediate now"
        )

    return [alert_sensor]


def _firing_alerts(alertmanager: AlertmanagerResource, prometheus: PrometheusResource, now: datetime):
    if alertmanager.url:
        try:
            return fetch_firing_alerts(alertmanager.get_client())
        except OpsPlatformError:
            if not prometheus.url:
                raise
    if prometheus.url:
        return alerts_from_prometheus(prometheus.get_client().alerts(), now), []
    raise MissingSettingError("ALERTMANAGER_URL", "the alert sensor", "or PROMETHEUS_URL for the ALERTS fallback")


def _finish_ended_runs(context: dg.SensorEvaluationContext, state: RemediationState) -> None:
    for run_key in list(state.running):
        runs = context.instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
        if runs and runs[0].is_finished:
            state.finish(run_key)


def _run_request(spec: Spec, request: RemediationRequest, now: datetime) -> dg.RunRequest | None:
    tags = {RUN_KEY_TAG: request.run_key, "ops_platform/alertname": request.alertname,
            "ops_platform/playbook": request.playbook}
    if request.playbook == "rerun_backup":
        partition = now.astimezone(ZoneInfo(spec.platform.timezone)).date().isoformat()
        try:
            result = run_playbook("rerun_backup", PlaybookContext(None, dry_run=True), request.labels,
                                  datastores=[store.name for store in spec.datastores], partition=partition)
        except PlaybookRefused:
            return None
        return dg.RunRequest(run_key=request.run_key, job_name=backup_job_name(result.after["asset_key"][-1]),
                             partition_key=result.after["partition"], tags=tags)
    return dg.RunRequest(
        run_key=request.run_key,
        job_name=REMEDIATION_JOB,
        run_config={"ops": {"run_playbook": {"config": {
            "playbook": request.playbook, "labels": dict(request.labels), "alertname": request.alertname,
            "run_key": request.run_key}}}},
        tags=tags,
    )
