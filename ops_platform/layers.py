"""Apply an infra layer's manifests, wait for readiness, show the plan and the drift.

Plain Python, no Dagster import; the ``infra/<layer>`` assets call these with
the objects of :func:`ops_platform.manifests.load_layer_manifests`.

:func:`apply_layer` server-side-applies every object in order (field manager
``ops-platform``, through :class:`KubernetesClient`), waits for the CRDs it
created to be Established before applying custom resources of them, then
waits, within one deadline shared by the whole layer, for what it applied to
be ready:

- Deployment: ``status.availableReplicas >= spec.replicas`` or condition
  ``Available=True``; StatefulSet: ``readyReplicas == spec.replicas``;
  DaemonSet: ``numberReady == desiredNumberScheduled``; for all three the
  controller must have seen the applied generation (``observedGeneration``)
  when it reports one;
- CustomResourceDefinition: ``Established=True``;
- custom resources: a ``Ready`` condition, when present, must be True. A
  custom resource without a Ready condition counts as ready once applied,
  because many kinds never report one; the kinds known to report it
  (:data:`CUSTOM_KINDS_REPORTING_READY`) are not ready until they do;
- everything else is ready once applied.

A not-ready object does not stop the rest: the result says what is not ready
and why, and the caller decides to fail. A custom resource whose kind the
cluster does not serve, and that no CRD of the layer defines, is an error
raised before anything is applied.

With ``plan=True`` every apply is a server-side dry run (nothing stored,
nothing waited for) and a would-change object carries a unified diff between
the live object and the dry-run result, server-managed fields left out.
Custom resources of a CRD, and objects in a Namespace, that the same plan
would create cannot be dry-run (the kind or namespace does not exist yet):
they are reported as "would create" unchecked, with the reason.

:func:`detect_drift` compares the live objects with the manifests on the
fields the manifests set.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ops_platform.manifests import object_ref
from ops_platform.resources.kubernetes import (
    Condition,
    KindNotServed,
    KubernetesClient,
    KubernetesError,
    WaitTimeout,
    condition_true,
    status_condition,
)

Action = Literal["created", "changed", "unchanged", "would create", "would change"]
DriftState = Literal["in_sync", "drifted", "missing"]

CRD_API_VERSION = "apiextensions.k8s.io/v1"
CRD_KIND = "CustomResourceDefinition"
# Kinds whose controllers always report a Ready condition: without one they are not ready yet.
CUSTOM_KINDS_REPORTING_READY: frozenset[tuple[str, str]] = frozenset(
    {
        ("cert-manager.io", "Certificate"),
        ("cert-manager.io", "ClusterIssuer"),
        ("cert-manager.io", "Issuer"),
        ("external-secrets.io", "ExternalSecret"),
        ("external-secrets.io", "ClusterSecretStore"),
        ("external-secrets.io", "SecretStore"),
        ("postgresql.cnpg.io", "Cluster"),
        ("kafka.strimzi.io", "Kafka"),
    }
)
# Fields the API server or controllers own: left out of plan diffs.
SERVER_MANAGED_METADATA = ("managedFields", "resourceVersion", "generation", "uid", "creationTimestamp")
DIFF_MAX_LINES = 80
DIFF_MAX_CHARS = 6000


class LayerError(KubernetesError):
    """A layer cannot be applied as written (for example a custom resource of a kind nobody serves)."""


@dataclass(frozen=True)
class ObjectOutcome:
    """One object of a layer after apply: what the apply did, whether it is ready and, if not, why.

    ``ready`` is None in a plan (nothing is waited for). ``diff`` is set for
    "would change" in a plan.
    """

    ref: str
    action: Action
    ready: bool | None
    reason: str | None = None
    diff: str | None = None


@dataclass(frozen=True)
class LayerResult:
    plan: bool
    objects: list[ObjectOutcome]

    def _count(self, *actions: str) -> int:
        return sum(1 for outcome in self.objects if outcome.action in actions)

    @property
    def created(self) -> int:
        return self._count("created", "would create")

    @property
    def changed(self) -> int:
        return self._count("changed", "would change")

    @property
    def unchanged(self) -> int:
        return self._count("unchanged")

    @property
    def not_ready(self) -> list[ObjectOutcome]:
        return [outcome for outcome in self.objects if outcome.ready is False]

    def totals(self) -> dict[str, int]:
        return {
            "created": self.created,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "not_ready": len(self.not_ready),
        }


def apply_layer(
    kube: KubernetesClient,
    objects: Iterable[dict[str, Any]],
    *,
    plan: bool,
    wait_timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> LayerResult:
    """Server-side apply ``objects`` in order, then wait up to ``wait_timeout`` seconds in all for readiness."""
    objects = list(objects)
    deadline = clock() + wait_timeout
    layer_crds = _crds_by_kind(objects)
    _require_served_kinds(kube, objects, layer_crds)
    established: set[str] = set()
    applied: list[tuple[dict[str, Any], Action]] = []
    outcomes: list[ObjectOutcome] = []
    new_namespaces: set[str] = set()
    for manifest in objects:
        crd_name = layer_crds.get(_group_kind(manifest))
        if plan:
            outcome = _plan_one(kube, manifest, crd_name, new_namespaces)
            if manifest.get("kind") == "Namespace" and outcome.action == "would create":
                new_namespaces.add(manifest["metadata"]["name"])
            outcomes.append(outcome)
            continue
        if crd_name and crd_name not in established:
            _wait_established(kube, crd_name, max(deadline - clock(), 0.0))
            established.add(crd_name)
        result = kube.apply(manifest)
        applied.append((result.object, result.action))
    if plan:
        return LayerResult(plan=True, objects=outcomes)
    for obj, action in applied:
        ready, reason = _wait_ready(kube, obj, max(deadline - clock(), 0.0), wait_timeout)
        outcomes.append(ObjectOutcome(object_ref(obj), action, ready, reason))
    return LayerResult(plan=False, objects=outcomes)


def _plan_one(
    kube: KubernetesClient, manifest: dict[str, Any], crd_name: str | None, new_namespaces: set[str]
) -> ObjectOutcome:
    """One object's dry run; objects in a namespace or of a CRD the plan would create cannot be dry-run yet."""
    ref = object_ref(manifest)
    if crd_name and not _served(kube, manifest):
        return ObjectOutcome(
            ref, "would create", None, reason=f"not dry-run: its CRD {crd_name} is created by this layer"
        )
    api_version, kind, name, namespace = _identity(manifest)
    if namespace in new_namespaces:
        return ObjectOutcome(
            ref, "would create", None, reason=f"not dry-run: its namespace {namespace} is created by this layer"
        )
    live = kube.get(api_version, kind, name, namespace)
    result = kube.apply(manifest, dry_run=True)
    if result.action == "created":
        return ObjectOutcome(ref, "would create", None)
    if result.action == "unchanged":
        return ObjectOutcome(ref, "unchanged", None)
    return ObjectOutcome(ref, "would change", None, diff=plan_diff(live or {}, result.object))


def plan_diff(live: dict[str, Any], planned: dict[str, Any]) -> str:
    """A unified diff of the YAML of two objects, server-managed fields left out, at most :data:`DIFF_MAX_LINES`."""
    lines = list(
        difflib.unified_diff(
            _yaml_lines(_without_server_fields(live)),
            _yaml_lines(_without_server_fields(planned)),
            fromfile="live",
            tofile="planned",
            lineterm="",
        )
    )
    shown: list[str] = []
    size = 0
    for line in lines:
        if len(shown) >= DIFF_MAX_LINES or size + len(line) > DIFF_MAX_CHARS:
            shown.append(f"... ({len(lines) - len(shown)} more lines)")
            break
        shown.append(line)
        size += len(line) + 1
    return "\n".join(shown)


def _yaml_lines(obj: dict[str, Any]) -> list[str]:
    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False).splitlines()


def _without_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in SERVER_MANAGED_METADATA}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": metadata}


def _crds_by_kind(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(group, kind) -> CRD name, for the CRDs among ``objects``."""
    found: dict[tuple[str, str], str] = {}
    for obj in objects:
        if obj.get("kind") == CRD_KIND:
            spec = obj.get("spec") or {}
            found[(spec.get("group", ""), (spec.get("names") or {}).get("kind", ""))] = obj["metadata"]["name"]
    return found


def _require_served_kinds(
    kube: KubernetesClient, objects: list[dict[str, Any]], layer_crds: dict[tuple[str, str], str]
) -> None:
    missing: dict[tuple[str, str], list[str]] = {}
    checked: set[tuple[str, str]] = set()
    for obj in objects:
        key = (str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        if key in checked or _group_kind(obj) in layer_crds:
            continue
        checked.add(key)
        if not _served(kube, obj):
            missing.setdefault(key, []).append(object_ref(obj))
    if missing:
        kinds = "; ".join(
            f"kind {kind} ({api_version}) is not served: install the CustomResourceDefinition of "
            f"{kind} in group {_group_of(api_version) or 'core'} (needed by {', '.join(refs)})"
            for (api_version, kind), refs in missing.items()
        )
        raise LayerError(f"kubernetes: cannot apply the layer to {kube.host}: {kinds}")


def _served(kube: KubernetesClient, obj: dict[str, Any]) -> bool:
    try:
        kube.kind(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    except KindNotServed:
        return False
    return True


def _wait_established(kube: KubernetesClient, crd_name: str, timeout: float) -> None:
    try:
        kube.wait_for(CRD_API_VERSION, CRD_KIND, crd_name, None, condition_true("Established"), timeout=timeout)
    except WaitTimeout as exc:
        raise LayerError(
            f"kubernetes: CustomResourceDefinition {crd_name} is not Established, so its custom "
            f"resources cannot be applied: {exc}"
        ) from None


def _wait_ready(
    kube: KubernetesClient, obj: dict[str, Any], timeout: float, layer_timeout: float
) -> tuple[bool, str | None]:
    readiness = readiness_of(obj)
    if readiness is None or readiness.holds(obj):
        return True, None
    api_version, kind, name, namespace = _identity(obj)
    try:
        kube.wait_for(api_version, kind, name, namespace, readiness, timeout=timeout)
    except WaitTimeout:
        last = kube.get(api_version, kind, name, namespace)
        return False, f"not {readiness.description} within the layer's {layer_timeout:g} s wait: {status_summary(last)}"
    return True, None


def readiness_of(obj: dict[str, Any]) -> Condition | None:
    """The condition that makes an applied object ready; None when applying it is enough."""
    kind = obj.get("kind")
    group = _group_of(str(obj.get("apiVersion", "")))
    if group == "apps" and kind == "Deployment":
        return Condition("available", _deployment_available)
    if group == "apps" and kind == "StatefulSet":
        return Condition("ready", _statefulset_ready)
    if group == "apps" and kind == "DaemonSet":
        return Condition("ready on every node", _daemonset_ready)
    if kind == CRD_KIND:
        return condition_true("Established")
    if "." in group and not group.endswith(".k8s.io"):
        if (group, kind) in CUSTOM_KINDS_REPORTING_READY:
            return condition_true("Ready")
        return Condition("Ready (when it reports the condition)", _ready_if_reported)
    return None


def _observed(obj: dict[str, Any]) -> bool:
    observed = (obj.get("status") or {}).get("observedGeneration")
    generation = (obj.get("metadata") or {}).get("generation")
    return observed is None or generation is None or observed >= generation


def _replicas(obj: dict[str, Any]) -> int:
    replicas = (obj.get("spec") or {}).get("replicas")
    return 1 if replicas is None else int(replicas)


def _deployment_available(obj: dict[str, Any] | None) -> bool:
    if obj is None or not _observed(obj):
        return False
    available = (obj.get("status") or {}).get("availableReplicas") or 0
    return available >= _replicas(obj) or status_condition(obj, "Available") == "True"


def _statefulset_ready(obj: dict[str, Any] | None) -> bool:
    if obj is None or not _observed(obj):
        return False
    return ((obj.get("status") or {}).get("readyReplicas") or 0) == _replicas(obj)


def _daemonset_ready(obj: dict[str, Any] | None) -> bool:
    if obj is None or not _observed(obj):
        return False
    status = obj.get("status") or {}
    desired = status.get("desiredNumberScheduled")
    return desired is not None and (status.get("numberReady") or 0) == desired


def _ready_if_reported(obj: dict[str, Any] | None) -> bool:
    if obj is None:
        return False
    reported = status_condition(obj, "Ready")
    return reported is None or reported == "True"


def status_summary(obj: dict[str, Any] | None) -> str:
    """What the status says, in a line: replica counts and conditions (with their messages)."""
    if obj is None:
        return "the object does not exist"
    status = obj.get("status") or {}
    parts: list[str] = []
    kind = obj.get("kind")
    if kind == "Deployment":
        parts.append(f"{status.get('availableReplicas') or 0}/{_replicas(obj)} replicas available")
    elif kind == "StatefulSet":
        parts.append(f"{status.get('readyReplicas') or 0}/{_replicas(obj)} replicas ready")
    elif kind == "DaemonSet":
        desired = status.get("desiredNumberScheduled")
        parts.append(f"{status.get('numberReady') or 0}/{'?' if desired is None else desired} pods ready")
    if not _observed(obj):
        parts.append(
            f"generation {obj['metadata']['generation']} not yet observed "
            f"(observedGeneration {status.get('observedGeneration')})"
        )
    for condition in status.get("conditions") or []:
        shown = f"{condition.get('type')}={condition.get('status')}"
        detail = condition.get("message") or condition.get("reason")
        parts.append(f"{shown} ({detail})" if detail else shown)
    if not status:
        parts.append("no status reported yet")
    return "; ".join(parts)


@dataclass(frozen=True)
class DriftRow:
    ref: str
    state: DriftState
    differences: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DriftReport:
    rows: list[DriftRow]

    @property
    def drifted(self) -> list[DriftRow]:
        return [row for row in self.rows if row.state != "in_sync"]

    @property
    def in_sync(self) -> bool:
        return not self.drifted

    def counts(self) -> dict[str, int]:
        counts = {"in_sync": 0, "drifted": 0, "missing": 0}
        for row in self.rows:
            counts[row.state] += 1
        return counts


def detect_drift(kube: KubernetesClient, objects: Iterable[dict[str, Any]]) -> DriftReport:
    """Each manifest object against its live object, on the fields the manifest sets.

    Every key path of the manifest must hold the same value live; fields the
    manifest does not set (defaults, status, controllers' annotations) are
    ignored. Lists of objects that all carry a ``name`` are matched by name
    (extra live items, such as injected sidecars, are ignored); other lists by
    position, with the same length. Values are compared as JSON: ``"1"`` and
    ``1`` differ, and quantities the API server normalises (``1000m`` stored as
    ``1``) show as drift.
    """
    rows: list[DriftRow] = []
    for manifest in objects:
        ref = object_ref(manifest)
        api_version, kind, name, namespace = _identity(manifest)
        try:
            live = kube.get(api_version, kind, name, namespace)
        except KindNotServed:
            rows.append(DriftRow(ref, "missing", [f"kind {kind} ({api_version}) is not served by the cluster"]))
            continue
        if live is None:
            rows.append(DriftRow(ref, "missing", ["not found in the cluster"]))
            continue
        differences = list(_differences(manifest, live, ""))
        rows.append(DriftRow(ref, "drifted" if differences else "in_sync", differences))
    return DriftReport(rows)


_ABSENT = object()


def _differences(wanted: Any, live: Any, path: str) -> Iterable[str]:
    if isinstance(wanted, dict):
        if not isinstance(live, dict):
            yield _difference(path, wanted, live)
            return
        for key, value in wanted.items():
            yield from _differences(value, live.get(key, _ABSENT), f"{path}.{key}" if path else str(key))
    elif isinstance(wanted, list) and _named_items(wanted):
        if not isinstance(live, list):
            yield _difference(path, wanted, live)
            return
        live_by_name = {item.get("name"): item for item in live if isinstance(item, dict)}
        for item in wanted:
            yield from _differences(item, live_by_name.get(item["name"], _ABSENT), f"{path}[name={item['name']}]")
    elif isinstance(wanted, list) and any(isinstance(item, (dict, list)) for item in wanted):
        if not isinstance(live, list) or len(live) != len(wanted):
            yield _difference(path, wanted, live)
            return
        for index, (item, live_item) in enumerate(zip(wanted, live)):
            yield from _differences(item, live_item, f"{path}[{index}]")
    elif wanted != live:
        yield _difference(path, wanted, live)


def _named_items(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def _difference(path: str, wanted: Any, live: Any) -> str:
    return f"{path}: manifest {_shown(wanted)}, live {_shown(live)}"


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    if isinstance(value, str):
        return value
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= 200 else text[:197] + "..."


def _identity(obj: dict[str, Any]) -> tuple[str, str, str, str | None]:
    metadata = obj.get("metadata") or {}
    return str(obj.get("apiVersion", "")), str(obj.get("kind", "")), metadata.get("name", ""), metadata.get(
        "namespace"
    )


def _group_kind(obj: dict[str, Any]) -> tuple[str, str]:
    return _group_of(str(obj.get("apiVersion", ""))), str(obj.get("kind", ""))


def _group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]
