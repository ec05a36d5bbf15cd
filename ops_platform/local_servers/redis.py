"""A local Redis server: the sandbox's cache and restore-test scratch target.

Its settings go to a ``redis.conf`` (mode 0600) in the data directory rather
than the command line, so the password never shows in ``ps``. An RDB file
already in the data directory is loaded at start: a restore test copies a
backup there and starts the server on it.
"""

from __future__ import annotations

from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ops_platform.local_servers.process import ServerProcess, find_binary

DEFAULT_SAVE = "60 1"


class RedisServer(ServerProcess):
    """A running redis-server plus what a client needs to reach it."""

    def __init__(
        self,
        *,
        argv: list[str],
        log_path: Path,
        data_dir: Path,
        host: str,
        port: int,
        password: str | None,
        rdb_filename: str,
    ) -> None:
        super().__init__(
            "redis", argv, log_path=log_path, ready=self._serves_our_data, cwd=data_dir,
            host=host, port=port,
        )
        self.data_dir = data_dir
        self.password = password
        self.rdb_filename = rdb_filename

    def __repr__(self) -> str:
        return f"RedisServer(host={self.host!r}, port={self.port}, data_dir='{self.data_dir}')"

    @property
    def rdb_path(self) -> Path:
        return self.data_dir / self.rdb_filename

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, password=self.password, db=db,
            socket_timeout=5, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0),
        )

    def _serves_our_data(self) -> bool:
        """Ready once this very process answers and has finished loading its RDB.

        Checking the pid keeps another Redis already on the port from passing
        for ours.
        """
        with redis.Redis(
            host=self.host, port=self.port, password=self.password,
            socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0),
        ) as probe:
            info = probe.info()
        return (
            self.process is not None
            and info.get("process_id") == self.process.pid
            and info.get("loading") == 0
        )


def start_redis(
    data_dir: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    password: str | None = None,
    rdb_filename: str = "dump.rdb",
    save: str = DEFAULT_SAVE,
    start_timeout: float = 30.0,
) -> RedisServer:
    """Start redis-server on ``data_dir``, loading ``rdb_filename`` from it if present.

    ``save`` is Redis's snapshot rule (``"60 1"``: after 60 s if one key
    changed; ``""`` turns snapshots off). Raises
    :class:`~ops_platform.local_servers.process.ServerStartError` with the log
    tail if the server does not come up, e.g. when the port is taken.
    """
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf_path = data_dir / "redis.conf"
    _write_conf(
        conf_path,
        {
            "bind": host,
            "port": str(port),
            "dir": str(data_dir),
            "dbfilename": rdb_filename,
            "save": save,
            "appendonly": "no",
            "daemonize": "no",
            "protected-mode": "yes",
            "logfile": "",
            **({"requirepass": password} if password else {}),
        },
    )
    server = RedisServer(
        argv=[find_binary("redis-server"), str(conf_path)],
        log_path=data_dir.parent / f"{data_dir.name}.log",
        data_dir=data_dir,
        host=host,
        port=port,
        password=password,
        rdb_filename=rdb_filename,
    )
    server.start(start_timeout)
    return server


def _write_conf(path: Path, settings: dict[str, str]) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("".join(f"{name} {_quote(value)}\n" for name, value in settings.items()))


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


__all__ = ["DEFAULT_SAVE", "RedisServer", "start_redis"]
