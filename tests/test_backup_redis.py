"""Redis RDB backups against a real redis-server, restored on a scratch redis-server."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.redis_rdb import RedisRdbDriver, ReplicationRdb, counts_drift
from ops_platform.backups.restore_target import SCRATCH_MARK_FILE
from ops_platform.local_servers.process import free_port, port_is_open
from ops_platform.local_servers.redis import RedisServer
from ops_platform.resources.object_store import LocalObjectStore, ObjectStore, S3ObjectStore, UploadFailedError, aws_client
from ops_platform.spec import Datastore, RestoreTest
from tests.fixtures.backup_sources import (  # noqa: F401
    REDIS_HASHES,
    REDIS_TTL_KEYS,
    processes_mentioning,
    redis_backup_source,
)

PARTITION = "2026-11-22"
EXPECTED_COUNTS = {"keys:db0": REDIS_HASHES + 1, "keys:db1": REDIS_TTL_KEYS}
VERIFY_KEYS = ["ontology:schema_version", "concept:*", "session:*"]


def datastore(server: RedisServer, scratch: Path, **connection: Any) -> Datastore:
    return Datastore.model_validate(
        {
            "name": "redis_cache",
            "engine": "redis",
            "method": "rdb",
            "connection": {"host": server.host, "port": server.port, "password_env": "REDIS_PASSWORD", **connection},
            "restore_test": {
                "target": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(scratch)},
                "verify_keys": VERIFY_KEYS,
            },
        }
    )


def backup(driver: RedisRdbDriver, store: ObjectStore, spec: Datastore, server: RedisServer) -> Any:
    return BackupCatalog(store, spec.name).run_backup(driver, spec, PARTITION, password=server.password)


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_rdb_fetched_over_replication_is_committed_verified_and_restored(
    store_kind: str, redis_backup_source: RedisServer, tmp_path: Path, request: pytest.FixtureRequest  # noqa: F811
) -> None:
    if store_kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store: ObjectStore = S3ObjectStore(aws_client("s3", region=None, endpoint_url=None, needed_for="test"), bucket)
    else:
        store = LocalObjectStore(tmp_path / "store")
    scratch = tmp_path / "restore-test" / "redis"
    spec = datastore(redis_backup_source, scratch)
    driver = RedisRdbDriver()
    catalog = BackupCatalog(store, spec.name)

    manifest = catalog.run_backup(driver, spec, PARTITION, password=redis_backup_source.password)

    assert catalog.latest() == manifest
    assert manifest.counts == EXPECTED_COUNTS
    assert manifest.details["counts_stable"] is True and manifest.restore["counts_tolerance"] == 0.0
    assert manifest.source_version.startswith("7.")
    assert manifest.restore["rdb_version"] >= 9 and manifest.restore["fetch"] == "replication"
    assert catalog.verify_artifacts(manifest) == []
    verification = driver.verify(manifest, store)
    assert verification.ok, verification.problems
    assert verification.checked["keys_read"] == sum(EXPECTED_COUNTS.values())

    assert spec.restore_test is not None
    port = spec.restore_test.target.port
    with driver.restore(manifest, store, spec.restore_test, tmp_path) as restored:
        assert port_is_open("127.0.0.1", port)
        assert restored.counts() == manifest.counts
        results = restored.run_queries([*VERIFY_KEYS, "concept:9999"])
        assert [(r.value, r.ok) for r in results] == [(1, True), (REDIS_HASHES, True), (REDIS_TTL_KEYS, True), (0, False)]
        assert restored.server.client(1).ttl("session:1") > 3000  # expiries come back too
    assert not port_is_open("127.0.0.1", port)
    assert not scratch.exists()
    assert processes_mentioning(str(scratch)) == []


def test_server_file_mode_waits_out_a_bgsave_already_in_progress(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    client = redis_backup_source.client()
    client.config_set("rdb-key-save-delay", 1000)  # microseconds per key: a save takes ~0.25 s
    client.bgsave()
    saves_before = client.info("persistence")["rdb_saves"]
    store = LocalObjectStore(tmp_path / "store")
    driver = RedisRdbDriver(fetch="server_file", snapshot_timeout=20)

    manifest = backup(driver, store, datastore(redis_backup_source, tmp_path / "scratch"), redis_backup_source)

    persistence = client.info("persistence")
    assert persistence["rdb_saves"] == saves_before + 1  # ours, started after the one in progress
    assert persistence["rdb_bgsave_in_progress"] == 0
    assert manifest.counts == EXPECTED_COUNTS and manifest.restore["fetch"] == "server_file"
    assert driver.verify(manifest, store).ok
    assert store.get_bytes(manifest.artifacts[0].key) == redis_backup_source.rdb_path.read_bytes()


def test_bgsave_that_does_not_finish_in_time_fails_the_backup(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    redis_backup_source.client().config_set("rdb-key-save-delay", 100_000)  # ~23 s in all
    store = LocalObjectStore(tmp_path / "store")
    driver = RedisRdbDriver(fetch="server_file", snapshot_timeout=0.3)

    with pytest.raises(BackupError, match=r"BGSAVE on 127\.0\.0\.1:\d+ did not finish within 0.3 s"):
        backup(driver, store, datastore(redis_backup_source, tmp_path / "scratch"), redis_backup_source)
    assert list(store.list()) == []


def test_source_dying_during_the_snapshot_commits_nothing(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    spec = datastore(redis_backup_source, tmp_path / "scratch")
    driver = RedisRdbDriver()
    catalog = BackupCatalog(store, spec.name)
    previous = catalog.run_backup(driver, spec, PARTITION, password=redis_backup_source.password)
    redis_backup_source.client().config_set("rdb-key-save-delay", 10_000)  # the snapshot takes ~2 s
    # The whole process group, as when the pod dies: the forked saver holds the connection too.
    killer = threading.Timer(0.3, os.killpg, (redis_backup_source.process.pid, signal.SIGKILL))  # type: ignore[union-attr]
    killer.start()

    with pytest.raises(BackupError, match="closed the connection before sending its RDB"):
        catalog.run_backup(driver, spec, PARTITION, password=redis_backup_source.password)

    killer.join()
    assert catalog.latest() == previous
    assert catalog.listing().orphans == []


@contextmanager
def fake_master(reply: bytes) -> Iterator[int]:
    """A TCP server that answers AUTH and REPLCONF with +OK, and SYNC with ``reply``, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, connection.makefile("rb") as reader:
            while True:
                header = reader.readline()
                if not header:
                    return
                words = []
                for _ in range(int(header[1:])):
                    reader.readline()
                    words.append(reader.readline().strip())
                if words[0].upper() == b"SYNC":
                    connection.sendall(reply)
                    return
                connection.sendall(b"+OK\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (b"\n\n$1000\r\nREDIS0010" + b"x" * 20, "closed the connection after 29 of 1000 bytes"),
        (b"$10\r\nHELLOWORLD", "is not an RDB file"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "did not answer SYNC like a Redis server"),
        (b"-NOPERM this user has no permissions to run the 'sync' command\r\n", "refused SYNC: NOPERM"),
    ],
    ids=["truncated", "not-rdb", "not-redis", "no-permission"],
)
def test_replication_fetch_rejects_what_is_not_a_whole_rdb(reply: bytes, problem: str, tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    with fake_master(reply) as port:
        with pytest.raises((BackupError, UploadFailedError)) as failure:
            stream = ReplicationRdb.fetch("127.0.0.1", port, "pw", setting="connection.host/port", read_timeout=5)
            try:
                store.put("backups/x/dump.rdb", stream)  # type: ignore[arg-type]
            finally:
                stream.close()
    assert problem in str(failure.value)
    assert list(store.list()) == []


def test_source_down_fails_naming_the_address_and_the_setting(tmp_path: Path) -> None:
    port = free_port()
    spec = Datastore.model_validate(
        {"name": "redis_cache", "engine": "redis", "method": "rdb", "connection": {"host": "127.0.0.1", "port": port}}
    )
    with pytest.raises(BackupError) as failure:
        BackupCatalog(LocalObjectStore(tmp_path), spec.name).run_backup(RedisRdbDriver(), spec, PARTITION)
    assert f"127.0.0.1:{port}" in str(failure.value) and "connection.host/port" in str(failure.value)


def test_wrong_password_names_the_password_setting_not_the_password(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    spec = datastore(redis_backup_source, tmp_path / "scratch")
    with pytest.raises(BackupError) as failure:
        BackupCatalog(LocalObjectStore(tmp_path / "store"), spec.name).run_backup(
            RedisRdbDriver(), spec, PARTITION, password="not-the-password"
        )
    assert "REDIS_PASSWORD" in str(failure.value) and "not-the-password" not in str(failure.value)


def test_corrupt_artifact_fails_the_checksum_and_redis_check_rdb(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    catalog = BackupCatalog(store, "redis_cache")
    driver = RedisRdbDriver()
    manifest = catalog.run_backup(
        driver, datastore(redis_backup_source, tmp_path / "scratch"), PARTITION, password=redis_backup_source.password
    )
    path = tmp_path / "store" / manifest.artifacts[0].key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    problems = catalog.verify_artifacts(manifest)
    verification = driver.verify(manifest, store)

    assert len(problems) == 1 and "does not match the manifest" in problems[0]
    assert not verification.ok
    assert any("sha256" in p for p in verification.problems)
    assert any("redis-check-rdb failed" in p for p in verification.problems)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(lambda s, tmp: {"host": "localhost", "port": s.port, "data_dir": str(tmp / "scratch")}, id="address"),
        pytest.param(lambda s, tmp: {"host": "127.0.0.1", "port": free_port(), "data_dir": str(s.data_dir)}, id="data_dir"),
    ],
)
def test_restore_into_the_source_is_refused_before_anything_is_written(
    target: Callable[[RedisServer, Path], dict[str, Any]],
    redis_backup_source: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    spec = datastore(redis_backup_source, tmp_path / "unused", data_dir=str(redis_backup_source.data_dir))
    driver = RedisRdbDriver()
    manifest = backup(driver, store, spec, redis_backup_source)
    source_files = sorted(p.name for p in redis_backup_source.data_dir.iterdir())

    with pytest.raises(RestoreRefused, match="refused"):
        with driver.restore(manifest, store, RestoreTest(target=target(redis_backup_source, tmp_path)), tmp_path):
            pass

    assert sorted(p.name for p in redis_backup_source.data_dir.iterdir()) == source_files
    assert not (tmp_path / "scratch").exists()
    assert redis_backup_source.client().dbsize() == REDIS_HASHES + 1


def test_scratch_directory_that_is_not_ours_is_refused(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    scratch = tmp_path / "someone-elses"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("keep me")
    spec = datastore(redis_backup_source, scratch)
    driver = RedisRdbDriver()
    manifest = backup(driver, store, spec, redis_backup_source)
    assert spec.restore_test is not None

    with pytest.raises(RestoreRefused, match="not made by a restore test"):
        with driver.restore(manifest, store, spec.restore_test, tmp_path):
            pass

    assert (scratch / "notes.txt").read_text() == "keep me" and not (scratch / SCRATCH_MARK_FILE).exists()


def test_scratch_port_taken_names_the_restore_test_setting(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    driver = RedisRdbDriver()
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        spec = datastore(redis_backup_source, tmp_path / "scratch")
        manifest = backup(driver, store, spec, redis_backup_source)
        restore_test = RestoreTest(target={"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "scratch")})

        with pytest.raises(RestoreError, match=rf"127\.0\.0\.1:{port}.*restore_test\.target\.port"):
            with driver.restore(manifest, store, restore_test, tmp_path):
                pass

    assert not (tmp_path / "scratch").exists()


def test_counts_drift_is_the_largest_relative_change() -> None:
    assert counts_drift({"keys:db0": 100}, {"keys:db0": 100}) == 0.0
    assert counts_drift({"keys:db0": 100, "keys:db1": 10}, {"keys:db0": 101, "keys:db1": 12}) == 0.2
    assert counts_drift({}, {"keys:db2": 3}) == 3.0


def test_replication_fetch_times_out_when_the_server_hangs(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        started = time.monotonic()
        with pytest.raises(BackupError, match="failed: timed out"):
            ReplicationRdb.fetch("127.0.0.1", silent.getsockname()[1], None, setting="x", read_timeout=0.3)
        assert time.monotonic() - started < 3
