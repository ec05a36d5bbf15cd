"""Start PostgreSQL on a data directory restored from a physical backup (pgBackRest).

Unlike :func:`ops_platform.local_servers.postgres.start_postgres` this never
runs initdb and never writes to the cluster: a restored cluster may still be
in recovery when it first accepts connections, and its roles and databases
are the backup's. Everything that makes it a scratch server is given on the
postmaster's command line, which outranks every configuration file the
backup brought along (``postgresql.conf``, ``postgresql.auto.conf``):

- it listens on the scratch address and port only, with its own socket directory;
- ``archive_mode=off``, so a restored server never pushes WAL into the source's archive;
- its own ``pg_hba.conf``: trust on the Unix socket (a 0700 directory only the
  service user and root can enter), SCRAM passwords over TCP.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import psycopg

from ops_platform.local_servers.postgres import POSTGRES_LIB_DIR, PostgresServer, service_user
from ops_platform.local_servers.process import chown_to, service_user_prefix

SCRATCH_HBA = """\
# written by ops_platform.local_servers.postgres_scratch for a restored scratch server
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""

# Settings a scratch server always runs with, whatever the restored configuration says.
SCRATCH_SETTINGS: dict[str, str] = {
    "archive_mode": "off",
    "ssl": "off",
}


def bin_dir_for(data_dir: Path, lib_dir: Path = POSTGRES_LIB_DIR) -> Path:
    """The ``bin`` directory of the PostgreSQL major version the data directory was made by."""
    version = (data_dir / "PG_VERSION").read_text().strip()
    bin_dir = lib_dir / version / "bin"
    if not (bin_dir / "postgres").is_file():
        raise FileNotFoundError(
            f"{data_dir} is a PostgreSQL {version} cluster but PostgreSQL {version} is not "
            f"installed under {lib_dir} (install postgresql-{version})"
        )
    return bin_dir


def start_restored_postgres(
    data_dir: Path,
    port: int,
    *,
    run_dir: Path,
    user: str,
    database: str,
    host: str = "127.0.0.1",
    settings: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 60.0,
) -> PostgresServer:
    """Start the postmaster on a restored ``data_dir`` and return once it accepts ``user``.

    ``run_dir`` (a directory of the caller's, enterable by the service user)
    receives the log, the socket directory and the ``pg_hba.conf``.
    ``settings`` are extra ``-c name=value`` settings (they cannot turn
    archiving back on). ``env`` is the postmaster's whole environment, e.g.
    what its ``restore_command`` needs. The server may still be in recovery
    when this returns: poll ``pg_is_in_recovery()``. Raises
    :class:`~ops_platform.local_servers.process.ServerStartError` with the
    log tail when it exits or does not answer within ``start_timeout``.
    """
    data_dir = Path(data_dir).absolute()
    run_dir = Path(run_dir).absolute()
    owner = service_user()
    bin_dir = bin_dir_for(data_dir)
    socket_dir = run_dir / "sock"
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    hba_path = run_dir / "pg_hba.conf"
    hba_path.write_text(SCRATCH_HBA)
    hba_path.chmod(0o644)  # no secret in it; the service user must read it
    for path in (data_dir, socket_dir):
        chown_to(path, owner)
    data_dir.chmod(0o700)

    given = dict(settings or {})
    given.update(SCRATCH_SETTINGS)
    given.update(
        {
            "listen_addresses": host,
            "port": str(port),
            "unix_socket_directories": str(socket_dir),
            "hba_file": str(hba_path),
        }
    )
    argv = [*service_user_prefix(owner), str(bin_dir / "postgres"), "-D", str(data_dir)]
    for name, value in given.items():
        argv += ["-c", f"{name}={value}"]

    server = PostgresServer(
        argv=argv,
        log_path=run_dir / "postgresql.log",
        data_dir=data_dir,
        socket_dir=socket_dir,
        host=host,
        port=port,
        user=user,
        password="",
        database=database,
    )
    # PostgresServer takes neither: its own readiness check logs in as ``postgres``,
    # a role a restored cluster need not have.
    server.env = dict(env) if env is not None else None
    server.ready = lambda: _accepts(socket_dir, port, user, database)
    server.start(start_timeout)
    return server


def in_recovery(server: PostgresServer) -> bool:
    with _connect(server.socket_dir, server.port, server.user, server.database) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def _connect(socket_dir: Path, port: int, user: str, database: str) -> psycopg.Connection:
    return psycopg.connect(
        host=str(socket_dir), port=port, user=user, dbname=database, connect_timeout=5, autocommit=True
    )


def _accepts(socket_dir: Path, port: int, user: str, database: str) -> bool:
    with _connect(socket_dir, port, user, database):
        return True


__all__ = ["SCRATCH_HBA", "SCRATCH_SETTINGS", "bin_dir_for", "in_recovery", "start_restored_postgres"]
