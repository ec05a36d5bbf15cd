"""etcd backups: a snapshot streamed from the v3 HTTP gateway, restored with ``etcdctl snapshot restore``.

Backup: ``POST /v3/maintenance/snapshot`` on the gRPC gateway of etcd 3.4+
answers newline-delimited JSON messages ``{"result": {"blob": <base64>}}``;
:class:`SnapshotStream` decodes them into ``store.put`` as they arrive, so no
file holds the snapshot on our side. etcd ends a snapshot with the SHA-256 of
everything before it; the stream checks it and fails the read (so the put
rolls back) when it does not match, which is also how a cut-off stream shows.

Counts: ``{"keys": n, "revision": r}``, the number of keys at revision ``r``
read just before the snapshot (the snapshot holds revision ``r`` and possibly
a few later ones). A restore holds the whole history up to the snapshot, so
:meth:`RestoredEtcd.counts` counts the keys at that same revision ``r``: the
comparison is exact even when the source was written to meanwhile.

Restore: ``etcdctl snapshot restore`` into ``restore_test.target.data_dir``,
then a one-member etcd there on ``restore_test.target.port`` (peer port +1);
both removed on exit.

TLS: an etcd that serves https and authenticates clients by certificate
(``--client-cert-auth``, as a cluster's own etcd runs) is reached with the
spec's ``connection.ca_file``, ``cert_file`` and ``key_file``
(:func:`client_ssl_context`, which the driver factory passes as
``ssl_context``); the spec refuses https endpoints without them. A managed
control plane (EKS) exposes no etcd at all: it is not a datastore of ours.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC
from functools import partial
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

from ops_platform.backups.base import (
    Artifact,
    BackupError,
    BackupJob,
    BackupOutcome,
    QueryResult,
    key_query,
    RestoreError,
    RestoreRefused,
    Verification,
    iter_chunks,
)
from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.restore_target import refuse_restore_into_source, scratch_data_dir, source_of
from ops_platform.errors import OpsPlatformError
from ops_platform.local_servers.etcd import EtcdServer, start_etcd
from ops_platform.local_servers.process import ServerStartError, find_binary, port_is_open
from ops_platform.resources.object_store import ObjectStore
from ops_platform.spec import Connection, RestoreTest

ARTIFACT_NAME = "snapshot.db"
CONTENT_TYPE = "application/x-etcd-snapshot"
DEFAULT_PORT = 2379
ENDPOINTS_SETTING = "connection.endpoints in the platform spec"
TARGET_SETTING = "restore_test.target"
RESTORED_MEMBER = "restore-test"
TRAILER_SIZE = 32  # etcd appends the SHA-256 of the database to a snapshot
ALL_KEYS = b"\0"  # as key and range_end: every key
MAX_MESSAGE_LINE = 16 * 1024 * 1024  # one JSON message of the snapshot stream (etcd sends 32 KiB blobs)


class EtcdError(OpsPlatformError):
    """An etcd gateway call failed; the message names the endpoint and the setting."""


def client_ssl_context(connection: Connection) -> ssl.SSLContext | None:
    """The TLS context of ``connection``'s client material (``ca_file``, ``cert_file``, ``key_file``), None without.

    etcd's CA is the one trusted (not the system's); the client certificate
    is what an etcd started with ``--client-cert-auth`` requires.
    """
    if not (connection.ca_file or connection.cert_file):
        return None
    try:
        context = ssl.create_default_context(cafile=connection.ca_file)
    except (OSError, ssl.SSLError) as error:
        raise EtcdError(f"connection.ca_file: cannot load {connection.ca_file} as a CA certificate "
                        f"({getattr(error, 'strerror', None) or error}); check the path and that this process may "
                        "read it") from None
    if connection.cert_file:
        try:
            context.load_cert_chain(connection.cert_file, connection.key_file)
        except (OSError, ssl.SSLError) as error:
            raise EtcdError(f"connection.cert_file: cannot load the client certificate {connection.cert_file} with "
                            f"key {connection.key_file} ({getattr(error, 'strerror', None) or error}); check both "
                            "paths, that they are PEM and that the key is the certificate's") from None
    return context


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else ALL_KEYS


class EtcdGateway:
    """The v3 JSON gateway of one etcd endpoint (``http://host:2379``)."""

    def __init__(
        self,
        endpoint: str,
        *,
        setting: str = ENDPOINTS_SETTING,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.setting = setting
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.token = token

    def open(self, path: str, body: dict[str, Any] | None = None) -> HTTPResponse:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = self.token
        request = urllib.request.Request(
            f"{self.endpoint}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            method="GET" if body is None else "POST",
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout, context=self.ssl_context)
        except urllib.error.HTTPError as error:
            raise EtcdError(f"etcd at {self.endpoint}{path}: {self._error_message(error)} (check {self.setting})") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            reason = getattr(reason, "strerror", None) or str(reason)
            raise EtcdError(f"etcd: cannot reach {self.endpoint} ({reason}) (check {self.setting})") from None

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.open(path, body) as response:
            raw = response.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise EtcdError(f"etcd at {self.endpoint}{path} did not answer JSON ({raw[:80]!r}) (check {self.setting})")
        return answer

    @staticmethod
    def _error_message(error: urllib.error.HTTPError) -> str:
        try:
            answer = json.loads(error.read())
            message = answer.get("message") or answer.get("error")
        except (ValueError, AttributeError):
            message = None
        return f"HTTP {error.code}: {message or error.reason}"

    def version(self) -> str:
        return str(self.call("/version").get("etcdserver", "unknown"))

    def authenticate(self, user: str, password: str) -> None:
        """Log in (etcd auth enabled); later calls carry the token."""
        self.token = str(self.call("/v3/auth/authenticate", {"name": user, "password": password}).get("token", ""))

    def count(self, key: bytes = ALL_KEYS, range_end: bytes | None = ALL_KEYS, revision: int | None = None) -> tuple[int, int]:
        """(keys in [key, range_end) at ``revision`` or now, the store's current revision)."""
        body: dict[str, Any] = {"key": _b64(key), "count_only": True}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if revision is not None:
            body["revision"] = revision
        answer = self.call("/v3/kv/range", body)
        return int(answer.get("count", 0)), int(answer["header"]["revision"])

    def snapshot(self) -> SnapshotStream:
        return SnapshotStream(self.open("/v3/maintenance/snapshot", {}), self.endpoint)


class SnapshotStream:
    """The bytes of a snapshot from the gateway's JSON messages, checked against etcd's SHA-256 trailer."""

    def __init__(self, response: HTTPResponse, endpoint: str) -> None:
        self.endpoint = endpoint
        self.bytes_read = 0
        self._response = response
        self._pending = b""
        self._tail = b""  # the last TRAILER_SIZE bytes seen, not yet hashed
        self._digest = hashlib.sha256()
        self._ended = False
        self.failure: BackupError | None = None  # why a read failed, for the caller's message

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            while not self._ended and (size < 0 or len(self._pending) < size):
                if not self._next_blob():
                    self._check_trailer()
                    self._ended = True
        except BackupError as error:
            self.failure = error
            raise
        if size < 0:
            size = len(self._pending)
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def _next_blob(self) -> bool:
        try:
            line = self._response.readline(MAX_MESSAGE_LINE)
        except OSError as error:
            raise BackupError(f"etcd: reading the snapshot from {self.endpoint} failed after {self.bytes_read} bytes: {error}") from None
        if not line:
            return False
        try:
            message = json.loads(line)
            if "error" in message:
                error = message["error"]
                text = error.get("message", error) if isinstance(error, dict) else error
                raise BackupError(f"etcd: {self.endpoint} failed the snapshot after {self.bytes_read} bytes: {text}")
            blob = base64.b64decode(message["result"].get("blob", ""), validate=True)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackupError(
                f"etcd: {self.endpoint} sent a snapshot message that is not the gateway's JSON ({line[:80]!r})"
            ) from None
        self.bytes_read += len(blob)
        self._pending += blob
        seen = self._tail + blob
        self._digest.update(seen[:-TRAILER_SIZE])
        self._tail = seen[-TRAILER_SIZE:]
        return True

    def _check_trailer(self) -> None:
        if self.bytes_read <= TRAILER_SIZE:
            raise BackupError(f"etcd: {self.endpoint} sent an empty snapshot ({self.bytes_read} bytes)")
        if self._digest.digest() != self._tail:
            raise BackupError(
                f"etcd: the snapshot from {self.endpoint} ({self.bytes_read} bytes) does not end with the "
                "SHA-256 of its content: it was cut short or damaged"
            )

    def close(self) -> None:
        self._response.close()


def snapshot_integrity(path: Path) -> tuple[str, bool]:
    """(sha256 of the file, whether its last 32 bytes are the SHA-256 of the rest)."""
    whole = hashlib.sha256()
    content = hashlib.sha256()
    tail = b""
    with open(path, "rb") as stream:
        for chunk in iter_chunks(stream):
            whole.update(chunk)
            seen = tail + chunk
            content.update(seen[:-TRAILER_SIZE])
            tail = seen[-TRAILER_SIZE:]
    return whole.hexdigest(), len(tail) == TRAILER_SIZE and content.digest() == tail


def etcdctl_env() -> dict[str, str]:
    """Our environment for etcdctl, without ETCDCTL_* settings that could point it elsewhere."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ETCDCTL_")}
    return {**env, "ETCDCTL_API": "3"}


def the_artifact(manifest: BackupManifest) -> Artifact:
    for artifact in manifest.artifact_list():
        if artifact.name == ARTIFACT_NAME:
            return artifact
    raise RestoreRefused(f"backup {manifest.backup_id} of '{manifest.datastore}' has no {ARTIFACT_NAME} artifact")


def _copy(store: ObjectStore, artifact: Artifact, path: Path) -> None:
    with store.get(artifact.key) as stream, open(path, "wb") as out:
        for chunk in iter_chunks(stream):
            out.write(chunk)


class EtcdSnapshotDriver:
    """``engine: etcd, method: snapshot`` (see the module docstring).

    ``etcdctl``: the etcdctl binary (default: on PATH); ``ssl_context``: for
    https endpoints (client certificates of the cluster's etcd); the user in
    ``connection.user`` with the backup's password logs in when etcd auth is on.
    """

    engine = "etcd"
    method = "snapshot"

    def __init__(
        self,
        *,
        etcdctl: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        start_scratch_server: Callable[..., EtcdServer] = start_etcd,
        timeout: float = 30.0,
    ) -> None:
        self._etcdctl = etcdctl
        self.ssl_context = ssl_context
        self.start_scratch_server = start_scratch_server
        self.timeout = timeout

    @property
    def etcdctl(self) -> str:
        return self._etcdctl or find_binary("etcdctl")

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        conn = datastore.connection
        try:
            gateway, version = self._first_answering(conn.endpoints or [])
            if conn.user:
                gateway.authenticate(conn.user, job.password or "")
            keys, revision = gateway.count()
            started = job.now().astimezone(UTC)
            snapshot = gateway.snapshot()
        except EtcdError as error:
            raise BackupError(f"backup of '{datastore.name}' failed: {error}") from None
        key = job.artifact_key(ARTIFACT_NAME)
        try:
            stored = job.store.put(key, snapshot, content_type=CONTENT_TYPE)  # type: ignore[arg-type]
        except Exception as error:
            reason = snapshot.failure or error
            raise BackupError(
                f"backup of '{datastore.name}' failed: {reason}; nothing was stored at {job.store.url(key)}"
            ) from error
        finally:
            snapshot.close()
        try:
            _, revision_after = gateway.count()
        except EtcdError:
            revision_after = None
        return BackupOutcome(
            artifacts=(Artifact.from_stored(ARTIFACT_NAME, stored),),
            source_version=version,
            recovery_point=started,
            restore={
                "format": "etcd-snapshot",
                "artifact": ARTIFACT_NAME,
                "etcd_version": version,
                "revision": revision,
                "source": source_of(conn),
            },
            counts={"keys": keys, "revision": revision},
            details={
                "endpoint": gateway.endpoint,
                "revision_after": revision_after,
                "counts_measured": f"keys at revision {revision}, read just before the snapshot",
            },
        )

    def _first_answering(self, endpoints: list[str]) -> tuple[EtcdGateway, str]:
        failures = []
        for endpoint in endpoints:
            gateway = EtcdGateway(endpoint, timeout=self.timeout, ssl_context=self.ssl_context)
            try:
                return gateway, gateway.version()
            except EtcdError as error:
                failures.append(str(error))
        raise EtcdError("; ".join(failures) or f"no endpoint configured (check {ENDPOINTS_SETTING})")

    def verify(self, manifest: BackupManifest, store: ObjectStore) -> Verification:
        """The manifest's sha256, etcd's own SHA-256 trailer, and ``etcdctl snapshot status`` (needs a file)."""
        artifact = the_artifact(manifest)
        problems: list[str] = []
        with tempfile.TemporaryDirectory(prefix="ops-etcd-verify-") as folder:
            path = Path(folder) / ARTIFACT_NAME
            _copy(store, artifact, path)
            sha256, trailer_ok = snapshot_integrity(path)
            status = subprocess.run(
                [self.etcdctl, "snapshot", "status", str(path), "--write-out=json"],
                capture_output=True, text=True, env=etcdctl_env(),
            )
        if sha256 != artifact.sha256:
            problems.append(f"{artifact.url}: sha256 {sha256} does not match the manifest's {artifact.sha256}")
        if not trailer_ok:
            problems.append(f"{artifact.url}: does not end with the SHA-256 etcd wrote after the snapshot's content")
        checked: dict[str, Any] = {"sha256": sha256}
        if status.returncode != 0:
            problems.append(f"{artifact.url}: etcdctl snapshot status failed: {status.stderr.strip()[-300:]}")
        else:
            checked.update(json.loads(status.stdout))
            recorded = manifest.counts.get("revision", 0)
            if int(checked.get("revision", 0)) < recorded:
                problems.append(
                    f"{artifact.url}: holds revision {checked.get('revision')}, older than the recorded {recorded}"
                )
        return Verification(ok=not problems, problems=tuple(problems), checked=checked)

    @contextmanager
    def restore(
        self, manifest: BackupManifest, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> Iterator[RestoredEtcd]:
        target = restore_test.target
        missing = [name for name in ("host", "port", "data_dir") if not getattr(target, name)]
        if missing:
            raise RestoreError(f"an etcd restore test needs {', '.join(f'{TARGET_SETTING}.{n}' for n in missing)}")
        host, port = str(target.host), int(target.port)  # type: ignore[arg-type]
        refuse_restore_into_source(
            manifest.datastore, manifest.restore.get("source"), target, default_port=DEFAULT_PORT, compare_database=False
        )
        artifact = the_artifact(manifest)
        busy = [p for p in (port, port + 1) if port_is_open(host, p)]
        if busy:
            raise RestoreError(
                f"restore of '{manifest.datastore}': something already listens on {host}:{busy[0]}; the scratch "
                f"etcd needs {TARGET_SETTING}.port and the port after it (its peer port) free"
            )
        with ExitStack() as cleanup:
            scratch = cleanup.enter_context(scratch_data_dir(str(target.data_dir), f"{TARGET_SETTING}.data_dir"))
            snapshot = scratch / ARTIFACT_NAME
            _copy(store, artifact, snapshot)
            sha256, _ = snapshot_integrity(snapshot)
            if sha256 != artifact.sha256:
                raise RestoreError(
                    f"restore of '{manifest.datastore}': {artifact.url} read back with sha256 {sha256}, "
                    f"the manifest says {artifact.sha256}"
                )
            member_dir = scratch / "member"
            self._etcdctl_restore(manifest, snapshot, member_dir, f"http://{host}:{port + 1}")
            snapshot.unlink()
            try:
                server = self.start_scratch_server(member_dir, port, port + 1, host=host, name=RESTORED_MEMBER)
            except ServerStartError as error:
                raise RestoreError(
                    f"restore of '{manifest.datastore}': the scratch etcd on {host}:{port} did not start "
                    f"(check {TARGET_SETTING}.port and .data_dir): {error}"
                ) from error
            cleanup.callback(server.stop)
            yield RestoredEtcd(
                description=f"etcd {server.url} (scratch member in {target.data_dir})",
                gateway=EtcdGateway(server.url, setting=f"{TARGET_SETTING}.host/port"),
                recorded_revision=manifest.counts.get("revision"),
            )

    def _etcdctl_restore(self, manifest: BackupManifest, snapshot: Path, member_dir: Path, peer_url: str) -> None:
        result = subprocess.run(
            [
                self.etcdctl, "snapshot", "restore", str(snapshot),
                f"--data-dir={member_dir}",
                f"--name={RESTORED_MEMBER}",
                f"--initial-cluster={RESTORED_MEMBER}={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
            ],
            capture_output=True, text=True, env=etcdctl_env(),
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
            raise RestoreError(
                f"restore of '{manifest.datastore}': etcdctl snapshot restore of backup {manifest.backup_id} "
                f"failed with code {result.returncode}: {tail}"
            )


@dataclass(frozen=True)
class RestoredEtcd:
    """A scratch etcd member restored from a snapshot; see :class:`ops_platform.backups.base.Restored`."""

    description: str
    gateway: EtcdGateway
    recorded_revision: int | None = None

    def counts(self) -> dict[str, int]:
        """Keys at the backup's recorded revision, when the restored history reaches it.

        ``revision`` is the recorded one when the restore holds it, else the
        restored (older) revision, which then differs from the manifest.
        """
        keys, revision = self.gateway.count()
        if self.recorded_revision is None or revision < self.recorded_revision:
            return {"keys": keys, "revision": revision}
        keys_then, _ = self.gateway.count(revision=self.recorded_revision)
        return {"keys": keys_then, "revision": self.recorded_revision}

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        """``verify_keys``: a key must exist; ``prefix*`` needs at least one key under the prefix. Value: keys found."""
        return [key_query(query, partial(self._count, query), (EtcdError,)) for query in queries]

    def _count(self, query: str) -> int:
        key = query.encode()
        if query.endswith("*"):
            prefix = key[:-1]
            found, _ = self.gateway.count(prefix or ALL_KEYS, prefix_end(prefix) if prefix else ALL_KEYS)
        else:
            found, _ = self.gateway.count(key, None)
        return found


__all__ = [
    "ARTIFACT_NAME",
    "EtcdError",
    "EtcdGateway",
    "EtcdSnapshotDriver",
    "RestoredEtcd",
    "SnapshotStream",
    "prefix_end",
    "snapshot_integrity",
]
