"""Certificate inventory and renewal against real TLS servers on 127.0.0.1 and the real Kubernetes API server.

Every certificate is made here (tests/fixtures/tls.py). The code runs as the
code location's identity (infra/dagster/rbac.yaml); the Certificate CRD is
the trimmed copy of infra/crds. cert-manager's controllers are not running:
:func:`play_cert_manager` stands in for them, writing as admin the Secrets
and the Certificate status (its status subresource) they would write.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from ops_platform.certificates.inventory import (
    CHECK_CHAIN_VERIFIES,
    CHECK_ENDPOINT_REACHABLE,
    CHECK_EXPIRY,
    CHECK_ISSUANCE,
    CHECK_KEY_POLICY,
    CHECK_SANS_COVER_HOST,
    CHECK_SERVED_IS_STORED,
    build_inventory,
)
from ops_platform.certificates.probe import probe_endpoint, probe_many
from ops_platform.certificates.renewal import (
    ISSUING_MESSAGE,
    ISSUING_REASON,
    certificates_to_renew,
    issuing_conditions,
    renew,
)
from ops_platform.certificates.x509_info import (
    CertificateParseError,
    certificate_info,
    key_policy_ok,
    key_policy_problem,
    load_trust_roots,
    names_cover,
    parse_pem_chain,
    sans_cover,
    verify_chain,
)
from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.kubernetes import KubernetesResource
from tests.fixtures.cert_manager import play_cert_manager, rfc3339
from tests.fixtures.kube_server import KubeCluster
from tests.fixtures.tls import CertificateAuthority

CM = "cert-manager.io/v1"
CERTIFICATE_CRD = "certificates.cert-manager.io"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
LOOPBACK = "127.0.0.1"


def now() -> datetime:
    return datetime.now(timezone.utc)


def info(issued):
    return certificate_info(issued.certificate)


def chain_info(issued):
    return parse_pem_chain(issued.chain_pem)


def resolve_all(*hosts: str) -> dict[str, str]:
    return {host: LOOPBACK for host in hosts}


def certificate_object(namespace, name, secret, dns_names, *, not_after=None, ready="True", revision=1,
                       generation=1, extra_status=None):
    status = {"conditions": [{"type": "Ready", "status": ready, "reason": "Ready" if ready == "True" else "Failed",
                              "message": "Certificate is up to date and has not expired",
                              "lastTransitionTime": rfc3339(now()), "observedGeneration": generation}],
              "revision": revision}
    if not_after is not None:
        status["notAfter"] = rfc3339(not_after)
    status.update(extra_status or {})
    return {"apiVersion": CM, "kind": "Certificate",
            "metadata": {"name": name, "namespace": namespace, "generation": generation},
            "spec": {"secretName": secret, "dnsNames": list(dns_names),
                     "issuerRef": {"kind": "ClusterIssuer", "name": "platform-ca"}},
            "status": status}


@dataclass(frozen=True)
class Namespaces:
    """The namespaces of one test: the apps', the platform's and a legacy one."""

    apps: str
    ops: str
    legacy: str

    def __contains__(self, row_name: str) -> bool:
        return row_name.split("/")[0] in (self.apps, self.ops, self.legacy)


@pytest.fixture(scope="module")
def module_namespaces(kube_cluster: KubeCluster) -> Iterator[Namespaces]:
    prefix = f"c{uuid.uuid4().hex[:6]}"
    made = Namespaces(f"{prefix}-apps", f"{prefix}-ops", f"{prefix}-legacy")
    for name in (made.apps, made.ops, made.legacy):
        kube_cluster.create_namespace(name)
    yield made
    for name in (made.apps, made.ops, made.legacy):
        kube_cluster.delete_object("v1", "Namespace", name)


@pytest.fixture
def ns(kube_cluster: KubeCluster, kube_crds: list[str], module_namespaces: Namespaces) -> Iterator[Namespaces]:
    """The module's namespaces, emptied of this test's Certificates and Secrets afterwards."""
    yield module_namespaces
    for name in (module_namespaces.apps, module_namespaces.ops, module_namespaces.legacy):
        for api_version, kind in ((CM, "Certificate"), ("v1", "Secret")):
            for obj in kube_cluster.list_objects(api_version, kind, name):
                if obj.get("type") != "kubernetes.io/service-account-token":
                    kube_cluster.delete_object(api_version, kind, obj["metadata"]["name"], name)


@pytest.fixture
def kube(kube_cluster, tmp_path):
    path = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform")
    client = KubernetesResource(kubeconfig=str(path)).get_client()
    yield client
    client.api_client.close()


@pytest.fixture
def cert_manager(kube_cluster, ns):
    """The cluster with cert-manager's CRDs; what cert-manager's controllers write, tests write as admin."""
    return kube_cluster


def put_certificate(cluster: KubeCluster, certificate: dict) -> None:
    """A Certificate as cert-manager keeps it: the spec, then its status through the status subresource."""
    metadata = {k: v for k, v in certificate["metadata"].items() if k != "generation"}
    cluster.put_object({**{k: v for k, v in certificate.items() if k != "status"}, "metadata": metadata})
    cluster.set_status(CM, "Certificate", metadata["name"], metadata["namespace"], certificate["status"])


def ours(inventory, ns: Namespaces):
    """The rows of this test: its namespaces' and its endpoints' (the session's server holds other tests' too)."""
    return [row for row in inventory.rows if row.source == "endpoint" or row.name in ns]


def writes_since(cluster: KubeCluster, mark: tuple[int, str]) -> list[dict]:
    return [event for event in cluster.audit_events_since(mark) if event["verb"] in WRITE_VERBS]


# x509 facts, key policy, names


def test_parse_reads_names_dates_key_and_chain(tls_ca):
    intermediate = tls_ca.intermediate()
    issued = intermediate.issue(["onto.test", "*.onto.test"], ip_addresses=["10.0.0.7"], days=30, key="rsa-2048")
    chain = chain_info(issued)
    leaf = chain[0]
    assert [c.subject for c in chain] == [leaf.subject, intermediate.certificate.subject.rfc4514_string()]
    assert leaf.dns_names == ("onto.test", "*.onto.test") and leaf.ip_addresses == ("10.0.0.7",)
    assert leaf.issuer == intermediate.certificate.subject.rfc4514_string()
    assert (leaf.key_type, leaf.key_size, leaf.key_description) == ("RSA", 2048, "RSA 2048")
    assert leaf.fingerprint_sha256 == issued.fingerprint
    assert int(leaf.serial, 16) == issued.certificate.serial_number
    assert 29.9 < leaf.days_left(now()) < 30.1 and not leaf.is_ca and chain[1].is_ca
    assert leaf.not_before < now() < leaf.not_after


def test_garbled_pem_is_a_clear_error():
    with pytest.raises(CertificateParseError, match="tls.crt of Secret apps/x is not a PEM X.509"):
        parse_pem_chain(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
                        what="tls.crt of Secret apps/x")


@pytest.mark.parametrize(
    ("key", "ok"),
    [("rsa-1024", False), ("rsa-2048", True), ("ec-p256", True), ("ec-p384", True), ("ec-secp256k1", False)],
)
def test_key_policy(tls_ca, key, ok):
    leaf = info(tls_ca.issue(key=key))
    assert key_policy_ok(leaf) is ok
    if not ok:
        assert "policy: RSA >= 2048 bits or ECDSA P-256" in key_policy_problem(leaf)


@pytest.mark.parametrize(
    ("names", "host", "covered"),
    [
        (["onto.test"], "onto.test", True),
        (["onto.test"], "ONTO.test.", True),
        (["*.onto.test"], "api.onto.test", True),
        (["*.onto.test"], "onto.test", False),
        (["*.onto.test"], "a.b.onto.test", False),
        (["a*.onto.test"], "api.onto.test", False),
        (["*.test"], "onto.test", False),
        (["other.test"], "onto.test", False),
        (["127.0.0.1"], "127.0.0.1", False),
    ],
)
def test_dns_names_cover_host(names, host, covered):
    assert names_cover(host, names) is covered


def test_ip_host_needs_an_ip_san(tls_ca):
    assert sans_cover(info(tls_ca.issue(["onto.test"], ip_addresses=["127.0.0.1"])), "127.0.0.1")
    assert not sans_cover(info(tls_ca.issue(["onto.test"])), "127.0.0.1")


# chain verification


def test_chain_through_an_intermediate_verifies_with_webpki(tls_ca):
    chain = chain_info(tls_ca.intermediate().issue())
    result = verify_chain(chain[0], chain[1:], [certificate_info(tls_ca.certificate)])
    assert result.ok and result.method == "webpki" and len(result.path) == 3


def test_missing_intermediate_and_unknown_root_do_not_verify(tls_ca):
    chain = chain_info(tls_ca.intermediate().issue())
    roots = [certificate_info(tls_ca.certificate)]
    missing = verify_chain(chain[0], [], roots)
    assert not missing.ok and "intermediate is missing or the root is not trusted" in missing.error
    foreign = CertificateAuthority("someone else's root")
    unknown = verify_chain(info(foreign.issue()), [], roots)
    assert not unknown.ok and "someone else's root" in unknown.error


def test_expired_intermediate_breaks_the_chain_but_an_expired_leaf_is_left_to_the_expiry_check(tls_ca):
    roots = [certificate_info(tls_ca.certificate)]
    lapsed = tls_ca.intermediate("lapsed intermediate", not_after=now() - timedelta(days=1))
    chain = chain_info(lapsed.issue(days=30))
    lapsed_result = verify_chain(chain[0], chain[1:], roots)
    assert not lapsed_result.ok and "CA certificate CN=lapsed intermediate" in lapsed_result.error
    assert "expired on" in lapsed_result.error
    expired_leaf = chain_info(tls_ca.intermediate().issue(not_after=now() - timedelta(days=3)))
    assert verify_chain(expired_leaf[0], expired_leaf[1:], roots).ok


def test_private_ca_outside_the_webpki_profile_verifies_by_signature_only():
    root = CertificateAuthority("root without keyUsage", key_usage=False)
    result = verify_chain(info(root.issue()), [], [certificate_info(root.certificate)])
    assert result.ok and result.method == "signatures" and "2.5.29.15" in result.webpki_error


def test_no_trust_roots_never_verifies(tls_ca):
    result = verify_chain(info(tls_ca.issue()), [], [])
    assert not result.ok and result.error == "no trust roots are configured"


def test_trust_roots_are_the_system_store_plus_the_platform_ca(tls_ca, tmp_path):
    ca_file = tmp_path / "platform-ca.pem"
    ca_file.write_bytes(tls_ca.pem)
    roots = load_trust_roots([ca_file])
    assert len(roots) > 1 and roots[-1].fingerprint_sha256 == certificate_info(tls_ca.certificate).fingerprint_sha256
    assert load_trust_roots([ca_file], system=False) == roots[-1:]
    with pytest.raises(CertificateParseError, match="trust roots: cannot read .*missing.pem"):
        load_trust_roots([tmp_path / "missing.pem"], system=False)


# probing live endpoints


def test_probe_sends_sni_and_reads_the_chain_as_served(tls_ca, tls_server):
    issued = tls_ca.intermediate().issue(["onto.test"])
    server = tls_server(issued)
    result = probe_endpoint(f"onto.test:{server.port}", timeout=2, resolve=resolve_all("onto.test"))
    assert result.error is None and result.chain_as_sent
    assert [c.fingerprint_sha256 for c in result.chain] == [c.fingerprint_sha256 for c in chain_info(issued)]
    assert server.server_names == ["onto.test"]


def test_refused_hanging_and_non_tls_endpoints_are_results_not_exceptions(hanging_port, refused_port):
    refused = probe_endpoint(f"onto.test:{refused_port}", timeout=1, resolve=resolve_all("onto.test"))
    assert refused.error == (f"tls endpoint onto.test:{refused_port}: connection refused at "
                             f"127.0.0.1:{refused_port} (check certificates.endpoints in infra/platform.yaml)")
    started = time.monotonic()
    hanging = probe_endpoint(f"{LOOPBACK}:{hanging_port}", timeout=0.4)
    assert 0.35 < time.monotonic() - started < 1.5
    assert "no TLS handshake within 0.4 s" in hanging.error and hanging.leaf is None
    with _plain_text_server() as port:
        garbled = probe_endpoint(f"{LOOPBACK}:{port}", timeout=1)
    assert "TLS handshake failed" in garbled.error
    assert "is not host:port" in probe_endpoint("no-port", timeout=1).error


def test_probe_many_keeps_order_and_one_hanging_endpoint_does_not_hold_the_scan(
    tls_ca, tls_server, hanging_port, refused_port
):
    good = [tls_server(tls_ca.issue([LOOPBACK], ip_addresses=[LOOPBACK])) for _ in range(3)]
    endpoints = [f"{LOOPBACK}:{hanging_port}", *(s.endpoint() for s in good), f"{LOOPBACK}:{refused_port}"]
    started = time.monotonic()
    results = probe_many(endpoints, concurrency=4, timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert [r.endpoint for r in results] == endpoints
    assert [r.error is None for r in results] == [False, True, True, True, False]


# the inventory


def test_inventory_of_endpoints_only(tls_ca, tls_server, hanging_port, refused_port):
    intermediate = tls_ca.intermediate()
    stranger = CertificateAuthority("untrusted root")
    cases = {
        "expired": intermediate.issue(["expired.test"], not_after=now() - timedelta(days=2)),
        "ten-days": intermediate.issue(["ten-days.test"], days=10),
        "twenty-days": intermediate.issue(["twenty-days.test"], days=20),
        "wrong-san": intermediate.issue(["elsewhere.test"], days=200),
        "untrusted": stranger.issue(["untrusted.test"], days=200),
        "no-intermediate": intermediate.issue(["no-intermediate.test"], days=200).without_intermediates(),
        "weak-key": intermediate.issue(["weak-key.test"], days=200, key="rsa-1024"),
        "healthy": intermediate.issue(["healthy.test"], days=200, key="ec-p256"),
    }
    endpoints = {name: f"{name}.test:{tls_server(issued).port}" for name, issued in cases.items()}
    endpoints["refused"] = f"refused.test:{refused_port}"
    endpoints["hanging"] = f"hanging.test:{hanging_port}"
    inventory = build_inventory(
        None, list(endpoints.values()), probe_timeout=0.5, concurrency=8,
        trust_roots=[certificate_info(tls_ca.certificate)], renew_before_days=21, fail_below_days=14,
        resolve=resolve_all(*(f"{name}.test" for name in endpoints)),
    )

    def findings(name):
        row = inventory.row(endpoints[name])
        return {(f.check, f.severity) for f in row.findings}

    assert any("no Kubernetes cluster is configured (KUBECONFIG / OPS_KUBE_CONTEXT)" in n for n in inventory.notes)
    assert findings("expired") == {(CHECK_EXPIRY, "ERROR")}
    assert findings("ten-days") == {(CHECK_EXPIRY, "ERROR")}
    assert findings("twenty-days") == {(CHECK_EXPIRY, "WARN")}
    assert findings("wrong-san") == {(CHECK_SANS_COVER_HOST, "ERROR")}
    assert findings("untrusted") == {(CHECK_CHAIN_VERIFIES, "ERROR")}
    assert findings("no-intermediate") == {(CHECK_CHAIN_VERIFIES, "ERROR")}
    assert findings("weak-key") == {(CHECK_KEY_POLICY, "ERROR")}
    assert findings("healthy") == set()
    assert findings("refused") == findings("hanging") == {(CHECK_ENDPOINT_REACHABLE, "ERROR")}
    assert "expires on" in inventory.row(endpoints["ten-days"]).findings[0].message
    assert "an intermediate is missing" in inventory.row(endpoints["no-intermediate"]).findings[0].message
    assert "elsewhere.test, not wrong-san.test" in inventory.row(endpoints["wrong-san"]).findings[0].message
    order = [row.name for row in inventory.rows]
    assert set(order[:2]) == {endpoints["refused"], endpoints["hanging"]}
    assert order[2:5] == [endpoints["expired"], endpoints["ten-days"], endpoints["twenty-days"]]
    table = inventory.table_rows()
    assert table[2]["days left"] < 0 and table[-1]["days left"] > 199 and table[-1]["findings"]


def test_inventory_links_cert_manager_secrets_and_endpoints(tls_ca, tls_server, cert_manager, kube, ns):
    intermediate = tls_ca.intermediate()
    roots = [certificate_info(tls_ca.certificate)]
    current = intermediate.issue(["onto.test"], days=80)
    older = intermediate.issue(["onto.test"], days=30)
    expired = intermediate.issue(["stale.test"], not_after=now() - timedelta(days=1))
    api = intermediate.issue(["api.test"], days=120)
    legacy = intermediate.issue(["legacy.test"], days=20)
    put_certificate(cert_manager, certificate_object(ns.apps, "onto", "onto-tls", ["onto.test"],
                                                     not_after=current.certificate.not_valid_after_utc))
    cert_manager.put_object(current.tls_secret(ns.apps, "onto-tls", ca=tls_ca.certificate))
    put_certificate(cert_manager, certificate_object(ns.ops, "stale", "stale-tls", ["stale.test"],
                                                     not_after=now() + timedelta(days=59)))
    cert_manager.put_object(expired.tls_secret(ns.ops, "stale-tls"))
    put_certificate(cert_manager, certificate_object(ns.apps, "api", "api-tls", ["api.test"], revision=3,
                                                     not_after=api.certificate.not_valid_after_utc))
    cert_manager.put_object(api.tls_secret(ns.apps, "api-tls"))
    put_certificate(cert_manager, certificate_object(ns.apps, "pending", "pending-tls", ["pending.test"],
                                                     ready="False", extra_status={
                                                         "failedIssuanceAttempts": 2,
                                                         "lastFailureTime": rfc3339(now())}))
    cert_manager.put_object(legacy.tls_secret(ns.legacy, "legacy-tls"))
    garbled = legacy.tls_secret(ns.legacy, "garbled-tls")
    garbled["data"]["tls.crt"] = base64.b64encode(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").decode()
    cert_manager.put_object(garbled)
    cert_manager.put_object({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                             "metadata": {"name": "not-tls", "namespace": ns.apps}, "data": {"a": "Yg=="}})
    onto_server = tls_server(older)
    api_server = tls_server(api)
    onto_endpoint, api_endpoint = f"onto.test:{onto_server.port}", f"api.test:{api_server.port}"

    inventory = build_inventory(kube, [onto_endpoint, api_endpoint], probe_timeout=2, trust_roots=roots,
                                resolve=resolve_all("onto.test", "api.test"))

    rows = ours(inventory, ns)
    assert {(row.source, row.name) for row in rows} == {
        ("cert-manager", f"{ns.apps}/onto"), ("cert-manager", f"{ns.ops}/stale"), ("cert-manager", f"{ns.apps}/api"),
        ("cert-manager", f"{ns.apps}/pending"), ("secret", f"{ns.legacy}/legacy-tls"),
        ("secret", f"{ns.legacy}/garbled-tls"), ("endpoint", onto_endpoint), ("endpoint", api_endpoint)}
    onto = inventory.row(f"{ns.apps}/onto")
    assert onto.findings == [] and onto.endpoints == (onto_endpoint,)
    assert onto.leaf.fingerprint_sha256 == current.fingerprint and onto.chain_verification.method == "webpki"
    served = inventory.row(onto_endpoint)
    assert served.served_is_stored is False and served.stored == (f"{ns.apps}/onto",)
    [stale_serving] = [f for f in served.findings if f.check == CHECK_SERVED_IS_STORED]
    assert stale_serving.severity == "ERROR" and current.fingerprint[:16] in stale_serving.message
    api_row = inventory.row(api_endpoint)
    assert api_row.served_is_stored is True and api_row.findings == []
    stale = {(f.check, f.severity): f.message for f in inventory.row(f"{ns.ops}/stale").findings}
    assert f"Ready=True although the certificate in Secret {ns.ops}/stale-tls expired" in stale[
        (CHECK_SERVED_IS_STORED, "ERROR")]
    assert "7895" in stale[(CHECK_SERVED_IS_STORED, "ERROR")]
    assert (CHECK_EXPIRY, "ERROR") in stale and (CHECK_SERVED_IS_STORED, "WARN") in stale
    pending = {(f.check, f.severity) for f in inventory.row(f"{ns.apps}/pending").findings}
    assert pending == {(CHECK_ISSUANCE, "ERROR"), (CHECK_ISSUANCE, "WARN")}
    assert [f.check for f in inventory.row(f"{ns.legacy}/legacy-tls").findings] == [CHECK_EXPIRY]
    assert f"tls.crt of Secret {ns.legacy}/garbled-tls is not a PEM" in inventory.row(f"{ns.legacy}/garbled-tls").error
    assert rows[0].days_left is None
    table = {row["name"]: row for row in inventory.table_rows()}
    assert table[f"{ns.apps}/api"]["cert-manager"] == "Ready=True rev 3"
    assert table[onto_endpoint]["served"] == "≠ stored"


def test_without_cert_manager_the_inventory_still_has_secrets_and_endpoints(tls_ca, tls_server, kube_cluster, kube,
                                                                            ns):
    issued = tls_ca.issue(["legacy.test"], days=200)
    kube_cluster.put_object(issued.tls_secret(ns.legacy, "legacy-tls"))
    server = tls_server(issued)
    endpoint = f"legacy.test:{server.port}"
    removed = kube_cluster.remove_crds(CERTIFICATE_CRD)
    try:
        inventory = build_inventory(kube, [endpoint], probe_timeout=2,
                                    trust_roots=[certificate_info(tls_ca.certificate)],
                                    resolve=resolve_all("legacy.test"))
    finally:
        kube_cluster.reinstall_crds(removed)
    rows = ours(inventory, ns)
    assert {(row.source, row.name) for row in rows} == {("secret", f"{ns.legacy}/legacy-tls"), ("endpoint", endpoint)}
    assert any("cert-manager is not installed" in note for note in inventory.notes)
    assert inventory.row(endpoint).served_is_stored is True
    assert [finding for row in rows for finding in row.findings] == []


def test_a_certificate_not_yet_valid_is_an_expiry_error_whether_served_or_stored(
    tls_ca, tls_server, cert_manager, kube, ns
):
    checked_at = now()
    starts = checked_at + timedelta(days=3)
    early = tls_ca.intermediate().issue(["early.test"], not_before=starts, not_after=starts + timedelta(days=90))
    cert_manager.put_object(early.tls_secret(ns.apps, "early-tls"))
    put_certificate(cert_manager, certificate_object(ns.apps, "pending", "pending-tls", ["pending.test"], extra_status={
        "notBefore": rfc3339(starts), "notAfter": rfc3339(starts + timedelta(days=90))}))
    server = tls_server(early)
    endpoint = f"early.test:{server.port}"

    inventory = build_inventory(kube, [endpoint], clock=lambda: checked_at, probe_timeout=2,
                                trust_roots=[certificate_info(tls_ca.certificate)], resolve=resolve_all("early.test"))

    for name in (f"{ns.apps}/early-tls", endpoint):
        row = inventory.row(name)
        [finding] = row.findings
        assert (finding.check, finding.severity) == (CHECK_EXPIRY, "ERROR")
        assert finding.message.startswith(f"not valid until {starts:%Y-%m-%d %H:%M} UTC, in 3.0 days")
        assert row.chain_verification.ok, "the chain is sound: only the validity window is wrong"
        assert row.days_left > 90
    assert inventory.row(endpoint).served_is_stored is True
    from_status = [f for f in inventory.row(f"{ns.apps}/pending").findings if f.check == CHECK_EXPIRY]
    assert [f.severity for f in from_status] == ["ERROR"]
    assert "not valid until" in from_status[0].message and "from the Certificate's status" in from_status[0].message
    table = {row["name"]: row for row in inventory.table_rows()}
    assert table[endpoint]["not before"] == f"{early.certificate.not_valid_before_utc:%Y-%m-%d %H:%M}"
    assert list(table[endpoint])[:3] == ["days left", "not before", "not after"]
    validity = {row["name"]: row for row in inventory.validity_rows()}
    assert validity[f"{ns.apps}/early-tls"] == {
        "name": f"{ns.apps}/early-tls", "source": "secret",
        "days_left": round(inventory.row(f"{ns.apps}/early-tls").days_left, 3),
        "not_before": early.certificate.not_valid_before_utc.isoformat(),
        "not_after": early.certificate.not_valid_after_utc.isoformat(),
    }
    assert validity[f"{ns.apps}/pending"]["not_before"] == rfc3339(starts).replace("Z", "+00:00")


def test_unreachable_cluster_names_the_setting(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "down",
        "clusters": [{"name": "down", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "down", "context": {"cluster": "down", "user": "down"}}],
    }))
    client = KubernetesResource(kubeconfig=str(path), context="down", request_timeout=2).get_client()
    with pytest.raises(ServerUnreachableError, match="check KUBECONFIG / OPS_KUBE_CONTEXT"):
        build_inventory(client, [], trust_roots=[])


# renewal


def test_issuing_condition_is_the_one_cmctl_sets():
    at = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    certificate = certificate_object("apps", "onto", "onto-tls", ["onto.test"], generation=4)
    conditions = issuing_conditions(certificate, at)
    assert conditions[0]["type"] == "Ready"
    assert conditions[1] == {"type": "Issuing", "status": "True", "reason": ISSUING_REASON, "message": ISSUING_MESSAGE,
                             "lastTransitionTime": "2026-03-01T12:00:00Z", "observedGeneration": 4}
    certificate["status"]["conditions"] = conditions
    again = issuing_conditions(certificate, at + timedelta(hours=1))
    assert len(again) == 2 and again[1]["lastTransitionTime"] == "2026-03-01T12:00:00Z"


def renewal_setup(tls_ca, tls_server, cert_manager, kube, ns):
    intermediate = tls_ca.intermediate()
    old = intermediate.issue(["onto.test"], days=20)
    put_certificate(cert_manager, certificate_object(ns.apps, "onto", "onto-tls", ["onto.test"], revision=1,
                                                     not_after=old.certificate.not_valid_after_utc))
    cert_manager.put_object(old.tls_secret(ns.apps, "onto-tls"))
    cert_manager.put_object(intermediate.issue(["legacy.test"], days=5).tls_secret(ns.legacy, "legacy-tls"))
    server = tls_server(old)
    external = tls_server(CertificateAuthority("cdn root").issue(["cdn.test"], days=3))
    endpoints = [f"onto.test:{server.port}", f"cdn.test:{external.port}"]
    resolve = resolve_all("onto.test", "cdn.test")
    inventory = build_inventory(kube, endpoints, probe_timeout=2, trust_roots=[certificate_info(tls_ca.certificate)],
                                resolve=resolve)
    inventory.rows[:] = ours(inventory, ns)  # renew this test's certificates only, not other tests' on the server
    probe = functools.partial(probe_endpoint, timeout=1, resolve=resolve)
    return intermediate, server, endpoints, inventory, probe


def test_renewal_triggers_cert_manager_and_waits_until_the_new_certificate_is_served(
    tls_ca, tls_server, cert_manager, kube, ns
):
    intermediate, server, endpoints, inventory, probe = renewal_setup(tls_ca, tls_server, cert_manager, kube, ns)
    rows = certificates_to_renew(inventory)
    assert {(row.source, row.name) for row in rows} == {
        ("cert-manager", f"{ns.apps}/onto"), ("secret", f"{ns.legacy}/legacy-tls"), ("endpoint", endpoints[1])}
    new = intermediate.issue(["onto.test"], days=90)
    served_at: list[float] = []

    def reload_ingress() -> None:
        server.serve(new)
        served_at.append(time.monotonic())

    mark = cert_manager.audit_mark()
    thread, seen = play_cert_manager(cert_manager, ns.apps, "onto", new, then=reload_ingress)
    report = renew(kube, rows, dry_run=False, wait_timeout=10, probe=probe, poll_interval=0.05)
    finished = time.monotonic()
    thread.join(timeout=5)

    assert seen["issuing"]["reason"] == ISSUING_REASON and seen["issuing"]["message"] == ISSUING_MESSAGE
    generation = cert_manager.get_object(CM, "Certificate", "onto", ns.apps)["metadata"]["generation"]
    assert seen["issuing"]["observedGeneration"] == generation and seen["issuing"]["lastTransitionTime"].endswith("Z")
    assert [(e["verb"], e["objectRef"]["resource"], e["objectRef"].get("subresource"), e["objectRef"]["name"])
            for e in writes_since(cert_manager, mark)] == [("patch", "certificates", "status", "onto")]
    results = {r.name: r for r in report.results}
    onto = results[f"{ns.apps}/onto"]
    assert onto.action == "renewed", onto.detail
    assert (onto.revision_before, onto.revision_after) == (1, 2)
    assert onto.fingerprint_after == new.fingerprint and onto.served == (endpoints[0],)
    assert served_at and finished >= served_at[0], "renew returned before the new certificate was served"
    assert results[f"{ns.legacy}/legacy-tls"].action == "manual"
    assert f"kubectl create secret tls legacy-tls -n {ns.legacy}" in results[f"{ns.legacy}/legacy-tls"].detail
    assert results[endpoints[1]].action == "manual" and "not stored in this cluster" in results[endpoints[1]].detail
    table = {row["certificate"]: row for row in report.table_rows()}
    assert table[f"cert-manager {ns.apps}/onto"]["revision"] == "1 → 2"
    assert table[f"cert-manager {ns.apps}/onto"]["served at"]


def test_dry_run_patches_nothing_and_says_what_it_would_do(tls_ca, tls_server, cert_manager, kube, ns):
    _, _, endpoints, inventory, probe = renewal_setup(tls_ca, tls_server, cert_manager, kube, ns)
    before = cert_manager.get_object(CM, "Certificate", "onto", ns.apps)
    mark = cert_manager.audit_mark()
    report = renew(kube, certificates_to_renew(inventory), dry_run=True, wait_timeout=10, probe=probe)
    assert writes_since(cert_manager, mark) == []
    after = cert_manager.get_object(CM, "Certificate", "onto", ns.apps)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    onto = next(r for r in report.results if r.name == f"{ns.apps}/onto")
    assert onto.action == "would renew" and report.dry_run
    assert onto.detail.startswith(
        f"would set Issuing=True (ManuallyTriggered) on the status of Certificate {ns.apps}/onto")
    assert f"until {endpoints[0]} serve the new certificate" in onto.detail


def test_renewal_reports_a_failed_issuance_a_silent_controller_and_an_endpoint_that_never_reloads(
    tls_ca, tls_server, cert_manager, kube, ns
):
    intermediate, _, _, inventory, probe = renewal_setup(tls_ca, tls_server, cert_manager, kube, ns)
    [row] = [r for r in certificates_to_renew(inventory) if r.name == f"{ns.apps}/onto"]

    thread, _ = play_cert_manager(cert_manager, ns.apps, "onto", None, fail=True)
    failed = renew(kube, [row], dry_run=False, wait_timeout=5, probe=probe).results[0]
    thread.join(timeout=5)
    assert failed.action == "failed" and "issuer platform-ca is not ready" in failed.detail

    started = time.monotonic()
    silent = renew(kube, [row], dry_run=False, wait_timeout=1, probe=probe).results[0]
    assert silent.action == "failed" and time.monotonic() - started < 4
    assert f"timed out after 1 s waiting for Certificate {ns.apps}/onto" in silent.detail

    cert_manager.set_status(CM, "Certificate", "onto", ns.apps,
                            {"revision": 1, "conditions": [{"type": "Ready", "status": "True"}]})
    new = intermediate.issue(["onto.test"], days=90)
    thread, _ = play_cert_manager(cert_manager, ns.apps, "onto", new)
    not_reloaded = renew(kube, [row], dry_run=False, wait_timeout=5, serve_timeout=0.5, probe=probe,
                         poll_interval=0.1).results[0]
    thread.join(timeout=5)
    assert not_reloaded.action == "failed" and not_reloaded.fingerprint_after == new.fingerprint
    assert not_reloaded.not_served == (row.endpoints[0],) and "still serves sha256" in not_reloaded.detail


@contextlib.contextmanager
def _plain_text_server() -> Iterator[int]:
    """A TCP server that answers its first connection with an HTTP line: not TLS."""
    listener = socket.create_server((LOOPBACK, 0))

    def answer() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=2)
