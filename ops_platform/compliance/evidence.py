"""The evidence the controls judge: a snapshot of objects, cluster facts and this graph's runs.

Three sources make an :class:`Evidence`:
- :func:`collect_cluster_evidence` lists, through the one Kubernetes client,
  every kind the controls read; a kind the cluster does not serve (a CRD that
  is not installed: Gatekeeper, Istio) is recorded in ``not_installed`` and
  the controls that need it report it;
- :func:`load_manifests` reads every YAML document under a directory (the
  static part, for CI), streaming, and renders each Helm chart it finds once
  per environment (``values-<env>.yaml``); what it cannot judge is listed
  with its file, document and reason: ``skipped`` (not a Kubernetes object)
  or ``input_problems`` (malformed YAML, unreadable file, a chart that does
  not render), and the rest is still judged;
- :class:`GraphEvidence`: what this asset graph's own runs proved about
  backups, restore tests and certificates, built by the Dagster asset from
  the check results those runs yielded (never from "the latest
  materialization", which a failed run leaves untouched).

Objects are plain dicts (the JSON of the API) with ``apiVersion`` and ``kind``
set. The helpers at the end (:func:`ref`, :func:`name_of`, :func:`namespace_of`)
name them; the controls read their fields through ``controls/shapes.py``.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import BaseResolver

from ops_platform.compliance.model import ControlConfig, EvidenceKind
from ops_platform.errors import OpsPlatformError

if TYPE_CHECKING:
    from ops_platform.resources.kubernetes import KubernetesClient

Obj = dict[str, Any]

# API versions to list each kind at, preferred first.
KIND_API_VERSIONS: dict[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Pod": ("v1",),
    "ResourceQuota": ("v1",),
    "LimitRange": ("v1",),
    "ServiceAccount": ("v1",),
    "Deployment": ("apps/v1",),
    "StatefulSet": ("apps/v1",),
    "DaemonSet": ("apps/v1",),
    "ReplicaSet": ("apps/v1",),
    "Job": ("batch/v1",),
    # Newest first; the older version of the same fields where a cluster (before 1.21 / 1.23) lacks it.
    "CronJob": ("batch/v1", "batch/v1beta1"),
    "NetworkPolicy": ("networking.k8s.io/v1",),
    "Ingress": ("networking.k8s.io/v1",),
    "Role": ("rbac.authorization.k8s.io/v1",),
    "ClusterRole": ("rbac.authorization.k8s.io/v1",),
    "RoleBinding": ("rbac.authorization.k8s.io/v1",),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1",),
    "PodDisruptionBudget": ("policy/v1", "policy/v1beta1"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "autoscaling/v2beta2"),
    "PeerAuthentication": ("security.istio.io/v1", "security.istio.io/v1beta1"),
    "ConstraintTemplate": ("templates.gatekeeper.sh/v1", "templates.gatekeeper.sh/v1beta1"),
}
CONSTRAINTS_GROUP = "constraints.gatekeeper.sh"
CONSTRAINT_API_VERSIONS = (f"{CONSTRAINTS_GROUP}/v1beta1", f"{CONSTRAINTS_GROUP}/v1")
CONSTRAINTS = "Constraint"
"""Pseudo-kind a control reads to get every Gatekeeper constraint, whatever its kind."""
_CONSTRAINTS_PREFIX = CONSTRAINTS_GROUP + "/"
POD_SCOPE = ("kube-system", "component=kube-apiserver")
"""The API server's static pods, which the collector lists besides the app namespaces' pods."""

CLUSTER_SCOPED_KINDS = frozenset({
    "Namespace", "ClusterRole", "ClusterRoleBinding", "ConstraintTemplate", "CustomResourceDefinition",
    "Node", "PersistentVolume", "StorageClass", "IngressClass", "PriorityClass", "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration", "APIService", "VolumeSnapshotClass", "ClusterIssuer",
})
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")


class ManifestError(OpsPlatformError):
    """A manifest file cannot be read or is not valid YAML."""


@dataclass(frozen=True)
class FailedRun:
    """The latest run of an asset failed or was refused: what it said, and where to read it."""

    description: str
    run_id: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class BackupEvidence:
    """A backup that its own run verified (its ``artifact_checksum`` check passed)."""

    datastore: str
    backup_id: str
    recovery_point: datetime | None
    run_id: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class RestoreTestEvidence:
    """The latest restore test of a datastore: ``passed`` only when every one of its checks passed."""

    datastore: str
    passed: bool
    restore_seconds: float | None
    finished_at: datetime
    run_id: str | None = None
    url: str | None = None
    description: str | None = None
    """Why it did not pass (the failed checks' descriptions, or the run's failure)."""


@dataclass(frozen=True)
class CertificateEvidence:
    """One certificate of the latest certificate inventory; ``days_left`` None: its expiry is unknown."""

    name: str
    days_left: float | None
    run_id: str | None = None
    url: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None


@dataclass(frozen=True)
class GraphEvidence:
    """What this asset graph's own runs prove.

    ``datastores`` and ``restore_tested`` name what the spec expects, so a
    datastore that has no backup (or no restore test) at all fails instead of
    going unnoticed; leave them empty to judge only what the lists hold.
    ``rpo_minutes`` / ``rto_minutes`` are the platform's objectives, for any
    datastore the ``*_by_datastore`` maps do not name (see :meth:`rpo_for`).
    ``failed_backups``: datastores whose latest backup run failed (the newest
    verified backup still decides the RPO). ``failed_inventory``: the latest
    certificate inventory run failed, so ``certificates`` is empty;
    ``inventory_taken`` False: no inventory has ever run.
    """

    backups: list[BackupEvidence]
    restore_tests: list[RestoreTestEvidence]
    certificates: list[CertificateEvidence]
    rpo_minutes: int
    rto_minutes: int
    fail_below_days: int
    now: datetime
    datastores: list[str] = field(default_factory=list)
    restore_tested: list[str] = field(default_factory=list)
    rpo_minutes_by_datastore: dict[str, int] = field(default_factory=dict)
    rto_minutes_by_datastore: dict[str, int] = field(default_factory=dict)
    failed_backups: dict[str, FailedRun] = field(default_factory=dict)
    failed_inventory: FailedRun | None = None
    inventory_taken: bool = True

    def rpo_for(self, datastore: str) -> int:
        return self.rpo_minutes_by_datastore.get(datastore, self.rpo_minutes)

    def rto_for(self, datastore: str) -> int:
        return self.rto_minutes_by_datastore.get(datastore, self.rto_minutes)


@dataclass(frozen=True)
class SkippedDocument:
    """A document that is not a Kubernetes object (the platform spec, Helm values): nothing to judge."""

    path: str
    reason: str


@dataclass(frozen=True)
class InputProblem:
    """Input that should have been judged and could not be: the report is incomplete.

    ``path`` is a file or directory, a chart and environment, or a chart
    template; ``document`` (1-based, empty documents not counted) the document
    of the file; ``line`` and ``column`` (1-based) where the problem starts.
    """

    path: str
    reason: str
    document: int | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f" line {self.line}, column {self.column}" if self.line is not None else ""
        if self.document is not None:
            where += f" (document {self.document})"
        return f"{self.path}{where}: {self.reason}"


class RenderedObject(dict):  # type: ignore[type-arg]
    """An object a Helm chart rendered for one environment; :func:`ref` names it ``...@<environment>``,
    so that the same Deployment of dev, staging and prod makes three findings, each with its source."""

    __slots__ = ("environment",)

    def __init__(self, document: Obj, environment: str) -> None:
        super().__init__(document)
        self.environment = environment


@dataclass
class Evidence:
    """A snapshot the controls judge; see the module docstring."""

    source: str
    kinds: frozenset[EvidenceKind]
    objects: dict[str, list[Obj]] = field(default_factory=dict)
    not_installed: dict[str, str] = field(default_factory=dict)
    """Kind -> why it is missing (its CRD is not installed)."""
    cluster_logging_types: tuple[str, ...] | None = None
    """EKS control-plane log types enabled (``describe-cluster``); None: not an EKS fact we have."""
    graph: GraphEvidence | None = None
    skipped: list[SkippedDocument] = field(default_factory=list)
    input_problems: list[InputProblem] = field(default_factory=list)
    locations: dict[str, str] = field(default_factory=dict)
    """Object ref -> where it came from: ``file#<document>``, or ``chart (env): templates/<file>#<document>``."""
    environments: set[str] = field(default_factory=set)
    """The environments Helm charts were rendered for (:class:`RenderedObject`): each is judged apart
    (:meth:`for_environment`), as its own cluster, with the objects of no environment."""
    _index: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_objects(
        cls,
        objects: Iterable[Obj],
        *,
        source: str = "objects",
        kinds: Iterable[EvidenceKind] = ("cluster",),
        **facts: Any,
    ) -> Evidence:
        """Evidence holding ``objects`` (each with apiVersion and kind), e.g. for tests and benchmarks."""
        judged = set(kinds) | ({"graph"} if facts.get("graph") is not None else set())
        evidence = cls(source=source, kinds=frozenset(judged), **facts)  # type: ignore[arg-type]
        for obj in objects:
            evidence.add(obj)
        return evidence

    def of(self, *kinds: str) -> list[Obj]:
        if len(kinds) == 1:
            return self.objects.get(kinds[0], [])
        return [obj for kind in kinds for obj in self.objects.get(kind, [])]

    def constraints(self) -> list[Obj]:
        """Every Gatekeeper constraint, whatever its kind."""
        return [
            obj
            for objects in self.objects.values()
            for obj in objects
            if str(obj.get("apiVersion", "")).startswith(CONSTRAINTS_GROUP + "/")
        ]

    def by_namespace(self, kind: str) -> dict[str, list[Obj]]:
        key = ("by_namespace", kind)
        if key not in self._index:
            grouped: dict[str, list[Obj]] = defaultdict(list)
            for obj in self.of(kind):
                grouped[namespace_of(obj)].append(obj)
            self._index[key] = grouped
        return self._index[key]

    def app_namespaces(self, config: ControlConfig) -> list[str]:
        """App namespaces present in this evidence, sorted.

        A namespace is an app namespace when it carries the configured label or
        is named in the configuration; a configured name counts only when the
        evidence holds its Namespace object or any object in it.
        """
        key = ("app_namespaces", config.app_namespace_label, config.app_namespaces)
        if key not in self._index:
            label_key, has_value, label_value = config.app_namespace_label.partition("=")
            found = {
                name_of(ns)
                for ns in self.of("Namespace")
                if label_key in (labels := labels_of(ns)) and (not has_value or labels[label_key] == label_value)
            }
            configured = set(config.app_namespaces)
            if configured:
                present = {name_of(ns) for ns in self.of("Namespace")}
                for kind, objects in self.objects.items():
                    if kind not in CLUSTER_SCOPED_KINDS:
                        present.update(namespace_of(obj) for obj in objects)
                found |= configured & present
            self._index[key] = sorted(found)
        return self._index[key]

    def for_environment(self, environment: str) -> Evidence:
        """This evidence as one environment's cluster sees it: without the other environments' objects."""
        objects = {
            kind: [obj for obj in objects if type(obj) is not RenderedObject or obj.environment == environment]
            for kind, objects in self.objects.items()
        }
        return replace(self, objects=objects, environments={environment}, _index={})

    def add(self, obj: Obj, location: str | None = None) -> None:
        if type(obj) is RenderedObject:
            self.environments.add(obj.environment)
        self.objects.setdefault(obj["kind"], []).append(obj)
        if location is not None:
            self.locations.setdefault(ref(obj), location)
        self._index.clear()


def collect_cluster_evidence(
    kube: KubernetesClient,
    kinds: Iterable[str] | None = None,
    *,
    cluster_logging_types: Iterable[str] | None = None,
    graph: GraphEvidence | None = None,
    config: ControlConfig | None = None,
) -> Evidence:
    """List every kind in ``kinds`` (default: every kind the catalogue reads) from the cluster.

    Every kind is listed cluster-wide but Pods, listed last: in the app
    namespaces of ``config`` (labelled or named, see
    :meth:`Evidence.app_namespaces`) and the kube-apiserver static pods of
    kube-system (see :func:`_pod_scopes`). A kind the cluster does not serve is
    recorded in ``not_installed``; any other API error (refused, unreachable)
    is raised, since a snapshot with holes would make a report that lies.
    """
    if kinds is None:
        from ops_platform.compliance.controls import CATALOGUE, kinds_read_by

        kinds = kinds_read_by(CATALOGUE)
    evidence = Evidence(
        source=f"cluster {kube.host}",
        kinds=frozenset({"cluster", "graph"} if graph is not None else {"cluster"}),
        cluster_logging_types=tuple(cluster_logging_types) if cluster_logging_types is not None else None,
        graph=graph,
    )
    wanted = list(dict.fromkeys(kinds))
    if CONSTRAINTS in wanted and "ConstraintTemplate" not in wanted:
        wanted.insert(wanted.index(CONSTRAINTS), "ConstraintTemplate")
    if "Pod" in wanted:  # once the Namespaces are in: they say which are app namespaces
        wanted.append(wanted.pop(wanted.index("Pod")))
    for kind in wanted:
        if kind == CONSTRAINTS:
            _collect_constraints(kube, evidence)
            continue
        api_versions = KIND_API_VERSIONS.get(kind)
        if api_versions is None:
            raise ValueError(f"compliance: no API version known for kind {kind!r} (add it to KIND_API_VERSIONS)")
        scopes = _pod_scopes(evidence, config or ControlConfig()) if kind == "Pod" else [(None, None)]
        for namespace, selector in scopes:
            listed = _list_first_served(kube, kind, api_versions, namespace, selector)
            if listed is None:
                evidence.not_installed[kind] = (
                    f"the cluster does not serve {kind} ({' or '.join(api_versions)}): its CRD is not installed"
                )
                break
            api_version, objects = listed
            for obj in objects:
                evidence.add(_typed(obj, api_version, kind))
    return evidence


def _pod_scopes(evidence: Evidence, config: ControlConfig) -> list[tuple[str, str | None]]:
    """(namespace, label selector) to list Pods in: every app namespace (the naked-Pod control), and the
    API server's static pods in kube-system (the audit control). Listing every pod of a cluster is costly
    and no control reads the others."""
    namespaces = sorted(set(evidence.app_namespaces(config)) | set(config.app_namespaces))
    scopes: list[tuple[str, str | None]] = [(namespace, None) for namespace in namespaces]
    if POD_SCOPE[0] not in namespaces:
        scopes.append(POD_SCOPE)
    return scopes


def _collect_constraints(kube: KubernetesClient, evidence: Evidence) -> None:
    if "ConstraintTemplate" in evidence.not_installed:
        return
    for template in evidence.of("ConstraintTemplate"):
        kind = (((template.get("spec") or {}).get("crd") or {}).get("spec") or {}).get("names", {}).get("kind")
        if not kind:
            continue
        listed = _list_first_served(kube, kind, CONSTRAINT_API_VERSIONS, None, None)
        if listed is None:
            evidence.not_installed[kind] = (
                f"ConstraintTemplate {name_of(template)} declares kind {kind} but the cluster does not "
                "serve it (is the template's status created: true?)"
            )
            continue
        api_version, objects = listed
        for obj in objects:
            evidence.add(_typed(obj, api_version, kind))


def _list_first_served(
    kube: KubernetesClient,
    kind: str,
    api_versions: Iterable[str],
    namespace: str | None,
    label_selector: str | None,
) -> tuple[str, list[Obj]] | None:
    from ops_platform.resources.kubernetes import KindNotServed

    for api_version in api_versions:
        try:
            return api_version, kube.list(api_version, kind, namespace, label_selector=label_selector)
        except KindNotServed:
            continue
    return None


def _typed(obj: Obj, api_version: str, kind: str) -> Obj:
    # Items of a built-in list come without apiVersion and kind, as on a real server.
    obj.setdefault("apiVersion", api_version)
    obj.setdefault("kind", kind)
    return obj


def eks_logging_types(describe_cluster: dict[str, Any]) -> tuple[str, ...]:
    """Enabled control-plane log types from an EKS ``describe_cluster`` answer (boto3)."""
    cluster = describe_cluster.get("cluster", describe_cluster)
    types: list[str] = []
    for setup in (cluster.get("logging") or {}).get("clusterLogging") or []:
        if setup.get("enabled"):
            types.extend(setup.get("types") or [])
    return tuple(types)


MANIFEST_SUFFIXES = (".yaml", ".yml")
CHART_FILE = "Chart.yaml"
_SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__"}
_ENVIRONMENT_VALUES = re.compile(r"values-([A-Za-z0-9_.-]+)\.yaml")
_TEMPLATE_ACTION = "{{"
_MAX_DEPTH = 200
_STR, _MAP, _SEQ, _MERGE = (f"tag:yaml.org,2002:{name}" for name in ("str", "map", "seq", "merge"))
_SCALARS = {
    f"tag:yaml.org,2002:{name}": getattr(SafeConstructor, f"construct_yaml_{name}")
    for name in ("null", "bool", "int", "float")
}


def load_manifests(
    path: str | os.PathLike[str],
    *,
    graph: GraphEvidence | None = None,
    chart_values: dict[str, Any] | None = None,
) -> Evidence:
    """Every Kubernetes object in the YAML files under ``path`` (a file or a directory).

    Files are streamed document by document (multi-document files split,
    empty documents dropped, ``v1 List`` wrappers opened); each object's
    location is ``file#<document>``. A directory holding ``Chart.yaml`` is a
    Helm chart: it is rendered (by Helm, offline) once per
    ``values-<env>.yaml`` it has (values.yaml, then that file, then
    ``chart_values``), or once with values.yaml alone, and its objects are
    named ``...@<env>`` and located ``chart (env): templates/<file>#<document>``.
    A file of a chart's ``templates/`` reached without its chart is skipped.

    Documents that are not Kubernetes objects are listed in ``skipped``;
    malformed YAML (with the line and column where the problem starts), an
    unreadable file or directory, an object the API server would refuse for
    its metadata, a chart that does not render, in ``input_problems``: the
    rest is still judged. Only a ``path`` that does not exist raises
    :class:`ManifestError`.
    """
    root = Path(path)
    if not root.exists():
        raise ManifestError(f"compliance: manifests path {root} does not exist")
    evidence = Evidence(
        source=f"manifests {root}",
        kinds=frozenset({"manifests", "graph"} if graph is not None else {"manifests"}),
        graph=graph,
    )
    with collector_paused():
        for found, is_chart in _manifest_sources(root, evidence):
            shown = str(found)
            if is_chart:
                _load_chart(evidence, found, shown, chart_values or {})
            elif (chart := _chart_of_template(found)) is not None:
                evidence.skipped.append(SkippedDocument(
                    shown, f"Helm template of chart {chart}: judged when the chart directory is given (it is rendered)"
                ))
            else:
                _load_file(evidence, found, shown)
    return evidence


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while millions of containers are made that hold no cycle.

    Each full pass walks every live object; while a 50 MB file is read, or its
    findings made, those passes cost a fifth to a third of the time. Garbage
    left meanwhile is collected once the collector is back on.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _manifest_sources(root: Path, evidence: Evidence) -> Iterator[tuple[Path, bool]]:
    """(path, is_chart) of every YAML file and Helm chart under ``root``, in a stable order."""
    if root.is_file():
        yield root, False
        return

    def unreadable(error: OSError) -> None:
        evidence.input_problems.append(
            InputProblem(str(error.filename), f"cannot read the directory: {error.strerror}")
        )

    for directory, subdirs, files in os.walk(root, onerror=unreadable):
        if CHART_FILE in files:
            subdirs[:] = []
            yield Path(directory), True
            continue
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(MANIFEST_SUFFIXES):
                yield Path(directory) / name, False


def _chart_of_template(file: Path) -> Path | None:
    """The chart whose ``templates/`` holds ``file`` (a directory with a Chart.yaml above it), if any."""
    for depth, part in enumerate(reversed(file.parts[:-1]), start=1):
        if part == "templates" and (file.parents[depth] / CHART_FILE).is_file():
            return file.parents[depth]
    return None


def _load_file(evidence: Evidence, file: Path, shown: str) -> None:
    try:
        stream = file.open("rb")
    except OSError as exc:
        evidence.input_problems.append(InputProblem(shown, f"cannot read the file: {exc.strerror}"))
        return
    with stream:
        _load_documents(evidence, stream, shown)


def _load_chart(evidence: Evidence, chart: Path, shown: str, chart_values: dict[str, Any]) -> None:
    from ops_platform.manifests import ChartRenderError, render_chart_templates

    try:
        metadata = yaml.safe_load((chart / CHART_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        evidence.input_problems.append(InputProblem(f"{shown}/{CHART_FILE}", f"cannot read the chart: {exc}"))
        return
    name = metadata.get("name") if isinstance(metadata, dict) else None
    environments = sorted(
        match.group(1) for entry in chart.iterdir() if (match := _ENVIRONMENT_VALUES.fullmatch(entry.name))
    )
    for environment in environments or [None]:
        label = f"{shown} ({environment})" if environment else shown
        try:
            rendered = render_chart_templates(environment, chart_values, chart, str(name or chart.name))
        except ChartRenderError as exc:
            evidence.input_problems.append(InputProblem(label, f"Helm cannot render the chart: {exc}"))
            continue
        for template, text in sorted(rendered.items()):
            if template.endswith(MANIFEST_SUFFIXES):
                _load_documents(evidence, text, f"{label}: {template.partition('/')[2]}", environment)


def _load_documents(evidence: Evidence, stream: Any, shown: str, environment: str | None = None) -> None:
    """Add the objects of each document of ``stream``; a YAML error ends the file with an input problem."""
    loader = _ManifestLoader(stream)
    number = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            document = loader.build(node)
            if document is None:
                continue
            number += 1
            where = f"{shown}#{number}"
            if loader.template_actions:
                where += " (holds {{ }}: judged as written)"
            _add_document(evidence, document, shown, number, where, node.start_mark.line + 1, environment)
    except yaml.MarkedYAMLError as exc:
        holds_action = loader.template_actions or _holds_template_action(stream)
        evidence.input_problems.append(_yaml_problem(exc, shown, number + 1, holds_action))
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        evidence.input_problems.append(InputProblem(shown, f"not YAML text (UTF-8 or UTF-16): {reason}"))
    except RecursionError:
        evidence.input_problems.append(InputProblem(shown, "nested too deeply to judge", number + 1))
    except OSError as exc:
        evidence.input_problems.append(InputProblem(shown, f"cannot read the file: {exc.strerror}"))
    finally:
        loader.dispose()


def _holds_template_action(stream: Any) -> bool:
    """Whether the text holds ``{{`` (read again: only for a file that failed to parse)."""
    if isinstance(stream, str):
        return _TEMPLATE_ACTION in stream
    stream.seek(0)
    tail = b""
    while chunk := stream.read(1 << 20):
        if _TEMPLATE_ACTION.encode() in tail + chunk:
            return True
        tail = chunk[-1:]
    return False


def _yaml_problem(exc: yaml.MarkedYAMLError, shown: str, document: int, saw_template_action: bool) -> InputProblem:
    """Where the problem starts (the context mark: the flow or block that is never closed), and what it is."""
    start = exc.context_mark or exc.problem_mark
    problem = exc.problem or "invalid"
    if exc.problem_mark is not None and exc.problem_mark is not start:
        problem += f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    reason = "not valid YAML: " + (f"{exc.context}: {problem}" if exc.context else problem)
    if saw_template_action:
        reason += " (it holds {{ }}: a Helm template is rendered only from its chart's templates/ folder)"
    if start is None:
        return InputProblem(shown, reason, document)
    return InputProblem(shown, reason, document, start.line + 1, start.column + 1)


def _add_document(
    evidence: Evidence, document: Any, shown: str, number: int, where: str, line: int, environment: str | None,
    item: str = "",
) -> None:
    """Add the object(s) of document ``number`` of ``shown`` (its location ``where``, starting at ``line``);
    ``item`` is the place in a List (``items[3]``)."""
    if not isinstance(document, dict) or not document.get("apiVersion") or not document.get("kind"):
        evidence.skipped.append(SkippedDocument(where, "not a Kubernetes object (no apiVersion/kind)"))
        return
    api_version, kind = document["apiVersion"], document["kind"]
    problem = None
    if not isinstance(api_version, str) or not isinstance(kind, str):
        problem = "apiVersion and kind must be strings"
    elif kind.endswith("List") and "items" in document:
        items = document["items"]
        if isinstance(items, list | None):
            for index, entry in enumerate(items or []):
                _add_document(evidence, entry, shown, number, f"{where} items[{index}]", line, environment,
                              f"{item}items[{index}]: ")
            return
        problem = f"{kind}: items is not a list"
    elif "metadata" not in document:
        evidence.skipped.append(SkippedDocument(where, f"{kind} without metadata: not an object the API serves"))
        return
    elif (metadata_problem := _metadata_problem(document["metadata"])) is not None:
        problem = f"{kind}: {metadata_problem} (the API server would refuse it)"
    if problem is not None:
        evidence.input_problems.append(InputProblem(shown, item + problem, number, line, 1))
        return
    evidence.add(RenderedObject(document, environment) if environment else document, where)


def _metadata_problem(metadata: object) -> str | None:
    if not isinstance(metadata, dict):
        return f"metadata {_shown(metadata)} is not a mapping"
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if not name:
        return "no metadata.name"
    if not isinstance(name, str):
        return f"metadata.name {_shown(name)} is not a string"
    if namespace is not None and not isinstance(namespace, str):
        return f"metadata.namespace {_shown(namespace)} is not a string"
    return None


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


class _ManifestLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML (libyaml's parser when PyYAML has it), built straight from the parser's nodes.

    Documents come one at a time, so a file is never held whole; equal
    strings are shared (``sys.intern``: keys, kinds, label values repeat in
    every object), which with the lighter construction makes a 50 MB file
    take about two thirds of the memory and time of ``yaml.safe_load_all``.
    Tags other than str, map and seq (int, bool, null, merge keys...) are
    constructed by PyYAML's safe constructor, so the values are the same.
    ``template_actions`` says whether a string of the last document held ``{{``.
    """

    template_actions = False
    _plain_tags: ClassVar[dict[str, str]] = {}

    def build(self, node: Any) -> Any:
        """The document of ``node`` (from ``get_node``)."""
        self.template_actions = False
        try:
            return self._build(node, {}, 0)
        finally:  # what construct_document does: nothing of this document stays in the constructor
            self.constructed_objects, self.recursive_objects = {}, {}
            self.state_generators, self.deep_construct = [], False

    def _build(self, node: Any, built: dict[int, Any], depth: int) -> Any:
        kind, tag = node.__class__, node.tag
        if kind is ScalarNode:
            if tag == _STR:
                if _TEMPLATE_ACTION in node.value:
                    self.template_actions = True
                return sys.intern(node.value)
            scalar = _SCALARS.get(tag)
            return scalar(self, node) if scalar is not None else self.construct_object(node, deep=True)
        if id(node) in built:  # an alias
            return built[id(node)]
        if depth > _MAX_DEPTH:
            raise RecursionError
        if kind is MappingNode and tag == _MAP and not any(key.tag == _MERGE for key, _ in node.value):
            mapping: dict[Any, Any] = {}
            built[id(node)] = mapping
            for key_node, value_node in node.value:
                key = self._build(key_node, built, depth + 1)
                try:
                    mapping[key] = self._build(value_node, built, depth + 1)
                except TypeError:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           "found unhashable key", key_node.start_mark) from None
            return mapping
        if kind is SequenceNode and tag == _SEQ:
            items: list[Any] = []
            built[id(node)] = items
            items.extend(self._build(item, built, depth + 1) for item in node.value)
            return items
        return self.construct_object(node, deep=True)

    # No path resolvers are registered; skipping their bookkeeping saves a call per node.
    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is ScalarNode and implicit[0]:
            tag = self._plain_tags.get(value)
            if tag is None:
                tag = BaseResolver.resolve(self, kind, value, implicit)
                if len(self._plain_tags) > 65_536:
                    self._plain_tags.clear()
                self._plain_tags[value] = tag
            return tag
        return BaseResolver.resolve(self, kind, value, implicit)


def _metadata(obj: Obj) -> Obj:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def name_of(obj: Obj) -> str:
    return _metadata(obj).get("name") or "?"


def namespace_of(obj: Obj) -> str:
    """The object's namespace; ``default`` for a namespaced manifest that names none, as kubectl would."""
    return _metadata(obj).get("namespace") or "default"


def labels_of(obj: Obj) -> dict[str, Any]:
    """The object's labels; none when they are not a mapping (an odd shape, which the controls that
    read labels report through ``controls/shapes.py``)."""
    labels = _metadata(obj).get("labels")
    return labels if isinstance(labels, dict) else {}


def is_cluster_scoped(obj: Obj) -> bool:
    return obj.get("kind") in CLUSTER_SCOPED_KINDS or str(obj.get("apiVersion", "")).startswith(_CONSTRAINTS_PREFIX)


def ref(obj: Obj) -> str:
    """``"Kind namespace/name"``, or ``"Kind name"`` for a cluster-scoped object; ``...@<env>`` for an
    object a chart rendered for one environment (:class:`RenderedObject`)."""
    # Inlined (name_of, namespace_of, is_cluster_scoped): called once per finding, a million times at scale.
    metadata = obj.get("metadata") or {}
    kind = obj.get("kind")
    name = metadata.get("name") or "?"
    if kind in CLUSTER_SCOPED_KINDS or str(obj.get("apiVersion", "")).startswith(_CONSTRAINTS_PREFIX):
        shown = f"{kind} {name}"
    else:
        shown = f"{kind} {metadata.get('namespace') or 'default'}/{name}"
    return f"{shown}@{obj.environment}" if type(obj) is RenderedObject else shown
