"""`alert_sensor` and the playbook jobs it starts.

A firing alert (not silenced, not inhibited) that the spec maps to a playbook
starts `playbook_<name>` with the alert's labels and the remediation that
matched (``remediation`` in the run config). While a playbook runs, its alert is
silenced in Alertmanager; the silence is expired when it ends. `rerun_backup`
runs the datastore's backup job instead (a new backup, taken now).

Every guard holds for runs launched by hand too, not only for the sensor's:

- Namespace allow-list: checked in the run, before any request, against the
  remediation the run config names; a run naming none (a launchpad run) gets
  the union of the allow-lists of the playbook's remediations (any namespace if
  one of them has none).
- At most ``max_concurrent_remediations`` at once: every playbook job carries
  the run tag ``ops-platform/queue=remediation``, which the run queue limits
  (``tag_concurrency_limits`` in infra/dagster/dagster.yaml and values.yaml,
  kept equal to the spec's number). The sensor asks for no more than the free
  slots, counting the instance's queued and running remediation runs, so a
  request that never became a run holds no slot.
- Cooldown per target (the object acted on: ``namespace/deployment=web``,
  ``namespace/certificate=tls``, a PVC, a datastore): checked in the run from
  the instance's run history. A run of the same target (run tag
  ``ops_platform/target``, which each run sets on itself) that is running, or
  ended less than the cooldown ago, makes the run refuse with a ``dg.Failure``
  saying until when: a failed run, not a skipped one, so that a launch that
  did nothing never reads as a remediation done. Runs that refused or were dry
  runs (tags ``ops_platform/refused``, ``ops_platform/dry_run``) start no
  cooldown; ``ignore_cooldown: true`` in the run config is the person's override.
  The sensor skips a target cooling down, from its cursor and the same history.
  A rerun_backup run is a backup job, which has no playbook op: its cooldown is
  the sensor's.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn

import dagster as dg

from ops_platform.environment import dry_run_requested, get_environment, sensor_status
from ops_platform.errors import MissingSettingError, OpsPlatformError
from ops_platform.playbooks import PlaybookContext, PlaybookRefused, run_playbook
from ops_platform.playbooks.base import REFUSED_TAG
from ops_platform.resources.alerting import AlertmanagerResource, PrometheusResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.schedules.backups import backup_job_name
from ops_platform.sensing.alerts import (
    NO_REMEDIATION,
    RemediationRequest,
    RemediationState,
    Skipped,
    longest_cooldown,
    read_firing_alerts,
    remediation_id,
    request_target,
    select_remediations,
)
from ops_platform.spec import Remediation, Spec

RUN_KEY_TAG = "ops_platform/remediation"
TARGET_TAG = "ops_platform/target"
DRY_RUN_TAG = "ops_platform/dry_run"
# The run queue limits runs with this tag to max_concurrent_remediations (infra/dagster/dagster.yaml).
REMEDIATION_QUEUE_TAG = "ops-platform/queue"
REMEDIATION_QUEUE = "remediation"
SILENCE_MINUTES = 60
HISTORY_LIMIT = 500
SKIPS_IN_REASON = 5
_RUNNING = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING,
            dg.DagsterRunStatus.SUSPENDED)
_IN_FLIGHT = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, *_RUNNING)


def playbook_job_name(playbook: str) -> str:
    return f"playbook_{playbook}"


def playbook_op_name(playbook: str) -> str:
    return f"run_{playbook}"


def utc_now() -> datetime:
    return datetime.now(UTC)


class RemediationConfig(dg.Config):
    labels: dict[str, str]
    alertname: str
    run_key: str = ""
    remediation: str | None = None  # remediation_id of the spec's remediation; unset: the playbook's union
    dry_run: bool | None = None  # unset: OPS_DRY_RUN
    ignore_cooldown: bool = False


@dataclass(frozen=True)
class Remediated:
    """The latest run on a target that may have acted: running now, or ended at ``moment``."""

    run_id: str
    moment: datetime
    running: bool


def remediation_history(
    instance: dg.DagsterInstance, tags: Mapping[str, str], *, now: datetime, exclude_run_id: str | None = None
) -> dict[str, Remediated]:
    """The latest remediation per target among the newest :data:`HISTORY_LIMIT` runs carrying ``tags``.

    A run counts once it has started; not when it refused or was a dry run (it changed nothing).
    """
    latest: dict[str, Remediated] = {}
    for record in instance.get_run_records(filters=dg.RunsFilter(tags=dict(tags)), limit=HISTORY_LIMIT):
        run = record.dagster_run
        target = run.tags.get(TARGET_TAG)
        if (not target or run.run_id == exclude_run_id or record.start_time is None
                or REFUSED_TAG in run.tags or run.tags.get(DRY_RUN_TAG) == "true"):
            continue
        if run.status in _RUNNING:
            seen = Remediated(run.run_id, now, running=True)
        elif run.is_finished:
            ended = record.end_time or record.update_timestamp.timestamp()
            seen = Remediated(run.run_id, datetime.fromtimestamp(ended, tz=UTC), running=False)
        else:
            continue
        if target not in latest or latest[target].moment < seen.moment:
            latest[target] = seen
    return latest


def remediations_in_flight(instance: dg.DagsterInstance) -> int:
    """Runs the run queue counts against max_concurrent_remediations, queued ones included."""
    return instance.get_runs_count(dg.RunsFilter(tags={REMEDIATION_QUEUE_TAG: REMEDIATION_QUEUE},
                                                 statuses=list(_IN_FLIGHT)))


def build_playbook_jobs(spec: Spec, *, clock: Callable[[], datetime] = utc_now) -> list[dg.JobDefinition]:
    """One job per playbook the spec maps an alert to (rerun_backup runs the backup job itself)."""
    by_playbook: dict[str, list[Remediation]] = {}
    for remediation in spec.remediations:
        by_playbook.setdefault(remediation.playbook, []).append(remediation)
    return [_playbook_job(playbook, by_playbook[playbook], clock)
            for playbook in sorted(set(by_playbook) - {"rerun_backup"})]


@dataclass(frozen=True)
class _Guard:
    """The allow-list and cooldown a run is held to, and where they come from (for messages)."""

    allowed_namespaces: list[str]
    cooldown: timedelta
    source: str


def _guard(playbook: str, remediations: Sequence[Remediation], named: str | None) -> _Guard:
    if named is not None:
        for remediation in remediations:
            if remediation_id(remediation) == named:
                return _Guard(list(remediation.namespaces), timedelta(minutes=remediation.cooldown_minutes),
                              f"remediation {named}")
        known = ", ".join(remediation_id(r) for r in remediations)
        raise PlaybookRefused(f"playbook {playbook}: the run config names remediation {named!r}, which is not one "
                              f"of this playbook's in infra/platform.yaml ({known}); name one of those or leave it "
                              "unset")
    unrestricted = any(not r.namespaces for r in remediations)
    union = [] if unrestricted else sorted({ns for r in remediations for ns in r.namespaces})
    return _Guard(union, longest_cooldown(remediations), f"the remediations of {playbook} (no remediation named)")


def _playbook_job(playbook: str, remediations: list[Remediation],
                  clock: Callable[[], datetime]) -> dg.JobDefinition:
    @dg.op(name=playbook_op_name(playbook), description=f"Runs {playbook} for one alert, with the alert silenced meanwhile.")
    def run_playbook_op(
        context: dg.OpExecutionContext,
        config: RemediationConfig,
        kubernetes: KubernetesResource,
        alertmanager: AlertmanagerResource,
    ) -> dg.Output:
        now = clock()
        dry_run = dry_run_requested(config.dry_run)
        try:
            guard = _guard(playbook, remediations, config.remediation)
        except PlaybookRefused as refused:
            _refuse(context, "remediation", str(refused), config)
        try:
            target = request_target(playbook, config.labels)
        except PlaybookRefused as refused:
            _refuse(context, "labels", f"{refused} (the run config's labels)", config)
        # Later runs find this one by its target, manual launches too (their tags are the job's alone).
        context.instance.add_run_tags(context.run_id,
                                      {TARGET_TAG: target, **({DRY_RUN_TAG: "true"} if dry_run else {})})
        # Before the silence and any request; the playbook checks the same list again.
        namespace = config.labels.get("namespace", "")
        if guard.allowed_namespaces and namespace not in guard.allowed_namespaces:
            _refuse(context, "namespace", f"playbook {playbook}: namespace {namespace!r} is not in the allow-list "
                                          f"{guard.allowed_namespaces} of {guard.source} (remediations[].namespaces "
                                          "in infra/platform.yaml)", config)
        if not config.ignore_cooldown:
            _check_cooldown(context, playbook, target, guard, now, config)
        try:
            kube = kubernetes.get_client()
        except MissingSettingError:
            kube = None
        silence_id = _silence(alertmanager, config, context)
        try:
            result = run_playbook(
                playbook, PlaybookContext(kube, dry_run=dry_run, allowed_namespaces=guard.allowed_namespaces),
                config.labels,
            )
        except PlaybookRefused as refused:
            _refuse(context, "playbook", f"playbook {playbook} for {config.alertname}: {refused}", config)
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

    @dg.job(name=playbook_job_name(playbook), tags={REMEDIATION_QUEUE_TAG: REMEDIATION_QUEUE},
            description=f"The {playbook} playbook, started by alert_sensor (or by hand: the same guards apply).")
    def playbook_job() -> None:
        run_playbook_op()

    return playbook_job


def _check_cooldown(context: dg.OpExecutionContext, playbook: str, target: str, guard: _Guard, now: datetime,
                    config: RemediationConfig) -> None:
    last = remediation_history(context.instance, {TARGET_TAG: target}, now=now,
                               exclude_run_id=context.run_id).get(target)
    if last is None:
        return
    if last.running:
        _refuse(context, "cooldown", f"playbook {playbook}: run {last.run_id} is remediating {target} right now; "
                                     "one remediation per target at a time (launch again once it has ended and "
                                     "its cooldown passed)", config)
    until = last.moment + guard.cooldown
    if now < until:
        _refuse(context, "cooldown",
                f"playbook {playbook}: {target} is cooling down until {until.isoformat()} (run {last.run_id} ended "
                f"at {last.moment.isoformat()}; cooldown {guard.cooldown} from {guard.source}); launch again after "
                "that, or with ignore_cooldown: true in the run config if a person has checked the target", config)


def _refuse(context: dg.OpExecutionContext, kind: str, message: str, config: RemediationConfig) -> NoReturn:
    """End the run as refused: it changed nothing, so it starts no cooldown."""
    context.instance.add_run_tags(context.run_id, {REFUSED_TAG: kind})
    raise dg.Failure(message, metadata={"labels": dg.MetadataValue.json(config.labels), "refused": kind})


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
    spec: Spec, playbook_jobs: list[dg.JobDefinition], backup_jobs: list, environment: str = "local",
    *, clock: Callable[[], datetime] = utc_now,
) -> list[dg.SensorDefinition]:
    if not spec.remediations:
        return []

    @dg.sensor(
        name="alert_sensor",
        jobs=[*playbook_jobs, *backup_jobs],
        minimum_interval_seconds=30,
        default_status=sensor_status(environment),
        description="Starts the playbook the spec maps to each firing alert (Alertmanager; Prometheus alerts "
        "as a fallback, with Alertmanager's silences when they can be read).",
    )
    def alert_sensor(context: dg.SensorEvaluationContext, alertmanager: AlertmanagerResource,
                     prometheus: PrometheusResource):
        now = clock()
        try:
            state = RemediationState.from_json(context.cursor)
        except ValueError as error:
            context.log.warning(str(error))
            state = RemediationState()
        try:
            firing = read_firing_alerts(alertmanager.get_client() if alertmanager.url else None,
                                        prometheus.get_client() if prometheus.url else None, now)
        except OpsPlatformError as error:
            return dg.SkipReason(f"no alerts read: {error}")
        for note in firing.notes:
            context.log.warning(note)
        for problem in firing.problems:
            context.log.warning(f"skipped a malformed alert: {problem}")
        history = remediation_history(context.instance, {REMEDIATION_QUEUE_TAG: REMEDIATION_QUEUE}, now=now)
        state.remember({target: seen.moment for target, seen in history.items()})
        decision = select_remediations(
            firing.alerts, spec.remediations, state, now=now, environment=get_environment(),
            max_concurrent=spec.max_concurrent_remediations, in_flight=remediations_in_flight(context.instance),
            datastores=[store.name for store in spec.datastores],
        )
        for skipped in decision.skipped:
            if skipped.reason.startswith("not requested:"):
                context.log.warning(f"{skipped.alert}: {skipped.reason}")
            else:
                context.log.debug(f"{skipped.alert}: {skipped.reason}")
        context.update_cursor(decision.state.to_json())
        if decision.requests:
            return [_run_request(spec, request) for request in decision.requests]
        return dg.SkipReason(_skip_reason(len(firing.alerts), firing.source, decision.skipped))

    return [alert_sensor]


def _skip_reason(count: int, source: str, skipped: list[Skipped]) -> str:
    reason = f"{count} alert(s) listed by {source}, none to remediate now"
    unmapped = [s for s in skipped if s.reason == NO_REMEDIATION]
    # An alert no playbook can act on is worth reading first: its rule or mapping needs fixing.
    shown = sorted((s for s in skipped if s.reason != NO_REMEDIATION),
                   key=lambda s: not s.reason.startswith("not requested:"))
    if shown:
        reason += ": " + "; ".join(f"{s.alert}: {s.reason}" for s in shown[:SKIPS_IN_REASON])
        if len(shown) > SKIPS_IN_REASON:
            reason += f"; and {len(shown) - SKIPS_IN_REASON} more skipped (see the tick's log)"
    if unmapped:
        reason += f"; {len(unmapped)} mapped to no remediation"
    return reason


def _run_request(spec: Spec, request: RemediationRequest) -> dg.RunRequest:
    tags = {RUN_KEY_TAG: request.run_key, "ops_platform/alertname": request.alertname,
            "ops_platform/playbook": request.playbook, TARGET_TAG: request.target,
            REMEDIATION_QUEUE_TAG: REMEDIATION_QUEUE}
    if request.playbook == "rerun_backup":
        # select_remediations checked the datastore against the spec: this dry run cannot refuse.
        result = run_playbook("rerun_backup", PlaybookContext(None, dry_run=True), request.labels,
                              datastores=[store.name for store in spec.datastores])
        return dg.RunRequest(run_key=request.run_key, job_name=backup_job_name(result.after["asset_key"][-1]),
                             tags=tags)
    return dg.RunRequest(
        run_key=request.run_key,
        job_name=playbook_job_name(request.playbook),
        run_config={"ops": {playbook_op_name(request.playbook): {"config": {
            "labels": dict(request.labels), "alertname": request.alertname, "run_key": request.run_key,
            "remediation": request.remediation}}}},
        tags=tags,
    )
