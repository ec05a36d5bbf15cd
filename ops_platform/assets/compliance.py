"""`compliance/report`: every control over the cluster (or the manifests) and this graph's own evidence.

The graph's evidence is what its runs' checks said (the asset-check execution
records of the instance), never "the latest materialization": a refused or
failed run yields its checks as FAILED and materializes nothing, so only the
check records tell that it happened.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
    AssetCheckExecutionResolvedStatus,
)

from ops_platform.assets.backups import ARTIFACT_CHECKSUM, DATA_VERIFIED, RPO_WITHIN_OBJECTIVE, RTO_WITHIN_OBJECTIVE
from ops_platform.assets.certificates import INVENTORY_KEY, VALIDITY_METADATA
from ops_platform.assets.failures import failure, prefixed
from ops_platform.assets.keys import backup_key, restore_test_key
from ops_platform.certificates.checks import CHECK_EXPIRY
from ops_platform.compliance.controls import CATALOGUE, control_ids
from ops_platform.compliance.evidence import (
    BackupEvidence,
    CertificateEvidence,
    Evidence,
    FailedRun,
    GraphEvidence,
    RestoreTestEvidence,
    collect_cluster_evidence,
    load_manifests,
)
from ops_platform.compliance.exceptions import load_exceptions
from ops_platform.compliance.model import ControlConfig
from ops_platform.compliance.report import Report, evaluate, latest_report_json, store_report
from ops_platform.errors import MissingSettingError, OpsPlatformError
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import ObjectStoreResource
from ops_platform.sensors.run_failures import UI_URL_SETTING
from ops_platform.spec import REPO_ROOT, Spec

COMPLIANCE_GROUP = "compliance"
REPORT_KEY = dg.AssetKey(["compliance", "report"])
NO_ERROR_FINDINGS = "no_open_error_findings"
RESTORE_TEST_CHECKS = (DATA_VERIFIED, RTO_WITHIN_OBJECTIVE, RPO_WITHIN_OBJECTIVE)
REPORT_FAILED = "compliance report failed"
OPEN_ERRORS_LISTED = 200  # in the check's metadata; the report itself has them all
HISTORY_LIMIT = 20
"""Executions read back per check to find the newest concluded one (in progress and skipped are passed over)."""

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CheckExecution:
    """One concluded execution of a check: what the run that did the work said."""

    status: AssetCheckExecutionResolvedStatus
    description: str
    metadata: Mapping[str, dg.MetadataValue]
    run_id: str
    at: datetime

    @property
    def passed(self) -> bool:
        return self.status == AssetCheckExecutionResolvedStatus.SUCCEEDED

    def value(self, name: str) -> Any:
        entry = self.metadata.get(name)
        return None if entry is None else entry.value


def latest_execution(instance: dg.DagsterInstance, key: dg.AssetCheckKey, *,
                     passed_only: bool = False) -> CheckExecution | None:
    """The newest concluded execution of a check (SUCCEEDED, FAILED or EXECUTION_FAILED), or None.

    A check whose run failed before yielding it stays PLANNED in storage; it is
    resolved as Dagster's UI does (EXECUTION_FAILED when its run failed).
    """
    statuses = {AssetCheckExecutionRecordStatus.SUCCEEDED} if passed_only else None
    for record in instance.event_log_storage.get_asset_check_execution_history(
        key, limit=HISTORY_LIMIT, status=statuses,
    ):
        execution = _concluded(instance, record)
        if execution is not None:
            return execution
    return None


def _concluded(instance: dg.DagsterInstance, record: AssetCheckExecutionRecord) -> CheckExecution | None:
    evaluation = record.evaluation
    at = datetime.fromtimestamp(record.event.timestamp if record.event else record.create_timestamp, UTC)
    if record.status != AssetCheckExecutionRecordStatus.PLANNED and evaluation is not None:
        status = (AssetCheckExecutionResolvedStatus.SUCCEEDED
                  if record.status == AssetCheckExecutionRecordStatus.SUCCEEDED
                  else AssetCheckExecutionResolvedStatus.FAILED)
        return CheckExecution(status, evaluation.description or "", dict(evaluation.metadata), record.run_id, at)
    run = instance.get_run_by_id(record.run_id)
    if run is None or run.status != dg.DagsterRunStatus.FAILURE:
        return None  # in progress, or the run finished without this check (skipped)
    return CheckExecution(AssetCheckExecutionResolvedStatus.EXECUTION_FAILED,
                          _run_failure(instance, record.run_id, record.key.asset_key), {}, record.run_id, at)


def _run_failure(instance: dg.DagsterInstance, run_id: str, asset_key: dg.AssetKey) -> str:
    """What the failed run said before the check could be evaluated: the failure of the asset's step."""
    said = "run failed before the check was evaluated"
    failures = [entry for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
                if entry.dagster_event and entry.dagster_event.step_failure_data]
    # One step per asset, named after its key (a run of several assets has several steps).
    own = [entry for entry in failures if entry.step_key == asset_key.to_python_identifier()]
    for entry in own or failures:
        data = entry.dagster_event.step_failure_data  # type: ignore[union-attr]
        if data.user_failure_data is not None and data.user_failure_data.description:
            return f"{said}: {data.user_failure_data.description}"
        if data.error is not None:
            return f"{said}: {data.error.message.strip()}"
    return said


def _run_url(run_id: str) -> str | None:
    base = os.environ.get(UI_URL_SETTING)
    return f"{base.rstrip('/')}/runs/{run_id}" if base else None


def _failed_run(execution: CheckExecution) -> FailedRun:
    return FailedRun(execution.description or execution.status.value, execution.run_id, _run_url(execution.run_id))


def _moment(value: Any) -> datetime | None:
    """A timestamp metadata value (epoch seconds) or an ISO 8601 text, as an aware datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _backup_evidence(instance: dg.DagsterInstance, datastore: str) -> tuple[BackupEvidence | None, FailedRun | None]:
    key = dg.AssetCheckKey(backup_key(datastore), ARTIFACT_CHECKSUM)
    newest = latest_execution(instance, key, passed_only=True)
    latest = latest_execution(instance, key)
    backup = None
    if newest is not None:
        backup = BackupEvidence(
            datastore=datastore,
            backup_id=str(newest.value("backup_id") or "?"),
            recovery_point=_moment(newest.value("recovery_point")),
            run_id=newest.run_id,
            url=_run_url(newest.run_id),
        )
    failed = _failed_run(latest) if latest is not None and not latest.passed else None
    return backup, failed


def _restore_test_evidence(instance: dg.DagsterInstance, datastore: str) -> RestoreTestEvidence | None:
    key = restore_test_key(datastore)
    executions = {name: latest_execution(instance, dg.AssetCheckKey(key, name)) for name in RESTORE_TEST_CHECKS}
    concluded = [execution for execution in executions.values() if execution is not None]
    if not concluded:
        return None
    problems = [f"{name} was never evaluated" for name, execution in executions.items() if execution is None]
    failing = [execution for execution in concluded if not execution.passed]
    reasons = list(dict.fromkeys(execution.description or execution.status.value for execution in failing))
    newest = max(concluded, key=lambda execution: execution.at)
    proof = max(failing, key=lambda execution: execution.at) if failing else newest
    rto = executions[RTO_WITHIN_OBJECTIVE]
    seconds = rto.value("restore_seconds") if rto is not None else None
    return RestoreTestEvidence(
        datastore=datastore,
        passed=not failing and not problems,
        restore_seconds=None if seconds is None else float(seconds),
        finished_at=newest.at,
        run_id=proof.run_id,
        url=_run_url(proof.run_id),
        description="; ".join(reasons + problems) or None,
    )


def _certificate_evidence(instance: dg.DagsterInstance) -> tuple[list[CertificateEvidence], FailedRun | None, bool]:
    """The certificates of the latest inventory run; its failure; whether any inventory ran."""
    expiry = latest_execution(instance, dg.AssetCheckKey(INVENTORY_KEY, CHECK_EXPIRY))
    if expiry is None:
        return [], None, False
    validity = expiry.value(VALIDITY_METADATA)
    if validity is None:  # the inventory was not taken: the run yielded its checks failed, with the cause
        return [], _failed_run(expiry), True
    url = _run_url(expiry.run_id)
    certificates = [
        CertificateEvidence(
            name=str(row.data["name"]),
            days_left=None if row.data.get("days_left") is None else float(row.data["days_left"]),
            run_id=expiry.run_id,
            url=url,
            not_before=_moment(row.data.get("not_before")),
            not_after=_moment(row.data.get("not_after")),
        )
        for row in validity.records
    ]
    return certificates, None, True


def graph_evidence(spec: Spec, instance: dg.DagsterInstance, now: datetime) -> GraphEvidence:
    """What this graph's runs proved, from the checks they yielded, each linked to the run."""
    backups: list[BackupEvidence] = []
    failed_backups: dict[str, FailedRun] = {}
    restore_tests: list[RestoreTestEvidence] = []
    for store in spec.datastores:
        backup, failed = _backup_evidence(instance, store.name)
        if backup is not None:
            backups.append(backup)
        if failed is not None:
            failed_backups[store.name] = failed
        if store.restore_test:
            test = _restore_test_evidence(instance, store.name)
            if test is not None:
                restore_tests.append(test)
    certificates, failed_inventory, inventory_taken = _certificate_evidence(instance)
    return GraphEvidence(
        backups=backups,
        restore_tests=restore_tests,
        certificates=certificates,
        rpo_minutes=spec.objectives.rpo_minutes,
        rto_minutes=spec.objectives.rto_minutes,
        fail_below_days=spec.certificates.fail_below_days,
        now=now,
        datastores=[store.name for store in spec.datastores],
        restore_tested=[store.name for store in spec.datastores if store.restore_test],
        rpo_minutes_by_datastore={store.name: spec.rpo_minutes(store) for store in spec.datastores},
        rto_minutes_by_datastore={store.name: spec.rto_minutes(store) for store in spec.datastores},
        failed_backups=failed_backups,
        failed_inventory=failed_inventory,
        inventory_taken=inventory_taken,
    )


def _repo_path(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


def build_compliance_assets(spec: Spec, *, clock: Clock = utc_now) -> list[dg.AssetsDefinition]:
    deps = [backup_key(store.name) for store in spec.datastores]
    deps += [restore_test_key(store.name) for store in spec.datastores if store.restore_test]
    deps.append(INVENTORY_KEY)

    @dg.asset(
        key=REPORT_KEY,
        deps=deps,
        group_name=COMPLIANCE_GROUP,
        kinds={"kubernetes", "s3"},
        owners=[spec.platform.owner],
        check_specs=[dg.AssetCheckSpec(
            NO_ERROR_FINDINGS, asset=REPORT_KEY,
            description="This run's report has no open (unexcepted) ERROR finding.",
        )],
        description=(
            "Every compliance control over the live cluster (the manifests of infra/ when no cluster is "
            "configured) and this graph's evidence (the checks its backup, restore-test and certificate runs "
            "yielded): score per control, failing objects with remediation, exceptions applied, trend. "
            "Written to the object store as JSON and HTML."
        ),
    )
    def report(
        context: dg.AssetExecutionContext,
        kubernetes: KubernetesResource,
        object_store: ObjectStoreResource,
    ):
        now = clock()
        try:
            graph = graph_evidence(spec, context.instance, now)
            config = ControlConfig.from_spec(spec)
            try:
                evidence: Evidence = collect_cluster_evidence(kubernetes.get_client(), graph=graph, config=config)
            except MissingSettingError as missing:
                context.log.warning(f"compliance: no cluster ({missing}); judging the manifests instead")
                evidence = load_manifests(_repo_path(spec.compliance.manifests), graph=graph)
            store = object_store.get_store()
            exceptions = load_exceptions(_repo_path(spec.compliance.exceptions), known_controls=control_ids())
            result: Report = evaluate(
                evidence, CATALOGUE, exceptions, now=now, config=config,
                previous_report_json=latest_report_json(store),
            )
            stored = store_report(store, result)
        except OpsPlatformError as error:
            yield dg.AssetCheckResult(check_name=NO_ERROR_FINDINGS, passed=False,
                                      description=f"not judged: {prefixed(REPORT_FAILED, str(error))}")
            raise failure(REPORT_FAILED, error) from None
        errors = result.open_findings("ERROR")
        open_errors = len(errors)
        # Manifests that could not be read leave holes in the report: it must not pass.
        not_judged = "; ".join(str(problem) for problem in result.input_problems[:5])
        unjudged_note = (f"; {len(result.input_problems)} input problem(s), not judged: {not_judged}"
                         if result.input_problems else "")
        yield dg.MaterializeResult(
            metadata={
                "evidence": evidence.source,
                "overall_score": dg.MetadataValue.float(round(result.overall_score or 0.0, 4)),
                "open_errors": dg.MetadataValue.int(open_errors),
                "open_warnings": dg.MetadataValue.int(len(result.open_findings("WARN"))),
                "report": dg.MetadataValue.md(result.to_markdown()),
                "json_url": dg.MetadataValue.url(stored.json_url),
                "html_url": dg.MetadataValue.url(stored.html_url),
            },
            check_results=[dg.AssetCheckResult(
                check_name=NO_ERROR_FINDINGS,
                passed=open_errors == 0 and not result.input_problems,
                description=(f"{open_errors} open ERROR finding(s): "
                             + ", ".join(sorted({f.control_id for f in errors}))
                             if errors else "no open ERROR finding") + unjudged_note,
                metadata={
                    "open_errors": dg.MetadataValue.int(open_errors),
                    "open_error_findings": dg.MetadataValue.table(
                        records=[dg.TableRecord({"control": f.control_id, "object": f.object, "message": f.message})
                                 for f in errors[:OPEN_ERRORS_LISTED]],
                        schema=dg.TableSchema(columns=[dg.TableColumn("control"), dg.TableColumn("object"),
                                                       dg.TableColumn("message")]),
                    ),
                    "json_url": dg.MetadataValue.url(stored.json_url),
                },
            )],
        )

    return [report]
