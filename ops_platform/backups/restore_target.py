"""Where a restore may write: never into its source, only into scratch space it owns.

Shared by the drivers that restore onto a server or a data directory of
their own (pg_dump, Redis, etcd). A backup records where it came from in its
manifest (``restore["source"]``, see :func:`source_of`); before writing
anything a restore compares that with ``restore_test.target`` by resolved
address, port, database and data directory (:func:`refuse_restore_into_source`),
then claims its scratch data directory (:func:`scratch_data_dir`), which it
removes on exit.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ops_platform.backups.base import RestoreRefused
from ops_platform.spec import Connection

# A file in every scratch data directory we create: only such a directory is ever emptied.
SCRATCH_MARK_FILE = ".ops_platform-restore-test"


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


def same_server(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    """Whether two host:port pairs reach the same listening socket (``localhost`` is ``127.0.0.1``)."""
    if port_a != port_b:
        return False
    addresses_a = resolved_addresses(host_a)
    addresses_b = resolved_addresses(host_b)
    wildcard = {"0.0.0.0", "::"}
    return bool(addresses_a & addresses_b) or bool((addresses_a | addresses_b) & wildcard)


def endpoint_address(endpoint: str, default_port: int) -> tuple[str, int]:
    """``http://10.0.0.5:2379`` -> ``("10.0.0.5", 2379)``."""
    parts = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
    return parts.hostname or "", parts.port or default_port


def refuse_restore_into_source(
    datastore: str,
    source: Mapping[str, Any] | None,
    target: Connection,
    *,
    default_port: int,
    compare_database: bool,
) -> None:
    """Raise :class:`RestoreRefused` when ``target`` is the backup's source.

    Same data directory (real path), or same resolved address and port (and,
    when ``compare_database``, the same database: a scratch database on the
    source's own server is allowed). A manifest without its source is refused
    too: the restore could not tell.
    """
    if not source:
        raise RestoreRefused(
            f"restore of '{datastore}' refused: the manifest does not say where the backup came from "
            "(restore['source'] is missing), so writing to the target could overwrite the source"
        )
    if source.get("data_dir") and target.data_dir:
        if Path(source["data_dir"]).resolve() == Path(target.data_dir).resolve():
            raise RestoreRefused(
                f"restore of '{datastore}' refused: restore_test.target.data_dir {target.data_dir} "
                f"is the source's data directory {source['data_dir']}"
            )
    if not target.host:
        return
    target_port = target.port or default_port
    addresses: list[tuple[str, int]] = []
    if source.get("host"):
        addresses.append((source["host"], int(source.get("port") or default_port)))
    addresses.extend(endpoint_address(endpoint, default_port) for endpoint in source.get("endpoints") or [])
    for host, port in addresses:
        if not same_server(host, port, target.host, target_port):
            continue
        if compare_database and source.get("database") != target.database:
            continue
        database = f"/{target.database}" if compare_database else ""
        raise RestoreRefused(
            f"restore of '{datastore}' refused: restore_test.target {target.host}:{target_port}{database} "
            f"is the source {host}:{port}{database} (same resolved address); use a scratch target"
        )


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
    "SCRATCH_MARK_FILE",
    "endpoint_address",
    "refuse_restore_into_source",
    "resolved_addresses",
    "same_server",
    "scratch_data_dir",
    "source_of",
]
