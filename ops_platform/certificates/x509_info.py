"""What an X.509 certificate says, and whether it can be trusted.

:func:`parse_pem_chain` / :func:`parse_der` turn certificates into
:class:`CertificateInfo` (subject, SANs, issuer, validity, serial, SHA-256
fingerprint, key). :func:`key_policy_problem` applies the platform's key
policy, :func:`sans_cover` the host-name rules of RFC 6125 as browsers apply
them, and :func:`verify_chain` builds a path to a trusted root.

Chain verification uses ``cryptography.x509.verification`` (the Web PKI
profile of RFC 5280 and the CA/Browser Forum rules, as in Chrome and Firefox)
first. When that rejects a chain, explicit signature checks along the
issuer names tell apart a chain that is merely outside the Web PKI profile
(a private CA without keyUsage, say: it still chains, ``method="signatures"``)
from one that does not chain at all (unknown root, missing intermediate, bad
signature, expired CA). Neither looks at revocation (no CRL or OCSP fetch).
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.verification import (
    DNSName,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ops_platform.errors import OpsPlatformError

MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
KEY_POLICY = "RSA >= 2048 bits or ECDSA P-256, P-384 or P-521"
MAX_CHAIN_DEPTH = 8


class CertificateParseError(OpsPlatformError):
    """Bytes that were meant to be certificates are not."""


@dataclass(frozen=True)
class CertificateInfo:
    """The facts of one certificate that the inventory and the checks use."""

    subject: str
    issuer: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    serial: str
    fingerprint_sha256: str
    key_type: str
    key_size: int | None
    curve: str | None
    is_ca: bool
    certificate: x509.Certificate = field(repr=False, compare=False)

    @property
    def sans(self) -> tuple[str, ...]:
        return self.dns_names + self.ip_addresses

    @property
    def key_description(self) -> str:
        if self.curve:
            return f"{self.key_type} {_curve_label(self.curve)}"
        return f"{self.key_type} {self.key_size}" if self.key_size else self.key_type

    @property
    def self_signed(self) -> bool:
        return self.certificate.issuer == self.certificate.subject

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after


def certificate_info(cert: x509.Certificate) -> CertificateInfo:
    key_type, key_size, curve = _key_facts(cert)
    dns_names, ip_addresses = _subject_alt_names(cert)
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=format(cert.serial_number, "x"),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        key_type=key_type,
        key_size=key_size,
        curve=curve,
        is_ca=_is_ca(cert),
        certificate=cert,
    )


def parse_pem_chain(data: bytes | str, *, what: str = "certificate data") -> list[CertificateInfo]:
    """Every certificate of a PEM bundle, in order (a ``tls.crt``: leaf first)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise CertificateParseError(f"{what} is not a PEM X.509 certificate chain ({exc})") from None
    return [certificate_info(cert) for cert in certs]


def parse_der(data: bytes, *, what: str = "certificate") -> CertificateInfo:
    try:
        return _parse_der(bytes(data))
    except ValueError as exc:
        raise CertificateParseError(f"{what} is not a DER X.509 certificate ({exc})") from None


@functools.lru_cache(maxsize=4096)
def _parse_der(data: bytes) -> CertificateInfo:
    """Cached: many endpoints serve the same (wildcard) certificate and intermediates."""
    return certificate_info(x509.load_der_x509_certificate(data))


def key_policy_problem(cert: CertificateInfo) -> str | None:
    """Why the key breaks the policy (RSA >= 2048, ECDSA P-256 and up), or None."""
    if cert.key_type == "RSA":
        if (cert.key_size or 0) < MIN_RSA_BITS:
            return f"RSA key of {cert.key_size} bits is below {MIN_RSA_BITS} (policy: {KEY_POLICY})"
        return None
    if cert.key_type == "ECDSA":
        if cert.curve not in ALLOWED_CURVES:
            return f"ECDSA key on curve {cert.curve} is not allowed (policy: {KEY_POLICY})"
        return None
    return f"{cert.key_description} key is outside the policy ({KEY_POLICY})"


def key_policy_ok(cert: CertificateInfo) -> bool:
    return key_policy_problem(cert) is None


def sans_cover(cert: CertificateInfo, host: str) -> bool:
    """Whether the certificate's subjectAltNames name ``host`` (see :func:`names_cover`)."""
    return names_cover(host, cert.dns_names, cert.ip_addresses)


def names_cover(host: str, dns_names: Iterable[str] = (), ip_addresses: Iterable[str] = ()) -> bool:
    """Whether DNS / IP names (SANs, or a cert-manager Certificate's spec) cover ``host``.

    RFC 6125 as browsers apply it. The common name is never used. A wildcard
    is only the whole left-most label (``*.example.com``) and stands for
    exactly one label: it covers ``a.example.com``, not ``example.com`` nor
    ``a.b.example.com``; partial wildcards (``f*.example.com``) and wildcards
    over a single label (``*.com``) match nothing (there is no public suffix
    list here, so ``*.co.uk`` would match). An IP address is covered only by
    an IP address name. Comparison ignores case and a trailing dot.
    """
    wanted = _normalise_host(host)
    try:
        address = ipaddress.ip_address(wanted)
    except ValueError:
        address = None
    if address is not None:
        return any(_same_ip(ip, address) for ip in ip_addresses)
    return any(_dns_name_matches(_normalise_host(pattern), wanted) for pattern in dns_names)


@dataclass(frozen=True)
class ChainVerification:
    """The outcome of :func:`verify_chain`.

    ``method``: ``webpki`` when ``cryptography.x509.verification`` accepted the
    chain; ``signatures`` when only the explicit signature walk could judge it
    (``webpki_error`` says why the Web PKI profile rejected it).
    """

    ok: bool
    method: Literal["webpki", "signatures"]
    path: tuple[str, ...] = ()
    error: str | None = None
    webpki_error: str | None = None
    checked_at: datetime | None = None


def verify_chain(
    leaf: CertificateInfo,
    intermediates: Sequence[CertificateInfo],
    trust_roots: Sequence[CertificateInfo],
    *,
    at: datetime | None = None,
) -> ChainVerification:
    """Build a path from ``leaf`` through ``intermediates`` to one of ``trust_roots``.

    ``at`` (default: now) is moved inside the leaf's own validity, so an
    expired or not-yet-valid leaf is left to the expiry check, while an
    expired intermediate or root still breaks the chain. The names the
    certificate serves are not checked here (see :func:`sans_cover`).
    """
    moment = _inside_validity(leaf, at or datetime.now(timezone.utc))
    if not trust_roots:
        return ChainVerification(False, "signatures", error="no trust roots are configured", checked_at=moment)
    webpki_path, webpki_error = _verify_webpki(leaf, intermediates, trust_roots, moment)
    if webpki_path is not None:
        return ChainVerification(True, "webpki", webpki_path, checked_at=moment)
    path, error = _verify_signatures(leaf, intermediates, trust_roots, moment)
    return ChainVerification(error is None, "signatures", path, error, webpki_error, moment)


def load_trust_roots(extra_pem_files: Iterable[str | Path] = (), *, system: bool = True) -> list[CertificateInfo]:
    """The system's trust store (OpenSSL's default CA file) plus the PEM files given.

    A platform with a private CA (a cert-manager ``CA`` issuer) adds its root here.
    """
    roots: list[CertificateInfo] = []
    if system:
        paths = ssl.get_default_verify_paths()
        for candidate in (paths.cafile, paths.openssl_cafile):
            if candidate and Path(candidate).is_file():
                # A few old roots of the distribution bundle have a serial cryptography warns about.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                    roots += parse_pem_chain(Path(candidate).read_bytes(), what=candidate)
                break
    for path in extra_pem_files:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CertificateParseError(f"trust roots: cannot read {path}: {exc.strerror}") from None
        roots += parse_pem_chain(data, what=f"trust roots file {path}")
    return roots


def _verify_webpki(
    leaf: CertificateInfo,
    intermediates: Sequence[CertificateInfo],
    roots: Sequence[CertificateInfo],
    at: datetime,
) -> tuple[tuple[str, ...] | None, str | None]:
    subject = _a_name_of(leaf)
    if subject is None:
        return None, "the leaf has no subjectAltName, which the Web PKI profile requires"
    try:
        verifier = (
            PolicyBuilder()
            .store(Store([root.certificate for root in roots]))
            .time(at)
            .max_chain_depth(MAX_CHAIN_DEPTH)
            .build_server_verifier(subject)
        )
        chain = verifier.verify(leaf.certificate, [cert.certificate for cert in intermediates])
    except VerificationError as exc:
        return None, str(exc)
    except (ValueError, UnsupportedAlgorithm) as exc:
        return None, f"cannot be checked against the Web PKI profile ({exc})"
    return tuple(cert.subject.rfc4514_string() for cert in chain), None


def _a_name_of(leaf: CertificateInfo) -> DNSName | IPAddress | None:
    """A name the leaf itself claims, so the verifier checks the chain and not the host."""
    for name in leaf.dns_names:
        concrete = "x" + name[1:] if name.startswith("*.") else name
        try:
            return DNSName(concrete)
        except ValueError:
            continue
    for ip in leaf.ip_addresses:
        return IPAddress(ipaddress.ip_address(ip))
    return None


def _verify_signatures(
    leaf: CertificateInfo,
    intermediates: Sequence[CertificateInfo],
    roots: Sequence[CertificateInfo],
    at: datetime,
) -> tuple[tuple[str, ...], str | None]:
    path = [leaf]
    current = leaf
    for _ in range(MAX_CHAIN_DEPTH):
        root = _issuer_among(current, roots)
        if root is not None:
            if root.fingerprint_sha256 != current.fingerprint_sha256:
                path.append(root)
            return _subjects(path), _validity_problem(path, at)
        issuer = _issuer_among(current, [c for c in intermediates if c not in path])
        if issuer is None:
            return _subjects(path), _no_issuer(current, intermediates)
        path.append(issuer)
        current = issuer
    return _subjects(path), f"no trusted root within {MAX_CHAIN_DEPTH} certificates"


def _issuer_among(cert: CertificateInfo, candidates: Iterable[CertificateInfo]) -> CertificateInfo | None:
    for candidate in candidates:
        if candidate.certificate.subject != cert.certificate.issuer:
            continue
        try:
            cert.certificate.verify_directly_issued_by(candidate.certificate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return candidate
    return None


def _no_issuer(cert: CertificateInfo, intermediates: Sequence[CertificateInfo]) -> str:
    named = [c for c in intermediates if c.certificate.subject == cert.certificate.issuer]
    if named:
        return f"the signature of {cert.subject} does not verify with the key of its issuer {cert.issuer}"
    if cert.self_signed:
        return f"{cert.subject} is self-signed and not among the trust roots"
    return (
        f"issuer {cert.issuer} of {cert.subject} is neither a trust root nor among the "
        "intermediates given (an intermediate is missing or the root is not trusted)"
    )


def _validity_problem(path: Sequence[CertificateInfo], at: datetime) -> str | None:
    for cert in path[1:]:
        if at > cert.not_after:
            return f"CA certificate {cert.subject} expired on {cert.not_after:%Y-%m-%d}"
        if at < cert.not_before:
            return f"CA certificate {cert.subject} is not valid before {cert.not_before:%Y-%m-%d}"
    return None


def _subjects(path: Sequence[CertificateInfo]) -> tuple[str, ...]:
    return tuple(cert.subject for cert in path)


def _inside_validity(leaf: CertificateInfo, at: datetime) -> datetime:
    if at > leaf.not_after:
        return leaf.not_after - timedelta(seconds=1)
    if at < leaf.not_before:
        return leaf.not_before + timedelta(seconds=1)
    return at


def _same_ip(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


def _normalise_host(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _dns_name_matches(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    if not pattern.startswith("*."):
        return False
    suffix = pattern[1:]  # ".example.com"
    label, _, rest = host.partition(".")
    # One label for the star, and never a bare public-suffix-like "*.com".
    return bool(label) and "." + rest == suffix and suffix.count(".") >= 2


def _subject_alt_names(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns_names = tuple(san.get_values_for_type(x509.DNSName))
    ip_addresses = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return dns_names, ip_addresses


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _key_facts(cert: x509.Certificate) -> tuple[str, int | None, str | None]:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown", None, None
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size, None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDSA", key.curve.key_size, key.curve.name
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256, None
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456, None
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size, None
    return type(key).__name__, None, None


def _curve_label(curve: str) -> str:
    return {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(curve, curve)
