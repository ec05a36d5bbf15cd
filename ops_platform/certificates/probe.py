"""The certificate an endpoint actually serves.

:func:`probe_endpoint` connects to ``host:port``, sends ``host`` as SNI,
completes a TLS handshake without verifying anything (the point is to see
what is served, even when it is expired or wrong) and returns the chain as
sent. Connect and handshake together never take longer than ``timeout``: a
port that refuses, a server that accepts and never answers, a non-TLS
service, all end as a :class:`ProbeResult` with ``error`` set, never an
exception. :func:`probe_many` probes many endpoints with a bounded pool.

The chain as sent: Python 3.13 has ``SSLSocket.get_unverified_chain()``.
On 3.10 to 3.12 the same OpenSSL call (``SSL_get_peer_cert_chain``) exists
on the private ``SSLSocket._sslobj``; it is used when present. Where neither
exists, only the leaf is read (``getpeercert(binary_form=True)``) and
``chain_as_sent`` is False, so the inventory verifies the chain with the
intermediates of the stored secret instead.
"""

from __future__ import annotations

import functools
import ipaddress
import select
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ops_platform.certificates.x509_info import CertificateInfo, CertificateParseError, parse_der

ENDPOINTS_SETTING = "certificates.endpoints in infra/platform.yaml"


@dataclass(frozen=True)
class ProbeResult:
    endpoint: str
    chain: tuple[CertificateInfo, ...] = ()
    """Leaf first, then the intermediates in the order the server sent them."""
    chain_as_sent: bool = False
    """False when only the leaf could be read (see the module docstring)."""
    error: str | None = None
    seconds: float = 0.0
    tls_version: str | None = None

    @property
    def host(self) -> str:
        return split_endpoint(self.endpoint)[0]

    @property
    def port(self) -> int:
        return split_endpoint(self.endpoint)[1]

    @property
    def leaf(self) -> CertificateInfo | None:
        return self.chain[0] if self.chain else None

    @property
    def intermediates(self) -> tuple[CertificateInfo, ...]:
        return self.chain[1:]


Probe = Callable[[str], ProbeResult]


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not host:port (check {ENDPOINTS_SETTING})")
    return host.strip("[]"), int(port)


def probe_endpoint(
    endpoint: str, *, timeout: float = 5.0, resolve: Mapping[str, str] | None = None
) -> ProbeResult:
    """Handshake with ``endpoint`` (SNI = its host) and read the served chain.

    ``resolve`` maps a host to the address to connect to, like curl's
    ``--resolve``: probe one load balancer or a test server under the
    public name.
    """
    started = time.monotonic()
    try:
        host, port = split_endpoint(endpoint)
    except ValueError as exc:
        return ProbeResult(endpoint, error=str(exc))
    address = (resolve or {}).get(host, host)
    deadline = started + timeout
    try:
        der_chain, as_sent, version = _handshake(host, address, port, deadline)
    except TimeoutError:
        return _failed(endpoint, address, port, f"no TLS handshake within {timeout:g} s", started)
    except ConnectionRefusedError:
        return _failed(endpoint, address, port, "connection refused", started)
    except socket.gaierror as exc:
        return _failed(endpoint, address, port, f"cannot resolve {address} ({exc.strerror})", started)
    except ssl.SSLError as exc:
        return _failed(endpoint, address, port, f"TLS handshake failed ({exc.reason or exc})", started)
    except OSError as exc:
        return _failed(endpoint, address, port, exc.strerror or type(exc).__name__, started)
    try:
        chain = tuple(parse_der(der, what=f"certificate served at {endpoint}") for der in der_chain)
    except CertificateParseError as exc:
        return ProbeResult(endpoint, error=str(exc), seconds=time.monotonic() - started)
    if not chain:
        return _failed(endpoint, address, port, "the server sent no certificate", started)
    return ProbeResult(endpoint, chain, as_sent, None, time.monotonic() - started, version)


def probe_many(
    endpoints: Sequence[str],
    *,
    concurrency: int = 20,
    timeout: float = 5.0,
    resolve: Mapping[str, str] | None = None,
    probe: Probe | None = None,
) -> list[ProbeResult]:
    """Probe every endpoint, at most ``concurrency`` at a time; results in input order.

    One endpoint that refuses or hangs costs at most ``timeout`` of one
    worker; the others go on.
    """
    if not endpoints:
        return []
    run = probe or (lambda endpoint: probe_endpoint(endpoint, timeout=timeout, resolve=resolve))

    def guarded(endpoint: str) -> ProbeResult:
        try:
            return run(endpoint)
        except Exception as exc:  # a probe must never stop the scan
            return ProbeResult(endpoint, error=f"probe failed: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(endpoints))),
                            thread_name_prefix="tls-probe") as pool:
        return list(pool.map(guarded, endpoints))


@functools.cache
def _client_context() -> ssl.SSLContext:
    """One context for every probe (making one costs as much CPU as parsing the chain)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # Security level 0, so a weak key or an old signature is seen and reported, not refused.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _handshake(host: str, address: str, port: int, deadline: float) -> tuple[list[bytes], bool, str | None]:
    context = _client_context()
    sock = socket.create_connection((address, port), timeout=_remaining(deadline))
    try:
        sock.setblocking(False)
        tls = context.wrap_socket(
            sock, server_hostname=None if _is_ip(host) else host, do_handshake_on_connect=False
        )
        with tls:
            _bounded_handshake(tls, deadline)
            der_chain, as_sent = _served_chain(tls)
            return der_chain, as_sent, tls.version()
    finally:
        sock.close()


def _bounded_handshake(tls: ssl.SSLSocket, deadline: float) -> None:
    """``do_handshake`` on a non-blocking socket, so the whole handshake (not each read) is bounded."""
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            readable, _, _ = select.select([tls], [], [], _remaining(deadline))
            if not readable:
                raise TimeoutError from None
        except ssl.SSLWantWriteError:
            _, writable, _ = select.select([], [tls], [], _remaining(deadline))
            if not writable:
                raise TimeoutError from None


def _served_chain(tls: ssl.SSLSocket) -> tuple[list[bytes], bool]:
    public = getattr(tls, "get_unverified_chain", None)  # Python 3.13+
    if public is not None:
        return [bytes(der) for der in public() or []], True
    private = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)  # 3.10-3.12
    if private is not None:
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in private() or []], True
    leaf = tls.getpeercert(binary_form=True)
    return ([leaf] if leaf else []), False


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _failed(endpoint: str, address: str, port: int, reason: str, started: float) -> ProbeResult:
    return ProbeResult(
        endpoint,
        error=f"tls endpoint {endpoint}: {reason} at {address}:{port} (check {ENDPOINTS_SETTING})",
        seconds=time.monotonic() - started,
    )
