"""Elasticsearch: a snapshot into the cluster's registered repository (InfraSpec §7.1).

The snapshot's bytes live in the Elasticsearch repository (an S3 bucket the
cluster writes to), not in our object store. What the catalog stores is one
small artifact, ``snapshot.json`` (the snapshot info as Elasticsearch reports
it), so every backup still has a checksummed record and a manifest.

Backup: check the repository is registered and verified, count the documents
of each index, ``PUT _snapshot/<repo>/<name>?wait_for_completion=false``, poll
``GET _snapshot/<repo>/<name>`` until SUCCESS (FAILED or PARTIAL fail the
backup with the shard failures; a timeout aborts the snapshot).

Expire (retention drops the backup): ``DELETE _snapshot/<repo>/<name>``, which
Elasticsearch answers once the snapshot's files that no other snapshot shares
are gone from the repository; a snapshot already missing counts as expired.

Restore test: into a scratch cluster (``restore_test.target.url``), which
reads the snapshot from the same repository registered there read-only (the
driver registers it with the source's type and settings plus
``readonly: true`` when it is missing, and refuses one registered writable:
two clusters writing one repository corrupt it). ``POST
_snapshot/<repo>/<name>/_restore`` with ``rename_pattern``/``rename_replacement``
so every index comes back as ``<rename_prefix><index>``, with no replicas,
without aliases or global state, then ``_count`` each one; on exit only the
indices this restore created are deleted.

A target that is the source (same resolved address, or the same
``cluster_uuid`` the backup recorded) is refused before anything is written,
unless the spec opts in with ``restore_test.into_source: true``; then the
restore first proves the cluster has room: the data nodes' free disk below
the flood-stage watermark must hold ``disk_margin`` times the snapshot's size
(``_snapshot/<repo>/<name>/_status``), else it is refused. :meth:`preflight`
checks the same at run start, estimating the size from the source's indices.

Counts are taken just before the snapshot starts: an index written during the
snapshot may hold more documents in the snapshot than counted. Set
``counts_tolerance`` for indices that are written all the time (today's logs).
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
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

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

SNAPSHOT_ARTIFACT = "snapshot.json"
FINAL_STATES = ("SUCCESS", "FAILED", "PARTIAL", "INCOMPATIBLE")
FLOOD_STAGE = "cluster.routing.allocation.disk.watermark.flood_stage"
DEFAULT_FLOOD_STAGE = "95%"
# Repository settings a manifest records so a scratch cluster can register the repository: never credentials.
_SECRET_SETTING = re.compile(r"secret|password|access_key|session_token|credential", re.IGNORECASE)
_BYTE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4, "pb": 1024**5}
# Index names: lowercase, no \ / * ? " < > | space , #, not starting with - _ +.
INDEX_NAME = re.compile(r'^[^-_+A-Z\\/*?"<>| ,#:][^A-Z\\/*?"<>| ,#:]*$')


class ElasticsearchError(OpsPlatformError):
    """Elasticsearch answered with an error; carries its status and error type."""

    def __init__(self, message: str, status: int, error_type: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class ElasticsearchClient:
    """The few REST calls the snapshot driver needs, over ``requests`` with basic auth.

    ``setting`` names where the URL comes from, for error messages
    (``connection.url of datastore 'elasticsearch_logs'``); ``password_setting``
    names where the password comes from. The password itself never appears in
    a message.
    """

    def __init__(
        self,
        url: str,
        *,
        user: str | None,
        password: str | None,
        setting: str,
        password_setting: str | None = None,
        timeout: float = 30.0,
        verify: bool | str = True,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.user = user
        self.setting = setting
        self.password_setting = password_setting
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.verify = verify
        if user:
            self.session.auth = (user, password or "")

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        address = f"{self.url}{path}"
        try:
            response = self.session.request(
                method, address, json=body, params=params, timeout=timeout or self.timeout
            )
        except requests.ConnectionError as error:
            reason = "connection refused" if "refused" in str(error).lower() else "no connection"
            raise ServerUnreachableError("elasticsearch", self.url, self.setting, reason) from None
        except requests.Timeout:
            raise ServerUnreachableError(
                "elasticsearch", self.url, self.setting, f"no answer within {timeout or self.timeout:g} s"
            ) from None
        if response.status_code == 401:
            who = f"user '{self.user}'" if self.user else "no credentials"
            check = f"{self.password_setting} and the user" if self.password_setting else "the user and password"
            raise ElasticsearchError(
                f"elasticsearch: authentication failed at {self.url} with {who} (check {check})", 401,
                "security_exception",
            )
        if method == "HEAD":
            return response.status_code == 200
        try:
            document = response.json()
        except ValueError:
            document = None
        if response.status_code >= 400:
            error_type, reason = _error_of(document, response.text)
            raise ElasticsearchError(
                f"elasticsearch: {method} {path} at {self.url} failed ({response.status_code} {error_type}: {reason})",
                response.status_code,
                error_type,
            )
        if document is None:
            raise ElasticsearchError(
                f"elasticsearch: {method} {path} at {self.url} answered {response.status_code} "
                f"with a body that is not JSON: {response.text[:200]!r}",
                response.status_code,
                None,
            )
        return document

    def version(self) -> str:
        return str(self.request("GET", "/")["version"]["number"])

    def cluster_uuid(self) -> str | None:
        return self.request("GET", "/").get("cluster_uuid")

    def repository(self, name: str) -> dict[str, Any] | None:
        """The repository as registered (``{"type", "settings"}``), None when it is not."""
        try:
            return self.request("GET", f"/_snapshot/{quote(name, safe='')}").get(name)
        except ElasticsearchError as error:
            if error.status == 404:
                return None
            raise

    def primary_bytes(self, patterns: list[str]) -> int:
        """Primary store size of the open indices matching ``patterns`` (what a restore with no replicas takes)."""
        expression = quote(",".join(patterns), safe=",*")
        rows = self.request("GET", f"/_cat/indices/{expression}", params={
            "format": "json", "h": "index,pri.store.size", "bytes": "b", "expand_wildcards": "open"})
        return sum(int(row.get("pri.store.size") or 0) for row in rows)

    def open_indices(self, patterns: list[str]) -> list[str]:
        expression = quote(",".join(patterns), safe=",*")
        rows = self.request(
            "GET", f"/_cat/indices/{expression}",
            params={"format": "json", "h": "index,status", "expand_wildcards": "open"},
        )
        return sorted(row["index"] for row in rows if row.get("status", "open") == "open")

    def count(self, index: str) -> int:
        return int(self.request("GET", f"/{quote(index, safe='')}/_count")["count"])

    def index_exists(self, index: str) -> bool:
        return bool(self.request("HEAD", f"/{quote(index, safe='')}"))

    def delete_index(self, index: str) -> None:
        self.request("DELETE", f"/{quote(index, safe='')}")

    def snapshot(self, repository: str, name: str) -> dict[str, Any] | None:
        try:
            found = self.request("GET", f"/_snapshot/{quote(repository, safe='')}/{quote(name, safe='')}")
        except ElasticsearchError as error:
            if error.status == 404 and error.error_type == "snapshot_missing_exception":
                return None
            raise
        snapshots = found.get("snapshots") or []
        return snapshots[0] if snapshots else None

    def delete_snapshot(self, repository: str, name: str, *, timeout: float | None = None) -> None:
        self.request("DELETE", f"/_snapshot/{quote(repository, safe='')}/{quote(name, safe='')}", timeout=timeout)


def _error_of(document: Any, text: str) -> tuple[str, str]:
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        error = document["error"]
        return str(error.get("type", "error")), str(error.get("reason", ""))
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return "error", document["error"]
    return "error", text[:200]


@dataclass
class RestoredIndices:
    """Indices restored under ``<rename_prefix><index>`` in the target cluster."""

    client: ElasticsearchClient
    renames: dict[str, str]  # source index -> restored index
    description: str
    owned: list[str] = field(default_factory=list)  # absent before this restore: ours to delete

    def counts(self) -> dict[str, int]:
        return {f"docs:{source}": self.client.count(restored) for source, restored in self.renames.items()}

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        """``verify_keys`` are index names (as in the source) that must have been restored."""
        results = []
        for index in queries:
            restored = self.renames.get(index, index)
            try:
                results.append(QueryResult(index, self.client.count(restored), ok=True))
            except ElasticsearchError as error:
                results.append(QueryResult(index, None, ok=False, error=str(error)))
        return results


class ElasticsearchSnapshotDriver:
    """Backs up a datastore with ``engine: elasticsearch``, ``method: snapshot``.

    ``password_for`` resolves a ``password_env`` name to the password (the
    Dagster shell passes ``os.environ.get``); the backup itself uses
    ``job.password``. ``clock`` and ``sleep`` drive the polling.
    ``expire_timeout`` bounds the wait for a snapshot deletion, which
    Elasticsearch answers only when the repository's files are removed.
    ``disk_margin``: how many times a snapshot's size a restore into the
    source cluster needs free below the flood-stage watermark.
    """

    engine = "elasticsearch"
    method = "snapshot"

    def __init__(
        self,
        *,
        password_for: Callable[[str], str | None] = lambda name: None,
        snapshot_timeout: float = 3600.0,
        restore_timeout: float = 3600.0,
        poll_interval: float = 5.0,
        request_timeout: float = 30.0,
        expire_timeout: float = 600.0,
        disk_margin: float = 2.0,
        verify_tls: bool | str = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.password_for = password_for
        self.snapshot_timeout = snapshot_timeout
        self.restore_timeout = restore_timeout
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.expire_timeout = expire_timeout
        self.disk_margin = disk_margin
        self.verify_tls = verify_tls
        self.clock = clock
        self.sleep = sleep

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        options = datastore.elasticsearch
        if options is None or datastore.connection.url is None:
            raise BackupError(f"datastore '{datastore.name}' needs connection.url and an 'elasticsearch' section")
        connection = datastore.connection
        client = self._client(
            connection.url, connection.user, job.password,
            f"connection.url of datastore '{datastore.name}'", connection.password_env,
        )
        repository = options.repository
        name = snapshot_name(job.backup_id)
        try:
            version = client.version()
            cluster_uuid = client.cluster_uuid()
            registered = self._check_repository(client, repository, datastore.name)
            indices = client.open_indices(options.indices)
            if not indices:
                raise BackupError(
                    f"elasticsearch: no open index at {client.url} matches {', '.join(options.indices)} "
                    f"(check elasticsearch.indices of datastore '{datastore.name}')"
                )
            counts = {f"docs:{index}": client.count(index) for index in indices}
            client.request(
                "PUT",
                f"/_snapshot/{quote(repository, safe='')}/{name}",
                params={"wait_for_completion": "false"},
                body={"indices": ",".join(indices), "include_global_state": False,
                      "ignore_unavailable": False, "partial": False},
            )
        except ElasticsearchError as error:
            raise BackupError(f"{error} (datastore '{datastore.name}')") from None
        try:
            info = self._wait_for_snapshot(client, repository, name)
            stored = job.store.put_bytes(
                job.artifact_key(SNAPSHOT_ARTIFACT),
                json.dumps({"repository": repository, "snapshot": info}, indent=2, sort_keys=True).encode(),
                content_type="application/json",
            )
        except BaseException as error:
            # A snapshot whose record the catalog discards must not stay behind in the repository.
            self._discard_snapshot(client, repository, name)
            if isinstance(error, ElasticsearchError):
                raise BackupError(f"{error} (datastore '{datastore.name}')") from None
            raise
        return BackupOutcome(
            artifacts=(Artifact.from_stored(SNAPSHOT_ARTIFACT, stored),),
            source_version=f"elasticsearch {version}",
            recovery_point=_snapshot_time(info),
            restore={
                "format": "elasticsearch-snapshot",
                "repository": repository,
                "snapshot": name,
                "uuid": info.get("uuid"),
                "indices": indices,
                "es_version": info.get("version", version),
                "url": connection.url,
                "user": connection.user,
                "password_env": connection.password_env,
                "cluster_uuid": cluster_uuid,
                # how a scratch cluster registers the same repository, read-only
                "repository_type": registered.get("type"),
                "repository_settings": {k: v for k, v in (registered.get("settings") or {}).items()
                                        if not _SECRET_SETTING.search(k)},
            },
            counts=counts,
            details={
                "repository": repository,
                "snapshot": name,
                "indices": len(indices),
                "shards": info.get("shards", {}),
                "duration_ms": info.get("duration_in_millis"),
            },
        )

    def verify(self, manifest: Any, store: ObjectStore) -> Verification:
        """The snapshot is still in the repository, in state SUCCESS, with the uuid we recorded."""
        restore = manifest.restore
        client = self._client(
            restore["url"], restore.get("user"), self._password(restore.get("password_env")),
            f"connection.url of datastore '{manifest.datastore}'", restore.get("password_env"),
        )
        checked = {"repository": restore["repository"], "snapshot": restore["snapshot"]}
        try:
            info = client.snapshot(restore["repository"], restore["snapshot"])
        except OpsPlatformError as error:
            return Verification(False, (str(error),), checked)
        if info is None:
            return Verification(
                False, (f"snapshot {restore['snapshot']} is no longer in repository {restore['repository']}",), checked
            )
        problems = []
        if info.get("state") != "SUCCESS":
            problems.append(f"snapshot {restore['snapshot']} is in state {info.get('state')}, not SUCCESS")
        if restore.get("uuid") and info.get("uuid") != restore["uuid"]:
            problems.append(
                f"snapshot {restore['snapshot']} has uuid {info.get('uuid')}, the backup recorded {restore['uuid']}"
            )
        return Verification(not problems, tuple(problems), {**checked, "state": info.get("state")})

    def expire(self, manifest: Any, store: ObjectStore) -> str:
        """Delete the backup's snapshot from the repository; one already gone counts as expired."""
        restore = manifest.restore
        repository, name = restore["repository"], restore["snapshot"]
        client = self._client(
            restore["url"], restore.get("user"), self._password(restore.get("password_env")),
            f"connection.url of datastore '{manifest.datastore}'", restore.get("password_env"),
        )
        snapshot = f"snapshot {name} in repository {repository} at {client.url}"
        try:
            client.delete_snapshot(repository, name, timeout=self.expire_timeout)
        except ElasticsearchError as error:
            if error.status == 404 and error.error_type == "snapshot_missing_exception":
                return f"elasticsearch: {snapshot} was already gone; nothing to delete"
            raise BackupError(
                f"elasticsearch: could not delete snapshot {name} of backup {manifest.backup_id}: "
                f"{str(error).removeprefix('elasticsearch: ')}{_expire_hint(error, repository)}"
            ) from None
        except OpsPlatformError as error:
            raise BackupError(f"could not delete {snapshot}: {error}") from None
        return f"elasticsearch: deleted {snapshot}"

    @contextmanager
    def restore(
        self, manifest: Any, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> Iterator[RestoredIndices]:
        restore = manifest.restore
        target = restore_test.target
        target_url = target.url or restore["url"]
        prefix = restore_test.rename_prefix or ""
        renames = {index: f"{prefix}{index}" for index in restore["indices"]}
        in_source = self._refuse_overwrite(restore["url"], restore_test.model_copy(
            update={"target": target.model_copy(update={"url": target_url})}), prefix)
        password_env = target.password_env or restore.get("password_env")
        client = self._client(
            target_url, target.user or restore.get("user"), self._password(password_env),
            "restore_test.target.url", password_env,
        )
        try:
            target_uuid = client.cluster_uuid()
        except ServerUnreachableError as error:
            raise RestoreError(f"restore target unreachable: {error}") from None
        except ElasticsearchError as error:
            raise RestoreError(f"restore target {client.url} failed: {error}") from None
        if restore.get("cluster_uuid") and target_uuid == restore["cluster_uuid"] and not in_source:
            if not restore_test.into_source:
                raise RestoreRefused(
                    f"restore into {client.url} refused before writing anything: it answers as the source cluster "
                    f"(cluster_uuid {target_uuid}, as recorded by backup {manifest.backup_id}); restore into a "
                    "scratch cluster, or opt in with restore_test.into_source: true and a rename_prefix"
                )
            in_source = True
        try:
            if in_source:
                size = self._snapshot_bytes(client, restore["repository"], restore["snapshot"])
                problems = self.room_problems(client, size)
                if problems:
                    raise RestoreRefused(f"restore of snapshot {restore['snapshot']} into the source cluster "
                                         f"{client.url} refused before writing anything: {'; '.join(problems)}")
            else:
                self._register_read_only(client, restore)
        except ElasticsearchError as error:
            raise RestoreError(f"restore of snapshot {restore['snapshot']} into {client.url}: {error}") from None
        restored = RestoredIndices(client, renames, f"elasticsearch {client.url} indices {prefix}*")
        try:
            self._clear_leftovers(client, renames, prefix)
            restored.owned = list(renames.values())
            answer = client.request(
                "POST",
                f"/_snapshot/{quote(restore['repository'], safe='')}/{quote(restore['snapshot'], safe='')}/_restore",
                params={"wait_for_completion": "true"},
                body={
                    "indices": ",".join(renames),
                    "include_global_state": False,
                    "include_aliases": False,
                    # primaries only: a restore test proves the data, and takes no more disk than the data
                    "index_settings": {"index.number_of_replicas": 0},
                    **({"rename_pattern": "(.+)", "rename_replacement": f"{prefix}$1"} if prefix else {}),
                },
                timeout=self.restore_timeout,
            )
            snapshot = answer.get("snapshot") or {}
            shards = snapshot.get("shards") or {}
            if shards.get("failed"):
                raise RestoreError(
                    f"elasticsearch: restore of snapshot {restore['snapshot']} into {client.url} failed "
                    f"on {shards['failed']} of {shards.get('total')} shards"
                )
            yield restored
        except ElasticsearchError as error:
            raise RestoreError(f"restore of snapshot {restore['snapshot']} failed: {error}") from None
        finally:
            self._cleanup(restored, prefix)

    def preflight(self, datastore: Datastore) -> list[str]:
        """Live checks of a restore test before it starts (see :mod:`ops_platform.backups.preflight`).

        The target answers and is not the source cluster (``cluster_uuid``)
        unless ``into_source``; a scratch target has the repository
        registered read-only or not at all; the source cluster, when
        restored into, has room for its indices' primaries.
        """
        restore_test, connection, options = datastore.restore_test, datastore.connection, datastore.elasticsearch
        assert restore_test is not None and connection.url is not None and options is not None
        target = restore_test.target
        source = self._client(connection.url, connection.user, self._password(connection.password_env),
                              f"connection.url of datastore '{datastore.name}'", connection.password_env)
        password_env = target.password_env or connection.password_env
        scratch = self._client(target.url or connection.url, target.user or connection.user,
                               self._password(password_env), "restore_test.target.url", password_env)
        try:
            target_uuid = scratch.cluster_uuid()
        except OpsPlatformError as error:
            return [f"restore_test.target.url: {error}"]
        try:
            source_uuid = source.cluster_uuid()
        except OpsPlatformError as error:
            return [f"connection.url: {error}"]
        if target_uuid == source_uuid and not restore_test.into_source:
            return [f"restore_test.target.url: {scratch.url} answers as the source cluster (cluster_uuid "
                    f"{source_uuid}); restore into a scratch cluster, or opt in with restore_test.into_source: true"]
        try:
            if restore_test.into_source:
                return [f"restore_test.into_source: {problem}"
                        for problem in self.room_problems(scratch, source.primary_bytes(list(options.indices)))]
            registered = scratch.repository(options.repository)
        except ElasticsearchError as error:
            return [f"restore_test.target.url: {error}"]
        if registered is not None and not _truthy((registered.get("settings") or {}).get("readonly")):
            return [f"elasticsearch.repository: '{options.repository}' is registered writable in the restore target "
                    f"{scratch.url}; two clusters writing one repository corrupt it: register it there with "
                    "readonly: true, or delete it there and the restore test registers it read-only"]
        return []

    def room_problems(self, client: ElasticsearchClient, needed_bytes: int) -> list[str]:
        """Whether ``disk_margin`` x ``needed_bytes`` fit on the data nodes below the flood-stage watermark.

        Room is, over the data nodes, what each may still fill before it reaches
        the watermark (``_nodes/stats/fs``, ``_cluster/settings`` with defaults).
        """
        settings = client.request("GET", "/_cluster/settings",
                                  params={"include_defaults": "true", "flat_settings": "true"})
        flood = next((settings[level][FLOOD_STAGE] for level in ("transient", "persistent", "defaults")
                      if FLOOD_STAGE in (settings.get(level) or {})), DEFAULT_FLOOD_STAGE)
        room = 0
        for node in (client.request("GET", "/_nodes/stats/fs").get("nodes") or {}).values():
            roles = node.get("roles")
            if roles is not None and not any(str(role).startswith("data") for role in roles):
                continue
            total = (node.get("fs") or {}).get("total") or {}
            size, available = int(total.get("total_in_bytes", 0)), int(total.get("available_in_bytes", 0))
            room += max(0, flood_limit(str(flood), size) - (size - available))
        wanted = int(needed_bytes * self.disk_margin)
        if room >= wanted:
            return []
        return [f"{client.url} has {room} bytes of room below its flood-stage watermark ({flood}) on its data nodes, "
                f"and the restore needs {wanted} ({needed_bytes} bytes of primaries x {self.disk_margin:g} margin); "
                "restore into a scratch cluster (restore_test.target.url without into_source) or free disk first"]

    @staticmethod
    def _snapshot_bytes(client: ElasticsearchClient, repository: str, snapshot: str) -> int:
        status = client.request("GET", f"/_snapshot/{quote(repository, safe='')}/{quote(snapshot, safe='')}/_status")
        stats = ((status.get("snapshots") or [{}])[0].get("stats") or {}).get("total") or {}
        return int(stats.get("size_in_bytes", 0))

    @staticmethod
    def _register_read_only(client: ElasticsearchClient, restore: dict[str, Any]) -> None:
        """The backup's repository in the scratch cluster: registered read-only, pointing where the source's does."""
        repository = restore["repository"]
        recorded = restore.get("repository_settings") or {}
        registered = client.repository(repository)
        if registered is None:
            if not restore.get("repository_type"):
                raise RestoreRefused(
                    f"snapshot repository '{repository}' is not registered in the restore target {client.url}, and "
                    "the backup did not record its settings; register it there read-only (readonly: true)"
                )
            client.request("PUT", f"/_snapshot/{quote(repository, safe='')}", body={
                "type": restore["repository_type"], "settings": {**recorded, "readonly": True}})
            return
        settings = registered.get("settings") or {}
        if not _truthy(settings.get("readonly")):
            raise RestoreRefused(
                f"restore into {client.url} refused before writing anything: snapshot repository '{repository}' is "
                "registered there writable, and two clusters writing one repository corrupt it (register it in "
                "the restore target with readonly: true, or delete it there and the restore test registers it)"
            )
        for key in ("bucket", "base_path", "location"):
            if key in recorded and str(settings.get(key)) != str(recorded[key]):
                raise RestoreRefused(
                    f"snapshot repository '{repository}' in the restore target {client.url} has {key} "
                    f"{settings.get(key)!r}, the backup's has {recorded[key]!r}; it would not find the snapshot"
                )

    def _client(
        self, url: str, user: str | None, password: str | None, setting: str, password_env: str | None
    ) -> ElasticsearchClient:
        return ElasticsearchClient(
            url, user=user, password=password, setting=setting, password_setting=password_env,
            timeout=self.request_timeout, verify=self.verify_tls,
        )

    def _password(self, password_env: str | None) -> str | None:
        return self.password_for(password_env) if password_env else None

    @staticmethod
    def _check_repository(client: ElasticsearchClient, repository: str, datastore: str) -> dict[str, Any]:
        path = f"/_snapshot/{quote(repository, safe='')}"
        try:
            registered = client.request("GET", path).get(repository) or {}
        except ElasticsearchError as error:
            if error.status == 404:
                raise BackupError(
                    f"elasticsearch: snapshot repository '{repository}' is not registered at {client.url} "
                    f"(check elasticsearch.repository of datastore '{datastore}', or register it with "
                    f"PUT _snapshot/{repository})"
                ) from None
            raise
        try:
            client.request("POST", f"{path}/_verify")
        except ElasticsearchError as error:
            raise BackupError(
                f"elasticsearch: snapshot repository '{repository}' failed verification at {client.url}: "
                f"{error} (check the repository's bucket and the nodes' S3 credentials)"
            ) from None
        return registered

    def _wait_for_snapshot(self, client: ElasticsearchClient, repository: str, name: str) -> dict[str, Any]:
        deadline = self.clock() + self.snapshot_timeout
        state = "IN_PROGRESS"
        while True:
            info = client.snapshot(repository, name)
            if info is None:
                raise BackupError(f"elasticsearch: snapshot {name} vanished from repository {repository}")
            state = info.get("state", "UNKNOWN")
            if state == "SUCCESS":
                return info
            if state in FINAL_STATES:
                raise BackupError(
                    f"elasticsearch: snapshot {name} in repository {repository} ended {state}: "
                    f"{_failures(info)}; the snapshot was deleted"
                )
            if self.clock() >= deadline:
                raise BackupError(
                    f"elasticsearch: snapshot {name} in repository {repository} did not finish within "
                    f"{self.snapshot_timeout:g} s (last state {state}); it was aborted and deleted"
                )
            self.sleep(self.poll_interval)

    @staticmethod
    def _discard_snapshot(client: ElasticsearchClient, repository: str, name: str) -> None:
        try:
            client.delete_snapshot(repository, name)
        except OpsPlatformError:
            pass  # the backup already failed; this error would hide why

    @staticmethod
    def _refuse_overwrite(source_url: str, restore_test: RestoreTest, prefix: str) -> bool:
        """Refuse a bad prefix or a target that is the source without the opt-in; True: the target is the source."""
        if prefix and not INDEX_NAME.match(f"{prefix}x"):
            raise RestoreRefused(
                f"restore_test.rename_prefix {prefix!r} cannot start an Elasticsearch index name "
                "(use lowercase letters, digits and '-', e.g. 'restore-test-')"
            )
        reason = target_is_source(Connection(url=source_url), restore_test, separation="into_source")
        if reason:
            raise RestoreRefused(f"restore into {restore_test.target.url} refused before writing anything: {reason}")
        return same_endpoint(source_url, str(restore_test.target.url))

    @staticmethod
    def _clear_leftovers(client: ElasticsearchClient, renames: dict[str, str], prefix: str) -> None:
        """Indices of an earlier, interrupted restore test would make this one fail."""
        for restored in renames.values():
            if not client.index_exists(restored):
                continue
            if not prefix:
                raise RestoreRefused(
                    f"index {restored} already exists in the restore target {client.url}; a restore "
                    "without restore_test.rename_prefix would overwrite it"
                )
            client.delete_index(restored)

    @staticmethod
    def _cleanup(restored: RestoredIndices, prefix: str) -> None:
        problems = []
        for index in restored.owned:
            if not index.startswith(prefix):
                continue  # never delete an index outside the restore-test prefix
            try:
                restored.client.delete_index(index)
            except ElasticsearchError as error:
                if error.status != 404:
                    problems.append(str(error))
        if problems:
            raise RestoreError(f"cleanup of the restore test left indices behind: {'; '.join(problems)}")


def snapshot_name(backup_id: str) -> str:
    """Snapshot names must be lowercase: ``ops-20261122t020000z-3f9a1c``."""
    return f"ops-{backup_id.lower()}"


def _expire_hint(error: ElasticsearchError, repository: str) -> str:
    if error.error_type == "repository_missing_exception":
        return (f"; register the repository again (PUT _snapshot/{repository}, check elasticsearch.repository) "
                "so the snapshot can be deleted, or remove it from the repository's bucket by hand")
    if error.error_type == "concurrent_snapshot_execution_exception":
        return "; a restore from this snapshot (a restore test?) is running: it can be deleted once that ends"
    if error.status == 403:
        return "; the user needs the 'manage' cluster privilege to delete snapshots"
    return ""


def _failures(info: dict[str, Any]) -> str:
    failures = info.get("failures") or []
    shards = info.get("shards") or {}
    described = [
        f"{failure.get('index')}[{failure.get('shard_id')}]: {failure.get('reason')}" for failure in failures[:5]
    ]
    summary = f"{shards.get('failed', len(failures))} of {shards.get('total', '?')} shards failed"
    if info.get("reason"):
        summary += f" ({info['reason']})"
    return summary + (f" - {'; '.join(described)}" if described else "")


def _snapshot_time(info: dict[str, Any]) -> datetime:
    """A snapshot holds the data as of its start."""
    millis = info.get("start_time_in_millis")
    if isinstance(millis, int):
        return datetime.fromtimestamp(millis / 1000, tz=UTC)
    started = info.get("start_time")
    if isinstance(started, str):
        return datetime.fromisoformat(started.replace("Z", "+00:00"))
    return datetime.now(UTC)


def flood_limit(watermark: str, total_bytes: int) -> int:
    """Bytes used at which a disk of ``total_bytes`` reaches ``watermark`` (``95%``, ``0.95`` or ``10gb`` free)."""
    value = watermark.strip().lower()
    if value.endswith("%"):
        return int(total_bytes * float(value[:-1]) / 100)
    match = re.fullmatch(r"([0-9.]+)\s*([kmgtp]?b)", value)
    if match:
        return total_bytes - int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])
    return int(total_bytes * float(value))


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"
