"""Connections to the platform's PostgreSQL and Redis datastores.

:class:`PostgresEndpoint` and :class:`RedisEndpoint` are plain Python: where a
datastore is, how to log in, and how to turn a failed connection into an error
that names the datastore, the address and the setting to check. Backup
drivers and restore tests use them directly (a restore test builds one for
its scratch server). :class:`PostgresResource` and :class:`RedisResource` are
the Dagster resources that build them from configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from ops_platform.errors import OpsPlatformError, ServerUnreachableError

# The drivers are imported when a connection is made, not when the code location loads.
if TYPE_CHECKING:
    import psycopg
    import redis

ADDRESS_SETTING = "connection.host/port in the platform spec"
HOST_SETTING = "connection.host in the platform spec"
DATABASE_SETTING = "connection.database in the platform spec"
USER_SETTING = "connection.user in the platform spec"


class DatastoreAccessError(OpsPlatformError):
    """The datastore answered but refused us: wrong password, unknown database or role."""

    def __init__(self, system: str, address: str, setting: str, reason: str) -> None:
        self.system = system
        self.address = address
        self.setting = setting
        super().__init__(f"{system}: {reason} at {address} (check {setting})")


def _password_setting(password_env: str) -> str:
    return password_env or "connection.password_env in the platform spec"


def _scrub(text: str, secret: str | None) -> str:
    """Drop the secret from a driver's message, should a driver ever echo it."""
    return text.replace(secret, "***") if secret else text


@dataclass(frozen=True)
class PostgresEndpoint:
    """One PostgreSQL database and the credentials to reach it."""

    name: str
    host: str
    port: int
    database: str
    user: str
    password: str = field(repr=False)
    password_env: str = ""
    sslmode: str = "prefer"
    connect_timeout: int = 5

    @property
    def system(self) -> str:
        return f"postgresql '{self.name}'"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        """An open connection; use it as a context manager to commit and close it."""
        import psycopg

        try:
            return psycopg.connect(
                host=self.host,
                port=self.port,
                dbname=self.database,
                user=self.user,
                password=self.password,
                sslmode=self.sslmode,
                connect_timeout=self.connect_timeout,
                autocommit=autocommit,
                application_name="ops_platform",
            )
        except psycopg.OperationalError as error:
            raise self._explain(error) from None

    def server_version(self) -> str:
        """The server's version string, e.g. ``15.18 (Debian 15.18-0+deb12u1)``."""
        with self.connect(autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        assert row is not None
        return str(row[0])

    def ping(self) -> None:
        """Connect, run ``SELECT 1`` and close; raise the explained error if that fails."""
        with self.connect(autocommit=True) as conn:
            conn.execute("SELECT 1")

    def _explain(self, error: psycopg.OperationalError) -> OpsPlatformError:
        import psycopg

        message = _scrub(str(error), self.password)
        detail = message.rsplit("failed: ", 1)[-1].replace("FATAL:", "").strip()
        detail = detail.splitlines()[0] if detail else type(error).__name__

        def unreachable(reason: str, setting: str = ADDRESS_SETTING) -> ServerUnreachableError:
            return ServerUnreachableError(self.system, self.address, setting, reason)

        def refused(reason: str, setting: str) -> DatastoreAccessError:
            return DatastoreAccessError(self.system, self.address, setting, reason)

        if isinstance(error, psycopg.errors.ConnectionTimeout):
            return unreachable(f"no answer within {self.connect_timeout} s")
        if "Connection refused" in message:
            return unreachable("connection refused")
        if "resolve host" in message or "translate host name" in message:
            return unreachable(f"cannot resolve host '{self.host}'", HOST_SETTING)
        if "password authentication failed" in message or "no password supplied" in message:
            return refused(
                f"password authentication failed for user '{self.user}'",
                f"{_password_setting(self.password_env)} and {USER_SETTING}",
            )
        if f'database "{self.database}" does not exist' in message:
            return refused(f"database '{self.database}' does not exist", DATABASE_SETTING)
        if "SSL" in message and "required" in message:
            return unreachable(detail, f"sslmode ({self.sslmode})")
        if "invalid response" in message or "expected authentication request" in message:
            return unreachable(f"the server there does not speak PostgreSQL ({detail})")
        return unreachable(detail)


@dataclass(frozen=True)
class RedisEndpoint:
    """One Redis database and the password to reach it."""

    name: str
    host: str
    port: int
    password: str | None = field(default=None, repr=False)
    password_env: str = ""
    db: int = 0
    socket_timeout: float = 5.0

    @property
    def system(self) -> str:
        return f"redis '{self.name}'"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self) -> redis.Redis:
        """A client that has answered a PING, so a wrong address or password fails here.

        Retries are off: a failure is reported at once with what to check, and
        the operation that needed Redis decides whether to run again.
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            db=self.db,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
        except redis.RedisError as error:
            client.close()
            raise self._explain(error) from None
        return client

    def ping(self) -> None:
        self.client().close()

    def _explain(self, error: redis.RedisError) -> OpsPlatformError:
        import redis

        detail = _scrub(str(error), self.password)

        def unreachable(reason: str, setting: str = ADDRESS_SETTING) -> ServerUnreachableError:
            return ServerUnreachableError(self.system, self.address, setting, reason)

        if isinstance(error, redis.AuthenticationError):
            reason = (
                "the server requires a password and none was given"
                if self.password is None
                else "the password was refused"
            )
            return DatastoreAccessError(
                self.system, self.address, _password_setting(self.password_env), reason
            )
        if isinstance(error, redis.TimeoutError):
            return unreachable(f"no answer within {self.socket_timeout:g} s")
        if isinstance(error, redis.ResponseError) and "DB index" in detail:
            return DatastoreAccessError(
                self.system, self.address, "connection.db in the platform spec",
                f"database index {self.db} does not exist",
            )
        if isinstance(error, redis.ConnectionError):
            if "Connection refused" in detail:
                return unreachable("connection refused")
            if "Name or service not known" in detail or "nodename nor servname" in detail:
                return unreachable(f"cannot resolve host '{self.host}'", HOST_SETTING)
            if "closed by server" in detail:
                return unreachable("the server closed the connection (is it Redis?)")
        if isinstance(error, redis.exceptions.InvalidResponse):
            return unreachable(f"the server there does not speak Redis ({detail})")
        return unreachable(detail)


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database of the platform (see ``datastores`` in the platform spec)."""

    name: str = Field(description="Datastore name from the platform spec, used in messages.")
    host: str = Field(description="Server host name or IP address.")
    port: int = Field(default=5432, description="Server TCP port.")
    database: str = Field(description="Database to connect to.")
    user: str = Field(description="Role to log in as.")
    password: str = Field(description="Password of the role; set it with dg.EnvVar.")
    password_env: str = Field(
        default="",
        description="Name of the environment variable that holds the password, for messages.",
    )
    sslmode: str = Field(
        default="prefer", description="libpq sslmode: disable, prefer, require, verify-full..."
    )
    connect_timeout: int = Field(
        default=5, description="Seconds to wait for the server to answer (libpq minimum 2)."
    )

    def endpoint(self) -> PostgresEndpoint:
        return PostgresEndpoint(
            name=self.name,
            host=self.host,
            port=self.port,
            database=self.database,
            user=self.user,
            password=self.password,
            password_env=self.password_env,
            sslmode=self.sslmode,
            connect_timeout=self.connect_timeout,
        )

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        return self.endpoint().connect(autocommit=autocommit)

    def server_version(self) -> str:
        return self.endpoint().server_version()

    def ping(self) -> None:
        self.endpoint().ping()


class RedisResource(dg.ConfigurableResource):
    """A Redis server of the platform (see ``datastores`` in the platform spec)."""

    name: str = Field(description="Datastore name from the platform spec, used in messages.")
    host: str = Field(description="Server host name or IP address.")
    port: int = Field(default=6379, description="Server TCP port.")
    password: str | None = Field(
        default=None, description="Password (requirepass); set it with dg.EnvVar. None: no AUTH."
    )
    password_env: str = Field(
        default="",
        description="Name of the environment variable that holds the password, for messages.",
    )
    db: int = Field(default=0, description="Database index.")
    socket_timeout: float = Field(
        default=5.0, description="Seconds to wait to connect and for each reply."
    )

    def endpoint(self) -> RedisEndpoint:
        return RedisEndpoint(
            name=self.name,
            host=self.host,
            port=self.port,
            password=self.password,
            password_env=self.password_env,
            db=self.db,
            socket_timeout=self.socket_timeout,
        )

    def client(self) -> redis.Redis:
        return self.endpoint().client()

    def ping(self) -> None:
        self.endpoint().ping()


__all__ = [
    "DatastoreAccessError",
    "PostgresEndpoint",
    "PostgresResource",
    "RedisEndpoint",
    "RedisResource",
]
