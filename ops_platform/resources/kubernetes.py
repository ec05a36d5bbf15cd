"""The one Kubernetes client wrapper of the project.

:class:`KubernetesClient` is plain Python around the official client's
``DynamicClient`` so that any kind, built-in or custom, is handled the same
way: get, list with selectors, server-side apply (with dry run), status patch,
delete and wait-until. :class:`KubernetesResource` is the Dagster resource that
builds it from a kubeconfig (``KUBECONFIG`` / ``OPS_KUBE_CONTEXT``) or from the
pod's service account.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import dagster as dg
from pydantic import Field

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError

# The kubernetes package takes a third of a second to import: it is imported
# when a client is made, not when the code location loads.
if TYPE_CHECKING:
    from kubernetes import client as k8s_client
    from kubernetes.client.exceptions import ApiException
    from kubernetes.dynamic import DynamicClient

FIELD_MANAGER = "ops-platform"
CLUSTER_SETTING = "KUBECONFIG / OPS_KUBE_CONTEXT"
# Fields the API server owns; ignored when deciding whether an apply changed anything.
_SERVER_FIELDS = ("resourceVersion", "generation", "managedFields", "uid", "creationTimestamp")


class KubernetesError(OpsPlatformError):
    """The API server refused or failed a request."""


class KindNotServed(KubernetesError):
    """The cluster's discovery does not know the kind (its CRD is not installed)."""


class NamespaceNotFound(KubernetesError):
    """An apply into a namespace that does not exist (the API server answered 404)."""


class WaitTimeout(KubernetesError):
    """An object did not reach a condition within the time allowed; ``last`` is the object as last seen."""

    def __init__(self, message: str, last: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.last = last


class WaitFailed(WaitTimeout):
    """An object reached a state its condition says it will not recover from (a rollout past its deadline)."""


@dataclass(frozen=True)
class FieldOwner:
    """A field an apply wanted to set and the field manager that owns it with another value."""

    manager: str
    field: str


class FieldConflict(KubernetesError):
    """A server-side apply without ``force`` would change fields another field manager owns.

    The API server changed nothing; ``conflicts`` names each field and its manager.
    """

    def __init__(self, message: str, conflicts: tuple[FieldOwner, ...]) -> None:
        super().__init__(message)
        self.conflicts = conflicts

    @property
    def managers(self) -> list[str]:
        return sorted({conflict.manager for conflict in self.conflicts})


@dataclass(frozen=True)
class Condition:
    """What to wait for: a description for people and a predicate on the object.

    The predicates receive the object as a dict, or None while it does not exist.
    ``fails``, when given, ends the wait early: the object will not get there
    (a Deployment whose rollout exceeded its progress deadline).
    """

    description: str
    holds: Callable[[dict[str, Any] | None], bool]
    fails: Callable[[dict[str, Any] | None], bool] | None = None

    def failed(self, obj: dict[str, Any] | None) -> bool:
        return self.fails is not None and self.fails(obj)


def condition_true(condition_type: str) -> Condition:
    """`status.conditions[type=condition_type].status == "True"` (Ready, Available, Established...)."""

    def holds(obj: dict[str, Any] | None) -> bool:
        return obj is not None and status_condition(obj, condition_type) == "True"

    return Condition(f"have condition {condition_type}=True", holds)


def exists() -> Condition:
    return Condition("exist", lambda obj: obj is not None)


def deleted() -> Condition:
    return Condition("be deleted", lambda obj: obj is None)


def status_condition(obj: dict[str, Any], condition_type: str) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type:
            return condition.get("status")
    return None


@dataclass(frozen=True)
class ApplyResult:
    """What the server answered to an apply; ``before`` is the live object it was applied to (None: created)."""

    object: dict[str, Any]
    action: Literal["created", "changed", "unchanged"]
    dry_run: bool
    before: dict[str, Any] | None = None


def describe(api_version: str, kind: str, name: str, namespace: str | None) -> str:
    where = f"{namespace}/{name}" if namespace else name
    return f"{kind} {where} ({api_version})"


class KubernetesClient:
    """Get, list, apply, patch status, delete and wait on any kind of object.

    Objects go in and come out as plain dicts (the JSON of the API).
    """

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        field_manager: str = FIELD_MANAGER,
        request_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_client = api_client
        _default_request_timeout(api_client, request_timeout)
        self.field_manager = field_manager
        self.request_timeout = request_timeout
        self.clock = clock
        self._dynamic: DynamicClient | None = None
        self._kinds: dict[tuple[str, str], Any] = {}

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    @property
    def dynamic(self) -> DynamicClient:
        if self._dynamic is None:
            from kubernetes.dynamic import DynamicClient

            cache_file = _discovery_cache_file(self.host)
            self._dynamic = self._call(
                "discover the API",
                lambda: DynamicClient(self.api_client, cache_file=cache_file, discoverer=_memory_discoverer()),
            )
        return self._dynamic

    def kind(self, api_version: str, kind: str) -> Any:
        """The discovered API resource of a kind; a clear error when the cluster does not serve it."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        found = self._kinds.get((api_version, kind))
        if found is not None:
            return found
        try:
            found = self._call(
                f"discover {kind} ({api_version})",
                lambda: self.dynamic.resources.get(api_version=api_version, kind=kind),
            )
        except ResourceNotFoundError:
            found = self._rediscover(api_version, kind)
        # Only kinds found are kept: a kind that goes away answers 404, said as KindNotServed.
        self._kinds[(api_version, kind)] = found
        return found

    def _rediscover(self, api_version: str, kind: str) -> Any:
        """Ask the group version itself before saying a kind is not served.

        The client's discovery leaves out a group version whose listing failed
        (a busy server answering 503), so a kind it cannot find may be served.
        """
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        path = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        not_served = KindNotServed(
            f"kubernetes: the cluster at {self.host} does not serve kind {kind} in "
            f"{api_version} (is its CustomResourceDefinition installed?)"
        )
        try:
            listing = _json(self._call(f"discover {api_version}", lambda: self.dynamic.request(
                "get", path, serialize=False, _request_timeout=self.request_timeout)))
        except _NotFound:
            raise not_served from None
        if not any(resource.get("kind") == kind and "/" not in resource.get("name", "")
                   for resource in listing.get("resources") or []):
            raise not_served
        self.dynamic.resources.invalidate_cache()
        try:
            return self._call(f"discover {kind} ({api_version})",
                              lambda: self.dynamic.resources.get(api_version=api_version, kind=kind))
        except ResourceNotFoundError:
            raise KubernetesError(
                f"kubernetes: the cluster at {self.host} lists kind {kind} in {api_version} but its discovery "
                "does not (the server is busy or changing its APIs); try again"
            ) from None

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        resource = self.kind(api_version, kind)
        try:
            found = self._call(
                f"get {describe(api_version, kind, name, namespace)}",
                lambda: self.dynamic.get(resource, name=name, namespace=namespace, serialize=False,
                                         _request_timeout=self.request_timeout),
            )
        except _NotFound as missing:
            if missing.kind_gone:
                raise KindNotServed(
                    f"kubernetes: get {describe(api_version, kind, name, namespace)} at {self.host} answered 404: "
                    "the cluster no longer serves the kind (was its CustomResourceDefinition removed?)"
                ) from None
            return None
        return _json(found)

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        resource = self.kind(api_version, kind)
        where = f" in namespace {namespace}" if namespace else ""
        try:
            found = self._call(
                f"list {kind} ({api_version})",
                lambda: self.dynamic.get(
                    resource,
                    namespace=namespace,
                    label_selector=label_selector,
                    field_selector=field_selector,
                    serialize=False,
                    _request_timeout=self.request_timeout,
                ),
            )
        except _NotFound:
            # Listing in a namespace that does not exist answers an empty list; a 404 means the
            # kind went away after discovery.
            raise KindNotServed(
                f"kubernetes: listing {kind} ({api_version}){where} at {self.host} answered 404: the "
                "cluster no longer serves the kind (was its CustomResourceDefinition removed?)"
            ) from None
        return _items(_json(found))

    def apply(
        self, manifest: dict[str, Any], *, dry_run: bool = False, force: bool = True
    ) -> ApplyResult:
        """Server-side apply one object; with ``dry_run`` the server validates and stores nothing.

        ``force`` takes over fields another field manager owns with another value; without it
        the server refuses and :class:`FieldConflict` names the fields and their managers.
        An apply into a namespace that does not exist raises :class:`NamespaceNotFound`.
        """
        api_version, kind, name, namespace = _identity(manifest)
        resource = self.kind(api_version, kind)
        if not resource.namespaced:
            namespace = None
        before = self.get(api_version, kind, name, namespace)
        try:
            applied = self._call(
                f"apply {describe(api_version, kind, name, namespace)}",
                lambda: self.dynamic.server_side_apply(
                    resource,
                    body=manifest,
                    name=name,
                    namespace=namespace,
                    field_manager=self.field_manager,
                    force_conflicts=force,
                    dry_run="All" if dry_run else None,
                    serialize=False,
                    _request_timeout=self.request_timeout,
                ),
            )
            applied = _json(applied)
        except _NotFound:
            raise NamespaceNotFound(
                f"kubernetes: apply {describe(api_version, kind, name, namespace)} answered 404 "
                "(does its namespace exist?)"
            ) from None
        if before is None:
            action: Literal["created", "changed", "unchanged"] = "created"
        elif _comparable(before) == _comparable(applied):
            action = "unchanged"
        else:
            action = "changed"
        return ApplyResult(applied, action, dry_run, before)

    def patch_status(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        status: dict[str, Any],
    ) -> dict[str, Any]:
        """Merge-patch the status subresource."""
        resource = self.kind(api_version, kind)
        path = resource.path(name=name, namespace=namespace) + "/status"
        action = f"patch status of {describe(api_version, kind, name, namespace)}"
        try:
            patched = self._call(
                action,
                lambda: self.dynamic.request(
                    "patch",
                    path,
                    body={"status": status},
                    content_type="application/merge-patch+json",
                    field_manager=self.field_manager,
                    serialize=False,
                    _request_timeout=self.request_timeout,
                ),
            )
        except _NotFound as missing:
            if missing.kind_gone:
                raise KindNotServed(f"kubernetes: {action} failed: the cluster no longer serves {kind} "
                                    f"({api_version})") from None
            raise KubernetesError(f"kubernetes: {action} failed: it does not exist (deleted meanwhile?)") from None
        return _json(patched)

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        dry_run: bool = False,
    ) -> bool:
        """Delete an object; False when it was already gone."""
        resource = self.kind(api_version, kind)
        try:
            self._call(
                f"delete {describe(api_version, kind, name, namespace)}",
                lambda: resource.delete(
                    name=name,
                    namespace=namespace,
                    dry_run="All" if dry_run else None,
                    _request_timeout=self.request_timeout,
                ),
            )
        except _NotFound:
            return False
        return True

    def wait_for(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        condition: Condition,
        *,
        timeout: float,
    ) -> dict[str, Any] | None:
        """Block until ``condition`` holds for the object, or raise :class:`WaitTimeout`
        (:class:`WaitFailed` as soon as the condition says it never will).

        Watches the object (re-listing after each watch window) so a change is
        seen as soon as the server reports it.
        """
        resource = self.kind(api_version, kind)
        deadline = self.clock() + timeout
        what = describe(api_version, kind, name, namespace)
        current = self.get(api_version, kind, name, namespace)
        while True:
            if condition.holds(current):
                return current
            if condition.failed(current):
                raise WaitFailed(
                    f"kubernetes: {what} will not {condition.description}: {_summary(current)}", current
                )
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise WaitTimeout(
                    f"kubernetes: timed out after {timeout:g} s waiting for {what} to "
                    f"{condition.description}; last seen: {_summary(current)}",
                    current,
                )
            events = self._watch(resource, name, namespace, remaining)
            try:
                for event_type, obj in events:
                    current = None if event_type == "DELETED" else obj
                    if condition.holds(current) or condition.failed(current):
                        break
                else:
                    current = self.get(api_version, kind, name, namespace)
            finally:
                events.close()

    def _watch(
        self, resource: Any, name: str, namespace: str | None, remaining: float
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        import urllib3
        from kubernetes import watch as k8s_watch
        from kubernetes.client.exceptions import ApiException

        listing = _json(self._call(
            f"list {resource.kind}",
            lambda: self.dynamic.get(resource, namespace=namespace, field_selector=f"metadata.name={name}",
                                     serialize=False),
        ))
        resource_version = (listing.get("metadata") or {}).get("resourceVersion")
        # The state as of the listing: a change between the caller's last read and this list would
        # otherwise never be reported (the watch starts after it) and the wait would sit out a window.
        items = _items(listing)
        yield ("MODIFIED", items[0]) if items else ("DELETED", {})
        # The server closes the watch after `window` seconds, before the read timeout.
        window = max(1, min(int(remaining + 0.999), int(self.request_timeout) - 1, 60))
        watcher = k8s_watch.Watch()
        try:
            stream = self.dynamic.watch(
                resource,
                namespace=namespace,
                name=name,
                resource_version=resource_version,
                timeout=window,
                watcher=watcher,
            )
            for event in stream:
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    yield event["type"], event["object"].to_dict()
        except ApiException as exc:
            if exc.status != 410:  # 410 Gone: the resourceVersion expired; list again
                raise self._translate(exc, f"watch {resource.kind} {name}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(exc) from None
        finally:
            watcher.stop()

    def _call(self, action: str, request: Callable[[], Any]) -> Any:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return request()
        except ApiException as exc:
            if exc.status == 404:
                raise _NotFound(action, exc) from None
            raise self._translate(exc, action) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _translate(self, exc: ApiException, action: str) -> KubernetesError:
        message = _status_message(exc)
        conflicts = _field_conflicts(exc)
        if conflicts:
            owned = ", ".join(f"{c.field} (owned by {c.manager!r})" for c in conflicts)
            return FieldConflict(
                f"kubernetes: {action} as field manager {self.field_manager!r} would change field(s) another "
                f"manager owns: {owned}; nothing was changed (leave the field(s) to that manager, or have it "
                "give them up, before applying again)",
                conflicts,
            )
        if exc.status in (401, 403):
            if exc.status == 403 and action.startswith("apply ") and message.rstrip().endswith("forbidden:"):
                # The server checks `create` after `patch` when an apply would create the object, and says nothing.
                message = message.rstrip() + " (an apply that creates the object needs the verb create besides patch)"
            return KubernetesError(
                f"kubernetes: {action} was refused ({exc.status} {exc.reason}: {message}); "
                f"check the credentials and RBAC of the identity in {CLUSTER_SETTING}"
            )
        return KubernetesError(f"kubernetes: {action} failed ({exc.status} {exc.reason}): {message}")

    def _unreachable(self, exc: BaseException) -> ServerUnreachableError:
        reason = "connection refused" if "refused" in str(exc).lower() else f"no answer ({type(exc).__name__})"
        return ServerUnreachableError("kubernetes API", self.host, CLUSTER_SETTING, reason)


def _json(response: Any) -> dict[str, Any]:
    """The JSON of a raw answer: the dynamic client's ResourceInstance would only be turned back into it."""
    import json

    return json.loads(response.data)


def _items(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """A list's items with their apiVersion and kind, which the server leaves out of built-in lists."""
    kind = str(listing.get("kind", "")).removesuffix("List")
    return [{"apiVersion": listing.get("apiVersion"), "kind": kind, **item} for item in listing.get("items") or []]


class _NotFound(Exception):
    def __init__(self, action: str, exc: ApiException) -> None:
        super().__init__(action)
        import json

        try:
            status = json.loads(exc.body)
        except (TypeError, ValueError):
            status = {}
        details = (status.get("details") if isinstance(status, dict) else None) or {}
        # A missing object's 404 names it; a path the server does not serve (a kind gone) names nothing.
        self.kind_gone = not details.get("name")


def _default_request_timeout(api_client: k8s_client.ApiClient, seconds: float) -> None:
    """Give every request of this client a timeout unless it sets its own.

    The official client sends requests without one (discovery included), so
    an API server that accepts connections and never answers would hang an
    operation forever.
    """
    rest = api_client.rest_client
    send = rest.request

    def request(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return send(*args, _request_timeout=_request_timeout or seconds, **kwargs)

    rest.request = request


def _identity(manifest: dict[str, Any]) -> tuple[str, str, str, str | None]:
    try:
        api_version = manifest["apiVersion"]
        kind = manifest["kind"]
        name = manifest["metadata"]["name"]
    except (KeyError, TypeError):
        raise KubernetesError(
            "kubernetes: a manifest needs apiVersion, kind and metadata.name; got "
            f"{ {k: manifest.get(k) for k in ('apiVersion', 'kind')} if isinstance(manifest, dict) else manifest!r}"
        ) from None
    return api_version, kind, name, (manifest.get("metadata") or {}).get("namespace")


def _comparable(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _SERVER_FIELDS}
    rest = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    return {"metadata": metadata, **rest}


FieldPath = Sequence[str | Mapping[str, Any]]


def field_managers(obj: dict[str, Any], path: FieldPath) -> list[str]:
    """The field managers that own ``path`` of ``obj``, read from its ``metadata.managedFields``.

    ``path`` is a sequence of map keys and, for an item of a list keyed by
    fields (containers by name, ports by port and protocol), a mapping with
    some of its keys: ``("spec", "template", "spec", "containers", {"name":
    "app"}, "image")``. A manager owns the path when its field set holds it,
    or holds an ancestor as a whole (an atomic map or list).
    """
    managers = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if _owns(entry.get("fieldsV1") or {}, list(path)):
            managers.append(str(entry.get("manager", "?")))
    return managers


def _owns(fields: Mapping[str, Any], path: list[str | Mapping[str, Any]]) -> bool:
    import json

    node: Mapping[str, Any] = fields
    for segment in path:
        if not node:  # an atomic field: its manager owns all of it
            return True
        if isinstance(segment, Mapping):
            found = None
            for key, child in node.items():
                if not key.startswith("k:"):
                    continue
                item_keys = json.loads(key[2:])
                if all(item_keys.get(name) == value for name, value in segment.items() if name in item_keys) and any(
                    name in item_keys for name in segment
                ):
                    found = child
                    break
            if found is None:
                return False
            node = found
        else:
            child = node.get(f"f:{segment}")
            if child is None:
                return False
            node = child
    return True


def _summary(obj: dict[str, Any] | None) -> str:
    if obj is None:
        return "the object does not exist"
    conditions = (obj.get("status") or {}).get("conditions") or []
    if not conditions:
        return "no status conditions"
    return ", ".join(
        f"{c.get('type')}={c.get('status')}" + (f" ({c['message']})" if c.get("message") else "")
        for c in conditions
    )


def _status_message(exc: ApiException) -> str:
    import json

    try:
        return json.loads(exc.body).get("message") or str(exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or exc.reason)


# What the API server says in each cause of an apply conflict: `conflict with "<manager>"`, followed by
# ` with subresource "<name>"` and ` using <apiVersion>[ at <time>]` for managers of Update operations.
_CONFLICT_MANAGER = re.compile(r'conflict with "((?:[^"\\]|\\.)*)"')


def _field_conflicts(exc: ApiException) -> tuple[FieldOwner, ...]:
    """The FieldManagerConflict causes of a 409 answer to an apply, or () for any other error."""
    import json

    if exc.status != 409:
        return ()
    try:
        status = json.loads(exc.body)
    except (TypeError, ValueError):
        return ()
    if not isinstance(status, dict) or status.get("reason") != "Conflict":
        return ()
    conflicts = []
    for cause in (status.get("details") or {}).get("causes") or []:
        if not isinstance(cause, dict) or cause.get("reason") != "FieldManagerConflict":
            continue
        message = str(cause.get("message", ""))
        found = _CONFLICT_MANAGER.search(message)
        manager = found.group(1).replace('\\"', '"') if found else message
        conflicts.append(FieldOwner(manager, str(cause.get("field", "?"))))
    return tuple(conflicts)


def _memory_discoverer() -> type:
    from kubernetes.dynamic.discovery import LazyDiscoverer

    class MemoryDiscoverer(LazyDiscoverer):
        """Discovery kept in memory: the official client rewrites its whole JSON cache file at each
        newly discovered group (a tenth of a second each with a platform's CRDs), a file that no
        other client reads (see :func:`_discovery_cache_file`)."""

        def _write_cache(self) -> None:
            pass

    return MemoryDiscoverer


_CACHE_DIR: Path | None = None


def _discovery_cache_file(host: str) -> str:
    """A discovery cache path private to one client, so no stale file of another client or run is read."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = Path(tempfile.mkdtemp(prefix="ops-platform-kube-"))
    safe = "".join(ch if ch.isalnum() else "_" for ch in host)
    handle, path = tempfile.mkstemp(prefix=f"discovery-{safe}-", suffix=".json", dir=_CACHE_DIR)
    os.close(handle)
    os.unlink(path)
    return path


class KubernetesResource(dg.ConfigurableResource):
    """Access to one Kubernetes cluster.

    Uses ``kubeconfig`` / ``context`` when given, else the pod's service account
    when running in a cluster, else the default kubeconfig (~/.kube/config).
    """

    kubeconfig: str | None = Field(
        default=None, description="Path of the kubeconfig file (KUBECONFIG)."
    )
    context: str | None = Field(
        default=None, description="kubeconfig context to use (OPS_KUBE_CONTEXT)."
    )
    in_cluster: bool | None = Field(
        default=None,
        description="Use the pod's service account; default: when running in a pod without a kubeconfig.",
    )
    request_timeout: float = Field(default=30.0, description="Seconds per API request.")

    def get_client(self) -> KubernetesClient:
        return KubernetesClient(self._api_client(), request_timeout=self.request_timeout)

    def uses_pod_service_account(self) -> bool:
        """Whether the client will act as the pod's ServiceAccount (in a pod, without a kubeconfig)."""
        if self.in_cluster is not None:
            return self.in_cluster
        return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not self.kubeconfig

    def _api_client(self) -> k8s_client.ApiClient:
        use_in_cluster = self.uses_pod_service_account()
        if not use_in_cluster:
            # Before importing the client (~0.75 s): without a kubeconfig there is nothing to import it for.
            # The client's own default (kubernetes.config.KUBE_CONFIG_DEFAULT_LOCATION).
            config_file = self.kubeconfig or os.path.expanduser(os.environ.get("KUBECONFIG", "~/.kube/config"))
            if not any(Path(path).is_file() for path in config_file.split(os.pathsep) if path):
                raise MissingSettingError(
                    "KUBECONFIG",
                    "this operation on the Kubernetes cluster",
                    f"no kubeconfig at {config_file}; set KUBECONFIG (and OPS_KUBE_CONTEXT) "
                    "or run in a pod with a service account",
                )
        from kubernetes import client as k8s_client
        from kubernetes import config as k8s_config

        if use_in_cluster:
            configuration = k8s_client.Configuration()
            try:
                k8s_config.load_incluster_config(client_configuration=configuration)
            except k8s_config.ConfigException as exc:
                raise MissingSettingError(
                    "KUBERNETES_SERVICE_HOST", "in-cluster Kubernetes access", str(exc)
                ) from None
            return k8s_client.ApiClient(configuration)
        try:
            return k8s_config.new_client_from_config(config_file=config_file, context=self.context)
        except k8s_config.ConfigException as exc:
            setting = "OPS_KUBE_CONTEXT" if self.context else "KUBECONFIG"
            raise OpsPlatformError(
                f"kubernetes: cannot use kubeconfig {config_file}"
                + (f" context {self.context!r}" if self.context else "")
                + f": {exc} (check {setting})"
            ) from None
