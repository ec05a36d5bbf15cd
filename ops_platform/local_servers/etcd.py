"""A local single-member etcd: the sandbox's stand-in for the cluster's etcd.

Written for etcd 3.4 (Debian 12): the v3 API is served over HTTP by the
gRPC gateway at ``/v3/...``, and ``/health`` answers ``{"health":"true"}``.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from ops_platform.local_servers.process import ServerProcess, find_binary


class EtcdServer(ServerProcess):
    """A running etcd member; ``url`` is its client URL."""

    def __init__(
        self,
        *,
        argv: list[str],
        log_path: Path,
        data_dir: Path,
        host: str,
        client_port: int,
        peer_port: int,
        member_name: str,
    ) -> None:
        super().__init__(
            "etcd", argv, log_path=log_path, ready=self._healthy, cwd=data_dir.parent,
            host=host, port=client_port,
        )
        self.data_dir = data_dir
        self.peer_port = peer_port
        self.member_name = member_name

    def __repr__(self) -> str:
        return f"EtcdServer(url={self.url!r}, data_dir='{self.data_dir}')"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def _healthy(self) -> bool:
        """Healthy, and the one answering is this process, not another etcd on the port."""
        if self.process is None or not _listens_on(self.process.pid, self.port):
            return False
        with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
            return json.load(response).get("health") == "true"


def start_etcd(
    data_dir: Path,
    client_port: int,
    peer_port: int,
    *,
    host: str = "127.0.0.1",
    name: str = "sandbox",
    start_timeout: float = 30.0,
) -> EtcdServer:
    """Start a one-member etcd cluster on ``data_dir``; a restart keeps its keys.

    Raises :class:`~ops_platform.local_servers.process.ServerStartError` with
    the log tail if etcd does not come up, e.g. when a port is taken.
    """
    data_dir = Path(data_dir).absolute()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    client_url = f"http://{host}:{client_port}"
    peer_url = f"http://{host}:{peer_port}"
    server = EtcdServer(
        argv=[
            find_binary("etcd"),
            "--name", name,
            "--data-dir", str(data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-cluster-state", "new",
            # One member: elect it at once instead of after the 1 s default timeout.
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ],
        log_path=data_dir.parent / f"{data_dir.name}.log",
        data_dir=data_dir,
        host=host,
        client_port=client_port,
        peer_port=peer_port,
        member_name=name,
    )
    server.start(start_timeout)
    return server


def _listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    listening_inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "0A":  # 0A: LISTEN
                listening_inodes.add(fields[9])
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening_inodes:
            return True
    return False


__all__ = ["EtcdServer", "start_etcd"]
