"""etcd snapshots against a real etcd 3.4, restored on a scratch etcd member."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.drivers import DriverServices, build_driver
from ops_platform.backups.etcd_snapshot import EtcdSnapshotDriver, prefix_end
from ops_platform.backups.preflight import preflight_live
from ops_platform.local_servers.etcd import EtcdServer
from ops_platform.local_servers.process import ServerProcess, find_binary, free_port, port_is_open
from ops_platform.resources.object_store import LocalObjectStore, ObjectStore, S3ObjectStore, aws_client
from ops_platform.spec import Datastore, RestoreTest
from tests.fixtures.tls import CertificateAuthority
from tests.fixtures.backup_sources import (  # noqa: F401
    ETCD_KEYS,
    etcd_backup_source,
    etcd_put,
    free_port_pair,
    processes_mentioning,
)

PARTITION = "2026-11-22"
VERIFY_KEYS = ["/ontology/config/feature-1", "/ontology/*", "/missing/key"]


def datastore(endpoints: list[str], scratch: Path, **connection: Any) -> Datastore:
    return Datastore.model_validate(
        {
            "name": "etcd_control_plane",
            "engine": "etcd",
            "method": "snapshot",
            "connection": {"endpoints": endpoints, **connection},
            "restore_test": {
                "target": {"host": "127.0.0.1", "port": free_port_pair(), "data_dir": str(scratch)},
                "verify_keys": VERIFY_KEYS,
            },
        }
    )


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_snapshot_is_committed_verified_and_restored_on_a_scratch_member(
    store_kind: str, etcd_backup_source: EtcdServer, tmp_path: Path, request: pytest.FixtureRequest  # noqa: F811
) -> None:
    if store_kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store: ObjectStore = S3ObjectStore(aws_client("s3", region=None, endpoint_url=None, needed_for="test"), bucket)
    else:
        store = LocalObjectStore(tmp_path / "store")
    scratch = tmp_path / "restore-test" / "etcd"
    spec = datastore([etcd_backup_source.url], scratch)
    driver = EtcdSnapshotDriver()
    catalog = BackupCatalog(store, spec.name)

    manifest = catalog.run_backup(driver, spec, PARTITION)
    etcd_put(etcd_backup_source.url, "/ontology/after-the-backup", "x")  # not in the snapshot

    assert catalog.latest() == manifest
    assert manifest.counts == {"keys": ETCD_KEYS, "revision": ETCD_KEYS + 1}
    assert manifest.source_version.startswith("3.4")
    assert manifest.restore["source"] == {"endpoints": [etcd_backup_source.url]}
    assert catalog.verify_artifacts(manifest) == []
    verification = driver.verify(manifest, store)
    assert verification.ok, verification.problems
    assert verification.checked["revision"] == ETCD_KEYS + 1

    assert spec.restore_test is not None
    port = spec.restore_test.target.port
    with driver.restore(manifest, store, spec.restore_test, tmp_path) as restored:
        assert port_is_open("127.0.0.1", port)
        assert restored.counts() == manifest.counts
        results = restored.run_queries(VERIFY_KEYS)
        assert [(r.value, r.ok) for r in results] == [(1, True), (ETCD_KEYS, True), (0, False)]
    assert not port_is_open("127.0.0.1", port) and not port_is_open("127.0.0.1", port + 1)
    assert not scratch.exists()
    assert processes_mentioning(str(scratch)) == []


def test_a_dead_endpoint_is_skipped_for_the_next_one(etcd_backup_source: EtcdServer, tmp_path: Path) -> None:  # noqa: F811
    dead = f"http://127.0.0.1:{free_port()}"
    spec = datastore([dead, etcd_backup_source.url], tmp_path / "scratch")

    manifest = BackupCatalog(LocalObjectStore(tmp_path / "store"), spec.name).run_backup(
        EtcdSnapshotDriver(), spec, PARTITION
    )

    assert manifest.details["endpoint"] == etcd_backup_source.url
    assert manifest.counts["keys"] == ETCD_KEYS


def test_all_endpoints_down_fails_naming_them_and_the_setting(tmp_path: Path) -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    spec = datastore(dead, tmp_path / "scratch")
    store = LocalObjectStore(tmp_path / "store")

    with pytest.raises(BackupError) as failure:
        BackupCatalog(store, spec.name).run_backup(EtcdSnapshotDriver(), spec, PARTITION)

    message = str(failure.value)
    assert all(endpoint in message for endpoint in dead) and "connection.endpoints" in message
    assert list(store.list()) == []


def test_etcd_with_auth_is_backed_up_as_its_user_and_a_wrong_password_is_named_not_shown(
    etcd_backup_source: EtcdServer, tmp_path: Path  # noqa: F811
) -> None:
    etcdctl = [find_binary("etcdctl"), f"--endpoints={etcd_backup_source.url}"]
    subprocess.run([*etcdctl, "user", "add", "root:root-secret"], check=True, capture_output=True)
    subprocess.run([*etcdctl, "auth", "enable"], check=True, capture_output=True)
    spec = datastore([etcd_backup_source.url], tmp_path / "scratch", user="root", password_env="ETCD_PASSWORD")
    catalog = BackupCatalog(LocalObjectStore(tmp_path / "store"), spec.name)

    manifest = catalog.run_backup(EtcdSnapshotDriver(), spec, PARTITION, password="root-secret")
    with pytest.raises(BackupError, match="authentication failed") as failure:
        catalog.run_backup(EtcdSnapshotDriver(), spec, PARTITION, password="wrong-secret")

    assert manifest.counts["keys"] == ETCD_KEYS
    assert "wrong-secret" not in str(failure.value)


def snapshot_messages(url: str) -> list[bytes]:
    request = urllib.request.Request(f"{url}/v3/maintenance/snapshot", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return [line for line in response.read().splitlines(keepends=True) if line.strip()]


@contextmanager
def fake_gateway(snapshot_body: bytes) -> Iterator[str]:
    """An etcd gateway that answers /version and /v3/kv/range, and the snapshot with ``snapshot_body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer(json.dumps({"etcdserver": "3.4.23", "etcdcluster": "3.4.0"}).encode())

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/v3/maintenance/snapshot":
                self._answer(snapshot_body)
            else:
                self._answer(json.dumps({"header": {"revision": "41"}, "count": "40"}).encode())

        def _answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _flip_a_byte(messages: list[bytes]) -> bytes:
    first = json.loads(messages[0])
    blob = bytearray(base64.b64decode(first["result"]["blob"]))
    blob[len(blob) // 2] ^= 0xFF
    first["result"]["blob"] = base64.b64encode(bytes(blob)).decode()
    return json.dumps(first).encode() + b"\n" + b"".join(messages[1:])


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda messages: b"".join(messages[:-1]), "cut short or damaged"),
        (_flip_a_byte, "cut short or damaged"),
        (lambda messages: messages[0] + b'{"error":{"grpc_code":14,"message":"etcdserver: leader changed"}}\n',
         "failed the snapshot after .* bytes: etcdserver: leader changed"),
        (lambda messages: b"<html>proxy error</html>\n", "not the gateway's JSON"),
    ],
    ids=["cut-short", "damaged", "error-message", "not-json"],
)
def test_a_snapshot_stream_that_is_not_whole_commits_nothing(
    damage: Callable[[list[bytes]], bytes], problem: str, etcd_backup_source: EtcdServer, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    catalog = BackupCatalog(store, "etcd_control_plane")
    previous = catalog.run_backup(EtcdSnapshotDriver(), datastore([etcd_backup_source.url], tmp_path / "s"), PARTITION)

    with fake_gateway(damage(snapshot_messages(etcd_backup_source.url))) as url:
        with pytest.raises(BackupError, match=problem):
            catalog.run_backup(EtcdSnapshotDriver(), datastore([url], tmp_path / "s"), PARTITION)

    assert catalog.latest() == previous
    assert catalog.listing().orphans == []


def test_corrupt_artifact_fails_verify_and_restore(etcd_backup_source: EtcdServer, tmp_path: Path) -> None:  # noqa: F811
    store = LocalObjectStore(tmp_path / "store")
    scratch = tmp_path / "scratch"
    spec = datastore([etcd_backup_source.url], scratch)
    catalog = BackupCatalog(store, spec.name)
    driver = EtcdSnapshotDriver()
    manifest = catalog.run_backup(driver, spec, PARTITION)
    path = tmp_path / "store" / manifest.artifacts[0].key
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))

    problems = catalog.verify_artifacts(manifest)
    verification = driver.verify(manifest, store)

    assert len(problems) == 1 and "does not match the manifest" in problems[0]
    assert not verification.ok
    assert any("sha256" in p for p in verification.problems)
    assert any("SHA-256 etcd wrote" in p for p in verification.problems)
    assert spec.restore_test is not None
    with pytest.raises(RestoreError, match="read back with sha256"):
        with driver.restore(manifest, store, spec.restore_test, tmp_path):
            pass
    assert not scratch.exists()


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(lambda s, tmp: {"host": "localhost", "port": s.port, "data_dir": str(tmp / "scratch")}, id="address"),
        pytest.param(lambda s, tmp: {"host": "127.0.0.1", "port": free_port(), "data_dir": str(s.data_dir)}, id="data_dir"),
    ],
)
def test_restore_into_the_source_is_refused_before_anything_is_written(
    target: Callable[[EtcdServer, Path], dict[str, Any]], etcd_backup_source: EtcdServer, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    spec = datastore([etcd_backup_source.url], tmp_path / "unused", data_dir=str(etcd_backup_source.data_dir))
    driver = EtcdSnapshotDriver()
    manifest = BackupCatalog(store, spec.name).run_backup(driver, spec, PARTITION)
    source_files = sorted(str(p) for p in etcd_backup_source.data_dir.rglob("*"))

    with pytest.raises(RestoreRefused, match="refused"):
        with driver.restore(manifest, store, RestoreTest(target=target(etcd_backup_source, tmp_path)), tmp_path):
            pass

    assert sorted(str(p) for p in etcd_backup_source.data_dir.rglob("*")) == source_files
    assert not (tmp_path / "scratch").exists()


def test_prefix_end_covers_exactly_the_keys_under_a_prefix() -> None:
    assert prefix_end(b"/ontology/") == b"/ontology0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


# -- etcd over https with client certificates (as a cluster's own etcd is run) ---------------------


def _certificate(ca: CertificateAuthority, *usages: x509.ObjectIdentifier, ip: str | None = None
                 ) -> tuple[bytes, bytes]:
    """A certificate of ``ca`` with these extended key usages (etcd checks them), and its key, as PEM.

    etcd's own gateway dials etcd with the server certificate, so that one needs clientAuth as well.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip or "ops-platform-backup")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address(ip))]),
                                        critical=False)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A one-member etcd serving https and accepting only clients with a certificate of its CA."""
    ca = CertificateAuthority("etcd-ca")
    server_pem, server_key_pem = _certificate(ca, ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
                                              ip="127.0.0.1")
    client_pem, client_key_pem = _certificate(ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    pki = tmp_path / "pki"
    pki.mkdir()
    files = {}
    for name, content in (("ca_file", ca.pem), ("server", server_pem), ("server_key", server_key_pem),
                          ("cert_file", client_pem), ("key_file", client_key_pem)):
        (pki / f"{name}.pem").write_bytes(content)
        files[name] = str(pki / f"{name}.pem")
    port, peer = free_port(), free_port()
    url, peer_url = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    context = ssl.create_default_context(cafile=files["ca_file"])
    context.load_cert_chain(files["cert_file"], files["key_file"])

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=1, context=context) as response:
            return json.load(response).get("health") == "true"

    server = ServerProcess("etcd", [
        find_binary("etcd"), "--name", "tls", "--data-dir", str(tmp_path / "etcd-tls"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"tls={peer_url}", "--initial-cluster-state", "new",
        "--cert-file", files["server"], "--key-file", files["server_key"],
        "--trusted-ca-file", files["ca_file"], "--client-cert-auth",
        "--heartbeat-interval", "10", "--election-timeout", "100",
    ], log_path=tmp_path / "etcd-tls.log", ready=healthy, host="127.0.0.1", port=port).start()
    for i in range(3):
        body = json.dumps({"key": base64.b64encode(f"/ontology/tls-{i}".encode()).decode(),
                           "value": base64.b64encode(b"x").decode()}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{url}/v3/kv/put", data=body, method="POST"),
                               timeout=5, context=context).read()
    try:
        yield url, files
    finally:
        server.stop()


def test_https_etcd_is_backed_up_only_with_client_tls_material_from_the_spec(
    tls_etcd: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, files = tls_etcd
    scratch = tmp_path / "scratch"
    with pytest.raises(ValidationError, match=rf"connection.ca_file: endpoint {url} is TLS and etcd authenticates "
                                              r"clients by certificate; set connection.ca_file, connection.cert_file"):
        datastore([url], scratch)
    store = LocalObjectStore(tmp_path / "store")
    material = {name: files[name] for name in ("ca_file", "cert_file", "key_file")}
    spec = datastore([url], scratch, **material)
    without_certificate = EtcdSnapshotDriver(ssl_context=ssl.create_default_context(cafile=files["ca_file"]))
    with pytest.raises(BackupError, match=rf"cannot reach {url}"):
        BackupCatalog(store, spec.name).run_backup(without_certificate, spec, PARTITION)

    wrong_key = datastore([url], scratch, **{**material, "key_file": files["server_key"]})
    [problem] = preflight_live(wrong_key, EtcdSnapshotDriver(), operation="backup")
    assert problem.startswith(f"connection.cert_file: cannot load the client certificate {files['cert_file']} with "
                              f"key {files['server_key']}")
    assert preflight_live(spec, EtcdSnapshotDriver(), operation="backup") == []

    driver = build_driver(spec, DriverServices(kubernetes=lambda: None))
    manifest = BackupCatalog(store, spec.name).run_backup(driver, spec, PARTITION)
    assert manifest.counts["keys"] == 3
    assert spec.restore_test is not None
    with driver.restore(manifest, store, spec.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
