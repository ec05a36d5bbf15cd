"""The asset graph built from the spec, and what materializing it does before
later issues fill in the work: a clear error naming the missing setting or the
domain still to come, never a fake success."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from ops_platform.assets.keys import backup_key, layer_key, release_key, restore_test_key, snapshot_key
from ops_platform.definitions import build_definitions
from ops_platform.errors import OpsPlatformError
from ops_platform.local_servers import free_port
from ops_platform.environment import build_resources, get_environment
from ops_platform.spec import DEFAULT_SPEC_PATH, REPO_ROOT, load_spec

SPEC = load_spec(DEFAULT_SPEC_PATH)
SANDBOX_SPEC = load_spec(REPO_ROOT / "infra" / "sandbox.yaml")


@pytest.fixture
def asset_graph():
    return build_definitions(SPEC, "local").resolve_asset_graph()


def error_text(result: dg.ExecuteInProcessResult) -> str:
    """Every message in the failure's error chain (the step's error and its causes)."""
    texts = []
    for event in result.all_events:
        if event.is_failure and event.event_specific_data and getattr(event.event_specific_data, "error", None):
            error = event.event_specific_data.error
            while error is not None:
                texts.append(error.message)
                error = error.cause
    assert texts, "the run did not fail"
    return "\n".join(texts)


@pytest.fixture
def no_cluster_or_aws(tmp_path, monkeypatch):
    """An environment with neither a kubeconfig nor AWS credentials."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("KUBECONFIG", "OPS_KUBE_CONTEXT", "KUBERNETES_SERVICE_HOST", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("OPS_BACKUP_DIR", str(tmp_path / "store"))


def test_every_spec_item_has_its_asset(asset_graph):
    keys = set(asset_graph.get_all_asset_keys())
    expected = {layer_key(layer.name) for layer in SPEC.layers}
    expected |= {backup_key(store.name) for store in SPEC.datastores}
    expected |= {restore_test_key(store.name) for store in SPEC.datastores if store.restore_test}
    expected |= {snapshot_key(group.name) for group in SPEC.volumes}
    expected |= {
        release_key(service.name, env) for service in SPEC.images.services for env in service.environments
    }
    expected |= {dg.AssetKey(["certificates", "inventory"]), dg.AssetKey(["certificates", "renewals"]),
                 dg.AssetKey(["compliance", "report"])}
    assert keys == expected
    assert len([k for k in keys if k.path[0] == "infra"]) == 13
    assert release_key("onto-backend", "prod") in keys


def test_layers_depend_on_the_layers_they_require(asset_graph):
    for layer in SPEC.layers:
        parents = asset_graph.get(layer_key(layer.name)).parent_keys
        assert parents == {layer_key(required) for required in layer.requires}
    assert asset_graph.get(layer_key("cluster")).parent_keys == set()


def test_restore_tests_depend_on_their_backup(asset_graph):
    for store in SPEC.datastores:
        node = asset_graph.get(restore_test_key(store.name))
        assert backup_key(store.name) in node.parent_keys


def test_groups_kinds_owners_partitions(asset_graph):
    backup = asset_graph.get(backup_key("postgres_main"))
    assert backup.group_name == "backups"
    assert {"postgres", "s3"} <= set(backup.kinds)
    assert backup.owners == ["team:platform-sre"]
    assert backup.partitions_def is None  # a backup is taken now; it cannot be backfilled into the past
    assert backup.freshness_policy is not None
    layer = asset_graph.get(layer_key("storage"))
    assert layer.group_name == "infra" and "kubernetes" in layer.kinds
    assert asset_graph.get(release_key("onto-frontend", "dev")).group_name == "apps"
    assert asset_graph.get(snapshot_key("data")).group_name == "snapshots"
    for key in asset_graph.get_all_asset_keys():
        node = asset_graph.get(key)
        assert node.owners and node.kinds and node.group_name, key


def test_layer_without_cluster_names_the_missing_setting(no_cluster_or_aws):
    defs = build_definitions(SANDBOX_SPEC, "local")
    result = dg.materialize(
        [defs.get_assets_def(layer_key("storage"))],
        resources=build_resources(SANDBOX_SPEC, "local"),
        raise_on_error=False,
    )
    assert not result.success
    text = error_text(result)
    assert "KUBECONFIG" in text


def test_release_without_aws_names_the_missing_setting(no_cluster_or_aws):
    defs = build_definitions(SANDBOX_SPEC, "local")
    result = dg.materialize(
        [defs.get_assets_def(release_key("onto-backend", "staging"))],
        resources=build_resources(SANDBOX_SPEC, "local"),
        run_config={"ops": {"apps__onto_backend__staging": {"config": {"image_tag": "abc1234"}}}},
        raise_on_error=False,
    )
    assert not result.success
    assert "AWS_ACCESS_KEY_ID" in error_text(result)


STORAGE_OBJECTS = [("storage.k8s.io/v1", "StorageClass", name) for name in ("fast-ssd", "standard-ssd", "backup-hdd")] + [
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass", "ebs-snapshots")]


def test_layer_plan_then_apply_then_checks_on_the_real_server(kube_cluster, kube_crds, tmp_path, monkeypatch):
    """As the infra identity; the layer's cluster-scoped objects removed first (another test may have applied them)."""
    for api_version, kind, name in STORAGE_OBJECTS:
        kube_cluster.delete_object(api_version, kind, name)
    monkeypatch.setenv("KUBECONFIG", str(kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform-infra")))
    defs = build_definitions(SPEC, "local")
    assets_and_checks = [defs.get_assets_def(layer_key("storage")),
                         *[c for c in defs.asset_checks if any(k.asset_key == layer_key("storage") for k in c.check_keys)]]
    resources = build_resources(SPEC, "local")
    instance = dg.DagsterInstance.ephemeral()
    plan = dg.materialize(assets_and_checks, resources=resources, instance=instance, raise_on_error=False,
                          run_config={"ops": {"infra__storage": {"config": {"plan": True}}}})
    assert plan.success
    assert plan.asset_materializations_for_node("infra__storage") == []
    assert kube_cluster.get_object("storage.k8s.io/v1", "StorageClass", "fast-ssd") is None
    observation = next(e for e in plan.all_events if e.event_type_value == "ASSET_OBSERVATION")
    assert observation.event_specific_data.asset_observation.metadata["created"].value >= 3

    applied = dg.materialize(assets_and_checks, resources=resources, instance=instance, raise_on_error=False)
    assert applied.success
    [event] = applied.asset_materializations_for_node("infra__storage")
    assert event.metadata["created"].value >= 3
    assert kube_cluster.get_object("storage.k8s.io/v1", "StorageClass", "fast-ssd") is not None
    checks = {e.check_name: e for e in applied.get_asset_check_evaluations()}
    assert checks["drift"].passed
    assert checks["storage_classes_present"].passed


def test_backup_of_an_unreachable_datastore_fails_clearly_and_commits_nothing(no_cluster_or_aws, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "unused")
    spec = SANDBOX_SPEC.model_copy(update={"datastores": [
        SANDBOX_SPEC.datastores[0].model_copy(update={"connection": SANDBOX_SPEC.datastores[0].connection.model_copy(
            update={"port": free_port()})})
    ]})
    defs = build_definitions(spec, "local")
    result = dg.materialize(
        [defs.get_assets_def(backup_key("postgres_main"))],
        resources=build_resources(spec, "local"),
        raise_on_error=False,
    )
    assert not result.success
    text = error_text(result)
    assert "backup of 'postgres_main' failed" in text
    assert f"127.0.0.1:{spec.datastores[0].connection.port}" in text
    store = Path(os.environ["OPS_BACKUP_DIR"])
    assert not list(store.rglob("manifest.json"))


def test_backup_without_password_names_its_env_var(no_cluster_or_aws, monkeypatch):
    monkeypatch.delenv("PG_PASSWORD", raising=False)
    defs = build_definitions(SANDBOX_SPEC, "local")
    result = dg.materialize(
        [defs.get_assets_def(backup_key("postgres_main"))],
        resources=build_resources(SANDBOX_SPEC, "local"),
        raise_on_error=False,
    )
    assert not result.success
    assert "PG_PASSWORD" in error_text(result)


def test_prod_backup_needs_a_bucket(no_cluster_or_aws, monkeypatch):
    monkeypatch.delenv("OPS_BACKUP_BUCKET", raising=False)
    monkeypatch.setenv("PG_PASSWORD", "unused")
    defs = build_definitions(SANDBOX_SPEC, "prod")
    with pytest.raises(dg.DagsterInvalidConfigError, match='environment variable "OPS_BACKUP_BUCKET"'):
        dg.materialize(
            [defs.get_assets_def(backup_key("postgres_main"))],
            resources=build_resources(SANDBOX_SPEC, "prod"),
            )


def test_unknown_environment_is_refused(monkeypatch):
    monkeypatch.setenv("OPS_ENV", "production")
    with pytest.raises(OpsPlatformError, match="OPS_ENV='production' is not an environment"):
        get_environment()


def _validate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-m", "ops_platform.definitions"],
        cwd=REPO_ROOT,
        env={**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_dagster_definitions_validate_passes():
    result = _validate({"OPS_PLATFORM_SPEC": str(DEFAULT_SPEC_PATH)})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_dagster_validate_reports_a_bad_spec(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_SPEC_PATH.read_text().replace("rto_minutes: 15", "rto_minutes: soon"))
    result = _validate({"OPS_PLATFORM_SPEC": str(bad)})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert str(bad) in output
    assert "objectives.rto_minutes" in output


def test_every_check_is_declared_on_its_asset_and_yielded_by_its_run():
    defs = build_definitions(SPEC, "local")
    assert list(defs.asset_checks or []) == []  # no standalone check reading "the latest materialization"
    graph = defs.resolve_asset_graph()
    declared = {key.name for asset in defs.assets for key in asset.check_keys}
    assert {"artifact_checksum", "data_verified", "rto_within_objective", "rpo_within_objective",
            "rollout_available", "drift", "expiry", "no_open_error_findings"} <= declared
    assert all(graph.get(key).is_executable for key in graph.get_all_asset_keys())


def test_every_operation_on_one_target_shares_one_pool(asset_graph):
    """One operation per target at a time: the op-level pools (default limit 1) are per target."""
    from ops_platform.assets.keys import datastore_pool, release_pool

    defs = build_definitions(SPEC, "local")
    pools = {key: asset.op.pool for asset in defs.assets for key in asset.keys}
    for store in SPEC.datastores:
        assert pools[backup_key(store.name)] == datastore_pool(store.name)
        if store.restore_test:
            assert pools[restore_test_key(store.name)] == datastore_pool(store.name)
    for service in SPEC.images.services:
        for environment in service.environments:
            assert pools[release_key(service.name, environment)] == release_pool(service.name, environment)
    assert len({release_pool(s.name, e) for s in SPEC.images.services for e in s.environments}) == 6
