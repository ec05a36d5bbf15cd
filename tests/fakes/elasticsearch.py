"""A fake Elasticsearch REST API over HTTP: indices, snapshot repositories, snapshots, restore.

Follows the documented request and response shapes of Elasticsearch 8:
- ``GET /`` (cluster info with ``version.number``), basic auth on every
  request (401 ``security_exception`` with ``WWW-Authenticate``);
- ``_cat/indices/<expr>?format=json`` (``docs.count`` as a string, patterns with
  ``*``, ``expand_wildcards``), ``GET <index>/_count``, ``HEAD <index>``,
  ``DELETE <index>`` (wildcards refused, as with
  ``action.destructive_requires_name: true``);
- ``GET _snapshot/<repo>``, ``POST _snapshot/<repo>/_verify``,
  ``PUT|POST _snapshot/<repo>/<snap>`` (``wait_for_completion``; body
  ``indices``, ``include_global_state``), ``GET _snapshot/<repo>/<snap>``
  (``{"snapshots": [...], "total", "remaining"}``; ``<snap>`` may be ``_all``,
  a ``*`` pattern or a comma list, a missing concrete name is 404
  ``snapshot_missing_exception``); a snapshot is IN_PROGRESS for
  ``polls_to_finish`` reads, then SUCCESS, or the state injected with
  :meth:`ElasticsearchFake.fail_next_snapshot`; it holds the document counts
  its indices had when it started;
- ``DELETE _snapshot/<repo>/<snap>`` (one name): the snapshot leaves every
  listing; one still IN_PROGRESS is aborted and deleted, as the delete
  snapshot API documents; one that a restore is reading
  (:meth:`ElasticsearchFake.restore_in_progress`) is refused with 503
  ``concurrent_snapshot_execution_exception`` ("cannot delete snapshot during
  a restore in progress"), as ``SnapshotsService`` refuses it;
- ``POST _snapshot/<repo>/<snap>/_restore`` with ``indices``,
  ``rename_pattern``/``rename_replacement`` (Java ``$1`` groups),
  ``index_settings`` (kept per restored index in ``index_settings``), refusing an
  open index of the same name (500 ``snapshot_restore_exception``);
- ``PUT _snapshot/<repo>`` (``type``, ``settings``; ``readonly: true`` makes
  snapshot creation and deletion fail with 500 ``repository_exception``, as a
  read-only repository does); ``GET _snapshot/<repo>/<snap>/_status``
  (``stats.total.size_in_bytes``: ``bytes_per_doc`` per document);
- ``GET /`` carries a ``cluster_uuid`` of its own per fake; two fakes built on
  one ``snapshots`` mapping are two clusters sharing one repository bucket;
- disk: ``_cat/indices`` ``pri.store.size`` (``bytes=b``), ``GET
  _nodes/stats/fs`` from ``nodes`` (``roles``, ``total``, ``available`` bytes;
  a restore fills the first data node by the restored primaries), ``GET
  _cluster/settings`` (``persistent``/``transient`` from ``cluster_settings``,
  ``defaults`` with the 95% flood-stage watermark, ``flat_settings``);
- errors as ``{"error": {"root_cause": [...], "type", "reason"}, "status"}``.

Not covered: shards, mappings, documents themselves (an index is a name and a
count), data streams and aliases, ``_recovery``, repository types (any type
registers; settings are stored, not used), watermarks acting on indices, SLM.
"""

from __future__ import annotations

import fnmatch
import json
import re
import threading
import time
import uuid
from base64 import b64decode
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Json = dict[str, Any]


class EsError(Exception):
    def __init__(self, status: int, error_type: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.error_type = error_type
        self.reason = reason
        self.extra = extra

    def body(self) -> Json:
        cause = {"type": self.error_type, "reason": self.reason, **self.extra}
        return {"error": {"root_cause": [cause], **cause}, "status": self.status}


@dataclass
class Snapshot:
    repository: str
    name: str
    indices: list[str]
    counts: dict[str, int]
    include_global_state: bool
    started_ms: int
    polls_left: int
    outcome: str = "SUCCESS"
    reason: str | None = None
    uuid: str = field(default_factory=lambda: uuid.uuid4().hex[:22])
    state: str = "IN_PROGRESS"
    ended_ms: int | None = None

    def info(self, version: str) -> Json:
        failed = len(self.indices) if self.state == "FAILED" else (1 if self.state == "PARTIAL" else 0)
        info: Json = {
            "snapshot": self.name, "uuid": self.uuid, "repository": self.repository,
            "version_id": 8_150_099, "version": version, "indices": list(self.indices), "data_streams": [],
            "include_global_state": self.include_global_state, "state": self.state,
            "start_time": _iso(self.started_ms), "start_time_in_millis": self.started_ms,
            "failures": [
                {"index": index, "index_uuid": index, "shard_id": 0, "reason": self.reason or "injected failure",
                 "node_id": "fake-node", "status": "INTERNAL_SERVER_ERROR"}
                for index in self.indices[:failed]
            ],
            "shards": {"total": len(self.indices), "failed": failed, "successful": len(self.indices) - failed},
            "feature_states": [],
        }
        if self.ended_ms is not None:
            info.update(end_time=_iso(self.ended_ms), end_time_in_millis=self.ended_ms,
                        duration_in_millis=self.ended_ms - self.started_ms)
        if self.reason and self.state == "FAILED":
            info["reason"] = self.reason
        return info


def _iso(millis: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis / 1000)) + f".{millis % 1000:03d}Z"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any


class ElasticsearchFake:
    """The fake on ``host:port`` (0: a free port), with hooks for tests.

    ``indices`` maps index name to document count. ``user``/``password`` are
    the only credentials accepted.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, user: str = "ops_backup",
                 password: str = "es-secret", version: str = "8.15.0", polls_to_finish: int = 2,
                 snapshots: dict[tuple[str, str], Snapshot] | None = None, bytes_per_doc: int = 1024) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.version = version
        self.polls_to_finish = polls_to_finish
        self.lock = threading.RLock()
        self.indices: dict[str, int] = {}
        self.repositories: dict[str, Json] = {}
        self.snapshots: dict[tuple[str, str], Snapshot] = {} if snapshots is None else snapshots  # the bucket
        self.cluster_uuid = uuid.uuid4().hex[:22]
        self.bytes_per_doc = bytes_per_doc
        self.nodes: list[Json] = [{"name": "fake-node", "roles": ["data", "master", "ingest"],
                                   "total": 100 * 1024**3, "available": 80 * 1024**3}]
        self.cluster_settings: dict[str, Json] = {"persistent": {}, "transient": {}}
        self.index_settings: dict[str, Json] = {}  # restored index -> the index_settings its restore asked for
        self.requests: list[RecordedRequest] = []
        self.restoring: set[tuple[str, str]] = set()  # (repository, snapshot) a restore is reading
        self._next_outcome: tuple[str, str] | None = None
        self._verify_failure: str | None = None
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ElasticsearchFake:
        self._http = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._http.daemon_threads = True
        self._http.fake = self  # type: ignore[attr-defined]
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-elasticsearch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> ElasticsearchFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- hooks for tests

    def add_repository(self, name: str, bucket: str = "onto-snapshots", *, readonly: bool = False) -> None:
        with self.lock:
            settings: Json = {"bucket": bucket, "base_path": "snapshots"}
            if readonly:
                settings["readonly"] = "true"
            self.repositories[name] = {"type": "s3", "settings": settings}

    def fail_next_snapshot(self, state: str = "FAILED", reason: str = "IndexShardSnapshotFailedException") -> None:
        """The next snapshot ends in ``state`` (FAILED or PARTIAL) instead of SUCCESS."""
        with self.lock:
            self._next_outcome = (state, reason)

    def hold_snapshots(self) -> None:
        """Snapshots never leave IN_PROGRESS (a stuck repository)."""
        with self.lock:
            self.polls_to_finish = 10**9

    def restore_in_progress(self, repository: str, name: str) -> None:
        """A restore from this snapshot is running (a long restore test): deleting it is refused."""
        with self.lock:
            self.restoring.add((repository, name))

    def fail_verification(self, reason: str) -> None:
        with self.lock:
            self._verify_failure = reason

    def writes(self) -> list[RecordedRequest]:
        """Requests that change something (anything but GET and HEAD, and the read-only _verify)."""
        return [r for r in self.requests if r.method not in ("GET", "HEAD") and not r.path.endswith("/_verify")]

    # -- the API

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = [unquote(part) for part in path.strip("/").split("/") if part]
        with self.lock:
            self.requests.append(RecordedRequest(method, path, query, body))
            if not parts:
                return 200, {"name": "fake-node", "cluster_name": "onto-es", "cluster_uuid": self.cluster_uuid,
                             "version": {"number": self.version, "build_flavor": "default"},
                             "tagline": "You Know, for Search"}
            if parts[0] == "_cat" and parts[1:2] == ["indices"]:
                return 200, self._cat_indices(parts[2] if len(parts) > 2 else "*", query)
            if parts[0] == "_snapshot":
                return self._snapshot_api(method, parts[1:], query, body or {})
            if parts == ["_nodes", "stats", "fs"] and method == "GET":
                return 200, self._node_stats()
            if parts == ["_cluster", "settings"] and method == "GET":
                return 200, self._settings(query)
            if parts[0].startswith("_"):
                raise EsError(400, "illegal_argument_exception", f"no handler for [{method} {path}] in this fake")
            return self._index_api(method, parts, query)

    def _cat_indices(self, expression: str, query: dict[str, str]) -> list[Json]:
        names = self._resolve(expression, allow_missing=True)
        columns = query.get("h", "health,status,index,docs.count").split(",")
        rows = []
        for name in names:
            size = self.indices[name] * self.bytes_per_doc
            row = {"health": "green", "status": "open", "index": name, "uuid": name,
                   "docs.count": str(self.indices[name]), "pri": "1", "rep": "0",
                   "pri.store.size": str(size) if query.get("bytes") == "b" else f"{size / 1024:.1f}kb"}
            rows.append({column: row.get(column) for column in columns})
        return rows

    def _resolve(self, expression: str, *, allow_missing: bool = False) -> list[str]:
        found: list[str] = []
        for pattern in (p for p in expression.split(",") if p):
            if "*" in pattern:
                found += [name for name in sorted(self.indices) if fnmatch.fnmatchcase(name, pattern)]
            elif pattern in self.indices:
                found.append(pattern)
            else:
                raise EsError(404, "index_not_found_exception", f"no such index [{pattern}]",
                              index=pattern, **{"resource.type": "index_or_alias", "resource.id": pattern})
        return list(dict.fromkeys(found))

    def _index_api(self, method: str, parts: list[str], query: dict[str, str]) -> tuple[int, Any]:
        index = parts[0]
        if len(parts) == 2 and parts[1] == "_count" and method in ("GET", "POST"):
            names = self._resolve(index)
            return 200, {"count": sum(self.indices[name] for name in names),
                         "_shards": {"total": len(names), "successful": len(names), "skipped": 0, "failed": 0}}
        if len(parts) == 1 and method == "HEAD":
            return (200 if index in self.indices else 404), None
        if len(parts) == 1 and method == "DELETE":
            if "*" in index or index in ("_all",):
                raise EsError(400, "illegal_argument_exception",
                              "Wildcard expressions or all indices are not allowed")
            for name in self._resolve(index):
                del self.indices[name]
            return 200, {"acknowledged": True}
        raise EsError(405, "method_not_allowed", f"{method} /{'/'.join(parts)} is not served by this fake")

    def _snapshot_api(self, method: str, parts: list[str], query: dict[str, str], body: Json) -> tuple[int, Any]:
        if not parts:
            return 200, dict(self.repositories)
        repository = parts[0]
        if len(parts) == 1 and method in ("PUT", "POST"):
            self.repositories[repository] = {"type": body.get("type"), "settings": dict(body.get("settings") or {})}
            return 200, {"acknowledged": True}
        if repository not in self.repositories:
            raise EsError(404, "repository_missing_exception", f"[{repository}] missing")
        readonly = str(self.repositories[repository]["settings"].get("readonly", "")).lower() == "true"
        if readonly and len(parts) == 2 and method in ("PUT", "POST", "DELETE"):
            raise EsError(500, "repository_exception", f"[{repository}] cannot modify a readonly repository")
        if len(parts) == 1 and method == "GET":
            return 200, {repository: self.repositories[repository]}
        if parts[1:] == ["_verify"] and method == "POST":
            if self._verify_failure:
                raise EsError(500, "repository_verification_exception",
                              f"[{repository}] path is not accessible on master node: {self._verify_failure}")
            return 200, {"nodes": {"fake-node-id": {"name": "fake-node"}}}
        name = parts[1]
        key = (repository, name)
        if len(parts) == 2 and method in ("PUT", "POST"):
            return self._create_snapshot(repository, name, query, body)
        if len(parts) == 2 and method == "GET":
            listed = self._matching_snapshots(repository, name)
            for snapshot in listed:
                self._advance(snapshot)
            return 200, {"snapshots": [snapshot.info(self.version) for snapshot in listed],
                         "total": len(listed), "remaining": 0}
        snapshot = self.snapshots.get(key)
        if snapshot is None:
            raise EsError(404, "snapshot_missing_exception", f"[{repository}:{name}] is missing")
        if len(parts) == 2 and method == "DELETE":
            if key in self.restoring:
                described = f"{repository}:{name}/{snapshot.uuid}"
                raise EsError(503, "concurrent_snapshot_execution_exception",
                              f"[{described}] cannot delete snapshot during a restore in progress in [[{described}]]")
            del self.snapshots[key]
            return 200, {"acknowledged": True}
        if parts[2:] == ["_restore"] and method == "POST":
            return self._restore(snapshot, query, body)
        if parts[2:] == ["_status"] and method == "GET":
            size = sum(snapshot.counts.values()) * self.bytes_per_doc
            return 200, {"snapshots": [{"snapshot": name, "repository": repository, "state": snapshot.state,
                                        "stats": {"total": {"file_count": len(snapshot.indices),
                                                            "size_in_bytes": size}}}]}
        raise EsError(405, "method_not_allowed", f"{method} _snapshot/{'/'.join(parts)} is not served by this fake")

    def _matching_snapshots(self, repository: str, expression: str) -> list[Snapshot]:
        found: list[Snapshot] = []
        in_repository = sorted((s for (r, _), s in self.snapshots.items() if r == repository),
                               key=lambda s: (s.started_ms, s.name))
        for pattern in (p for p in expression.split(",") if p):
            if pattern == "_all" or "*" in pattern:
                found += [s for s in in_repository if pattern == "_all" or fnmatch.fnmatchcase(s.name, pattern)]
            elif (repository, pattern) in self.snapshots:
                found.append(self.snapshots[(repository, pattern)])
            else:
                raise EsError(404, "snapshot_missing_exception", f"[{repository}:{pattern}] is missing")
        return list({id(s): s for s in found}.values())

    def _create_snapshot(self, repository: str, name: str, query: dict[str, str], body: Json) -> tuple[int, Any]:
        if (repository, name) in self.snapshots:
            raise EsError(400, "invalid_snapshot_name_exception",
                          f"[{repository}:{name}] Invalid snapshot name [{name}], snapshot with the same name "
                          "already exists")
        if name != name.lower():
            raise EsError(400, "invalid_snapshot_name_exception",
                          f"[{repository}:{name}] Invalid snapshot name [{name}], must be lowercase")
        requested = body.get("indices", "*")
        expression = ",".join(requested) if isinstance(requested, list) else str(requested)
        indices = self._resolve(expression)
        outcome, reason = self._next_outcome or ("SUCCESS", None)
        self._next_outcome = None
        snapshot = Snapshot(repository, name, indices, {i: self.indices[i] for i in indices},
                            bool(body.get("include_global_state", True)), int(time.time() * 1000),
                            self.polls_to_finish, outcome, reason)
        self.snapshots[(repository, name)] = snapshot
        if query.get("wait_for_completion") == "true":
            snapshot.polls_left = 0
            self._advance(snapshot)
            return 200, {"snapshot": snapshot.info(self.version)}
        return 200, {"accepted": True}

    @staticmethod
    def _advance(snapshot: Snapshot) -> None:
        if snapshot.state != "IN_PROGRESS":
            return
        if snapshot.polls_left > 0:
            snapshot.polls_left -= 1
            return
        snapshot.state = snapshot.outcome
        snapshot.ended_ms = int(time.time() * 1000)

    def _restore(self, snapshot: Snapshot, query: dict[str, str], body: Json) -> tuple[int, Any]:
        if snapshot.state not in ("SUCCESS", "PARTIAL"):
            raise EsError(500, "snapshot_restore_exception",
                          f"[{snapshot.repository}:{snapshot.name}/{snapshot.uuid}] cannot restore index from a "
                          f"snapshot in state {snapshot.state}")
        requested = body.get("indices", "*")
        expression = ",".join(requested) if isinstance(requested, list) else str(requested)
        chosen = [i for i in snapshot.indices if any(fnmatch.fnmatchcase(i, p) for p in expression.split(","))]
        pattern, replacement = body.get("rename_pattern"), body.get("rename_replacement")
        renames = {}
        for index in chosen:
            target = index
            if pattern is not None and replacement is not None:
                target = re.sub(pattern, re.sub(r"\$(\d)", r"\\\1", replacement), index, count=1)
            renames[index] = target
        for index, target in renames.items():
            if target in self.indices:
                raise EsError(500, "snapshot_restore_exception",
                              f"[{snapshot.repository}:{snapshot.name}/{snapshot.uuid}] cannot restore index "
                              f"[{target}] because an open index with same name already exists in the cluster. "
                              "Either close or delete the existing index or restore the index under a different "
                              "name by providing a rename pattern and replacement name")
        for index, target in renames.items():
            self.indices[target] = snapshot.counts[index]
            self.index_settings[target] = dict(body.get("index_settings") or {})
        data_nodes = [node for node in self.nodes if "data" in node["roles"]]
        if data_nodes:
            data_nodes[0]["available"] -= sum(snapshot.counts[i] for i in renames) * self.bytes_per_doc
        if query.get("wait_for_completion") == "true":
            total = len(renames)
            return 200, {"snapshot": {"snapshot": snapshot.name, "indices": list(renames.values()),
                                      "shards": {"total": total, "failed": 0, "successful": total}}}
        return 200, {"accepted": True}

    def _node_stats(self) -> Json:
        return {"_nodes": {"total": len(self.nodes), "successful": len(self.nodes), "failed": 0},
                "cluster_name": "onto-es",
                "nodes": {f"node-{i}": {"name": node["name"], "roles": node["roles"],
                                        "fs": {"total": {"total_in_bytes": node["total"],
                                                         "free_in_bytes": node["available"],
                                                         "available_in_bytes": node["available"]}}}
                          for i, node in enumerate(self.nodes)}}

    def _settings(self, query: dict[str, str]) -> Json:
        if query.get("flat_settings") != "true":
            raise EsError(400, "illegal_argument_exception", "this fake answers flat_settings=true only")
        answer = {level: dict(self.cluster_settings.get(level, {})) for level in ("persistent", "transient")}
        if query.get("include_defaults") == "true":
            answer["defaults"] = {"cluster.routing.allocation.disk.watermark.flood_stage": "95%",
                                  "cluster.routing.allocation.disk.watermark.high": "90%"}
        return answer

    def authorized(self, header: str | None) -> bool:
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        return (user, password) == (self.user, self.password)


class _Handler(BaseHTTPRequestHandler):
    server_version = "fake-elasticsearch"
    protocol_version = "HTTP/1.1"
    # One buffered write per response: headers and body apart meet delayed ACKs (40 ms a request).
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        fake: ElasticsearchFake = self.server.fake  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            if not fake.authorized(self.headers.get("Authorization")):
                raise EsError(401, "security_exception",
                              f"missing authentication credentials for REST request [{split.path}]",
                              header={"WWW-Authenticate": 'Basic realm="security" charset="UTF-8"'})
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise EsError(400, "parse_exception", "request body is required to be valid JSON") from None
            status, document = fake.handle(self.command, split.path, query, body)
        except EsError as error:
            status, document = error.status, error.body()
        payload = b"" if document is None else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-elastic-product", "Elasticsearch")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="security" charset="UTF-8"')
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve
