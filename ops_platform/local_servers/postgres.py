"""A local PostgreSQL server: the sandbox's database and restore-test scratch target.

The postmaster runs in the foreground under :class:`ServerProcess` (no
``pg_ctl`` daemon), as the ``postgres`` user when we are root because
PostgreSQL refuses to run as root. Connections over TCP on loopback use
SCRAM passwords; the superuser is reachable only through the Unix socket,
whose directory only the service user (and root) can enter.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql

from ops_platform.local_servers.process import (
    ServerProcess,
    ServerStartError,
    chown_to,
    service_user_prefix,
)

SUPERUSER = "postgres"
POSTGRES_LIB_DIR = Path("/usr/lib/postgresql")
CONF_INCLUDE_FILE = "ops_platform.conf"

# Settings pgBackRest (and pg_basebackup) need; archiving stays off unless asked.
DEFAULT_CONF: dict[str, str] = {
    "wal_level": "replica",
    "max_wal_senders": "3",
    "wal_keep_size": "64MB",
}

# A Unix socket path must fit in sockaddr_un.sun_path (108 bytes) with ".s.PGSQL.<port>".
_MAX_SOCKET_DIR_LENGTH = 90


def archiving_conf(archive_command: str, archive_timeout_seconds: int = 60) -> dict[str, str]:
    """``extra_conf`` that turns on WAL archiving, e.g. with ``pgbackrest archive-push %p``."""
    return {
        "archive_mode": "on",
        "archive_command": archive_command,
        "archive_timeout": str(archive_timeout_seconds),
    }


def service_user() -> str | None:
    """The OS user the server runs as: ``postgres`` when we are root, else ourselves."""
    return SUPERUSER if os.geteuid() == 0 else None


def postgres_bin_dir(lib_dir: Path = POSTGRES_LIB_DIR) -> Path:
    """The ``bin`` directory of the highest PostgreSQL major version installed."""
    majors = sorted(
        (int(entry.name) for entry in lib_dir.glob("*") if entry.name.isdigit()),
        reverse=True,
    )
    for major in majors:
        bin_dir = lib_dir / str(major) / "bin"
        if (bin_dir / "postgres").is_file():
            return bin_dir
    raise FileNotFoundError(
        f"PostgreSQL is not installed under {lib_dir} "
        "(run `make deps` or scripts/install-system-deps.sh)"
    )


def scratch_dir(prefix: str = "ops-pg-") -> Path:
    """A fresh directory under the system temp dir that the ``postgres`` user can enter.

    pytest's ``tmp_path`` lives under a 0700 directory owned by root, which the
    ``postgres`` user cannot traverse, so data directories go here instead.
    The caller removes it (``shutil.rmtree``) when done.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


class PostgresServer(ServerProcess):
    """A running postmaster plus what a client needs to reach it."""

    def __init__(
        self,
        *,
        argv: list[str],
        log_path: Path,
        data_dir: Path,
        socket_dir: Path,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str,
    ) -> None:
        super().__init__(
            "postgresql",
            argv,
            log_path=log_path,
            ready=self._accepts_superuser,
            cwd=data_dir,
            host=host,
            port=port,
            stop_signal=signal.SIGINT,  # fast shutdown with a clean checkpoint
        )
        self.data_dir = data_dir
        self.socket_dir = socket_dir
        self.user = user
        self.password = password
        self.database = database

    def __repr__(self) -> str:
        return (
            f"PostgresServer(host={self.host!r}, port={self.port}, user={self.user!r}, "
            f"database={self.database!r}, data_dir='{self.data_dir}')"
        )

    def conninfo(self, database: str | None = None) -> str:
        """libpq keyword string for the application role over TCP (includes the password)."""
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database or self.database,
        )

    def connect(self, database: str | None = None) -> psycopg.Connection:
        """A connection as the application role, over TCP with its password."""
        return psycopg.connect(self.conninfo(database), connect_timeout=5)

    def connect_superuser(self, database: str = "postgres") -> psycopg.Connection:
        """A connection as ``postgres`` through the Unix socket (no password)."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            connect_timeout=5,
            autocommit=True,
        )

    def _accepts_superuser(self) -> bool:
        with self.connect_superuser():
            return True


def start_postgres(
    data_dir: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    user: str = "ops",
    password: str,
    database: str = "ontology",
    superuser_password: str | None = None,
    extra_conf: Mapping[str, str] | None = None,
    start_timeout: float = 30.0,
) -> PostgresServer:
    """Start PostgreSQL on ``data_dir``, creating the cluster, role and database if missing.

    A second start on the same ``data_dir`` keeps its data; the role's password
    is reset to ``password`` each time. ``extra_conf`` is merged over
    :data:`DEFAULT_CONF` into ``ops_platform.conf`` inside the data directory.
    Raises :class:`ServerStartError` with the log tail if the server does not come up.
    """
    data_dir = Path(data_dir).absolute()
    owner = service_user()
    _check_reachable(data_dir.parent, owner)
    bin_dir = postgres_bin_dir()
    log_path = data_dir.parent / f"{data_dir.name}.log"
    socket_dir = _socket_dir(data_dir, owner)

    data_dir.mkdir(parents=True, exist_ok=True)
    chown_to(data_dir, owner)
    if stat.S_IMODE(data_dir.stat().st_mode) not in (0o700, 0o750):
        data_dir.chmod(0o700)  # postgres refuses a data directory others can read
    if not (data_dir / "PG_VERSION").exists():
        _initdb(bin_dir, data_dir, owner)
    _write_conf(data_dir, {**DEFAULT_CONF, **(extra_conf or {})}, owner)

    server = PostgresServer(
        argv=[
            *service_user_prefix(owner),
            str(bin_dir / "postgres"),
            "-D", str(data_dir),
            "-k", str(socket_dir),
            "-p", str(port),
            "-c", f"listen_addresses={host}",
        ],
        log_path=log_path,
        data_dir=data_dir,
        socket_dir=socket_dir,
        host=host,
        port=port,
        user=user,
        password=password,
        database=database,
    )
    server.start(start_timeout)
    try:
        _ensure_role_and_database(server, superuser_password)
    except psycopg.Error as error:
        server.stop()
        raise ServerStartError(
            f"postgresql on {host}:{port} started but creating role '{user}' "
            f"and database '{database}' failed: {error}"
        ) from error
    return server


def _initdb(bin_dir: Path, data_dir: Path, owner: str | None) -> None:
    argv = [
        *service_user_prefix(owner),
        str(bin_dir / "initdb"),
        "-D", str(data_dir),
        "-U", SUPERUSER,
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
    ]
    result = subprocess.run(
        argv, cwd=data_dir, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise ServerStartError(
            f"initdb of {data_dir} failed with code {result.returncode}:\n"
            + "\n".join(output[-20:])
        )
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write(f"\ninclude_if_exists = '{CONF_INCLUDE_FILE}'\n")


def _write_conf(data_dir: Path, settings: Mapping[str, str], owner: str | None) -> None:
    """Write our settings file and make sure postgresql.conf includes it.

    A data directory restored from a backup already has the include line; one
    initialised elsewhere gets it appended.
    """
    main_conf = data_dir / "postgresql.conf"
    include_line = f"include_if_exists = '{CONF_INCLUDE_FILE}'"
    if main_conf.exists() and include_line not in main_conf.read_text():
        with open(main_conf, "a") as conf:
            conf.write(f"\n{include_line}\n")
    lines = [f"{name} = {_quote_setting(str(value))}" for name, value in settings.items()]
    path = data_dir / CONF_INCLUDE_FILE
    path.write_text("# written by ops_platform.local_servers.postgres at each start\n"
                    + "\n".join(lines) + "\n")
    chown_to(path, owner)


def _quote_setting(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _socket_dir(data_dir: Path, owner: str | None) -> Path:
    socket_dir = data_dir.parent / f"{data_dir.name}.sock"
    if len(str(socket_dir)) > _MAX_SOCKET_DIR_LENGTH:
        socket_dir = Path(tempfile.mkdtemp(prefix="ops-pg-sock-"))
    socket_dir.mkdir(parents=True, exist_ok=True)
    socket_dir.chmod(0o700)
    chown_to(socket_dir, owner)
    return socket_dir


def _ensure_role_and_database(server: PostgresServer, superuser_password: str | None) -> None:
    role = sql.Identifier(server.user)
    with server.connect_superuser() as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (server.user,)
        ).fetchone()
        verb = sql.SQL("ALTER") if exists else sql.SQL("CREATE")
        conn.execute(
            sql.SQL("{} ROLE {} WITH LOGIN PASSWORD {}").format(
                verb, role, sql.Literal(server.password)
            )
        )
        if superuser_password is not None:
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(superuser_password)
                )
            )
        has_database = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (server.database,)
        ).fetchone()
        if not has_database:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(server.database), role
                )
            )


def _check_reachable(directory: Path, owner: str | None) -> None:
    """Fail early, and say why, when the service user cannot enter ``directory``."""
    if owner is None:
        return
    account = pwd.getpwnam(owner)
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if owner in g.gr_mem}
    for ancestor in [directory, *directory.parents]:
        if not ancestor.exists():
            continue
        info = ancestor.stat()
        if info.st_uid == account.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            raise ServerStartError(
                f"postgresql runs as '{owner}', who cannot enter {ancestor} "
                f"(mode {stat.S_IMODE(info.st_mode):o}); put the data directory elsewhere, "
                "e.g. under ops_platform.local_servers.postgres.scratch_dir()"
            )


__all__ = [
    "DEFAULT_CONF",
    "PostgresServer",
    "archiving_conf",
    "postgres_bin_dir",
    "scratch_dir",
    "service_user",
    "start_postgres",
]
