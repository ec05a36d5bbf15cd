"""infra/dagster/: the RBAC objects are valid and bind only the code location's two
ServiceAccounts, the Dagster objects are valid, the Dockerfile runs as non-root
from pinned bases.

Which rules the roles hold is proven against a real API server by
tests/test_rbac_audit.py (from its audit log), not derived from the source.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from ops_platform.manifests import (
    validate_manifest,
)
from ops_platform.spec import REPO_ROOT

PACKAGE = REPO_ROOT / "ops_platform"
DAGSTER_DIR = REPO_ROOT / "infra" / "dagster"
SERVICE_ACCOUNT = "ops-platform"
INFRA_SERVICE_ACCOUNT = "ops-platform-infra"
@pytest.fixture(scope="module")
def rbac() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DAGSTER_DIR / "rbac.yaml").read_text()) if doc]


def test_rbac_objects_are_valid_and_bind_only_the_two_service_accounts(rbac: list[dict[str, Any]]) -> None:
    """What the rules must hold is proven against the real API server: tests/test_rbac_audit.py."""
    for obj in rbac:
        assert validate_manifest(obj) == [], obj["metadata"]["name"]
    accounts = {(obj["metadata"]["namespace"], obj["metadata"]["name"]) for obj in rbac if obj["kind"] == "ServiceAccount"}
    assert accounts == {("dagster", SERVICE_ACCOUNT), ("dagster", INFRA_SERVICE_ACCOUNT)}
    roles = {(obj["kind"], obj["metadata"]["name"]) for obj in rbac if obj["kind"] in ("Role", "ClusterRole")}
    for binding in (obj for obj in rbac if obj["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles
        assert {(s["kind"], s["namespace"]) for s in binding["subjects"]} == {("ServiceAccount", "dagster")}
        assert {s["name"] for s in binding["subjects"]} <= {SERVICE_ACCOUNT, INFRA_SERVICE_ACCOUNT}


def test_invalid_rbac_object_is_reported() -> None:
    broken = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
              "metadata": {"name": "ops-platform"}, "rules": [{"apiGroups": [""], "verb": ["get"]}]}
    assert validate_manifest(broken)


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((DAGSTER_DIR / "values.yaml").read_text())


def test_helm_values_run_this_code_location(values: dict[str, Any]) -> None:
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
