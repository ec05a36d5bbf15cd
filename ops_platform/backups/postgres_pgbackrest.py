"""PostgreSQL physical backups with pgBackRest (InfraSpec §7.1): daily full, ``incr`` between fulls, WAL archive.

Backup: make sure the stanza exists (``stanza-create`` when the repository
has none), ``check`` that the source archives its WAL into the repository,
then ``backup --type=full|incr``: full when the newest full backup was taken
``pgbackrest.full_every_days`` calendar days (UTC) ago or more, else incr.
The record of the backup is read from ``pgbackrest info --output=json``, the
tool's own machine-readable state, never from its log.

Where the bytes live: in the pgBackRest repository (S3, or a directory),
written by pgBackRest itself, not through our object store. The catalog gets
one small artifact beside the manifest, ``pgbackrest-info.json`` (this
backup's entry of ``info`` with the stanza's database and archive), so every
committed backup has a checksum-verified record of what pgBackRest holds.

Secrets: every pgBackRest option is given through the child's environment
(``PGBACKREST_REPO1_S3_KEY`` ...), never on its command line, so ``ps`` never
shows a key or the cipher passphrase; pgBackRest redacts them in its own
output. Each call runs with ``--config`` pointing at an empty file in a
private 0700 directory, so settings in the machine's ``/etc/pgbackrest*``
never mix in.

Counts: right after the backup, the rows of every logged user table of the
spec's database, counted in one REPEATABLE READ transaction. Unlogged tables
are not counted: pgBackRest does not back up their data.

Sizes: ``source_bytes`` is what pgBackRest copied from the cluster for this
backup (``info.delta``: the whole cluster for a full, the changed files for an
incr), ``stored_bytes`` what this backup added to the repository
(``info.repository.delta``); see :func:`backup_sizes`.

Recovery point: the newest point a restore can reach. That is the stop time
of the newest backup, or, when the source's WAL archiving is working (its
last archived segment, ``pg_stat_archiver``, is in the repository's archive),
the time that segment was archived.

Restore: a point-in-time restore to the newest point the WAL archive proves
when the restore starts. On the source, one read-only transaction reads the
server's clock (the target time T) and takes a transaction id, so a commit
record later than T exists (a time target is reached only at a commit after
it); ``pgbackrest check`` then switches WAL and waits until that segment is in
the repository. ``pgbackrest restore --set=<label> --archive-mode=off
--type=time --target=T --target-action=promote`` into a scratch data
directory, a scratch postmaster on ``restore_test.target``'s port (see
:mod:`ops_platform.local_servers.postgres_scratch`) replays the WAL with
``archive-get``, and the restore is ready when it leaves recovery; PostgreSQL
(13 and later) refuses to promote when the WAL ends before T. The restored
cluster's ``recovery_point`` is T. When T cannot be proven (source
unreachable, archiving broken), the restore goes to the backup's consistent
point (``--type=immediate``), ``recovery_point`` is the backup's stop and
``recovery_note`` says why. It never writes to the source's data: the target
is compared with the source's address and data directory before anything is
written, ``pgbackrest restore`` gets no ``pg1-*`` option of the source,
tablespaces are mapped into the scratch directory, and archiving stays off.

Retention: our catalog owns it. pgBackRest's own is set so it never expires a
backup (``repo1-retention-full`` at its maximum, count-based); the catalog
calls :meth:`PgBackRestDriver.expire` for each backup it drops, which runs
``pgbackrest expire --set=<label>`` and removes the WAL no remaining backup
needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from ops_platform.backups.base import (
    Artifact,
    BackupError,
    BackupJob,
    BackupOutcome,
    RestoreError,
    RestoreRefused,
    Verification,
)
from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.postgres_dump import RestoredPostgres, table_key
from ops_platform.backups.restore_target import (
    refuse_restore_into_source,
    scratch_data_dir,
    source_of,
)
from ops_platform.errors import MissingSettingError, OpsPlatformError
from ops_platform.local_servers.postgres import PostgresServer, scratch_dir
from ops_platform.local_servers.postgres_scratch import in_recovery, start_restored_postgres
from ops_platform.local_servers.process import (
    ServerStartError,
    chown_to,
    find_binary,
    port_is_open,
    service_user_prefix,
)
from ops_platform.resources.datastores import PostgresEndpoint
from ops_platform.resources.object_store import ObjectStore
from ops_platform.spec import Connection, Datastore, PgBackRestOptions, RestoreTest

INFO_ARTIFACT = "pgbackrest-info.json"
DEFAULT_PORT = 5432
TARGET_SETTING = "restore_test.target"
SPEC_SECTION = "pgbackrest section of the datastore in the platform spec"
# pgBackRest's largest repo1-retention-full: with count-based retention its own expire (run after
# every backup) then never removes a full backup, nor WAL (archive retention follows it), so a
# backup leaves the repository only when our catalog's retention drops it (PgBackRestDriver.expire).
RETENTION_FULL_MAX = 9_999_999
_CATALOG_OWNS_RETENTION = {"repo1-retention-full-type": "count", "repo1-retention-full": str(RETENTION_FULL_MAX)}
# What a child process gets besides its pgBackRest options.
DEFAULT_BASE_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "TZ": "UTC",
}

# Logged user tables of the users' schemas; unlogged ones come back empty from a physical backup.
LOGGED_TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p'
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""

_WAL_NAME = re.compile(r"^[0-9A-F]{24}")
_RESTORED_WAL = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
# PostgreSQL 13+ ends a point-in-time recovery with this FATAL when the WAL runs out before its target.
TARGET_NOT_REACHED = "recovery ended before configured recovery target was reached"
_ERROR_LINE = re.compile(r"^(?:ERROR|WARN): \[\d+\]: .*|^ERROR: .*")


@dataclass(frozen=True)
class PgBackRestRepo:
    """How to reach the pgBackRest repository (``repo1``); where in it comes from the spec's ``repo_path``.

    ``type="s3"``: ``bucket``, ``endpoint`` (host name, no scheme), ``port``,
    ``region``; credentials by ``key_type``: ``shared`` (``key`` and
    ``key_secret``, ``token`` for temporary ones), ``web-id`` (EKS IRSA:
    ``role_arn`` and ``web_identity_token_file``) or ``auto`` (the instance's
    role). ``type="posix"``: the spec's ``repo_path`` is a directory on this
    machine. ``cipher_pass`` turns on ``aes-256-cbc`` encryption of the whole
    repository; ``kms_key_id`` adds SSE-KMS on S3. ``bucket_setting`` and
    ``endpoint_setting`` are the settings errors tell the operator to check.
    """

    type: Literal["s3", "posix"] = "s3"
    bucket: str | None = None
    endpoint: str | None = None
    port: int = 443
    region: str | None = None
    key_type: Literal["shared", "web-id", "auto"] = "shared"
    key: str | None = field(default=None, repr=False)
    key_secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    role_arn: str | None = None
    web_identity_token_file: str | None = None
    uri_style: Literal["host", "path"] = "host"
    verify_tls: bool = True
    ca_file: str | None = None
    kms_key_id: str | None = None
    cipher_pass: str | None = field(default=None, repr=False)
    bundle: bool = True
    io_timeout_seconds: float | None = None
    bucket_setting: str = "OPS_BACKUP_BUCKET"
    endpoint_setting: str = "PGBACKREST_REPO1_S3_ENDPOINT"

    def __post_init__(self) -> None:
        if self.type != "s3":
            return
        needed = {"bucket": self.bucket_setting, "endpoint": self.endpoint_setting, "region": "AWS_REGION"}
        if self.key_type == "shared":
            needed |= {"key": "AWS_ACCESS_KEY_ID", "key_secret": "AWS_SECRET_ACCESS_KEY"}
        if self.key_type == "web-id":
            needed |= {"role_arn": "AWS_ROLE_ARN", "web_identity_token_file": "AWS_WEB_IDENTITY_TOKEN_FILE"}
        for name, setting in needed.items():
            if not getattr(self, name):
                raise MissingSettingError(setting, f"the pgBackRest S3 repository ({name})")

    @classmethod
    def from_settings(cls, settings: Mapping[str, str], **overrides: Any) -> PgBackRestRepo:
        """Build the repository from environment-style settings (pass ``os.environ`` or a dict).

        ``PGBACKREST_REPO1_TYPE`` (``s3`` unless ``posix``); the bucket from
        ``PGBACKREST_REPO1_S3_BUCKET`` or ``OPS_BACKUP_BUCKET``; the endpoint
        from ``PGBACKREST_REPO1_S3_ENDPOINT`` (``host`` or ``host:port``,
        default ``s3.<region>.amazonaws.com``); the region from
        ``PGBACKREST_REPO1_S3_REGION`` or ``AWS_REGION``; credentials from
        ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
        else ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE`` (IRSA), else
        the instance role; ``PGBACKREST_REPO1_S3_URI_STYLE``,
        ``PGBACKREST_REPO1_STORAGE_VERIFY_TLS`` (``y``/``n``),
        ``PGBACKREST_REPO1_STORAGE_CA_FILE``, ``OPS_BACKUP_KMS_KEY_ID``,
        ``PGBACKREST_REPO1_CIPHER_PASS``.
        """
        get = settings.get
        if get("PGBACKREST_REPO1_TYPE", "s3") == "posix":
            return cls(type="posix", cipher_pass=get("PGBACKREST_REPO1_CIPHER_PASS") or None, **overrides)
        region = get("PGBACKREST_REPO1_S3_REGION") or get("AWS_REGION") or get("AWS_DEFAULT_REGION")
        bucket_setting = "PGBACKREST_REPO1_S3_BUCKET" if get("PGBACKREST_REPO1_S3_BUCKET") else "OPS_BACKUP_BUCKET"
        endpoint, _, port = (get("PGBACKREST_REPO1_S3_ENDPOINT") or "").partition(":")
        if not endpoint and region:
            endpoint = f"s3.{region}.amazonaws.com"
        if get("AWS_ACCESS_KEY_ID"):
            key_type = "shared"
        elif get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            key_type = "web-id"
        else:
            key_type = "auto"
        fields: dict[str, Any] = {
            "bucket": get(bucket_setting),
            "endpoint": endpoint or None,
            "port": int(port or get("PGBACKREST_REPO1_STORAGE_PORT") or 443),
            "region": region,
            "key_type": key_type,
            "key": get("AWS_ACCESS_KEY_ID"),
            "key_secret": get("AWS_SECRET_ACCESS_KEY"),
            "token": get("AWS_SESSION_TOKEN"),
            "role_arn": get("AWS_ROLE_ARN"),
            "web_identity_token_file": get("AWS_WEB_IDENTITY_TOKEN_FILE"),
            "uri_style": get("PGBACKREST_REPO1_S3_URI_STYLE", "host"),
            "verify_tls": get("PGBACKREST_REPO1_STORAGE_VERIFY_TLS", "y") != "n",
            "ca_file": get("PGBACKREST_REPO1_STORAGE_CA_FILE"),
            "kms_key_id": get("OPS_BACKUP_KMS_KEY_ID") or None,
            "cipher_pass": get("PGBACKREST_REPO1_CIPHER_PASS") or None,
            "bucket_setting": bucket_setting,
        }
        return cls(**{**fields, **overrides})

    @property
    def address(self) -> str:
        """For people: ``s3://bucket at host:port`` or ``posix``."""
        if self.type == "posix":
            return "posix repository"
        return f"s3://{self.bucket} at {self.endpoint}:{self.port}"

    @property
    def cipher(self) -> str:
        return "aes-256-cbc" if self.cipher_pass else "none"

    def options(self, repo_path: str) -> dict[str, str]:
        """The non-secret ``repo1-*`` options for a repository path."""
        options = {
            "repo1-type": self.type,
            "repo1-path": repo_path,
            "repo1-bundle": "y" if self.bundle else "n",
            "repo1-cipher-type": self.cipher,
        }
        if self.io_timeout_seconds is not None:
            options["io-timeout"] = f"{self.io_timeout_seconds:g}"
        if self.type == "s3":
            options |= {
                "repo1-s3-bucket": str(self.bucket),
                "repo1-s3-endpoint": str(self.endpoint),
                "repo1-storage-port": str(self.port),
                "repo1-s3-region": str(self.region),
                "repo1-s3-key-type": self.key_type,
                "repo1-s3-uri-style": self.uri_style,
                "repo1-storage-verify-tls": "y" if self.verify_tls else "n",
            }
            if self.ca_file:
                options["repo1-storage-ca-file"] = self.ca_file
            if self.kms_key_id:
                options["repo1-s3-kms-key-id"] = self.kms_key_id
        return options

    def secret_options(self) -> dict[str, str]:
        """The secure options; pgBackRest refuses them on a command line, we never put them there."""
        secrets = {
            "repo1-s3-key": self.key,
            "repo1-s3-key-secret": self.key_secret,
            "repo1-s3-token": self.token,
            "repo1-cipher-pass": self.cipher_pass,
        }
        return {name: value for name, value in secrets.items() if value}

    def process_env(self) -> dict[str, str]:
        """Variables pgBackRest reads itself (IRSA's role and token file)."""
        env = {"AWS_ROLE_ARN": self.role_arn, "AWS_WEB_IDENTITY_TOKEN_FILE": self.web_identity_token_file}
        return {name: value for name, value in env.items() if value and self.key_type == "web-id"}

    def secrets(self) -> list[str]:
        return list(self.secret_options().values())


def option_env(options: Mapping[str, str]) -> dict[str, str]:
    """``repo1-s3-key`` -> ``PGBACKREST_REPO1_S3_KEY``."""
    return {"PGBACKREST_" + name.upper().replace("-", "_"): value for name, value in options.items()}


def pgbackrest_config_text(
    repo: PgBackRestRepo, *, stanza: str, pg_path: str, repo_path: str, extra: Mapping[str, str] | None = None
) -> str:
    """A ``pgbackrest.conf`` for the database host, where ``archive_command`` runs ``archive-push``.

    It holds the repository's secrets: write it mode 0600, owned by the
    PostgreSQL service user.
    """
    globals_ = {**repo.options(repo_path), **repo.secret_options(), "log-level-file": "off", **(extra or {})}
    lines = ["[global]", *(f"{name}={value}" for name, value in globals_.items())]
    lines += ["", f"[{stanza}]", f"pg1-path={pg_path}", ""]
    return "\n".join(lines)


def archive_command(config_path: str, stanza: str, pgbackrest_bin: str = "pgbackrest") -> str:
    """The source's ``archive_command`` that pushes each WAL segment into the repository."""
    return f"{pgbackrest_bin} --config={config_path} --stanza={stanza} archive-push %p"


@dataclass(frozen=True)
class ToolRun:
    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_lines(self) -> list[str]:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-12:]


@dataclass(frozen=True)
class RecoveryPoint:
    """The newest point in time a restore of a backup can reach, as known when it was taken, and why."""

    at: datetime
    basis: Literal["wal archive", "backup stop"]
    backup_label: str | None
    last_archived_wal: str | None = None
    note: str = ""


@dataclass(frozen=True)
class ArchiverStatus:
    """``pg_stat_archiver`` of the source."""

    last_archived_wal: str | None
    last_archived_time: datetime | None
    last_failed_wal: str | None
    last_failed_time: datetime | None


@dataclass(frozen=True)
class VerifyReport:
    """``pgbackrest verify --output=text --verbose``, parsed."""

    status: str
    backups: dict[str, dict[str, Any]]  # label -> {status, checked, valid, counters}
    archives: dict[str, dict[str, Any]]  # archive id -> {checked, valid, counters}
    messages: list[str]


def parse_verify_text(text: str) -> VerifyReport:
    status = "unknown"
    backups: dict[str, dict[str, Any]] = {}
    archives: dict[str, dict[str, Any]] = {}
    messages: list[str] = []
    current: dict[str, Any] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("stanza:"):
            continue
        if match := re.fullmatch(r"status: (\S+)", line):
            status = match.group(1)
        elif match := re.fullmatch(r"archiveId: ([^,]+), total WAL checked: (\d+), total valid WAL: (\d+)", line):
            current = {"checked": int(match.group(2)), "valid": int(match.group(3)), "counters": {}}
            archives[match.group(1)] = current
        elif match := re.fullmatch(
            r"backup: ([^,]+), status: ([^,]+), total files checked: (\d+), total valid files: (\d+)", line
        ):
            current = {
                "status": match.group(2),
                "checked": int(match.group(3)),
                "valid": int(match.group(4)),
                "counters": {},
            }
            backups[match.group(1)] = current
        elif current is not None and re.fullmatch(r"[a-z ]+: \d+(, [a-z ]+: \d+)*", line):
            for item in line.split(", "):
                name, _, number = item.rpartition(": ")
                current["counters"][name] = int(number)
        else:
            messages.append(line)
    return VerifyReport(status, backups, archives, messages)


def choose_backup_type(backups: list[dict[str, Any]], now: datetime, full_every_days: int) -> str:
    """``full`` when no good full backup started within the last ``full_every_days`` UTC calendar days.

    Calendar days, not 24-hour periods: a daily 02:00 run is full every day
    with ``full_every_days: 1`` even when yesterday's run started a few
    seconds later.
    """
    fulls = [b for b in backups if b.get("type") == "full" and not b.get("error")]
    if not fulls:
        return "full"
    newest = max(_epoch(b["timestamp"]["start"]) for b in fulls)
    age_days = (now.astimezone(UTC).date() - newest.date()).days
    return "full" if age_days >= full_every_days else "incr"


def newest_restorable_point(
    backup: Mapping[str, Any], archive_max: str | None, archiver: ArchiverStatus | None
) -> RecoveryPoint:
    """Backup stop, or the last archived WAL's time when the repository holds that segment."""
    stop = _epoch(backup["timestamp"]["stop"])
    label = str(backup["label"])
    if archiver is None:
        return RecoveryPoint(stop, "backup stop", label, note="the source's pg_stat_archiver was not read")
    wal = _wal_segment(archiver.last_archived_wal)
    if wal is None or archiver.last_archived_time is None:
        return RecoveryPoint(stop, "backup stop", label, note="the source has archived no WAL")
    repository_max = _wal_segment(archive_max)
    if repository_max is None or repository_max < wal:
        return RecoveryPoint(
            stop, "backup stop", label, wal,
            note=f"the source's last archived WAL {wal} is not in the repository (archive max {archive_max})",
        )
    archived_at = archiver.last_archived_time.astimezone(UTC)
    if archived_at <= stop:
        return RecoveryPoint(stop, "backup stop", label, wal)
    return RecoveryPoint(archived_at, "wal archive", label, wal)


def _wal_segment(name: str | None) -> str | None:
    """``000000010000000000000004`` from a WAL, ``.partial`` or ``.backup`` file name."""
    if not name:
        return None
    match = _WAL_NAME.match(name)
    return match.group(0) if match else None


def _epoch(seconds: int | float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _printable(text: str, limit: int = 400) -> str:
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


class _Session:
    """One pgBackRest invocation context: a private directory and the child environment."""

    def __init__(self, private: Path, env: dict[str, str], stanza: str, secrets: list[str]) -> None:
        self.private = private
        self.env = env
        self.stanza = stanza
        self.secrets = secrets

    @property
    def config(self) -> Path:
        return self.private / "pgbackrest.conf"

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class PgBackRestDriver:
    """``engine: postgresql, method: pgbackrest`` (see the module docstring).

    ``repo``: how to reach the repository. ``run_as``: the OS user that runs
    pgBackRest and the scratch server (``postgres`` when we are root: it must
    read the source's data directory). ``pg_socket_path``: the source's Unix
    socket directory (pgBackRest talks to PostgreSQL through it); None uses
    pgBackRest's default. ``options``: more pgBackRest options, e.g.
    ``pg1-user``, ``pg1-host-ca-file``, ``compress-type``. ``lock_path``:
    pgBackRest's lock directory (None: its default ``/tmp/pgbackrest``);
    every backup of a stanza must use the same one. ``scratch_settings``:
    extra ``-c`` settings of the scratch server (e.g. a smaller
    ``shared_buffers`` than the source's). ``source_password``: the password
    of the source's ``connection.user`` (from its ``password_env``); a
    restore logs in with it to fix the target time on the source (see
    :meth:`restore`), and without it restores only to the backup's stop.
    """

    engine = "postgresql"
    method = "pgbackrest"

    def __init__(
        self,
        repo: PgBackRestRepo,
        *,
        pgbackrest_bin: str = "pgbackrest",
        run_as: str | None = None,
        pg_socket_path: str | None = None,
        options: Mapping[str, str] | None = None,
        lock_path: str | None = None,
        archive_timeout_seconds: float = 60.0,
        command_timeout_seconds: float = 6 * 3600.0,
        recovery_timeout_seconds: float = 900.0,
        verify_process_max: int = 2,
        scratch_settings: Mapping[str, str] | None = None,
        connect_timeout: int = 10,
        base_env: Mapping[str, str] | None = None,
        source_password: str | None = None,
    ) -> None:
        self.repo = repo
        self._pgbackrest_bin = pgbackrest_bin
        self.run_as = run_as
        self.pg_socket_path = pg_socket_path
        self.extra_options = dict(options or {})
        self.lock_path = lock_path
        self.archive_timeout_seconds = archive_timeout_seconds
        self.command_timeout_seconds = command_timeout_seconds
        self.recovery_timeout_seconds = recovery_timeout_seconds
        self.verify_process_max = verify_process_max
        self.scratch_settings = dict(scratch_settings or {})
        self.connect_timeout = connect_timeout
        self.base_env = dict(DEFAULT_BASE_ENV if base_env is None else base_env)
        self.source_password = source_password

    @property
    def pgbackrest_bin(self) -> str:
        """Absolute, so the ``restore_command`` pgBackRest writes finds it in the scratch server too."""
        if os.path.isabs(self._pgbackrest_bin):
            return self._pgbackrest_bin
        return find_binary(self._pgbackrest_bin)

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        pg = _pgbackrest_section(datastore, BackupError)
        where = f"backup of '{datastore.name}' (stanza '{pg.stanza}')"
        with self._session(pg.stanza, self._source_options(datastore, pg)) as session:
            self._require_repository(where, BackupError)
            info = self._stanza_info(session, where, BackupError)
            if info is None:
                self._run_checked(session, where, BackupError, "stanza-create")
                info = self._stanza_info(session, where, BackupError)
                assert info is not None
            self._run_checked(session, where, BackupError, "check")
            before = {backup["label"] for backup in info.get("backup", [])}
            backup_type = choose_backup_type(info.get("backup", []), job.now(), pg.full_every_days)
            self._run_checked(session, where, BackupError, "backup", f"--type={backup_type}")
            info = self._stanza_info(session, where, BackupError)
            assert info is not None
        entry = _new_backup(info, before, where)
        stored = job.store.put_bytes(
            job.artifact_key(INFO_ARTIFACT),
            json.dumps(_info_record(info, entry), indent=2, sort_keys=True).encode(),
            content_type="application/json",
        )
        counts, server_version, archiver = self._source_state(datastore, job.password, where)
        archive_max = _archive_max(info)
        point = newest_restorable_point(entry, archive_max, archiver)
        database = next((db for db in info.get("db", []) if db.get("id") == entry["database"]["id"]), {})
        source_bytes, stored_bytes = backup_sizes(entry)
        return BackupOutcome(
            artifacts=(Artifact.from_stored(INFO_ARTIFACT, stored),),
            source_version=server_version,
            recovery_point=point.at,
            source_bytes=source_bytes,
            stored_bytes=stored_bytes,
            restore={
                "stanza": pg.stanza,
                "label": entry["label"],
                "type": entry["type"],
                "repo_path": pg.repo_path,
                "pg_version": str(database.get("version", "")),
                "system_id": database.get("system-id"),
                "archive_start": entry["archive"]["start"],
                "archive_stop": entry["archive"]["stop"],
                "lsn_start": entry["lsn"]["start"],
                "lsn_stop": entry["lsn"]["stop"],
                "backup_stop": _epoch(entry["timestamp"]["stop"]).isoformat(),
                "references": list(entry.get("reference") or []),
                "process_max": pg.process_max,
                "cipher": info.get("cipher", self.repo.cipher),
                "database": datastore.connection.database,
                "user": datastore.connection.user,
                "source": {**source_of(datastore.connection), "data_dir": str(Path(pg.pg_path).resolve())},
                # Where `pgbackrest check` reaches the source when a restore fixes its target time.
                "pg_path": pg.pg_path,
                "pg_host": pg.pg_host,
                "pg_host_port": pg.pg_host_port,
            },
            counts=counts,
            details={
                "backup_type": entry["type"],
                "label": entry["label"],
                "prior": entry.get("prior"),
                "database_bytes": entry["info"]["size"],
                "delta_bytes": entry["info"]["delta"],
                "repository_bytes": entry["info"]["repository"]["size"],
                "repository_delta_bytes": entry["info"]["repository"]["delta"],
                "wal_start": entry["archive"]["start"],
                "wal_stop": entry["archive"]["stop"],
                "backup_started_at": _epoch(entry["timestamp"]["start"]).isoformat(),
                "backup_stopped_at": _epoch(entry["timestamp"]["stop"]).isoformat(),
                "pgbackrest_version": entry.get("backrest", {}).get("version"),
                "repository": self.repo.address,
                "repository_path": pg.repo_path,
                "recovery_point_basis": point.basis,
                "last_archived_wal": point.last_archived_wal,
                "tables": len(counts),
                "rows": sum(counts.values()),
                "consistency": (
                    "counts taken right after the backup in one REPEATABLE READ transaction; "
                    "a restore replaying WAL past the backup holds these rows and those written since"
                ),
            },
        )

    def verify(self, manifest: BackupManifest, store: ObjectStore) -> Verification:
        """``pgbackrest verify`` of the repository, judged for this backup, its references and the WAL archive.

        pgBackRest 2.45 exits 0 even when it finds invalid files, so the
        verbose text report is parsed. Problems of other backups in the
        repository are listed in ``checked['other_backups']`` without failing
        this one.
        """
        restore = manifest.restore
        stanza, label = restore.get("stanza"), restore.get("label")
        if not stanza or not label or not restore.get("repo_path"):
            return Verification(False, (f"manifest {manifest.backup_id} has no pgBackRest stanza, label or repo_path",))
        where = f"verify of '{manifest.datastore}' backup {label} (stanza '{stanza}')"
        problems: list[str] = []
        checked: dict[str, Any] = {"stanza": stanza, "label": label, "repository": self.repo.address}
        with self._session(stanza, self._repo_options_for(restore["repo_path"])) as session:
            try:
                self._require_repository(where, OpsPlatformError)
                info = self._stanza_info(session, where, OpsPlatformError)
            except OpsPlatformError as error:
                return Verification(False, (str(error),), checked)
            if info is None:
                return Verification(False, (self._stanza_missing(stanza, restore["repo_path"]),), checked)
            entries = {b["label"]: b for b in info.get("backup", [])}
            entry = entries.get(label)
            if entry is None:
                problems.append(
                    f"backup {label} is no longer in the repository {self.repo.address} "
                    f"(expired, or another repo_path/stanza)"
                )
            elif entry.get("error"):
                problems.append(f"backup {label}: pgBackRest recorded page checksum errors while taking it")
            run = self._run(
                session, "verify", "--output=text", "--verbose", f"--process-max={self.verify_process_max}"
            )
        checked["returncode"] = run.returncode
        if not run.ok:
            problems.append(f"{where}: {self._explain(run, session)}")
            return Verification(False, tuple(problems), checked)
        report = parse_verify_text(run.stdout)
        checked |= {"verify_status": report.status, "backups_checked": len(report.backups)}
        needed = [label, *((entry or {}).get("reference") or [])]
        for needed_label in needed:
            result = report.backups.get(needed_label)
            if result is None:
                problems.append(f"backup {needed_label}: not checked by pgbackrest verify")
            elif result["status"] != "valid":
                counters = ", ".join(f"{n}: {v}" for n, v in result["counters"].items() if v)
                role = "" if needed_label == label else f" (referenced by {label})"
                problems.append(
                    f"backup {needed_label}{role}: {result['status']}, {result['valid']} of "
                    f"{result['checked']} files valid ({counters or 'see pgbackrest verify'})"
                )
        checked["files_checked"] = sum(report.backups.get(n, {}).get("checked", 0) for n in needed)
        for archive_id, result in report.archives.items():
            if result["valid"] != result["checked"]:
                counters = ", ".join(f"{n}: {v}" for n, v in result["counters"].items() if v)
                problems.append(
                    f"WAL archive {archive_id}: {result['valid']} of {result['checked']} segments valid ({counters})"
                )
        checked["wal_checked"] = sum(result["checked"] for result in report.archives.values())
        checked["other_backups"] = {
            name: result["status"]
            for name, result in report.backups.items()
            if name not in needed and result["status"] != "valid"
        }
        if report.status != "ok" and not problems and not checked["other_backups"]:
            problems.extend(f"pgbackrest verify: {message}" for message in report.messages or [report.status])
        return Verification(not problems, tuple(problems), checked)

    @contextmanager
    def restore(
        self,
        manifest: BackupManifest,
        store: ObjectStore,
        restore_test: RestoreTest,
        work_dir: Path,
        *,
        target_time: datetime | None = None,
    ) -> Iterator[RestoredCluster]:
        """Restore the backup into a scratch cluster on ``restore_test.target`` and yield it.

        Recovers to the newest point the WAL archive proves now (see the
        module docstring), or to ``target_time`` when given (it must be at or
        after the backup's stop). The cluster's ``recovery_point`` is the
        point recovery reached; a WAL archive that ends before it fails the
        restore with :class:`RestoreError`. ``work_dir`` is not used: the
        scratch cluster lives in ``restore_test.target.data_dir`` or a fresh
        directory under the system temp dir, which the service user can enter.
        """
        restore = manifest.restore
        target = restore_test.target
        name = manifest.datastore
        stanza, label = restore.get("stanza"), restore.get("label")
        if not stanza or not label or not restore.get("repo_path"):
            raise RestoreRefused(
                f"restore of '{name}' refused: manifest {manifest.backup_id} has no pgBackRest "
                "stanza, label or repo_path"
            )
        host, port = target.host or "127.0.0.1", target.port
        refuse_restore_into_source(
            name, restore.get("source"), target.model_copy(update={"host": host}),
            default_port=DEFAULT_PORT, compare_database=False,
        )
        _refuse_nested_data_dir(name, restore.get("source") or {}, target.data_dir)
        if port is None:
            raise RestoreError(f"restore of '{name}': a pgBackRest restore test needs {TARGET_SETTING}.port")
        backup_stop = datetime.fromisoformat(restore["backup_stop"])
        if target_time is not None and (target_time.tzinfo is None or target_time.astimezone(UTC) < backup_stop):
            raise RestoreRefused(
                f"restore of '{name}' refused: target_time {target_time.isoformat()} must be time-zone aware "
                f"and not before backup {label} stopped ({backup_stop.isoformat()})"
            )
        if port_is_open(host, port, timeout=1.0):
            raise RestoreError(
                f"restore of '{name}': scratch target {host}:{port} is already in use by another server; "
                f"a pgBackRest restore starts its own (check {TARGET_SETTING}.port)"
            )
        where = f"restore of '{name}' backup {label} (stanza '{stanza}')"
        if target_time is None:
            target_time, why_not = self._archived_target_time(restore, name)
        else:
            why_not = ""
        if target_time is not None:
            target_time = target_time.astimezone(UTC)
            recovery = ["--type=time", f"--target={target_time:%Y-%m-%d %H:%M:%S.%f}+00"]
            note = f"WAL replayed to {target_time.isoformat()}"
        else:
            recovery = ["--type=immediate"]
            note = f"restored to the backup's stop ({backup_stop.isoformat()}) only: {why_not}"
        with ExitStack() as cleanup:
            session = cleanup.enter_context(self._session(stanza, self._repo_options_for(restore["repo_path"])))
            base_path = self._scratch_base(target, cleanup)
            base = cleanup.enter_context(scratch_data_dir(base_path, f"{TARGET_SETTING}.data_dir"))
            data_dir = base / "pgdata"
            data_dir.mkdir(mode=0o700)
            chown_to(base, self.run_as)
            self._run_checked(
                session, where, RestoreError, "restore",
                f"--set={label}", f"--pg1-path={data_dir}", "--archive-mode=off",
                f"--process-max={int(restore.get('process_max') or 1)}",
                *recovery, "--target-action=promote", f"--tablespace-map-all={base / 'tablespaces'}",
            )
            server = self._start_scratch(session, where, data_dir, base, host, port, restore, target_time)
            cleanup.callback(server.stop)
            self._wait_until_promoted(server, where, target_time)
            reached = "the backup's stop" if target_time is None else target_time.isoformat()
            yield RestoredCluster(
                description=(
                    f"postgresql {host}:{port}/{restore.get('database')} restored from pgBackRest "
                    f"{stanza} {label} to {reached} into {data_dir}"
                ),
                host=str(server.socket_dir),
                port=port,
                database=str(restore.get("database")),
                user=str(restore.get("user")),
                password="",
                connect_timeout=self.connect_timeout,
                address=f"{host}:{port}",
                data_dir=data_dir,
                recovery_point=target_time or backup_stop,
                recovery_note=note,
            )

    def expire(self, manifest: BackupManifest, store: ObjectStore) -> str:
        """Remove this backup from the repository (``pgbackrest expire --set``) and the WAL no backup left needs.

        Refused with :class:`BackupError`, removing nothing, when the set is
        not in the repository, when other backups depend on it (pgBackRest
        would expire them with it; retry once they are expired), or when it
        is the stanza's only full backup (pgBackRest keeps one).
        """
        restore = manifest.restore
        stanza, label, repo_path = restore.get("stanza"), restore.get("label"), restore.get("repo_path")
        if not stanza or not label or not repo_path:
            raise BackupError(
                f"expire of '{manifest.datastore}' backup {manifest.backup_id}: the manifest has no pgBackRest "
                "stanza, label or repo_path, so nothing in the repository can be matched to it"
            )
        where = f"expire of '{manifest.datastore}' backup {label} (stanza '{stanza}')"
        with self._session(stanza, self._repo_options_for(repo_path)) as session:
            self._require_repository(where, BackupError)
            info = self._stanza_info(session, where, BackupError)
            if info is None:
                raise BackupError(f"{where}: {self._stanza_missing(stanza, repo_path)}")
            backups = {backup["label"]: backup for backup in info.get("backup", [])}
            if label not in backups:
                raise BackupError(
                    f"{where}: the repository {self.repo.address} has no backup {label} under {repo_path} "
                    f"(already expired, or the manifest names another stanza or repo_path; "
                    f"`pgbackrest info --stanza={stanza}` lists what is there)"
                )
            dependents = sorted(other for other in backups if label in _ancestors(backups, other))
            if dependents:
                raise BackupError(
                    f"{where}: kept, nothing removed: {', '.join(dependents)} depend on it and pgBackRest would "
                    "expire them with it; it can be expired once they are"
                )
            fulls_left = [other for other, backup in backups.items() if backup["type"] == "full" and other != label]
            if not fulls_left:
                raise BackupError(
                    f"{where}: kept, nothing removed: it is the stanza's only full backup and pgBackRest keeps one "
                    "(take a full backup first)"
                )
            archive_min = _archive_min(info)
            # Archive retention over every full backup left keeps the WAL from the oldest of them on,
            # so each backup still in the repository stays restorable to any later point in time.
            self._run_checked(
                session, where, BackupError, "expire", f"--set={label}",
                "--repo1-retention-archive-type=full", f"--repo1-retention-archive={len(fulls_left)}",
            )
            after = self._stanza_info(session, where, BackupError) or {}
        if any(backup["label"] == label for backup in after.get("backup", [])):
            raise BackupError(f"{where}: pgbackrest expire succeeded but pgbackrest info still lists {label}")
        wal = _archive_min(after)
        removed_wal = f"; WAL before {wal} removed" if wal and archive_min and wal > archive_min else ""
        return f"pgBackRest backup {label} expired from stanza '{stanza}' in {self.repo.address}{removed_wal}"

    def _archived_target_time(self, restore: Mapping[str, Any], name: str) -> tuple[datetime | None, str]:
        """The newest point the WAL archive proves now, or None and why not.

        Reads the source's clock (T) in a read-only transaction that also
        takes a transaction id: its commit is a WAL record later than T, and a
        recovery to T can only stop at a commit after T (a quiet source may
        have none). ``pgbackrest check`` then switches WAL on the source and
        waits until that segment is in the repository.
        """
        source = restore.get("source") or {}
        endpoint = PostgresEndpoint(
            name=name, host=str(source.get("host")), port=int(source.get("port") or DEFAULT_PORT),
            database=str(restore.get("database")), user=str(restore.get("user")),
            password=self.source_password or "", connect_timeout=self.connect_timeout,
        )
        try:
            with endpoint.connect() as conn:
                conn.read_only = True
                row = conn.execute("SELECT clock_timestamp()").fetchone()
                conn.execute("SELECT pg_current_xact_id()")
        except OpsPlatformError as error:  # names the setting to check
            return None, f"the source could not fix a target time: {error}"
        except psycopg.Error as error:  # e.g. a standby, which cannot take a transaction id
            return None, f"the source {endpoint.address} could not fix a target time: {_printable(str(error))}"
        assert row is not None
        target_time: datetime = row[0]
        pg_path = str(restore.get("pg_path") or source.get("data_dir"))
        options = self._pg_options(
            str(restore["repo_path"]), pg_path, endpoint.port, restore.get("pg_host"), restore.get("pg_host_port")
        )
        with self._session(str(restore["stanza"]), options) as session:
            run = self._run(session, "check")
        if not run.ok:
            return None, (
                f"pgbackrest check found no proof that the WAL archive reaches {target_time.isoformat()}: "
                f"{self._explain(run, session)}"
            )
        return target_time, ""

    def _scratch_base(self, target: Connection, cleanup: ExitStack) -> Path:
        if target.data_dir:
            return Path(target.data_dir)
        parent = scratch_dir("ops-pgbackrest-restore-")
        cleanup.callback(shutil.rmtree, parent, True)
        return parent / "restore"

    def _start_scratch(
        self, session: _Session, where: str, data_dir: Path, base: Path, host: str, port: int,
        restore: Mapping[str, Any], target_time: datetime | None,
    ) -> PostgresServer:
        try:
            return start_restored_postgres(
                data_dir,
                port,
                run_dir=base,
                host=host,
                user=str(restore.get("user")),
                database=str(restore.get("database")),
                settings=self.scratch_settings,
                env=session.env,
                start_timeout=self.recovery_timeout_seconds,
            )
        except (ServerStartError, FileNotFoundError) as error:
            # Replay can run out of WAL before the server first accepts connections.
            raise _target_not_reached(base / "postgresql.log", where, target_time) or RestoreError(
                f"{where}: the scratch postgresql on {host}:{port} did not start "
                f"(check {TARGET_SETTING}.host/port): {session.scrub(str(error))}"
            ) from None

    def _wait_until_promoted(self, server: PostgresServer, where: str, target_time: datetime | None) -> None:
        deadline = time.monotonic() + self.recovery_timeout_seconds
        while True:
            if not server.running():
                raise _target_not_reached(server.log_path, where, target_time) or RestoreError(
                    f"{where}: the scratch postgresql on {server.host}:{server.port} stopped "
                    f"during recovery; log {server.log_path}:\n{server.log_tail()}"
                )
            try:
                if not in_recovery(server):
                    return
            except psycopg.OperationalError:
                pass  # between recovery's end and promotion the server may refuse briefly
            if time.monotonic() > deadline:
                raise RestoreError(
                    f"{where}: the scratch postgresql on {server.host}:{server.port} is still "
                    f"in recovery after {self.recovery_timeout_seconds:g} s (is the WAL the backup needs in "
                    f"the repository's archive?); log tail:\n{server.log_tail()}"
                )
            time.sleep(0.05)

    def _repo_options_for(self, repo_path: str) -> dict[str, str]:
        options = {
            **self.repo.options(repo_path),
            "log-level-console": "off",
            "log-level-stderr": "warn",
            "log-level-file": "off",
            "archive-timeout": f"{self.archive_timeout_seconds:g}",
        }
        if self.lock_path:
            options["lock-path"] = self.lock_path
        extra = {name: value for name, value in self.extra_options.items() if not name.startswith("pg")}
        return {**options, **extra, **_CATALOG_OWNS_RETENTION}  # after the extra options: one owner

    def _source_options(self, datastore: Datastore, pg: PgBackRestOptions) -> dict[str, str]:
        """Repository options plus ``pg1-*`` for the source: only backups and checks get these."""
        return {
            "process-max": str(pg.process_max),
            "start-fast": "y",
            **self._pg_options(
                pg.repo_path, pg.pg_path, datastore.connection.port or DEFAULT_PORT, pg.pg_host, pg.pg_host_port
            ),
        }

    def _pg_options(
        self, repo_path: str, pg_path: str, port: int, pg_host: str | None, pg_host_port: int | None
    ) -> dict[str, str]:
        options = {**self._repo_options_for(repo_path), "pg1-path": pg_path, "pg1-port": str(port)}
        if self.pg_socket_path:
            options["pg1-socket-path"] = self.pg_socket_path
        if pg_host:
            options |= {"pg1-host": pg_host, "pg1-host-port": str(pg_host_port), "pg1-host-type": "tls"}
        return {**options, **self.extra_options, **_CATALOG_OWNS_RETENTION}

    @contextmanager
    def _session(self, stanza: str, options: Mapping[str, str]) -> Iterator[_Session]:
        private = Path(tempfile.mkdtemp(prefix="ops-pgbackrest-"))
        try:
            private.chmod(0o700)
            (private / "pgbackrest.conf").write_text("# empty: every option comes from the environment\n")
            (private / "conf.d").mkdir()
            chown_to(private, self.run_as)
            env = {
                **self.base_env,
                **self.repo.process_env(),
                **option_env(options),
                **option_env(self.repo.secret_options()),
            }
            yield _Session(private, env, stanza, self.repo.secrets())
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _run(self, session: _Session, command: str, *args: str) -> ToolRun:
        argv = [
            *service_user_prefix(self.run_as),
            self.pgbackrest_bin,
            f"--config={session.config}",
            f"--config-include-path={session.private / 'conf.d'}",
            f"--stanza={session.stanza}",
            *args,
            command,
        ]
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=session.env, cwd=session.private, start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=self.command_timeout_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            stderr += f"\npgbackrest {command} killed after {self.command_timeout_seconds:g} s".encode()
        finally:
            if process.poll() is None:
                _kill_group(process)
        return ToolRun(
            command,
            process.returncode if process.returncode is not None else -signal.SIGKILL,
            session.scrub(stdout.decode(errors="replace")),
            session.scrub(stderr.decode(errors="replace")),
        )

    def _run_checked(
        self, session: _Session, where: str, error: type[OpsPlatformError], command: str, *args: str
    ) -> ToolRun:
        run = self._run(session, command, *args)
        if not run.ok:
            raise error(f"{where}: pgbackrest {command} failed: {self._explain(run, session)}")
        return run

    def _stanza_info(
        self, session: _Session, where: str, error: type[OpsPlatformError]
    ) -> dict[str, Any] | None:
        """The stanza's entry of ``info --output=json``; None when the repository has no such stanza."""
        run = self._run(session, "info", "--output=json")
        if not run.ok:
            raise error(f"{where}: pgbackrest info failed: {self._explain(run, session)}")
        try:
            document = json.loads(run.stdout)
            stanza = next(entry for entry in document if entry.get("name") == session.stanza)
        except (json.JSONDecodeError, StopIteration, AttributeError, TypeError):
            raise error(
                f"{where}: pgbackrest info --output=json did not describe stanza '{session.stanza}': "
                f"{_printable(run.stdout)}"
            ) from None
        for repo in stanza.get("repo", []):
            code = repo.get("status", {}).get("code")
            message = str(repo.get("status", {}).get("message", ""))
            if code in (0, 2):  # ok, or no valid backup yet
                continue
            if code in (1, 3):  # missing stanza path / missing stanza data
                return None
            first_line = message.splitlines()[0] if message else f"status code {code}"
            raise error(f"{where}: {self._explain_text(message, session, said=first_line)}")
        return stanza

    def _require_repository(self, where: str, error: type[OpsPlatformError]) -> None:
        """Fail at once, naming the endpoint, when nothing listens there (pgBackRest would retry for a while)."""
        if self.repo.type == "s3" and not port_is_open(str(self.repo.endpoint), self.repo.port, timeout=5.0):
            raise error(
                f"{where}: pgBackRest repository {self.repo.address} is unreachable: connection refused or "
                f"timed out (check {self.repo.endpoint_setting} and {self.repo.bucket_setting})"
            )

    def _explain(self, run: ToolRun, session: _Session) -> str:
        text = "\n".join(run.error_lines()) or f"exit code {run.returncode}"
        return self._explain_text(text, session)

    def _explain_text(self, text: str, session: _Session, *, said: str | None = None) -> str:
        """Say what to check for the failures an operator can fix; keep the tool's words."""
        said = _printable(session.scrub(said if said is not None else _first_error(text)), 600)
        repo = self.repo
        if "HostConnectError" in text or ("unable to connect to '" in text and "dbname=" not in text):
            hint = (
                f"the repository {repo.address} is unreachable "
                f"(check {repo.endpoint_setting} and {repo.bucket_setting})"
            )
        elif "certificate" in text:
            hint = (
                f"the TLS certificate of {repo.endpoint}:{repo.port} is not trusted "
                "(check PGBACKREST_REPO1_STORAGE_CA_FILE, or PGBACKREST_REPO1_STORAGE_VERIFY_TLS for a test endpoint)"
            )
        elif "NoSuchBucket" in text:
            hint = f"bucket '{repo.bucket}' does not exist at {repo.endpoint}:{repo.port} (check {repo.bucket_setting})"
        elif any(code in text for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", " 403 ")):
            hint = f"the repository {repo.address} refused our credentials (check AWS_ACCESS_KEY_ID / the IAM role)"
        elif "FormatError" in text or "CryptoError" in text:
            hint = (
                "the repository's info files cannot be read: wrong cipher passphrase, or not a pgBackRest "
                "repository (check PGBACKREST_REPO1_CIPHER_PASS and repo_path in the "
                f"{SPEC_SECTION})"
            )
        elif "[068]" in text or "[082]" in text or "ArchiveTimeoutError" in text or "was not archived" in text:
            hint = (
                "WAL archiving from the source into the repository is not working (check the source's "
                f"archive_command: it must run `pgbackrest --stanza={session.stanza} archive-push %p` with this "
                "repository's settings; see pg_stat_archiver and the server log)"
            )
        elif "DbConnectError" in text:
            hint = (
                "pgBackRest cannot connect to the source PostgreSQL through its Unix socket "
                f"(check connection.port in the platform spec and the driver's pg_socket_path)"
            )
        elif "[027]" in text or "[058]" in text or "pg_control" in text:
            hint = f"no matching PostgreSQL cluster at pg1-path (check pg_path in the {SPEC_SECTION})"
        elif "missing stanza" in text or "stanza-create" in text:
            hint = self._stanza_missing(session.stanza, "")
        else:
            return said
        return f"{hint}; pgbackrest said: {said}"

    def _stanza_missing(self, stanza: str, repo_path: str) -> str:
        in_path = f" under {repo_path}" if repo_path else ""
        return (
            f"stanza '{stanza}' does not exist in the repository {self.repo.address}{in_path} "
            f"(check stanza and repo_path in the {SPEC_SECTION}; a backup creates it)"
        )

    def _endpoint(self, datastore: Datastore, password: str | None) -> PostgresEndpoint:
        conn = datastore.connection
        assert conn.host and conn.port and conn.database and conn.user  # the spec requires them
        return PostgresEndpoint(
            name=datastore.name, host=conn.host, port=conn.port, database=conn.database, user=conn.user,
            password=password or "", password_env=conn.password_env or "", connect_timeout=self.connect_timeout,
        )

    def _source_state(
        self, datastore: Datastore, password: str | None, where: str
    ) -> tuple[dict[str, int], str, ArchiverStatus]:
        """Row counts (one REPEATABLE READ snapshot), server version and archiver status of the source."""
        try:
            with self._endpoint(datastore, password).connect() as conn:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                version_row = conn.execute("SELECT current_setting('server_version')").fetchone()
                counts = count_logged_rows(conn)
                archiver = _read_archiver(conn)
                conn.rollback()
        except OpsPlatformError as error:
            raise BackupError(f"{where}: the backup is in the repository but counting rows failed: {error}") from None
        return counts, str(version_row[0]) if version_row else "", archiver


@dataclass(frozen=True)
class RestoredCluster(RestoredPostgres):
    """A scratch cluster restored by pgBackRest; reached through its Unix socket (``host`` is the socket directory).

    ``recovery_point``: the point in time recovery reached (the target time,
    or the backup's stop); ``recovery_note``: how it was reached, or why no
    later point could be proven.
    """

    address: str = ""
    data_dir: Path | None = None
    recovery_point: datetime | None = None
    recovery_note: str = ""

    def counts(self) -> dict[str, int]:
        with self.connect() as conn:
            conn.read_only = True
            return count_logged_rows(conn)


def count_logged_rows(conn: psycopg.Connection) -> dict[str, int]:
    """Rows of every logged user table, as seen by ``conn``'s current transaction."""
    counts: dict[str, int] = {}
    for schema, table in conn.execute(LOGGED_TABLES_SQL).fetchall():
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        row = conn.execute(query).fetchone()
        counts[table_key(schema, table)] = int(row[0]) if row else 0
    return counts


def _read_archiver(conn: psycopg.Connection) -> ArchiverStatus:
    row = conn.execute(
        "SELECT last_archived_wal, last_archived_time, last_failed_wal, last_failed_time FROM pg_stat_archiver"
    ).fetchone()
    if row is None:
        return ArchiverStatus(None, None, None, None)
    return ArchiverStatus(*row)


def _pgbackrest_section(datastore: Datastore, error: type[OpsPlatformError]) -> PgBackRestOptions:
    if datastore.pgbackrest is None:
        raise error(f"datastore '{datastore.name}' has no pgbackrest section in the platform spec")
    return datastore.pgbackrest


def _ancestors(backups: Mapping[str, Mapping[str, Any]], label: str) -> set[str]:
    """The backups ``label`` is built on: its prior, that one's prior, ... (what pgBackRest expires it with)."""
    found: set[str] = set()
    prior = backups.get(label, {}).get("prior")
    while prior and prior not in found:
        found.add(prior)
        prior = backups.get(prior, {}).get("prior")
    return found


def _archive_min(info: Mapping[str, Any]) -> str | None:
    """The oldest WAL segment of the current database's archive."""
    archives = [archive for archive in info.get("archive", []) if archive.get("min")]
    if not archives:
        return None
    return str(max(archives, key=lambda archive: archive.get("database", {}).get("id", 0))["min"])


def _target_not_reached(log_path: Path, where: str, target_time: datetime | None) -> RestoreError | None:
    """The error for a recovery whose WAL ended before its target time, read from the scratch server's log."""
    if target_time is None:
        return None
    try:
        log = log_path.read_text(errors="replace")
    except OSError:
        return None
    if TARGET_NOT_REACHED not in log:
        return None
    restored = _RESTORED_WAL.findall(log)
    last = f"the last segment it had was {restored[-1]}" if restored else "it had no segment from the archive"
    return RestoreError(
        f"{where}: WAL replay ended before the target time {target_time.isoformat()}: the repository's WAL "
        f"archive does not reach it ({last}); a segment is missing or was never archived (run pgbackrest "
        "verify on the stanza, and check the source's archive_command and pg_stat_archiver)"
    )


def backup_sizes(entry: Mapping[str, Any]) -> tuple[int, int]:
    """``(source_bytes, stored_bytes)`` of one backup from its ``pgbackrest info`` entry.

    Source: ``info.delta``, the bytes of the cluster's files this backup
    copied: the whole cluster (``info.size``) for a full, only the files
    changed since the prior backup for an incr, so bytes / duration is the
    read rate. Stored: ``info.repository.delta``, the bytes this backup added
    to the repository, i.e. what expiring it frees; ``info.repository.size``
    would also count the files it references in earlier backups, so summing it
    over the catalog's backups would count those several times. The WAL archive
    is in neither.
    """
    info = entry["info"]
    return int(info["delta"]), int(info["repository"]["delta"])


def _new_backup(info: Mapping[str, Any], before: set[str], where: str) -> dict[str, Any]:
    new = [backup for backup in info.get("backup", []) if backup["label"] not in before]
    if not new:
        raise BackupError(f"{where}: pgbackrest backup succeeded but pgbackrest info lists no new backup")
    return max(new, key=lambda backup: backup["timestamp"]["stop"])


def _archive_max(info: Mapping[str, Any]) -> str | None:
    maxima = [archive.get("max") for archive in info.get("archive", []) if archive.get("max")]
    return max(maxima, key=lambda name: _wal_segment(name) or "") if maxima else None


def _info_record(info: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """This backup's part of ``pgbackrest info``: the stanza, its database, archive range and the backup."""
    return {
        "format": "pgbackrest-info/1",
        "stanza": info.get("name"),
        "cipher": info.get("cipher"),
        "db": [db for db in info.get("db", []) if db.get("id") == entry["database"]["id"]],
        "archive": [a for a in info.get("archive", []) if a.get("database", {}).get("id") == entry["database"]["id"]],
        "backup": entry,
    }


def _refuse_nested_data_dir(name: str, source: Mapping[str, Any], data_dir: str | None) -> None:
    """A scratch directory inside the source's data directory (or around it) would write into the source."""
    if not data_dir or not source.get("data_dir"):
        return
    target = Path(data_dir).resolve()
    origin = Path(source["data_dir"]).resolve()
    if target.is_relative_to(origin) or origin.is_relative_to(target):
        raise RestoreRefused(
            f"restore of '{name}' refused: {TARGET_SETTING}.data_dir {data_dir} overlaps the source's data "
            f"directory {origin}; use a directory outside it"
        )


def _first_error(text: str) -> str:
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if _ERROR_LINE.match(line.strip()) and line.lstrip().startswith("ERROR"):
            follow = [rest.strip() for rest in lines[index + 1:index + 4] if rest.startswith(" ")]
            return " ".join([line.strip(), *follow])
    return " ".join(line.strip() for line in lines[-3:])


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


__all__ = [
    "INFO_ARTIFACT",
    "ArchiverStatus",
    "PgBackRestDriver",
    "PgBackRestRepo",
    "RecoveryPoint",
    "RestoredCluster",
    "VerifyReport",
    "archive_command",
    "backup_sizes",
    "choose_backup_type",
    "count_logged_rows",
    "newest_restorable_point",
    "option_env",
    "parse_verify_text",
    "pgbackrest_config_text",
]
