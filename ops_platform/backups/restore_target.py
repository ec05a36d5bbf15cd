"""Where a restore may write: never into its source, only into scratch space it owns.

:func:`target_is_source` is THE rule, for every engine and at both depths: the
spec applies it at load by host name (``by_name``), the restore test and the
drivers again before writing by resolved address. It compares data
directories (the same, or one inside the other), host and port (and etcd
endpoints), URLs and namespaces. What may keep a target apart from its source
on one shared server is the engine's :data:`SEPARATION`: a scratch database
(pg_dump, Neo4j), or, for Elasticsearch and Milvus, the explicit opt-in
``restore_test.into_source: true`` with a ``rename_prefix``; nothing else.

The drivers that restore onto a server or a data directory of their own
(pg_dump, Redis, etcd, pgBackRest) record where a backup came from in its
manifest (``restore["source"]``, see :func:`source_of`) and compare that with
``restore_test.target`` before writing anything
(:func:`refuse_restore_into_source`), then claim their scratch data directory
(:func:`scratch_data_dir`), which they remove on exit. Velero maps namespaces
into scratch ones (:func:`scratch_namespaces`).
"""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ops_platform.backups.base import RestoreRefused
from ops_platform.spec import Connection, Datastore, RestoreTest

# A file in every scratch data directory we create: only such a directory is ever emptied.
SCRATCH_MARK_FILE = ".ops_platform-restore-test"

Separation = Literal["database", "into_source"]
# What may keep a restore apart from its source on one shared server, per (engine, method).
SEPARATION: dict[tuple[str, str], Separation] = {
    ("postgresql", "pg_dump"): "database",
    ("neo4j", "backup"): "database",
    ("neo4j", "dump"): "database",
    ("elasticsearch", "snapshot"): "into_source",
    ("milvus", "milvus_backup"): "into_source",
}
DEFAULT_PORTS: dict[str, int] = {"postgresql": 5432, "redis": 6379, "etcd": 2379}
_WILDCARD = {"0.0.0.0", "::"}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "::1", "127.0.0.1"}
PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# What a Velero restore test brings back: data, never workloads, jobs, ingresses, certificates or operator objects
# (they would start production-connected processes in the scratch namespaces). Restore resource -> (apiVersion, kind).
VELERO_DATA_KINDS: dict[str, tuple[str, str]] = {
    "persistentvolumeclaims": ("v1", "PersistentVolumeClaim"),
    "persistentvolumes": ("v1", "PersistentVolume"),
    "configmaps": ("v1", "ConfigMap"),
    "secrets": ("v1", "Secret"),
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def source_of(connection: Connection) -> dict[str, Any]:
    """What a restore must never write to, as recorded in a manifest's ``restore["source"]``."""
    source: dict[str, Any] = {}
    for name in ("host", "port", "database", "data_dir", "endpoints"):
        value = getattr(connection, name)
        if value is not None:
            source[name] = str(Path(value).resolve()) if name == "data_dir" else value
    return source


def resolved_addresses(host: str) -> set[str]:
    """Every IP address ``host`` resolves to; the name itself when it does not resolve here."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        return {host.lower()}


def host_key(host: str) -> str:
    """A host as a spec names it, without DNS: loopback names are one, and so are
    ``svc.ns``, ``svc.ns.svc`` and ``svc.ns.svc.cluster.local``."""
    name = host.lower().strip("[]").rstrip(".")
    if name in _LOOPBACK_NAMES:
        return "127.0.0.1"
    return name.removesuffix(".cluster.local").removesuffix(".svc")


def is_loopback(host: str | None) -> bool:
    return host is not None and (host_key(host) == "127.0.0.1" or host.startswith("127."))


def same_server(host_a: str, port_a: int, host_b: str, port_b: int, *, by_name: bool = False) -> bool:
    """Whether two host:port pairs reach the same listening socket (``localhost`` is ``127.0.0.1``).

    ``by_name``: compare the names as written (:func:`host_key`), without DNS.
    """
    if port_a != port_b:
        return False
    if by_name:
        names = {host_key(host_a), host_key(host_b)}
        return len(names) == 1 or bool(names & _WILDCARD)
    addresses_a = resolved_addresses(host_a)
    addresses_b = resolved_addresses(host_b)
    return bool(addresses_a & addresses_b) or bool((addresses_a | addresses_b) & _WILDCARD)


def same_endpoint(url_a: str, url_b: str, *, by_name: bool = False) -> bool:
    """Whether two URLs reach the same server (host names compared by resolved address, or ``by_name``)."""
    a, b = urlsplit(url_a), urlsplit(url_b)
    default = {"http": 80, "https": 443}
    port_a = a.port or default.get(a.scheme, 0)
    port_b = b.port or default.get(b.scheme, 0)
    return same_server(a.hostname or "", port_a, b.hostname or "", port_b, by_name=by_name)


def endpoint_address(endpoint: str, default_port: int) -> tuple[str, int]:
    """``http://10.0.0.5:2379`` -> ``("10.0.0.5", 2379)``."""
    parts = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
    return parts.hostname or "", parts.port or default_port


def target_is_source(
    source: Connection,
    restore_test: RestoreTest,
    *,
    separation: Separation | None = None,
    default_port: int | None = None,
    by_name: bool = False,
) -> str | None:
    """Why a restore into ``restore_test.target`` would write to ``source``, or None when it would not.

    The target is the source when it names the same data directory (or one
    inside the other), the same server (host and port, or a source's etcd
    endpoint), the same URL's server or the same namespace; on a shared
    server only ``separation`` keeps them apart (see :data:`SEPARATION`).
    Host names are compared by the addresses they resolve to, or with
    ``by_name`` as written (at spec load, where no DNS is asked).
    """
    target = restore_test.target
    if source.data_dir and target.data_dir:
        source_dir, target_dir = Path(source.data_dir).resolve(), Path(target.data_dir).resolve()
        if source_dir == target_dir:
            return f"restore_test.target.data_dir {target.data_dir} is the source's data directory {source.data_dir}"
        if target_dir.is_relative_to(source_dir) or source_dir.is_relative_to(target_dir):
            return (f"restore_test.target.data_dir {target.data_dir} overlaps the source's data directory "
                    f"{source.data_dir} (one lies inside the other)")
    how = "same host name" if by_name else "same resolved address"
    shared = None
    if target.host:
        target_port = target.port or default_port
        servers = [(source.host, source.port or default_port)] if source.host else []
        servers += [endpoint_address(endpoint, default_port or 0) for endpoint in source.endpoints or []]
        for host, port in servers:
            if port and target_port and same_server(host, port, target.host, target_port, by_name=by_name):
                shared = f"restore_test.target {target.host}:{target_port} is the source {host}:{port} ({how})"
                break
    if shared is None and source.url and target.url and same_endpoint(source.url, target.url, by_name=by_name):
        shared = f"restore_test.target.url {target.url} is the source {source.url} ({how})"
    if shared is None and not source.url and not source.host and source.namespace and (
            source.namespace == target.namespace):
        shared = f"restore_test.target.namespace {target.namespace} is the source's"
    if shared is None:
        return None
    if separation == "database":
        if target.database and target.database != source.database:
            return None
        return f"{shared} and restore_test.target.database {target.database} is the source's database"
    if separation == "into_source":
        if restore_test.into_source and restore_test.rename_prefix:
            return None
        return (f"{shared}: restore into a scratch cluster, or opt in with restore_test.into_source: true "
                "and a rename_prefix")
    return shared


def datastore_target_is_source(datastore: Datastore, *, by_name: bool = False) -> str | None:
    """:func:`target_is_source` for a datastore's own restore test, with its engine's separation and port."""
    if datastore.restore_test is None:
        return None
    return target_is_source(
        datastore.connection, datastore.restore_test,
        separation=SEPARATION.get((datastore.engine, datastore.method)),
        default_port=DEFAULT_PORTS.get(datastore.engine),
        by_name=by_name,
    )


def refuse_restore_into_source(
    datastore: str,
    source: Mapping[str, Any] | None,
    target: Connection,
    *,
    default_port: int,
    compare_database: bool,
) -> None:
    """Raise :class:`RestoreRefused` when ``target`` is the backup's source (the manifest's record of it).

    :func:`target_is_source` by resolved address; ``compare_database``: a
    scratch database on the source's own server is allowed (pg_dump). A
    manifest without its source is refused too: the restore could not tell.
    """
    if not source:
        raise RestoreRefused(
            f"restore of '{datastore}' refused: the manifest does not say where the backup came from "
            "(restore['source'] is missing), so writing to the target could overwrite the source"
        )
    recorded = Connection.model_validate({k: v for k, v in source.items() if k in Connection.model_fields})
    reason = target_is_source(recorded, RestoreTest(target=target),
                              separation="database" if compare_database else None, default_port=default_port)
    if reason:
        raise RestoreRefused(f"restore of '{datastore}' refused: {reason}; use a scratch target")


def scratch_namespaces(
    backed_up: list[str], velero_namespace: str, target: str | None, prefix: str | None
) -> dict[str, str]:
    """Where each backed-up namespace is restored (Velero); refuses any mapping that could touch a live namespace.

    One namespace goes to ``target``; several to ``<prefix><ns>`` or, without
    a prefix, ``<target>-<ns>``.
    """
    if not backed_up or "*" in backed_up:
        raise RestoreRefused(
            "the backup covers every namespace; a restore test maps named namespaces only "
            "(set velero.included_namespaces or the schedule template's includedNamespaces)"
        )
    if not target and not prefix:
        raise RestoreRefused("restore_test.target.namespace is required for a velero restore test")
    if prefix:
        mapping = {namespace: f"{prefix}{namespace}" for namespace in backed_up}
    elif len(backed_up) == 1:
        mapping = {backed_up[0]: str(target)}
    else:
        mapping = {namespace: f"{target}-{namespace}" for namespace in backed_up}
    live = set(backed_up) | {velero_namespace, *PROTECTED_NAMESPACES}
    for source, scratch in mapping.items():
        if scratch in live:
            raise RestoreRefused(
                f"restore of namespace {source} into {scratch} refused before writing anything: {scratch} is "
                "a backed-up, Velero or system namespace (check restore_test.target.namespace and rename_prefix)"
            )
        if not _DNS_LABEL.match(scratch):
            raise RestoreRefused(f"scratch namespace name {scratch!r} is not a valid namespace name (63 chars max)")
    return mapping


@contextmanager
def scratch_data_dir(path: Path | str, setting: str = "restore_test.target.data_dir") -> Iterator[Path]:
    """A fresh, empty directory at ``path`` for the restore, removed on exit.

    An existing directory is only reused when it is empty or was made by a
    previous restore (it holds :data:`SCRATCH_MARK_FILE`); anything else is
    refused before a byte is written. Mode 0711 lets service users (the
    ``postgres`` user) enter it.
    """
    path = Path(path).absolute()
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise RestoreRefused(f"{setting} {path} exists and is not a directory; refusing to use it")
        if any(path.iterdir()) and not (path / SCRATCH_MARK_FILE).exists():
            raise RestoreRefused(
                f"{setting} {path} is not empty and was not made by a restore test "
                f"(no {SCRATCH_MARK_FILE}); refusing to overwrite it: empty it or pick another directory"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o711)
    path.chmod(0o711)
    (path / SCRATCH_MARK_FILE).write_text("scratch space of an ops_platform restore test; removed when it ends\n")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "DEFAULT_PORTS",
    "PROTECTED_NAMESPACES",
    "SCRATCH_MARK_FILE",
    "SEPARATION",
    "VELERO_DATA_KINDS",
    "datastore_target_is_source",
    "endpoint_address",
    "host_key",
    "is_loopback",
    "refuse_restore_into_source",
    "resolved_addresses",
    "same_endpoint",
    "same_server",
    "scratch_data_dir",
    "scratch_namespaces",
    "source_of",
    "target_is_source",
]
