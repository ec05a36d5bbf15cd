"""The evidence the controls judge: a snapshot of objects, cluster facts and this graph's runs.

Three sources make an :class:`Evidence`:
- :func:`collect_cluster_evidence` lists, through the one Kubernetes client,
  every kind the controls read; a kind the cluster does not serve (a CRD that
  is not installed: Gatekeeper, Istio) is recorded in ``not_installed`` and
  the controls that need it report it;
- :func:`load_manifests` reads every YAML document under a directory (the
  static part, for CI); Helm templates cannot be judged before rendering and
  are listed as skipped;
- :class:`GraphEvidence`: what this asset graph's own runs proved about
  backups, restore tests and certificates, built by the Dagster asset from
  the check results those runs yielded (never from "the latest
  materialization", which a failed run leaves untouched).

Objects are plain dicts (the JSON of the API) with ``apiVersion`` and ``kind``
set. The helpers at the end (:func:`ref`, :func:`pod_spec`,
:func:`selector_matches`...) are what controls use to read them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

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
    "Deployment": ("apps/v1",),
    "StatefulSet": ("apps/v1",),
    "DaemonSet": ("apps/v1",),
    "Job": ("batch/v1",),
    "CronJob": ("batch/v1",),
    "NetworkPolicy": ("networking.k8s.io/v1",),
    "Ingress": ("networking.k8s.io/v1",),
    "Role": ("rbac.authorization.k8s.io/v1",),
    "ClusterRole": ("rbac.authorization.k8s.io/v1",),
    "RoleBinding": ("rbac.authorization.k8s.io/v1",),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1",),
    "PodDisruptionBudget": ("policy/v1",),
    "HorizontalPodAutoscaler": ("autoscaling/v2",),
    "PeerAuthentication": ("security.istio.io/v1", "security.istio.io/v1beta1"),
    "ConstraintTemplate": ("templates.gatekeeper.sh/v1", "templates.gatekeeper.sh/v1beta1"),
}
CONSTRAINTS_GROUP = "constraints.gatekeeper.sh"
CONSTRAINT_API_VERSIONS = (f"{CONSTRAINTS_GROUP}/v1beta1", f"{CONSTRAINTS_GROUP}/v1")
CONSTRAINTS = "Constraint"
"""Pseudo-kind a control reads to get every Gatekeeper constraint, whatever its kind."""
# Listing every pod of a cluster is costly and only the API server's static pods are needed.
POD_SCOPE = ("kube-system", "component=kube-apiserver")

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
    path: str
    reason: str


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
    locations: dict[str, str] = field(default_factory=dict)
    """Object ref -> the manifest file it came from."""
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
                if label_key in labels_of(ns) and (not has_value or labels_of(ns)[label_key] == label_value)
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

    def add(self, obj: Obj, location: str | None = None) -> None:
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
) -> Evidence:
    """List every kind in ``kinds`` (default: every kind the catalogue reads) from the cluster.

    A kind the cluster does not serve is recorded in ``not_installed``; any
    other API error (refused, unreachable) is raised, since a snapshot with
    holes would make a report that lies.
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
    for kind in wanted:
        if kind == CONSTRAINTS:
            _collect_constraints(kube, evidence)
            continue
        api_versions = KIND_API_VERSIONS.get(kind)
        if api_versions is None:
            raise ValueError(f"compliance: no API version known for kind {kind!r} (add it to KIND_API_VERSIONS)")
        namespace, selector = POD_SCOPE if kind == "Pod" else (None, None)
        listed = _list_first_served(kube, kind, api_versions, namespace, selector)
        if listed is None:
            evidence.not_installed[kind] = (
                f"the cluster does not serve {kind} ({' or '.join(api_versions)}): its CRD is not installed"
            )
            continue
        api_version, objects = listed
        for obj in objects:
            evidence.add(_typed(obj, api_version, kind))
    return evidence


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
_SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__"}


def load_manifests(path: str | os.PathLike[str], *, graph: GraphEvidence | None = None) -> Evidence:
    """Every Kubernetes object in the YAML files under ``path`` (a file or a directory).

    Multi-document files are split, empty documents and ``v1 List`` wrappers
    handled, documents that are not Kubernetes objects (the platform spec,
    Helm values) and Helm templates are listed in ``skipped``. Invalid YAML
    raises :class:`ManifestError` naming the file and line.
    """
    root = Path(path)
    if not root.exists():
        raise ManifestError(f"compliance: manifests path {root} does not exist")
    evidence = Evidence(
        source=f"manifests {root}",
        kinds=frozenset({"manifests", "graph"} if graph is not None else {"manifests"}),
        graph=graph,
    )
    for file in _manifest_files(root):
        shown = str(file)
        if _is_helm_template(file):
            evidence.skipped.append(SkippedDocument(shown, "Helm template: render it (helm template) to check it"))
            continue
        documents = _documents(file)
        if isinstance(documents, SkippedDocument):
            evidence.skipped.append(documents)
            continue
        for index, document in enumerate(documents):
            where = f"{shown}#{index + 1}" if len(documents) > 1 else shown
            for obj in _objects_of(document):
                if obj is None:
                    evidence.skipped.append(SkippedDocument(where, "not a Kubernetes object (no apiVersion/kind)"))
                else:
                    evidence.add(obj, where)
    return evidence


def _manifest_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(MANIFEST_SUFFIXES):
                yield Path(directory) / name


def _is_helm_template(file: Path) -> bool:
    """A file under ``templates/`` of a Helm chart (a directory with a Chart.yaml)."""
    parts = file.parts[:-1]
    if "templates" not in parts:
        return False
    chart_dir = file.parents[file.parts[::-1].index("templates")]
    return (chart_dir / "Chart.yaml").is_file()


def _documents(file: Path) -> list[Any] | SkippedDocument:
    """The documents of a file; a SkippedDocument for an unrendered template outside a chart."""
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"compliance: cannot read manifest {file}: {exc}") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return [document for document in yaml.load_all(text, Loader=loader) if document is not None]
    except yaml.YAMLError as exc:
        if "{{" in text:
            return SkippedDocument(str(file), "template (contains {{ }}), not YAML: render it to check it")
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(f"compliance: {file}{where}: not valid YAML: {problem}") from None


def _objects_of(document: Any) -> Iterator[Obj | None]:
    if not (isinstance(document, dict) and document.get("apiVersion") and document.get("kind")):
        yield None
        return
    if str(document["kind"]).endswith("List") and isinstance(document.get("items"), list):
        for item in document.get("items") or []:
            yield from _objects_of(item)
        return
    if not isinstance(document.get("metadata"), dict) or not document["metadata"].get("name"):
        yield None
        return
    yield document


def name_of(obj: Obj) -> str:
    return (obj.get("metadata") or {}).get("name") or "?"


def namespace_of(obj: Obj) -> str:
    """The object's namespace; ``default`` for a namespaced manifest that names none, as kubectl would."""
    return (obj.get("metadata") or {}).get("namespace") or "default"


def labels_of(obj: Obj) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def is_cluster_scoped(obj: Obj) -> bool:
    return obj.get("kind") in CLUSTER_SCOPED_KINDS or str(obj.get("apiVersion", "")).startswith(
        CONSTRAINTS_GROUP + "/"
    )


def ref(obj: Obj) -> str:
    """``"Kind namespace/name"``, or ``"Kind name"`` for a cluster-scoped object."""
    if is_cluster_scoped(obj):
        return f"{obj.get('kind')} {name_of(obj)}"
    return f"{obj.get('kind')} {namespace_of(obj)}/{name_of(obj)}"


def pod_spec(obj: Obj) -> Obj:
    """The pod spec of a workload (Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob)."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    return ((spec.get("template") or {}).get("spec")) or {}


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj.get("kind") == "Pod":
        return labels_of(obj)
    return ((obj.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}


def containers(spec: Obj) -> list[Obj]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def is_controlled(obj: Obj) -> bool:
    """Made by a controller (a Job of a CronJob, a Pod of a ReplicaSet): its owner is judged instead."""
    return any(owner.get("controller") for owner in (obj.get("metadata") or {}).get("ownerReferences") or [])


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector selects ``labels``; an empty selector selects everything, None nothing."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True
