"""`certificates/inventory` (with one check per certificate rule) and `certificates/renewals`."""

import json
import os
from datetime import UTC, datetime
from functools import partial

import dagster as dg

from ops_platform.certificates.checks import CHECKS
from ops_platform.environment import dry_run_requested
from ops_platform.errors import MissingSettingError
from ops_platform.metadata import table
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.spec import Spec

CERTIFICATES_GROUP = "certificates"
INVENTORY_KEY = dg.AssetKey(["certificates", "inventory"])
RENEWALS_KEY = dg.AssetKey(["certificates", "renewals"])
TRUST_ROOTS_SETTING = "OPS_TRUST_ROOTS"  # extra PEM files (a private CA), separated by ':'
PROBE_TIMEOUT_SECONDS = 5.0


class RenewalConfig(dg.Config):
    dry_run: bool | None = None  # unset: OPS_DRY_RUN
    wait_timeout_seconds: float = 600.0


def _cluster(kubernetes: KubernetesResource, log: object) -> KubernetesClient | None:
    """The cluster, or None when none is configured: endpoints are still inventoried."""
    try:
        return kubernetes.get_client()
    except MissingSettingError as missing:
        log.warning(f"certificates: no cluster, endpoints only ({missing})")  # type: ignore[attr-defined]
        return None


def take_inventory(spec: Spec, kube: KubernetesClient | None):
    # x509 and TLS code is imported when an inventory is taken, not when the code location loads.
    from ops_platform.certificates.inventory import build_inventory
    from ops_platform.certificates.x509_info import load_trust_roots

    extra = [path for path in os.environ.get(TRUST_ROOTS_SETTING, "").split(":") if path]
    return build_inventory(
        kube,
        spec.certificates.endpoints,
        clock=lambda: datetime.now(UTC),
        probe_timeout=PROBE_TIMEOUT_SECONDS,
        trust_roots=load_trust_roots(extra),
        renew_before_days=spec.certificates.renew_before_days,
        fail_below_days=spec.certificates.fail_below_days,
    )


def build_certificate_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    @dg.asset(
        key=INVENTORY_KEY,
        group_name=CERTIFICATES_GROUP,
        kinds={"kubernetes", "tls"},
        owners=[spec.platform.owner],
        description=(
            "Every certificate the platform serves or stores: cert-manager Certificates, "
            "kubernetes.io/tls Secrets and the spec's TLS endpoints, sorted by days left."
        ),
    )
    def inventory(context: dg.AssetExecutionContext, kubernetes: KubernetesResource) -> dg.MaterializeResult:
        result = take_inventory(spec, _cluster(kubernetes, context.log))
        findings = {
            check: [{"severity": f.severity, "subject": f.subject, "message": f.message}
                    for f in result.findings(check)]
            for check in CHECKS
        }
        return dg.MaterializeResult(
            metadata={
                "certificates": dg.MetadataValue.int(len(result.rows)),
                "inventory": table(result.table_rows()),
                "notes": "\n".join(result.notes) or "none",
                "findings": dg.MetadataValue.json(findings),
                "days_left": dg.MetadataValue.json(
                    [{"name": row.name, "days_left": row.days_left} for row in result.rows
                     if row.days_left is not None]
                ),
            }
        )

    @dg.asset(
        key=RENEWALS_KEY,
        deps=[INVENTORY_KEY],
        group_name=CERTIFICATES_GROUP,
        kinds={"kubernetes", "tls"},
        owners=[spec.platform.owner],
        description=(
            "Re-issues cert-manager Certificates inside their renewal window or failing (as `cmctl renew` "
            "does), waits for the new revision and until the endpoint serves it; reports what cert-manager "
            "does not manage. Honours dry run."
        ),
    )
    def renewals(
        context: dg.AssetExecutionContext, config: RenewalConfig, kubernetes: KubernetesResource
    ) -> dg.MaterializeResult:
        from ops_platform.certificates.probe import probe_endpoint
        from ops_platform.certificates.renewal import certificates_to_renew, renew

        kube = kubernetes.get_client()
        dry_run = dry_run_requested(config.dry_run)
        due = certificates_to_renew(take_inventory(spec, kube))
        report = renew(
            kube, due, dry_run=dry_run, clock=lambda: datetime.now(UTC),
            wait_timeout=config.wait_timeout_seconds,
            probe=partial(probe_endpoint, timeout=PROBE_TIMEOUT_SECONDS),
        )
        metadata = {"dry_run": dry_run, "due": len(due), "renewals": table(report.table_rows())}
        if report.failed:
            raise dg.Failure(
                f"{len(report.failed)} certificate renewal(s) failed: "
                + "; ".join(f"{r.name}: {r.detail}" for r in report.failed),
                metadata=metadata,
            )
        return dg.MaterializeResult(metadata=metadata)

    return [inventory, renewals]


def build_certificate_checks(spec: Spec) -> list[dg.AssetChecksDefinition]:
    return [_finding_check(check) for check in CHECKS]


def _finding_check(check: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=INVENTORY_KEY, name=check,
                    description=f"No '{check}' finding in the latest certificate inventory.")
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(INVENTORY_KEY)
        if event is None or event.asset_materialization is None:
            return dg.AssetCheckResult(passed=False, description="no inventory has been taken")
        findings = event.asset_materialization.metadata["findings"].value.get(check, [])  # type: ignore[union-attr]
        errors = [f for f in findings if f["severity"] == "ERROR"]
        return dg.AssetCheckResult(
            passed=not findings,
            severity=dg.AssetCheckSeverity.ERROR if errors else dg.AssetCheckSeverity.WARN,
            description="; ".join(f"{f['subject']}: {f['message']}" for f in findings)[:2000] or "no findings",
            metadata={"errors": len(errors), "warnings": len(findings) - len(errors),
                      "findings": dg.MetadataValue.json(json.loads(json.dumps(findings)))},
        )

    return _check
