"""`alert_sensor` and the playbook jobs it starts.

A firing alert (not silenced, not inhibited) that the spec maps to a playbook
starts `playbook_<name>` with the alert's labels; one firing episode triggers once
(run key = fingerprint + startsAt), a target rests for its cooldown, and at most
``max_concurrent_remediations`` run at once. While a playbook runs, its alert is
silenced in Alertmanager; the silence is expired when it ends. `rerun_backup`
runs the datastore's backup job instead (a new backup, taken now).
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from ops_platform.schedules.backups import backup_job_name
from ops_platform.environment import dry_run_requested, get_environment, sensor_status
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

def playbook_job_name(playbook: str) -> str:
    return f"playbook_{playbook}"


def playbook_op_name(playbook: str) -> str:
    return f"run_{playbook}"
RUN_KEY_TAG = "ops_platform/remediation"
SILENCE_MINUTES = 60


class RemediationConfig(dg.Config):
    labels: dict[str, str]
    alertname: str
    run_key: str
    dry_run: bool | None = None  # unset: OPS_DRY_RUN


def build_playbook_jobs(spec: Spec) -> list[dg.JobDefinition]:
    """One job per playbook the spec maps an alert to (rerun_backup runs the backup job itself)."""
    allowed = {r.playbook: list(r.namespaces) for r in spec.remediations}
    playbooks = sorted({r.playbook for r in spec.remediations} - {"rerun_backup"})
    return [_playbook_job(playbook, allowed.get(playbook, [])) for playbook in playbooks]


def _playbook_job(playbook: str, allowed_namespaces: list[str]) -> dg.JobDefinition:
    @dg.op(name=playbook_op_name(playbook), description=f"Runs {playbook} for one alert, with the alert silenced meanwhile.")
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
                playbook, PlaybookContext(kube, dry_run=dry_run, allowed_namespaces=allowed_namespaces), config.labels
            )
        except OpsPlatformError as error:
            raise dg.Failure(f"playbook {playbook} for {config.alertname}: {error}",
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

    @dg.job(name=playbook_job_name(playbook), description=f"The {playbook} playbook, started by alert_sensor.")
    def playbook_job() -> None:
        run_playbook_op()

    return playbook_job


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
            comment=f"playbook {context.job_name} running (run {context.run_id})",
        )
    except OpsPlatformError as error:
        context.log.warning(f"could not silence {config.alertname} while the playbook runs: {error}")
        return None


def build_alert_sensor(
    spec: Spec, playbook_jobs: list[dg.JobDefinition], backup_jobs: list, environment: str = "local"
) -> list[dg.SensorDefinition]:
    if not spec.remediations:
        return []

    @dg.sensor(
        name="alert_sensor",
        jobs=[*playbook_jobs, *backup_jobs],
        minimum_interval_seconds=30,
        default_status=sensor_status(environment),
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
        try:
            result = run_playbook("rerun_backup", PlaybookContext(None, dry_run=True), request.labels,
                                  datastores=[store.name for store in spec.datastores])
        except PlaybookRefused:
            return None
        return dg.RunRequest(run_key=request.run_key, job_name=backup_job_name(result.after["asset_key"][-1]),
                             tags=tags)
    return dg.RunRequest(
        run_key=request.run_key,
        job_name=playbook_job_name(request.playbook),
        run_config={"ops": {playbook_op_name(request.playbook): {"config": {
            "labels": dict(request.labels), "alertname": request.alertname, "run_key": request.run_key}}}},
        tags=tags,
    )
