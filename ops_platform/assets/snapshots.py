"""`snapshots/<volume_group>`: CSI VolumeSnapshots (and EBS snapshots) of a group of volumes."""


import dagster as dg

from ops_platform.assets.keys import SNAPSHOTS_GROUP, layer_key, snapshot_key
from ops_platform.errors import NotImplementedYetError
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.spec import Spec, VolumeGroup


def build_snapshot_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    storage = [layer_key("storage")] if any(l.name == "storage" for l in spec.layers) else []
    return [_snapshot_asset(spec, group, storage) for group in spec.volumes]


def _snapshot_asset(
    spec: Spec, group: VolumeGroup, deps: list[dg.AssetKey]
) -> dg.AssetsDefinition:
    @dg.asset(
        key=snapshot_key(group.name),
        deps=deps,
        group_name=SNAPSHOTS_GROUP,
        kinds={"kubernetes", "aws"},
        owners=[spec.platform.owner],
        description=(
            f"Volume snapshots of PVCs matching `{group.selector}`"
            + (f" in {', '.join(group.namespaces)}" if group.namespaces else "")
            + f"; keeps the last {group.keep}."
        ),
        metadata={"selector": group.selector, "keep": group.keep},
    )
    def _snapshot(context: dg.AssetExecutionContext, kubernetes: KubernetesResource) -> None:
        kubernetes.get_client()
        raise NotImplementedYetError(
            "snapshots",
            f"snapshotting volume group '{group.name}'",
            "the backups, snapshots and restore tests issue",
        )

    return _snapshot
