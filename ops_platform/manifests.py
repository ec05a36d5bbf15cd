"""Kubernetes manifests of the infra layers: read in apply order, validated before any cluster sees them.

Plain Python, no Dagster import. A layer is a directory of YAML files
(``infra/layers/<layer>``); :func:`load_layer_manifests` returns every document
of it in the order a server-side apply must follow: CRDs, then Namespaces and
the other cluster-wide prerequisites, then namespaced built-ins (Helm's install
order), then custom resources, Gatekeeper constraints last (their kinds exist
only once the ConstraintTemplates have been processed).

:func:`validate_manifest` returns the problems of one object, as the API
server would report them with strict field validation:

- built-in kinds against the OpenAPI schemas of Kubernetes
  :data:`KUBERNETES_VERSION`, through ``kubernetes-validate`` in strict mode
  (unknown fields are errors);
- custom resources against the ``openAPIV3Schema`` of their CRD, kept as data
  in ``infra/crds/<group>/<kind>.yaml`` (a trimmed copy of the upstream CRD:
  unknown fields are errors unless the schema preserves them, as the API
  server does with ``fieldValidation=Strict``);
- for every object: metadata names and labels that the API server would
  refuse, and a namespace on namespaced kinds (a manifest without one would
  land in whatever namespace the applying client defaults to).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ops_platform.errors import OpsPlatformError
from ops_platform.spec import REPO_ROOT

# Validation needs jsonschema and kubernetes-validate (dev dependencies): imported where
# a manifest is validated, so loading and applying manifests needs neither.

KUBERNETES_VERSION = "1.30"
CRD_SCHEMA_DIR = REPO_ROOT / "infra" / "crds"
MANIFEST_SUFFIXES = (".yaml", ".yml")
GATEKEEPER_CONSTRAINTS_GROUP = "constraints.gatekeeper.sh"
GATEKEEPER_CONSTRAINT_VERSION = "v1beta1"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Helm's install order for built-in kinds, CRDs and Namespaces first.
BUILTIN_APPLY_ORDER: tuple[str, ...] = (
    "CustomResourceDefinition",
    "Namespace",
    "PriorityClass",
    "StorageClass",
    "IngressClass",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicaSet",
    "Deployment",
    "StatefulSet",
    "HorizontalPodAutoscaler",
    "Job",
    "CronJob",
    "Ingress",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
)
# Custom resources that others refer to by name go before the rest.
REFERENCED_CUSTOM_KINDS: tuple[str, ...] = (
    "ConstraintTemplate",
    "ClusterSecretStore",
    "SecretStore",
    "ClusterIssuer",
    "Issuer",
    "VolumeSnapshotClass",
    "AppProject",
    "BackupStorageLocation",
)

CLUSTER_SCOPED_BUILTIN_KINDS = frozenset(
    {
        "APIService",
        "CertificateSigningRequest",
        "ClusterRole",
        "ClusterRoleBinding",
        "CSIDriver",
        "CSINode",
        "CustomResourceDefinition",
        "FlowSchema",
        "IngressClass",
        "MutatingWebhookConfiguration",
        "Namespace",
        "Node",
        "PersistentVolume",
        "PriorityClass",
        "PriorityLevelConfiguration",
        "RuntimeClass",
        "StorageClass",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ValidatingWebhookConfiguration",
        "VolumeAttachment",
    }
)

# Groups under k8s.io that are served by CRDs, not by the API server itself.
_CUSTOM_K8S_IO_GROUPS = frozenset({"snapshot.storage.k8s.io", "autoscaling.k8s.io", "gateway.networking.k8s.io"})

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# ObjectMeta as a manifest may carry it; the API server fills in the rest.
_OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


class ManifestError(OpsPlatformError):
    """A manifest file cannot be read as Kubernetes objects."""


@dataclass(frozen=True)
class ManifestDocument:
    """One YAML document of a manifest file, with where it came from."""

    source: Path
    index: int
    obj: dict[str, Any]

    @property
    def location(self) -> str:
        try:
            shown = self.source.relative_to(REPO_ROOT)
        except ValueError:
            shown = self.source
        return f"{shown} (document {self.index + 1})"


def resolve_manifest_dir(path: Path | str) -> Path:
    """A layer's manifest directory; relative paths (as in infra/platform.yaml) resolve from the repo root."""
    chosen = Path(path)
    if not chosen.is_absolute():
        cwd_candidate = Path.cwd() / chosen
        chosen = cwd_candidate if cwd_candidate.exists() else REPO_ROOT / chosen
    return chosen


def read_manifest_documents(path: Path | str) -> list[ManifestDocument]:
    """Every non-empty YAML document under ``path`` (a directory, recursively, or one file), in file order."""
    root = resolve_manifest_dir(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
    else:
        raise ManifestError(
            f"manifests: {path} does not exist (check layers[].manifests in infra/platform.yaml)"
        )
    documents: list[ManifestDocument] = []
    for file in files:
        documents.extend(_read_file(file))
    return documents


def _read_file(file: Path) -> Iterator[ManifestDocument]:
    try:
        raw_documents = list(yaml.load_all(file.read_text(), Loader=_YAML_LOADER))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(f"manifests: {file}: {where}not valid YAML: {problem}") from None
    except OSError as exc:
        raise ManifestError(f"manifests: cannot read {file}: {exc.strerror}") from None
    for index, raw in enumerate(raw_documents):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ManifestError(
                f"manifests: {file} (document {index + 1}) is a {type(raw).__name__}, not a Kubernetes object"
            )
        yield ManifestDocument(file, index, raw)


def load_layer_manifests(path: Path | str) -> list[dict[str, Any]]:
    """Every object of a layer directory, in apply order (CRDs and Namespaces first)."""
    return [document.obj for document in apply_order(read_manifest_documents(path))]


def apply_order(documents: Iterable[ManifestDocument]) -> list[ManifestDocument]:
    """Sort by kind rank, keeping file order within a rank."""
    return sorted(documents, key=lambda document: _apply_rank(document.obj))


def _apply_rank(obj: dict[str, Any]) -> int:
    kind = str(obj.get("kind", ""))
    group = _group_of(str(obj.get("apiVersion", "")))
    if group == GATEKEEPER_CONSTRAINTS_GROUP:
        return len(BUILTIN_APPLY_ORDER) + len(REFERENCED_CUSTOM_KINDS) + 2
    if kind in BUILTIN_APPLY_ORDER and _is_builtin_group(group):
        return BUILTIN_APPLY_ORDER.index(kind)
    if kind in REFERENCED_CUSTOM_KINDS:
        return len(BUILTIN_APPLY_ORDER) + REFERENCED_CUSTOM_KINDS.index(kind)
    if _is_builtin_group(group):
        return len(BUILTIN_APPLY_ORDER) - 1
    return len(BUILTIN_APPLY_ORDER) + len(REFERENCED_CUSTOM_KINDS) + 1


def _group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def _is_builtin_group(group: str) -> bool:
    return "." not in group or group.endswith(".k8s.io") and group not in _CUSTOM_K8S_IO_GROUPS


def object_ref(obj: dict[str, Any]) -> str:
    """``Kind namespace/name`` (or ``Kind name`` for cluster-scoped objects), for messages."""
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = metadata.get("name", "<no name>")
    namespace = metadata.get("namespace")
    kind = obj.get("kind", "<no kind>")
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


class CrdSchemas:
    """The openAPIV3Schema of each custom resource kind, from CRDs kept as data."""

    def __init__(self, crds: Iterable[dict[str, Any]]) -> None:
        self._validators: dict[tuple[str, str, str], Any] = {}
        self._scopes: dict[tuple[str, str], str] = {}
        self._sources: dict[tuple[str, str], str] = {}
        for crd in crds:
            self.add(crd)

    @classmethod
    def load(cls, directory: Path | str = CRD_SCHEMA_DIR) -> CrdSchemas:
        documents = read_manifest_documents(directory)
        schemas = cls([])
        for document in documents:
            if document.obj.get("kind") != "CustomResourceDefinition":
                raise ManifestError(
                    f"CRD schemas: {document.location} is a {document.obj.get('kind')}, "
                    "only CustomResourceDefinitions belong in infra/crds"
                )
            schemas.add(document.obj, source=document.location)
        return schemas

    def add(self, crd: dict[str, Any], source: str = "<memory>") -> None:
        spec = crd["spec"]
        group, kind = spec["group"], spec["names"]["kind"]
        self._scopes[(group, kind)] = spec.get("scope", "Namespaced")
        self._sources[(group, kind)] = source
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            schema = _to_json_schema(version["schema"]["openAPIV3Schema"])
            properties = schema.setdefault("properties", {})
            properties["apiVersion"] = {"const": f"{group}/{version['name']}"}
            properties["kind"] = {"const": kind}
            properties["metadata"] = _OBJECT_META_SCHEMA
            schema.setdefault("required", [])
            schema["required"] = sorted({*schema["required"], "apiVersion", "kind", "metadata"})
            import jsonschema

            self._validators[(group, version["name"], kind)] = jsonschema.Draft202012Validator(schema)

    def covers(self, api_version: str, kind: str) -> bool:
        group, _, version = api_version.rpartition("/")
        return (group, version, kind) in self._validators

    def knows_kind(self, api_version: str, kind: str) -> bool:
        return (_group_of(api_version), kind) in self._scopes

    def scope(self, api_version: str, kind: str) -> str | None:
        return self._scopes.get((_group_of(api_version), kind))

    def served_versions(self, api_version: str, kind: str) -> list[str]:
        group = _group_of(api_version)
        return sorted(v for (g, v, k) in self._validators if g == group and k == kind)

    def source(self, api_version: str, kind: str) -> str | None:
        return self._sources.get((_group_of(api_version), kind))

    def problems(self, obj: dict[str, Any]) -> list[str]:
        group, _, version = str(obj["apiVersion"]).rpartition("/")
        validator = self._validators[(group, version, obj["kind"])]
        errors = sorted(validator.iter_errors(obj), key=lambda error: list(map(str, error.absolute_path)))
        return [f"{_json_path(error.absolute_path)}: {error.message}" for error in errors]


def _to_json_schema(node: dict[str, Any], in_junctor: bool = False) -> dict[str, Any]:
    """A Kubernetes structural schema as JSON Schema, strict like ``fieldValidation=Strict``.

    Objects reject fields their schema does not list unless it says
    ``x-kubernetes-preserve-unknown-fields``; ``x-kubernetes-int-or-string``
    and ``nullable`` become their JSON Schema equivalents. Inside
    allOf/anyOf/oneOf branches (value validations over fields declared
    outside them) nothing is made strict.
    """
    schema = {key: value for key, value in node.items() if key != "description"}
    if "properties" in schema:
        schema["properties"] = {
            name: _to_json_schema(child, in_junctor=in_junctor) for name, child in schema["properties"].items()
        }
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _to_json_schema(schema["additionalProperties"], in_junctor=in_junctor)
    if isinstance(schema.get("items"), dict):
        schema["items"] = _to_json_schema(schema["items"], in_junctor=in_junctor)
    for junctor in ("allOf", "anyOf", "oneOf"):
        if junctor in schema:
            schema[junctor] = [_to_json_schema(branch, in_junctor=True) for branch in schema[junctor]]
    if isinstance(schema.get("not"), dict):
        schema["not"] = _to_json_schema(schema["not"], in_junctor=True)
    preserve_unknown = schema.pop("x-kubernetes-preserve-unknown-fields", False)
    if schema.pop("x-kubernetes-int-or-string", False) and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        schema.get("type") == "object"
        and "additionalProperties" not in schema
        and not preserve_unknown
        and not in_junctor
    ):
        schema["additionalProperties"] = False
    if schema.pop("nullable", False) and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    return schema


def _json_path(path: Iterable[Any]) -> str:
    shown = ""
    for part in path:
        shown += f"[{part}]" if isinstance(part, int) else (f".{part}" if shown else str(part))
    return shown or "(top level)"


@functools.lru_cache(maxsize=4)
def _default_crd_schemas(directory: str) -> CrdSchemas:
    return CrdSchemas.load(directory)


def validate_manifest(
    obj: dict[str, Any],
    crd_schemas: CrdSchemas | None = None,
    kubernetes_version: str = KUBERNETES_VERSION,
) -> list[str]:
    """The problems of one object ([] when the API server would accept it), each prefixed with ``Kind ns/name``."""
    ref = object_ref(obj)
    basics = _basic_problems(obj)
    if basics:
        return [f"{ref}: {problem}" for problem in basics]
    schemas = crd_schemas if crd_schemas is not None else _default_crd_schemas(str(CRD_SCHEMA_DIR))
    api_version, kind = obj["apiVersion"], obj["kind"]
    problems = _metadata_problems(obj["metadata"])
    if schemas.covers(api_version, kind):
        problems += schemas.problems(obj)
        scope = schemas.scope(api_version, kind)
    elif schemas.knows_kind(api_version, kind):
        served = ", ".join(schemas.served_versions(api_version, kind))
        problems.append(
            f"apiVersion {api_version} is not served for {kind} (served: {served}; "
            f"see {schemas.source(api_version, kind)})"
        )
        scope = None
    elif _is_builtin_group(_group_of(api_version)):
        problems += _builtin_problems(obj, kubernetes_version)
        scope = "Cluster" if kind in CLUSTER_SCOPED_BUILTIN_KINDS else "Namespaced"
    else:
        problems.append(
            f"no schema for {kind} ({api_version}): not a Kubernetes {kubernetes_version} kind and no CRD "
            f"in {CRD_SCHEMA_DIR.relative_to(REPO_ROOT)}/{_group_of(api_version)}/ (add a trimmed copy of its CRD)"
        )
        scope = None
    problems += _scope_problems(obj["metadata"], scope)
    return [f"{ref}: {problem}" for problem in problems]


def _basic_problems(obj: dict[str, Any]) -> list[str]:
    problems = []
    for field in ("apiVersion", "kind"):
        if not isinstance(obj.get(field), str) or not obj.get(field):
            problems.append(f"{field} is missing")
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        problems.append("metadata is missing")
    elif not isinstance(metadata.get("name"), str) or not metadata.get("name"):
        problems.append("metadata.name is missing")
    return problems


def _metadata_problems(metadata: dict[str, Any]) -> list[str]:
    problems = []
    name = metadata["name"]
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        problems.append(f"metadata.name {name!r} is not a DNS subdomain (lower case, digits, '-' and '.')")
    namespace = metadata.get("namespace")
    namespace_ok = isinstance(namespace, str) and len(namespace) <= 63 and _DNS_LABEL.match(namespace)
    if namespace is not None and not namespace_ok:
        problems.append(f"metadata.namespace {namespace!r} is not a DNS label")
    for key, value in (metadata.get("labels") or {}).items():
        problems += _label_key_problems(str(key), "metadata.labels")
        if not isinstance(value, str):
            problems.append(f"metadata.labels.{key}: value {value!r} must be a string (quote it)")
        elif len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"metadata.labels.{key}: {value!r} is not a valid label value")
    for key, value in (metadata.get("annotations") or {}).items():
        problems += _label_key_problems(str(key), "metadata.annotations")
        if not isinstance(value, str):
            problems.append(f"metadata.annotations.{key}: value {value!r} must be a string (quote it)")
    return problems


def _label_key_problems(key: str, where: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    prefix_ok = not prefix or (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix))
    if not prefix_ok or len(name) > 63 or not _LABEL_NAME.match(name):
        return [f"{where}: key {key!r} is not a qualified name"]
    return []


def _scope_problems(metadata: dict[str, Any], scope: str | None) -> list[str]:
    if scope == "Namespaced" and not metadata.get("namespace"):
        return [
            "metadata.namespace is missing "
            "(a namespaced object would land in the applying client's default namespace)"
        ]
    if scope == "Cluster" and metadata.get("namespace"):
        return ["metadata.namespace is set on a cluster-scoped kind"]
    return []


def _builtin_problems(obj: dict[str, Any], kubernetes_version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{_json_path(error.path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{obj['apiVersion']} {obj['kind']} is not a kind of Kubernetes {kubernetes_version}"]
    return []


def constraint_crd(template: dict[str, Any]) -> dict[str, Any]:
    """The CRD Gatekeeper creates for the constraint kind of a ConstraintTemplate.

    ``spec.parameters`` takes the template's own schema; ``spec.match`` is
    Gatekeeper's match block, the same for every constraint kind.
    """
    names = template["spec"]["crd"]["spec"]["names"]
    kind = names["kind"]
    parameters = copy.deepcopy(
        template["spec"]["crd"]["spec"].get("validation", {}).get("openAPIV3Schema")
        or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    )
    string_list = {"type": "array", "items": {"type": "string"}}
    selector = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "properties": {
                    "enforcementAction": {"type": "string"},
                    "match": {
                        "type": "object",
                        "properties": {
                            "kinds": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {"apiGroups": string_list, "kinds": string_list},
                                },
                            },
                            "scope": {"type": "string", "enum": ["*", "Cluster", "Namespaced"]},
                            "namespaces": string_list,
                            "excludedNamespaces": string_list,
                            "labelSelector": selector,
                            "namespaceSelector": selector,
                            "name": {"type": "string"},
                            "source": {"type": "string", "enum": ["All", "Generated", "Original"]},
                        },
                    },
                    "parameters": parameters,
                },
            },
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    plural = kind.lower()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GATEKEEPER_CONSTRAINTS_GROUP}",
            "annotations": {
                "ops-platform/source": "generated by Gatekeeper from ConstraintTemplate "
                + template["metadata"]["name"],
            },
        },
        "spec": {
            "group": GATEKEEPER_CONSTRAINTS_GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": plural,
                      "categories": ["constraint", "constraints"]},
            "scope": "Cluster",
            "versions": [
                {
                    "name": GATEKEEPER_CONSTRAINT_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


CHART_DIR = REPO_ROOT / "infra" / "k8s" / "ontology-editor"


class ChartRenderError(OpsPlatformError):
    """Helm refused to render the chart (a missing value, a failing template)."""


def render_chart(
    environment: str,
    values: dict[str, Any] | None = None,
    chart_dir: Path | str = CHART_DIR,
    release_name: str = "ontology-editor",
) -> list[dict[str, Any]]:
    """The objects of the chart for one environment: values.yaml, then values-<environment>.yaml, then ``values``.

    Rendering is Helm's own (helm-python-sdk carries Helm's library), offline.
    """
    chart_path = resolve_manifest_dir(chart_dir)
    values_file = chart_path / f"values-{environment}.yaml"
    if not values_file.is_file():
        raise ChartRenderError(
            f"chart {chart_path}: no values file for environment '{environment}' ({values_file.name})"
        )
    rendered = render_chart_templates(environment, values, chart_path, release_name)
    objects: list[dict[str, Any]] = []
    for template in sorted(rendered):
        for document in yaml.load_all(rendered[template], Loader=_YAML_LOADER):
            if document is not None:
                objects.append(document)
    return objects


def render_chart_templates(
    environment: str | None,
    values: dict[str, Any] | None = None,
    chart_dir: Path | str = CHART_DIR,
    release_name: str = "ontology-editor",
) -> dict[str, str]:
    """Helm's rendering of a chart, template path (``<chart>/templates/<file>``) -> manifest text.

    Values: the chart's values.yaml, then values-<environment>.yaml (none when
    ``environment`` is None), then ``values``. The release namespace is the
    merged ``namespace.name`` when the chart has one.
    """
    import helm_python as helm

    chart_path = resolve_manifest_dir(chart_dir)
    shown = f"chart {chart_path}" + (f" ({environment})" if environment else "")
    merged = deep_merge(_values_file(chart_path / f"values-{environment}.yaml", shown) if environment else {},
                         values or {})
    namespace = merged.get("namespace")
    try:
        with helm.Chart.load(chart_path) as chart:
            return chart.render(
                values=merged, name=release_name,
                namespace=namespace.get("name") if isinstance(namespace, dict) else None,
            )
    except helm.HelmError as exc:
        raise ChartRenderError(f"{shown}: {exc}") from None


def _values_file(path: Path, shown: str) -> dict[str, Any]:
    try:
        values = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    except OSError as exc:
        raise ChartRenderError(f"{shown}: cannot read {path.name}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ChartRenderError(f"{shown}: {path.name}{where}: not valid YAML") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ChartRenderError(f"{shown}: {path.name} holds a {type(values).__name__}, not a mapping of values")
    return values


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, mappings merged key by key (as Helm merges values files)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
