"""The platform spec: what the Ontology Editor platform is.

`infra/platform.yaml` (or the file named by ``OPS_PLATFORM_SPEC``) is the one
input of the asset graph. This module is the one place it is parsed: every
model forbids unknown keys, and :func:`load_spec` turns any problem into a
:class:`SpecError` naming the file, the field path and the reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from ops_platform.errors import OpsPlatformError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC_PATH = REPO_ROOT / "infra" / "platform.yaml"
SPEC_ENV_VAR = "OPS_PLATFORM_SPEC"

# Names become Dagster asset key parts and Kubernetes label values.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
Owner = Annotated[str, StringConstraints(pattern=r"^(team:[A-Za-z0-9_-]+|[^@\s]+@[^@\s]+\.[^@\s]+)$")]
Cron = Annotated[str, StringConstraints(pattern=r"^\S+( \S+){4}$")]
EnvVarName = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$")]
KubeNamespace = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
AwsAccount = Annotated[str, StringConstraints(pattern=r"^[0-9]{12}$")]
# The chart's namespace (InfraSpec §3.3), where an environment without an entry in `environments` lives.
DEFAULT_NAMESPACE = "ontology-editor"

Playbook = Literal[
    "restart_workload",
    "scale_workload",
    "renew_certificate",
    "rerun_backup",
    "expand_pvc",
    "rollback_deployment",
]
PLAYBOOKS: tuple[str, ...] = get_args(Playbook)

# Which backup methods each engine supports (InfraSpec §7.1).
ENGINE_METHODS: dict[str, tuple[str, ...]] = {
    "postgresql": ("pgbackrest", "pg_dump"),
    "redis": ("rdb",),
    "etcd": ("snapshot",),
    "elasticsearch": ("snapshot",),
    "neo4j": ("backup", "dump"),
    "milvus": ("milvus_backup",),
    "velero": ("velero",),
}
# Connection fields each engine cannot do without.
ENGINE_CONNECTION_FIELDS: dict[str, tuple[str, ...]] = {
    "postgresql": ("host", "port", "database", "user"),
    "redis": ("host", "port"),
    "etcd": ("endpoints",),
    "elasticsearch": ("url",),
    "neo4j": ("url",),
    "milvus": ("url",),
    "velero": ("namespace",),
}
# Dagster `kinds` tag of each engine.
ENGINE_KIND: dict[str, str] = {
    "postgresql": "postgres",
    "redis": "redis",
    "etcd": "etcd",
    "elasticsearch": "elasticsearch",
    "neo4j": "neo4j",
    "milvus": "milvus",
    "velero": "kubernetes",
}


class SpecError(OpsPlatformError):
    """The platform spec is invalid; the message lists every problem found."""

    def __init__(self, path: Path | str, problems: Iterable[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"invalid platform spec {self.path}:\n{lines}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlatformInfo(_Model):
    name: Name
    environments: list[Name] = Field(min_length=1)
    timezone: str = "UTC"
    owner: Owner = "team:platform"
    history_start: date = date(2026, 1, 1)

    @field_validator("environments")
    @classmethod
    def _unique_environments(cls, value: list[str]) -> list[str]:
        _require_unique(value, "environment")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value


class Objectives(_Model):
    rto_minutes: PositiveInt
    rpo_minutes: PositiveInt


class Layer(_Model):
    name: Name
    title: str
    plan_section: int = Field(ge=1)
    manifests: str
    requires: list[Name] = []
    owner: Owner | None = None


class Connection(_Model):
    """Where a datastore answers. Which fields are needed depends on the engine."""

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    database: str | None = None
    user: str | None = None
    password_env: EnvVarName | None = None
    url: str | None = None
    endpoints: list[str] | None = None
    namespace: str | None = None
    data_dir: str | None = None
    # TLS client material (PEM files), for servers that authenticate clients by certificate (etcd over https).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Retention(_Model):
    """How many verified backups to keep: the newest of each of the last N hours, days, weeks.

    Hours, days and weeks are bucketed in ``platform.timezone``. The newest
    verified backup is always kept, whatever the numbers say.
    """

    hourly: int = Field(default=0, ge=0)
    daily: int = Field(default=7, ge=1)
    weekly: int = Field(default=4, ge=0)


class RestoreTest(_Model):
    schedule: Cron = "0 4 * * 0"
    target: Connection
    rename_prefix: str | None = None
    # Elasticsearch / Milvus only: restore into the source cluster itself, under rename_prefix, after a live
    # preflight of its room. Unset, a target that is the source is refused.
    into_source: bool = False
    verify_sql: list[str] = []
    verify_keys: list[str] = []


class PgBackRestOptions(_Model):
    """pgBackRest settings of a PostgreSQL datastore (InfraSpec §7.1).

    The cluster archives its WAL into the same repository (``archive_command``
    ``pgbackrest archive-push``), so any point since the oldest kept full
    backup can be restored: the RPO is held by the WAL archive, not by how
    often a base backup is taken (point-in-time recovery).
    """

    stanza: Name
    pg_path: str  # data directory of the cluster on its host
    pg_host: str | None = None  # pgBackRest TLS server on the database host; unset: local
    pg_host_port: int = Field(default=8432, ge=1, le=65535)
    repo_path: str = "/pgbackrest"
    full_every_days: int = Field(default=1, ge=1)  # older full backup -> full, else incr
    process_max: int = Field(default=2, ge=1)


class ElasticsearchOptions(_Model):
    repository: str  # snapshot repository registered in Elasticsearch (type s3)
    indices: list[str] = ["*"]


class Neo4jOptions(_Model):
    namespace: str  # where the backup Job runs, next to the Neo4j servers
    backup_address: str  # host:port of the online backup listener (Enterprise, 6362)
    image: str = "neo4j:5-enterprise"
    service_account: str = "ops-platform-backup"  # may write the backup bucket (IRSA)
    data_claim: str | None = None  # PVC of the stopped database, for method dump


class MilvusOptions(_Model):
    server_url: str  # Milvus itself (REST v2), to count and drop restored collections
    token_env: EnvVarName | None = None
    collections: list[str] = []  # empty: every collection
    # Milvus of the restore-test target (the Milvus restore_test.target.url's milvus-backup writes to), to count
    # and drop restored collections; its token from restore_test.target.password_env. Unset: server_url, which
    # only restore_test.into_source allows.
    restore_server_url: str | None = None


class VeleroOptions(_Model):
    schedule: str  # Velero Schedule whose template a Backup copies
    included_namespaces: list[str] = []


class Datastore(_Model):
    name: Name
    engine: Literal["postgresql", "redis", "etcd", "elasticsearch", "neo4j", "milvus", "velero"]
    method: str
    layer: Name | None = None
    connection: Connection
    schedule: Cron = "0 * * * *"
    retention: Retention = Retention()
    rpo_minutes: PositiveInt | None = None  # unset: objectives.rpo_minutes
    rto_minutes: PositiveInt | None = None  # unset: objectives.rto_minutes
    restore_test: RestoreTest | None = None
    owner: Owner | None = None
    pgbackrest: PgBackRestOptions | None = None
    elasticsearch: ElasticsearchOptions | None = None
    neo4j: Neo4jOptions | None = None
    milvus: MilvusOptions | None = None
    velero: VeleroOptions | None = None

    @model_validator(mode="after")
    def _method_and_connection_fit_engine(self) -> Datastore:
        methods = ENGINE_METHODS[self.engine]
        if self.method not in methods:
            raise ValueError(
                f"method {self.method!r} is not a backup method of {self.engine} "
                f"(one of: {', '.join(methods)})"
            )
        required_section = {"pgbackrest": "pgbackrest", "velero": "velero"}.get(self.method) or {
            "elasticsearch": "elasticsearch",
            "neo4j": "neo4j",
            "milvus": "milvus",
        }.get(self.engine)
        if required_section and getattr(self, required_section) is None:
            raise ValueError(f"a {self.engine} datastore backed up by {self.method} needs a '{required_section}' section")
        for section in ("pgbackrest", "elasticsearch", "neo4j", "milvus", "velero"):
            if getattr(self, section) is not None and section not in (self.method, self.engine):
                raise ValueError(f"section '{section}' does not apply to {self.engine} / {self.method}")
        for field_name in ENGINE_CONNECTION_FIELDS[self.engine]:
            if getattr(self.connection, field_name) is None:
                raise ValueError(f"connection.{field_name} is required for engine {self.engine}")
        # What the engine's driver needs of these settings, the restore target apart from its source
        # included (one rule with the drivers'). Imported here: the preflight imports this module.
        from ops_platform.backups.preflight import preflight_static

        problems = preflight_static(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class VolumeGroup(_Model):
    name: Name
    selector: str
    namespaces: list[str] = []
    schedule: Cron = "0 */6 * * *"
    keep: int = Field(default=8, ge=1)
    snapshot_class: str | None = None  # VolumeSnapshotClass; unset: the cluster's default
    ready_timeout_minutes: int = Field(default=30, ge=1)
    ebs_volume_tags: dict[str, str] = {}

    @field_validator("selector")
    @classmethod
    def _selector_syntax(cls, value: str) -> str:
        term = r"!?[A-Za-z0-9./_-]+(\s*(=|==|!=)\s*[A-Za-z0-9._-]*|\s+(in|notin)\s+\([^)]*\))?"
        if not re.fullmatch(rf"\s*{term}(\s*,\s*{term})*\s*", value):
            raise ValueError(f"{value!r} is not a Kubernetes label selector")
        return value


class Certificates(_Model):
    renew_before_days: PositiveInt = 21
    fail_below_days: PositiveInt = 14
    schedule: Cron = "0 6 * * *"
    endpoints: list[str] = []

    @field_validator("endpoints")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for endpoint in value:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"endpoint {endpoint!r} is not host:port")
        _require_unique(value, "endpoint")
        return value

    @model_validator(mode="after")
    def _fail_before_renew(self) -> Certificates:
        if self.fail_below_days >= self.renew_before_days:
            raise ValueError(
                f"fail_below_days ({self.fail_below_days}) must be below "
                f"renew_before_days ({self.renew_before_days})"
            )
        return self


class Compliance(_Model):
    exceptions: str = "infra/compliance/exceptions.yaml"
    schedule: Cron = "0 7 * * 1"
    manifests: str = "infra/layers"  # judged offline, and in place of a cluster when none is configured
    app_namespaces: list[str] = []  # besides namespaces labelled ops-platform/app-namespace=true
    admin_roles: list[str] = ["admin", "cluster-admin", "ops-platform:admin"]
    break_glass_groups: list[str] = ["ops-platform:break-glass"]
    # Values every Helm chart is rendered with by the static check, over values.yaml and
    # values-<env>.yaml: what a release supplies at deploy time (the image tag).
    chart_values: dict[str, Any] = {}


class Registry(_Model):
    account: AwsAccount
    region: str


class Environment(_Model):
    """Where one environment (dev, staging, prod) lives: its cluster, namespace, AWS account and region.

    The cluster is ``kube_context`` (a context of ``KUBECONFIG``) or
    ``in_cluster: true`` (the service account of the pod this code runs in);
    neither: the cluster of the ``kubernetes`` resource (``KUBECONFIG`` /
    ``OPS_KUBE_CONTEXT``). Releases of the environment write only to its
    namespace of that cluster. ``aws_account`` and ``aws_region`` are those of
    its ECR repositories ``<service>-<env>`` and IAM roles; unset, those of
    ``images.registry``.
    """

    kube_context: str | None = Field(default=None, min_length=1)
    in_cluster: bool = False
    namespace: KubeNamespace
    aws_account: AwsAccount | None = None
    aws_region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")

    @model_validator(mode="after")
    def _one_cluster(self) -> Environment:
        if self.in_cluster and self.kube_context is not None:
            raise ValueError(
                "kube_context and in_cluster: true name two clusters; keep one "
                "(kube_context: a context of KUBECONFIG, or in_cluster: the pod's own cluster)"
            )
        return self

    @property
    def cluster(self) -> str:
        """The cluster as people name it: the context, ``in-cluster``, or the ``kubernetes`` resource's."""
        if self.kube_context is not None:
            return f"kube context {self.kube_context!r}"
        if self.in_cluster:
            return "the pod's own cluster (in_cluster)"
        return "the cluster of KUBECONFIG / OPS_KUBE_CONTEXT"

    def _cluster_identity(self) -> str:
        # Unset and in-cluster are the same cluster when running in a pod without KUBECONFIG.
        return f"context:{self.kube_context}" if self.kube_context is not None else "default"


class Service(_Model):
    name: Name
    environments: list[Name] = Field(min_length=1)
    tag_pattern: str = r"^[0-9a-f]{7,40}$"
    chart: str = "infra/k8s/ontology-editor"
    namespace: str = "ontology-editor"
    requires: list[Name] = []
    owner: Owner | None = None

    @field_validator("tag_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"tag_pattern is not a regular expression: {exc}") from exc
        if compiled.fullmatch("latest") or compiled.search("latest"):
            raise ValueError("tag_pattern must not match 'latest' (releases are pinned by git sha)")
        return value

    def repository(self, environment: str) -> str:
        """ECR repository of this service in one environment (InfraSpec §2.3)."""
        return f"{self.name}-{environment}"


class Images(_Model):
    registry: Registry
    services: list[Service] = []


class Remediation(_Model):
    alert: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_:][A-Za-z0-9_:]*$")]
    playbook: Playbook
    matchers: dict[str, str] = {}
    cooldown_minutes: int = Field(default=30, ge=0)
    auto_remediate: bool = False
    namespaces: list[str] = []


Severity = Literal["info", "warning", "critical"]


class Alerting(_Model):
    """Severity of the alerts this graph raises (failed runs, failed checks), by asset group."""

    # "playbooks": failed remediation runs (op jobs, no asset group).
    severity: dict[str, Severity] = {"backups": "critical", "restore_tests": "critical", "playbooks": "critical"}
    default_severity: Severity = "warning"

    def severity_of(self, group: str | None) -> str:
        return self.severity.get(group or "", self.default_severity)


class Spec(_Model):
    platform: PlatformInfo
    objectives: Objectives
    alerting: Alerting = Alerting()
    layers: list[Layer] = []
    datastores: list[Datastore] = []
    volumes: list[VolumeGroup] = []
    certificates: Certificates = Certificates()
    compliance: Compliance = Compliance()
    images: Images | None = None
    environments: dict[Name, Environment] = {}
    remediations: list[Remediation] = []
    max_concurrent_remediations: int = Field(default=3, ge=1)

    @field_validator("environments")
    @classmethod
    def _environments_apart(cls, value: dict[str, Environment]) -> dict[str, Environment]:
        _require_apart(value)
        return value

    @model_validator(mode="after")
    def _references_resolve(self) -> Spec:
        _require_unique([layer.name for layer in self.layers], "layer")
        _require_unique([store.name for store in self.datastores], "datastore")
        _require_unique([volume.name for volume in self.volumes], "volume group")
        if self.images is not None:
            _require_unique([service.name for service in self.images.services], "service")
        _require_unique(
            [(r.alert, tuple(sorted(r.matchers.items()))) for r in self.remediations],
            "remediation (alert + matchers)",
        )
        layer_names = {layer.name for layer in self.layers}
        for layer in self.layers:
            for required in layer.requires:
                if required not in layer_names:
                    raise ValueError(f"layer {layer.name!r} requires unknown layer {required!r}")
        _check_acyclic({layer.name: layer.requires for layer in self.layers})
        for store in self.datastores:
            if store.layer is not None and store.layer not in layer_names:
                raise ValueError(f"datastore {store.name!r} names unknown layer {store.layer!r}")
        _schedules_hold_rpo(self)
        _environments_located(self)
        if self.images is not None:
            for service in self.images.services:
                unknown = [e for e in service.environments if e not in self.platform.environments]
                if unknown:
                    raise ValueError(
                        f"service {service.name!r} deploys to unknown environment(s) "
                        f"{', '.join(unknown)} (platform.environments: "
                        f"{', '.join(self.platform.environments)})"
                    )
                for required in service.requires:
                    if required not in layer_names:
                        raise ValueError(
                            f"service {service.name!r} requires unknown layer {required!r}"
                        )
        return self

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    def environment(self, name: str) -> Environment:
        """Where environment ``name`` lives (its entry in ``environments``, else the default location)."""
        if name not in self.platform.environments:
            raise KeyError(f"{name!r} is not one of platform.environments ({', '.join(self.platform.environments)})")
        return self.environments.get(name) or Environment(namespace=DEFAULT_NAMESPACE)

    def registry_of(self, environment: str) -> Registry:
        """The ECR registry of an environment's repositories: its aws_account and aws_region, else images.registry."""
        if self.images is None:
            raise ValueError("the spec has no images section")
        located = self.environment(environment)
        return Registry(
            account=located.aws_account or self.images.registry.account,
            region=located.aws_region or self.images.registry.region,
        )

    def datastore(self, name: str) -> Datastore:
        return next(store for store in self.datastores if store.name == name)

    def rpo_minutes(self, store: Datastore) -> int:
        return store.rpo_minutes or self.objectives.rpo_minutes

    def rto_minutes(self, store: Datastore) -> int:
        return store.rto_minutes or self.objectives.rto_minutes

    def layers_in_order(self) -> list[Layer]:
        """Layers sorted so that every layer comes after the layers it requires."""
        ordered: list[Layer] = []
        placed: set[str] = set()
        pending = list(self.layers)
        while pending:
            ready = [layer for layer in pending if set(layer.requires) <= placed]
            for layer in ready:
                ordered.append(layer)
                placed.add(layer.name)
                pending.remove(layer)
        return ordered


def _require_unique(values: Iterable[object], what: str) -> None:
    seen: set[object] = set()
    duplicates: list[str] = []
    for value in values:
        if value in seen:
            duplicates.append(str(value))
        seen.add(value)
    if duplicates:
        raise ValueError(f"duplicate {what} name(s): {', '.join(sorted(set(duplicates)))}")


def _require_apart(environments: Mapping[str, Environment]) -> None:
    """No two environments in one namespace of one cluster: their releases would write the same objects."""
    by_place: dict[tuple[str, str], list[str]] = {}
    for name, environment in environments.items():
        by_place.setdefault((environment._cluster_identity(), environment.namespace), []).append(name)
    for (_, namespace), names in by_place.items():
        if len(names) > 1:
            where = environments[names[0]].cluster
            who = f"{', '.join(names[:-1])} and {names[-1]} " + ("both" if len(names) == 2 else "all")
            raise ValueError(
                f"{who} live in namespace {namespace!r} of {where}: a release of one would "
                "overwrite the others' objects (give each its own kube_context or namespace)"
            )


def _environments_located(spec: Spec) -> None:
    """Every name in `environments` is a platform environment; given at all, the mapping covers every one."""
    known = spec.platform.environments
    problems = [
        f"environments.{name}: not one of platform.environments ({', '.join(known)})"
        for name in spec.environments if name not in known
    ]
    if spec.environments:
        problems += [
            f"environments.{name}: missing; say where {name} lives (kube_context or in_cluster: true, and namespace)"
            for name in known if name not in spec.environments
        ]
    else:
        try:
            _require_apart({name: spec.environment(name) for name in known})
        except ValueError as error:
            problems.append(f"environments: not set, so {error}")
    if spec.images is not None:
        for index, service in enumerate(spec.images.services):
            if "namespace" in service.model_fields_set:
                problems.append(
                    f"images.services[{index}:{service.name}].namespace: the namespace is the environment's; "
                    "set environments.<env>.namespace instead"
                )
    if problems:
        raise ValueError("\n".join(problems))


def _check_acyclic(graph: dict[str, list[str]]) -> None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == "done":
            return
        if state.get(node) == "visiting":
            cycle = path[path.index(node):] + [node]
            raise ValueError(f"layer dependency cycle: {' -> '.join(cycle)}")
        state[node] = "visiting"
        for required in graph.get(node, []):
            visit(required, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


# Methods that restore to any point in time from a continuous archive (WAL): their RPO does
# not depend on how often a base backup is taken.
POINT_IN_TIME_METHODS = ("pgbackrest",)


def _schedules_hold_rpo(spec: Spec) -> None:
    from ops_platform.cron import CronError, max_gap_minutes

    problems = []
    for index, store in enumerate(spec.datastores):
        rpo = spec.rpo_minutes(store)
        try:
            gap = max_gap_minutes(store.schedule)
        except CronError as error:
            problems.append(f"datastores[{index}:{store.name}].schedule: {error}")
            continue
        if gap > rpo and store.method not in POINT_IN_TIME_METHODS:
            problems.append(
                f"datastores[{index}:{store.name}].schedule: {store.schedule!r} leaves up to {gap} min between "
                f"backups, more than its RPO of {rpo} min, and {store.engine}/{store.method} has no "
                "point-in-time recovery (back up at least every RPO, or set rpo_minutes for this datastore)"
            )
    if problems:
        raise ValueError("\n".join(problems))


def _format_location(loc: tuple[object, ...], raw: object) -> str:
    """`datastores[0].connection.port`, with list items named where possible."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and 0 <= item < len(node):
                node = node[item]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label = f"[{item}:{node['name']}]"
            else:
                node = None
            parts.append(label)
        else:
            key = str(item)
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif key in {"function-after", "function-before", "function-wrap"}:
                continue
            else:
                node = None
            parts.append(("." if parts else "") + key)
    return "".join(parts) or "(top level)"


def parse_spec(raw: object, source: Path | str = "<spec>") -> Spec:
    """Validate an already-loaded YAML document."""
    if not isinstance(raw, dict):
        raise SpecError(source, [f"(top level): expected a mapping, got {type(raw).__name__}"])
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = _format_location(tuple(error["loc"]), raw)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key (not part of the spec)"
            if not error["loc"] and re.match(r"^\w+(\[|\.\w|: )", message):  # a spec-wide rule that names its fields
                problems.extend(message.splitlines())
                continue
            problems.append(f"{location}: {message}")
        raise SpecError(source, problems) from None


def spec_path(path: Path | str | None = None) -> Path:
    chosen = path or os.environ.get(SPEC_ENV_VAR) or DEFAULT_SPEC_PATH
    chosen = Path(chosen)
    if not chosen.is_absolute():
        cwd_candidate = Path.cwd() / chosen
        chosen = cwd_candidate if cwd_candidate.exists() else REPO_ROOT / chosen
    return chosen


def load_spec(path: Path | str | None = None) -> Spec:
    """Load and validate the spec (``OPS_PLATFORM_SPEC`` or infra/platform.yaml).

    A spec may start with ``extends: <file>`` (relative to itself): it then
    takes every top-level section of that file that it does not set itself.
    The sandbox spec uses this to replace the datastores and keep the rest.
    """
    source = spec_path(path)
    raw = _read_yaml(source)
    if isinstance(raw, dict) and "extends" in raw:
        base_path = Path(str(raw.pop("extends")))
        if not base_path.is_absolute():
            base_path = source.parent / base_path
        if not base_path.is_file():
            raise SpecError(source, [f"extends: {base_path} not found"])
        base = _read_yaml(base_path)
        if not isinstance(base, dict):
            raise SpecError(base_path, ["(top level): expected a mapping"])
        base.pop("extends", None)
        raw = {**base, **raw}
    return parse_spec(raw, source)


def _read_yaml(source: Path) -> object:
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise SpecError(source, [f"file not found (set {SPEC_ENV_VAR} to a platform spec)"]) from None
    except OSError as exc:
        raise SpecError(source, [f"cannot read: {exc.strerror}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [f"{where}not valid YAML: {problem}"]) from None
