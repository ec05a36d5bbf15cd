"""Redis backups: an RDB snapshot streamed into the object store, restored on a scratch Redis.

The RDB of a production Redis lives on that server's disk, not ours, so the
snapshot is fetched over the network with the replication protocol, as
``redis-cli --rdb`` does: ``REPLCONF rdb-only 1`` then ``SYNC`` makes the
server fork, write a fresh RDB (a BGSAVE of its own, during which it sends
newline keepalives) and send it as one ``$<length>\\r\\n<bytes>`` bulk payload,
which :class:`ReplicationRdb` hands to ``store.put`` as it arrives. A payload
cut short fails the read, so the put rolls back. The user needs the SYNC
command (the default user has it; managed services like ElastiCache refuse it).

``fetch="server_file"`` is for a Redis whose disk is this machine's (the
sandbox): ``BGSAVE`` (waiting out one already in progress), wait until
``rdb_bgsave_in_progress:0`` and ``rdb_last_bgsave_status:ok``, then stream the
file named by ``CONFIG GET dir`` / ``dbfilename``.

Counts are ``DBSIZE`` per database from ``INFO keyspace`` just before the
snapshot; writes between that and the fork make them differ from the RDB, so
the keyspace is read again after the snapshot: ``details.counts_stable`` says
whether it moved and ``restore.counts_tolerance`` is how far (relative), which
the restore test allows. Keys whose TTL runs out before the restore are not
loaded, so a restore long after the backup can count fewer.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

import redis

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
from ops_platform.local_servers.process import ServerStartError, find_binary, port_is_open
from ops_platform.local_servers.redis import RedisServer, start_redis
from ops_platform.resources.datastores import RedisEndpoint
from ops_platform.resources.object_store import ObjectStore
from ops_platform.spec import RestoreTest

ARTIFACT_NAME = "dump.rdb"
CONTENT_TYPE = "application/x-redis-rdb"
DEFAULT_PORT = 6379
TARGET_SETTING = "restore_test.target"
RDB_MAGIC = b"REDIS"
Fetch = Literal["replication", "server_file"]
_GLOB = re.compile(r"[*?\[]")
_MAX_REPLY_LINE = 1024  # a status line; anything longer is not Redis talking


def keyspace_counts(client: redis.Redis) -> dict[str, int]:
    """``{"keys:db0": 201, ...}`` from ``INFO keyspace`` (databases without keys are absent)."""
    keyspace = client.info("keyspace")
    return {f"keys:{db}": int(stats["keys"]) for db, stats in sorted(keyspace.items()) if isinstance(stats, dict)}


def counts_drift(before: dict[str, int], after: dict[str, int]) -> float:
    """The largest relative change of a database's key count between two readings (0.0: none)."""
    drift = 0.0
    for name in set(before) | set(after):
        was, now = before.get(name, 0), after.get(name, 0)
        drift = max(drift, abs(now - was) / max(was, 1))
    return round(drift, 6)


def _command(*args: str | bytes) -> bytes:
    parts = [arg.encode() if isinstance(arg, str) else arg for arg in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


class ReplicationRdb:
    """A fresh RDB of a Redis server, read over the replication protocol as a stream.

    :meth:`fetch` connects, authenticates and sends ``SYNC``; ``read`` then
    returns the payload's bytes and raises :class:`BackupError` if the
    connection ends before ``length`` bytes, or does not carry an RDB.
    """

    def __init__(self, address: str, sock: socket.socket, reader: IO[bytes], length: int) -> None:
        self.address = address
        self.length = length
        self.bytes_read = 0
        self.rdb_version: int | None = None
        self.failure: BackupError | None = None  # why a read failed, for the caller's message
        self._sock = sock
        self._reader = reader

    @classmethod
    def fetch(
        cls,
        host: str,
        port: int,
        password: str | None,
        *,
        setting: str,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        snapshot_timeout: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> ReplicationRdb:
        address = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as error:
            raise BackupError(
                f"redis: cannot connect to {address} to fetch an RDB ({error.strerror or error}) (check {setting})"
            ) from None
        sock.settimeout(read_timeout)
        reader = sock.makefile("rb")
        try:
            if password:
                cls._expect_ok(sock, reader, address, _command("AUTH", password), "AUTH", secret=password)
            sock.sendall(_command("REPLCONF", "rdb-only", "1"))
            reader.readline(_MAX_REPLY_LINE)  # servers before 7.0 do not know rdb-only; they send the same RDB
            sock.sendall(_command("SYNC"))
            length = cls._payload_length(reader, address, clock() + snapshot_timeout, clock)
        except OSError as error:
            reader.close()
            sock.close()
            raise BackupError(f"redis: fetching an RDB from {address} failed: {error}") from None
        except BaseException:
            reader.close()
            sock.close()
            raise
        return cls(address, sock, reader, length)

    @staticmethod
    def _expect_ok(
        sock: socket.socket, reader: IO[bytes], address: str, command: bytes, name: str, secret: str | None = None
    ) -> None:
        sock.sendall(command)
        reply = reader.readline(_MAX_REPLY_LINE).decode(errors="replace").strip()
        if reply != "+OK":
            if secret:
                reply = reply.replace(secret, "***")
            raise BackupError(f"redis: {name} refused by {address}: {reply or 'connection closed'}")

    @staticmethod
    def _payload_length(reader: IO[bytes], address: str, deadline: float, clock: Callable[[], float]) -> int:
        while True:
            line = reader.readline(_MAX_REPLY_LINE)
            if line == b"\n":  # keepalive while the server writes the snapshot
                if clock() > deadline:
                    raise BackupError(f"redis: {address} did not send its RDB within the snapshot timeout")
                continue
            if not line:
                raise BackupError(f"redis: {address} closed the connection before sending its RDB")
            if line.startswith(b"-"):
                raise BackupError(f"redis: {address} refused SYNC: {line[1:].decode(errors='replace').strip()}")
            match = re.fullmatch(rb"\$(\d+)\r\n", line)
            if not match:
                raise BackupError(
                    f"redis: {address} did not answer SYNC like a Redis server ({line[:60]!r})"
                )
            return int(match.group(1))

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._read(size)
        except BackupError as error:
            self.failure = error
            raise

    def _read(self, size: int) -> bytes:
        remaining = self.length - self.bytes_read
        if remaining <= 0:
            return b""
        wanted = remaining if size is None or size < 0 else min(size, remaining)
        try:
            data = self._reader.read(wanted)
        except OSError as error:
            raise BackupError(
                f"redis: reading the RDB from {self.address} failed after {self.bytes_read} of "
                f"{self.length} bytes: {error}"
            ) from None
        if not data:
            raise BackupError(
                f"redis: {self.address} closed the connection after {self.bytes_read} of {self.length} bytes of its RDB"
            )
        if self.bytes_read == 0:
            self.rdb_version = rdb_version(data, self.address)
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


def rdb_version(head: bytes, where: str) -> int:
    """The format version from an RDB's first 9 bytes (``REDIS0010`` -> 10)."""
    if not head.startswith(RDB_MAGIC) or not head[5:9].isdigit():
        raise BackupError(f"redis: what {where} sent is not an RDB file (starts with {head[:9]!r})")
    return int(head[5:9])


class RdbFile:
    """An RDB file on this machine as a stream that checks its magic."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rdb_version: int | None = None
        self.failure: BackupError | None = None
        self._file = open(path, "rb")

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        at_start = self._file.tell() == 0
        data = self._file.read(size)
        if at_start:
            try:
                self.rdb_version = rdb_version(data, str(self.path))
            except BackupError as error:
                self.failure = error
                raise
        return data

    def close(self) -> None:
        self._file.close()


def bgsave_and_wait(
    client: redis.Redis,
    address: str,
    *,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_interval: float = 0.05,
) -> None:
    """Run a BGSAVE that starts now and wait until it has succeeded.

    A BGSAVE already in progress started before us: wait for it, then start
    ours. Done when ``rdb_bgsave_in_progress:0`` and the save counter or
    ``LASTSAVE`` moved past what they were before ours; then
    ``rdb_last_bgsave_status`` must be ``ok``.
    """
    deadline = clock() + timeout

    def persistence() -> dict[str, Any]:
        if clock() > deadline:
            raise BackupError(f"redis: BGSAVE on {address} did not finish within {timeout:g} s")
        return client.info("persistence")

    while True:
        before = persistence()
        try:
            client.bgsave(schedule=True)
            break
        except redis.ResponseError as error:
            if "already in progress" not in str(error):
                raise BackupError(f"redis: BGSAVE refused by {address}: {error}") from None
        while persistence()["rdb_bgsave_in_progress"]:
            sleep(poll_interval)
    while True:
        state = persistence()
        moved = state.get("rdb_saves", 0) > before.get("rdb_saves", 0) or (
            state["rdb_last_save_time"] > before["rdb_last_save_time"]
        )
        if moved and not state["rdb_bgsave_in_progress"]:
            break
        sleep(poll_interval)
    if state["rdb_last_bgsave_status"] != "ok":
        raise BackupError(
            f"redis: BGSAVE on {address} failed (rdb_last_bgsave_status:{state['rdb_last_bgsave_status']}); "
            "check the server's log and the free space of its data directory"
        )


def the_artifact(manifest: BackupManifest) -> Artifact:
    for artifact in manifest.artifact_list():
        if artifact.name == ARTIFACT_NAME:
            return artifact
    raise RestoreRefused(f"backup {manifest.backup_id} of '{manifest.datastore}' has no {ARTIFACT_NAME} artifact")


def copy_checked(store: ObjectStore, artifact: Artifact, path: Path) -> str:
    """Copy an artifact to a file (for tools that need one); returns the sha256 of what was read."""
    digest = hashlib.sha256()
    with store.get(artifact.key) as stream, open(path, "wb") as out:
        for chunk in iter_chunks(stream):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


class RedisRdbDriver:
    """``engine: redis, method: rdb`` (see the module docstring).

    ``fetch``: ``"replication"`` (any reachable server) or ``"server_file"``
    (BGSAVE and read the file; the server's disk must be this machine's).
    ``target_password``: requirepass of the scratch Redis of a restore test
    (from the target's ``password_env``), None for none.
    ``redis_check_rdb``: path of the checker used by :meth:`verify`.
    """

    engine = "redis"
    method = "rdb"

    def __init__(
        self,
        *,
        fetch: Fetch = "replication",
        target_password: str | None = None,
        redis_check_rdb: str | None = None,
        start_scratch_server: Callable[..., RedisServer] = start_redis,
        socket_timeout: float = 30.0,
        snapshot_timeout: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if fetch not in ("replication", "server_file"):
            raise ValueError(f"fetch must be 'replication' or 'server_file', not {fetch!r}")
        self.fetch = fetch
        self.target_password = target_password
        self._redis_check_rdb = redis_check_rdb
        self.start_scratch_server = start_scratch_server
        self.socket_timeout = socket_timeout
        self.snapshot_timeout = snapshot_timeout
        self.clock = clock
        self.sleep = sleep

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        conn = datastore.connection
        assert conn.host and conn.port  # the spec requires them
        endpoint = RedisEndpoint(
            name=datastore.name,
            host=conn.host,
            port=conn.port,
            password=job.password,
            password_env=conn.password_env or "",
            socket_timeout=self.socket_timeout,
        )
        try:
            client = endpoint.client()
        except OpsPlatformError as error:
            raise BackupError(f"backup of '{datastore.name}' failed: {error}") from None
        with client:
            try:
                version = str(client.info("server")["redis_version"])
                counts = keyspace_counts(client)
                started = job.now().astimezone(UTC)
                source = self._open_snapshot(client, endpoint)
            except redis.RedisError as error:
                raise BackupError(
                    f"backup of '{datastore.name}' failed: redis at {endpoint.address}: {error} "
                    "(check connection.host/port in the platform spec)"
                ) from None
            key = job.artifact_key(ARTIFACT_NAME)
            try:
                stored = job.store.put(key, source, content_type=CONTENT_TYPE)  # type: ignore[arg-type]
            except Exception as error:
                reason = source.failure or error
                raise BackupError(
                    f"backup of '{datastore.name}' failed: {reason}; nothing was stored at {job.store.url(key)}"
                ) from error
            finally:
                source.close()
            counts_after = keyspace_counts(client)
        return BackupOutcome(
            artifacts=(Artifact.from_stored(ARTIFACT_NAME, stored),),
            source_version=version,
            recovery_point=started,
            restore={
                "format": "rdb",
                "artifact": ARTIFACT_NAME,
                "rdb_version": source.rdb_version,
                "redis_version": version,
                "fetch": self.fetch,
                "source": source_of(conn),
                # The RDB holds a keyspace between the two readings; a restore test allows that much.
                "counts_tolerance": counts_drift(counts, counts_after),
            },
            counts=counts,
            details={
                "fetch": self.fetch,
                "keys": sum(counts.values()),
                "counts_measured": "INFO keyspace just before the snapshot",
                "counts_stable": counts == counts_after,
            },
        )

    def _open_snapshot(self, client: redis.Redis, endpoint: RedisEndpoint) -> ReplicationRdb | RdbFile:
        if self.fetch == "replication":
            return ReplicationRdb.fetch(
                endpoint.host,
                endpoint.port,
                endpoint.password,
                setting="connection.host/port in the platform spec",
                connect_timeout=self.socket_timeout,
                read_timeout=self.socket_timeout,
                snapshot_timeout=self.snapshot_timeout,
                clock=self.clock,
            )
        bgsave_and_wait(client, endpoint.address, timeout=self.snapshot_timeout, clock=self.clock, sleep=self.sleep)
        settings = client.config_get("dir") | client.config_get("dbfilename")
        path = Path(settings["dir"]) / settings["dbfilename"]
        try:
            return RdbFile(path)
        except OSError as error:
            raise BackupError(
                f"redis: the RDB of {endpoint.address} ({path}) cannot be read here ({error.strerror}); "
                "fetch='server_file' needs the server's disk on this machine, use fetch='replication'"
            ) from None

    @property
    def redis_check_rdb(self) -> str:
        return self._redis_check_rdb or find_binary("redis-check-rdb")

    def verify(self, manifest: BackupManifest, store: ObjectStore) -> Verification:
        """``redis-check-rdb`` (structure and the RDB's own CRC64) on a temporary copy; the tool needs a file."""
        artifact = the_artifact(manifest)
        problems: list[str] = []
        with tempfile.TemporaryDirectory(prefix="ops-rdb-verify-") as folder:
            path = Path(folder) / ARTIFACT_NAME
            sha256 = copy_checked(store, artifact, path)
            check = subprocess.run([self.redis_check_rdb, str(path)], capture_output=True, text=True)
        if sha256 != artifact.sha256:
            problems.append(f"{artifact.url}: sha256 {sha256} does not match the manifest's {artifact.sha256}")
        output = (check.stdout + check.stderr).strip()
        if check.returncode != 0 or "RDB looks OK" not in output:
            tail = "\n".join(output.splitlines()[-5:])
            problems.append(f"{artifact.url}: redis-check-rdb failed with code {check.returncode}: {tail}")
        keys = re.search(r"\[info\] (\d+) keys read", output)
        return Verification(
            ok=not problems,
            problems=tuple(problems),
            checked={"sha256": sha256, "keys_read": int(keys.group(1)) if keys else None},
        )

    @contextmanager
    def restore(
        self, manifest: BackupManifest, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> Iterator[RestoredRedis]:
        target = restore_test.target
        missing = [name for name in ("host", "port", "data_dir") if not getattr(target, name)]
        if missing:
            raise RestoreError(
                f"a Redis restore test needs {', '.join(f'{TARGET_SETTING}.{name}' for name in missing)}"
            )
        host, port = str(target.host), int(target.port)  # type: ignore[arg-type]
        refuse_restore_into_source(
            manifest.datastore, manifest.restore.get("source"), target, default_port=DEFAULT_PORT, compare_database=False
        )
        artifact = the_artifact(manifest)
        if port_is_open(host, port):
            raise RestoreError(
                f"restore of '{manifest.datastore}': something already listens on {host}:{port}; the scratch "
                f"Redis needs a free port (check {TARGET_SETTING}.port)"
            )
        with ExitStack() as cleanup:
            scratch = cleanup.enter_context(scratch_data_dir(str(target.data_dir), f"{TARGET_SETTING}.data_dir"))
            data_dir = scratch / "data"
            data_dir.mkdir()
            sha256 = copy_checked(store, artifact, data_dir / ARTIFACT_NAME)
            if sha256 != artifact.sha256:
                raise RestoreError(
                    f"restore of '{manifest.datastore}': {artifact.url} read back with sha256 {sha256}, "
                    f"the manifest says {artifact.sha256}"
                )
            try:
                server = self.start_scratch_server(
                    data_dir, port, host=host, password=self.target_password, rdb_filename=ARTIFACT_NAME, save=""
                )
            except ServerStartError as error:
                raise RestoreError(
                    f"restore of '{manifest.datastore}': the scratch Redis on {host}:{port} did not load the "
                    f"backup (check {TARGET_SETTING}.port and .data_dir): {error}"
                ) from error
            cleanup.callback(server.stop)
            yield RestoredRedis(f"redis {host}:{port} (scratch server in {target.data_dir})", server)


@dataclass(frozen=True)
class RestoredRedis:
    """A scratch Redis loaded from a backup; see :class:`ops_platform.backups.base.Restored`."""

    description: str
    server: RedisServer

    def counts(self) -> dict[str, int]:
        with self.server.client() as client:
            return keyspace_counts(client)

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        """``verify_keys``: a key name must exist (EXISTS), a glob pattern must match a key (SCAN), in any database.

        The value is how many keys matched.
        """
        databases = [int(name.removeprefix("keys:db")) for name in self.counts()] or [0]
        return [key_query(query, partial(self._count, query, databases), (redis.RedisError,)) for query in queries]

    def _count(self, query: str, databases: list[int]) -> int:
        found = 0
        for db in databases:
            with self.server.client(db) as client:
                if _GLOB.search(query):
                    found += sum(1 for _ in client.scan_iter(match=query, count=1000))
                else:
                    found += int(client.exists(query))
        return found

__all__ = [
    "ARTIFACT_NAME",
    "RdbFile",
    "RedisRdbDriver",
    "ReplicationRdb",
    "RestoredRedis",
    "bgsave_and_wait",
    "keyspace_counts",
    "rdb_version",
]
