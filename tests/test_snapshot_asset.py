"""`snapshots/<group>` in Dagster: materialized against the real API server as the ServiceAccount
ops-platform, with its metadata; a failed volume fails the run with the table attached.

The claims, their volumes and the snapshot-controller stand-in are those of tests/test_snapshots.py.
"""

import dagster as dg

from ops_platform.assets.snapshots import build_snapshot_assets
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import ObjectStoreResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.test_snapshots import (  # noqa: F401 - fixtures
    CONTEXT,
    SNAPSHOT_CLASS,
    cluster,
    controller,
    kubeconfig,
    volumes,
)

SPEC = load_spec(DEFAULT_SPEC_PATH)


def spec_with_group(cluster, **fields):
    group = SPEC.volumes[0].model_copy(update={
        "selector": cluster.selector, "namespaces": [cluster.namespaces.data, cluster.namespaces.apps],
        "snapshot_class": SNAPSHOT_CLASS, "ebs_volume_tags": {}, **fields,
    })
    return SPEC.model_copy(update={"volumes": [group]})


def materialize(spec, kubeconfig, tmp_path, run_config=None):
    [asset] = build_snapshot_assets(spec)
    return dg.materialize(
        [asset],
        resources={
            "kubernetes": KubernetesResource(kubeconfig=str(kubeconfig), context=CONTEXT),
            "object_store": ObjectStoreResource(local_dir=str(tmp_path)),
        },
        run_config=run_config,
        raise_on_error=False,
    )


def test_snapshot_asset_records_the_group(cluster, controller, kubeconfig, tmp_path):
    result = materialize(spec_with_group(cluster), kubeconfig, tmp_path)
    assert result.success
    [event] = result.asset_materializations_for_node("snapshots__data")
    metadata = event.metadata
    assert metadata["volumes"].value == 3 and metadata["ready"].value == 3
    assert metadata["restore_size_bytes"].value == 17 * 1024**3
    assert "pg-data" in metadata["snapshots"].value
    assert metadata["dry_run"].value is False
    assert len(cluster.snapshots_in(cluster.namespaces.data)) == 2


def test_failed_volume_fails_the_run_with_metadata(cluster, controller, kubeconfig, tmp_path):
    controller.failing.add("pg-data")
    result = materialize(spec_with_group(cluster), kubeconfig, tmp_path)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "pg-data" in failure.step_failure_data.error.message
    assert failure.step_failure_data.user_failure_data.metadata["failed"].value == 1


def test_dry_run_changes_nothing(cluster, controller, kubeconfig, tmp_path):
    result = materialize(
        spec_with_group(cluster), kubeconfig, tmp_path,
        run_config={"ops": {"snapshots__data": {"config": {"dry_run": True}}}},
    )
    assert result.success
    assert cluster.snapshots_in(cluster.namespaces.data) == {}
    [event] = result.asset_materializations_for_node("snapshots__data")
    assert event.metadata["dry_run"].value is True
