"""Renew certificates through cert-manager and follow them until they are served.

:func:`certificates_to_renew` picks, from an inventory, what is inside its
renewal window or failing. :func:`renew` then, for each cert-manager
Certificate, does what ``cmctl renew`` does: set the condition
``Issuing=True`` (reason ``ManuallyTriggered``, message ``Certificate
re-issuance manually triggered``, ``observedGeneration`` the object's
generation, ``lastTransitionTime`` now unless Issuing was already True) on the
status subresource, which cert-manager's trigger controller reads as a
request to issue. cmctl sends the whole object with ``UpdateStatus``; we send
the whole conditions list as a merge patch of the status, which stores the
same conditions without needing the object's resourceVersion. It then waits
for a new ``status.revision`` with ``Ready=True``, reads the new certificate
from the Secret, and probes every endpoint whose host the certificate names
until that certificate is the one served. Every wait is bounded.

Certificates cert-manager does not manage (plain TLS Secrets, endpoints
serving a certificate stored elsewhere) are reported with what the operator
must do. With ``dry_run`` nothing is patched: each row says what would be done.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from ops_platform.certificates.inventory import (
    CERT_MANAGER_API,
    CHECK_ISSUANCE,
    CHECK_SANS_COVER_HOST,
    CHECK_SERVED_IS_STORED,
    Clock,
    Inventory,
    InventoryRow,
    Source,
    utc_now,
)
from ops_platform.certificates.probe import ProbeResult
from ops_platform.certificates.x509_info import CertificateInfo, CertificateParseError, parse_pem_chain
from ops_platform.errors import OpsPlatformError
from ops_platform.resources.kubernetes import CLUSTER_SETTING, Condition, WaitTimeout

if TYPE_CHECKING:
    from ops_platform.resources.kubernetes import KubernetesClient

ISSUING_REASON = "ManuallyTriggered"
ISSUING_MESSAGE = "Certificate re-issuance manually triggered"

Action = Literal["renewed", "would renew", "failed", "manual"]
Probe = Callable[[str], ProbeResult]


@dataclass(frozen=True)
class RenewalResult:
    source: Source
    name: str
    action: Action
    detail: str
    revision_before: int | None = None
    revision_after: int | None = None
    fingerprint_before: str | None = None
    fingerprint_after: str | None = None
    not_after: datetime | None = None
    served: tuple[str, ...] = ()
    """Endpoints seen serving the new certificate."""
    not_served: tuple[str, ...] = ()
    """Endpoints still serving something else when the wait ended."""
    seconds: float = 0.0


@dataclass(frozen=True)
class RenewalReport:
    results: list[RenewalResult]
    dry_run: bool

    @property
    def failed(self) -> list[RenewalResult]:
        return [r for r in self.results if r.action == "failed"]

    @property
    def manual(self) -> list[RenewalResult]:
        return [r for r in self.results if r.action == "manual"]

    def table_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "certificate": f"{r.source} {r.name}",
                "action": r.action,
                "revision": _revisions(r),
                "not after": f"{r.not_after:%Y-%m-%d %H:%M}" if r.not_after else "",
                "served at": ", ".join(r.served),
                "seconds": round(r.seconds, 1),
                "detail": r.detail,
            }
            for r in self.results
        ]


def certificates_to_renew(inventory: Inventory) -> list[InventoryRow]:
    """Rows inside their renewal window or failing, once per certificate.

    cert-manager Certificates: ``renew_before_days`` or less left, not Ready,
    failed issuance attempts, Ready on an expired certificate, or a Secret
    that no longer names the spec's hosts. Plain Secrets: inside the window.
    Endpoints: inside the window with no stored certificate of the cluster
    behind them, or serving something other than the stored certificate.
    """
    chosen: list[InventoryRow] = []
    cert_manager_names = {row.name for row in inventory.rows if row.source == "cert-manager"}
    for row in inventory.rows:
        in_window = row.days_left is None or row.days_left < inventory.renew_before_days
        if row.source == "cert-manager":
            failing = any(f.check in (CHECK_ISSUANCE, CHECK_SERVED_IS_STORED, CHECK_SANS_COVER_HOST)
                          for f in row.findings)
            if in_window or failing:
                chosen.append(row)
        elif row.source == "secret":
            if in_window:
                chosen.append(row)
        elif row.leaf is not None:
            stale = row.served_is_stored is False
            behind_cert_manager = any(name in cert_manager_names for name in row.stored)
            if stale or (in_window and not behind_cert_manager):
                chosen.append(row)
    return chosen


def renew(
    kube: KubernetesClient | None,
    certificates_to_renew: Sequence[InventoryRow],
    *,
    dry_run: bool,
    clock: Clock = utc_now,
    wait_timeout: float = 300.0,
    probe: Probe,
    serve_timeout: float | None = None,
    poll_interval: float = 1.0,
) -> RenewalReport:
    """Renew each row (see the module docstring); one failure never stops the others.

    ``wait_timeout``: seconds for cert-manager to issue (new revision and
    Ready). ``serve_timeout`` (default ``wait_timeout``): seconds for the
    endpoints to serve the new certificate, probed every ``poll_interval``.
    ``probe``: how to look at an endpoint, e.g.
    ``functools.partial(probe_endpoint, timeout=5)``.
    """
    results = []
    for row in certificates_to_renew:
        started = time.monotonic()
        if row.source == "cert-manager":
            result = _renew_cert_manager(
                kube, row, dry_run=dry_run, clock=clock, wait_timeout=wait_timeout, probe=probe,
                serve_timeout=wait_timeout if serve_timeout is None else serve_timeout,
                poll_interval=poll_interval,
            )
        else:
            result = _manual(row)
        results.append(_timed(result, started))
    return RenewalReport(results, dry_run)


def issuing_conditions(certificate: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """The status conditions after setting Issuing=True, as cmctl's SetCertificateCondition does."""
    conditions = [dict(c) for c in (certificate.get("status") or {}).get("conditions") or []]
    issuing = {
        "type": "Issuing",
        "status": "True",
        "reason": ISSUING_REASON,
        "message": ISSUING_MESSAGE,
        "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "observedGeneration": certificate["metadata"].get("generation"),
    }
    for index, condition in enumerate(conditions):
        if condition.get("type") == "Issuing":
            if condition.get("status") == "True" and condition.get("lastTransitionTime"):
                issuing["lastTransitionTime"] = condition["lastTransitionTime"]
            conditions[index] = issuing
            return conditions
    return conditions + [issuing]


def _renew_cert_manager(
    kube: KubernetesClient | None,
    row: InventoryRow,
    *,
    dry_run: bool,
    clock: Clock,
    wait_timeout: float,
    probe: Probe,
    serve_timeout: float,
    poll_interval: float,
) -> RenewalResult:
    namespace, name = row.name.split("/", 1)
    fingerprint_before = row.leaf.fingerprint_sha256 if row.leaf else None
    base = RenewalResult("cert-manager", row.name, "failed", "", fingerprint_before=fingerprint_before)
    if kube is None:
        return _with(base, detail=f"no Kubernetes cluster is configured ({CLUSTER_SETTING})")
    try:
        certificate = kube.get(CERT_MANAGER_API, "Certificate", name, namespace)
        if certificate is None:
            return _with(base, detail=f"Certificate {row.name} no longer exists")
        status = certificate.get("status") or {}
        revision = status.get("revision")
        base = _with(base, revision_before=revision)
        plan = _plan(row, revision, wait_timeout, serve_timeout)
        if dry_run:
            return _with(base, action="would renew", detail=f"would {plan}")
        triggered_at = clock().replace(microsecond=0)
        kube.patch_status(CERT_MANAGER_API, "Certificate", name, namespace,
                          {"conditions": issuing_conditions(certificate, triggered_at)})
        issued = kube.wait_for(CERT_MANAGER_API, "Certificate", name, namespace,
                               _issued_or_failed(revision, status), timeout=wait_timeout)
    except WaitTimeout as exc:
        return _with(base, detail=f"{exc} (see `kubectl describe certificaterequest -n {namespace}`)")
    except OpsPlatformError as exc:
        return _with(base, detail=str(exc))
    assert issued is not None
    new_status = issued.get("status") or {}
    base = _with(base, revision_after=new_status.get("revision"))
    if not _has_new_revision(issued, revision):
        return _with(base, detail=f"cert-manager failed to issue: {_failure(issued)}")
    try:
        leaf = _secret_leaf(kube, namespace, (issued.get("spec") or {}).get("secretName", ""))
    except (OpsPlatformError, CertificateParseError) as exc:
        return _with(base, detail=f"revision {base.revision_after} is Ready but its Secret cannot be read: {exc}")
    base = _with(base, fingerprint_after=leaf.fingerprint_sha256, not_after=leaf.not_after)
    if leaf.fingerprint_sha256 == fingerprint_before:
        return _with(base, detail=f"revision {base.revision_after} is Ready but the Secret still holds the old certificate")
    served, waiting = _wait_until_served(row.endpoints, leaf, probe, serve_timeout, poll_interval)
    if waiting:
        return _with(base, served=served, not_served=tuple(waiting),
                     detail="issued, but after "
                     f"{serve_timeout:g} s " + "; ".join(waiting.values())
                     + " (reload the ingress / gateway that serves it)")
    where = f"; served at {', '.join(served)}" if served else "; no endpoint of the spec names it"
    return _with(base, action="renewed", served=served,
                 detail=f"revision {base.revision_after} issued, not after {leaf.not_after:%Y-%m-%d}{where}")


def _plan(row: InventoryRow, revision: int | None, wait_timeout: float, serve_timeout: float) -> str:
    next_revision = (revision or 0) + 1
    plan = (f"set Issuing=True ({ISSUING_REASON}) on the status of Certificate {row.name}, wait up to "
            f"{wait_timeout:g} s for revision {next_revision} and Ready=True")
    if row.endpoints:
        plan += f", then up to {serve_timeout:g} s until {', '.join(row.endpoints)} serve the new certificate"
    return plan


def _issued_or_failed(revision: int | None, status: dict[str, Any]) -> Condition:
    failures_before = _failed_attempts({"status": status})

    def holds(obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        return _has_new_revision(obj, revision) or _failed_attempts(obj) > failures_before

    return Condition(f"reach a revision after {revision} with Ready=True, or report a failed issuance", holds)


def _has_new_revision(obj: dict[str, Any], revision: int | None) -> bool:
    status = obj.get("status") or {}
    new = status.get("revision")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ready and new is not None and (revision is None or new > revision)


def _failed_attempts(obj: dict[str, Any]) -> int:
    """cert-manager counts each failed issuance here (and resets it to 0 on success)."""
    return int((obj.get("status") or {}).get("failedIssuanceAttempts") or 0)


def _failure(obj: dict[str, Any]) -> str:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Issuing" and condition.get("status") == "False":
            return f"{condition.get('reason')}: {condition.get('message')}"
    attempts = (obj.get("status") or {}).get("failedIssuanceAttempts")
    return f"{attempts} failed issuance attempt(s)"


def _secret_leaf(kube: KubernetesClient, namespace: str, secret_name: str) -> CertificateInfo:
    secret = kube.get("v1", "Secret", secret_name, namespace)
    if secret is None:
        raise CertificateParseError(f"Secret {namespace}/{secret_name} does not exist")
    encoded = (secret.get("data") or {}).get("tls.crt") or ""
    chain = parse_pem_chain(base64.b64decode(encoded), what=f"tls.crt of Secret {namespace}/{secret_name}")
    if not chain:
        raise CertificateParseError(f"Secret {namespace}/{secret_name} has an empty tls.crt")
    return chain[0]


def _wait_until_served(
    endpoints: Sequence[str], leaf: CertificateInfo, probe: Probe, timeout: float, poll_interval: float
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Probe until each endpoint serves ``leaf``; returns (served, {endpoint: what it still serves})."""
    deadline = time.monotonic() + timeout
    waiting = {endpoint: "not probed yet" for endpoint in endpoints}
    served: list[str] = []
    while waiting:
        for endpoint in list(waiting):
            result = probe(endpoint)
            if result.leaf is not None and result.leaf.fingerprint_sha256 == leaf.fingerprint_sha256:
                served.append(endpoint)
                del waiting[endpoint]
            elif result.leaf is not None:
                waiting[endpoint] = (f"{endpoint} still serves sha256 {result.leaf.fingerprint_sha256[:16]} "
                                     f"(not after {result.leaf.not_after:%Y-%m-%d})")
            else:
                waiting[endpoint] = f"{endpoint}: {result.error}"
        if not waiting or time.monotonic() + poll_interval > deadline:
            break
        time.sleep(poll_interval)
    return tuple(served), waiting


def _manual(row: InventoryRow) -> RenewalResult:
    leaf = row.leaf
    base = RenewalResult(row.source, row.name, "manual", "",
                         fingerprint_before=leaf.fingerprint_sha256 if leaf else None,
                         not_after=row.not_after)
    names = ", ".join(leaf.sans) if leaf and leaf.sans else "its hosts"
    if row.source == "secret":
        namespace, name = row.name.split("/", 1)
        return _with(base, detail=(
            f"Secret {row.name} is not managed by cert-manager: issue a new certificate for {names} and "
            f"replace tls.crt and tls.key (`kubectl create secret tls {name} -n {namespace} --cert=NEW.crt "
            f"--key=NEW.key --dry-run=client -o yaml | kubectl apply -f -`), or create a cert-manager "
            f"Certificate with spec.secretName: {name} so it is renewed from now on"))
    if row.served_is_stored is False:
        return _with(base, detail=(
            f"{row.name} serves another certificate than the one stored in {', '.join(row.stored)}: make the "
            "ingress controller or gateway serving it reload its TLS Secret (or fix the Secret it references)"))
    issuer = leaf.issuer if leaf else "unknown"
    return _with(base, detail=(
        f"{row.name} serves a certificate (issuer {issuer}) that is not stored in this cluster: renew it "
        "where it is issued (the load balancer's or CDN's certificate, e.g. in AWS ACM) and check that "
        "the listener serves the new one"))


def _revisions(result: RenewalResult) -> str:
    if result.revision_before is None and result.revision_after is None:
        return ""
    after = f" → {result.revision_after}" if result.revision_after is not None else ""
    return f"{result.revision_before}{after}"


def _with(result: RenewalResult, **changes: Any) -> RenewalResult:
    return replace(result, **changes)


def _timed(result: RenewalResult, started: float) -> RenewalResult:
    return _with(result, seconds=time.monotonic() - started)
