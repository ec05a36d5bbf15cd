"""pg_dump backups against a real PostgreSQL 15, into a local store and into S3 on moto's server."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from psycopg import sql

from ops_platform.backups.base import BackupError, BackupJob, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.postgres_dump import ARTIFACT_NAME, SCRATCH_DATABASE_MARK, PostgresDumpDriver
from ops_platform.local_servers.postgres import PostgresServer
from ops_platform.local_servers.process import free_port, port_is_open
from ops_platform.resources.object_store import MiB, LocalObjectStore, ObjectStore, S3ObjectStore, aws_client
from ops_platform.spec import Datastore, RestoreTest
from tests.fixtures.backup_sources import (  # noqa: F401
    PG_CONCEPTS,
    child_processes,
    pg_backup_source,
    processes_mentioning,
)

PARTITION = "2026-11-22"
EXPECTED_COUNTS = {"table:audit.event": 2, "table:public.concept": PG_CONCEPTS, "table:public.relation": PG_CONCEPTS}
BULK_ROWS = 250_000  # ~40 MB of table text, ~20 MB of dump: many multipart parts


def datastore(server: PostgresServer, *, database: str = "ontology", target: dict[str, Any] | None = None) -> Datastore:
    return Datastore.model_validate(
        {
            "name": "pg_main",
            "engine": "postgresql",
            "method": "pg_dump",
            "connection": {
                "host": server.host,
                "port": server.port,
                "database": database,
                "user": server.user,
                "password_env": "PG_PASSWORD",
            },
            "restore_test": {
                "target": target
                or {"host": "localhost", "port": server.port, "database": "ontology_restore_test", "user": "ops"},
                "verify_sql": ["select count(*) from concept", "select count(*) from relation"],
            },
        }
    )


def databases(server: PostgresServer) -> set[str]:
    with server.connect_superuser() as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def s3_store(bucket: str) -> S3ObjectStore:
    client = aws_client("s3", region=None, endpoint_url=None, needed_for="test")
    return S3ObjectStore(client, bucket, part_size=5 * MiB)


@pytest.fixture
def driver(pg_backup_source: PostgresServer) -> PostgresDumpDriver:  # noqa: F811
    return PostgresDumpDriver(target_password=pg_backup_source.password)


@pytest.fixture(scope="module")
def bulk_database(pg_backup_source: PostgresServer) -> str:  # noqa: F811
    """A database whose dump takes long enough to be killed halfway."""
    with pg_backup_source.connect_superuser() as conn:
        conn.execute("CREATE DATABASE bulk OWNER ops")
    with pg_backup_source.connect("bulk") as conn:
        conn.execute(
            "CREATE TABLE blob AS SELECT i AS id, md5(i::text) || md5((i + 1)::text) || md5((-i)::text) "
            f"|| md5((i * 7)::text) AS payload FROM generate_series(1, {BULK_ROWS}) AS i"
        )
    return "bulk"


def test_backup_is_committed_verified_and_restored_into_a_scratch_database(
    pg_backup_source: PostgresServer, driver: PostgresDumpDriver, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    spec = datastore(pg_backup_source)
    catalog = BackupCatalog(store, spec.name)

    manifest = catalog.run_backup(driver, spec, PARTITION, password=pg_backup_source.password)

    assert catalog.latest() == manifest
    assert manifest.counts == EXPECTED_COUNTS
    assert manifest.source_version.startswith("15.")
    assert manifest.restore["format"] == "custom"
    assert manifest.restore["server_major"] == 15
    assert manifest.restore["database"] == "ontology"
    assert manifest.restore["pg_dump_version"].startswith("15.")
    assert manifest.artifacts[0].name == ARTIFACT_NAME
    assert catalog.verify_artifacts(manifest) == []
    verification = driver.verify(manifest, store)
    assert verification.ok, verification.problems
    assert set(verification.checked["tables"]) == set(EXPECTED_COUNTS)

    # A leftover scratch database of an earlier restore test is replaced, not refused.
    with pg_backup_source.connect_superuser() as conn:
        conn.execute("CREATE DATABASE ontology_restore_test OWNER ops")
        conn.execute(sql.SQL("COMMENT ON DATABASE ontology_restore_test IS {}").format(sql.Literal(SCRATCH_DATABASE_MARK)))
    with driver.restore(manifest, store, spec.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
        results = restored.run_queries(
            [*spec.restore_test.verify_sql, "delete from concept", "select nonsense from nowhere"]
        )
        assert [(r.value, r.ok) for r in results[:2]] == [(PG_CONCEPTS, True), (PG_CONCEPTS, True)]
        assert not results[2].ok and "read-only" in (results[2].error or "")
        assert not results[3].ok and "nowhere" in (results[3].error or "")
        assert "ontology_restore_test" in databases(pg_backup_source)
    assert "ontology_restore_test" not in databases(pg_backup_source)
    with pg_backup_source.connect() as conn:
        assert conn.execute("select count(*) from concept").fetchone()[0] == PG_CONCEPTS


def test_dump_streams_to_s3_and_restores_on_a_scratch_server(
    pg_backup_source: PostgresServer, aws_env: Any, s3_bucket: str, postgres_scratch_dir: Path  # noqa: F811
) -> None:
    store = s3_store(s3_bucket)
    port = free_port()
    data_dir = postgres_scratch_dir / "restore-test" / "postgres"
    spec = datastore(
        pg_backup_source,
        target={"host": "127.0.0.1", "port": port, "database": "ontology_restore_test", "user": "ops",
                "data_dir": str(data_dir)},
    )
    catalog = BackupCatalog(store, spec.name)
    driver = PostgresDumpDriver()  # no target password: the scratch server gets a random one

    manifest = catalog.run_backup(driver, spec, PARTITION, password=pg_backup_source.password)

    assert manifest.artifacts[0].url.startswith(f"s3://{s3_bucket}/backups/pg_main/{PARTITION}/")
    assert catalog.verify_artifacts(manifest) == []
    assert driver.verify(manifest, store).ok
    with driver.restore(manifest, store, spec.restore_test, postgres_scratch_dir) as restored:
        assert port_is_open("127.0.0.1", port)
        assert (data_dir / "pgdata" / "PG_VERSION").exists() and processes_mentioning(str(data_dir))
        assert restored.counts() == manifest.counts
        assert [r.value for r in restored.run_queries(spec.restore_test.verify_sql)] == [PG_CONCEPTS, PG_CONCEPTS]
    assert not port_is_open("127.0.0.1", port)
    assert not data_dir.exists()
    assert processes_mentioning(str(data_dir)) == []


def _kill_pg_dump_when(ready: Callable[[], bool], seen: dict[str, Any]) -> threading.Thread:
    def kill() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = child_processes("pg_dump")
            if pids and ready():
                seen["cmdline"] = Path(f"/proc/{pids[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                seen["environ_has_password"] = b"PGPASSWORD=" in Path(f"/proc/{pids[0]}/environ").read_bytes()
                os.kill(pids[0], signal.SIGKILL)
                seen["killed"] = True
                return
            time.sleep(0.01)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("store_kind", ["s3", "local"])
def test_pg_dump_killed_mid_stream_commits_nothing_and_keeps_the_previous_backup(
    store_kind: str,
    pg_backup_source: PostgresServer,  # noqa: F811
    bulk_database: str,
    driver: PostgresDumpDriver,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    if store_kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store: ObjectStore = s3_store(bucket)
        s3 = boto3.client("s3")

        def mid_stream() -> bool:  # the first part is up: the multipart upload is open
            return bool(s3.list_multipart_uploads(Bucket=bucket).get("Uploads"))
    else:
        store = LocalObjectStore(tmp_path / "store")

        def mid_stream() -> bool:  # the staged file of the put has grown past 2 MiB
            return any(p.stat().st_size > 2 * MiB for p in (tmp_path / "store").rglob(".*.tmp"))

    catalog = BackupCatalog(store, "pg_main")
    previous = catalog.run_backup(driver, datastore(pg_backup_source), PARTITION, password=pg_backup_source.password)
    seen: dict[str, Any] = {}
    killer = _kill_pg_dump_when(mid_stream, seen)

    with pytest.raises(BackupError, match="pg_dump was killed by SIGKILL") as failure:
        catalog.run_backup(
            driver, datastore(pg_backup_source, database=bulk_database), PARTITION, password=pg_backup_source.password
        )
    killer.join()

    assert seen.get("killed"), "pg_dump finished before it could be killed"
    assert pg_backup_source.password not in seen["cmdline"] and seen["environ_has_password"]
    assert "nothing was stored" in str(failure.value)
    assert catalog.latest() == previous
    assert [m.backup_id for m in catalog.listing().manifests] == [previous.backup_id]
    assert catalog.listing().orphans == []
    assert child_processes("pg_dump") == []
    previous_keys = {previous.artifacts[0].key, f"backups/pg_main/{PARTITION}/{previous.backup_id}/manifest.json"}
    if store_kind == "s3":
        assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
        assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])} == previous_keys
    else:
        files = {p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*") if p.is_file()}
        assert {f for f in files if not Path(f).name.startswith(".")} == previous_keys
        assert not [f for f in files if f.endswith(".tmp")]


def test_source_down_fails_naming_the_address_and_the_setting(driver: PostgresDumpDriver, tmp_path: Path) -> None:
    port = free_port()
    spec = Datastore.model_validate(
        {
            "name": "pg_main", "engine": "postgresql", "method": "pg_dump",
            "connection": {"host": "127.0.0.1", "port": port, "database": "ontology", "user": "ops"},
        }
    )
    store = LocalObjectStore(tmp_path / "store")

    with pytest.raises(BackupError) as failure:
        BackupCatalog(store, spec.name).run_backup(driver, spec, PARTITION, password="secret-pw")

    message = str(failure.value)
    assert f"127.0.0.1:{port}" in message and "connection.host/port" in message and "pg_main" in message
    assert "secret-pw" not in message
    assert list(store.list()) == []


def test_wrong_password_names_the_password_setting_not_the_password(
    pg_backup_source: PostgresServer, driver: PostgresDumpDriver, tmp_path: Path  # noqa: F811
) -> None:
    with pytest.raises(BackupError) as failure:
        BackupCatalog(LocalObjectStore(tmp_path), "pg_main").run_backup(
            driver, datastore(pg_backup_source), PARTITION, password="not-the-password"
        )
    assert "PG_PASSWORD" in str(failure.value) and "not-the-password" not in str(failure.value)


@pytest.mark.parametrize("database", ["ontology", "bulk"], ids=["dump-done-first", "dump-still-running"])
def test_object_store_down_fails_and_leaves_no_pg_dump_running(
    database: str,
    pg_backup_source: PostgresServer,  # noqa: F811
    bulk_database: str,
    driver: PostgresDumpDriver,
    aws_env: Any,
) -> None:
    client = aws_client(
        "s3", region=None, endpoint_url=f"http://127.0.0.1:{free_port()}", needed_for="test",
        connect_timeout=1, max_attempts=1,
    )
    store = S3ObjectStore(client, "ops-backups", part_size=5 * MiB)
    spec = datastore(pg_backup_source, database=database)
    # The driver alone: BackupCatalog.run_backup's clean-up lists the dead store again and fails differently.
    job = BackupJob(spec, store, PARTITION, "20261122T020000Z-000000", f"backups/pg_main/{PARTITION}/x/",
                    password=pg_backup_source.password)

    with pytest.raises(BackupError, match="AWS_ENDPOINT_URL") as failure:
        driver.backup(job)

    assert f"storing the dump of 127.0.0.1:{pg_backup_source.port}/{database} failed" in str(failure.value)
    assert child_processes("pg_dump") == []


def test_corrupt_artifact_fails_the_checksum_and_verify(
    pg_backup_source: PostgresServer, driver: PostgresDumpDriver, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    catalog = BackupCatalog(store, "pg_main")
    manifest = catalog.run_backup(driver, datastore(pg_backup_source), PARTITION, password=pg_backup_source.password)
    path = tmp_path / "store" / manifest.artifacts[0].key
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))

    problems = catalog.verify_artifacts(manifest)
    verification = driver.verify(manifest, store)

    assert len(problems) == 1 and "does not match the manifest" in problems[0]
    assert not verification.ok
    assert any("sha256" in problem for problem in verification.problems)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(lambda s: {"host": "localhost", "port": s.port, "database": "ontology", "user": "ops"}, id="address"),
        pytest.param(lambda s: {"host": "127.0.0.1", "port": free_port(), "database": "scratch", "user": "ops",
                                "data_dir": str(s.data_dir)}, id="data_dir"),
    ],
)
def test_restore_into_the_source_is_refused_before_anything_is_written(
    target: Callable[[PostgresServer], dict[str, Any]],
    pg_backup_source: PostgresServer,  # noqa: F811
    driver: PostgresDumpDriver,
    tmp_path: Path,
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    source = datastore(pg_backup_source).model_dump()
    source["connection"]["data_dir"] = str(pg_backup_source.data_dir)
    source["restore_test"]["target"] = {"host": "127.0.0.1", "port": free_port(), "database": "x", "user": "ops"}
    spec = Datastore.model_validate(source)
    manifest = BackupCatalog(store, spec.name).run_backup(driver, spec, PARTITION, password=pg_backup_source.password)
    before = databases(pg_backup_source)
    source_files = sorted(p.name for p in pg_backup_source.data_dir.iterdir())

    with pytest.raises(RestoreRefused, match="refused"):
        with driver.restore(manifest, store, RestoreTest(target=target(pg_backup_source)), tmp_path):
            pass

    assert databases(pg_backup_source) == before
    assert sorted(p.name for p in pg_backup_source.data_dir.iterdir()) == source_files


def test_existing_database_without_the_mark_is_never_dropped(
    pg_backup_source: PostgresServer, driver: PostgresDumpDriver, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    spec = datastore(
        pg_backup_source, target={"host": "127.0.0.1", "port": pg_backup_source.port, "database": "precious", "user": "ops"}
    )
    manifest = BackupCatalog(store, spec.name).run_backup(driver, spec, PARTITION, password=pg_backup_source.password)
    with pg_backup_source.connect_superuser() as conn:
        conn.execute("CREATE DATABASE precious OWNER ops")
    with pg_backup_source.connect("precious") as conn:
        conn.execute("CREATE TABLE keep (id int); INSERT INTO keep VALUES (1)")

    with pytest.raises(RestoreRefused, match="precious.*not a restore-test database"):
        with driver.restore(manifest, store, spec.restore_test, tmp_path):
            pass

    with pg_backup_source.connect("precious") as conn:
        assert conn.execute("SELECT count(*) FROM keep").fetchone()[0] == 1


def test_unreachable_scratch_target_names_the_restore_test_setting(
    pg_backup_source: PostgresServer, driver: PostgresDumpDriver, tmp_path: Path  # noqa: F811
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    port = free_port()
    spec = datastore(pg_backup_source, target={"host": "127.0.0.1", "port": port, "database": "scratch", "user": "ops"})
    manifest = BackupCatalog(store, spec.name).run_backup(driver, spec, PARTITION, password=pg_backup_source.password)

    with pytest.raises(RestoreError) as failure:
        with driver.restore(manifest, store, spec.restore_test, tmp_path):
            pass

    assert f"127.0.0.1:{port}" in str(failure.value) and "restore_test.target" in str(failure.value)


def test_scratch_database_is_dropped_while_a_superuser_process_holds_it(
    pg_backup_source: PostgresServer, driver: PostgresDumpDriver, tmp_path: Path  # noqa: F811
) -> None:
    """As after a large restore, when autovacuum (a superuser process the CREATEDB role may not
    signal) works on the restored tables: DROP ... WITH (FORCE) is refused, a plain DROP waits."""
    store = LocalObjectStore(tmp_path / "store")
    spec = datastore(pg_backup_source)
    catalog = BackupCatalog(store, spec.name)
    manifest = catalog.run_backup(driver, spec, PARTITION, password=pg_backup_source.password)
    holder = None
    with driver.restore(manifest, store, spec.restore_test, tmp_path):
        holder = pg_backup_source.connect_superuser("ontology_restore_test")
        holder.execute("select 1")
        threading.Timer(1.5, holder.close).start()
    assert holder is not None and holder.closed
    assert "ontology_restore_test" not in databases(pg_backup_source)


def test_source_bytes_are_the_table_data_pg_dump_read_not_the_compressed_dump(
    pg_backup_source: PostgresServer, driver: PostgresDumpDriver, tmp_path: Path  # noqa: F811
) -> None:
    with pg_backup_source.connect_superuser() as conn:
        conn.execute("CREATE DATABASE sized OWNER ops")
    with pg_backup_source.connect("sized") as conn:
        conn.execute(
            "CREATE TABLE doc (id int PRIMARY KEY, body text NOT NULL) WITH (autovacuum_enabled = false);"
            "INSERT INTO doc SELECT i, repeat(md5(i::text), 8) FROM generate_series(1, 20000) AS i;"
            "CREATE INDEX doc_body ON doc (body);"
            "SELECT lo_from_bytea(0, convert_to(repeat('large object ', 20000), 'UTF8'));"
        )

    def measured() -> tuple[int, int, int]:
        """What pg_dump reads (table + large objects), the index it does not read, the whole database."""
        with pg_backup_source.connect("sized") as conn:
            row = conn.execute(
                "SELECT pg_table_size('doc') + pg_table_size('pg_largeobject'), pg_relation_size('doc_body'), "
                "pg_database_size('sized')"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    store = LocalObjectStore(tmp_path / "store")
    catalog = BackupCatalog(store, "pg_main")
    spec = datastore(pg_backup_source, database="sized")

    manifest = catalog.run_backup(driver, spec, PARTITION, password=pg_backup_source.password)

    read, index, database = measured()
    assert manifest.source_bytes == read
    assert manifest.bytes == manifest.artifacts[0].size  # stored: the compressed dump
    assert manifest.source_bytes > 2 * manifest.bytes
    assert read + index <= database  # indexes and catalogs are not counted as read

    # Deleted rows stay in the pages pg_dump scans: the dump shrinks, what it reads does not.
    with pg_backup_source.connect("sized") as conn:
        conn.execute("DELETE FROM doc WHERE id % 2 = 0")
    thinner = catalog.run_backup(driver, spec, PARTITION, password=pg_backup_source.password)
    assert thinner.counts == {"table:public.doc": 10000}
    assert thinner.source_bytes == measured()[0] == manifest.source_bytes
    assert thinner.bytes < manifest.bytes
