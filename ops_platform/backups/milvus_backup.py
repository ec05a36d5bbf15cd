"""Milvus: backups through the milvus-backup REST server (``/api/v1``).

milvus-backup copies the collections' binlogs into its own backup bucket; the
catalog stores ``backup.json``, the backup info milvus-backup reports, as the
checksummed record.

Backup: ``POST /api/v1/create`` (``backup_name``, ``collection_names``,
``async: true``), poll ``GET /api/v1/get_backup?backup_name=`` until
``state_code`` is BACKUP_SUCCESS (2); BACKUP_FAIL (3) and BACKUP_TIMEOUT (4)
fail the backup and the partial backup is deleted. Counts: rows per
collection, the sum of ``num_of_rows`` of the backed-up segments. A server
configured with ``http.simpleResponse: true`` strips the segments from its
answers: the backup is then recorded without counts (``details.counts``
says why); set it to false for verified restore tests.

Expire (retention drops the backup): ``DELETE /api/v1/delete?backup_name=``,
which removes the backup's directory from milvus-backup's bucket; code 404
(Request_Object_Not_Found) means it is already gone.

Restore test: through the milvus-backup server of a scratch Milvus
(``restore_test.target.url``, reading the same backup bucket), ``POST
/api/v1/restore`` with ``collection_renames`` (``<rename_prefix><collection>``)
and ``async: true``, poll ``GET /api/v1/get_restore?id=`` until SUCCESS (2).
milvus-backup restores into the Milvus it is configured for, so a target
that is the source's milvus-backup (by resolved address) is refused unless
the spec opts in with ``restore_test.into_source: true``; a ``rename_prefix``
is required either way and no renamed collection may be one of the
backed-up names. milvus-backup cannot count rows or drop collections: that
is done through the target Milvus itself (``milvus.restore_server_url``) by a
:class:`MilvusCollections` (by default :class:`MilvusRestCollections`,
Milvus' RESTful API v2, so no pymilvus is needed); one that is the source
Milvus is refused for a scratch restore, and only collections this restore
created under the prefix are dropped.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import requests

from ops_platform.backups.base import (
    Artifact,
    BackupError,
    BackupJob,
    BackupOutcome,
    QueryResult,
    RestoreError,
    RestoreRefused,
    Verification,
)
from ops_platform.backups.restore_target import same_endpoint, target_is_source
from ops_platform.errors import OpsPlatformError, ServerUnreachableError
from ops_platform.spec import Connection, Datastore, RestoreTest

if TYPE_CHECKING:
    from ops_platform.resources.object_store import ObjectStore

BACKUP_ARTIFACT = "backup.json"
DEFAULT_DB = "default"
BACKUP_SUCCESS, BACKUP_FAIL, BACKUP_TIMEOUT = 2, 3, 4
CODE_FAIL, CODE_NOT_FOUND = 3, 404  # milvus-backup's ResponseCode Fail and Request_Object_Not_Found
RESTORE_SUCCESS, RESTORE_FAIL, RESTORE_TIMEOUT = 2, 3, 4
STATE_NAMES = {0: "INITIAL", 1: "EXECUTING", 2: "SUCCESS", 3: "FAIL", 4: "TIMEOUT"}
COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class MilvusError(OpsPlatformError):
    """milvus-backup or Milvus answered with an error code; ``reason`` is the server's own ``msg``.

    ``http_status`` is set when the HTTP answer itself failed (then ``code`` is that status too).
    """

    def __init__(self, message: str, code: int | None = None, reason: str | None = None,
                 http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.http_status = http_status


def _send(
    session: requests.Session, system: str, base_url: str, setting: str, method: str, path: str,
    timeout: float, **kwargs: Any,
) -> dict[str, Any]:
    try:
        response = session.request(method, f"{base_url}{path}", timeout=timeout, **kwargs)
    except requests.ConnectionError as error:
        reason = "connection refused" if "refused" in str(error).lower() else "no connection"
        raise ServerUnreachableError(system, base_url, setting, reason) from None
    except requests.Timeout:
        raise ServerUnreachableError(system, base_url, setting, f"no answer within {timeout:g} s") from None
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise MilvusError(
            f"{system}: {method} {path} at {base_url} answered {response.status_code} with a body that is "
            f"not a JSON object: {response.text[:200]!r}"
        )
    if response.status_code >= 400:
        raise MilvusError(
            f"{system}: {method} {path} at {base_url} failed ({response.status_code}): "
            f"{document.get('error') or document.get('msg') or document.get('message')}",
            response.status_code,
            http_status=response.status_code,
        )
    return document


class MilvusBackupClient:
    """The milvus-backup REST server. A response's ``code`` is 0 (and then absent) on success."""

    def __init__(self, url: str, *, setting: str, timeout: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.setting = setting
        self.timeout = timeout
        self.session = session or requests.Session()

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        document = _send(self.session, "milvus-backup", self.url, self.setting, method, f"/api/v1{path}",
                         self.timeout, **kwargs)
        code = document.get("code", 0)
        if code:
            raise MilvusError(f"milvus-backup: {method} /api/v1{path} at {self.url} failed "
                              f"(code {code}): {document.get('msg')}", code, document.get("msg"))
        return document.get("data") or {}

    def create(self, name: str, collections: list[str]) -> dict[str, Any]:
        return self.call("POST", "/create", json={"backup_name": name, "collection_names": collections,
                                                 "async": True})

    def get_backup(self, name: str) -> dict[str, Any]:
        return self.call("GET", "/get_backup", params={"backup_name": name})

    def delete(self, name: str) -> None:
        self.call("DELETE", "/delete", params={"backup_name": name})

    def restore(self, name: str, collections: list[str], renames: dict[str, str]) -> dict[str, Any]:
        return self.call("POST", "/restore", json={"backup_name": name, "collection_names": collections,
                                                  "collection_renames": renames, "async": True})

    def get_restore(self, restore_id: str) -> dict[str, Any]:
        return self.call("GET", "/get_restore", params={"id": restore_id})


class MilvusCollections(Protocol):
    """What the restore test needs from Milvus itself, which milvus-backup cannot do.

    With pymilvus, production could pass an adapter over
    ``MilvusClient.has_collection`` / ``get_collection_stats(...)["row_count"]`` /
    ``drop_collection``; :class:`MilvusRestCollections` does the same over HTTP.
    """

    def has_collection(self, db: str, name: str) -> bool: ...

    def row_count(self, db: str, name: str) -> int: ...

    def drop_collection(self, db: str, name: str) -> None: ...


class MilvusRestCollections:
    """Milvus' RESTful API v2 on the proxy (``/v2/vectordb/collections/...``), token ``user:password``."""

    def __init__(self, url: str, *, token: str | None = None, setting: str = "MILVUS_URL",
                 timeout: float = 30.0, session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.setting = setting
        self.timeout = timeout
        self.session = session or requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _post(self, action: str, db: str, name: str) -> dict[str, Any]:
        path = f"/v2/vectordb/collections/{action}"
        document = _send(self.session, "milvus", self.url, self.setting, "POST", path, self.timeout,
                         json={"dbName": db, "collectionName": name})
        if document.get("code", 0) != 0:
            raise MilvusError(f"milvus: {action} of collection {db}.{name} at {self.url} failed "
                              f"(code {document.get('code')}): {document.get('message')}", document.get("code"))
        return document.get("data") or {}

    def has_collection(self, db: str, name: str) -> bool:
        return bool(self._post("has", db, name).get("has"))

    def row_count(self, db: str, name: str) -> int:
        return int(self._post("get_stats", db, name)["rowCount"])

    def drop_collection(self, db: str, name: str) -> None:
        self._post("drop", db, name)


@dataclass
class RestoredCollections:
    """Backed-up collections restored as ``<rename_prefix><name>`` in the same databases."""

    milvus: MilvusCollections
    renames: dict[tuple[str, str], str]  # (db, source name) -> restored name
    description: str
    owned: list[tuple[str, str]] = field(default_factory=list)  # (db, restored name) to drop on exit

    def counts(self) -> dict[str, int]:
        return {f"rows:{db}.{name}": self.milvus.row_count(db, restored)
                for (db, name), restored in self.renames.items()}

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        """``verify_keys`` are collection names (``name`` or ``db.name``) that must have been restored."""
        results = []
        for query in queries:
            db, _, name = query.rpartition(".")
            restored = self.renames.get((db or DEFAULT_DB, name))
            if restored is None:
                results.append(QueryResult(query, None, ok=False, error="not a collection of this backup"))
                continue
            try:
                results.append(QueryResult(query, self.milvus.row_count(db or DEFAULT_DB, restored), ok=True))
            except OpsPlatformError as error:
                results.append(QueryResult(query, None, ok=False, error=str(error)))
        return results


class MilvusBackupDriver:
    """Backs up a datastore with ``engine: milvus``, ``method: milvus_backup``.

    ``connection.url`` is the milvus-backup server; ``milvus`` reaches Milvus
    itself for row counts and drops during restore tests. ``expire_timeout``
    bounds a deletion, which milvus-backup answers once the files are removed.
    """

    engine = "milvus"
    method = "milvus_backup"

    def __init__(
        self,
        milvus: MilvusCollections,
        *,
        backup_timeout: float = 3600.0,
        restore_timeout: float = 3600.0,
        poll_interval: float = 5.0,
        request_timeout: float = 30.0,
        expire_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.milvus = milvus
        self.expire_timeout = expire_timeout
        self.backup_timeout = backup_timeout
        self.restore_timeout = restore_timeout
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.clock = clock
        self.sleep = sleep

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        if datastore.connection.url is None:
            raise BackupError(f"datastore '{datastore.name}' needs connection.url (the milvus-backup server)")
        client = MilvusBackupClient(datastore.connection.url, timeout=self.request_timeout,
                                    setting=f"connection.url of datastore '{datastore.name}'")
        collections = list(datastore.milvus.collections) if datastore.milvus else []
        name = backup_name(job.backup_id)
        try:
            client.create(name, collections)
            info = self._wait(
                lambda: client.get_backup(name), BACKUP_SUCCESS, (BACKUP_FAIL, BACKUP_TIMEOUT),
                self.backup_timeout,
                what=f"milvus-backup: backup {name} at {client.url}", error=BackupError,
            )
            counts, counts_note = _row_counts(info)
            stored = job.store.put_bytes(job.artifact_key(BACKUP_ARTIFACT),
                                         json.dumps(info, indent=2, sort_keys=True).encode(),
                                         content_type="application/json")
        except BaseException as error:
            # A backup whose record the catalog discards must not stay behind in milvus-backup's bucket.
            _quietly(client.delete, name)
            if isinstance(error, MilvusError):
                hint = f" (check milvus.collections of datastore '{datastore.name}')" if error.code == 400 else ""
                raise BackupError(f"{error}{hint}") from None
            raise
        backed_up = [{"db": c.get("db_name") or DEFAULT_DB, "name": c["collection_name"]}
                     for c in info.get("collection_backups") or []]
        return BackupOutcome(
            artifacts=(Artifact.from_stored(BACKUP_ARTIFACT, stored),),
            source_version=f"milvus {info.get('milvus_version', 'unknown')}",
            recovery_point=_backup_time(info, job.now),
            restore={"format": "milvus-backup", "backup_name": name, "backup_id": info.get("id"),
                     "collections": backed_up, "url": datastore.connection.url,
                     "server_url": datastore.milvus.server_url if datastore.milvus else None},
            counts=counts,
            details={"backup": name, "collections": len(backed_up), "size_bytes": info.get("size"),
                     **({"counts": counts_note} if counts_note else {})},
        )

    def verify(self, manifest: Any, store: ObjectStore) -> Verification:
        """The backup is still listed by milvus-backup, in state BACKUP_SUCCESS."""
        restore = manifest.restore
        client = MilvusBackupClient(restore["url"], timeout=self.request_timeout,
                                    setting=f"connection.url of datastore '{manifest.datastore}'")
        checked = {"backup": restore["backup_name"]}
        try:
            info = client.get_backup(restore["backup_name"])
        except OpsPlatformError as error:
            return Verification(False, (str(error),), checked)
        state = info.get("state_code", 0)
        if state != BACKUP_SUCCESS:
            return Verification(False, (f"milvus-backup backup {restore['backup_name']} is in state "
                                        f"{STATE_NAMES.get(state, state)}, not SUCCESS",), checked)
        return Verification(True, (), {**checked, "state": "SUCCESS"})

    def expire(self, manifest: Any, store: ObjectStore) -> str:
        """Delete the backup from milvus-backup's bucket; one already gone counts as expired."""
        restore = manifest.restore
        name = restore["backup_name"]
        client = MilvusBackupClient(restore["url"], timeout=self.expire_timeout,
                                    setting=f"connection.url of datastore '{manifest.datastore}'")
        try:
            client.delete(name)
        except MilvusError as error:
            if error.http_status is None and error.code == CODE_NOT_FOUND:
                return f"milvus-backup: backup {name} at {client.url} was already gone; nothing to delete"
            if error.http_status is None and error.code == CODE_FAIL:
                # milvus-backup answers a failed removal with the msg of its preceding lookup, often "success".
                said = "" if error.reason in (None, "", "success") else f": {error.reason}"
                raise BackupError(
                    f"milvus-backup: could not delete backup {name} at {client.url} (code {CODE_FAIL}{said}); "
                    "its files may be partly left in the backup bucket: check the milvus-backup server's log "
                    "and its access to that bucket (minio settings in backup.yaml)"
                ) from None
            raise BackupError(f"milvus-backup: could not delete backup {name}: "
                              f"{str(error).removeprefix('milvus-backup: ')}") from None
        except OpsPlatformError as error:
            raise BackupError(f"milvus-backup: could not delete backup {name}: {error}") from None
        return f"milvus-backup: deleted backup {name} at {client.url}"

    @contextmanager
    def restore(
        self, manifest: Any, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> Iterator[RestoredCollections]:
        restore = manifest.restore
        prefix = restore_test.rename_prefix or ""
        sources = [(c["db"], c["name"]) for c in restore["collections"]]
        renames = restored_names(sources, prefix)
        url = restore_test.target.url or restore["url"]
        self._refuse_source(restore, restore_test.model_copy(
            update={"target": restore_test.target.model_copy(update={"url": url})}))
        client = MilvusBackupClient(url, timeout=self.request_timeout, setting="restore_test.target.url")
        restored = RestoredCollections(
            self.milvus, renames,
            f"milvus collections {', '.join(sorted(set(renames.values())))} via milvus-backup {client.url}",
        )
        try:
            self._drop_leftovers(renames)
            restored.owned = [(db, target) for (db, _), target in renames.items()]
            answer = client.restore(
                restore["backup_name"],
                [name for _, name in sources],
                {_qualified(db, name): _qualified(db, target) for (db, name), target in renames.items()},
            )
            self._wait(
                lambda: client.get_restore(answer["id"]), RESTORE_SUCCESS, (RESTORE_FAIL, RESTORE_TIMEOUT),
                self.restore_timeout,
                what=f"milvus-backup: restore of {restore['backup_name']} at {client.url}", error=RestoreError,
            )
            yield restored
        except ServerUnreachableError as error:
            raise RestoreError(f"restore target unreachable: {error}") from None
        except MilvusError as error:
            raise RestoreError(f"restore of {restore['backup_name']} failed: {error}") from None
        finally:
            self._cleanup(restored, prefix)

    def _refuse_source(self, restore: dict[str, Any], restore_test: RestoreTest) -> None:
        """A target that is the source's milvus-backup needs the opt-in; a scratch one, a Milvus not the source's."""
        reason = target_is_source(Connection(url=restore["url"]), restore_test, separation="into_source")
        if reason:
            raise RestoreRefused(f"milvus restore refused before writing anything: {reason}")
        counted_in = getattr(self.milvus, "url", None)
        if (not restore_test.into_source and counted_in and restore.get("server_url")
                and same_endpoint(counted_in, restore["server_url"])):
            raise RestoreRefused(
                f"milvus restore refused before writing anything: the restored collections would be counted and "
                f"dropped in {counted_in}, the source Milvus; set milvus.restore_server_url to the scratch Milvus "
                "that restore_test.target.url's milvus-backup writes to"
            )

    def preflight(self, datastore: Datastore) -> list[str]:
        """Live checks of a restore test before it starts (see :mod:`ops_platform.backups.preflight`).

        The target's milvus-backup and Milvus answer; the Milvus counted in is
        not the source (by resolved address) unless ``into_source``; restoring
        into the source, no collection under the prefix exists there already
        (it would be dropped, and in a live cluster it may not be ours).
        """
        restore_test, options = datastore.restore_test, datastore.milvus
        assert restore_test is not None and options is not None and datastore.connection.url is not None
        url = restore_test.target.url or datastore.connection.url
        try:
            MilvusBackupClient(url, timeout=self.request_timeout, setting="restore_test.target.url").call(
                "GET", "/list")
        except OpsPlatformError as error:
            return [f"restore_test.target.url: {error}"]
        counted_in = getattr(self.milvus, "url", None)
        if not restore_test.into_source and counted_in and same_endpoint(counted_in, options.server_url):
            return [f"milvus.restore_server_url: {counted_in} is the source Milvus ({options.server_url}); name the "
                    "scratch Milvus that restore_test.target.url's milvus-backup writes to"]
        prefix = restore_test.rename_prefix or ""
        try:
            leftovers = [f"{DEFAULT_DB}.{prefix}{name}" for name in options.collections
                         if self.milvus.has_collection(DEFAULT_DB, f"{prefix}{name}")]
        except OpsPlatformError as error:
            return [f"milvus.{'server_url' if restore_test.into_source else 'restore_server_url'}: {error}"]
        if restore_test.into_source and leftovers:
            return [f"restore_test.rename_prefix: {', '.join(leftovers)} already exist in the source Milvus; the "
                    "restore test would drop them: drop them by hand if an interrupted restore test left them, or "
                    "choose another prefix"]
        return []

    def _wait(
        self, read: Callable[[], dict[str, Any]], success: int, failures: tuple[int, ...], timeout: float, *,
        what: str, error: type[OpsPlatformError],
    ) -> dict[str, Any]:
        deadline = self.clock() + timeout
        while True:
            info = read()
            state = info.get("state_code", 0)
            if state == success:
                return info
            if state in failures:
                raise error(f"{what} ended {STATE_NAMES.get(state, state)}: {_failure_message(info)}")
            if self.clock() >= deadline:
                raise error(f"{what} did not finish within {timeout:g} s (last state "
                            f"{STATE_NAMES.get(state, state)}, progress {info.get('progress', 0)} %)")
            self.sleep(self.poll_interval)

    def _drop_leftovers(self, renames: dict[tuple[str, str], str]) -> None:
        """Collections of an earlier, interrupted restore test would make milvus-backup refuse this one."""
        for (db, _), target in renames.items():
            if self.milvus.has_collection(db, target):
                self.milvus.drop_collection(db, target)

    def _cleanup(self, restored: RestoredCollections, prefix: str) -> None:
        problems = []
        for db, name in restored.owned:
            if not prefix or not name.startswith(prefix):
                continue  # never drop a collection outside the restore-test prefix
            try:
                if self.milvus.has_collection(db, name):
                    self.milvus.drop_collection(db, name)
            except OpsPlatformError as error:
                problems.append(str(error))
        if problems:
            raise RestoreError(f"cleanup of the restore test left collections behind: {'; '.join(problems)}")


def backup_name(backup_id: str) -> str:
    """milvus-backup names hold letters, digits and underscores: ``ops_20261122T020000Z_3f9a1c``."""
    return "ops_" + re.sub(r"[^A-Za-z0-9_]", "_", backup_id)


def restored_names(sources: list[tuple[str, str]], prefix: str) -> dict[tuple[str, str], str]:
    """``<prefix><name>`` for each collection; refuses anything that could land on a backed-up collection."""
    if not prefix:
        raise RestoreRefused(
            "restore_test.rename_prefix is required for milvus: milvus-backup restores into the Milvus it is "
            "configured for, which may be the live one, so restored collections must get new names"
        )
    renames = {(db, name): f"{prefix}{name}" for db, name in sources}
    for (db, name), target in renames.items():
        if not COLLECTION_NAME.match(target):
            raise RestoreRefused(
                f"restored collection name {target!r} is not a Milvus collection name (letters, digits, "
                "underscores, not starting with a digit): check restore_test.rename_prefix"
            )
        if (db, target) in renames:
            raise RestoreRefused(
                f"restoring {db}.{name} as {target} refused before writing anything: {target} is itself a "
                "backed-up collection (choose another restore_test.rename_prefix)"
            )
    return renames


def _qualified(db: str, name: str) -> str:
    return name if db == DEFAULT_DB else f"{db}.{name}"


def _row_counts(info: dict[str, Any]) -> tuple[dict[str, int], str | None]:
    counts: dict[str, int] = {}
    for collection in info.get("collection_backups") or []:
        partitions = collection.get("partition_backups")
        if partitions is None:
            return {}, ("milvus-backup answered without segments (http.simpleResponse: true): "
                        "no row counts recorded, set it to false")
        rows = sum(segment.get("num_of_rows", 0)
                   for partition in partitions for segment in partition.get("segment_backups") or [])
        counts[f"rows:{collection.get('db_name') or DEFAULT_DB}.{collection['collection_name']}"] = rows
    return counts, None


def _backup_time(info: dict[str, Any], now: Callable[[], datetime]) -> datetime:
    """The backup's hybrid timestamp (TSO) carries physical milliseconds above its 18 logical bits."""
    tso = info.get("backup_timestamp")
    if isinstance(tso, int) and tso > 0:
        return datetime.fromtimestamp((tso >> 18) / 1000, tz=UTC)
    started = info.get("start_time")
    if isinstance(started, int) and started > 0:
        return datetime.fromtimestamp(started / 1000, tz=UTC)
    return now().astimezone(UTC)


def _failure_message(info: dict[str, Any]) -> str:
    messages = [info.get("errorMessage")] if info.get("errorMessage") else []
    for task in (info.get("collection_backups") or []) + (info.get("collection_restore_tasks") or []):
        if task.get("errorMessage"):
            name = task.get("collection_name") or task.get("target_collection_name")
            messages.append(f"{name}: {task['errorMessage']}")
    return "; ".join(messages) or "no error message"


def _quietly(action: Callable[[str], None], name: str) -> None:
    try:
        action(name)
    except OpsPlatformError:
        pass  # the backup already failed; this error would hide why
