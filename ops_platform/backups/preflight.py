"""Preflight: does a datastore's spec give its driver what the driver needs, here and now?

Two depths, one registry keyed by (engine, method) like :mod:`drivers`:

- :func:`preflight_static` judges the settings alone: the restore target is
  not the source (:func:`~ops_platform.backups.restore_target.target_is_source`
  by host name), a driver that starts its own scratch server gets a loopback
  host, a port and a ``data_dir``, https etcd endpoints come with client TLS
  material, Elasticsearch and Milvus restore into a scratch cluster unless
  ``restore_test.into_source`` says otherwise, ... The spec runs it for every
  datastore at load (:class:`~ops_platform.spec.Datastore`), so a spec the
  drivers cannot run fails there, with the field named.
- :func:`preflight_live` asks the world at run start, before anything is
  written: the target is not the source by resolved address (and, for
  Elasticsearch, by cluster uuid), the scratch ``data_dir`` can be created by
  this process, the scratch ports are free and this machine's, the tools are
  installed, TLS files load, secrets are set; for a restore into the source
  cluster, that the cluster has room. :func:`run_restore_test` refuses on any
  problem; :func:`require_preflight` does the same for any caller.

Every problem starts with the field it is about (``restore_test.target.data_dir:
...``) and says what to do. Plain Python; no Dagster import.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from ops_platform.backups.base import BackupError, RestoreRefused
from ops_platform.backups.restore_target import (
    SCRATCH_MARK_FILE,
    VELERO_DATA_KINDS,
    datastore_target_is_source,
    is_loopback,
    same_endpoint,
    scratch_namespaces,
)
from ops_platform.errors import MissingSettingError, OpsPlatformError
from ops_platform.local_servers.process import port_is_open
from ops_platform.spec import Connection, Datastore

Operation = Literal["backup", "restore_test"]
StaticCheck = Callable[[Datastore], list[str]]
LiveCheck = Callable[[Datastore, Any, Operation], list[str]]
TARGET = "restore_test.target"
# A pod of a StatefulSet or a CloudNativePG cluster: `onto-pg-1.data.svc...`, `onto-pg-1.onto-pg.data.svc`.
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-[0-9]+$")


def preflight_static(datastore: Datastore) -> list[str]:
    """What is wrong with ``datastore``'s settings for its driver, judged from the spec alone."""
    problems = []
    reason = datastore_target_is_source(datastore, by_name=True)
    if reason:
        problems.append(f"{reason}; a restore must never write to its source (use a scratch host, port, "
                        "database, data_dir, cluster or namespace)")
    check = STATIC_CHECKS.get((datastore.engine, datastore.method))
    return problems + (check(datastore) if check else [])


def preflight_live(
    datastore: Datastore, driver: Any, services: Any = None, *, operation: Operation = "restore_test"
) -> list[str]:
    """What stops ``driver`` from running ``operation`` on ``datastore`` now, on this machine.

    ``services`` (:class:`~ops_platform.backups.drivers.DriverServices`), when
    given, is asked for the secrets the operation needs. Reads only: nothing
    is created or written (a probe directory is made and removed again).
    """
    problems = preflight_static(datastore)  # a copied model skips validation
    if operation == "restore_test":
        if datastore.restore_test is None:
            return problems + ["restore_test: not set; this datastore has no restore test"]
        # Again by resolved address: names the spec could not tell apart may still be one server.
        reason = None if datastore_target_is_source(datastore, by_name=True) else datastore_target_is_source(datastore)
        if reason:
            problems.append(f"{reason}; a restore must never write to its source")
    if services is not None:
        problems += _secret_problems(datastore, services, operation)
    check = LIVE_CHECKS.get((datastore.engine, datastore.method))
    if check:
        try:
            problems += check(datastore, driver, operation)
        except OpsPlatformError as error:
            problems.append(str(error))
    return problems


def require_preflight(
    datastore: Datastore, driver: Any, services: Any = None, *, operation: Operation = "restore_test"
) -> None:
    """:func:`preflight_live`, raising :class:`RestoreRefused` (restore test) or :class:`BackupError` (backup)."""
    problems = preflight_live(datastore, driver, services, operation=operation)
    if not problems:
        return
    what = "restore test" if operation == "restore_test" else "backup"
    error = RestoreRefused if operation == "restore_test" else BackupError
    raise error(f"{what} of '{datastore.name}' refused before writing anything: {'; '.join(problems)} "
                "(check the datastore in the platform spec)")


# -- static checks, one per driver ------------------------------------------------------------


def _missing(target: Connection, fields: tuple[str, ...], why: str) -> list[str]:
    return [f"{TARGET}.{name}: required: {why}" for name in fields if getattr(target, name) in (None, "")]


def _loopback_host(host: str | None, why: str) -> list[str]:
    if host is None or is_loopback(host):
        return []
    return [f"{TARGET}.host: {host} is not a loopback address, but {why}; use 127.0.0.1 (the scratch server "
            "stays off the network, out of reach of production and production out of its reach)"]


def _pg_dump_static(datastore: Datastore) -> list[str]:
    target = _target(datastore)
    problems = _missing(target, ("host", "database", "user"),
                        "a pg_dump restore test creates its scratch database on that server")
    if target.data_dir:
        problems += _loopback_host(target.host, "restore_test.target.data_dir asks the driver to start a scratch "
                                                "server on this machine when nothing listens there")
    return problems


def _pgbackrest_static(datastore: Datastore) -> list[str]:
    problems = []
    if datastore.restore_test is not None:
        target = datastore.restore_test.target
        why = "a pgBackRest restore test restores the whole cluster into a scratch postmaster it starts itself"
        problems += _missing(target, ("port",), why) + _loopback_host(target.host, why)
    options = datastore.pgbackrest
    if options is not None and options.pg_host:
        first_label = options.pg_host.split(".", 1)[0]
        if _POD_NAME.match(first_label) and ".svc" in options.pg_host:
            problems.append(
                f"pgbackrest.pg_host: {options.pg_host} names one pod; after a switchover it is a replica, or gone "
                "(point it at a Service that follows the primary, e.g. <cluster>-rw, or at a dedicated backup "
                "standby's Service)"
            )
    return problems


def _local_server_static(engine: str) -> StaticCheck:
    def check(datastore: Datastore) -> list[str]:
        target = _target(datastore)
        why = f"the {engine} restore test starts a scratch server of its own there"
        return _missing(target, ("host", "port", "data_dir"), why) + _loopback_host(target.host, why)

    return check


def _etcd_static(datastore: Datastore) -> list[str]:
    problems = _local_server_static("etcd")(datastore) if datastore.restore_test else []
    connection = datastore.connection
    secure = [endpoint for endpoint in connection.endpoints or [] if endpoint.lower().startswith("https://")]
    if secure:
        missing = [name for name in ("ca_file", "cert_file", "key_file") if not getattr(connection, name)]
        if missing:
            problems.append(
                f"connection.{missing[0]}: endpoint {secure[0]} is TLS and etcd authenticates clients by "
                f"certificate; set {', '.join(f'connection.{name}' for name in missing)} (PEM files of the "
                "cluster's etcd client certificate, its key and the etcd CA)"
            )
    elif connection.cert_file or connection.key_file:
        problems.append("connection.cert_file: set, but no endpoint is https; use https:// endpoints or drop it")
    if bool(connection.cert_file) != bool(connection.key_file):
        problems.append("connection.key_file: a client certificate needs both connection.cert_file and key_file")
    return problems


def _into_source_contradiction(datastore: Datastore, same: bool, what: str) -> list[str]:
    restore_test = datastore.restore_test
    if restore_test is not None and restore_test.into_source and not same:
        return [f"restore_test.into_source: true, but {TARGET}.url {restore_test.target.url} is not the source "
                f"{what} {datastore.connection.url}; drop into_source to restore into that scratch cluster"]
    return []


def _elasticsearch_static(datastore: Datastore) -> list[str]:
    from ops_platform.backups.elasticsearch_snapshot import INDEX_NAME

    restore_test, source_url = datastore.restore_test, datastore.connection.url
    assert restore_test is not None and source_url is not None
    problems = _missing(restore_test.target, ("url",), "the scratch cluster the snapshot is restored into")
    prefix = restore_test.rename_prefix
    if not prefix:
        problems.append(
            "restore_test.rename_prefix: required: restored indices are named apart, so a restore can never "
            "write to its source's indices and cleanup deletes only its own (e.g. 'restore-test-')"
        )
    elif not INDEX_NAME.match(f"{prefix}x"):
        problems.append(f"restore_test.rename_prefix: {prefix!r} cannot start an Elasticsearch index name "
                        "(use lowercase letters, digits and '-', e.g. 'restore-test-')")
    if restore_test.target.url:
        problems += _into_source_contradiction(
            datastore, same_endpoint(source_url, restore_test.target.url, by_name=True), "cluster")
    return problems


def _milvus_static(datastore: Datastore) -> list[str]:
    from ops_platform.backups.milvus_backup import COLLECTION_NAME

    restore_test, options = datastore.restore_test, datastore.milvus
    assert restore_test is not None and options is not None and datastore.connection.url is not None
    target = restore_test.target
    problems = _missing(target, ("url",), "the milvus-backup server of the scratch Milvus")
    prefix = restore_test.rename_prefix
    if not prefix:
        problems.append(
            "restore_test.rename_prefix: required: milvus-backup restores into the Milvus it is configured for, "
            "so restored collections are named apart and a restore can never write to its source's collections "
            "(e.g. 'restore_test_')"
        )
    elif not COLLECTION_NAME.match(f"{prefix}x"):
        problems.append(f"restore_test.rename_prefix: {prefix!r} cannot start a Milvus collection name "
                        "(letters, digits and underscores, not starting with a digit)")
    if not target.url:
        return problems
    same = same_endpoint(datastore.connection.url, target.url, by_name=True)
    problems += _into_source_contradiction(datastore, same, "milvus-backup server")
    if not same and not options.restore_server_url:
        problems.append(
            f"milvus.restore_server_url: required: {TARGET}.url is a scratch milvus-backup server, and the restore "
            "test counts and drops the restored collections in the Milvus that server writes to (its REST URL)"
        )
    elif not same and options.restore_server_url and same_endpoint(
            options.server_url, options.restore_server_url, by_name=True):
        problems.append(
            f"milvus.restore_server_url: {options.restore_server_url} is milvus.server_url, the source Milvus; "
            "name the scratch Milvus that restore_test.target.url's milvus-backup writes to"
        )
    return problems


def _neo4j_static(datastore: Datastore) -> list[str]:
    target = _target(datastore)
    problems = _missing(target, ("database",), "the scratch database the backup is restored as, in a throwaway "
                                               "server")
    if target.database == "system":
        problems.append(f"{TARGET}.database: 'system' is Neo4j's own database, not a scratch one")
    return problems


def _velero_static(datastore: Datastore) -> list[str]:
    restore_test, options = datastore.restore_test, datastore.velero
    assert restore_test is not None and options is not None
    problems = []
    if options.included_namespaces:
        try:
            scratch_namespaces(list(options.included_namespaces), datastore.connection.namespace or "",
                               restore_test.target.namespace, restore_test.rename_prefix)
        except RestoreRefused as refused:
            problems.append(f"{TARGET}.namespace: {refused}")
    elif not restore_test.target.namespace and not restore_test.rename_prefix:
        problems.append(f"{TARGET}.namespace: required: the scratch namespace(s) the backup is restored into")
    kinds = {kind for _, kind in VELERO_DATA_KINDS.values()}
    for index, query in enumerate(restore_test.verify_keys):
        parts = query.split()
        if len(parts) != 3 or "/" not in parts[2]:
            problems.append(f"restore_test.verify_keys[{index}]: {query!r} is not '<apiVersion> <Kind> "
                            "<namespace>/<name>'")
        elif parts[1] not in kinds or parts[1] == "PersistentVolume":
            problems.append(
                f"restore_test.verify_keys[{index}]: a Velero restore test restores data only (ConfigMap, Secret, "
                f"PersistentVolumeClaim), never a {parts[1]}; name one of those"
            )
    return problems


def _target(datastore: Datastore) -> Connection:
    return datastore.restore_test.target if datastore.restore_test else Connection()


def _with_restore_test(check: StaticCheck) -> StaticCheck:
    return lambda datastore: check(datastore) if datastore.restore_test is not None else []


STATIC_CHECKS: dict[tuple[str, str], StaticCheck] = {
    ("postgresql", "pg_dump"): _with_restore_test(_pg_dump_static),
    ("postgresql", "pgbackrest"): _pgbackrest_static,
    ("redis", "rdb"): _with_restore_test(_local_server_static("redis")),
    ("etcd", "snapshot"): _etcd_static,
    ("elasticsearch", "snapshot"): _with_restore_test(_elasticsearch_static),
    ("milvus", "milvus_backup"): _with_restore_test(_milvus_static),
    ("neo4j", "backup"): _with_restore_test(_neo4j_static),
    ("neo4j", "dump"): _with_restore_test(_neo4j_static),
    ("velero", "velero"): _with_restore_test(_velero_static),
}


# -- live checks -------------------------------------------------------------------------------


def data_dir_problems(path: str | Path, field: str = f"{TARGET}.data_dir") -> list[str]:
    """Whether this process can claim ``path`` as a scratch data directory (see ``scratch_data_dir``).

    An existing directory must be empty or a previous restore test's; a
    missing one must be creatable: a probe directory is made (and removed) in
    its nearest existing ancestor, which is what permissions, read-only
    file systems and quotas really allow.
    """
    path = Path(path).absolute()
    uid = os.geteuid()
    try:
        if path.exists() or path.is_symlink():
            if not path.is_dir() or path.is_symlink():
                return [f"{field}: {path} exists and is not a directory; pick another directory"]
            if any(path.iterdir()) and not (path / SCRATCH_MARK_FILE).exists():
                return [f"{field}: {path} is not empty and was not made by a restore test (no {SCRATCH_MARK_FILE}); "
                        "empty it or pick another directory"]
            probe_in = path
        else:
            probe_in = next(parent for parent in path.parents if parent.exists())
            if not probe_in.is_dir():
                return [f"{field}: {path} cannot be created: {probe_in} is not a directory"]
        os.rmdir(tempfile.mkdtemp(prefix=".ops-preflight-", dir=probe_in))
    except OSError as error:
        return [f"{field}: {path} cannot be created or written by uid {uid} ({error.strerror or error} in "
                f"{error.filename or path}); pick a directory this process may write, e.g. under "
                f"{tempfile.gettempdir()}, or give uid {uid} that one"]
    return []


def scratch_port_problems(host: str, ports: list[int], field: str = f"{TARGET}.port") -> list[str]:
    """The scratch server's ports are free, and ``host`` is an address of this machine it can listen on."""
    problems = []
    try:
        family = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as error:
        return [f"{TARGET}.host: {host} is not an address of this machine ({error.strerror or error}); the "
                "scratch server listens here: use 127.0.0.1"]
    peer = "; the port after it is its peer port" if len(ports) > 1 else ""
    for port in ports:
        if port_is_open(host, port):
            problems.append(f"{field}: something already listens on {host}:{port}; the scratch server needs it "
                            f"free (pick a free port{peer})")
    return problems


def tool_problems(tools: Mapping[str, Callable[[], object]]) -> list[str]:
    """Each tool's lookup (a driver's binary property, ``find_binary``) finds it here; a path it gives runs."""
    problems = []
    for name, lookup in tools.items():
        try:
            found = lookup()
        except (FileNotFoundError, OpsPlatformError) as error:
            problems.append(f"{name}: not found on this machine ({error}); the run's image needs it")
            continue
        if isinstance(found, (str, Path)) and not os.access(found, os.X_OK) and not Path(found).is_dir():
            problems.append(f"{name}: {found} is not an executable file on this machine; install it there or "
                            "give the driver the right path")
    return problems


def tls_problems(connection: Connection) -> list[str]:
    """The TLS client material of ``connection`` loads (files exist, are readable, key matches certificate)."""
    if not (connection.ca_file or connection.cert_file):
        return []
    from ops_platform.backups.etcd_snapshot import client_ssl_context

    try:
        client_ssl_context(connection)
    except (OpsPlatformError, ssl.SSLError, OSError) as error:
        return [str(error)]
    return []


def _secret_problems(datastore: Datastore, services: Any, operation: Operation) -> list[str]:
    getters = [services.password] + ([services.target_password] if operation == "restore_test" else [])
    problems = []
    for getter in getters:
        try:
            getter(datastore)
        except MissingSettingError as error:
            problems.append(f"{error.setting}: {error}")
    return problems


def _local_restore(
    datastore: Datastore, tools: Mapping[str, Callable[[], object]], ports: int = 1, *, data_dir_required: bool = True
) -> list[str]:
    target = _target(datastore)
    problems = tool_problems(tools)
    if target.data_dir:
        problems += data_dir_problems(target.data_dir)
    elif data_dir_required:
        problems.append(f"{TARGET}.data_dir: required for the scratch server's files")
    if target.port:
        problems += scratch_port_problems(target.host or "127.0.0.1", [target.port + i for i in range(ports)])
    return problems


def _redis_live(datastore: Datastore, driver: Any, operation: Operation) -> list[str]:
    if operation != "restore_test":
        return []
    from ops_platform.local_servers.process import find_binary

    return _local_restore(datastore, {"redis-server": lambda: find_binary("redis-server"),
                                      "redis-check-rdb": lambda: driver.redis_check_rdb})


def _etcd_live(datastore: Datastore, driver: Any, operation: Operation) -> list[str]:
    if operation == "backup":
        return tls_problems(datastore.connection)
    from ops_platform.local_servers.process import find_binary

    return _local_restore(datastore, {"etcd": lambda: find_binary("etcd"), "etcdctl": lambda: driver.etcdctl},
                          ports=2)


def _pgbackrest_live(datastore: Datastore, driver: Any, operation: Operation) -> list[str]:
    from ops_platform.local_servers.postgres import postgres_bin_dir

    tools = {"pgbackrest": lambda: driver.pgbackrest_bin}
    if operation == "backup":
        return tool_problems(tools)
    return _local_restore(datastore, {**tools, "postgres": postgres_bin_dir}, data_dir_required=False)


def _pg_dump_live(datastore: Datastore, driver: Any, operation: Operation) -> list[str]:
    if operation == "backup":
        return tool_problems({"pg_dump": lambda: driver.tool("pg_dump")})
    from ops_platform.local_servers.postgres import postgres_bin_dir

    target = _target(datastore)
    problems = tool_problems({"pg_restore": lambda: driver.tool("pg_restore")})
    host, port = target.host or "127.0.0.1", target.port or 5432
    if port_is_open(host, port):
        return problems  # a server of its own: the driver creates its scratch database there
    if not target.data_dir:
        return problems + [f"{TARGET}.host: nothing listens on {host}:{port} and no {TARGET}.data_dir is set for a "
                           "scratch server of the driver's own (start the target server, or set data_dir)"]
    return problems + tool_problems({"postgres": postgres_bin_dir}) + data_dir_problems(target.data_dir)


def _engine_live(datastore: Datastore, driver: Any, operation: Operation) -> list[str]:
    """Engines whose driver knows its own live checks (its clients): ``driver.preflight(datastore)``."""
    if operation != "restore_test" or not hasattr(driver, "preflight"):
        return []
    return list(driver.preflight(datastore))


LIVE_CHECKS: dict[tuple[str, str], LiveCheck] = {
    ("postgresql", "pg_dump"): _pg_dump_live,
    ("postgresql", "pgbackrest"): _pgbackrest_live,
    ("redis", "rdb"): _redis_live,
    ("etcd", "snapshot"): _etcd_live,
    ("elasticsearch", "snapshot"): _engine_live,
    ("milvus", "milvus_backup"): _engine_live,
    ("velero", "velero"): _engine_live,
}


__all__ = [
    "LIVE_CHECKS",
    "STATIC_CHECKS",
    "data_dir_problems",
    "preflight_live",
    "preflight_static",
    "require_preflight",
    "scratch_port_problems",
    "tls_problems",
    "tool_problems",
]
