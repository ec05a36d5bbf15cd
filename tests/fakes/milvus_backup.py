"""A fake milvus-backup REST server and the slice of Milvus' RESTful API v2 a restore test needs.

Two HTTP servers share one state, as milvus-backup and the Milvus proxy share
a cluster:

- ``backup_url``: milvus-backup's ``/api/v1`` as its gin server answers it:
  ``POST /create`` (``backup_name``, ``collection_names``, ``async``),
  ``GET /get_backup?backup_name=``, ``GET /list``, ``DELETE /delete?backup_name=``
  (the backup leaves ``/list`` and ``/get_backup``; code 404 when there is no
  such backup, 400 "empty backup name" without one; when removing its files
  from the bucket fails, :meth:`MilvusBackupFake.fail_deletes`, the backup
  stays and the answer is code 3 with the msg of the server's own preceding
  lookup, "success", as ``BackupContext.DeleteBackup`` answers),
  ``POST /restore`` (``collection_names``, ``collection_suffix``,
  ``collection_renames``, ``async``), ``GET /get_restore?id=``. Bodies are the
  protobuf messages as Go's encoding/json writes them: snake_case names,
  enums as numbers, zero values omitted (``code`` 0 and ``state_code`` 0 do not
  appear; ``size`` and ``has_index`` always do); errors are a ``code``
  (3 Fail, 400 Parameter_Error, 404 Request_Object_Not_Found) and ``msg`` with
  HTTP 200, and HTTP 400 ``{"error": "Invalid request body"}`` for a body
  that does not parse. A backup or restore is EXECUTING (1) for
  ``polls_to_finish`` reads, then SUCCESS (2) or the injected FAIL (3).
  ``simple_response=True`` strips ``partition_backups`` as the server's
  ``http.simpleResponse`` does.
- ``milvus_url``: ``POST /v2/vectordb/collections/has|get_stats|drop`` with
  ``dbName``/``collectionName``, answering ``{"code": 0, "data": ...}`` or
  ``{"code": 100, "message": "collection not found[...]"}``; a bearer token
  is required when ``token`` is set.

Not covered: databases other than ``default`` in ``db_collections``, RBAC
backups, the ``/check`` and ``/hello`` endpoints, partitions and segments
beyond one of each per collection, ``collection_suffix`` combined with renames
of databases, bulk-insert progress.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Json = dict[str, Any]
SUCCESS, EXECUTING, DONE, FAIL = 0, 1, 2, 3
ALWAYS_PRESENT = ("size", "has_index")


def omit_empty(value: Any, key: str = "") -> Any:
    """What Go's ``json:",omitempty"`` leaves of a protobuf message."""
    if isinstance(value, dict):
        kept = {}
        for name, item in value.items():
            cleaned = omit_empty(item, name)
            if name in ALWAYS_PRESENT or cleaned not in (0, "", None, False, [], {}):
                kept[name] = cleaned
        return kept
    if isinstance(value, list):
        return [omit_empty(item) for item in value]
    return value


@dataclass
class Task:
    info: Json
    polls_left: int
    outcome: int = DONE
    error: str | None = None


@dataclass(frozen=True)
class RecordedRequest:
    server: str
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class MilvusBackupFake:
    host: str = "127.0.0.1"
    polls_to_finish: int = 2
    simple_response: bool = False
    token: str | None = None
    milvus_version: str = "v2.4.5"
    collections: dict[tuple[str, str], int] = field(default_factory=dict)  # (db, name) -> rows
    backups: dict[str, Task] = field(default_factory=dict)
    restores: dict[str, Task] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _fail_next: tuple[str, str] | None = None
    _failing_deletes: int = 0
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    @property
    def backup_url(self) -> str:
        return f"http://{self.host}:{self._servers[0].server_address[1]}"

    @property
    def milvus_url(self) -> str:
        return f"http://{self.host}:{self._servers[1].server_address[1]}"

    def start(self) -> MilvusBackupFake:
        for name in ("backup", "milvus"):
            server = ThreadingHTTPServer((self.host, 0), _Handler)
            server.daemon_threads = True
            server.fake = self  # type: ignore[attr-defined]
            server.role = name  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"fake-milvus-{name}", daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> MilvusBackupFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- hooks for tests

    def fail_next(self, kind: str, message: str) -> None:
        """The next backup or restore (``kind``) ends in state FAIL (3) with ``message``."""
        with self.lock:
            self._fail_next = (kind, message)

    def fail_deletes(self, times: int = 1) -> None:
        """The next ``times`` deletions cannot remove the backup's files from the bucket (access denied)."""
        with self.lock:
            self._failing_deletes = times

    def hold(self) -> None:
        """Backups and restores never leave EXECUTING."""
        with self.lock:
            self.polls_to_finish = 10**9

    def writes(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method != "GET" and not r.path.endswith(("/has", "/get_stats"))]

    # -- milvus-backup /api/v1

    def backup_api(self, method: str, path: str, query: dict[str, str], body: Json) -> Json:
        route = (method, path.removeprefix("/api/v1"))
        if route == ("POST", "/create"):
            return self._create(body)
        if route == ("GET", "/get_backup"):
            task = self.backups.get(query.get("backup_name", ""))
            if task is None:
                return {"code": 404, "msg": "backup does not exist"}
            self._advance(task)
            return {"msg": "success", "data": self._shown(task.info)}
        if route == ("GET", "/list"):
            return {"msg": "success", "data": [self._shown(t.info) for t in self.backups.values()]}
        if route == ("DELETE", "/delete"):
            name = query.get("backup_name", "")
            if not name:
                return {"code": 400, "msg": "empty backup name"}
            if name not in self.backups:
                return {"code": 404, "msg": "backup does not exist"}
            if self._failing_deletes:
                self._failing_deletes -= 1
                return {"code": FAIL, "msg": "success"}
            del self.backups[name]
            return {"msg": "success"}
        if route == ("POST", "/restore"):
            return self._restore(body)
        if route == ("GET", "/get_restore"):
            task = self.restores.get(query.get("id", ""))
            if task is None:
                return {"code": 404, "msg": "restore task does not exist"}
            self._advance(task)
            return {"msg": "success", "data": self._restore_view(task)}
        raise LookupError(path)

    def _create(self, body: Json) -> Json:
        name = body.get("backup_name") or f"backup_{int(time.time())}"
        if name in self.backups:
            return {"code": 400, "msg": f"backup already exist with the name: {name}"}
        wanted = body.get("collection_names") or sorted({n for _, n in self.collections})
        chosen = []
        for collection in wanted:
            if ("default", collection) not in self.collections:
                return {"code": 400, "msg": f"request backup collection does not exist: {collection}"}
            chosen.append(("default", collection))
        now_ms = int(time.time() * 1000)
        tso = now_ms << 18
        info = {
            "id": str(uuid.uuid4()), "state_code": EXECUTING, "start_time": now_ms, "progress": 0, "name": name,
            "backup_timestamp": tso, "milvus_version": self.milvus_version, "size": 0,
            "collection_backups": [
                {"id": str(uuid.uuid4()), "state_code": EXECUTING, "collection_id": 1000 + i, "db_name": db,
                 "collection_name": collection, "shards_num": 1, "consistency_level": 1, "backup_timestamp": tso,
                 "backup_physical_timestamp": now_ms // 1000, "size": rows * 64, "has_index": False,
                 "partition_backups": [{
                     "partition_id": 2000 + i, "partition_name": "_default", "collection_id": 1000 + i,
                     "size": rows * 64,
                     "segment_backups": [{"segment_id": 3000 + i, "collection_id": 1000 + i,
                                          "partition_id": 2000 + i, "num_of_rows": rows, "size": rows * 64}],
                 }]}
                for i, (db, collection) in enumerate(chosen)
                for rows in [self.collections[(db, collection)]]
            ],
        }
        info["size"] = sum(c["size"] for c in info["collection_backups"])
        outcome, error = self._outcome("backup")
        task = Task(info, 0 if not body.get("async") else self.polls_to_finish, outcome, error)
        self.backups[name] = task
        if not body.get("async"):
            self._advance(task)
        return {"requestId": str(uuid.uuid4()), "msg": "success", "data": self._shown(info)}

    def _restore(self, body: Json) -> Json:
        task = self.backups.get(body.get("backup_name", ""))
        if task is None or task.info["state_code"] != DONE:
            return {"code": 404, "msg": f"backup doesn't exist or is not complete: {body.get('backup_name')}"}
        wanted = body.get("collection_names") or [c["collection_name"] for c in task.info["collection_backups"]]
        renames = body.get("collection_renames") or {}
        suffix = body.get("collection_suffix") or ""
        plan = []
        for collection in task.info["collection_backups"]:
            name = collection["collection_name"]
            if name not in wanted:
                continue
            target = renames.get(name) or renames.get(f"default.{name}", "").removeprefix("default.") \
                or f"{name}{suffix}"
            if ("default", target) in self.collections:
                return {"code": FAIL, "msg": f"The collection to restore already exists, backupCollectName: "
                                             f"{name}, targetCollectionName: {target}"}
            rows = sum(s["num_of_rows"] for p in collection["partition_backups"] for s in p["segment_backups"])
            plan.append((name, target, rows, collection["size"]))
        outcome, error = self._outcome("restore")
        restore_id = f"restore_{uuid.uuid4().hex}"
        info = {
            "id": restore_id, "state_code": EXECUTING, "start_time": int(time.time()), "progress": 0,
            "to_restore_size": sum(size for *_, size in plan), "restored_size": 0,
            "collection_restore_tasks": [
                {"id": str(uuid.uuid4()), "state_code": EXECUTING, "target_collection_name": target,
                 "to_restore_size": size, "restored_size": 0, "progress": 0, "target_db_name": "default"}
                for _, target, _, size in plan
            ],
        }
        task = Task(info, self.polls_to_finish if body.get("async") else 0, outcome, error)
        task.info["_plan"] = plan  # what a successful restore creates; removed before answering
        self.restores[restore_id] = task
        if not body.get("async"):
            self._advance(task)
        return {"requestId": str(uuid.uuid4()), "msg": "success", "data": self._restore_view(task)}

    def _outcome(self, kind: str) -> tuple[int, str | None]:
        if self._fail_next and self._fail_next[0] == kind:
            message = self._fail_next[1]
            self._fail_next = None
            return FAIL, message
        return DONE, None

    def _advance(self, task: Task) -> None:
        info = task.info
        if info["state_code"] != EXECUTING:
            return
        if task.polls_left > 0:
            task.polls_left -= 1
            info["progress"] = 50
            return
        info["state_code"] = task.outcome
        info["end_time"] = int(time.time() * 1000)
        info["progress"] = 100 if task.outcome == DONE else info["progress"]
        if task.outcome == FAIL:
            info["errorMessage"] = task.error
        children = info.get("collection_backups") or info.get("collection_restore_tasks") or []
        for child in children:
            child["state_code"] = task.outcome
            child["progress"] = info["progress"]
        if task.outcome == DONE and "_plan" in info:
            for _, target, rows, _ in info["_plan"]:
                self.collections[("default", target)] = rows
            for child in children:
                child["restored_size"] = child["to_restore_size"]
            info["restored_size"] = info["to_restore_size"]

    def _shown(self, info: Json) -> Json:
        if not self.simple_response:
            return omit_empty(info)
        stripped = {**info, "collection_backups": [
            {k: v for k, v in c.items() if k != "partition_backups"} for c in info.get("collection_backups", [])]}
        return omit_empty(stripped)

    def _restore_view(self, task: Task) -> Json:
        return omit_empty({k: v for k, v in task.info.items() if k != "_plan"})

    # -- Milvus RESTful API v2

    def milvus_api(self, path: str, body: Json) -> Json:
        action = path.removeprefix("/v2/vectordb/collections/")
        key = (body.get("dbName") or "default", body.get("collectionName") or "")
        if action == "has":
            return {"code": 0, "data": {"has": key in self.collections}}
        if key not in self.collections:
            return {"code": 100, "message": f"collection not found[database={key[0]}][collection={key[1]}]"}
        if action == "get_stats":
            return {"code": 0, "data": {"rowCount": self.collections[key]}}
        if action == "drop":
            del self.collections[key]
            return {"code": 0, "data": {}}
        raise LookupError(path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # one write per response; headers and body apart meet delayed ACKs
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        fake: MilvusBackupFake = self.server.fake  # type: ignore[attr-defined]
        role: str = self.server.role  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, document = 200, None
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            status, document = 400, {"error": "Invalid request body"}
            body = None
        if document is None:
            with fake.lock:
                fake.requests.append(RecordedRequest(role, self.command, split.path, query, body))
                try:
                    if role == "milvus":
                        if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                            document = {"code": 1800, "message": "user hasn't authenticated"}
                        else:
                            document = fake.milvus_api(split.path, body)
                    else:
                        document = fake.backup_api(self.command, split.path, query, body)
                except LookupError:
                    status, document = 404, {"error": f"404 page not found: {split.path}"}
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _serve
