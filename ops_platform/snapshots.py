"""Volume snapshots of a volume group: CSI VolumeSnapshots and EBS snapshots, kept to the last N.

Plain Python, no Dagster import: :func:`snapshot_volume_group` takes the
Kubernetes client, an EC2 client and a clock, and returns a
:class:`VolumeGroupSnapshot` that the ``snapshots/<volume_group>`` asset turns
into metadata. One run goes through four steps:

1. discover: the Bound PVCs matching the group's selector (others are
   skipped with the reason) and the EBS volumes carrying the group's
   ``ebs_volume_tags``; a failure here raises before anything is created;
2. cut: one ``snapshot.storage.k8s.io/v1`` VolumeSnapshot per PVC (server-side
   apply) and one EBS snapshot per volume, all before waiting on any, so the
   snapshots of a group are taken as close together as possible;
3. wait, within one deadline for the whole run, until each is readyToUse
   (EBS: ``completed``), recording its size;
4. prune: per volume, keep the newest ``keep`` ready snapshots taken by this
   group and delete the older ones. Only objects labelled (tagged) with this
   group are ever deleted, never the newest ready one, and nothing of a volume
   whose new snapshot failed.

A volume that fails does not stop the others; :class:`SnapshotError` is raised
at the end, carrying the full result. ``dry_run`` asks the servers to validate
every write (server-side dry run, EC2 ``DryRun``) and changes nothing.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError
from ops_platform.resources.kubernetes import (
    Condition,
    KubernetesClient,
    KubernetesError,
    WaitTimeout,
)
from ops_platform.resources.object_store import CREDENTIALS_SETTING, ENDPOINT_SETTING
from ops_platform.spec import VolumeGroup

SNAPSHOT_API = "snapshot.storage.k8s.io/v1"
GROUP_LABEL = "ops-platform/volume-group"
RUN_LABEL = "ops-platform/run"
# When the run took the snapshot (UTC, second resolution, sortable): orders snapshots for pruning.
TAKEN_AT_KEY = "ops-platform/taken-at"
MANAGED_BY = {"app.kubernetes.io/managed-by": "ops-platform"}
NAME_LIMIT = 63
EC2_SETTING = f"{ENDPOINT_SETTING} / AWS_REGION"
# Tags the EBS CSI driver puts on the volumes it provisions: those are snapshotted through their PVC.
CSI_VOLUME_TAGS = ("ebs.csi.aws.com/cluster", "kubernetes.io/created-for/pvc/name")
GiB = 1024**3

_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class SnapshotError(OpsPlatformError):
    """Some snapshots of a volume group failed, or the group could not be snapshotted at all.

    ``result`` is the run's :class:`VolumeGroupSnapshot` when snapshots were
    attempted (what succeeded, failed and was pruned), None when the run
    stopped before creating anything.
    """

    def __init__(self, message: str, result: VolumeGroupSnapshot | None = None) -> None:
        self.result = result
        super().__init__(message)


@dataclass(frozen=True)
class SnapshotRow:
    """One volume's snapshot in this run."""

    kind: Literal["csi", "ebs"]
    volume: str  # "<namespace>/<pvc>" or the EBS volume id
    snapshot: str  # VolumeSnapshot name, EBS snapshot id (dry run: the Name it would get)
    ready: bool
    restore_size_bytes: int | None = None
    seconds_waited: float = 0.0
    error: str | None = None
    snapshot_content: str | None = None  # boundVolumeSnapshotContentName
    created_at: datetime | None = None  # status.creationTime / StartTime: the point in time it holds


@dataclass(frozen=True)
class PrunedSnapshot:
    kind: Literal["csi", "ebs"]
    volume: str
    snapshot: str
    taken_at: str


@dataclass(frozen=True)
class SkippedVolume:
    kind: Literal["csi", "ebs"]
    volume: str
    reason: str


@dataclass(frozen=True)
class VolumeGroupSnapshot:
    """What one run did to a volume group (with ``dry_run``: what it would have done)."""

    group: str
    run_id: str
    taken_at: datetime
    dry_run: bool
    volumes: tuple[SnapshotRow, ...]
    pruned: tuple[PrunedSnapshot, ...]
    skipped: tuple[SkippedVolume, ...]
    prune_errors: tuple[str, ...] = ()

    @property
    def failed(self) -> tuple[SnapshotRow, ...]:
        return tuple(row for row in self.volumes if row.error is not None)

    @property
    def ready(self) -> tuple[SnapshotRow, ...]:
        return tuple(row for row in self.volumes if row.ready)

    @property
    def restore_size_bytes(self) -> int:
        return sum(row.restore_size_bytes or 0 for row in self.ready)

    def totals(self) -> dict[str, int | float]:
        return {
            "volumes": len(self.volumes),
            "ready": len(self.ready),
            "failed": len(self.failed),
            "skipped": len(self.skipped),
            "pruned": len(self.pruned),
            "restore_size_bytes": self.restore_size_bytes,
            "max_seconds_waited": max((row.seconds_waited for row in self.volumes), default=0.0),
        }

    def volume_rows(self) -> list[dict[str, Any]]:
        """One row per volume, for ``ops_platform.metadata.table``."""
        return [
            {
                "volume": row.volume,
                "kind": row.kind,
                "snapshot": row.snapshot,
                "ready": row.ready,
                "restore size (bytes)": row.restore_size_bytes,
                "waited (s)": row.seconds_waited,
                "error": row.error,
            }
            for row in self.volumes
        ]

    def pruned_rows(self) -> list[dict[str, Any]]:
        return [
            {"volume": p.volume, "kind": p.kind, "snapshot": p.snapshot, "taken at": p.taken_at}
            for p in self.pruned
        ]

    def skipped_rows(self) -> list[dict[str, Any]]:
        return [{"volume": s.volume, "kind": s.kind, "reason": s.reason} for s in self.skipped]


def snapshot_volume_group(
    group: VolumeGroup,
    kube: KubernetesClient,
    ec2_client: Any | None,
    *,
    snapshot_class: str | None,
    run_id: str,
    clock: Callable[[], datetime],
    timeout: float,
    dry_run: bool = False,
    poll_interval: float = 5.0,
) -> VolumeGroupSnapshot:
    """Snapshot every volume of ``group``, wait until the snapshots are ready, keep the last ``group.keep``.

    ``snapshot_class``: the VolumeSnapshotClass to use (None: the cluster's
    default class). ``clock`` gives the tz-aware time of the run (names,
    ordering); ``timeout`` bounds the wait for all snapshots of the run
    together; ``poll_interval`` paces the polling of EBS snapshots.
    ``ec2_client`` (a boto3 EC2 client) is needed only when the group has
    ``ebs_volume_tags``. Raises :class:`SnapshotError` after pruning the
    volumes that succeeded when any volume failed or pruning failed.
    """
    taken_at = clock()
    if taken_at.tzinfo is None:
        raise ValueError("clock() must return a timezone-aware datetime")
    taken_at = taken_at.astimezone(timezone.utc)
    _require_label_value(group.name, "the volume group name", group.name)
    _require_label_value(run_id, "the run id", group.name)
    run = _Run(group, run_id, taken_at, dry_run)

    csi = _CsiSnapshots(kube, run, snapshot_class)
    ebs = _EbsSnapshots(ec2_client, run, poll_interval) if group.ebs_volume_tags else None
    pvcs, skipped = csi.discover()
    volumes: list[dict[str, Any]] = []
    if ebs is not None:
        volumes, ebs_skipped = ebs.discover()
        skipped += ebs_skipped

    cuts: list[_Cut] = [csi.cut(pvc) for pvc in pvcs]
    if ebs is not None:
        cuts += [ebs.cut(volume) for volume in volumes]
    deadline = time.monotonic() + timeout
    rows = [cut.settle(deadline, timeout) for cut in cuts]

    pruned: list[PrunedSnapshot] = []
    prune_errors: list[str] = []
    for cut, row in zip(cuts, rows):
        if row.error is not None:
            continue
        try:
            pruned += cut.prune()
        except OpsPlatformError as error:
            prune_errors.append(str(error))
    result = VolumeGroupSnapshot(
        group=group.name,
        run_id=run_id,
        taken_at=taken_at,
        dry_run=dry_run,
        volumes=tuple(rows),
        pruned=tuple(pruned),
        skipped=tuple(skipped),
        prune_errors=tuple(prune_errors),
    )
    if result.failed or result.prune_errors:
        raise SnapshotError(_failure_message(result), result)
    return result


@dataclass(frozen=True)
class _Run:
    group: VolumeGroup
    run_id: str
    taken_at: datetime
    dry_run: bool

    @property
    def stamp(self) -> str:
        return self.taken_at.strftime("%Y%m%d%H%M%S")

    @property
    def taken_at_text(self) -> str:
        return self.taken_at.strftime(_TIMESTAMP_FORMAT)


@dataclass(frozen=True)
class ExistingSnapshot:
    """A snapshot already taken for a volume, as far as pruning is concerned."""

    snapshot: str
    taken_at: str
    ready: bool
    being_deleted: bool = False


def to_prune(existing: list[ExistingSnapshot], keep: int) -> list[ExistingSnapshot]:
    """The snapshots older than the ``keep``-th newest ready one (none while fewer are ready).

    Newer snapshots that are not ready yet may still be in progress and stay;
    older ones that never became ready are leftovers of failed runs and go.
    """
    ordered = sorted(existing, key=lambda s: (s.taken_at, s.snapshot), reverse=True)
    ready = [s for s in ordered if s.ready]
    if keep < 1 or len(ready) < keep:
        return []
    cutoff = (ready[keep - 1].taken_at, ready[keep - 1].snapshot)
    return [s for s in ordered if (s.taken_at, s.snapshot) < cutoff and not s.being_deleted]


class _Cut(Protocol):
    """A snapshot started (or refused) in this run: wait for it, then prune its volume."""

    def settle(self, deadline: float, timeout: float) -> SnapshotRow: ...

    def prune(self) -> list[PrunedSnapshot]: ...


class _CsiSnapshots:
    def __init__(self, kube: KubernetesClient, run: _Run, snapshot_class: str | None) -> None:
        self.kube = kube
        self.run = run
        self.snapshot_class = snapshot_class

    def discover(self) -> tuple[list[dict[str, Any]], list[SkippedVolume]]:
        group = self.run.group
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for namespace in dict.fromkeys(group.namespaces) or [None]:
            for pvc in self.kube.list("v1", "PersistentVolumeClaim", namespace, label_selector=group.selector):
                meta = pvc["metadata"]
                found[(meta["namespace"], meta["name"])] = pvc
        bound: list[dict[str, Any]] = []
        skipped: list[SkippedVolume] = []
        for key in sorted(found):
            pvc = found[key]
            phase = (pvc.get("status") or {}).get("phase")
            if pvc["metadata"].get("deletionTimestamp"):
                skipped.append(SkippedVolume("csi", "/".join(key), "the PVC is being deleted"))
            elif phase != "Bound":
                skipped.append(SkippedVolume(
                    "csi", "/".join(key), f"phase {phase or 'unknown'}: not bound to a volume, nothing to snapshot"
                ))
            else:
                bound.append(pvc)
        if bound:
            self._require_snapshot_api()
        return bound, skipped

    def _require_snapshot_api(self) -> None:
        try:
            self.kube.kind(SNAPSHOT_API, "VolumeSnapshot")
        except KubernetesError as error:
            raise SnapshotError(
                f"volume group '{self.run.group.name}': {error}; CSI volume snapshots need the "
                "external-snapshotter CRDs (snapshot.storage.k8s.io/v1) and the snapshot-controller "
                "installed on the cluster"
            ) from None
        if self.snapshot_class is None:
            return
        if self.kube.get(SNAPSHOT_API, "VolumeSnapshotClass", self.snapshot_class) is None:
            available = [c["metadata"]["name"] for c in self.kube.list(SNAPSHOT_API, "VolumeSnapshotClass")]
            raise SnapshotError(
                f"volume group '{self.run.group.name}': VolumeSnapshotClass '{self.snapshot_class}' does not "
                f"exist on the cluster at {self.kube.host} (available: {', '.join(available) or 'none'}); "
                "check the VolumeSnapshotClass configured for volume snapshots"
            )

    def cut(self, pvc: dict[str, Any]) -> _Cut:
        namespace, claim = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
        name = snapshot_name(claim, self.run.group.name, self.run.stamp)
        spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": claim}}
        if self.snapshot_class is not None:
            spec["volumeSnapshotClassName"] = self.snapshot_class
        manifest = {
            "apiVersion": SNAPSHOT_API,
            "kind": "VolumeSnapshot",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {**MANAGED_BY, GROUP_LABEL: self.run.group.name, RUN_LABEL: self.run.run_id},
                "annotations": {TAKEN_AT_KEY: self.run.taken_at_text},
            },
            "spec": spec,
        }
        started = time.monotonic()
        try:
            self.kube.apply(manifest, dry_run=self.run.dry_run)
        except OpsPlatformError as error:
            return _CsiCut(self, namespace, claim, name, started, error=str(error))
        return _CsiCut(self, namespace, claim, name, started)

    def existing(self, namespace: str, claim: str) -> list[ExistingSnapshot]:
        listed = self.kube.list(
            SNAPSHOT_API, "VolumeSnapshot", namespace, label_selector=f"{GROUP_LABEL}={self.run.group.name}"
        )
        return [
            ExistingSnapshot(
                snapshot=item["metadata"]["name"],
                taken_at=(item["metadata"].get("annotations") or {}).get(TAKEN_AT_KEY)
                or item["metadata"].get("creationTimestamp", ""),
                ready=(item.get("status") or {}).get("readyToUse") is True,
                being_deleted=bool(item["metadata"].get("deletionTimestamp")),
            )
            for item in listed
            if ((item.get("spec") or {}).get("source") or {}).get("persistentVolumeClaimName") == claim
        ]


def _settled(obj: dict[str, Any] | None) -> bool:
    status = (obj or {}).get("status") or {}
    return obj is None or status.get("readyToUse") is True or bool(status.get("error"))


SNAPSHOT_SETTLED = Condition("have status.readyToUse=true (or report status.error)", _settled)


class _CsiCut:
    def __init__(
        self, owner: _CsiSnapshots, namespace: str, claim: str, name: str, started: float, error: str | None = None
    ) -> None:
        self.owner = owner
        self.namespace = namespace
        self.claim = claim
        self.name = name
        self.started = started
        self.error = error

    @property
    def volume(self) -> str:
        return f"{self.namespace}/{self.claim}"

    def _row(self, **fields: Any) -> SnapshotRow:
        return SnapshotRow("csi", self.volume, self.name, **fields)

    def settle(self, deadline: float, timeout: float) -> SnapshotRow:
        if self.error is not None:
            return self._row(ready=False, error=self.error)
        if self.owner.run.dry_run:
            return self._row(ready=False)
        kube = self.owner.kube
        what = f"VolumeSnapshot {self.namespace}/{self.name} of PVC {self.claim}"
        try:
            obj = kube.wait_for(
                SNAPSHOT_API, "VolumeSnapshot", self.name, self.namespace, SNAPSHOT_SETTLED,
                timeout=max(0.0, deadline - time.monotonic()),
            )
        except WaitTimeout:
            last = kube.get(SNAPSHOT_API, "VolumeSnapshot", self.name, self.namespace)
            return self._row(ready=False, seconds_waited=self._waited(), error=(
                f"{what} did not reach status.readyToUse=true within {timeout:g} s "
                f"(last seen: {_status_summary(last)}); check the snapshot-controller and the CSI driver "
                f"(kubectl describe volumesnapshot -n {self.namespace} {self.name})"
            ))
        except OpsPlatformError as error:
            return self._row(ready=False, seconds_waited=self._waited(), error=f"{what}: {error}")
        waited = self._waited()
        if obj is None:
            return self._row(ready=False, seconds_waited=waited, error=f"{what} was deleted while waiting for it")
        status = obj.get("status") or {}
        if status.get("error"):
            message = (status["error"] or {}).get("message") or "no message"
            snapshot_class = self.owner.snapshot_class or "the default class"
            return self._row(ready=False, seconds_waited=waited, error=(
                f"{what} failed: {message} (check the VolumeSnapshotClass {snapshot_class} and the CSI driver)"
            ))
        try:
            restore_size = quantity_bytes(status.get("restoreSize"))
        except ValueError as error:
            return self._row(ready=False, seconds_waited=waited, error=f"{what}: status.restoreSize: {error}")
        return self._row(
            ready=True,
            seconds_waited=waited,
            restore_size_bytes=restore_size,
            snapshot_content=status.get("boundVolumeSnapshotContentName"),
            created_at=_parse_time(status.get("creationTime")),
        )

    def _waited(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def prune(self) -> list[PrunedSnapshot]:
        owner = self.owner
        run = owner.run
        try:
            existing = owner.existing(self.namespace, self.claim)
        except OpsPlatformError as error:
            raise OpsPlatformError(f"listing the VolumeSnapshots of PVC {self.volume} to prune: {error}") from None
        if run.dry_run and all(s.snapshot != self.name for s in existing):
            existing.append(ExistingSnapshot(self.name, run.taken_at_text, ready=True))
        pruned = []
        for old in to_prune(existing, run.group.keep):
            try:
                owner.kube.delete(SNAPSHOT_API, "VolumeSnapshot", old.snapshot, self.namespace, dry_run=run.dry_run)
            except OpsPlatformError as error:
                raise OpsPlatformError(
                    f"deleting VolumeSnapshot {self.namespace}/{old.snapshot} (older than the last "
                    f"{run.group.keep} of PVC {self.claim}): {error}"
                ) from None
            pruned.append(PrunedSnapshot("csi", self.volume, old.snapshot, old.taken_at))
        return pruned


class _EbsSnapshots:
    def __init__(self, ec2: Any | None, run: _Run, poll_interval: float) -> None:
        if ec2 is None:
            raise MissingSettingError(
                EC2_SETTING,
                f"volume group '{run.group.name}' (it selects EBS volumes by ebs_volume_tags)",
                "no EC2 client was given; configure AWS access for the snapshots",
            )
        self.ec2 = ec2
        self.run = run
        self.poll_interval = poll_interval

    def discover(self) -> tuple[list[dict[str, Any]], list[SkippedVolume]]:
        filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in self.run.group.ebs_volume_tags.items()]
        try:
            volumes = sorted(
                self._paginate("describe_volumes", "Volumes", Filters=filters), key=lambda v: v["VolumeId"]
            )
        except _EC2_ERRORS as error:
            raise self._discovery_error(error) from None
        usable: list[dict[str, Any]] = []
        skipped: list[SkippedVolume] = []
        for volume in volumes:
            tags = _tags(volume)
            csi_tag = next((tag for tag in CSI_VOLUME_TAGS if tag in tags), None)
            if csi_tag is not None:
                skipped.append(SkippedVolume("ebs", volume["VolumeId"], (
                    f"provisioned by the EBS CSI driver (tag {csi_tag}); snapshotted through its PVC"
                )))
            elif volume.get("State") not in ("available", "in-use"):
                skipped.append(SkippedVolume("ebs", volume["VolumeId"], f"volume state {volume.get('State')}"))
            else:
                usable.append(volume)
        return usable, skipped

    def _paginate(self, operation: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        for page in self.ec2.get_paginator(operation).paginate(**params):
            yield from page.get(key) or []

    def _discovery_error(self, error: Exception) -> OpsPlatformError:
        what = f"volume group '{self.run.group.name}': finding the EBS volumes tagged {self.run.group.ebs_volume_tags}"
        if isinstance(error, (BotoConnectionError, HTTPClientError)):
            return ServerUnreachableError("ec2", self.endpoint, EC2_SETTING, f"cannot connect ({type(error).__name__})")
        return OpsPlatformError(f"{what}: {ec2_error_text(error, self.endpoint)}")

    @property
    def endpoint(self) -> str:
        return str(self.ec2.meta.endpoint_url)

    def cut(self, volume: dict[str, Any]) -> _Cut:
        run = self.run
        volume_id = volume["VolumeId"]
        name = f"{_tags(volume).get('Name') or volume_id}-{run.group.name}-{run.stamp}"
        tags = [
            {"Key": GROUP_LABEL, "Value": run.group.name},
            {"Key": RUN_LABEL, "Value": run.run_id},
            {"Key": TAKEN_AT_KEY, "Value": run.taken_at_text},
            {"Key": "Name", "Value": name},
        ]
        size = int(volume["Size"]) * GiB if volume.get("Size") is not None else None
        started = time.monotonic()
        try:
            created = self.ec2.create_snapshot(
                VolumeId=volume_id,
                Description=f"ops-platform volume group {run.group.name}, run {run.run_id}",
                TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}],
                DryRun=run.dry_run,
            )
        except _EC2_ERRORS as error:
            if run.dry_run and _error_code(error) == "DryRunOperation":
                return _EbsCut(self, volume_id, name, size, started, snapshot_id=None)
            return _EbsCut(self, volume_id, name, size, started, snapshot_id=None, error=(
                f"ec2: CreateSnapshot of volume {volume_id}: {ec2_error_text(error, self.endpoint)}"
            ))
        return _EbsCut(self, volume_id, name, size, started, snapshot_id=created["SnapshotId"])

    def existing(self, volume_id: str) -> list[ExistingSnapshot]:
        snapshots = self._paginate(
            "describe_snapshots",
            "Snapshots",
            OwnerIds=["self"],
            Filters=[
                {"Name": "volume-id", "Values": [volume_id]},
                {"Name": f"tag:{GROUP_LABEL}", "Values": [self.run.group.name]},
            ],
        )
        return [
            ExistingSnapshot(
                snapshot=snapshot["SnapshotId"],
                taken_at=_tags(snapshot).get(TAKEN_AT_KEY) or _format_time(snapshot.get("StartTime")),
                ready=snapshot.get("State") == "completed",
            )
            for snapshot in snapshots
        ]


_EC2_ERRORS = (ClientError, BotoCoreError)


class _EbsCut:
    def __init__(
        self,
        owner: _EbsSnapshots,
        volume_id: str,
        name: str,
        size: int | None,
        started: float,
        *,
        snapshot_id: str | None,
        error: str | None = None,
    ) -> None:
        self.owner = owner
        self.volume_id = volume_id
        self.name = name
        self.size = size
        self.started = started
        self.snapshot_id = snapshot_id
        self.error = error

    def _row(self, **fields: Any) -> SnapshotRow:
        return SnapshotRow("ebs", self.volume_id, self.snapshot_id or self.name, restore_size_bytes=self.size, **fields)

    def settle(self, deadline: float, timeout: float) -> SnapshotRow:
        if self.error is not None:
            return self._row(ready=False, error=self.error)
        if self.snapshot_id is None:  # dry run
            return self._row(ready=False)
        what = f"EBS snapshot {self.snapshot_id} of volume {self.volume_id}"
        ec2 = self.owner.ec2
        while True:
            try:
                found = ec2.describe_snapshots(SnapshotIds=[self.snapshot_id])["Snapshots"]
            except _EC2_ERRORS as error:
                return self._row(ready=False, seconds_waited=self._waited(), error=(
                    f"ec2: DescribeSnapshots of {what}: {ec2_error_text(error, self.owner.endpoint)}"
                ))
            snapshot = found[0] if found else {}
            state = snapshot.get("State")
            if state == "completed":
                size = snapshot.get("VolumeSize")
                return SnapshotRow(
                    "ebs", self.volume_id, self.snapshot_id, ready=True,
                    restore_size_bytes=int(size) * GiB if size is not None else self.size,
                    seconds_waited=self._waited(), created_at=_as_utc(snapshot.get("StartTime")),
                )
            if state in ("error", "recoverable") or not found:
                reason = snapshot.get("StateMessage") or ("it disappeared" if not found else f"state {state}")
                return self._row(ready=False, seconds_waited=self._waited(), error=(
                    f"{what} failed: {reason} (check the volume and the account's snapshot limits)"
                ))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._row(ready=False, seconds_waited=self._waited(), error=(
                    f"{what} was not completed within {timeout:g} s (state {state}, progress "
                    f"{snapshot.get('Progress') or 'unknown'}); it continues in AWS and is kept"
                ))
            time.sleep(min(self.owner.poll_interval, remaining))

    def _waited(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def prune(self) -> list[PrunedSnapshot]:
        owner = self.owner
        run = owner.run
        try:
            existing = owner.existing(self.volume_id)
        except _EC2_ERRORS as error:
            raise OpsPlatformError(
                f"ec2: listing the snapshots of volume {self.volume_id} to prune: "
                f"{ec2_error_text(error, owner.endpoint)}"
            ) from None
        if run.dry_run:
            existing.append(ExistingSnapshot(self.name, run.taken_at_text, ready=True))
        pruned = []
        for old in to_prune(existing, run.group.keep):
            try:
                owner.ec2.delete_snapshot(SnapshotId=old.snapshot, DryRun=run.dry_run)
            except _EC2_ERRORS as error:
                if not (run.dry_run and _error_code(error) == "DryRunOperation"):
                    raise OpsPlatformError(
                        f"ec2: DeleteSnapshot {old.snapshot} (older than the last {run.group.keep} of volume "
                        f"{self.volume_id}): {ec2_error_text(error, owner.endpoint)}"
                    ) from None
            pruned.append(PrunedSnapshot("ebs", self.volume_id, old.snapshot, old.taken_at))
        return pruned


def snapshot_name(claim: str, group: str, stamp: str) -> str:
    """``<pvc>-<group>-<stamp>`` within 63 characters; a long prefix is cut and made unique by a hash."""
    base = f"{claim}-{group.replace('_', '-')}"
    name = f"{base}-{stamp}"
    if len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    room = NAME_LIMIT - len(stamp) - len(digest) - 2
    return f"{base[:room].rstrip('-.')}-{digest}-{stamp}"


_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("0.001"), "": 1, "k": 10**3,
                     "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")


def quantity_bytes(quantity: str | int | None) -> int | None:
    """A Kubernetes quantity (``10Gi``, ``1500M``, ``1e9``, ``1073741824``) as a whole number of bytes."""
    if quantity is None:
        return None
    if isinstance(quantity, int):
        return quantity
    found = _QUANTITY.fullmatch(str(quantity).strip())
    if found is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    number, suffix = found.group(1), found.group(2) or ""
    try:
        value = Decimal(number)
        if suffix[:1] in ("e", "E"):
            value *= Decimal(10) ** int(suffix[1:])
        else:
            value *= _BINARY_SUFFIXES.get(suffix) or _DECIMAL_SUFFIXES[suffix]
    except InvalidOperation:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity") from None
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


def ec2_error_text(error: Exception, endpoint: str) -> str:
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return f"no AWS credentials (check {CREDENTIALS_SETTING})"
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return f"cannot connect to {endpoint} ({type(error).__name__}; check {EC2_SETTING})"
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        return f"{details.get('Code', 'error')}: {details.get('Message', '')} (at {endpoint})"
    return f"{type(error).__name__}: {error} (at {endpoint}; check {EC2_SETTING})"


def _error_code(error: Exception) -> str:
    return error.response.get("Error", {}).get("Code", "") if isinstance(error, ClientError) else ""


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags") or []}


def _require_label_value(value: str, what: str, group: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise SnapshotError(
            f"volume group '{group}': {what} {value!r} cannot be a Kubernetes label value "
            "(at most 63 characters, letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        )


def _status_summary(obj: dict[str, Any] | None) -> str:
    if obj is None:
        return "the VolumeSnapshot does not exist"
    status = obj.get("status")
    if not status:
        return "no status yet: no controller has picked it up"
    shown = [f"{key}={status[key]}" for key in ("readyToUse", "boundVolumeSnapshotContentName") if key in status]
    return ", ".join(shown) or f"status {status}"


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def _as_utc(moment: datetime | None) -> datetime | None:
    return moment.astimezone(timezone.utc) if moment is not None else None


def _format_time(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime(_TIMESTAMP_FORMAT) if moment is not None else ""


def _failure_message(result: VolumeGroupSnapshot) -> str:
    lines = [f"volume group '{result.group}': {len(result.failed)} of {len(result.volumes)} snapshots failed"
             + (f", pruning failed {len(result.prune_errors)} times" if result.prune_errors else "")
             + " (volumes that failed were not pruned)"]
    lines += [f"  - {row.volume}: {row.error}" for row in result.failed]
    lines += [f"  - pruning: {error}" for error in result.prune_errors]
    return "\n".join(lines)
