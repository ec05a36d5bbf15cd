"""An honest fake Kubernetes API server over HTTP, for tests.

The official ``kubernetes`` client talks to it unchanged: typed APIs,
``CustomObjectsApi``, ``dynamic.DynamicClient`` and ``watch.Watch``. Tests play
the controllers' part through the hooks of :class:`KubeApiServer`.

Faithful to the real API server:
- metadata: uid, one global resourceVersion counter (a string),
  creationTimestamp, generation (1 at create, +1 when anything outside
  metadata and status changes), generateName, finalizers holding a deleted
  object with a deletionTimestamp; a write that changes nothing keeps the
  resourceVersion and sends no watch event;
- errors are ``Status`` objects: 400 BadRequest, 401, 404 NotFound (also a
  namespaced create into a missing namespace), 405, 409 AlreadyExists and
  Conflict (stale resourceVersion, apply conflicts), 415 (strategic merge
  patch of a custom resource), 422 Invalid (missing or malformed name);
- status subresource: ``.../status`` writes change only status, the main
  endpoint ignores status; ``.../scale`` for deployments, statefulsets and
  replicasets;
- server-side apply (JSON or YAML body): creates when missing, merges
  otherwise, requires ``fieldManager``, records ``managedFields`` (FieldsV1),
  409 on a field another manager applied with another value unless
  ``force=true``, and removes fields a manager stopped applying;
- merge, strategic merge (lists merged by the built-in merge keys,
  ``$patch: delete`` on list items) and JSON patch (add/remove/replace/test);
  ``dryRun=All`` on create, update, patch, apply and delete;
- list: label selectors (``a=b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``,
  ``a``, ``!a``), field selectors (metadata.name/namespace and a few per
  kind), ``limit``/``continue``, ``<Kind>List`` with a resourceVersion; items
  of built-in lists carry no apiVersion/kind, as on a real server;
- watch: after a resourceVersion, or the current state as ADDED first when
  none (or "0") is given; an object entering or leaving a selector is ADDED or
  DELETED; ``timeoutSeconds`` (whole seconds, as on a real server) closes the
  stream; a resourceVersion from before ``reset()`` gets an ERROR event 410
  Expired;
- discovery (/version, /api, /apis, group versions) for DynamicClient; a
  CustomResourceDefinition registers its kinds at once (Established,
  NamesAccepted) and deleting it removes them and their objects;
  snapshot.storage.k8s.io kinds behave as the CRDs they are on a real cluster.

Not faithful:
- no admission, schema validation or defaulting (except a namespace's phase
  and ``kubernetes.io/metadata.name`` label and a pod's ``Pending`` phase);
  no controllers: pods never run, namespaces vanish at once with their
  content, owner references are not garbage-collected;
- only Apply managers own fields: PUT and non-apply PATCH never cause apply
  conflicts; lists of custom resources are atomic in apply;
- one stored copy per kind: reading a custom resource through another served
  version only rewrites apiVersion;
- DELETE answers a ``Status`` (the object while finalizers hold it);
  propagationPolicy and gracePeriodSeconds are ignored;
- BOOKMARK only right before a watch closes on its timeout (when
  ``allowWatchBookmarks`` is set); continue tokens resume from a key on the
  current state, not from a snapshot;
- no /openapi (DynamicClient does not ask for it), no protobuf, no tables, no
  aggregated discovery, no authorization: any bearer token passes unless
  ``required_token`` is set; a request without one gets 401.

DynamicClient caches discovery in ``<tempfile.gettempdir()>/osrcp-<md5 of the
host URL>.json`` (:func:`discovery_cache_file`); ``start()`` and ``reset()``
delete this server's file so no test sees the kinds of an earlier one.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public")
SERVER_VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake", "platform": "linux/amd64"}
WATCH_HISTORY_LIMIT = 10_000
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
Json = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    custom: bool = False
    """Served from a CRD: no strategic merge patch, atomic lists in apply."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def store_key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def qualified_name(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery_entries(self) -> list[Json]:
        entries: list[Json] = [{
            "name": self.plural, "singularName": self.kind.lower(), "namespaced": self.namespaced,
            "kind": self.kind, "verbs": VERBS, "shortNames": list(self.short_names),
        }]
        for sub in self.subresources:
            entry = {"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced,
                     "kind": self.kind, "verbs": ["get", "patch", "update"]}
            if sub == "scale":
                entry.update(group="autoscaling", version="v1", kind="Scale")
            entries.append(entry)
        return entries


_S, _SS = ("status",), ("status", "scale")
BUILTIN_TYPES = [
    ResourceType(*row[:6], subresources=row[6], custom=row[0] == "snapshot.storage.k8s.io") for row in [
        # group, version, plural, kind, namespaced, short names, subresources
        ("", "v1", "namespaces", "Namespace", False, ("ns",), _S),
        ("", "v1", "pods", "Pod", True, ("po",), _S),
        ("", "v1", "services", "Service", True, ("svc",), _S),
        ("", "v1", "configmaps", "ConfigMap", True, ("cm",), ()),
        ("", "v1", "secrets", "Secret", True, (), ()),
        ("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",), ()),
        ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), _S),
        ("", "v1", "persistentvolumes", "PersistentVolume", False, ("pv",), _S),
        ("", "v1", "nodes", "Node", False, ("no",), _S),
        ("", "v1", "events", "Event", True, ("ev",), ()),
        ("", "v1", "resourcequotas", "ResourceQuota", True, ("quota",), _S),
        ("", "v1", "limitranges", "LimitRange", True, ("limits",), ()),
        ("", "v1", "endpoints", "Endpoints", True, ("ep",), ()),
        ("apps", "v1", "deployments", "Deployment", True, ("deploy",), _SS),
        ("apps", "v1", "statefulsets", "StatefulSet", True, ("sts",), _SS),
        ("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), _S),
        ("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",), _SS),
        ("batch", "v1", "jobs", "Job", True, (), _S),
        ("batch", "v1", "cronjobs", "CronJob", True, ("cj",), _S),
        ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",), ()),
        ("networking.k8s.io", "v1", "ingresses", "Ingress", True, ("ing",), _S),
        ("networking.k8s.io", "v1", "ingressclasses", "IngressClass", False, (), ()),
        ("rbac.authorization.k8s.io", "v1", "roles", "Role", True, (), ()),
        ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, (), ()),
        ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, (), ()),
        ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False, (), ()),
        ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("pdb",), _S),
        ("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ("hpa",), _S),
        ("storage.k8s.io", "v1", "storageclasses", "StorageClass", False, ("sc",), ()),
        ("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
         ("crd", "crds"), _S),
        ("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot", True, ("vs",), _S),
        ("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", "VolumeSnapshotClass", False,
         ("vsclass", "vsclasses"), ()),
        ("snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", "VolumeSnapshotContent", False,
         ("vsc", "vscs"), _S),
    ]
]
NAMESPACES = BUILTIN_TYPES[0]
CRDS = next(t for t in BUILTIN_TYPES if t.kind == "CustomResourceDefinition")

FIELD_LABELS: dict[tuple[str, str], set[str]] = {
    ("", "pods"): {"spec.nodeName", "spec.restartPolicy", "spec.serviceAccountName", "status.phase", "status.podIP"},
    ("", "events"): {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                     "involvedObject.uid", "involvedObject.apiVersion", "reason", "type", "source"},
    ("", "secrets"): {"type"},
    ("", "namespaces"): {"status.phase"},
    ("", "nodes"): {"spec.unschedulable"},
    ("batch", "jobs"): {"status.successful"},
}

# patchMergeKey of the built-in list fields, used by strategic merge and apply.
LIST_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name", "conditions": "type",
    "volumeClaimTemplates": "name", "hostAliases": "ip", "ownerReferences": "uid",
}


class ApiError(Exception):
    """An error answered as a ``Status`` object."""

    REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
               405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
               422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 details: Json | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or self.REASONS.get(code, "Unknown")
        self.details = details
        self.headers = headers or {}

    def status(self) -> Json:
        status: Json = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            status["details"] = self.details
        return status


def _details(rtype: ResourceType, name: str, **extra: Any) -> Json:
    details = {"name": name, "kind": rtype.plural, **extra}
    if rtype.group:
        details["group"] = rtype.group
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rtype.qualified_name} "{name}" not found', details=_details(rtype, name))


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, f'Operation cannot be fulfilled on {rtype.qualified_name} "{name}": {why}',
                    details=_details(rtype, name))


def invalid(rtype: ResourceType, name: str, field: str, cause: str, detail: str) -> ApiError:
    details = {"name": name, "kind": rtype.kind, "group": rtype.group,
               "causes": [{"reason": cause, "message": detail, "field": field}]}
    return ApiError(422, f'{rtype.kind} "{name}" is invalid: {field}: {detail}', details=details)


def discovery_cache_file(host: str) -> Path:
    """Where ``kubernetes.dynamic`` caches discovery for ``host`` (its ``configuration.host``)."""
    digest = hashlib.md5(host.encode("utf-8"), usedforsecurity=False).hexdigest()
    return Path(tempfile.gettempdir()) / f"osrcp-{digest}.json"


# ---- selectors -------------------------------------------------------------------------------

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_REQUIREMENT = re.compile(
    rf"^(?:!\s*(?P<absent>{_KEY})"
    rf"|(?P<key>{_KEY})\s*(?:(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)"
    rf"|\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?)$"
)
Predicate = Callable[[Json], bool]


def _split_outside_parens(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def label_selector(text: str) -> Predicate:
    """Parse a label selector; raises ApiError 400 on bad syntax."""
    checks: list[Predicate] = []
    for part in (p.strip() for p in _split_outside_parens(text) if p.strip()):
        found = _REQUIREMENT.match(part)
        if not found:
            raise ApiError(400, f"unable to parse requirement: {part!r} in label selector {text!r}")
        checks.append(_requirement(found))
    return lambda labels: all(check(labels) for check in checks)


def _requirement(found: re.Match[str]) -> Predicate:
    if found["absent"]:
        return lambda labels, key=found["absent"]: key not in labels
    key = found["key"]
    if found["op"]:
        wanted = found["value"]
        if found["op"] == "!=":
            return lambda labels: labels.get(key) != wanted
        return lambda labels: labels.get(key) == wanted
    if found["setop"]:
        values = {v.strip() for v in found["values"].split(",") if v.strip()}
        if found["setop"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    return lambda labels: key in labels


def field_selector(rtype: ResourceType, text: str) -> Predicate:
    supported = {"metadata.name", "metadata.namespace"} | FIELD_LABELS.get(rtype.store_key, set())
    checks: list[Predicate] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        found = re.fullmatch(r"([A-Za-z.]+)\s*(==|=|!=)\s*(.*)", part)
        if not found:
            raise ApiError(400, f"invalid field selector: {part!r}")
        field, op, wanted = found.groups()
        if field not in supported:
            raise ApiError(400, f"field label not supported: {field}")
        equal = op != "!="
        checks.append(lambda obj, f=field, w=wanted, eq=equal: (_field_text(obj, f) == w) == eq)
    return lambda obj: all(check(obj) for check in checks)


def _field_text(obj: Json, dotted: str) -> str:
    value: Any = obj
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


# ---- patches ---------------------------------------------------------------------------------

def list_merge_key(field: str, items: Any) -> str | None:
    """The key a built-in list of objects is merged by, or None for an atomic list."""
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        return None
    if field == "ports":
        key = "containerPort" if all("containerPort" in i for i in items) else "port"
    else:
        key = LIST_MERGE_KEYS.get(field)
    if key is None or not all(key in i or i.get("$patch") == "delete" for i in items):
        return None
    return key


def merge(target: Any, patch: Any, keyed: bool) -> Any:
    """RFC 7386 merge patch; with ``keyed``, lists of built-in objects merge by their merge key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if keyed and key.startswith("$"):
            continue  # strategic merge directives ($patch, $setElementOrder/...) are not kept
        merge_key = list_merge_key(key, value) if keyed else None
        if value is None:
            result.pop(key, None)
        elif merge_key and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, merge_key)
        else:
            result[key] = merge(result.get(key), value, keyed)
    return result


def _merge_list(current: list[Any], patch: list[Json], merge_key: str) -> list[Any]:
    result = copy.deepcopy(current)
    for item in patch:
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, dict) and old.get(merge_key) == item.get(merge_key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(merge({}, item, True))
        else:
            result[index] = merge(result[index], item, True)
    return result


def json_patch(target: Json, operations: Any) -> Json:
    """RFC 6902 add, remove, replace and test."""
    if not isinstance(operations, list):
        raise ApiError(400, "a JSON patch must be a list of operations")
    result = copy.deepcopy(target)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path", "")
        keys = [k.replace("~1", "/").replace("~0", "~") for k in path.split("/")[1:]]
        if not keys:
            raise ApiError(422, f"JSON patch: cannot {op} the whole object")
        parent = result
        for key in keys[:-1]:
            parent = _child(parent, key, path)
        last = keys[-1]
        if op == "test":
            if _child(parent, last, path) != operation.get("value"):
                raise ApiError(422, f"JSON patch: test failed at {path}")
        elif op == "remove":
            _child(parent, last, path)
            del parent[int(last) if isinstance(parent, list) else last]
        elif op in ("add", "replace"):
            value = copy.deepcopy(operation.get("value"))
            if isinstance(parent, list):
                if op == "add":
                    parent.insert(len(parent) if last == "-" else int(last), value)
                else:
                    _child(parent, last, path)
                    parent[int(last)] = value
            else:
                if op == "replace":
                    _child(parent, last, path)
                parent[last] = value
        else:
            raise ApiError(422, f"JSON patch: unsupported operation {op!r}")
    return result


def _child(node: Any, key: str, path: str) -> Any:
    try:
        return node[int(key)] if isinstance(node, list) else node[key]
    except (KeyError, IndexError, ValueError, TypeError):
        raise ApiError(422, f"JSON patch: path {path} does not exist") from None


# ---- server-side apply field ownership ----------------------------------------------------------

ITEM = object()
"""Value of a path that names a list item itself (``k:{"name":"x"}`` with ``.`` in FieldsV1)."""
IDENTITY_FIELDS = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"),
                   ("metadata", "resourceVersion"), ("metadata", "managedFields"), ("metadata", "uid"),
                   ("metadata", "generation"), ("metadata", "creationTimestamp")}
FieldPath = tuple[Any, ...]


def field_paths(obj: Json, keyed: bool, prefix: FieldPath = ()) -> dict[FieldPath, Any]:
    """Leaf paths of an applied configuration with their values; list items are ``("k", key, value)``."""
    paths: dict[FieldPath, Any] = {}
    for key, value in obj.items():
        path = (*prefix, key)
        if path in IDENTITY_FIELDS:
            continue
        merge_key = list_merge_key(key, value) if keyed else None
        if isinstance(value, dict) and value:
            paths.update(field_paths(value, keyed, path))
        elif merge_key:
            for item in value:
                item_path = (*path, ("k", merge_key, item[merge_key]))
                paths[item_path] = ITEM
                paths.update(field_paths(item, keyed, item_path))
        else:
            paths[path] = value
    return paths


def value_at(obj: Any, path: FieldPath) -> Any:
    for segment in path:
        if isinstance(segment, tuple):
            _, key, wanted = segment
            obj = next((i for i in obj if isinstance(i, dict) and i.get(key) == wanted), ITEM) \
                if isinstance(obj, list) else ITEM
        else:
            obj = obj.get(segment, ITEM) if isinstance(obj, dict) else ITEM
        if obj is ITEM:
            return ITEM
    return obj


def remove_path(obj: Json, path: FieldPath) -> None:
    parent = value_at(obj, path[:-1])
    last = path[-1]
    if isinstance(last, tuple) and isinstance(parent, list):
        parent[:] = [i for i in parent if not (isinstance(i, dict) and i.get(last[1]) == last[2])]
    elif isinstance(parent, dict):
        parent.pop(last, None)


def fields_v1(paths: set[FieldPath]) -> Json:
    tree: Json = {}
    for path in paths:
        node = tree
        for segment in path:
            name = (f"k:{json.dumps({segment[1]: segment[2]}, separators=(',', ':'))}"
                    if isinstance(segment, tuple) else f"f:{segment}")
            node = node.setdefault(name, {})
        if isinstance(path[-1], tuple):
            node["."] = {}
    return tree


def paths_of_fields_v1(tree: Json, prefix: FieldPath = ()) -> set[FieldPath]:
    paths: set[FieldPath] = set()
    for name, sub in tree.items():
        if name == ".":
            paths.add(prefix)
            continue
        if name.startswith("k:"):
            (key, value), = json.loads(name[2:]).items()
            segment: Any = ("k", key, value)
        else:
            segment = name[2:]
        paths |= paths_of_fields_v1(sub, (*prefix, segment)) if sub else {(*prefix, segment)}
    return paths


# ---- the cluster state -----------------------------------------------------------------------

@dataclass(frozen=True)
class WatchEvent:
    resource_version: int
    type: str
    store_key: tuple[str, str]
    namespace: str
    obj: Json
    previous: Json | None = None


_NAME_RULES = {
    "label": (re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"), 63,
              "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"),
    "subdomain": (re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"), 253,
                  "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
                  "'-' or '.'"),
    "segment": (re.compile(r"[^/%]+"), 253, "may not contain '/' or '%'"),
}


def _name_rule(rtype: ResourceType) -> str:
    if rtype.plural in ("namespaces", "services"):
        return "label"
    return "segment" if rtype.group == "rbac.authorization.k8s.io" else "subdomain"


def _content(obj: Json) -> Json:
    """What generation tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class ClusterState:
    """Objects, resource types and watch history behind one lock."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.resource_version = 0
        self.epoch = 0
        self.stopping = False
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.types: dict[tuple[str, str, str], ResourceType] = {
                (t.group, t.version, t.plural): t for t in BUILTIN_TYPES}
            self.crd_types: dict[str, list[tuple[str, str, str]]] = {}
            self.objects: dict[tuple[str, str], dict[tuple[str, str], Json]] = {}
            self.events: list[WatchEvent] = []
            self.oldest_watchable = self.resource_version + 1  # a watch from before lost the deletions
            self.epoch += 1
            for name in SYSTEM_NAMESPACES:
                self.create(NAMESPACES, None, {"metadata": {"name": name}})
            self.changed.notify_all()

    def _now(self) -> str:
        return self.clock().astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    # -- types

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def resolve(self, api_version: str, kind_or_plural: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        for rtype in self.types.values():
            if (rtype.group, rtype.version) == (group, version) and kind_or_plural in (rtype.kind, rtype.plural):
                return rtype
        raise KeyError(f"no resource type {kind_or_plural} in {api_version}")

    def _register_crd(self, crd: Json) -> None:
        self._unregister_crd(crd["metadata"]["name"])
        spec = crd["spec"]
        names = spec["names"]
        keys = []
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = tuple(s for s in ("status",) if s in (version.get("subresources") or {}))
            rtype = ResourceType(spec["group"], version["name"], names["plural"], names["kind"],
                                 spec["scope"] == "Namespaced", tuple(names.get("shortNames", ())),
                                 subresources, custom=True)
            keys.append((rtype.group, rtype.version, rtype.plural))
            self.types[keys[-1]] = rtype
        self.crd_types[crd["metadata"]["name"]] = keys

    def _unregister_crd(self, name: str) -> None:
        for key in self.crd_types.pop(name, []):
            self.types.pop(key, None)

    def _check_crd(self, crd: Json) -> None:
        spec, name = crd.get("spec") or {}, crd["metadata"]["name"]
        names = spec.get("names") or {}
        for field, value in (("spec.group", spec.get("group")), ("spec.names.plural", names.get("plural")),
                             ("spec.names.kind", names.get("kind")), ("spec.versions", spec.get("versions"))):
            if not value:
                raise invalid(CRDS, name, field, "FieldValueRequired", "Required value")
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            raise invalid(CRDS, name, "spec.scope", "FieldValueNotSupported",
                          'Unsupported value: supported values: "Cluster", "Namespaced"')
        if name != f"{names['plural']}.{spec['group']}":
            raise invalid(CRDS, name, "metadata.name", "FieldValueInvalid",
                          f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')
        accepted = {"plural": names["plural"], "singular": names.get("singular", names["kind"].lower()),
                    "kind": names["kind"], "listKind": names.get("listKind", names["kind"] + "List")}
        stored = [v["name"] for v in spec["versions"] if v.get("storage")] or [spec["versions"][0]["name"]]
        crd["status"] = {"acceptedNames": accepted, "storedVersions": stored, "conditions": [
            {"type": kind, "status": "True", "reason": reason, "message": message,
             "lastTransitionTime": crd["metadata"].get("creationTimestamp", self._now())}
            for kind, reason, message in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                          ("Established", "InitialNamesAccepted",
                                           "the initial names have been accepted"))]}

    # -- reading

    def _bucket(self, rtype: ResourceType) -> dict[tuple[str, str], Json]:
        return self.objects.setdefault(rtype.store_key, {})

    def stored(self, rtype: ResourceType, namespace: str | None, name: str) -> Json:
        obj = self._bucket(rtype).get((namespace or "", name))
        if obj is None:
            raise not_found(rtype, name)
        return obj

    @staticmethod
    def present(rtype: ResourceType, obj: Json) -> Json:
        return {**copy.deepcopy(obj), "apiVersion": rtype.api_version, "kind": rtype.kind}

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> Json:
        with self.lock:
            return self.present(rtype, self.stored(rtype, namespace, name))

    def selector(self, rtype: ResourceType, query: dict[str, str]) -> Predicate:
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(rtype, query.get("fieldSelector", ""))
        return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)

    def list(self, rtype: ResourceType, namespace: str | None, query: dict[str, str]) -> Json:
        matches = self.selector(rtype, query)
        with self.lock:
            found = sorted((key, obj) for key, obj in self._bucket(rtype).items()
                           if (namespace is None or key[0] == namespace) and matches(obj))
            meta: Json = {"resourceVersion": str(self.resource_version)}
            found = [(key, self.present(rtype, obj)) for key, obj in found]
        if query.get("continue"):
            try:
                start = tuple(json.loads(base64.b64decode(query["continue"]))["start"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, f"invalid continue token: {query['continue']}") from None
            found = [(key, obj) for key, obj in found if key > start]
        limit = int(query.get("limit") or 0)
        if 0 < limit < len(found):
            token = json.dumps({"start": list(found[limit - 1][0]), "rv": meta["resourceVersion"]})
            meta.update({"continue": base64.b64encode(token.encode()).decode(),
                         "remainingItemCount": len(found) - limit})
            found = found[:limit]
        items = [obj for _, obj in found]
        if not rtype.custom:
            items = [{k: v for k, v in item.items() if k not in ("apiVersion", "kind")} for item in items]
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": meta, "items": items}

    # -- writing

    def _bump(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def _record(self, rtype: ResourceType, kind: str, obj: Json, previous: Json | None = None) -> None:
        self.events.append(WatchEvent(self.resource_version, kind, rtype.store_key,
                                      obj["metadata"].get("namespace", ""), obj, previous))
        if len(self.events) > WATCH_HISTORY_LIMIT:
            self.oldest_watchable = self.events.pop(0).resource_version
        self.changed.notify_all()

    def _checked_body(self, rtype: ResourceType, body: Any) -> Json:
        if not isinstance(body, dict):
            raise ApiError(400, f"the body of a {rtype.kind} must be an object")
        obj = copy.deepcopy(body)
        if obj.get("apiVersion", rtype.api_version) != rtype.api_version:
            raise ApiError(400, f"the API version in the data ({obj['apiVersion']}) does not match "
                                f"the expected API version ({rtype.api_version})")
        if obj.get("kind", rtype.kind) != rtype.kind:
            raise ApiError(400, f"the kind in the data ({obj['kind']}) does not match "
                                f"the expected kind ({rtype.kind})")
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if not isinstance(obj.setdefault("metadata", {}), dict):
            raise ApiError(400, "metadata must be an object")
        return obj

    def _validate_name(self, rtype: ResourceType, name: Any) -> None:
        if not name:
            raise invalid(rtype, "", "metadata.name", "FieldValueRequired",
                          "Required value: name or generateName is required")
        pattern, longest, rule = _NAME_RULES[_name_rule(rtype)]
        if not isinstance(name, str) or len(name) > longest or not pattern.fullmatch(name) or name in (".", ".."):
            raise invalid(rtype, str(name), "metadata.name", "FieldValueInvalid",
                          f'Invalid value: "{name}": {rule}')

    def create(self, rtype: ResourceType, namespace: str | None, body: Any, *, dry_run: bool = False,
               managed_fields: list[Json] | None = None, direct: bool = False) -> Json:
        """POST; ``direct`` (test hook) keeps status and skips the namespace check."""
        with self.lock:
            obj = self._checked_body(rtype, body)
            meta = obj["metadata"]
            if rtype.namespaced:
                if namespace and meta.get("namespace", namespace) != namespace:
                    raise ApiError(400, "the namespace of the provided object does not match "
                                        "the namespace sent on the request")
                namespace = namespace or meta.get("namespace") or "default"
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            self._validate_name(rtype, meta.get("name"))
            if meta.get("resourceVersion") and not direct:
                raise ApiError(400, "resourceVersion should not be set on objects to be created")
            if rtype.namespaced and not direct and ("", namespace) not in self._bucket(NAMESPACES):
                raise not_found(NAMESPACES, namespace)
            if (namespace or "", meta["name"]) in self._bucket(rtype):
                raise ApiError(409, f'{rtype.qualified_name} "{meta["name"]}" already exists',
                               reason="AlreadyExists", details=_details(rtype, meta["name"]))
            for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
                meta.pop(key, None)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=self._now(), generation=1,
                        managedFields=managed_fields or [])
            if not meta["managedFields"]:
                del meta["managedFields"]
            if "status" in rtype.subresources and not direct:
                obj.pop("status", None)
            self._default(rtype, obj)
            if dry_run:
                return self.present(rtype, obj)
            meta["resourceVersion"] = self._bump()
            self._bucket(rtype)[(namespace or "", meta["name"])] = obj
            if rtype == CRDS:
                self._register_crd(obj)
            self._record(rtype, "ADDED", obj)
            return self.present(rtype, obj)

    def _default(self, rtype: ResourceType, obj: Json) -> None:
        meta = obj["metadata"]
        if rtype == NAMESPACES:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})
        elif rtype.store_key == ("", "pods"):
            obj.setdefault("status", {"phase": "Pending"})
        elif rtype == CRDS:
            self._check_crd(obj)

    def update(self, rtype: ResourceType, old: Json, new: Any, *, scope: str = "main", dry_run: bool = False,
               managed_fields: list[Json] | None = None) -> Json:
        """Store ``new`` over ``old``; ``scope`` is main (status kept), status (only status) or all (hook)."""
        with self.lock:
            new = self._checked_body(rtype, new)
            old_meta, meta = old["metadata"], new["metadata"]
            if meta.get("resourceVersion") and meta["resourceVersion"] != old_meta["resourceVersion"]:
                raise conflict(rtype, old_meta["name"], "the object has been modified; please apply your "
                                                       "changes to the latest version and try again")
            if meta.get("name", old_meta["name"]) != old_meta["name"]:
                raise ApiError(400, f"the name of the object ({meta['name']}) does not match the name on "
                                    f"the URL ({old_meta['name']})")
            if scope == "status":
                result = copy.deepcopy(old)
                result["status"] = new.get("status")
                if result["status"] is None:
                    del result["status"]
            else:
                result = new
                if scope == "main" and "status" in rtype.subresources:
                    result.pop("status", None)
                    if "status" in old:
                        result["status"] = copy.deepcopy(old["status"])
                kept = ["uid", "creationTimestamp", "generation", "namespace", "name"]
                if scope == "main" or "managedFields" not in meta:
                    kept.append("managedFields")
                if scope == "main":
                    kept += ["deletionTimestamp", "deletionGracePeriodSeconds"]
                for key in kept:
                    meta.pop(key, None)
                    if key in old_meta:
                        meta[key] = copy.deepcopy(old_meta[key])
            if managed_fields is not None:
                result["metadata"]["managedFields"] = managed_fields
            result["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
            self._default(rtype, result)
            if result == old:
                return self.present(rtype, old)
            if _content(result) != _content(old):
                result["metadata"]["generation"] = old_meta.get("generation", 1) + 1
            if dry_run:
                return self.present(rtype, result)
            if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
                return self._remove(rtype, result)
            result["metadata"]["resourceVersion"] = self._bump()
            self._bucket(rtype)[(result["metadata"].get("namespace", ""), old_meta["name"])] = result
            if rtype == CRDS:
                self._register_crd(result)
            self._record(rtype, "MODIFIED", result, old)
            return self.present(rtype, result)

    def replace(self, rtype: ResourceType, namespace: str | None, name: str, body: Any, *,
                subresource: str | None, dry_run: bool) -> Json:
        with self.lock:
            old = self.stored(rtype, namespace, name)
            if subresource == "scale":
                return self.update_scale(rtype, old, body, dry_run=dry_run)
            return self.update(rtype, old, body, scope=subresource or "main", dry_run=dry_run)

    def patch(self, rtype: ResourceType, namespace: str | None, name: str, patch: Any, content_type: str, *,
              subresource: str | None, dry_run: bool) -> Json:
        with self.lock:
            old = self.stored(rtype, namespace, name)
            base = self.scale_of(rtype, old) if subresource == "scale" else self.present(rtype, old)
            if content_type == MERGE_PATCH:
                patched = merge(base, patch, keyed=False)
            elif content_type == STRATEGIC_MERGE_PATCH and not rtype.custom:
                patched = merge(base, patch, keyed=True)
            elif content_type == JSON_PATCH:
                patched = json_patch(base, patch)
            else:
                accepted = [JSON_PATCH, MERGE_PATCH, APPLY_PATCH] + ([] if rtype.custom else [STRATEGIC_MERGE_PATCH])
                raise ApiError(415, f"the body of the request was in an unknown format - accepted media types "
                                    f"include: {', '.join(accepted)}")
            if subresource == "scale":
                return self.update_scale(rtype, old, patched, dry_run=dry_run)
            return self.update(rtype, old, patched, scope=subresource or "main", dry_run=dry_run)

    def apply(self, rtype: ResourceType, namespace: str | None, name: str, applied: Any, *,
              subresource: str | None, manager: str, force: bool, dry_run: bool) -> tuple[int, Json]:
        """Server-side apply; returns (201, created) or (200, updated)."""
        with self.lock:
            applied = self._checked_body(rtype, applied)
            if applied["metadata"].get("name", name) != name:
                raise ApiError(400, f"the name of the object ({applied['metadata']['name']}) does not match "
                                    f"the name on the URL ({name})")
            applied["metadata"]["name"] = name
            scope = subresource or ""
            part = ({"status": applied.get("status") or {}} if scope == "status" else
                    {k: v for k, v in applied.items() if k != "status" or "status" not in rtype.subresources})
            paths = field_paths(part, keyed=not rtype.custom)
            entry = {"manager": manager, "operation": "Apply", "apiVersion": rtype.api_version,
                     "time": self._now(), "fieldsType": "FieldsV1", "fieldsV1": fields_v1(set(paths))}
            if scope:
                entry["subresource"] = scope
            existing = self._bucket(rtype).get((namespace or "", name))
            if existing is None:
                if scope:
                    raise not_found(rtype, name)
                return 201, self.create(rtype, namespace, part, dry_run=dry_run, managed_fields=[entry])
            owners = {(e["manager"], e.get("subresource", "")): paths_of_fields_v1(e.get("fieldsV1") or {})
                      for e in existing["metadata"].get("managedFields", []) if e.get("operation") == "Apply"}
            clashes = sorted({(other, path) for (other, other_scope), owned in owners.items()
                              if (other, other_scope) != (manager, scope)
                              for path in owned & paths.keys()
                              if paths[path] is not ITEM and value_at(existing, path) != paths[path]},
                             key=repr)
            if clashes and not force:
                raise self._apply_conflict(rtype, name, clashes)
            for other, path in clashes:
                for key in owners:
                    if key[0] == other:
                        owners[key].discard(path)
            merged = merge(self.present(rtype, existing), part, keyed=not rtype.custom)
            others = set().union(*(owned for key, owned in owners.items() if key != (manager, scope)))
            # Shallow first: a dropped list item goes whole, before its key field could be removed.
            for path in sorted(owners.get((manager, scope), set()) - paths.keys() - others, key=len):
                remove_path(merged, path)
            owners[(manager, scope)] = set(paths)
            managed = self._managed_fields(rtype, existing, owners, entry)
            return 200, self.update(rtype, existing, merged, scope=scope or "main", dry_run=dry_run,
                                    managed_fields=managed)

    @staticmethod
    def _apply_conflict(rtype: ResourceType, name: str, clashes: list[tuple[str, FieldPath]]) -> ApiError:
        def dotted(path: FieldPath) -> str:
            return "".join(f"[{s[1]}={s[2]}]" if isinstance(s, tuple) else f".{s}" for s in path)
        causes = [{"reason": "FieldManagerConflict", "message": f'conflict with "{m}"', "field": dotted(p)}
                  for m, p in clashes]
        listed = "\n".join(f'- conflict with "{m}": {dotted(p)}' for m, p in clashes)
        return ApiError(409, f"Apply failed with {len(clashes)} conflict(s):\n{listed}",
                        details=_details(rtype, name, causes=causes))

    @staticmethod
    def _managed_fields(rtype: ResourceType, existing: Json, owners: dict[tuple[str, str], set[FieldPath]],
                        entry: Json) -> list[Json]:
        """Apply entries after this apply; an entry keeps its time unless its fields changed."""
        result = []
        seen = set()
        for old in existing["metadata"].get("managedFields", []):
            key = (old["manager"], old.get("subresource", ""))
            if old.get("operation") != "Apply":
                result.append(old)
            elif key == (entry["manager"], entry.get("subresource", "")):
                seen.add(key)
                same = paths_of_fields_v1(old.get("fieldsV1") or {}) == owners[key]
                result.append(old if same else entry)
            elif owners.get(key):
                result.append({**old, "fieldsV1": fields_v1(owners[key])})
        if (entry["manager"], entry.get("subresource", "")) not in seen:
            result.append(entry)
        return result

    def scale_of(self, rtype: ResourceType, obj: Json) -> Json:
        match_labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        meta = {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in obj["metadata"]}
        return {"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": meta,
                "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 1)},
                "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                           "selector": ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))}}

    def update_scale(self, rtype: ResourceType, old: Json, scale: Any, *, dry_run: bool) -> Json:
        with self.lock:
            if not isinstance(scale, dict) or not isinstance((scale.get("spec") or {}).get("replicas"), int):
                raise ApiError(400, "a Scale needs an integer spec.replicas")
            wanted_rv = (scale.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
                raise conflict(rtype, old["metadata"]["name"], "the object has been modified; please apply "
                                                              "your changes to the latest version and try again")
            new = self.present(rtype, old)
            new.setdefault("spec", {})["replicas"] = scale["spec"]["replicas"]
            return self.scale_of(rtype, self.update(rtype, old, new, dry_run=dry_run))

    def delete(self, rtype: ResourceType, namespace: str | None, name: str, options: Any, *,
               dry_run: bool) -> Json:
        with self.lock:
            old = self.stored(rtype, namespace, name)
            preconditions = (options or {}).get("preconditions") or {} if isinstance(options, dict) else {}
            for key in ("uid", "resourceVersion"):
                if preconditions.get(key) and preconditions[key] != old["metadata"].get(key):
                    raise conflict(rtype, name, f"Precondition failed: {key} in precondition: "
                                                f"{preconditions[key]}, {key} in object meta: "
                                                f"{old['metadata'].get(key)}")
            success = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                       "details": _details(rtype, name, uid=old["metadata"]["uid"])}
            if old["metadata"].get("finalizers") and rtype != NAMESPACES:
                if old["metadata"].get("deletionTimestamp"):
                    return self.present(rtype, old)
                marked = copy.deepcopy(old)
                marked["metadata"].update(deletionTimestamp=self._now(), deletionGracePeriodSeconds=0)
                return self.update(rtype, old, marked, scope="all", dry_run=dry_run)
            if not dry_run:
                self._remove(rtype, old)
            return success

    def delete_collection(self, rtype: ResourceType, namespace: str | None, query: dict[str, str],
                          dry_run: bool) -> Json:
        with self.lock:
            for item in self.list(rtype, namespace, query)["items"]:
                self.delete(rtype, item["metadata"].get("namespace"), item["metadata"]["name"], None,
                            dry_run=dry_run)
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    def _remove(self, rtype: ResourceType, obj: Json) -> Json:
        """Delete at once: a namespace takes its content along, a CRD its kinds and objects."""
        meta = obj["metadata"]
        if rtype == NAMESPACES:
            for store_key, bucket in list(self.objects.items()):
                for key in [k for k in bucket if k[0] == meta["name"]]:
                    self._remove(self._any_type(store_key), bucket[key])
        if rtype == CRDS:
            spec = obj["spec"]
            for key, child in list(self.objects.get((spec["group"], spec["names"]["plural"]), {}).items()):
                self._remove(self._any_type((spec["group"], spec["names"]["plural"])), child)
            self._unregister_crd(meta["name"])
        del self._bucket(rtype)[(meta.get("namespace", ""), meta["name"])]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._bump()
        self._record(rtype, "DELETED", gone)
        return self.present(rtype, gone)

    def _any_type(self, store_key: tuple[str, str]) -> ResourceType:
        return next(t for t in self.types.values() if t.store_key == store_key)

    # -- watching

    def _rendered(self, rtype: ResourceType, namespace: str | None, matches: Predicate,
                  event: WatchEvent) -> Json | None:
        if event.store_key != rtype.store_key or (namespace and event.namespace != namespace):
            return None
        now = matches(event.obj)
        kind = event.type
        if kind == "MODIFIED":
            before = event.previous is not None and matches(event.previous)
            kind = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}.get((before, now))
        elif not now:
            kind = None
        return {"type": kind, "object": self.present(rtype, event.obj)} if kind else None

    def _events_after(self, cursor: int) -> list[WatchEvent]:
        start = len(self.events)
        while start > 0 and self.events[start - 1].resource_version > cursor:
            start -= 1
        return self.events[start:]

    def watch_start(self, rtype: ResourceType, namespace: str | None, matches: Predicate,
                    resource_version: str | None) -> tuple[list[Json], int | None, int]:
        """Events to send first, the cursor to wait from (None: the stream ends) and the epoch."""
        with self.lock:
            if resource_version in (None, "", "0"):
                objects = sorted((k, o) for k, o in self._bucket(rtype).items()
                                 if (not namespace or k[0] == namespace) and matches(o))
                return [{"type": "ADDED", "object": self.present(rtype, o)} for _, o in objects], \
                    self.resource_version, self.epoch
            if not resource_version.isdigit():
                raise ApiError(400, f"invalid resource version: {resource_version}")
            since = int(resource_version)
            if since < self.oldest_watchable:
                expired = ApiError(410, f"too old resource version: {since} ({self.oldest_watchable})")
                return [{"type": "ERROR", "object": expired.status()}], None, self.epoch
            events = [self._rendered(rtype, namespace, matches, e) for e in self._events_after(since)]
            return [e for e in events if e], max(since, self.resource_version), self.epoch

    def watch_wait(self, rtype: ResourceType, namespace: str | None, matches: Predicate, cursor: int,
                   epoch: int, deadline: float | None) -> tuple[list[Json], int, bool]:
        """Block until events come (returned with the new cursor) or the watch ends (open is False)."""
        with self.changed:
            while True:
                if self.stopping or self.epoch != epoch:
                    return [], cursor, False
                fresh = self._events_after(cursor)
                if fresh:
                    cursor = fresh[-1].resource_version
                    rendered = [r for e in fresh if (r := self._rendered(rtype, namespace, matches, e))]
                    if rendered:
                        return rendered, cursor, True
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return [], cursor, False
                self.changed.wait(remaining)

    # -- discovery

    def api_resource_list(self, group: str, version: str) -> Json | None:
        with self.lock:
            found = [t for (g, v, _), t in self.types.items() if (g, v) == (group, version)]
        if not found:
            return None
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": found[0].api_version,
                "resources": [entry for t in found for entry in t.discovery_entries()]}

    def api_groups(self) -> list[Json]:
        with self.lock:
            versions: dict[str, list[str]] = {}
            for group, version, _ in self.types:
                if group and version not in versions.setdefault(group, []):
                    versions[group].append(version)
        groups = []
        for group, names in versions.items():
            listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in names]
            groups.append({"name": group, "versions": listed, "preferredVersion": listed[0]})
        return groups


# ---- HTTP ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    """Parsed JSON or YAML, or the raw text when it did not parse, or None."""


@dataclass
class InjectedFailure:
    method: str
    path_pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: float | None
    message: str


@dataclass(frozen=True)
class Target:
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


def _parse_body(raw: bytes, content_type: str | None) -> tuple[Any, ApiError | None]:
    """The body as JSON (or YAML for apply), else its raw text and the 400 to answer."""
    if not raw.strip():
        return None, None
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text), None
    except json.JSONDecodeError:
        if content_type == APPLY_PATCH:
            try:
                return yaml.safe_load(text), None
            except yaml.YAMLError:
                pass
    language = "YAML" if content_type == APPLY_PATCH else "JSON"
    return text, ApiError(400, f"the body of the request could not be decoded as {language}")


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true", "t")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() or None
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body, bad_body = _parse_body(raw, content_type)
        fake._record(RecordedRequest(self.command, url.path, query, content_type, body))
        try:
            fake._raise_injected(self.command, url.path)
            if bad_body:
                raise bad_body
            fake._authenticate(self.headers.get("Authorization"))
            self._serve(fake, url.path.rstrip("/") or "/", query, body, content_type)
        except ApiError as error:
            self._send(error.code, error.status(), error.headers)
        except Exception as error:  # noqa: BLE001 - a bug in the fake must reach the test as a 500
            self._send(500, ApiError(500, f"fake kube-apiserver: {error!r}").status())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, fake: KubeApiServer, path: str, query: dict[str, str], body: Any,
               content_type: str | None) -> None:
        state = fake.state
        if self.command == "GET":
            discovery = self._discovery(state, path)
            if discovery is not None:
                self._send(200, discovery)
                return
        target = self._target(state, path)
        dry_run = query.get("dryRun") == "All"
        if query.get("dryRun", "All") != "All":
            raise ApiError(400, f"Invalid dry run value: {query['dryRun']}")
        rtype, namespace, name, sub = target.rtype, target.namespace, target.name, target.subresource
        method = self.command
        if method == "GET" and name is None:
            if _flag(query, "watch"):
                self._watch(fake, target, query)
            else:
                self._send(200, state.list(rtype, namespace, query))
        elif method == "GET":
            obj = state.get(rtype, namespace, name)
            self._send(200, state.scale_of(rtype, obj) if sub == "scale" else obj)
        elif method == "POST" and name is None and (namespace or not rtype.namespaced):
            self._send(201, state.create(rtype, namespace, body, dry_run=dry_run))
        elif method == "PUT" and name is not None:
            self._send(200, state.replace(rtype, namespace, name, body, subresource=sub, dry_run=dry_run))
        elif method == "PATCH" and name is not None and content_type == APPLY_PATCH:
            if not query.get("fieldManager"):
                raise ApiError(400, "fieldManager is required for apply requests")
            if sub == "scale":
                raise ApiError(415, "apply to the scale subresource is not supported by this fake")
            code, obj = state.apply(rtype, namespace, name, body, subresource=sub, manager=query["fieldManager"],
                                    force=_flag(query, "force"), dry_run=dry_run)
            self._send(code, obj)
        elif method == "PATCH" and name is not None:
            self._send(200, state.patch(rtype, namespace, name, body, content_type or "", subresource=sub,
                                        dry_run=dry_run))
        elif method == "DELETE" and name is not None and sub is None:
            dry_run = dry_run or (isinstance(body, dict) and body.get("dryRun") == ["All"])
            self._send(200, state.delete(rtype, namespace, name, body, dry_run=dry_run))
        elif method == "DELETE" and name is None:
            self._send(200, state.delete_collection(rtype, namespace, query, dry_run))
        else:
            raise ApiError(405, "the server does not allow this method on the requested resource")

    @staticmethod
    def _discovery(state: ClusterState, path: str) -> Json | None:
        if path == "/version":
            return SERVER_VERSION
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if path == "/api/v1":
            return state.api_resource_list("", "v1")
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": state.api_groups()}
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2:
            group = next((g for g in state.api_groups() if g["name"] == parts[1]), None)
            return {"kind": "APIGroup", "apiVersion": "v1", **group} if group else None
        if parts[0] == "apis" and len(parts) == 3:
            return state.api_resource_list(parts[1], parts[2])
        return None

    @staticmethod
    def _target(state: ClusterState, path: str) -> Target:
        missing = ApiError(404, "the server could not find the requested resource")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise missing
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            inner = state.lookup(group, version, rest[2])
            if inner is not None and inner.namespaced:
                namespace, rest = rest[1], rest[2:]
        rtype = state.lookup(group, version, rest[0]) if rest else None
        if rtype is None or len(rest) > 3:
            raise missing
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if (rtype.namespaced and namespace is None and name is not None) or (sub and sub not in rtype.subresources):
            raise missing
        return Target(rtype, namespace, name, sub)

    def _watch(self, fake: KubeApiServer, target: Target, query: dict[str, str]) -> None:
        state, rtype, namespace = fake.state, target.rtype, target.namespace
        matches = state.selector(rtype, query)
        if not query.get("timeoutSeconds", "0").isdigit():
            raise ApiError(400, f"timeoutSeconds must be a whole number of seconds: {query['timeoutSeconds']}")
        timeout = int(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = None if timeout is None else time.monotonic() + timeout
        events, cursor, epoch = state.watch_start(rtype, namespace, matches, query.get("resourceVersion"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                for event in events:
                    self._chunk(json.dumps(event).encode() + b"\n")
                if cursor is None:
                    break
                events, cursor, still_open = state.watch_wait(rtype, namespace, matches, cursor, epoch, deadline)
                if not still_open:
                    if _flag(query, "allowWatchBookmarks") and deadline is not None:
                        bookmark = {"kind": rtype.kind, "apiVersion": rtype.api_version,
                                    "metadata": {"resourceVersion": str(state.resource_version)}}
                        self._chunk(json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n")
                    break
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: KubeApiServer


class KubeApiServer:
    """The fake API server on ``host:port`` (0: a free port) with hooks for tests.

    ``required_token``: when set, only ``Authorization: Bearer <that token>``
    passes; otherwise any bearer token does. A request without one gets 401.
    ``clock`` gives creation and deletion timestamps (UTC now by default).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, required_token: str | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.host = host
        self.port = port
        self.default_required_token = required_token
        self.required_token = required_token
        self.state = ClusterState(clock or (lambda: datetime.now(timezone.utc)))
        self.requests: list[RecordedRequest] = []
        self._failures: list[InjectedFailure] = []
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def discovery_cache_file(self) -> Path:
        return discovery_cache_file(self.url)

    def start(self) -> KubeApiServer:
        self._http = _HttpServer((self.host, self.port), _Handler)
        self._http.fake = self
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kube-api", daemon=True)
        self._thread.start()
        self.discovery_cache_file.unlink(missing_ok=True)
        return self

    def stop(self) -> None:
        with self.state.lock:
            self.state.stopping = True
            self.state.changed.notify_all()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout=5)
            self._http = None
        self.discovery_cache_file.unlink(missing_ok=True)

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Empty store (but the system namespaces), built-in kinds only, no log, no failures; open watches end."""
        with self.state.lock:
            self.state.reset()
            self.requests.clear()
            self._failures.clear()
            self.required_token = self.default_required_token
        self.discovery_cache_file.unlink(missing_ok=True)

    def kubeconfig(self, token: str = "fake-token", context: str = "fake") -> Json:
        return {"apiVersion": "v1", "kind": "Config", "current-context": context,
                "clusters": [{"name": context, "cluster": {"server": self.url}}],
                "users": [{"name": context, "user": {"token": token}}],
                "contexts": [{"name": context, "context": {"cluster": context, "user": context,
                                                           "namespace": "default"}}]}

    # -- hooks for tests playing the controllers

    def put_object(self, obj: Json) -> Json:
        """Insert or replace ``obj`` as is (status too, no namespace check), assigning metadata."""
        state = self.state
        rtype = state.resolve(obj["apiVersion"], obj["kind"])
        meta = obj.get("metadata") or {}
        namespace = (meta.get("namespace") or "default") if rtype.namespaced else ""
        with state.lock:
            old = state._bucket(rtype).get((namespace, meta.get("name")))
            body = {**obj, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
            if old is None:
                return state.create(rtype, namespace or None, body, direct=True)
            return state.update(rtype, old, body, scope="all")

    def get_object(self, api_version: str, kind_or_plural: str, name: str, namespace: str | None = None) -> Json | None:
        rtype = self.state.resolve(api_version, kind_or_plural)
        try:
            return self.state.get(rtype, namespace, name)
        except ApiError:
            return None

    def set_status(self, api_version: str, plural: str, name: str, namespace: str | None, status: Json) -> Json:
        """Replace the status as a controller would (new resourceVersion, MODIFIED event)."""
        state = self.state
        rtype = state.resolve(api_version, plural)
        with state.lock:
            old = state.stored(rtype, namespace, name)
            return state.update(rtype, old, {**state.present(rtype, old), "status": status}, scope="all")

    def delete_object(self, api_version: str, kind_or_plural: str, name: str, namespace: str | None = None) -> None:
        """Remove at once, as if every finalizer had run."""
        state = self.state
        rtype = state.resolve(api_version, kind_or_plural)
        with state.lock:
            state._remove(rtype, state.stored(rtype, namespace, name))

    def fail_next(self, method: str, path_regex: str, status: int, times: int = 1, *,
                  retry_after: float | None = None, message: str | None = None) -> None:
        """Answer the next ``times`` requests matching (``method`` or "*", ``re.search`` on the path) with
        ``status`` and a Status body (and ``Retry-After`` when given)."""
        with self.state.lock:
            self._failures.append(InjectedFailure(method.upper(), re.compile(path_regex), status, times,
                                                  retry_after, message or f"injected failure {status}"))

    def _raise_injected(self, method: str, path: str) -> None:
        with self.state.lock:
            for failure in self._failures:
                if failure.method in ("*", method) and failure.path_pattern.search(path):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    headers = {} if failure.retry_after is None else {"Retry-After": f"{failure.retry_after:g}"}
                    raise ApiError(failure.status, failure.message, headers=headers)

    def _authenticate(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token or (self.required_token and token != self.required_token):
            raise ApiError(401, "Unauthorized")

    def _record(self, request: RecordedRequest) -> None:
        with self.state.lock:
            self.requests.append(request)
