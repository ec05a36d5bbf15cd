"""`certificates/inventory`, whose run judges every certificate rule (one check each), and
`certificates/renewals`."""

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import dagster as dg

from ops_platform.assets.failures import failure, known_errors, prefixed
from ops_platform.certificates.checks import CHECK_DESCRIPTIONS, CHECK_EXPIRY, CHECKS
from ops_platform.environment import dry_run_requested
from ops_platform.errors import MissingSettingError, OpsPlatformError
from ops_platform.metadata import table
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.spec import Spec

if TYPE_CHECKING:
    from ops_platform.certificates.inventory import Finding, Inventory

CERTIFICATES_GROUP = "certificates"
INVENTORY_KEY = dg.AssetKey(["certificates", "inventory"])
RENEWALS_KEY = dg.AssetKey(["certificates", "renewals"])
TRUST_ROOTS_SETTING = "OPS_TRUST_ROOTS"  # extra PEM files (a private CA), separated by ':'
PROBE_TIMEOUT_SECONDS = 5.0
VALIDITY_METADATA = "certificates"
"""Metadata of the `expiry` check: every certificate's name, days_left, not_before and not_after.
Only an inventory that was taken carries it (a failed one yields its checks without it)."""
INVENTORY_FAILED = "certificate inventory failed"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


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


def take_inventory(spec: Spec, kube: KubernetesClient | None, clock: Clock = utc_now) -> "Inventory":
    # x509 and TLS code is imported when an inventory is taken, not when the code location loads.
    from ops_platform.certificates.inventory import build_inventory
    from ops_platform.certificates.x509_info import load_trust_roots

    extra = [path for path in os.environ.get(TRUST_ROOTS_SETTING, "").split(":") if path]
    return build_inventory(
        kube,
        spec.certificates.endpoints,
        clock=clock,
        probe_timeout=PROBE_TIMEOUT_SECONDS,
        trust_roots=load_trust_roots(extra),
        renew_before_days=spec.certificates.renew_before_days,
        fail_below_days=spec.certificates.fail_below_days,
    )


def inventory_check_results(inventory: "Inventory") -> list[dg.AssetCheckResult]:
    """Every certificate check, judged from this inventory's findings (ERROR if any ERROR finding, else WARN)."""
    results = []
    for check in CHECKS:
        findings = inventory.findings(check)
        errors = sum(1 for finding in findings if finding.severity == "ERROR")
        metadata: dict[str, dg.MetadataValue] = {
            "errors": dg.MetadataValue.int(errors),
            "warnings": dg.MetadataValue.int(len(findings) - errors),
            "findings": _findings_table(findings),
        }
        if check == CHECK_EXPIRY:
            metadata[VALIDITY_METADATA] = _validity_table(inventory)
            metadata["checked_at"] = dg.MetadataValue.timestamp(inventory.checked_at.timestamp())
        results.append(dg.AssetCheckResult(
            check_name=check,
            passed=not findings,
            severity=dg.AssetCheckSeverity.ERROR if errors else dg.AssetCheckSeverity.WARN,
            description=("; ".join(f"{f.subject}: {f.message}" for f in findings)[:2000]
                         or f"no finding in {len(inventory.rows)} certificate(s)"),
            metadata=metadata,
        ))
    return results


def inventory_not_taken(reason: str) -> Iterator[dg.AssetCheckResult]:
    """Every certificate check failed with the reason: a run that took no inventory proves nothing."""
    for check in CHECKS:
        yield dg.AssetCheckResult(check_name=check, passed=False, description=f"not judged: {reason}")


def _findings_table(findings: "list[Finding]") -> dg.MetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"severity": f.severity, "subject": f.subject, "message": f.message})
                 for f in findings],
        schema=dg.TableSchema(columns=[dg.TableColumn("severity"), dg.TableColumn("subject"),
                                       dg.TableColumn("message")]),
    )


def _validity_table(inventory: "Inventory") -> dg.MetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord(row) for row in inventory.validity_rows()],
        schema=dg.TableSchema(columns=[
            dg.TableColumn("name"),
            dg.TableColumn("source"),
            dg.TableColumn("days_left", "float", description="days until notAfter; empty: unknown"),
            dg.TableColumn("not_before", description="ISO 8601, UTC"),
            dg.TableColumn("not_after", description="ISO 8601, UTC"),
        ]),
    )


def build_certificate_assets(spec: Spec, *, clock: Clock = utc_now) -> list[dg.AssetsDefinition]:
    @dg.asset(
        key=INVENTORY_KEY,
        group_name=CERTIFICATES_GROUP,
        kinds={"kubernetes", "tls"},
        owners=[spec.platform.owner],
        check_specs=[dg.AssetCheckSpec(check, asset=INVENTORY_KEY, description=CHECK_DESCRIPTIONS[check])
                     for check in CHECKS],
        description=(
            "Every certificate the platform serves or stores: cert-manager Certificates, "
            "kubernetes.io/tls Secrets and the spec's TLS endpoints, sorted by days left. Each run judges "
            "its own inventory (one check per rule); a run that cannot take it fails every check."
        ),
    )
    def inventory(context: dg.AssetExecutionContext, kubernetes: KubernetesResource):
        try:
            result = take_inventory(spec, _cluster(kubernetes, context.log), clock)
        except OpsPlatformError as error:
            yield from inventory_not_taken(prefixed(INVENTORY_FAILED, str(error)))
            raise failure(INVENTORY_FAILED, error) from None
        yield dg.MaterializeResult(
            metadata={
                "certificates": dg.MetadataValue.int(len(result.rows)),
                "checked_at": dg.MetadataValue.timestamp(result.checked_at.timestamp()),
                "inventory": table(result.table_rows()),
                "notes": "\n".join(result.notes) or "none",
            },
            check_results=inventory_check_results(result),
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

        dry_run = dry_run_requested(config.dry_run)
        with known_errors("certificate renewals failed"):
            kube = kubernetes.get_client()
            due = certificates_to_renew(take_inventory(spec, kube, clock))
            report = renew(
                kube, due, dry_run=dry_run, clock=clock,
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
