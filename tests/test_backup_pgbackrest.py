"""The pgBackRest driver for real: PostgreSQL 15 + pgBackRest, repository on moto's S3 behind stunnel.

The module's backups (a full, then an incr) are taken once by the ``backups``
fixture and shared; tests that damage something put it back before they end,
and the expiry test, which removes backups from the repository, runs last.
Restores replay the WAL archive to the newest point it proves; the module
never writes to the tables the backups counted afterwards, so restored counts
of those tables equal the manifest's exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.postgres_pgbackrest import (
    INFO_ARTIFACT,
    ArchiverStatus,
    PgBackRestDriver,
    PgBackRestRepo,
    choose_backup_type,
    count_logged_rows,
    newest_restorable_point,
    parse_verify_text,
)
from ops_platform.errors import MissingSettingError
from ops_platform.local_servers.postgres import scratch_dir
from ops_platform.local_servers.process import free_port, port_is_open
from ops_platform.resources.object_store import S3ObjectStore
from ops_platform.spec import Datastore, RestoreTest
from tests.fixtures.pgbackrest import PgBackRestSource, S3Repository

pytestmark = pytest.mark.slow

CONCEPT_ROWS = 2000


@dataclass
class Backups:
    datastore: Datastore
    driver: PgBackRestDriver
    store: S3ObjectStore
    catalog: BackupCatalog
    full: BackupManifest
    incr: BackupManifest
    cluster_bytes: int  # base/ and global/ of the source, measured right after the full backup


def _wait_archived(source: PgBackRestSource, timeout: float = 15.0) -> ArchiverStatus:
    """Switch WAL and wait until the archiver pushed the segment that held our last change."""
    with source.server.connect_superuser() as conn:
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None
        segment = row[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            archived = conn.execute(
                "SELECT last_archived_wal, last_archived_time, last_failed_wal, last_failed_time FROM pg_stat_archiver"
            ).fetchone()
            assert archived is not None
            if archived[0] and archived[0][:24] >= segment:
                return ArchiverStatus(*archived)
            time.sleep(0.05)
    raise AssertionError(f"WAL segment {segment} was not archived within {timeout} s")


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of the running processes that contain ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def _source_files(source: PgBackRestSource) -> dict[str, float | None]:
    """Top-level entries of the source's data directory, with the mtime of its files.

    A restore would add ``recovery.signal`` and ``backup_label`` and rewrite
    ``postgresql.auto.conf``; the running server keeps touching its
    directories (pg_wal, pg_stat_tmp), so their times are left out.
    """
    data_dir = source.server.data_dir
    return {path.name: None if path.is_dir() else path.stat().st_mtime for path in data_dir.iterdir()}


@pytest.fixture(scope="module")
def backups(pgbackrest_source: PgBackRestSource, pgbackrest_s3: S3Repository) -> Backups:
    source = pgbackrest_source
    with source.server.connect() as conn:
        conn.execute("CREATE TABLE concept (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE TABLE relation (id serial PRIMARY KEY, concept_id int REFERENCES concept)")
        conn.execute("CREATE UNLOGGED TABLE session_cache (key text)")
        conn.execute("INSERT INTO concept SELECT g, 'concept ' || g FROM generate_series(1, %s) g", (CONCEPT_ROWS,))
        conn.execute("INSERT INTO relation (concept_id) SELECT g FROM generate_series(1, 300) g")
        conn.execute("INSERT INTO session_cache SELECT 'k' || g FROM generate_series(1, 50) g")
    datastore = source.datastore()
    driver = source.driver()
    store = pgbackrest_s3.store(pgbackrest_s3.create_bucket(f"ops-backups-{source.stanza}"))
    catalog = BackupCatalog(store, datastore.name)
    full = catalog.run_backup(driver, datastore, "2026-11-22", password=source.server.password)
    with source.server.connect_superuser() as conn:
        # What pgBackRest copies is the data directory; nearly all of it is these two tablespaces.
        row = conn.execute("SELECT pg_tablespace_size('pg_default') + pg_tablespace_size('pg_global')").fetchone()
        assert row is not None
    with source.server.connect() as conn:
        conn.execute("INSERT INTO relation (concept_id) SELECT g FROM generate_series(1, 200) g")
    incr = catalog.run_backup(driver, datastore, "2026-11-22", password=source.server.password)
    return Backups(datastore, driver, store, catalog, full, incr, int(row[0]))


def test_first_backup_is_full_and_the_next_one_incr(backups: Backups, pgbackrest_s3: S3Repository) -> None:
    full, incr = backups.full, backups.incr
    assert (full.restore["type"], incr.restore["type"]) == ("full", "incr")
    assert incr.restore["references"] == [full.restore["label"]]
    assert incr.details["prior"] == full.restore["label"]
    assert full.restore["label"].endswith("F") and incr.restore["label"].startswith(full.restore["label"] + "_")
    assert full.restore["pg_version"] == "15" and full.source_version.startswith("15.")
    assert full.restore["cipher"] == "aes-256-cbc"
    assert full.details["database_bytes"] > 20_000_000  # a whole cluster
    assert 0 < incr.details["delta_bytes"] < full.details["delta_bytes"]
    assert 0 < incr.details["repository_delta_bytes"] < full.details["repository_bytes"]
    assert full.restore["archive_start"] <= full.restore["archive_stop"] < incr.restore["archive_start"]
    assert backups.catalog.latest() == incr
    # The backup itself is in the pgBackRest repository, under the spec's repo_path.
    labels = {key.split("/")[3] for key in pgbackrest_s3.keys(f"{full.restore['repo_path'].strip('/')}/backup/")}
    assert {full.restore["label"], incr.restore["label"]} <= labels


def test_sizes_are_what_pgbackrest_read_and_stored(backups: Backups) -> None:
    full, incr = backups.full, backups.incr
    # A full backup reads the whole cluster, as the server measures it.
    assert full.source_bytes == full.details["database_bytes"]
    assert full.source_bytes is not None
    assert abs(full.source_bytes - backups.cluster_bytes) <= 0.1 * backups.cluster_bytes
    # Stored: what the backup added to the repository (compressed and encrypted), not our small record.
    [record] = full.artifact_list()
    assert full.bytes == full.details["repository_delta_bytes"]
    assert record.size * 100 < full.bytes < full.source_bytes
    # An incr reads and stores only what changed since the full.
    assert incr.source_bytes == incr.details["delta_bytes"]
    assert incr.source_bytes is not None and 0 < incr.source_bytes < full.source_bytes / 4
    assert incr.bytes == incr.details["repository_delta_bytes"] and 0 < incr.bytes < full.bytes


def test_the_catalog_keeps_a_checksummed_copy_of_the_backup_info(backups: Backups) -> None:
    incr = backups.incr
    [artifact] = incr.artifact_list()
    assert artifact.name == INFO_ARTIFACT
    assert artifact.key.startswith(f"backups/postgres_main/2026-11-22/{incr.backup_id}/")
    record = json.loads(backups.store.get_bytes(artifact.key))
    assert record["backup"]["label"] == incr.restore["label"]
    assert record["backup"]["type"] == "incr" and record["stanza"] == incr.restore["stanza"]
    assert record["db"][0]["version"] == "15"
    assert backups.catalog.verify_artifacts(incr) == []


def test_counts_are_the_logged_tables_at_backup_time(backups: Backups) -> None:
    assert backups.full.counts == {"table:public.concept": CONCEPT_ROWS, "table:public.relation": 300}
    assert backups.incr.counts == {"table:public.concept": CONCEPT_ROWS, "table:public.relation": 500}


def test_recovery_point_of_a_backup_is_at_or_after_its_stop(backups: Backups) -> None:
    for manifest in (backups.full, backups.incr):
        stop = datetime.fromisoformat(manifest.restore["backup_stop"])
        assert manifest.started_at - timedelta(seconds=1) <= stop <= manifest.recovery_point <= manifest.finished_at


def test_verify_passes_on_an_intact_repository(backups: Backups) -> None:
    verification = backups.driver.verify(backups.incr, backups.store)
    assert verification.ok, verification.problems
    assert verification.checked["label"] == backups.incr.restore["label"]
    assert verification.checked["files_checked"] > 1000  # the incr and the full it references
    assert verification.checked["wal_checked"] > 0


def test_restore_brings_back_the_counted_rows_and_cleans_up(
    backups: Backups, pgbackrest_source: PgBackRestSource
) -> None:
    restore_test = backups.datastore.restore_test
    assert restore_test is not None
    port = restore_test.target.port
    assert port is not None
    with backups.driver.restore(backups.incr, backups.store, restore_test, Path("/nonexistent")) as restored:
        assert f"127.0.0.1:{port}" in restored.description
        counts = restored.counts()
        assert {key: counts.get(key) for key in backups.incr.counts} == backups.incr.counts
        assert "session_cache" not in str(counts)  # unlogged: not in a physical backup
        results = restored.run_queries(list(restore_test.verify_sql) + ["SELECT * FROM no_such_table"])
        assert [(r.value, r.ok) for r in results[:2]] == [(CONCEPT_ROWS, True), (CONCEPT_ROWS, True)]
        assert not results[2].ok and "no_such_table" in (results[2].error or "")
        assert port_is_open("127.0.0.1", port)  # the scratch server listens where the spec says
    assert restored.data_dir is not None and not restored.data_dir.parent.exists()
    assert not port_is_open("127.0.0.1", port)
    assert _processes_mentioning(str(restored.data_dir)) == []


def test_restore_to_a_point_in_time(backups: Backups, pgbackrest_source: PgBackRestSource) -> None:
    with pgbackrest_source.server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS pitr (batch text)")
        conn.execute("INSERT INTO pitr SELECT 'before' FROM generate_series(1, 10)")
        conn.commit()
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        target_time = row[0]
        time.sleep(0.2)
        conn.execute("INSERT INTO pitr SELECT 'after' FROM generate_series(1, 5)")
    _wait_archived(pgbackrest_source)
    restore_test = RestoreTest(target={"host": "127.0.0.1", "port": free_port()})
    with pytest.raises(LookupError, match="the body failed"):  # cleanup must not depend on the body
        with backups.driver.restore(
            backups.incr, backups.store, restore_test, Path("/nonexistent"), target_time=target_time
        ) as restored:
            [result] = restored.run_queries(["SELECT string_agg(DISTINCT batch, ',') FROM pitr"])
            assert result.value == "before"
            assert restored.recovery_point == target_time
            raise LookupError("the body failed")
    assert restored.data_dir is not None and not restored.data_dir.parent.exists()
    assert not port_is_open("127.0.0.1", restore_test.target.port or 0)
    assert _processes_mentioning(str(restored.data_dir)) == []

    with pytest.raises(RestoreRefused, match="target_time"):
        with backups.driver.restore(
            backups.incr, backups.store, restore_test, Path("/nonexistent"),
            target_time=datetime.fromisoformat(backups.incr.restore["backup_stop"]) - timedelta(hours=1),
        ):
            pass


def _source_counts(source: PgBackRestSource) -> dict[str, int]:
    with source.server.connect() as conn:
        return count_logged_rows(conn)


def test_restore_replays_the_wal_archive_to_the_restore_start(
    backups: Backups, pgbackrest_source: PgBackRestSource
) -> None:
    source = pgbackrest_source
    manifest = backups.catalog.run_backup(
        backups.driver, backups.datastore, "2026-11-22", password=source.server.password
    )
    with source.server.connect() as conn:
        conn.execute("CREATE TABLE after_backup (id int)")
        conn.execute("INSERT INTO after_backup SELECT generate_series(1, 25)")
    # No WAL switch here: the segment holding those rows is not archived until the restore forces it.
    before = _source_counts(source)
    restore_test = RestoreTest(target={"host": "127.0.0.1", "port": free_port()})
    with backups.driver.restore(manifest, backups.store, restore_test, Path("/nonexistent")) as restored:
        counts = restored.counts()
    assert "table:public.after_backup" not in manifest.counts
    assert counts["table:public.after_backup"] == 25
    assert counts == before
    assert restored.recovery_point is not None and restored.recovery_point > manifest.recovery_point
    assert restored.recovery_point <= datetime.now(UTC)
    assert restored.recovery_note.startswith("WAL replayed to ")
    assert _source_counts(source) == before  # fixing the target time wrote nothing on the source


def test_restore_fails_when_the_archive_lacks_a_segment_and_cleans_up(
    backups: Backups, pgbackrest_source: PgBackRestSource, pgbackrest_s3: S3Repository
) -> None:
    source = pgbackrest_source
    manifest = backups.catalog.run_backup(
        backups.driver, backups.datastore, "2026-11-22", password=source.server.password
    )
    with source.server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS after_backup (id int)")
        conn.execute("INSERT INTO after_backup SELECT generate_series(1, 5)")
    _wait_archived(source)
    archive = f"{manifest.restore['repo_path'].strip('/')}/archive/{manifest.restore['stanza']}/"
    later = sorted(
        key for key in pgbackrest_s3.keys(archive)
        if re.match(r"^[0-9A-F]{24}-", Path(key).name) and Path(key).name[:24] > manifest.restore["archive_stop"]
    )
    assert later, "no WAL segment after the backup was archived"
    missing = later[0]
    client = pgbackrest_s3.client()
    kept = client.get_object(Bucket=pgbackrest_s3.bucket, Key=missing)["Body"].read()
    client.delete_object(Bucket=pgbackrest_s3.bucket, Key=missing)
    port = free_port()
    scratch_before = set(Path(tempfile.gettempdir()).glob("ops-pgbackrest-restore-*"))
    try:
        with pytest.raises(RestoreError) as failure:
            with backups.driver.restore(
                manifest, backups.store, RestoreTest(target={"host": "127.0.0.1", "port": port}), Path("/nonexistent")
            ):
                pass
    finally:
        client.put_object(Bucket=pgbackrest_s3.bucket, Key=missing, Body=kept)
    message = str(failure.value)
    assert "WAL replay ended before the target time" in message and manifest.restore["label"] in message
    assert "pgbackrest verify" in message and "archive_command" in message
    assert set(Path(tempfile.gettempdir()).glob("ops-pgbackrest-restore-*")) == scratch_before
    assert not port_is_open("127.0.0.1", port)
    assert _processes_mentioning(f"-c port={port}") == []


@pytest.mark.parametrize("fault", ["wrong-source-password", "archiving-broken"])
def test_without_proof_from_the_source_the_restore_proves_only_the_backup_stop(
    backups: Backups, pgbackrest_source: PgBackRestSource, fault: str
) -> None:
    server = pgbackrest_source.server
    if fault == "wrong-source-password":
        driver = pgbackrest_source.driver(source_password="not-the-password")
        named = "connection.password_env"
    else:
        driver = pgbackrest_source.driver(archive_timeout_seconds=1)
        named = "WAL archiving from the source into the repository is not working"
        with server.connect_superuser() as conn:
            conn.execute("ALTER SYSTEM SET archive_command = '/bin/false'")
            conn.execute("SELECT pg_reload_conf()")
    restore_test = RestoreTest(target={"host": "127.0.0.1", "port": free_port()})
    try:
        with driver.restore(backups.incr, backups.store, restore_test, Path("/nonexistent")) as restored:
            assert restored.counts() == backups.incr.counts
    finally:
        if fault == "archiving-broken":
            with server.connect_superuser() as conn:
                conn.execute("ALTER SYSTEM RESET archive_command")
                conn.execute("SELECT pg_reload_conf()")
            _wait_archived(pgbackrest_source)
    backup_stop = datetime.fromisoformat(backups.incr.restore["backup_stop"])
    assert restored.recovery_point == backup_stop <= backups.incr.recovery_point
    assert restored.recovery_note.startswith("restored to the backup's stop")
    assert named in restored.recovery_note and "not-the-password" not in restored.recovery_note
    assert "to the backup's stop" in restored.description


def test_verify_reports_a_corrupt_object_in_the_repository(backups: Backups, pgbackrest_s3: S3Repository) -> None:
    label = backups.full.restore["label"]
    prefix = f"{backups.full.restore['repo_path'].strip('/')}/backup/{backups.full.restore['stanza']}/{label}/bundle/"
    key = pgbackrest_s3.keys(prefix)[0]
    client = pgbackrest_s3.client()
    original = client.get_object(Bucket=pgbackrest_s3.bucket, Key=key)["Body"].read()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    client.put_object(Bucket=pgbackrest_s3.bucket, Key=key, Body=bytes(damaged))
    try:
        # The incr references the damaged full: it is not restorable either.
        verification = backups.driver.verify(backups.incr, backups.store)
    finally:
        client.put_object(Bucket=pgbackrest_s3.bucket, Key=key, Body=original)
    assert not verification.ok
    assert any(label in problem and "checksum invalid: 1" in problem for problem in verification.problems), (
        verification.problems
    )
    assert any("referenced by" in problem for problem in verification.problems)


def test_verify_of_a_backup_whose_stanza_is_gone(backups: Backups) -> None:
    moved = backups.incr.model_copy(update={"restore": {**backups.incr.restore, "stanza": "no-such-stanza"}})
    verification = backups.driver.verify(moved, backups.store)
    assert not verification.ok
    assert "stanza 'no-such-stanza' does not exist" in verification.problems[0]
    assert "check stanza and repo_path" in verification.problems[0]


def test_restore_into_the_source_address_is_refused_before_writing(
    backups: Backups, pgbackrest_source: PgBackRestSource
) -> None:
    before = _source_files(pgbackrest_source)
    scratch_before = set(Path(tempfile.gettempdir()).glob("ops-pgbackrest-restore-*"))
    # "localhost" is not the spec's "127.0.0.1", but resolves to it.
    target = RestoreTest(target={"host": "localhost", "port": pgbackrest_source.server.port})
    with pytest.raises(RestoreRefused, match="same resolved address"):
        with backups.driver.restore(backups.incr, backups.store, target, Path("/nonexistent")):
            pass
    assert _source_files(pgbackrest_source) == before
    assert set(Path(tempfile.gettempdir()).glob("ops-pgbackrest-restore-*")) == scratch_before


def test_restore_into_the_source_data_directory_is_refused_before_writing(
    backups: Backups, pgbackrest_source: PgBackRestSource, tmp_path: Path
) -> None:
    before = _source_files(pgbackrest_source)
    alias = tmp_path / "looks-like-scratch"
    alias.symlink_to(pgbackrest_source.server.data_dir)
    for data_dir in (alias, pgbackrest_source.server.data_dir / "restore-here"):
        target = RestoreTest(target={"host": "127.0.0.1", "port": free_port(), "data_dir": str(data_dir)})
        with pytest.raises(RestoreRefused, match="data.dir"):
            with backups.driver.restore(backups.incr, backups.store, target, tmp_path):
                pass
    assert _source_files(pgbackrest_source) == before
    assert not (pgbackrest_source.server.data_dir / "restore-here").exists()


def test_restore_fails_when_the_scratch_port_is_taken(backups: Backups) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        data_dir = Path(scratch_dir("ops-pgbackrest-test-")) / "scratch"
        target = RestoreTest(target={"host": "127.0.0.1", "port": port, "data_dir": str(data_dir)})
        with pytest.raises(RestoreError, match=rf"127.0.0.1:{port} is already in use.*restore_test.target.port"):
            with backups.driver.restore(backups.incr, backups.store, target, Path("/nonexistent")):
                pass
    assert not data_dir.exists()
    shutil.rmtree(data_dir.parent)


def test_repository_down_fails_the_backup_and_keeps_the_previous_one(
    backups: Backups, pgbackrest_source: PgBackRestSource, pgbackrest_s3: S3Repository
) -> None:
    dead_port = free_port()
    driver = pgbackrest_source.driver(pgbackrest_s3.repo(port=dead_port))
    latest = backups.catalog.latest()
    with pytest.raises(BackupError) as failure:
        backups.catalog.run_backup(driver, backups.datastore, "2026-11-23", password=pgbackrest_source.server.password)
    message = str(failure.value)
    assert f"localhost:{dead_port}" in message and "PGBACKREST_REPO1_S3_ENDPOINT" in message
    assert "OPS_BACKUP_BUCKET" in message
    # Our own probe answered, not pgBackRest after its retries.
    assert "is unreachable: connection refused or timed out" in message
    for secret in (pgbackrest_s3.key, pgbackrest_s3.key_secret, pgbackrest_s3.cipher_pass):
        assert secret not in message
    assert backups.catalog.latest() == latest
    assert backups.catalog.listing().orphans == []
    assert list(backups.store.list("backups/postgres_main/2026-11-23/")) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"bucket": "no-such-bucket"}, r"bucket 'no-such-bucket' does not exist at localhost:\d+ .*OPS_BACKUP_BUCKET"),
        (
            {"ca_file": None, "io_timeout_seconds": 1},
            r"TLS certificate of localhost:\d+ is not trusted \(check PGBACKREST_REPO1_STORAGE_CA_FILE",
        ),
    ],
    ids=["bucket-missing", "tls-untrusted"],
)
def test_a_misconfigured_repository_is_named(
    backups: Backups, pgbackrest_source: PgBackRestSource, pgbackrest_s3: S3Repository, change: dict, named: str
) -> None:
    driver = pgbackrest_source.driver(pgbackrest_s3.repo(**change))
    latest = backups.catalog.latest()
    with pytest.raises(BackupError, match=named):
        backups.catalog.run_backup(driver, backups.datastore, "2026-11-23", password=pgbackrest_source.server.password)
    assert backups.catalog.latest() == latest
    assert list(backups.store.list("backups/postgres_main/2026-11-23/")) == []


def test_a_wrong_pg_path_is_named(backups: Backups, pgbackrest_source: PgBackRestSource) -> None:
    wrong = Path(scratch_dir("ops-pgbackrest-wrong-"))
    latest = backups.catalog.latest()
    try:
        datastore = pgbackrest_source.datastore(pg_path=str(wrong))
        named = r"pgbackrest check failed: no matching PostgreSQL cluster at pg1-path \(check pg_path"
        with pytest.raises(BackupError, match=named):
            backups.catalog.run_backup(
                pgbackrest_source.driver(), datastore, "2026-11-23", password=pgbackrest_source.server.password
            )
    finally:
        shutil.rmtree(wrong)
    assert backups.catalog.latest() == latest


def test_broken_wal_archiving_is_named(backups: Backups, pgbackrest_source: PgBackRestSource) -> None:
    server = pgbackrest_source.server
    latest = backups.catalog.latest()
    with server.connect_superuser() as conn:
        good = conn.execute("SHOW archive_command").fetchone()[0]  # type: ignore[index]
        # Looks right, pushes to a stanza that does not exist: every archive-push fails.
        broken = good.replace(f"--stanza={pgbackrest_source.stanza}", "--stanza=no-such-stanza")
        conn.execute(f"ALTER SYSTEM SET archive_command = '{broken}'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        driver = pgbackrest_source.driver(archive_timeout_seconds=2)
        named = r"pgbackrest check failed: WAL archiving .* not working \(check the source's archive_command"
        with pytest.raises(BackupError, match=named):
            backups.catalog.run_backup(driver, backups.datastore, "2026-11-23", password=server.password)
    finally:
        with server.connect_superuser() as conn:
            conn.execute("ALTER SYSTEM RESET archive_command")
            conn.execute("SELECT pg_reload_conf()")
    _wait_archived(pgbackrest_source)  # archiving works again: the reset took
    with server.connect_superuser() as conn:
        assert conn.execute("SHOW archive_command").fetchone()[0] == good  # type: ignore[index]
    assert backups.catalog.latest() == latest


def test_backup_type_follows_full_every_days(backups: Backups) -> None:
    record = json.loads(backups.store.get_bytes(backups.full.artifact_list()[0].key))
    full = record["backup"]
    started = datetime.fromtimestamp(full["timestamp"]["start"], UTC)
    assert choose_backup_type([], started, 1) == "full"
    same_day = started.replace(hour=23, minute=59)
    assert choose_backup_type([full], same_day, 1) == "incr"
    assert choose_backup_type([full], started.replace(hour=0, minute=0) + timedelta(days=1), 1) == "full"
    assert choose_backup_type([full], started + timedelta(days=6), 7) == "incr"
    assert choose_backup_type([{**full, "error": True}], same_day, 1) == "full"


def test_newest_restorable_point_needs_the_segment_in_the_repository() -> None:
    backup = {"label": "20261122-020000F", "timestamp": {"start": 1_795_312_800, "stop": 1_795_312_860}}
    stop = datetime.fromtimestamp(1_795_312_860, UTC)
    later = stop + timedelta(minutes=30)
    archiver = ArchiverStatus("00000001000000000000000A", later, None, None)
    assert newest_restorable_point(backup, "00000001000000000000000A", archiver).at == later
    behind = newest_restorable_point(backup, "000000010000000000000009", archiver)
    assert (behind.at, behind.basis) == (stop, "backup stop") and "not in the repository" in behind.note
    backup_file = ArchiverStatus("000000010000000000000009.00000028.backup", later, None, None)
    assert newest_restorable_point(backup, "000000010000000000000009", backup_file).basis == "wal archive"
    assert newest_restorable_point(backup, None, ArchiverStatus(None, None, None, None)).at == stop


def test_parse_verify_text_reads_pgbackrest_245_output() -> None:
    report = parse_verify_text(
        "stanza: main\n"
        "status: error\n"
        "  archiveId: 15-1, total WAL checked: 9, total valid WAL: 9\n"
        "    missing: 0, checksum invalid: 0, size invalid: 0, other: 0\n"
        "  backup: 20261122-073445F, status: invalid, total files checked: 1269, total valid files: 1268\n"
        "    missing: 0, checksum invalid: 1, size invalid: 0, other: 0\n"
    )
    assert report.status == "error"
    assert report.archives == {"15-1": {"checked": 9, "valid": 9, "counters": {
        "missing": 0, "checksum invalid": 0, "size invalid": 0, "other": 0}}}
    assert report.backups["20261122-073445F"]["status"] == "invalid"
    assert report.backups["20261122-073445F"]["counters"]["checksum invalid"] == 1
    assert parse_verify_text("stanza: x\nstatus: error\n  No usable backup.info file\n").messages == [
        "No usable backup.info file"
    ]


def test_repository_settings_keep_secrets_off_the_record() -> None:
    repo = PgBackRestRepo.from_settings(
        {
            "OPS_BACKUP_BUCKET": "ops-backups",
            "AWS_REGION": "ap-northeast-2",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "very-secret",
            "PGBACKREST_REPO1_CIPHER_PASS": "passphrase",
        }
    )
    assert repo.endpoint == "s3.ap-northeast-2.amazonaws.com" and repo.port == 443
    assert repo.options("/pgbackrest")["repo1-s3-bucket"] == "ops-backups"
    for secret in ("AKIAEXAMPLE", "very-secret", "passphrase"):
        assert secret not in repr(repo) and secret not in repo.options("/pgbackrest").values()
    assert set(repo.secret_options()) == {"repo1-s3-key", "repo1-s3-key-secret", "repo1-cipher-pass"}

    irsa = PgBackRestRepo.from_settings(
        {"OPS_BACKUP_BUCKET": "b", "AWS_REGION": "r", "AWS_ROLE_ARN": "arn:aws:iam::1:role/x",
         "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token", "PGBACKREST_REPO1_S3_ENDPOINT": "minio:9000"}
    )
    assert (irsa.key_type, irsa.endpoint, irsa.port) == ("web-id", "minio", 9000)
    assert irsa.process_env() == {
        "AWS_ROLE_ARN": "arn:aws:iam::1:role/x",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token",
    }

    with pytest.raises(MissingSettingError, match="OPS_BACKUP_BUCKET"):
        PgBackRestRepo.from_settings({"AWS_REGION": "r", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})


def test_expire_removes_one_set_and_the_wal_only_it_needed(
    backups: Backups, pgbackrest_source: PgBackRestSource, pgbackrest_s3: S3Repository
) -> None:
    """Runs last: it expires the module's own backups in the end."""
    source, driver = pgbackrest_source, backups.driver
    # A catalog of its own; a backup dated days ahead of the newest full is a full one.
    catalog = BackupCatalog(pgbackrest_s3.store(pgbackrest_s3.create_bucket(f"ops-expire-{source.stanza}")),
                            backups.datastore.name)

    def backup(days_ahead: int, using: PgBackRestDriver = driver) -> BackupManifest:
        when = datetime.now(UTC) + timedelta(days=days_ahead)
        return catalog.run_backup(using, backups.datastore, "2026-11-24", password=source.server.password,
                                  now=lambda: when)

    before = source.labels()
    # pgBackRest's own retention, even when asked for in the options, never expires anything: one owner.
    keep_one_full = source.driver(options={"repo1-retention-full-type": "count", "repo1-retention-full": "1"})
    full2, incr2, full3 = backup(2), backup(0), backup(2, using=keep_one_full)
    assert [m.restore["type"] for m in (full2, incr2, full3)] == ["full", "incr", "full"]
    label = {m.backup_id: m.restore["label"] for m in (full2, incr2, full3)}
    everything = source.labels()
    assert everything == before | {label[m.backup_id] for m in (full2, incr2, full3)}

    # pgBackRest would take incr2 with full2: refused, nothing removed.
    with pytest.raises(BackupError, match=rf"kept, nothing removed: {incr2.restore['label']} depend on it"):
        driver.expire(full2, catalog.store)
    assert source.labels() == everything

    said = driver.expire(incr2, catalog.store)
    assert incr2.restore["label"] in said and source.stanza in said
    assert source.labels() == everything - {label[incr2.backup_id]}
    driver.expire(full2, catalog.store)
    assert source.labels() == everything - {label[incr2.backup_id], label[full2.backup_id]}

    with pytest.raises(BackupError, match=r"has no backup .*\(already expired.*pgbackrest info"):
        driver.expire(full2, catalog.store)
    unknown = full3.model_copy(update={"restore": {**full3.restore, "label": "20000101-000000F"}})
    with pytest.raises(BackupError, match="has no backup 20000101-000000F"):
        driver.expire(unknown, catalog.store)

    # The oldest full goes (its dependents first): the WAL before full3, now the oldest backup, goes with it,
    # and every remaining backup still restores to the newest archived point.
    archive_before = source.info()["archive"][0]["min"]
    newest_first = sorted(backups.catalog.listing().manifests, key=lambda m: m.restore["label"], reverse=True)
    assert {m.restore["label"] for m in newest_first} == source.labels() - {label[full3.backup_id]}
    for manifest in newest_first:
        said = driver.expire(manifest, backups.store)
    assert source.labels() == {label[full3.backup_id]}
    archive_min = source.info()["archive"][0]["min"]
    assert archive_before < archive_min <= full3.restore["archive_start"]
    assert f"WAL before {archive_min} removed" in said
    restore_test = RestoreTest(target={"host": "127.0.0.1", "port": free_port()})
    with driver.restore(full3, catalog.store, restore_test, Path("/nonexistent")) as restored:
        assert restored.recovery_point is not None and restored.recovery_point > full3.recovery_point
        assert restored.counts() == _source_counts(source)

    # The last full backup stays: pgBackRest keeps one.
    with pytest.raises(BackupError, match="only full backup.*take a full backup first"):
        driver.expire(full3, catalog.store)
    assert source.labels() == {label[full3.backup_id]}


def test_no_pgbackrest_process_of_this_stanza_is_left(backups: Backups, pgbackrest_source: PgBackRestSource) -> None:
    stanza = f"--stanza={pgbackrest_source.stanza} "
    assert [cmdline for cmdline in _processes_mentioning(stanza) if "archive-push" not in cmdline] == []
