"""Volume snapshots of a volume group against the real API server and moto's EC2.

The code runs as the code location's ServiceAccount ``ops-platform``
(tests/fixtures/kube_server.py) on the VolumeSnapshot CRDs of infra/crds. The
claims are made as admin and bound to their PersistentVolumes by the real PV
controller. No snapshot-controller runs on this server:
:class:`SnapshotControllerStandIn` plays its part (and the CSI driver's), as
admin: a moment after a VolumeSnapshot appears it writes the status the
snapshot-controller writes (readyToUse, restoreSize = the claim's capacity,
boundVolumeSnapshotContentName, creationTime), or ``status.error`` for a claim
listed as failing; a claim listed as stuck never gets a status.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config

from ops_platform.errors import MissingSettingError, ServerUnreachableError
from ops_platform.local_servers import free_port
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesError, KubernetesResource
from ops_platform.snapshots import (
    GROUP_LABEL,
    RUN_LABEL,
    SNAPSHOT_API,
    TAKEN_AT_KEY,
    ExistingSnapshot,
    SnapshotError,
    VolumeGroupSnapshot,
    quantity_bytes,
    snapshot_name,
    snapshot_volume_group,
    to_prune,
)
from ops_platform.spec import VolumeGroup
from tests.fakes.kube_api import KubeApiServer
from tests.fixtures.kube_server import KubeCluster

GiB = 1024**3
START = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
SNAPSHOT_CLASS = "csi-aws-vsc"
AZ = "ap-northeast-2a"
CONTEXT = "kind-test"
SNAPSHOT_QUOTA = "count/volumesnapshots.snapshot.storage.k8s.io"
PVCS = [
    # namespace (of Namespaces), name, tier label, bound, capacity (of its volume)
    ("data", "pg-data", "data", True, "10Gi"),
    ("data", "redis-data", "data", True, "2Gi"),
    ("apps", "es-data", "data", True, "5Gi"),
    ("apps", "scratch", "data", False, None),
    ("apps", "logs", "logs", True, "1Gi"),
]


class StepClock:
    """The time of each run: START, then six hours later at every call (the snapshot schedule)."""

    def __init__(self, start: datetime = START) -> None:
        self.next = start

    def __call__(self) -> datetime:
        now, self.next = self.next, self.next + timedelta(hours=6)
        return now


@dataclass(frozen=True)
class Namespaces:
    """The two namespaces of a module, ``apps`` sorting before ``data`` as the volumes are reported."""

    apps: str
    data: str


@dataclass
class Cluster:
    """The module's claims on the real server, and how to read what the code made (as admin)."""

    kube_cluster: KubeCluster
    namespaces: Namespaces
    test_id: str
    volumes: list[str] = field(default_factory=list)

    @property
    def selector(self) -> str:
        return f"tier=data,ops-platform-test={self.test_id}"

    def group(self, **fields) -> VolumeGroup:
        return VolumeGroup.model_validate({"name": "data", "selector": self.selector, "keep": 2, **fields})

    def claim(self, namespace: str, name: str, tier: str, size: str) -> None:
        self.kube_cluster.put_object({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"tier": tier, "ops-platform-test": self.test_id}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "gp3",
                     "resources": {"requests": {"storage": size}}},
        })

    def snapshots_in(self, namespace: str) -> dict[str, dict]:
        return {item["metadata"]["name"]: item
                for item in self.kube_cluster.list_objects(SNAPSHOT_API, "VolumeSnapshot", namespace)}

    def put_snapshot(self, namespace: str, name: str, claim: str, *, labels=None, annotations=None,
                     status=None) -> None:
        """A VolumeSnapshot someone else took (as admin), with the status its controller gave it."""
        self.kube_cluster.put_object({"apiVersion": SNAPSHOT_API, "kind": "VolumeSnapshot",
                                      "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                                                   "annotations": annotations or {}},
                                      "spec": {"source": {"persistentVolumeClaimName": claim}}})
        if status:
            self.kube_cluster.set_status(SNAPSHOT_API, "VolumeSnapshot", name, namespace, status)

    def remove_snapshots(self) -> None:
        for namespace in (self.namespaces.apps, self.namespaces.data):
            self.kube_cluster.dynamic().resources.get(api_version=SNAPSHOT_API, kind="VolumeSnapshot").delete(
                namespace=namespace, field_selector=f"metadata.namespace={namespace}")

    def snapshot_writes(self, mark: tuple[int, str], count: int) -> list[dict]:
        """The writes ops-platform sent to VolumeSnapshots since ``mark``, once ``count`` are in the audit log."""
        def writes() -> list[dict]:
            return [event for event in self.kube_cluster.audit_events_since(mark)
                    if (event.get("objectRef") or {}).get("resource") == "volumesnapshots"
                    and event["verb"] in ("create", "patch", "update", "delete")]

        return self.kube_cluster.wait_for(f"{count} write(s) in the audit log",
                                          lambda: len(found := writes()) >= count and found)


def query(event: dict) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(event["requestURI"]).query).items()}


class SnapshotControllerStandIn:
    """The snapshot-controller's part (no such controller runs here): status written as admin."""

    def __init__(self, kube_cluster: KubeCluster, namespaces: list[str], delay: float = 0.1) -> None:
        self.kube_cluster = kube_cluster
        self.namespaces = namespaces
        self.delay = delay
        self.failing: set[str] = set()
        self.stuck: set[str] = set()
        self.errors: list[BaseException] = []
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshot-controller-stand-in", daemon=True)

    def __enter__(self) -> SnapshotControllerStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from kubernetes.dynamic.exceptions import NotFoundError

        while not self._stop.wait(0.1):
            try:
                for snapshot in self.kube_cluster.list_objects(SNAPSHOT_API, "VolumeSnapshot"):
                    if snapshot["metadata"]["namespace"] in self.namespaces:
                        self._reconcile(snapshot)
            except NotFoundError:
                pass  # deleted between the list and the status write
            except BaseException as error:  # noqa: BLE001 - surfaced by the fixture
                self.errors.append(error)
                return

    def _reconcile(self, snapshot: dict) -> None:
        meta = snapshot["metadata"]
        if snapshot.get("status") or meta.get("deletionTimestamp"):
            return
        first_seen = self._seen.setdefault(meta["uid"], time.monotonic())
        claim = snapshot["spec"]["source"]["persistentVolumeClaimName"]
        if time.monotonic() - first_seen < self.delay or claim in self.stuck:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if claim in self.failing:
            status = {"readyToUse": False, "error": {"message": "Failed to check and update snapshot content: "
                                                                "rpc error: code = Internal desc = volume is busy",
                                                     "time": now}}
        else:
            pvc = self.kube_cluster.get_object("v1", "PersistentVolumeClaim", claim, meta["namespace"])
            status = {"readyToUse": True, "restoreSize": pvc["status"]["capacity"]["storage"],
                      "boundVolumeSnapshotContentName": f"snapcontent-{meta['uid']}", "creationTime": now}
        self.kube_cluster.set_status(SNAPSHOT_API, "VolumeSnapshot", meta["name"], meta["namespace"], status)


@pytest.fixture(scope="module")
def kubeconfig(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snapshots") / "kubeconfig"
    return kube_cluster.write_kubeconfig(path, "ops-platform", context=CONTEXT)


@pytest.fixture(scope="module")
def kube(kube_crds, kubeconfig: Path) -> KubernetesClient:
    return KubernetesResource(kubeconfig=str(kubeconfig), context=CONTEXT, request_timeout=10).get_client()


@pytest.fixture(scope="module")
def volumes(kube_cluster: KubeCluster, kube_crds, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The claims of PVCS in two namespaces of this module, bound to their volumes: made once per module
    (binding is the slow part), the snapshots of each test removed after it (:func:`cluster`)."""
    test_id = uuid.uuid4().hex[:8]
    module = request.module.__name__.rpartition(".")[2].replace("_", "-")
    namespaces = Namespaces(f"{module}-{test_id}-apps", f"{module}-{test_id}-data")
    made = Cluster(kube_cluster, namespaces, test_id)
    for name in (namespaces.apps, namespaces.data):
        kube_cluster.create_namespace(name)
    for namespace, name, tier, bound, capacity in PVCS:
        made.claim(getattr(namespaces, namespace), name, tier, capacity or "1Gi")
    made.volumes = kube_cluster.provide_volumes([(getattr(namespaces, namespace), name, capacity)
                                                 for namespace, name, _, bound, capacity in PVCS if bound])
    kube_cluster.put_object({"apiVersion": SNAPSHOT_API, "kind": "VolumeSnapshotClass",
                             "metadata": {"name": SNAPSHOT_CLASS}, "driver": "ebs.csi.aws.com",
                             "deletionPolicy": "Delete"})
    yield made
    kube_cluster.delete_object(SNAPSHOT_API, "VolumeSnapshotClass", SNAPSHOT_CLASS)
    for name in (namespaces.apps, namespaces.data):
        kube_cluster.delete_object("v1", "Namespace", name)
    for volume in made.volumes:
        kube_cluster.delete_object("v1", "PersistentVolume", volume)


@pytest.fixture
def cluster(volumes: Cluster) -> Iterator[Cluster]:
    yield volumes
    volumes.remove_snapshots()


@pytest.fixture
def controller(kube_cluster: KubeCluster, cluster: Cluster) -> Iterator[SnapshotControllerStandIn]:
    with SnapshotControllerStandIn(kube_cluster, [cluster.namespaces.apps, cluster.namespaces.data]) as running:
        yield running
    assert not running.errors, running.errors


@pytest.fixture
def ec2(aws_env):
    return boto3.client("ec2")


def run(volume_group: VolumeGroup, kube: KubernetesClient, ec2_client=None, *, clock=None,
        timeout: float = 5.0, run_id: str = "run-1", dry_run: bool = False,
        snapshot_class: str | None = SNAPSHOT_CLASS) -> VolumeGroupSnapshot:
    return snapshot_volume_group(volume_group, kube, ec2_client, snapshot_class=snapshot_class, run_id=run_id,
                                 clock=clock or StepClock(), timeout=timeout, dry_run=dry_run, poll_interval=0.05)


def test_snapshots_every_bound_pvc_of_the_group_and_records_restore_size(cluster, controller, kube, kube_cluster):
    apps, data = cluster.namespaces.apps, cluster.namespaces.data
    mark = kube_cluster.audit_mark()

    result = run(cluster.group(), kube, run_id="3f2a9c1e-run")

    stamp = "20261122020000"
    assert [(row.volume, row.snapshot, row.ready, row.restore_size_bytes, row.error) for row in result.volumes] == [
        (f"{apps}/es-data", f"es-data-data-{stamp}", True, 5 * GiB, None),
        (f"{data}/pg-data", f"pg-data-data-{stamp}", True, 10 * GiB, None),
        (f"{data}/redis-data", f"redis-data-data-{stamp}", True, 2 * GiB, None),
    ]
    assert [(s.volume, s.reason) for s in result.skipped] == [
        (f"{apps}/scratch", "phase Pending: not bound to a volume, nothing to snapshot")]
    assert result.totals()["restore_size_bytes"] == 17 * GiB and result.pruned == ()
    for row in result.volumes:
        assert row.snapshot_content.startswith("snapcontent-") and row.created_at is not None

    stored = cluster.snapshots_in(data)[f"pg-data-data-{stamp}"]
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "ops-platform",
                                            GROUP_LABEL: "data", RUN_LABEL: "3f2a9c1e-run"}
    assert stored["metadata"]["annotations"][TAKEN_AT_KEY] == "2026-11-22T02:00:00Z"
    assert stored["spec"]["source"] == {"persistentVolumeClaimName": "pg-data"}
    assert stored["spec"]["volumeSnapshotClassName"] == SNAPSHOT_CLASS
    assert "logs" not in str(cluster.snapshots_in(apps))
    applies = cluster.snapshot_writes(mark, 3)
    assert len(applies) == 3 and {e["verb"] for e in applies} == {"patch"}
    assert all(query(e) == {"fieldManager": "ops-platform", "force": "True"} for e in applies), applies

    pg_row = result.volume_rows()[1]
    assert {k: v for k, v in pg_row.items() if k != "waited (s)"} == {
        "volume": f"{data}/pg-data", "kind": "csi", "snapshot": f"pg-data-data-{stamp}", "ready": True,
        "restore size (bytes)": 10 * GiB, "error": None}
    assert result.skipped_rows() == [{"volume": f"{apps}/scratch", "kind": "csi", "reason": result.skipped[0].reason}]


def test_namespaces_limit_the_group_and_the_default_class_is_left_to_the_cluster(cluster, controller, kube):
    data = cluster.namespaces.data
    result = run(cluster.group(namespaces=[data]), kube, snapshot_class=None)
    assert [row.volume for row in result.ready] == [f"{data}/pg-data", f"{data}/redis-data"]
    assert cluster.snapshots_in(cluster.namespaces.apps) == {}
    assert all("volumeSnapshotClassName" not in s["spec"] for s in cluster.snapshots_in(data).values())


def test_a_failed_snapshot_is_reported_the_others_succeed_and_its_volume_is_not_pruned(cluster, controller, kube):
    apps, data = cluster.namespaces.apps, cluster.namespaces.data
    clock = StepClock()
    for n in (1, 2):
        assert len(run(cluster.group(keep=2), kube, clock=clock, run_id=f"run-{n}").ready) == 3
    controller.failing.add("redis-data")

    # keep lowered to 1: the older snapshots of every volume would go, but not those of redis-data.
    with pytest.raises(SnapshotError) as raised:
        run(cluster.group(keep=1), kube, clock=clock, run_id="run-3")

    message = str(raised.value)
    assert "1 of 3 snapshots failed" in message
    assert f"VolumeSnapshot {data}/redis-data-data-20261122140000 of PVC redis-data failed" in message
    assert "volume is busy" in message and f"VolumeSnapshotClass {SNAPSHOT_CLASS}" in message
    result = raised.value.result
    assert [row.volume for row in result.failed] == [f"{data}/redis-data"]
    assert [row.volume for row in result.ready] == [f"{apps}/es-data", f"{data}/pg-data"]
    assert sorted(p.snapshot for p in result.pruned) == [
        "es-data-data-20261122020000", "es-data-data-20261122080000",
        "pg-data-data-20261122020000", "pg-data-data-20261122080000"]
    assert sorted(cluster.snapshots_in(data)) == [
        "pg-data-data-20261122140000", "redis-data-data-20261122020000",
        "redis-data-data-20261122080000", "redis-data-data-20261122140000"]


def test_a_snapshot_never_ready_times_out_with_a_message_naming_it(cluster, controller, kube):
    apps, data = cluster.namespaces.apps, cluster.namespaces.data
    controller.stuck.add("pg-data")
    with pytest.raises(SnapshotError) as raised:
        run(cluster.group(keep=1), kube, timeout=1.0)

    failed = raised.value.result.failed
    assert len(failed) == 1 and failed[0].volume == f"{data}/pg-data"
    assert failed[0].error.startswith(
        f"VolumeSnapshot {data}/pg-data-data-20261122020000 of PVC pg-data did not reach "
        "status.readyToUse=true within 1 s (last seen: no status yet")
    assert f"kubectl describe volumesnapshot -n {data} pg-data-data-20261122020000" in failed[0].error
    assert [row.volume for row in raised.value.result.ready] == [f"{apps}/es-data", f"{data}/redis-data"]


def test_keep_n_prunes_only_this_groups_snapshots_across_three_runs(cluster, controller, kube):
    apps, data = cluster.namespaces.apps, cluster.namespaces.data
    cluster.put_snapshot(data, "pg-data-manual", "pg-data")
    cluster.put_snapshot(data, "pg-data-other-group", "pg-data", labels={GROUP_LABEL: "other"},
                         annotations={TAKEN_AT_KEY: "2020-01-01T00:00:00Z"}, status={"readyToUse": True})
    cluster.put_snapshot(data, "gone-data-20200101000000", "gone", labels={GROUP_LABEL: "data"},
                         annotations={TAKEN_AT_KEY: "2020-01-01T00:00:00Z"}, status={"readyToUse": True})
    cluster.put_snapshot(data, "pg-data-failed-leftover", "pg-data", labels={GROUP_LABEL: "data"},
                         annotations={TAKEN_AT_KEY: "2026-11-21T20:00:00Z"},
                         status={"readyToUse": False, "error": {"message": "old failure"}})
    clock = StepClock()

    results = [run(cluster.group(keep=2), kube, clock=clock, run_id=f"run-{n}") for n in (1, 2, 3)]

    assert [sorted(p.snapshot for p in r.pruned) for r in results] == [
        [],
        ["pg-data-failed-leftover"],
        ["es-data-data-20261122020000", "pg-data-data-20261122020000", "redis-data-data-20261122020000"],
    ]
    assert sorted(cluster.snapshots_in(data)) == [
        "gone-data-20200101000000", "pg-data-data-20261122080000", "pg-data-data-20261122140000",
        "pg-data-manual", "pg-data-other-group", "redis-data-data-20261122080000", "redis-data-data-20261122140000"]
    assert sorted(cluster.snapshots_in(apps)) == ["es-data-data-20261122080000", "es-data-data-20261122140000"]
    assert {row["snapshot"] for row in results[2].pruned_rows()} == {p.snapshot for p in results[2].pruned}


def test_pruning_keeps_the_newest_ready_ones_and_newer_snapshots_in_progress():
    existing = [
        ExistingSnapshot("a", "2026-01-01T00:00:00Z", ready=True),
        ExistingSnapshot("b", "2026-01-02T00:00:00Z", ready=False),
        ExistingSnapshot("c", "2026-01-03T00:00:00Z", ready=True),
        ExistingSnapshot("d", "2026-01-04T00:00:00Z", ready=False),
        ExistingSnapshot("e", "2026-01-05T00:00:00Z", ready=True),
        ExistingSnapshot("f", "2026-01-06T00:00:00Z", ready=False),
    ]
    assert [s.snapshot for s in to_prune(existing, 1)] == ["d", "c", "b", "a"]
    assert [s.snapshot for s in to_prune(existing, 2)] == ["b", "a"]
    assert to_prune(existing, 3) == [] and to_prune(existing[:2], 1) == []
    assert to_prune([ExistingSnapshot("x", "2026", ready=False)] * 3, 1) == []


def test_ebs_volumes_selected_by_tags_are_snapshotted_and_pruned(kube, ec2, volumes):
    def volume(size: int, tags: dict[str, str]) -> str:
        return ec2.create_volume(AvailabilityZone=AZ, Size=size, TagSpecifications=[
            {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])["VolumeId"]

    wal = volume(20, {"backup": "nightly", "Name": "pg-wal"})
    spool = volume(4, {"backup": "nightly"})
    volume(8, {"backup": "never"})
    csi = volume(8, {"backup": "nightly", "kubernetes.io/created-for/pvc/name": "pg-data"})
    manual = ec2.create_snapshot(VolumeId=wal, Description="taken by hand")["SnapshotId"]
    # No claim carries this selector's labels: the group is its EBS volumes alone.
    ebs_group = volumes.group(selector=f"tier=none,ops-platform-test={volumes.test_id}", keep=2,
                              ebs_volume_tags={"backup": "nightly"})
    clock = StepClock()

    first = run(ebs_group, kube, ec2, clock=clock, run_id="run-1")
    assert sorted((row.volume, row.restore_size_bytes, row.ready) for row in first.volumes) == sorted(
        [(wal, 20 * GiB, True), (spool, 4 * GiB, True)])
    assert [(s.volume, s.reason.split(";")[0]) for s in first.skipped] == [
        (csi, "provisioned by the EBS CSI driver (tag kubernetes.io/created-for/pvc/name)")]
    wal_row = next(row for row in first.volumes if row.volume == wal)
    (taken,) = ec2.describe_snapshots(SnapshotIds=[wal_row.snapshot])["Snapshots"]
    assert {t["Key"]: t["Value"] for t in taken["Tags"]} == {
        GROUP_LABEL: "data", RUN_LABEL: "run-1", TAKEN_AT_KEY: "2026-11-22T02:00:00Z",
        "Name": "pg-wal-data-20261122020000"}

    results = [first] + [run(ebs_group, kube, ec2, clock=clock, run_id=f"run-{n}") for n in (2, 3)]
    assert [len(r.pruned) for r in results] == [0, 0, 2]
    assert {p.snapshot for p in results[2].pruned} == {row.snapshot for row in first.volumes}

    def snapshot_ids(volume_id: str) -> set[str]:
        found = ec2.describe_snapshots(Filters=[{"Name": "volume-id", "Values": [volume_id]}])["Snapshots"]
        return {s["SnapshotId"] for s in found}

    for volume_id in (wal, spool):
        kept = {row.snapshot for r in results[1:] for row in r.volumes if row.volume == volume_id}
        assert snapshot_ids(volume_id) == kept | ({manual} if volume_id == wal else set())
    assert snapshot_ids(csi) == set()


def test_dry_run_changes_nothing_and_says_what_would_happen(cluster, controller, kube, ec2, kube_cluster):
    apps, data = cluster.namespaces.apps, cluster.namespaces.data
    wal = ec2.create_volume(AvailabilityZone=AZ, Size=20, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "backup", "Value": "nightly"}]}])["VolumeId"]
    dry_group = cluster.group(keep=1, ebs_volume_tags={"backup": "nightly"})
    ours = [{"Name": f"tag:{GROUP_LABEL}", "Values": ["data"]}]
    mark = kube_cluster.audit_mark()

    planned = run(dry_group, kube, ec2, dry_run=True)
    assert planned.dry_run and planned.failed == () and planned.pruned == ()
    assert [(row.volume, row.snapshot, row.ready) for row in planned.volumes] == [
        (f"{apps}/es-data", "es-data-data-20261122020000", False),
        (f"{data}/pg-data", "pg-data-data-20261122020000", False),
        (f"{data}/redis-data", "redis-data-data-20261122020000", False),
        (wal, f"{wal}-data-20261122020000", False),
    ]
    assert cluster.snapshots_in(data) == {} and cluster.snapshots_in(apps) == {}
    assert ec2.describe_snapshots(Filters=ours)["Snapshots"] == []
    writes = cluster.snapshot_writes(mark, 3)
    assert len(writes) == 3 and {query(e).get("dryRun") for e in writes} == {"All"}

    clock = StepClock()
    taken = run(dry_group, kube, ec2, clock=clock)
    would_prune = run(dry_group, kube, ec2, clock=clock, dry_run=True)
    assert sorted(p.snapshot for p in would_prune.pruned) == sorted(row.snapshot for row in taken.volumes)
    assert len(cluster.snapshots_in(data)) == 2 and len(cluster.snapshots_in(apps)) == 1
    assert len(ec2.describe_snapshots(Filters=ours)["Snapshots"]) == 1
    assert would_prune.dry_run and would_prune.totals()["pruned"] == 4


def test_a_snapshot_the_namespace_quota_refuses_fails_that_volume_only(cluster, controller, kube, kube_cluster):
    apps, data = cluster.namespaces.apps, cluster.namespaces.data
    kube_cluster.put_object({"apiVersion": "v1", "kind": "ResourceQuota",
                             "metadata": {"name": "snapshots", "namespace": data},
                             "spec": {"hard": {SNAPSHOT_QUOTA: "1"}}})
    # The resource quota controller's part: it counts a custom kind only after its next discovery pass.
    kube_cluster.set_status("v1", "ResourceQuota", "snapshots", data,
                            {"hard": {SNAPSHOT_QUOTA: "1"}, "used": {SNAPSHOT_QUOTA: "0"}})

    try:
        with pytest.raises(SnapshotError) as raised:
            run(cluster.group(), kube)
    finally:
        kube_cluster.delete_object("v1", "ResourceQuota", "snapshots", data)

    (failed,) = raised.value.result.failed
    assert failed.volume == f"{data}/redis-data"
    assert "was refused (403" in failed.error and "exceeded quota: snapshots" in failed.error
    assert [row.volume for row in raised.value.result.ready] == [f"{apps}/es-data", f"{data}/pg-data"]
    assert sorted(cluster.snapshots_in(data)) == ["pg-data-data-20261122020000"]


def test_missing_snapshot_class_is_named_before_anything_is_created(cluster, kube):
    with pytest.raises(SnapshotError, match=(
        r"VolumeSnapshotClass 'gp3-snapshots' does not exist on the cluster at https://127\.0\.0\.1:\d+ "
        rf"\(available: [^)]*\b{SNAPSHOT_CLASS}\b")):
        run(cluster.group(), kube, snapshot_class="gp3-snapshots")
    assert cluster.snapshots_in(cluster.namespaces.data) == {}


def test_a_cluster_without_the_snapshot_crds_is_named(cluster, kubeconfig, kube_cluster):
    removed = kube_cluster.remove_crds("volumesnapshots.snapshot.storage.k8s.io")
    try:
        with pytest.raises(SnapshotError, match=(
            "does not serve kind VolumeSnapshot in snapshot.storage.k8s.io/v1.*"
            "install.*external-snapshotter CRDs")):
            # A client of its own, as each run has: it discovers the cluster as it is now.
            run(cluster.group(), KubernetesResource(kubeconfig=str(kubeconfig), context=CONTEXT).get_client())
    finally:
        kube_cluster.reinstall_crds(removed)


def test_kubernetes_down_is_named_with_the_setting():
    from kubernetes import client

    port = free_port()
    kube = KubernetesClient(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")),
                            request_timeout=2)
    with pytest.raises(ServerUnreachableError, match=rf"kubernetes API: connection refused at "
                                                     rf"http://127\.0\.0\.1:{port} \(check KUBECONFIG"):
        run(VolumeGroup(name="data", selector="tier=data"), kube)


def test_listing_pvcs_failing_stops_the_run_before_any_snapshot_fake_injects_500(kube_api: KubeApiServer,
                                                                                 kube_api_client):
    kube_api.fail_next("GET", r"/persistentvolumeclaims", 500, message="etcdserver: request timed out")
    with pytest.raises(KubernetesError, match="list PersistentVolumeClaim .* failed \\(500.*request timed out"):
        run(VolumeGroup(name="data", selector="tier=data"), KubernetesClient(kube_api_client, request_timeout=10))
    assert [r for r in kube_api.requests if r.method not in ("GET", "HEAD")] == []


def test_ec2_down_is_named_before_any_snapshot(cluster, kube, aws_env):
    port = free_port()
    down = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{port}",
                        config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(ServerUnreachableError, match=rf"ec2: cannot connect .* at http://127\.0\.0\.1:{port} "
                                                     r"\(check AWS_ENDPOINT_URL / AWS_REGION\)"):
        run(cluster.group(ebs_volume_tags={"backup": "nightly"}), kube, down)
    assert cluster.snapshots_in(cluster.namespaces.data) == {}


def test_ebs_tags_without_an_ec2_client_is_a_missing_setting(cluster, kube):
    with pytest.raises(MissingSettingError, match="volume group 'data' .*ebs_volume_tags.* needs AWS_ENDPOINT_URL"):
        run(cluster.group(ebs_volume_tags={"backup": "nightly"}), kube, None)


def test_a_run_id_that_cannot_be_a_label_is_refused(kube):
    with pytest.raises(SnapshotError, match="the run id 'run 1/2' cannot be a Kubernetes label value"):
        run(VolumeGroup(name="data", selector="tier=data"), kube, run_id="run 1/2")


def test_snapshot_names_fit_63_characters_and_stay_distinct():
    assert snapshot_name("pg-data", "main_db", "20261122020000") == "pg-data-main-db-20261122020000"
    long_a = snapshot_name("a" * 60 + "-x", "data", "20261122020000")
    long_b = snapshot_name("a" * 60 + "-y", "data", "20261122020000")
    assert len(long_a) == len(long_b) == 63 and long_a != long_b
    assert long_a.endswith("-20261122020000") and long_a[0] == "a"


@pytest.mark.parametrize("quantity, expected", [
    ("10Gi", 10 * GiB), ("1500M", 1_500_000_000), ("1e3", 1000), ("1073741824", GiB), (512, 512),
    ("1.5Ki", 1536), ("100m", 1), ("5u", 1), ("1n", 1), (None, None),
])
def test_quantities_are_read_as_bytes(quantity, expected):
    assert quantity_bytes(quantity) == expected


def test_a_garbled_quantity_is_refused():
    with pytest.raises(ValueError, match="'ten gigs' is not a Kubernetes quantity"):
        quantity_bytes("ten gigs")
