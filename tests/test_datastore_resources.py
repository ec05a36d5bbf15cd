"""PostgreSQL and Redis resources against real servers, and their errors."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers.postgres import PostgresServer
from ops_platform.local_servers.redis import RedisServer
from ops_platform.resources.datastores import (
    DatastoreAccessError,
    PostgresResource,
    RedisResource,
)


def postgres_resource(server: PostgresServer, **overrides: object) -> PostgresResource:
    settings: dict[str, object] = dict(
        name="postgres_main", host=server.host, port=server.port, database=server.database,
        user=server.user, password=server.password, password_env="PG_PASSWORD",
    )
    return PostgresResource(**{**settings, **overrides})


def redis_resource(server: RedisServer, **overrides: object) -> RedisResource:
    settings: dict[str, object] = dict(
        name="redis_cache", host=server.host, port=server.port, password=server.password,
        password_env="REDIS_PASSWORD",
    )
    return RedisResource(**{**settings, **overrides})


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def silent_server() -> Iterator[int]:
    """Accepts TCP connections (through the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@contextmanager
def babbling_server() -> Iterator[int]:
    """Answers anything with bytes that are neither PostgreSQL nor Redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                conn.recv(1024)
                conn.sendall(b"garbage!\r\n" * 3)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        thread.join(timeout=2)
        listener.close()


def test_postgres_resource_connects_and_reports_version(postgres_server: PostgresServer) -> None:
    resource = postgres_resource(postgres_server)
    resource.ping()
    with resource.connect() as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("ops",)
    assert resource.server_version().startswith("15.")


def test_postgres_wrong_password_names_the_env_var_never_the_password(
    postgres_server: PostgresServer,
) -> None:
    wrong = "wrong-Secret-123"
    with pytest.raises(DatastoreAccessError) as failure:
        postgres_resource(postgres_server, password=wrong).connect()
    message = str(failure.value)
    assert message == (
        f"postgresql 'postgres_main': password authentication failed for user 'ops' "
        f"at 127.0.0.1:{postgres_server.port} "
        "(check PG_PASSWORD and connection.user in the platform spec)"
    )
    assert wrong not in message and postgres_server.password not in message
    assert wrong not in repr(postgres_resource(postgres_server, password=wrong).endpoint())


def test_postgres_unknown_database_names_the_database_setting(
    postgres_server: PostgresServer,
) -> None:
    with pytest.raises(DatastoreAccessError, match="database 'nope' does not exist") as failure:
        postgres_resource(postgres_server, database="nope").ping()
    assert "check connection.database in the platform spec" in str(failure.value)


def test_postgres_down_is_reported_fast_with_address_and_setting(
    postgres_server: PostgresServer,
) -> None:
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError) as failure:
        postgres_resource(postgres_server, port=port).connect()
    assert time.monotonic() - started < 6
    assert str(failure.value) == (
        f"postgresql 'postgres_main': connection refused at 127.0.0.1:{port} "
        "(check connection.host/port in the platform spec)"
    )


def test_postgres_silent_server_times_out(postgres_server: PostgresServer) -> None:
    with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(ServerUnreachableError, match=f"no answer within 2 s at 127.0.0.1:{port}"):
            postgres_resource(postgres_server, port=port, connect_timeout=2).ping()
    assert time.monotonic() - started < 6


def test_postgres_garbled_answer_says_it_is_not_postgres(postgres_server: PostgresServer) -> None:
    with babbling_server() as port:
        with pytest.raises(ServerUnreachableError, match="does not speak PostgreSQL") as failure:
            postgres_resource(postgres_server, port=port).ping()
    assert f"127.0.0.1:{port}" in str(failure.value)


def test_postgres_unknown_host_names_the_host_setting(postgres_server: PostgresServer) -> None:
    with pytest.raises(ServerUnreachableError, match="check connection.host in the platform spec"):
        postgres_resource(postgres_server, host="db.invalid").ping()


def test_redis_resource_client_reads_and_writes(redis_server: RedisServer) -> None:
    client = redis_resource(redis_server).client()
    client.set("resources:answer", 42)
    assert client.get("resources:answer") == b"42"
    redis_resource(redis_server).ping()


def test_redis_wrong_password_names_the_env_var_never_the_password(
    redis_server: RedisServer,
) -> None:
    wrong = "wrong-Secret-456"
    with pytest.raises(DatastoreAccessError) as failure:
        redis_resource(redis_server, password=wrong).client()
    message = str(failure.value)
    assert message == (
        f"redis 'redis_cache': the password was refused at 127.0.0.1:{redis_server.port} "
        "(check REDIS_PASSWORD)"
    )
    assert wrong not in message and str(redis_server.password) not in message


def test_redis_missing_password_says_one_is_required(redis_server: RedisServer) -> None:
    with pytest.raises(DatastoreAccessError, match="requires a password and none was given"):
        redis_resource(redis_server, password=None).ping()


def test_redis_down_is_reported_fast_with_address_and_setting(redis_server: RedisServer) -> None:
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError) as failure:
        redis_resource(redis_server, port=port).client()
    assert time.monotonic() - started < 6
    assert str(failure.value) == (
        f"redis 'redis_cache': connection refused at 127.0.0.1:{port} "
        "(check connection.host/port in the platform spec)"
    )


def test_redis_silent_server_times_out(redis_server: RedisServer) -> None:
    with silent_server() as port:
        with pytest.raises(ServerUnreachableError, match="no answer within 0.5 s"):
            redis_resource(redis_server, port=port, socket_timeout=0.5).ping()


def test_redis_pointed_at_postgres_or_garbage_says_so(
    redis_server: RedisServer, postgres_server: PostgresServer,
) -> None:
    with pytest.raises(ServerUnreachableError, match="closed the connection"):
        redis_resource(redis_server, port=postgres_server.port).ping()
    with babbling_server() as port:
        with pytest.raises(ServerUnreachableError, match="does not speak Redis"):
            redis_resource(redis_server, port=port).ping()


def test_redis_unknown_db_index_names_the_setting(redis_server: RedisServer) -> None:
    with pytest.raises(DatastoreAccessError, match="database index 99 does not exist"):
        redis_resource(redis_server, db=99).ping()
