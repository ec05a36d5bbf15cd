"""Apply an infra layer's manifests, wait for readiness, show the plan and the drift.

Plain Python, no Dagster import; the ``infra/<layer>`` assets call these with
the objects of :func:`ops_platform.manifests.load_layer_manifests`.

:func:`apply_layer` server-side-applies every object in order (field manager
``ops-platform``, through :class:`KubernetesClient`), waits for the CRDs it
created to be Established before applying custom resources of them (and for
the CRD Gatekeeper makes of each of its ConstraintTemplates before the
constraints of that kind), then waits, within one deadline shared by the
whole layer, for what it applied to be ready. It applies without ``force``:
a field that another field manager owns with another value (an autoscaler's
``spec.replicas``) stops the layer with :class:`FieldConflict`, naming the
field and the manager, and the server changes nothing; ``force=True`` takes
such fields over.

Ready means what ``kubectl rollout status`` means:

- Deployment: the controller observed the applied generation, every replica
  is updated and available and no old replica is left (``Available=True``
  alone is not enough: old pods keep a stalled rollout available); a
  rollout past its ``progressDeadlineSeconds`` fails at once;
- StatefulSet: ``readyReplicas >= spec.replicas`` and the update revision
  is the current one; DaemonSet: every scheduled pod updated and available;
  for all three the controller must have seen the applied generation
  (``observedGeneration``) when it reports one;
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
the live object and the dry-run result, server-managed fields left out; an
object whose apply would conflict with another field manager is "would
conflict", with the fields and managers. Custom resources of a CRD, and
objects in a Namespace, that the same plan would create cannot be dry-run
(the kind or namespace does not exist yet): they are reported as "would
create" unchecked, with the reason.

:func:`detect_drift` compares each live object with what applying its
manifest would make of it, the way ``kubectl diff`` does: a forced
server-side dry run of the manifest against the live object. Defaults and
normalised values are in both, so they are not drift.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ops_platform.manifests import GATEKEEPER_CONSTRAINTS_GROUP, object_ref
from ops_platform.resources.kubernetes import (
    ApplyResult,
    Condition,
    FieldConflict,
    FieldPath,
    KindNotServed,
    KubernetesClient,
    KubernetesError,
    NamespaceNotFound,
    WaitTimeout,
    condition_true,
    field_managers,
    status_condition,
)

Action = Literal["created", "changed", "unchanged", "would create", "would change", "would conflict"]
DriftState = Literal["in_sync", "drifted", "missing"]

CRD_API_VERSION = "apiextensions.k8s.io/v1"
CRD_KIND = "CustomResourceDefinition"
GATEKEEPER_TEMPLATES_GROUP = "templates.gatekeeper.sh"
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
DISCOVERY_POLL_SECONDS = 0.1
DRY_RUN_READS = 3  # attempts at a live object and a dry run of one version
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
    def conflicts(self) -> int:
        return self._count("would conflict")

    @property
    def not_ready(self) -> list[ObjectOutcome]:
        return [outcome for outcome in self.objects if outcome.ready is False]

    def totals(self) -> dict[str, int]:
        return {
            "created": self.created,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "conflicts": self.conflicts,
            "not_ready": len(self.not_ready),
        }


def apply_layer(
    kube: KubernetesClient,
    objects: Iterable[dict[str, Any]],
    *,
    plan: bool,
    wait_timeout: float,
    force: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> LayerResult:
    """Server-side apply ``objects`` in order, then wait up to ``wait_timeout`` seconds in all for readiness.

    Without ``force`` a field another manager owns raises :class:`FieldConflict` (in a plan: the
    object is "would conflict").
    """
    objects = list(objects)
    deadline = clock() + wait_timeout
    layer_crds = _crds_by_kind(objects)
    _require_served_kinds(kube, objects, layer_crds)
    established: set[str] = set()
    applied: list[tuple[dict[str, Any], Action]] = []
    outcomes: list[ObjectOutcome] = []
    new_namespaces: set[str] = set()
    for manifest in objects:
        crd = layer_crds.get(_group_kind(manifest))
        if plan:
            outcome = _plan_one(kube, manifest, crd, new_namespaces, force)
            if manifest.get("kind") == "Namespace" and outcome.action == "would create":
                new_namespaces.add(manifest["metadata"]["name"])
            outcomes.append(outcome)
            continue
        if crd and crd.name not in established:
            _wait_established(kube, crd, manifest, deadline, clock)
            established.add(crd.name)
        result = kube.apply(manifest, force=force)
        applied.append((result.object, result.action))
    if plan:
        return LayerResult(plan=True, objects=outcomes)
    for obj, action in applied:
        ready, reason = _wait_ready(kube, obj, max(deadline - clock(), 0.0), wait_timeout)
        outcomes.append(ObjectOutcome(object_ref(obj), action, ready, reason))
    return LayerResult(plan=False, objects=outcomes)


def _plan_one(
    kube: KubernetesClient, manifest: dict[str, Any], crd: LayerCrd | None, new_namespaces: set[str], force: bool
) -> ObjectOutcome:
    """One object's dry run; objects in a namespace or of a CRD the plan would create cannot be dry-run yet."""
    ref = object_ref(manifest)
    if crd and not _served(kube, manifest):
        return ObjectOutcome(ref, "would create", None, reason=f"not dry-run: its CRD {crd.name} is {crd.origin}")
    namespace = _identity(manifest)[3]
    if namespace in new_namespaces:
        return ObjectOutcome(
            ref, "would create", None, reason=f"not dry-run: its namespace {namespace} is created by this layer"
        )
    try:
        result = _dry_run_on_one_version(kube, manifest, force=force)
    except FieldConflict as conflict:
        owned = ", ".join(f"{c.field} (owned by {c.manager!r})" for c in conflict.conflicts)
        return ObjectOutcome(
            ref, "would conflict", None,
            reason=f"the apply would fail: another field manager owns {owned} (force_conflicts takes them over)",
        )
    if result.action == "created":
        return ObjectOutcome(ref, "would create", None)
    if result.action == "unchanged":
        return ObjectOutcome(ref, "unchanged", None)
    return ObjectOutcome(ref, "would change", None, diff=plan_diff(result.before or {}, result.object))


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


@dataclass(frozen=True)
class LayerCrd:
    """The CRD of a kind the layer brings: one of its objects, or what Gatekeeper makes of its ConstraintTemplate."""

    name: str
    origin: str


def _crds_by_kind(objects: list[dict[str, Any]]) -> dict[tuple[str, str], LayerCrd]:
    """(group, kind) -> its CRD, for the CRDs among ``objects`` and the constraint kinds of their templates."""
    found: dict[tuple[str, str], LayerCrd] = {}
    for obj in objects:
        if obj.get("kind") == CRD_KIND:
            spec = obj.get("spec") or {}
            key = (spec.get("group", ""), (spec.get("names") or {}).get("kind", ""))
            found[key] = LayerCrd(obj["metadata"]["name"], "created by this layer")
        elif _group_kind(obj) == (GATEKEEPER_TEMPLATES_GROUP, "ConstraintTemplate"):
            kind = ((((obj.get("spec") or {}).get("crd") or {}).get("spec") or {}).get("names") or {}).get("kind")
            if kind:
                found[(GATEKEEPER_CONSTRAINTS_GROUP, kind)] = LayerCrd(
                    f"{kind.lower()}.{GATEKEEPER_CONSTRAINTS_GROUP}",
                    f"made by Gatekeeper from ConstraintTemplate {obj['metadata']['name']} of this layer",
                )
    return found


def _require_served_kinds(
    kube: KubernetesClient, objects: list[dict[str, Any]], layer_crds: dict[tuple[str, str], LayerCrd]
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


def _wait_established(
    kube: KubernetesClient, crd: LayerCrd, manifest: dict[str, Any], deadline: float, clock: Callable[[], float]
) -> None:
    """Until the CRD is Established and discovery serves its kind (the two are published separately)."""
    try:
        kube.wait_for(CRD_API_VERSION, CRD_KIND, crd.name, None, condition_true("Established"),
                      timeout=max(deadline - clock(), 0.0))
    except WaitTimeout as exc:
        raise LayerError(
            f"kubernetes: CustomResourceDefinition {crd.name} ({crd.origin}) is not Established, so its custom "
            f"resources cannot be applied: {exc}"
        ) from None
    while not _served(kube, manifest):
        if clock() >= deadline:
            raise LayerError(
                f"kubernetes: CustomResourceDefinition {crd.name} ({crd.origin}) is Established but the API "
                f"server's discovery does not serve {object_ref(manifest)}'s kind yet"
            )
        time.sleep(DISCOVERY_POLL_SECONDS)


def _wait_ready(
    kube: KubernetesClient, obj: dict[str, Any], timeout: float, layer_timeout: float
) -> tuple[bool, str | None]:
    readiness = readiness_of(obj)
    if readiness is None or readiness.holds(obj):
        return True, None
    api_version, kind, name, namespace = _identity(obj)
    try:
        if timeout <= 0:  # the layer's deadline has passed: the object as the apply answered it
            raise WaitTimeout("no time left", obj)
        kube.wait_for(api_version, kind, name, namespace, readiness, timeout=timeout)
    except WaitTimeout as timed_out:
        last = timed_out.last
        if readiness.failed(last):
            return False, f"will not be {readiness.description}: {status_summary(last)}"
        return False, f"not {readiness.description} within the layer's {layer_timeout:g} s wait: {status_summary(last)}"
    return True, None


def readiness_of(obj: dict[str, Any]) -> Condition | None:
    """The condition that makes an applied object ready; None when applying it is enough."""
    kind = obj.get("kind")
    group = _group_of(str(obj.get("apiVersion", "")))
    if group == "apps" and kind == "Deployment":
        return Condition("available", _deployment_rolled_out, _deployment_past_deadline)
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


def _deployment_rolled_out(obj: dict[str, Any] | None) -> bool:
    """`kubectl rollout status`: every replica updated and available, no old replica left."""
    if obj is None or not _observed(obj) or _deployment_past_deadline(obj):
        return False
    status = obj.get("status") or {}
    updated = status.get("updatedReplicas") or 0
    return (
        updated >= _replicas(obj)
        and (status.get("replicas") or 0) <= updated
        and (status.get("availableReplicas") or 0) >= updated
    )


def _deployment_past_deadline(obj: dict[str, Any] | None) -> bool:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return True
    return False


def _statefulset_ready(obj: dict[str, Any] | None) -> bool:
    if obj is None or not _observed(obj):
        return False
    status = obj.get("status") or {}
    if (status.get("readyReplicas") or 0) < _replicas(obj):
        return False
    update, current = status.get("updateRevision"), status.get("currentRevision")
    return update is None or current is None or update == current


def _daemonset_ready(obj: dict[str, Any] | None) -> bool:
    if obj is None or not _observed(obj):
        return False
    status = obj.get("status") or {}
    desired = status.get("desiredNumberScheduled")
    if desired is None:
        return False
    updated = status.get("updatedNumberScheduled", status.get("numberReady"))
    available = status.get("numberAvailable", status.get("numberReady"))
    return (updated or 0) >= desired and (available or 0) >= desired


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
        if status.get("updatedReplicas") is not None and status["updatedReplicas"] < _replicas(obj):
            parts.append(f"{status['updatedReplicas']}/{_replicas(obj)} updated")
        if (status.get("replicas") or 0) > (status.get("updatedReplicas") or 0):
            parts.append(f"{status['replicas'] - (status.get('updatedReplicas') or 0)} old replica(s) left")
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
    """Each manifest against its live object, the way ``kubectl diff`` compares them.

    The API server dry-runs a forced apply of the manifest onto the live
    object (nothing is stored) and the result is compared with the live
    object, status and server-managed metadata left out. Defaults, values
    the server normalises (``1000m`` stored as ``1``) and fields other
    managers add are in both, so they are not drift; what differs is what
    an apply would change. Lists whose items all carry a ``name`` are
    compared item by item, other lists whole. Each difference names the
    field managers that own the live value (from the live ``managedFields``).
    The live object and the dry run are of one resourceVersion: when a
    controller writes in between, both are made again.
    """
    rows: list[DriftRow] = []
    for manifest in objects:
        ref = object_ref(manifest)
        api_version, kind, _, namespace = _identity(manifest)
        try:
            result = _dry_run_on_one_version(kube, manifest)
        except KindNotServed:
            rows.append(DriftRow(ref, "missing", [f"kind {kind} ({api_version}) is not served by the cluster"]))
            continue
        except NamespaceNotFound:
            rows.append(DriftRow(ref, "missing", [f"not found in the cluster (namespace {namespace} does not exist)"]))
            continue
        if result.before is None:
            rows.append(DriftRow(ref, "missing", ["not found in the cluster"]))
            continue
        live = result.before
        differences = [
            _difference(path, planned, current, field_managers(live, path))
            for path, current, planned in _changed_paths(_without_server_fields(live),
                                                         _without_server_fields(result.object), ())
        ]
        rows.append(DriftRow(ref, "drifted" if differences else "in_sync", differences))
    return DriftReport(rows)


_ABSENT = object()


def _dry_run_on_one_version(kube: KubernetesClient, manifest: dict[str, Any], *, force: bool = True) -> ApplyResult:
    """A dry-run apply whose live object (``before``) is the version it was applied to."""
    for _ in range(DRY_RUN_READS):
        result = kube.apply(manifest, dry_run=True, force=force)
        if result.before is None or _version(result.before) == _version(result.object):
            break
    return result


def _version(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _changed_paths(live: Any, planned: Any, path: tuple) -> Iterable[tuple[tuple, Any, Any]]:
    """(path, live value, planned value) for each place the two differ."""
    if isinstance(live, dict) and isinstance(planned, dict):
        for key in [*planned, *(key for key in live if key not in planned)]:
            yield from _changed_paths(live.get(key, _ABSENT), planned.get(key, _ABSENT), (*path, key))
    elif isinstance(live, list) and isinstance(planned, list) and _named_items(live) and _named_items(planned):
        live_by_name = {item["name"]: item for item in live}
        planned_by_name = {item["name"]: item for item in planned}
        for name in [*planned_by_name, *(name for name in live_by_name if name not in planned_by_name)]:
            yield from _changed_paths(live_by_name.get(name, _ABSENT), planned_by_name.get(name, _ABSENT),
                                      (*path, {"name": name}))
    elif live != planned:
        yield path, live, planned


def _named_items(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def _difference(path: FieldPath, planned: Any, live: Any, managers: list[str]) -> str:
    owners = f" (set by {', '.join(repr(m) for m in managers)})" if managers and live is not _ABSENT else ""
    return f"{_path_text(path)}: manifest {_shown(planned)}, live {_shown(live)}{owners}"


def _path_text(path: FieldPath) -> str:
    text = ""
    for segment in path:
        if isinstance(segment, dict):
            text += "".join(f"[{key}={value}]" for key, value in segment.items())
        else:
            text += f".{segment}" if text else str(segment)
    return text


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
