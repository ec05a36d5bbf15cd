"""Every certificate the platform stores or serves, with its findings.

:func:`build_inventory` collects three sources:

- cert-manager ``Certificate`` objects (``cert-manager.io/v1``) in every
  namespace, read together with the Secret they write (``spec.secretName``);
- ``kubernetes.io/tls`` Secrets no Certificate owns;
- the live endpoints of the spec (``certificates.endpoints``): the chain each
  one serves, linked to the stored certificate for its host.

Each :class:`InventoryRow` carries :class:`Finding` s, one check name each
(:data:`CHECKS`), so the asset layer can turn every check into an asset
check. The truth about a certificate is the certificate itself: its validity
(notBefore and notAfter) is read from the x509 in the Secret, never only from
``status.notBefore`` / ``status.notAfter``, since cert-manager can keep
``Ready=True`` on an expired certificate (cert-manager issue 7895).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from ops_platform.certificates.probe import ProbeResult, probe_many, split_endpoint
from ops_platform.certificates.x509_info import (
    CertificateInfo,
    CertificateParseError,
    ChainVerification,
    key_policy_problem,
    load_trust_roots,
    names_cover,
    parse_pem_chain,
    sans_cover,
    verify_chain,
)
from ops_platform.resources.kubernetes import CLUSTER_SETTING, KubernetesError

if TYPE_CHECKING:
    from ops_platform.resources.kubernetes import KubernetesClient

CERT_MANAGER_API = "cert-manager.io/v1"
TLS_SECRET_TYPE = "kubernetes.io/tls"

from ops_platform.certificates.checks import (  # noqa: E402  (re-exported)
    CHECK_CHAIN_VERIFIES,
    CHECK_ENDPOINT_REACHABLE,
    CHECK_EXPIRY,
    CHECK_ISSUANCE,
    CHECK_KEY_POLICY,
    CHECK_SANS_COVER_HOST,
    CHECK_SERVED_IS_STORED,
    CHECKS,
)

Severity = Literal["ERROR", "WARN"]
Source = Literal["cert-manager", "secret", "endpoint"]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Finding:
    check: str
    severity: Severity
    subject: str
    """The row it is about: ``namespace/name`` or ``host:port``."""
    message: str


@dataclass(frozen=True)
class CertManagerStatus:
    """What a cert-manager Certificate says about itself (spec and status)."""

    secret_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    ready: str | None
    ready_reason: str | None
    ready_message: str | None
    issuing: bool
    not_before: datetime | None
    not_after: datetime | None
    renewal_time: datetime | None
    revision: int | None
    failed_issuance_attempts: int
    last_failure_time: datetime | None
    issuer: str


@dataclass
class InventoryRow:
    source: Source
    name: str
    """``namespace/name`` for cluster objects, ``host:port`` for endpoints."""
    chain: tuple[CertificateInfo, ...] = ()
    """Leaf first: ``tls.crt`` of a Secret, or the chain an endpoint served."""
    ca: tuple[CertificateInfo, ...] = ()
    """``ca.crt`` of a Secret: used to build the path, never trusted for it."""
    secret: str | None = None
    endpoints: tuple[str, ...] = ()
    """Stored rows: the spec endpoints whose host this certificate names."""
    stored: tuple[str, ...] = ()
    """Endpoint rows: the stored rows whose certificate names this host."""
    served_is_stored: bool | None = None
    chain_as_sent: bool = True
    cert_manager: CertManagerStatus | None = None
    chain_verification: ChainVerification | None = None
    days_left: float | None = None
    error: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def leaf(self) -> CertificateInfo | None:
        return self.chain[0] if self.chain else None

    @property
    def not_before(self) -> datetime | None:
        if self.leaf is not None:
            return self.leaf.not_before
        return self.cert_manager.not_before if self.cert_manager else None

    @property
    def not_after(self) -> datetime | None:
        if self.leaf is not None:
            return self.leaf.not_after
        return self.cert_manager.not_after if self.cert_manager else None

    @property
    def host(self) -> str | None:
        return split_endpoint(self.name)[0] if self.source == "endpoint" else None

    @property
    def severity(self) -> Severity | None:
        severities = {finding.severity for finding in self.findings}
        return "ERROR" if "ERROR" in severities else ("WARN" if severities else None)

    def add(self, check: str, severity: Severity, message: str) -> None:
        self.findings.append(Finding(check, severity, self.name, message))


@dataclass
class Inventory:
    rows: list[InventoryRow]
    notes: list[str]
    checked_at: datetime
    renew_before_days: int
    fail_below_days: int

    def findings(self, check: str | None = None) -> list[Finding]:
        return [f for row in self.rows for f in row.findings if check is None or f.check == check]

    def row(self, name: str, source: Source | None = None) -> InventoryRow | None:
        return next((r for r in self.rows if r.name == name and source in (None, r.source)), None)

    def table_rows(self) -> list[dict[str, Any]]:
        """One dict per row, for the Markdown table of the asset (already sorted by days left)."""
        return [_table_row(row) for row in self.rows]

    def validity_rows(self) -> list[dict[str, Any]]:
        """Per certificate: name, source, days left and validity window (ISO 8601 UTC; None: unknown)."""
        return [
            {
                "name": row.name,
                "source": row.source,
                "days_left": None if row.days_left is None else round(row.days_left, 3),
                "not_before": row.not_before.isoformat() if row.not_before else None,
                "not_after": row.not_after.isoformat() if row.not_after else None,
            }
            for row in self.rows
        ]


def build_inventory(
    kube: KubernetesClient | None,
    endpoints: Sequence[str],
    *,
    clock: Clock = utc_now,
    probe_timeout: float = 5.0,
    concurrency: int = 20,
    trust_roots: Sequence[CertificateInfo] | None = None,
    renew_before_days: int = 21,
    fail_below_days: int = 14,
    resolve: Mapping[str, str] | None = None,
) -> Inventory:
    """Collect, link and check every certificate; rows sorted by days left (unknown first).

    ``kube`` None: no cluster is configured, only the endpoints are inspected.
    ``trust_roots`` None: the system trust store (:func:`load_trust_roots`).
    ``resolve`` maps endpoint hosts to the address to connect to (see
    :func:`~ops_platform.certificates.probe.probe_endpoint`).
    A cluster that does not answer raises
    :class:`~ops_platform.errors.ServerUnreachableError`; an endpoint that
    does not answer is a finding and the scan goes on.
    """
    now = clock()
    notes: list[str] = []
    roots = list(trust_roots) if trust_roots is not None else load_trust_roots()
    if not roots:
        notes.append("no trust roots: every chain is reported as not verifying")
    stored = _stored_rows(kube, notes)
    probes = probe_many(list(endpoints), concurrency=concurrency, timeout=probe_timeout, resolve=resolve)
    served = [_endpoint_row(result) for result in probes]
    _link(stored, served)
    verify = _cached_verify(roots, now)
    for row in stored + served:
        _check(row, now, verify, renew_before_days, fail_below_days, stored)
    rows = sorted(stored + served, key=_by_days_left)
    return Inventory(rows, notes, now, renew_before_days, fail_below_days)


def _stored_rows(kube: KubernetesClient | None, notes: list[str]) -> list[InventoryRow]:
    if kube is None:
        notes.append(
            f"no Kubernetes cluster is configured ({CLUSTER_SETTING}): only the endpoints are inventoried"
        )
        return []
    secrets = {
        _key(secret): secret
        for secret in kube.list("v1", "Secret", field_selector=f"type={TLS_SECRET_TYPE}")
    }
    rows: list[InventoryRow] = []
    try:
        kube.kind(CERT_MANAGER_API, "Certificate")
    except KubernetesError:
        notes.append(
            f"cert-manager is not installed in the cluster at {kube.host} (no Certificate kind in "
            f"{CERT_MANAGER_API}): only TLS Secrets and endpoints are inventoried"
        )
    else:
        for certificate in kube.list(CERT_MANAGER_API, "Certificate"):
            namespace = certificate["metadata"].get("namespace")
            secret_name = (certificate.get("spec") or {}).get("secretName", "")
            rows.append(_cert_manager_row(certificate, secrets.pop((namespace, secret_name), None)))
    rows += [_secret_row(secret) for secret in secrets.values()]
    return rows


def _cert_manager_row(certificate: dict[str, Any], secret: dict[str, Any] | None) -> InventoryRow:
    metadata = certificate["metadata"]
    status = _cert_manager_status(certificate)
    namespace = metadata.get("namespace")
    row = InventoryRow("cert-manager", f"{namespace}/{metadata['name']}", cert_manager=status,
                       secret=f"{namespace}/{status.secret_name}")
    if secret is None:
        row.error = f"its Secret {row.secret} does not exist (or is not of type {TLS_SECRET_TYPE})"
        return row
    return _with_secret_chain(row, secret)


def _secret_row(secret: dict[str, Any]) -> InventoryRow:
    namespace, name = _key(secret)
    return _with_secret_chain(InventoryRow("secret", f"{namespace}/{name}", secret=f"{namespace}/{name}"), secret)


def _with_secret_chain(row: InventoryRow, secret: dict[str, Any]) -> InventoryRow:
    data = secret.get("data") or {}
    try:
        row.chain = tuple(_pem_field(data, "tls.crt", row.secret))
        row.ca = tuple(_pem_field(data, "ca.crt", row.secret)) if data.get("ca.crt") else ()
    except CertificateParseError as exc:
        row.error = str(exc)
    if not row.chain and row.error is None:
        row.error = f"Secret {row.secret} has an empty tls.crt"
    return row


def _pem_field(data: dict[str, str], key: str, secret: str | None) -> list[CertificateInfo]:
    what = f"{key} of Secret {secret}"
    if not data.get(key):
        return []
    try:
        raw = base64.b64decode(data[key], validate=True)
    except (binascii.Error, ValueError):
        raise CertificateParseError(f"{what} is not base64") from None
    return parse_pem_chain(raw, what=what)


def _endpoint_row(result: ProbeResult) -> InventoryRow:
    return InventoryRow("endpoint", result.endpoint, chain=result.chain,
                        chain_as_sent=result.chain_as_sent, error=result.error)


def _link(stored: list[InventoryRow], served: list[InventoryRow]) -> None:
    """Tie each endpoint to the stored certificates for its host, by names and by fingerprint."""
    for endpoint in served:
        host = endpoint.host or ""
        names_host = [row for row in stored if _stored_names_cover(row, host)]
        fingerprint = endpoint.leaf.fingerprint_sha256 if endpoint.leaf else None
        same = [row for row in stored if row.leaf and row.leaf.fingerprint_sha256 == fingerprint]
        linked = same + [row for row in names_host if all(row is not other for other in same)]
        endpoint.stored = tuple(row.name for row in linked)
        for row in linked:
            row.endpoints += (endpoint.name,)
        if endpoint.leaf is not None and linked:
            endpoint.served_is_stored = bool(same)


def _stored_names_cover(row: InventoryRow, host: str) -> bool:
    if row.cert_manager and names_cover(host, row.cert_manager.dns_names, row.cert_manager.ip_addresses):
        return True
    return row.leaf is not None and sans_cover(row.leaf, host)


Verify = Callable[[CertificateInfo, Sequence[CertificateInfo]], ChainVerification]


def _cached_verify(roots: Sequence[CertificateInfo], now: datetime) -> Verify:
    """verify_chain, once per distinct chain: many endpoints serve the same certificate."""
    done: dict[tuple[str, ...], ChainVerification] = {}

    def verify(leaf: CertificateInfo, intermediates: Sequence[CertificateInfo]) -> ChainVerification:
        key = tuple(cert.fingerprint_sha256 for cert in (leaf, *intermediates))
        if key not in done:
            done[key] = verify_chain(leaf, intermediates, roots, at=now)
        return done[key]

    return verify


def _check(
    row: InventoryRow,
    now: datetime,
    verify: Verify,
    renew_before_days: int,
    fail_below_days: int,
    stored: Sequence[InventoryRow],
) -> None:
    if row.error:
        check = CHECK_ENDPOINT_REACHABLE if row.source == "endpoint" else (
            CHECK_ISSUANCE if row.cert_manager else CHECK_EXPIRY)
        row.add(check, "ERROR", row.error)
    if row.not_after is not None:
        row.days_left = (row.not_after - now).total_seconds() / 86400
    _check_expiry(row, now, renew_before_days, fail_below_days)
    if row.cert_manager is not None:
        _check_cert_manager(row, now)
    if row.leaf is None:
        return
    problem = key_policy_problem(row.leaf)
    if problem:
        row.add(CHECK_KEY_POLICY, "ERROR", problem)
    _check_chain(row, verify, stored)
    if row.source == "endpoint":
        _check_served(row, stored)


def _check_expiry(row: InventoryRow, now: datetime, renew_before_days: int, fail_below_days: int) -> None:
    """Both ends of the validity window: clients refuse a certificate before its notBefore too."""
    read = "" if row.leaf else " (from the Certificate's status; the certificate itself could not be read)"
    if row.not_before is not None and now < row.not_before:
        days = (row.not_before - now).total_seconds() / 86400
        row.add(CHECK_EXPIRY, "ERROR",
                f"not valid until {row.not_before:%Y-%m-%d %H:%M} UTC, in {days:.1f} days (clients refuse it "
                f"until then; check the issuer's clock){read}")
    if row.not_after is None or row.days_left is None:
        return
    when = f"{row.not_after:%Y-%m-%d %H:%M} UTC"
    if row.not_after <= now:
        row.add(CHECK_EXPIRY, "ERROR", f"expired on {when}, {-row.days_left:.1f} days ago{read}")
    elif row.days_left < fail_below_days:
        row.add(CHECK_EXPIRY, "ERROR",
                f"expires on {when}, in {row.days_left:.1f} days (fail_below_days is {fail_below_days}){read}")
    elif row.days_left < renew_before_days:
        row.add(CHECK_EXPIRY, "WARN",
                f"expires on {when}, in {row.days_left:.1f} days (renew_before_days is {renew_before_days}){read}")


def _check_cert_manager(row: InventoryRow, now: datetime) -> None:
    status = row.cert_manager
    assert status is not None
    leaf = row.leaf
    if leaf is not None and status.ready == "True" and leaf.expired(now):
        row.add(CHECK_SERVED_IS_STORED, "ERROR",
                f"Ready=True although the certificate in Secret {row.secret} expired on "
                f"{leaf.not_after:%Y-%m-%d %H:%M} UTC (cert-manager does not re-check readiness at "
                "expiry, cert-manager issue 7895)")
    if leaf is not None and status.not_after is not None and status.not_after != leaf.not_after:
        row.add(CHECK_SERVED_IS_STORED, "WARN",
                f"status.notAfter {status.not_after:%Y-%m-%d %H:%M} UTC is not the notAfter of the "
                f"certificate in Secret {row.secret} ({leaf.not_after:%Y-%m-%d %H:%M} UTC)")
    if status.ready != "True":
        why = f" ({status.ready_reason}: {status.ready_message})" if status.ready_reason else ""
        row.add(CHECK_ISSUANCE, "WARN", f"Ready={status.ready or 'unknown'}{why}")
    if status.failed_issuance_attempts:
        when = f", last at {status.last_failure_time:%Y-%m-%d %H:%M} UTC" if status.last_failure_time else ""
        row.add(CHECK_ISSUANCE, "WARN",
                f"{status.failed_issuance_attempts} failed issuance attempt(s){when} "
                f"(see `kubectl describe certificaterequest -n {row.name.split('/')[0]}`)")
    if leaf is not None:
        missing = [name for name in status.dns_names + status.ip_addresses if not sans_cover(leaf, name)]
        if missing:
            row.add(CHECK_SANS_COVER_HOST, "ERROR",
                    f"the certificate in Secret {row.secret} does not name {', '.join(missing)} "
                    "from the Certificate's spec (the Secret is stale)")


def _check_chain(row: InventoryRow, verify: Verify, stored: Sequence[InventoryRow]) -> None:
    assert row.leaf is not None
    intermediates = list(row.chain[1:]) + list(row.ca)
    if row.source == "endpoint" and not row.chain_as_sent:
        twin = next((s for s in stored if s.leaf and s.leaf.fingerprint_sha256 == row.leaf.fingerprint_sha256), None)
        if twin is None:
            return  # only the leaf was read and no stored chain is known: nothing to judge
        intermediates = list(twin.chain[1:]) + list(twin.ca)
    verification = verify(row.leaf, intermediates)
    row.chain_verification = verification
    if not verification.ok:
        row.add(CHECK_CHAIN_VERIFIES, "ERROR", f"the chain does not verify: {verification.error}")
    elif verification.method == "signatures":
        row.add(CHECK_CHAIN_VERIFIES, "WARN",
                f"the chain verifies by signature only; the Web PKI profile rejects it: {verification.webpki_error}")


def _check_served(row: InventoryRow, stored: Sequence[InventoryRow]) -> None:
    leaf = row.leaf
    assert leaf is not None and row.host is not None
    if not sans_cover(leaf, row.host):
        names = ", ".join(leaf.sans) or "no subjectAltName"
        row.add(CHECK_SANS_COVER_HOST, "ERROR", f"the served certificate names {names}, not {row.host}")
    if row.served_is_stored is False:
        expected = [s for s in stored if s.name in row.stored and s.leaf is not None]
        described = "; ".join(
            f"{s.source} {s.name}: sha256 {s.leaf.fingerprint_sha256[:16]}, not after {s.leaf.not_after:%Y-%m-%d}"
            for s in expected if s.leaf
        ) or ", ".join(row.stored)
        row.add(CHECK_SERVED_IS_STORED, "ERROR",
                f"serves sha256 {leaf.fingerprint_sha256[:16]} (not after {leaf.not_after:%Y-%m-%d}), which is "
                f"not the stored certificate for {row.host} ({described}): the endpoint has not loaded it")


def _cert_manager_status(certificate: dict[str, Any]) -> CertManagerStatus:
    spec = certificate.get("spec") or {}
    status = certificate.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready") or {}
    issuer = spec.get("issuerRef") or {}
    return CertManagerStatus(
        secret_name=spec.get("secretName", ""),
        dns_names=tuple(spec.get("dnsNames") or ()),
        ip_addresses=tuple(spec.get("ipAddresses") or ()),
        ready=ready.get("status"),
        ready_reason=ready.get("reason"),
        ready_message=ready.get("message"),
        issuing=(conditions.get("Issuing") or {}).get("status") == "True",
        not_before=_timestamp(status.get("notBefore")),
        not_after=_timestamp(status.get("notAfter")),
        renewal_time=_timestamp(status.get("renewalTime")),
        revision=status.get("revision"),
        failed_issuance_attempts=int(status.get("failedIssuanceAttempts") or 0),
        last_failure_time=_timestamp(status.get("lastFailureTime")),
        issuer=f"{issuer.get('kind', 'Issuer')}/{issuer.get('name', '?')}",
    )


def _timestamp(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _key(obj: dict[str, Any]) -> tuple[str | None, str]:
    return obj["metadata"].get("namespace"), obj["metadata"]["name"]


def _by_days_left(row: InventoryRow) -> tuple[int, float, str]:
    return (0, 0.0, row.name) if row.days_left is None else (1, row.days_left, row.name)


def _table_row(row: InventoryRow) -> dict[str, Any]:
    leaf = row.leaf
    status = row.cert_manager
    served = {True: "= stored", False: "≠ stored", None: ""}[row.served_is_stored]
    return {
        "days left": None if row.days_left is None else round(row.days_left, 1),
        "not before": f"{row.not_before:%Y-%m-%d %H:%M}" if row.not_before else "",
        "not after": f"{row.not_after:%Y-%m-%d %H:%M}" if row.not_after else "",
        "source": row.source,
        "name": row.name,
        "names": _short(leaf.sans if leaf else ()),
        "issuer": leaf.issuer if leaf else (status.issuer if status else ""),
        "key": leaf.key_description if leaf else "",
        "cert-manager": (f"Ready={status.ready} rev {status.revision}" if status else ""),
        "served": served,
        "findings": "; ".join(f"{f.severity} {f.check}: {f.message}" for f in row.findings) or "ok",
    }


def _short(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit})" if len(names) > limit else "")

