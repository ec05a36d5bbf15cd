"""The local PostgreSQL, Redis and etcd servers, started for real."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ops_platform.local_servers.etcd import EtcdServer, start_etcd
from ops_platform.local_servers.postgres import PostgresServer, start_postgres
from ops_platform.local_servers.process import ServerStartError, free_port
from ops_platform.local_servers.redis import RedisServer, start_redis


@contextmanager
def port_taken() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_postgres_creates_role_and_database_owned_by_it(postgres_server: PostgresServer) -> None:
    with postgres_server.connect() as conn:
        user, database = conn.execute("SELECT current_user, current_database()").fetchone()
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()[0]
        wal_level = conn.execute("SHOW wal_level").fetchone()[0]
        archive_mode = conn.execute("SHOW archive_mode").fetchone()[0]
    assert (user, database, owner) == ("ops", "ontology", "ops")
    assert (wal_level, archive_mode) == ("replica", "off")


def test_postgres_takes_only_the_role_password_over_tcp(postgres_server: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=postgres_server.host, port=postgres_server.port, user="ops",
            password="not-the-password", dbname="ontology",
        )
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=postgres_server.host, port=postgres_server.port, user="postgres",
            password="postgres", dbname="postgres",
        )


def test_postgres_restart_on_same_data_dir_keeps_rows_and_resets_password(
    postgres_scratch_dir: Path,
) -> None:
    data_dir = postgres_scratch_dir / "data"
    port = free_port()
    with start_postgres(data_dir, port, password="first", database="catalog") as server:
        with server.connect() as conn:
            conn.execute("CREATE TABLE concept (name text)")
            conn.execute("INSERT INTO concept VALUES ('ontology')")
    _as_left_by_a_root_restore(data_dir)

    with start_postgres(
        data_dir, port, password="second", database="catalog",
        extra_conf={"work_mem": "8MB"},
    ) as server:
        with server.connect() as conn:
            assert conn.execute("SELECT name FROM concept").fetchall() == [("ontology",)]
            assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host=server.host, port=port, user="ops", password="first",
                            dbname="catalog")
    assert not server.running()
    assert "database system is shut down" in server.log_tail()


def _as_left_by_a_root_restore(data_dir: Path) -> None:
    data_dir.chmod(0o755)
    if os.geteuid() == 0:
        for path in [data_dir, *data_dir.rglob("*")]:
            os.chown(path, 0, 0, follow_symlinks=False)


def test_postgres_on_a_taken_port_fails_with_its_log(postgres_scratch_dir: Path) -> None:
    with port_taken() as port, pytest.raises(ServerStartError) as failure:
        start_postgres(postgres_scratch_dir / "data", port, password="pw")
    assert "postgresql exited" in str(failure.value)
    assert "Address already in use" in str(failure.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to the postgres user")
def test_postgres_names_the_directory_its_user_cannot_enter(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(ServerStartError, match=f"cannot enter {locked}"):
        start_postgres(locked / "data", free_port(), password="pw")


def test_redis_asks_for_its_password(redis_server: RedisServer) -> None:
    anonymous = redis.Redis(
        host=redis_server.host, port=redis_server.port, socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    client = redis_server.client()
    client.set("local-servers:greeting", "hello")
    assert client.get("local-servers:greeting") == b"hello"


def test_redis_restart_loads_only_what_save_wrote(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    port = free_port()
    # No snapshot rules, so shutdown does not save: only the explicit SAVE reaches the RDB.
    with start_redis(data_dir, port, password="pw", save="") as server:
        client = server.client()
        client.set("saved", "yes")
        client.save()
        client.set("unsaved", "lost")
    with start_redis(data_dir, port, password="pw", save="") as server:
        client = server.client()
        assert client.get("saved") == b"yes"
        assert client.get("unsaved") is None


def test_redis_starts_on_an_rdb_copied_into_a_new_data_dir(tmp_path: Path) -> None:
    with start_redis(tmp_path / "source", free_port(), rdb_filename="backup.rdb") as source:
        source.client().hset("concept:1", mapping={"name": "ontology"})
        source.client().save()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copy(source.rdb_path, scratch / "backup.rdb")
    with start_redis(scratch, free_port(), rdb_filename="backup.rdb") as restored:
        assert restored.client().hgetall("concept:1") == {b"name": b"ontology"}


def test_redis_on_a_port_held_by_another_redis_fails_with_its_log(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    with pytest.raises(ServerStartError) as failure:
        start_redis(tmp_path / "second", redis_server.port, password=redis_server.password)
    assert "Address already in use" in str(failure.value)
    assert redis_server.running()


def _etcd_call(server: EtcdServer, path: str, body: dict[str, str]) -> dict:
    request = urllib.request.Request(
        f"{server.url}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _etcd_get(server: EtcdServer, key: str) -> str | None:
    kvs = _etcd_call(server, "/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def test_etcd_put_and_get_over_the_grpc_gateway(etcd_server: EtcdServer) -> None:
    _etcd_call(etcd_server, "/v3/kv/put", {"key": _b64("/registry/x"), "value": _b64("1")})
    assert _etcd_get(etcd_server, "/registry/x") == "1"
    assert _etcd_get(etcd_server, "/registry/missing") is None


def test_etcd_restart_keeps_keys(tmp_path: Path) -> None:
    client_port, peer_port = free_port(), free_port()
    with start_etcd(tmp_path / "etcd", client_port, peer_port) as server:
        _etcd_call(server, "/v3/kv/put", {"key": _b64("kept"), "value": _b64("yes")})
    with start_etcd(tmp_path / "etcd", client_port, peer_port) as server:
        assert _etcd_get(server, "kept") == "yes"


def test_etcd_on_a_port_held_by_another_etcd_fails_with_its_log(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    with pytest.raises(ServerStartError) as failure:
        start_etcd(tmp_path / "second", etcd_server.port, free_port())
    assert "address already in use" in str(failure.value)
    assert etcd_server.running()
