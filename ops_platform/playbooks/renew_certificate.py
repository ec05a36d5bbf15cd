"""Renew one cert-manager Certificate, for the certificate-expiry alert.

Reads the Certificate's inventory row (:func:`build_inventory`, cluster only
plus the ``endpoints`` that serve it) and hands it to
:func:`ops_platform.certificates.renewal.renew`, which triggers cert-manager
as ``cmctl renew`` does and waits until the new certificate is issued and
served. With ``dry_run`` nothing is patched.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # x509 and TLS code is imported when the playbook runs
    from ops_platform.certificates.renewal import Probe, RenewalResult
    from ops_platform.certificates.x509_info import CertificateInfo

from ops_platform.playbooks.base import (
    KubeName,
    PlaybookContext,
    PlaybookFailed,
    PlaybookParams,
    PlaybookRefused,
    PlaybookResult,
    object_name,
)

NAME = "renew_certificate"


class RenewParams(PlaybookParams):
    PLAYBOOK = NAME
    TARGET_NAMES = {"name": "certificate"}
    namespace: KubeName
    name: KubeName


def run(
    ctx: PlaybookContext,
    params: RenewParams,
    *,
    endpoints: Sequence[str] = (),
    probe: Probe | None = None,
    trust_roots: Sequence[CertificateInfo] | None = None,
    wait_timeout: float = 300.0,
    poll_interval: float = 1.0,
) -> PlaybookResult:
    """``endpoints``: the spec's ``certificates.endpoints`` (those naming this certificate are probed)."""
    ctx.check_namespace(NAME, params.namespace)
    kube = ctx.cluster(NAME)
    target = object_name("Certificate", params.namespace, params.name)
    from ops_platform.certificates.inventory import build_inventory
    from ops_platform.certificates.probe import probe_endpoint
    from ops_platform.certificates.renewal import renew

    inventory = build_inventory(kube, list(endpoints), clock=ctx.clock, trust_roots=trust_roots)
    row = inventory.row(f"{params.namespace}/{params.name}", "cert-manager")
    if row is None:
        raise PlaybookRefused(f"playbook {NAME}: no cert-manager {target} in the cluster")
    report = renew(kube, [row], dry_run=ctx.dry_run, clock=ctx.clock, wait_timeout=wait_timeout,
                   probe=probe or functools.partial(probe_endpoint, timeout=5), poll_interval=poll_interval)
    result = report.results[0]
    if result.action == "failed":
        raise PlaybookFailed(f"playbook {NAME}: {target}: {result.detail}")
    return PlaybookResult(
        NAME, target, ctx.dry_run, result.action == "renewed",
        before={"revision": result.revision_before, "fingerprint": result.fingerprint_before,
                "not_after": _iso(row.not_after)},
        after=_after(result),
        summary=f"{target}: {result.detail}",
    )


def _after(result: RenewalResult) -> dict[str, object]:
    return {"action": result.action, "revision": result.revision_after, "fingerprint": result.fingerprint_after,
            "not_after": _iso(result.not_after), "served": list(result.served),
            "not_served": list(result.not_served)}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
