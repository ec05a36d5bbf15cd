"""infra/dagster/: the RBAC matches the API calls of the code, the Dagster objects
are valid, the Dockerfile runs as non-root from pinned bases.

The calls are derived statically from ops_platform/:
- every call of a :class:`KubernetesClient` method (get, list, apply,
  patch_status, delete, wait_for) whose first two arguments are an
  apiVersion and a Kind, as string literals or module-level constants;
- ``apply`` of a dict literal with a literal apiVersion and kind in the same
  module (the Jobs, Secrets, Backups... that the backup drivers build);
- the manifests the code applies as data: every layer of infra/platform.yaml
  (infra/<layer> assets: apply, readiness wait, drift) and the Ontology
  Editor chart (apps/<service>/<env>).
This misses calls whose kind is only known at run time from somewhere else;
the role may still be short of those, never wider than this derivation.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from typing import Any

import pytest
import yaml

from ops_platform.manifests import (
    CRD_SCHEMA_DIR,
    GATEKEEPER_CONSTRAINTS_GROUP,
    load_layer_manifests,
    render_chart,
    validate_manifest,
)
from ops_platform.spec import REPO_ROOT, load_spec

PACKAGE = REPO_ROOT / "ops_platform"
DAGSTER_DIR = REPO_ROOT / "infra" / "dagster"
SERVICE_ACCOUNT = "ops-platform"
API_VERSION = re.compile(r"^([a-z0-9.-]+/)?v[0-9]+((alpha|beta)[0-9]+)?$")
KIND = re.compile(r"^[A-Z][A-Za-z0-9]+$")
VERBS_OF_METHOD = {
    "get": {"get"},
    "list": {"list"},
    "apply": {"get", "patch", "create"},
    "patch_status": {"patch"},
    "delete": {"delete"},
    "wait_for": {"get", "list", "watch"},
}
# Applied as data, then waited on for readiness and compared for drift.
DATA_VERBS = {"get", "list", "watch", "patch", "create"}
# The API server lets an identity create or change a (Cluster)Role or binding
# only when it holds every permission granted, or has escalate / bind: the
# rbac layer grants the developer / operator / admin roles.
RBAC_EXTRA_VERBS = {"escalate", "bind"}

Call = tuple[str, str, str]  # (group, resource, verb)


def plural_of(group: str, kind: str) -> str:
    if group == GATEKEEPER_CONSTRAINTS_GROUP:
        return kind.lower()
    crds = _crd_plurals()
    if (group, kind) in crds:
        return crds[(group, kind)]
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    if lower.endswith("s"):
        return lower + "es"
    return lower + "s"


@functools.cache
def _crd_plurals() -> dict[tuple[str, str], str]:
    plurals = {}
    for file in CRD_SCHEMA_DIR.rglob("*.yaml"):
        for crd in yaml.safe_load_all(file.read_text()):
            if crd and crd.get("kind") == "CustomResourceDefinition":
                names = crd["spec"]["names"]
                plurals[(crd["spec"]["group"], names["kind"])] = names["plural"]
    return plurals


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def _constants(tree: ast.Module) -> dict[str, str]:
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    return constants


def _string(node: ast.AST, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def _literal_manifests(tree: ast.Module, constants: dict[str, str]) -> set[tuple[str, str]]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            fields = {_string(k, constants): v for k, v in zip(node.keys, node.values) if k is not None}
            api_version = _string(fields["apiVersion"], constants) if "apiVersion" in fields else None
            kind = _string(fields["kind"], constants) if "kind" in fields else None
            if api_version and kind and API_VERSION.match(api_version) and KIND.match(kind):
                found.add((api_version, kind))
    return found


def calls_in_code() -> set[Call]:
    calls: set[Call] = set()
    files = [f for f in sorted(PACKAGE.rglob("*.py")) if not (f.name == "kubernetes.py" and f.parent.name == "resources")]
    trees = {file: ast.parse(file.read_text()) for file in files}
    # Constants imported from another module of the package resolve by name.
    package_constants = {name: value for tree in trees.values() for name, value in _constants(tree).items()}
    for file, tree in trees.items():
        constants = {**package_constants, **_constants(tree)}
        applies = False
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method = node.func.attr
            if method not in VERBS_OF_METHOD:
                continue
            applies |= method == "apply"
            if len(node.args) < 2:
                continue
            api_version, kind = (_string(arg, constants) for arg in node.args[:2])
            if api_version and kind and API_VERSION.match(api_version) and KIND.match(kind):
                group = group_of(api_version)
                resource = plural_of(group, kind)
                if method == "patch_status":
                    resource += "/status"
                calls |= {(group, resource, verb) for verb in VERBS_OF_METHOD[method]}
        if applies:
            for api_version, kind in _literal_manifests(tree, constants):
                group = group_of(api_version)
                calls |= {(group, plural_of(group, kind), verb) for verb in VERBS_OF_METHOD["apply"]}
    return calls


def calls_of_applied_data() -> set[Call]:
    objects = [obj for layer in load_spec().layers for obj in load_layer_manifests(layer.manifests)]
    for environment in load_spec().platform.environments:
        objects += render_chart(environment, {"image": {"tag": "0123abc"}})
    calls = set()
    for obj in objects:
        group = group_of(obj["apiVersion"])
        resource = plural_of(group, obj["kind"])
        calls |= {(group, resource, verb) for verb in DATA_VERBS}
        if group == "rbac.authorization.k8s.io" and obj["kind"] in ("Role", "ClusterRole"):
            calls |= {(group, resource, verb) for verb in RBAC_EXTRA_VERBS}
    return calls


@functools.cache
def derived_calls() -> frozenset[Call]:
    return frozenset(calls_in_code() | calls_of_applied_data())


def cluster_role_rules(calls: set[Call]) -> list[dict[str, Any]]:
    """The ClusterRole rules for ``calls``: one rule per (group, verbs), resources sorted."""
    verbs_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for group, resource, verb in calls:
        verbs_of[(group, resource)].add(verb)
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for (group, resource), verbs in verbs_of.items():
        grouped[(group, tuple(sorted(verbs)))].append(resource)
    return [
        {"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
        for (group, verbs), resources in sorted(grouped.items())
    ]


def allowed_calls(role: dict[str, Any]) -> set[Call]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


@pytest.fixture(scope="module")
def rbac() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DAGSTER_DIR / "rbac.yaml").read_text()) if doc}


@pytest.fixture(scope="module")
def derived() -> frozenset[Call]:
    return derived_calls()


def test_derivation_finds_the_calls_of_each_domain(derived: frozenset[Call]) -> None:
    code = calls_in_code()
    assert ("apps", "deployments", "watch") in code  # releases: wait for the rollout
    assert ("apps", "replicasets", "list") in code  # releases: the previous ReplicaSet
    assert ("cert-manager.io", "certificates/status", "patch") in code  # certificate renewal
    assert ("batch", "jobs", "create") in code  # neo4j backup Job
    assert ("velero.io", "backups", "create") in code
    assert ("snapshot.storage.k8s.io", "volumesnapshots", "delete") in code
    assert ("", "nodes", "list") in code  # layer checks
    assert ("apiextensions.k8s.io", "customresourcedefinitions", "watch") in code  # layers: CRD Established
    assert ("rbac.authorization.k8s.io", "clusterroles", "escalate") in derived  # the rbac layer


def test_cluster_role_allows_every_derived_call(rbac: dict[str, dict[str, Any]], derived: frozenset[Call]) -> None:
    missing = derived - allowed_calls(rbac["ClusterRole"])
    assert not missing, f"rbac.yaml does not allow: {sorted(missing)}"


def test_cluster_role_allows_nothing_more(rbac: dict[str, dict[str, Any]], derived: frozenset[Call]) -> None:
    extra = allowed_calls(rbac["ClusterRole"]) - derived
    assert not extra, f"rbac.yaml allows calls the code does not make: {sorted(extra)}"


def test_cluster_role_has_no_wildcard(rbac: dict[str, dict[str, Any]]) -> None:
    for rule in rbac["ClusterRole"]["rules"]:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), rule
        assert "nonResourceURLs" not in rule


def test_rbac_objects_are_valid_and_bound(rbac: dict[str, dict[str, Any]]) -> None:
    assert set(rbac) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for obj in rbac.values():
        assert validate_manifest(obj) == []
    account = rbac["ServiceAccount"]["metadata"]
    binding = rbac["ClusterRoleBinding"]
    assert account["name"] == SERVICE_ACCOUNT
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": rbac["ClusterRole"]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                    "namespace": account["namespace"]}]


def test_invalid_rbac_object_is_reported() -> None:
    broken = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
              "metadata": {"name": "ops-platform"}, "rules": [{"apiGroups": [""], "verb": ["get"]}]}
    assert validate_manifest(broken)


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((DAGSTER_DIR / "values.yaml").read_text())


def test_helm_values_run_this_code_location(values: dict[str, Any], rbac: dict[str, dict[str, Any]]) -> None:
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "ops_platform.definitions"]
    assert deployment["port"] == 3030
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagster-user-deployments"]["serviceAccount"]["create"] is False
    assert values["dagster-user-deployments"]["serviceAccount"]["name"] == SERVICE_ACCOUNT
    assert values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"][
        "serviceAccountName"] == SERVICE_ACCOUNT
    assert values["postgresql"]["enabled"] is False
    assert values["global"]["postgresqlSecretName"]
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    assert values["dagsterDaemon"]["runRetries"]["enabled"] is True
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"


def test_concurrency_pools_match_the_assets(values: dict[str, Any]) -> None:
    job = next(obj for obj in values["extraManifests"] if obj["kind"] == "Job")
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    pools = {pool: int(limit) for pool, limit in re.findall(r"concurrency set ([a-z_]+) ([0-9]+)", command)}
    assert pools == {"kube_api": 4}
    used = set(re.findall(r"pool=\"([a-z_]+)\"", "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))))
    assert used <= set(pools), f"pools used by assets without a limit: {used - set(pools)}"
    # Every other pool (datastore-<name>) takes the default limit: one operation per target.
    assert values["concurrency"]["pools"]["defaultLimit"] == 1
    instance = yaml.safe_load((DAGSTER_DIR / "dagster.yaml").read_text())
    assert instance["concurrency"]["pools"]["default_limit"] == 1
    run_limits = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    instance_limits = instance["run_coordinator"]["config"]["tag_concurrency_limits"]
    expected = {"backup_io": 2, "kube_api": 4, "remediation": 3}
    assert {limit["value"]: limit["limit"] for limit in run_limits} == expected
    assert {limit["value"]: limit["limit"] for limit in instance_limits} == expected


def test_objects_in_the_helm_values_are_valid(values: dict[str, Any]) -> None:
    assert values["extraManifests"]
    for obj in values["extraManifests"]:
        assert validate_manifest(obj) == []


def test_production_instance_uses_postgres_from_the_environment() -> None:
    text = (DAGSTER_DIR / "dagster.yaml").read_text()
    instance = yaml.safe_load(text)
    postgres = instance["storage"]["postgres"]["postgres_db"]
    assert postgres["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert all(isinstance(postgres[key], dict) and "env" in postgres[key] for key in ("hostname", "username", "db_name"))
    assert instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert instance["run_monitoring"]["enabled"] is True
    assert instance["run_retries"]["enabled"] is True
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", (DAGSTER_DIR / "Dockerfile").read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_from_pinned_bases(dockerfile: list[tuple[str, str]]) -> None:
    bases = [rest.split()[0] for keyword, rest in dockerfile if keyword == "FROM"]
    stages = {rest.split()[-1] for keyword, rest in dockerfile if keyword == "FROM" and " AS " in rest.upper()}
    external = [base for base in bases if base not in stages]
    assert len(bases) >= 2 and external
    for base in external:
        assert re.fullmatch(r"[a-z0-9./-]+:[0-9][\w.-]*@sha256:[0-9a-f]{64}", base), base
    assert any(keyword == "COPY" and "--from=" in rest for keyword, rest in dockerfile)
    assert any("constraints.txt" in rest for keyword, rest in dockerfile if keyword == "RUN")


def test_dockerfile_runs_the_code_server_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    users = [rest for keyword, rest in dockerfile if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.fullmatch(r"[0-9]+(:[0-9]+)?", users[-1]), "a numeric uid lets runAsNonRoot verify it"
    assert ("EXPOSE", "3030") in dockerfile
    entry = " ".join(rest for keyword, rest in dockerfile if keyword in ("CMD", "ENTRYPOINT"))
    assert "code-server" in entry and "ops_platform.definitions" in entry and "3030" in entry
