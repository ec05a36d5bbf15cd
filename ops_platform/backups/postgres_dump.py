"""PostgreSQL logical backups: ``pg_dump -Fc`` streamed into the object store, restored with ``pg_restore``.

Backup: one REPEATABLE READ transaction on the source exports its snapshot
(``pg_export_snapshot()``) and counts the rows of every user table; ``pg_dump
--snapshot`` dumps exactly that snapshot, so the counts in the manifest are
those of the dump. pg_dump's stdout goes straight into ``store.put`` through
:class:`ToolOutput`, which fails the read when pg_dump exits non-zero or is
killed, so the put rolls back (S3 aborts its multipart upload) and nothing is
committed. No file holds the dump on our side.

Sizes: the manifest's ``bytes`` is the compressed dump as stored;
``source_bytes`` what pg_dump read, the table data (heap and TOAST) and
large objects of the database, measured in the exporting transaction, so
``source_bytes`` / duration is the read rate.

Restore: into the scratch database ``restore_test.target.database`` on the
target server, created by us and marked with a comment; only a database that
carries the mark is ever dropped. When nothing listens on the target and
``restore_test.target.data_dir`` is set, a scratch server is started there
for the restore and removed after it (the sandbox works this way).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from functools import cached_property
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from ops_platform.backups.base import (
    Artifact,
    BackupError,
    BackupJob,
    BackupOutcome,
    QueryResult,
    RestoreError,
    RestoreRefused,
    Verification,
    iter_chunks,
)
from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.restore_target import (
    refuse_restore_into_source,
    scratch_data_dir,
    source_of,
)
from ops_platform.errors import OpsPlatformError
from ops_platform.local_servers.postgres import PostgresServer, postgres_bin_dir, start_postgres
from ops_platform.local_servers.process import ServerStartError, port_is_open
from ops_platform.resources.datastores import PostgresEndpoint
from ops_platform.resources.object_store import ObjectStore, StoredObject
from ops_platform.spec import Connection, RestoreTest

ARTIFACT_NAME = "dump.pgdump"
CONTENT_TYPE = "application/vnd.postgresql.custom-dump"
DEFAULT_PORT = 5432
# COMMENT ON DATABASE of every scratch database we create; the only ones we drop.
SCRATCH_DATABASE_MARK = "ops_platform restore test"
TARGET_SETTING = "restore_test.target"

# Tables (and leaf partitions) of the users' schemas, not those an extension owns.
_USER_TABLES = """
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
"""
USER_TABLES_SQL = f"SELECT n.nspname, c.relname {_USER_TABLES} ORDER BY 1, 2"
# What pg_dump reads: the heap and TOAST of those tables and the large objects; indexes are
# dumped as definitions, not read. File sizes now, dead rows included, as a sequential scan reads them.
DUMPED_BYTES_SQL = (
    "SELECT (coalesce(sum(pg_table_size(c.oid)), 0) + pg_table_size('pg_catalog.pg_largeobject'))::bigint "
    + _USER_TABLES
)
# `pg_restore --list` line of a table's data: "3345; 0 16385 TABLE DATA public concept ops".
_TOC_TABLE_DATA = re.compile(r"^\d+; \d+ \d+ TABLE DATA (\S+) (\S+) ")


def table_key(schema: str, table: str) -> str:
    return f"table:{schema}.{table}"


def count_rows(conn: psycopg.Connection) -> dict[str, int]:
    """Rows of every user table, as seen by ``conn``'s current transaction."""
    counts: dict[str, int] = {}
    for schema, table in conn.execute(USER_TABLES_SQL).fetchall():
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        row = conn.execute(query).fetchone()
        counts[table_key(schema, table)] = int(row[0]) if row else 0
    return counts


def tool_env(password: str | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a libpq tool: ours without PG* settings, plus the password.

    The password goes in ``PGPASSWORD`` of the child only, never on its command line.
    """
    env = {name: value for name, value in (os.environ if base is None else base).items() if not name.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password
    return env


def libpq_target(host: str, port: int, database: str, user: str, *, connect_timeout: int) -> str:
    """A ``--dbname`` connection string without the password."""
    return psycopg.conninfo.make_conninfo(
        host=host,
        port=port,
        dbname=database,
        user=user,
        connect_timeout=connect_timeout,
        application_name="ops_platform",
    )


class StderrTail:
    """Drains a process's stderr on a thread, keeping its last lines with the secret removed."""

    def __init__(self, stream: IO[bytes], secret: str | None, lines: int = 20) -> None:
        self._lines: deque[str] = deque(maxlen=lines)
        self._secret = secret
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                if self._secret:
                    line = line.replace(self._secret, "***")
                if line:
                    self._lines.append(line)

    def text(self, timeout: float = 5.0) -> str:
        self._thread.join(timeout)
        return "\n".join(self._lines)


def exit_reason(tool: str, returncode: int, stderr: str) -> str:
    if returncode < 0:
        reason = f"{tool} was killed by {signal.Signals(-returncode).name}"
    else:
        reason = f"{tool} exited with code {returncode}"
    return f"{reason}: {stderr}" if stderr else reason


class ToolOutput:
    """The stdout of a running tool as a readable stream that only ends cleanly if the tool succeeds.

    ``read`` returns the tool's bytes; at their end it waits for the tool and
    raises :class:`BackupError` (with the tail of its stderr) when the tool
    exited non-zero or was killed, so a reader like ``store.put`` fails
    instead of storing a truncated artifact. That error is kept in ``failure``.
    """

    def __init__(self, tool: str, process: subprocess.Popen[bytes], stderr: StderrTail) -> None:
        assert process.stdout is not None
        self.tool = tool
        self.process = process
        self.stderr = stderr
        self.failure: BackupError | None = None
        self._stdout = process.stdout

    @classmethod
    def start(cls, tool: str, argv: list[str], env: dict[str, str], secret: str | None = None) -> ToolOutput:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert process.stderr is not None
        return cls(tool, process, StderrTail(process.stderr, secret))

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._stdout.read(size if size and size > 0 else -1)
        if data:
            return data
        returncode = self.process.wait()
        if returncode != 0:
            self.failure = BackupError(exit_reason(self.tool, returncode, self.stderr.text()))
            raise self.failure
        return b""

    def stop(self) -> None:
        """Make sure the tool is gone (killed if still running) and its pipes are closed."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._stdout.close()
        self.stderr.text()


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    stdout: bytes
    stderr: str
    bytes_fed: int
    sha256: str
    fed_completely: bool


class _Feeder(threading.Thread):
    """Copies a stream into a process's stdin, hashing it, until the stream ends or the process stops reading."""

    def __init__(self, source: IO[bytes], stdin: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.source = source
        self.stdin = stdin
        self.digest = hashlib.sha256()
        self.bytes_fed = 0
        self.complete = False
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for chunk in iter_chunks(self.source):
                self.stdin.write(chunk)
                self.digest.update(chunk)
                self.bytes_fed += len(chunk)
            self.complete = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # the tool stopped reading: it has what it needs, or it failed and says why
        except Exception as error:  # noqa: BLE001 - reported by run_with_stdin
            self.error = error
        finally:
            try:
                self.stdin.close()
            except BrokenPipeError:
                pass


def run_with_stdin(
    argv: list[str], source: IO[bytes], env: dict[str, str], *, secret: str | None = None
) -> ToolRun:
    """Run a tool that reads ``source`` on its stdin, hashing what it was fed.

    The tool may stop reading early (``pg_restore --list`` reads only the
    table of contents): feeding then stops and ``fed_completely`` is False.
    """
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    stderr = StderrTail(process.stderr, secret)
    feeder = _Feeder(source, process.stdin)
    feeder.start()
    try:
        stdout = process.stdout.read()
        returncode = process.wait()
        feeder.join()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    if feeder.error is not None:
        raise OpsPlatformError(f"reading the artifact for {Path(argv[0]).name} failed: {feeder.error}")
    return ToolRun(returncode, stdout, stderr.text(), feeder.bytes_fed, feeder.digest.hexdigest(), feeder.complete)


def the_artifact(manifest: BackupManifest) -> Artifact:
    artifacts = manifest.artifact_list()
    for artifact in artifacts:
        if artifact.name == ARTIFACT_NAME:
            return artifact
    raise RestoreRefused(
        f"backup {manifest.backup_id} of '{manifest.datastore}' has no {ARTIFACT_NAME} artifact "
        f"(artifacts: {', '.join(a.name for a in artifacts) or 'none'})"
    )


class PostgresDumpDriver:
    """``engine: postgresql, method: pg_dump`` (see the module docstring).

    ``bin_dir``: where pg_dump and pg_restore are (default: the newest
    PostgreSQL installed, which must be at least the server's major version).
    ``target_password``: the password of ``restore_test.target.user`` (from
    the target's ``password_env``); for a scratch server started here it
    becomes that role's password, a random one when None.
    ``start_scratch_server``: how to start a scratch server in
    ``restore_test.target.data_dir`` when nothing listens on the target.
    """

    engine = "postgresql"
    method = "pg_dump"

    # The restore hashes every byte it feeds pg_restore and compares with the manifest,
    # and pg_restore decodes the whole dump: a separate verify() before it reads it twice more.
    restore_verifies_artifact = True

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        target_password: str | None = None,
        start_scratch_server: Callable[..., PostgresServer] = start_postgres,
        connect_timeout: int = 10,
        statement_timeout_seconds: int = 300,
        tool_env_base: Mapping[str, str] | None = None,
    ) -> None:
        self._bin_dir = bin_dir
        self.target_password = target_password
        self.start_scratch_server = start_scratch_server
        self.connect_timeout = connect_timeout
        self.statement_timeout_seconds = statement_timeout_seconds
        self.tool_env_base = tool_env_base

    @cached_property
    def bin_dir(self) -> Path:
        return self._bin_dir or postgres_bin_dir()

    def tool(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.is_file():
            raise OpsPlatformError(f"{name} not found in {self.bin_dir} (install the postgresql client)")
        return str(path)

    @cached_property
    def pg_dump_version(self) -> str:
        """``15.18`` from ``pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)``."""
        output = subprocess.run(
            [self.tool("pg_dump"), "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        match = re.search(r"\) (\S+)", output)
        return match.group(1) if match else output.strip()

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        conn = datastore.connection
        assert conn.host and conn.port and conn.database and conn.user  # the spec requires them
        endpoint = PostgresEndpoint(
            name=datastore.name,
            host=conn.host,
            port=conn.port,
            database=conn.database,
            user=conn.user,
            password=job.password or "",
            password_env=conn.password_env or "",
            connect_timeout=self.connect_timeout,
        )
        try:
            session = endpoint.connect()
        except OpsPlatformError as error:
            raise BackupError(f"backup of '{datastore.name}' failed: {error}") from None
        with session:
            session.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            session.read_only = True
            row = session.execute(
                "SELECT pg_export_snapshot(), clock_timestamp(), current_setting('server_version'), "
                "current_setting('server_version_num')::int"
            ).fetchone()
            assert row is not None
            snapshot, snapshot_time, server_version, server_version_num = row
            sized = session.execute(DUMPED_BYTES_SQL).fetchone()
            source_bytes = int(sized[0]) if sized else None
            # Rows are counted in the exporting transaction while pg_dump streams the same
            # snapshot, so counting costs no time of the backup; the transaction stays open
            # until pg_dump is done with the snapshot.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="count-rows") as pool:
                counting = pool.submit(count_rows, session)
                try:
                    stored = self._dump(job, endpoint, snapshot)
                except BaseException:
                    session.cancel_safe(timeout=5)  # stop counting: the backup has failed anyway
                    raise
                try:
                    counts = counting.result()
                except psycopg.Error as error:
                    raise BackupError(
                        f"backup of '{datastore.name}' failed: counting rows on {endpoint.address}/"
                        f"{conn.database} failed: {error} (check that {conn.user} may read every table)"
                    ) from None
            session.rollback()
        return BackupOutcome(
            artifacts=(Artifact.from_stored(ARTIFACT_NAME, stored),),
            source_version=str(server_version),
            recovery_point=snapshot_time.astimezone(UTC),
            restore={
                "format": "custom",
                "tool": "pg_restore",
                "artifact": ARTIFACT_NAME,
                "pg_dump_version": self.pg_dump_version,
                "server_major": int(server_version_num) // 10000,
                "database": conn.database,
                "source": source_of(conn),
            },
            counts=counts,
            source_bytes=source_bytes,
            details={
                "tables": len(counts),
                "rows": sum(counts.values()),
                "pg_dump": self.pg_dump_version,
                "consistency": "row counts and dump read the same exported snapshot",
            },
        )

    def _dump(self, job: BackupJob, endpoint: PostgresEndpoint, snapshot: str) -> StoredObject:
        argv = [
            self.tool("pg_dump"),
            "--format=custom",
            f"--snapshot={snapshot}",
            "--no-password",
            f"--dbname={libpq_target(endpoint.host, endpoint.port, endpoint.database, endpoint.user, connect_timeout=self.connect_timeout)}",
        ]
        key = job.artifact_key(ARTIFACT_NAME)
        dump = ToolOutput.start("pg_dump", argv, tool_env(endpoint.password, self.tool_env_base), endpoint.password)
        try:
            return job.store.put(key, dump, content_type=CONTENT_TYPE, metadata={"format": "pg-dump-custom"})  # type: ignore[arg-type]
        except Exception as error:
            where = f"{endpoint.address}/{endpoint.database}"
            if dump.failure:
                raise BackupError(
                    f"backup of '{job.datastore.name}' failed: {dump.failure} (dumping {where}); "
                    f"nothing was stored at {job.store.url(key)}"
                ) from error
            raise BackupError(
                f"backup of '{job.datastore.name}' failed: storing the dump of {where} failed: {error}"
            ) from error
        finally:
            dump.stop()

    def verify(self, manifest: BackupManifest, store: ObjectStore) -> Verification:
        """The archive's table of contents lists every counted table, and all of it decodes.

        ``pg_restore --list`` reads the table of contents; ``pg_restore
        --file=/dev/null`` then decompresses every data block while the bytes
        fed to it are hashed and compared with the manifest.
        """
        artifact = the_artifact(manifest)
        env = tool_env(None, self.tool_env_base)
        problems: list[str] = []
        with store.get(artifact.key) as stream:
            listing = run_with_stdin([self.tool("pg_restore"), "--list"], stream, env)
        tables: list[str] = []
        if listing.returncode != 0:
            problems.append(f"{artifact.url}: {exit_reason('pg_restore --list', listing.returncode, listing.stderr)}")
        else:
            for line in listing.stdout.decode(errors="replace").splitlines():
                match = _TOC_TABLE_DATA.match(line)
                if match:
                    tables.append(table_key(match.group(1), match.group(2)))
            missing = sorted(set(manifest.counts) - set(tables))
            if missing:
                problems.append(f"{artifact.url}: the archive has no data for {', '.join(missing)}")
        with store.get(artifact.key) as stream:
            decoded = run_with_stdin([self.tool("pg_restore"), "--file=/dev/null"], stream, env)
        if decoded.returncode != 0:
            problems.append(f"{artifact.url}: {exit_reason('pg_restore', decoded.returncode, decoded.stderr)}")
        if decoded.fed_completely and decoded.sha256 != artifact.sha256:
            problems.append(
                f"{artifact.url}: sha256 {decoded.sha256} does not match the manifest's {artifact.sha256}"
            )
        return Verification(
            ok=not problems,
            problems=tuple(problems),
            checked={"tables": tables, "bytes": decoded.bytes_fed, "sha256": decoded.sha256},
        )

    @contextmanager
    def restore(
        self, manifest: BackupManifest, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> Iterator[RestoredPostgres]:
        target = restore_test.target
        host, port, database, user = _target_fields(target)
        refuse_restore_into_source(
            manifest.datastore, manifest.restore.get("source"), target, default_port=DEFAULT_PORT, compare_database=True
        )
        artifact = the_artifact(manifest)
        with ExitStack() as cleanup:
            password, admin, where = self._target_server(manifest, target, cleanup)
            try:
                create_scratch_database(admin, database, user)
            except psycopg.Error as error:
                raise RestoreError(
                    f"restore of '{manifest.datastore}': creating scratch database '{database}' on "
                    f"{host}:{port} failed: {error} (check that {TARGET_SETTING}.user may create databases)"
                ) from None
            cleanup.callback(drop_scratch_database, admin, database)
            restored = RestoredPostgres(
                description=f"postgresql {host}:{port}/{database}{where}",
                host=host,
                port=port,
                database=database,
                user=user,
                password=password,
                connect_timeout=self.connect_timeout,
                statement_timeout_seconds=self.statement_timeout_seconds,
            )
            self._pg_restore(manifest, store, artifact, restored)
            yield restored

    def _target_server(
        self, manifest: BackupManifest, target: Connection, cleanup: ExitStack
    ) -> tuple[str, Callable[[], psycopg.Connection], str]:
        """The target's password, a way to connect with the right to create databases, and a note.

        A target that listens is used as it is (its user needs CREATEDB). One
        that does not, with ``data_dir`` set, gets a scratch server of ours.
        """
        host, port, _, user = _target_fields(target)
        if port_is_open(host, port, timeout=1.0):
            password = self.target_password or ""

            def connect_existing() -> psycopg.Connection:
                return self._connect_target(manifest, host, port, "postgres", user, password, autocommit=True)

            return password, connect_existing, ""
        if not target.data_dir:
            raise RestoreError(
                f"restore of '{manifest.datastore}': scratch target postgresql {host}:{port} is unreachable "
                f"(connection refused) (check {TARGET_SETTING}.host/port, or set {TARGET_SETTING}.data_dir "
                "to start a scratch server there)"
            )
        scratch = cleanup.enter_context(scratch_data_dir(target.data_dir, f"{TARGET_SETTING}.data_dir"))
        password = self.target_password or secrets.token_urlsafe(18)
        try:
            server = self.start_scratch_server(
                scratch / "pgdata", port, host=host, user=user, password=password, database="postgres"
            )
        except ServerStartError as error:
            raise RestoreError(
                f"restore of '{manifest.datastore}': starting a scratch postgresql on {host}:{port} in "
                f"{target.data_dir} failed (check {TARGET_SETTING}.port and {TARGET_SETTING}.data_dir): {error}"
            ) from error
        cleanup.callback(server.stop)
        return password, server.connect_superuser, f" (scratch server in {target.data_dir})"

    def _connect_target(
        self, manifest: BackupManifest, host: str, port: int, database: str, user: str, password: str, *, autocommit: bool
    ) -> psycopg.Connection:
        try:
            return psycopg.connect(
                host=host, port=port, dbname=database, user=user, password=password,
                connect_timeout=self.connect_timeout, autocommit=autocommit, application_name="ops_platform",
            )
        except psycopg.OperationalError as error:
            reason = str(error).replace(password, "***") if password else str(error)
            reason = reason.rsplit("failed: ", 1)[-1].strip().splitlines()[0]
            raise RestoreError(
                f"restore of '{manifest.datastore}': scratch target postgresql {host}:{port}/{database}: "
                f"{reason} (check {TARGET_SETTING}.host/port/user and its password_env)"
            ) from None

    def _pg_restore(
        self, manifest: BackupManifest, store: ObjectStore, artifact: Artifact, restored: RestoredPostgres
    ) -> None:
        argv = [
            self.tool("pg_restore"),
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--no-password",
            f"--dbname={libpq_target(restored.host, restored.port, restored.database, restored.user, connect_timeout=self.connect_timeout)}",
        ]
        with store.get(artifact.key) as stream:
            run = run_with_stdin(argv, stream, tool_env(restored.password, self.tool_env_base), secret=restored.password)
        if run.returncode != 0:
            raise RestoreError(
                f"restore of '{manifest.datastore}' backup {manifest.backup_id} into {restored.description} failed: "
                f"{exit_reason('pg_restore', run.returncode, run.stderr)}"
            )
        if run.sha256 != artifact.sha256:
            raise RestoreError(
                f"restore of '{manifest.datastore}': {artifact.url} read back with sha256 {run.sha256}, "
                f"the manifest says {artifact.sha256}; the restored data is not the backup"
            )


def _target_fields(target: Connection) -> tuple[str, int, str, str]:
    missing = [name for name in ("host", "database", "user") if not getattr(target, name)]
    if missing:
        raise RestoreError(
            f"a pg_dump restore test needs {', '.join(f'{TARGET_SETTING}.{name}' for name in missing)}"
        )
    return target.host, target.port or DEFAULT_PORT, target.database, target.user  # type: ignore[return-value]


def _database_mark(conn: psycopg.Connection, database: str) -> tuple[bool, str | None]:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (database,)
    ).fetchone()
    return (row is not None, row[0] if row else None)


def create_scratch_database(admin: Callable[[], psycopg.Connection], database: str, owner: str) -> None:
    """Create ``database`` (from template0) and mark it; replace only a marked leftover of ours."""
    with admin() as conn:
        exists, mark = _database_mark(conn, database)
        if exists and mark != SCRATCH_DATABASE_MARK:
            raise RestoreRefused(
                f"scratch database '{database}' already exists on the target and is not a restore-test "
                f"database (its comment is {mark!r}, not {SCRATCH_DATABASE_MARK!r}); refusing to drop it "
                f"(check {TARGET_SETTING}.database)"
            )
        name = sql.Identifier(database)
        if exists:
            force_drop_database(conn, database)
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(name, sql.Identifier(owner))
        )
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(name, sql.Literal(SCRATCH_DATABASE_MARK)))


def drop_scratch_database(admin: Callable[[], psycopg.Connection], database: str) -> None:
    with admin() as conn:
        exists, mark = _database_mark(conn, database)
        if exists and mark == SCRATCH_DATABASE_MARK:
            force_drop_database(conn, database)


def force_drop_database(conn: psycopg.Connection, database: str, attempts: int = 5) -> None:
    """DROP DATABASE, ending other sessions first.

    WITH (FORCE) needs the right to signal every backend in the database, and
    autovacuum (busy after a large restore) belongs to the superuser, which a
    CREATEDB role may not signal; a plain DROP cancels autovacuum by itself.
    """
    name = sql.Identifier(database)
    try:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))
        return
    except psycopg.errors.InsufficientPrivilege:
        pass
    for attempt in range(attempts):
        try:
            conn.execute(sql.SQL("DROP DATABASE {}").format(name))
            return
        except psycopg.errors.ObjectInUse:
            if attempt == attempts - 1:
                raise
            time.sleep(1)


@dataclass(frozen=True)
class RestoredPostgres:
    """A scratch database holding a restored dump; see :class:`ops_platform.backups.base.Restored`."""

    description: str
    host: str
    port: int
    database: str
    user: str
    password: str = field(repr=False)
    connect_timeout: int = 10
    statement_timeout_seconds: int = 300

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host, port=self.port, dbname=self.database, user=self.user, password=self.password,
            connect_timeout=self.connect_timeout, application_name="ops_platform",
        )

    def counts(self) -> dict[str, int]:
        with self.connect() as conn:
            conn.read_only = True
            return count_rows(conn)

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        """Each query in its own read-only transaction; the value is the first column of the first row."""
        results: list[QueryResult] = []
        with self.connect() as conn:
            conn.read_only = True
            for query in queries:
                try:
                    with conn.transaction():
                        conn.execute(f"SET LOCAL statement_timeout = '{int(self.statement_timeout_seconds)}s'")
                        cursor = conn.execute(query)  # type: ignore[arg-type]
                        row = cursor.fetchone() if cursor.description else None
                    results.append(QueryResult(query, row[0] if row else None, True))
                except psycopg.Error as error:
                    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    results.append(QueryResult(query, None, False, message))
        return results


__all__ = [
    "ARTIFACT_NAME",
    "SCRATCH_DATABASE_MARK",
    "PostgresDumpDriver",
    "RestoredPostgres",
    "ToolOutput",
    "count_rows",
    "create_scratch_database",
    "drop_scratch_database",
    "run_with_stdin",
]
