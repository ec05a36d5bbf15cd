"""`snapshots/<volume_group>`: CSI VolumeSnapshots (and EBS snapshots) of a group of volumes."""

from datetime import UTC, datetime

import dagster as dg

from ops_platform.assets.failures import known_errors
from ops_platform.assets.keys import SNAPSHOTS_GROUP, layer_key, snapshot_key
from ops_platform.environment import dry_run_requested
from ops_platform.metadata import table
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import ObjectStoreResource, aws_client
from ops_platform.snapshots import SnapshotError, VolumeGroupSnapshot, snapshot_volume_group
from ops_platform.spec import Spec, VolumeGroup


class SnapshotConfig(dg.Config):
    dry_run: bool | None = None  # unset: OPS_DRY_RUN


def build_snapshot_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    storage = [layer_key("storage")] if any(layer.name == "storage" for layer in spec.layers) else []
    return [_snapshot_asset(spec, group, storage) for group in spec.volumes]


def snapshot_metadata(result: VolumeGroupSnapshot, dry_run: bool) -> dict[str, object]:
    totals = result.totals()
    return {
        "dry_run": dry_run,
        "volumes": int(totals["volumes"]),
        "ready": int(totals["ready"]),
        "failed": int(totals["failed"]),
        "restore_size_bytes": dg.MetadataValue.int(int(totals["restore_size_bytes"])),
        "max_wait_seconds": float(totals["max_seconds_waited"]),
        "snapshots": table(result.volume_rows()),
        "pruned": table(result.pruned_rows()),
        "skipped": table(result.skipped_rows()),
    }


def _snapshot_asset(spec: Spec, group: VolumeGroup, deps: list[dg.AssetKey]) -> dg.AssetsDefinition:
    @dg.asset(
        key=snapshot_key(group.name),
        deps=deps,
        group_name=SNAPSHOTS_GROUP,
        kinds={"kubernetes", "aws"},
        owners=[spec.platform.owner],
        description=(
            f"Volume snapshots of PVCs matching `{group.selector}`"
            + (f" in {', '.join(group.namespaces)}" if group.namespaces else "")
            + (f" and EBS volumes tagged {group.ebs_volume_tags}" if group.ebs_volume_tags else "")
            + f"; keeps the last {group.keep}."
        ),
        metadata={"selector": group.selector, "keep": group.keep},
    )
    def _snapshot(
        context: dg.AssetExecutionContext,
        config: SnapshotConfig,
        kubernetes: KubernetesResource,
        object_store: ObjectStoreResource,
    ) -> dg.MaterializeResult:
        dry_run = dry_run_requested(config.dry_run)
        with known_errors(f"snapshots of '{group.name}'"):
            kube = kubernetes.get_client()
            ec2 = None
            if group.ebs_volume_tags:
                ec2 = aws_client(
                    "ec2",
                    region=object_store.region,
                    endpoint_url=object_store.endpoint_url,
                    needed_for=f"EBS snapshots of volume group '{group.name}'",
                )
        try:
            result = snapshot_volume_group(
                group,
                kube,
                ec2,
                snapshot_class=group.snapshot_class,
                run_id=context.run.run_id,
                clock=lambda: datetime.now(UTC),
                timeout=group.ready_timeout_minutes * 60.0,
                dry_run=dry_run,
            )
        except SnapshotError as error:
            raise dg.Failure(str(error), metadata=snapshot_metadata(error.result, dry_run)) from None
        return dg.MaterializeResult(metadata=snapshot_metadata(result, dry_run))

    return _snapshot
