"""`compliance/report`: every control over the cluster (or the manifests) and this graph's own evidence."""

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from ops_platform.assets.certificates import INVENTORY_KEY
from ops_platform.assets.keys import backup_key, restore_test_key
from ops_platform.compliance.controls import CATALOGUE, control_ids
from ops_platform.compliance.evidence import (
    BackupEvidence,
    CertificateEvidence,
    Evidence,
    GraphEvidence,
    RestoreTestEvidence,
    collect_cluster_evidence,
    load_manifests,
)
from ops_platform.compliance.exceptions import load_exceptions
from ops_platform.compliance.model import ControlConfig
from ops_platform.compliance.report import Report, evaluate, latest_report_json, store_report
from ops_platform.errors import MissingSettingError
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import ObjectStoreResource
from ops_platform.spec import REPO_ROOT, Spec

COMPLIANCE_GROUP = "compliance"
REPORT_KEY = dg.AssetKey(["compliance", "report"])
NO_ERROR_FINDINGS = "no_open_error_findings"


def _repo_path(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


def graph_evidence(spec: Spec, instance: dg.DagsterInstance, now: datetime) -> GraphEvidence:
    """What this graph's latest runs prove, each linked to the run that produced it."""
    backups, restore_tests, certificates = [], [], []
    for store in spec.datastores:
        event = instance.get_latest_materialization_event(backup_key(store.name))
        if event is not None and event.asset_materialization is not None:
            metadata = event.asset_materialization.metadata
            backups.append(BackupEvidence(
                datastore=store.name,
                backup_id=str(metadata["backup_id"].value),
                recovery_point=datetime.fromisoformat(str(metadata["recovery_point"].value)),
                run_id=event.run_id,
            ))
        event = instance.get_latest_materialization_event(restore_test_key(store.name))
        if event is not None and event.asset_materialization is not None:
            metadata = event.asset_materialization.metadata
            restore_tests.append(RestoreTestEvidence(
                datastore=store.name,
                passed=bool(metadata["verified"].value),
                restore_seconds=float(metadata["restore_seconds"].value),
                finished_at=datetime.fromtimestamp(event.timestamp, UTC),
                run_id=event.run_id,
            ))
    event = instance.get_latest_materialization_event(INVENTORY_KEY)
    if event is not None and event.asset_materialization is not None:
        for row in event.asset_materialization.metadata["days_left"].value:  # type: ignore[union-attr]
            certificates.append(CertificateEvidence(row["name"], float(row["days_left"]), run_id=event.run_id))
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
    )


def build_compliance_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    deps = [backup_key(store.name) for store in spec.datastores]
    deps += [restore_test_key(store.name) for store in spec.datastores if store.restore_test]
    deps.append(INVENTORY_KEY)

    @dg.asset(
        key=REPORT_KEY,
        deps=deps,
        group_name=COMPLIANCE_GROUP,
        kinds={"kubernetes", "s3"},
        owners=[spec.platform.owner],
        description=(
            "Every compliance control over the live cluster (the manifests of infra/ when no cluster is "
            "configured) and this graph's evidence: score per control, failing objects with remediation, "
            "exceptions applied, trend. Written to the object store as JSON and HTML."
        ),
    )
    def report(
        context: dg.AssetExecutionContext,
        kubernetes: KubernetesResource,
        object_store: ObjectStoreResource,
    ) -> dg.MaterializeResult:
        now = datetime.now(UTC)
        graph = graph_evidence(spec, context.instance, now)
        try:
            evidence: Evidence = collect_cluster_evidence(kubernetes.get_client(), graph=graph)
        except MissingSettingError as missing:
            context.log.warning(f"compliance: no cluster ({missing}); judging the manifests instead")
            evidence = load_manifests(_repo_path(spec.compliance.manifests), graph=graph)
        store = object_store.get_store()
        exceptions = load_exceptions(_repo_path(spec.compliance.exceptions), known_controls=control_ids())
        result: Report = evaluate(
            evidence, CATALOGUE, exceptions, now=now, config=ControlConfig.from_spec(spec),
            previous_report_json=latest_report_json(store),
        )
        stored = store_report(store, result)
        errors = result.open_findings("ERROR")
        return dg.MaterializeResult(
            metadata={
                "evidence": evidence.source,
                "overall_score": dg.MetadataValue.float(round(result.overall_score or 0.0, 4)),
                "open_errors": dg.MetadataValue.int(len(errors)),
                "open_warnings": dg.MetadataValue.int(len(result.open_findings("WARN"))),
                "report": dg.MetadataValue.md(result.to_markdown()),
                "json_url": dg.MetadataValue.url(stored.json_url),
                "html_url": dg.MetadataValue.url(stored.html_url),
            }
        )

    return [report]


def build_compliance_checks(spec: Spec) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(asset=REPORT_KEY, name=NO_ERROR_FINDINGS,
                    description="The latest report has no open (unexcepted) ERROR finding.")
    def no_errors(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(REPORT_KEY)
        if event is None or event.asset_materialization is None:
            return dg.AssetCheckResult(passed=False, description="no compliance report yet")
        open_errors = int(event.asset_materialization.metadata["open_errors"].value)  # type: ignore[arg-type]
        return dg.AssetCheckResult(
            passed=open_errors == 0,
            description=f"{open_errors} open ERROR finding(s); see the report's metadata",
            metadata={"open_errors": open_errors},
        )

    return [no_errors]
