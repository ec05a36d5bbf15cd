"""Volume snapshots of a volume group against the fake Kubernetes API and moto's EC2.

A :class:`SnapshotController` thread plays the snapshot-controller and the CSI
driver: a VolumeSnapshot becomes readyToUse (restoreSize = the PVC's capacity)
a moment after it appears, unless its PVC is listed as failing (status.error)
or stuck (never ready).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from botocore.config import Config

from ops_platform.errors import MissingSettingError, ServerUnreachableError
from ops_platform.local_servers import free_port
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesError
from ops_platform.snapshots import (
    GROUP_LABEL,
    RUN_LABEL,
    SNAPSHOT_API,
    TAKEN_AT_KEY,
    SnapshotError,
    VolumeGroupSnapshot,
    ExistingSnapshot,
    quantity_bytes,
    snapshot_name,
    snapshot_volume_group,
    to_prune,
)
from ops_platform.spec import VolumeGroup
from tests.fakes.kube_api import ApiError, KubeApiServer

GiB = 1024**3
START = datetime(2026, 11, 22, 2, 0, tzinfo=timezone.utc)
SNAPSHOT_CLASS = "csi-aws-vsc"
AZ = "ap-northeast-2a"
PVCS = [
    # namespace, name, labels, phase, capacity
    ("data", "pg-data", {"tier": "data"}, "Bound", "10Gi"),
    ("data", "redis-data", {"tier": "data"}, "Bound", "2Gi"),
    ("apps", "es-data", {"tier": "data"}, "Bound", "5Gi"),
    ("apps", "scratch", {"tier": "data"}, "Pending", None),
    ("apps", "logs", {"tier": "logs"}, "Bound", "1Gi"),
]


class StepClock:
    """The time of each run: START, then six hours later at every call (the snapshot schedule)."""

    def __init__(self, start: datetime = START) -> None:
        self.next = start

    def __call__(self) -> datetime:
        now, self.next = self.next, self.next + timedelta(hours=6)
        return now


class SnapshotController:
    def __init__(self, kube_api: KubeApiServer, kube: KubernetesClient, delay: float = 0.15) -> None:
        self.kube_api = kube_api
        self.kube = kube
        self.delay = delay
        self.failing: set[str] = set()
        self.stuck: set[str] = set()
        self.errors: list[BaseException] = []
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-snapshot-controller", daemon=True)

    def __enter__(self) -> SnapshotController:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.03):
            try:
                for snapshot in self.kube.list(SNAPSHOT_API, "VolumeSnapshot"):
                    self._reconcile(snapshot)
            except ApiError:
                pass  # deleted between the list and the status write, as on a real cluster
            except BaseException as error:  # noqa: BLE001 - surfaced by the fixture
                self.errors.append(error)
                return

    def _reconcile(self, snapshot: dict) -> None:
        meta = snapshot["metadata"]
        if snapshot.get("status"):
            return
        first_seen = self._seen.setdefault(meta["uid"], time.monotonic())
        claim = snapshot["spec"]["source"]["persistentVolumeClaimName"]
        if time.monotonic() - first_seen < self.delay or claim in self.stuck:
            return
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if claim in self.failing:
            status = {"readyToUse": False, "error": {"message": "Failed to check and update snapshot content: "
                                                                "rpc error: code = Internal desc = volume is busy",
                                                     "time": now}}
        else:
            pvc = self.kube_api.get_object("v1", "persistentvolumeclaims", claim, meta["namespace"])
            status = {"readyToUse": True, "restoreSize": pvc["status"]["capacity"]["storage"],
                      "boundVolumeSnapshotContentName": f"snapcontent-{meta['uid']}", "creationTime": now}
        self.kube_api.set_status(SNAPSHOT_API, "volumesnapshots", meta["name"], meta["namespace"], status)


@pytest.fixture
def kube(kube_api_client) -> KubernetesClient:
    return KubernetesClient(kube_api_client, request_timeout=10)


@pytest.fixture
def cluster(kube_api: KubeApiServer) -> KubeApiServer:
    for namespace in ("data", "apps"):
        kube_api.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for namespace, name, labels, phase, capacity in PVCS:
        status = {"phase": phase, **({"capacity": {"storage": capacity}} if capacity else {})}
        kube_api.put_object({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "gp3",
                     "resources": {"requests": {"storage": capacity or "1Gi"}}},
            "status": status,
        })
    kube_api.put_object({"apiVersion": SNAPSHOT_API, "kind": "VolumeSnapshotClass",
                         "metadata": {"name": SNAPSHOT_CLASS}, "driver": "ebs.csi.aws.com",
                         "deletionPolicy": "Delete"})
    return kube_api


@pytest.fixture
def controller(cluster: KubeApiServer, kubeconfig_path) -> Iterator[SnapshotController]:
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(kubeconfig_path), context="fake")
    with SnapshotController(cluster, KubernetesClient(api_client, request_timeout=5)) as running:
        yield running
    api_client.close()
    assert not running.errors, running.errors


@pytest.fixture
def ec2(aws_env):
    return boto3.client("ec2")


def group(**fields) -> VolumeGroup:
    return VolumeGroup.model_validate({"name": "data", "selector": "tier=data", "keep": 2, **fields})


def run(volume_group: VolumeGroup, kube: KubernetesClient, ec2_client=None, *, clock=None,
        timeout: float = 5.0, run_id: str = "run-1", dry_run: bool = False,
        snapshot_class: str | None = SNAPSHOT_CLASS) -> VolumeGroupSnapshot:
    return snapshot_volume_group(volume_group, kube, ec2_client, snapshot_class=snapshot_class, run_id=run_id,
                                 clock=clock or StepClock(), timeout=timeout, dry_run=dry_run, poll_interval=0.05)


def snapshots_in(kube_api: KubeApiServer, namespace: str) -> dict[str, dict]:
    """What the fake stores, read through the official client (not through the code under test)."""
    from kubernetes import client, config

    api_client = config.new_client_from_config_dict(kube_api.kubeconfig(), context="fake")
    with api_client:
        listed = client.CustomObjectsApi(api_client).list_namespaced_custom_object(
            "snapshot.storage.k8s.io", "v1", namespace, "volumesnapshots")
    return {item["metadata"]["name"]: item for item in listed["items"]}


def put_snapshot(kube_api: KubeApiServer, namespace: str, name: str, claim: str, *, labels=None,
                 annotations=None, status=None) -> None:
    kube_api.put_object({"apiVersion": SNAPSHOT_API, "kind": "VolumeSnapshot",
                         "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                                      "annotations": annotations or {}},
                         "spec": {"source": {"persistentVolumeClaimName": claim}},
                         **({"status": status} if status else {})})


def test_snapshots_every_bound_pvc_of_the_group_and_records_restore_size(cluster, controller, kube):
    result = run(group(), kube, run_id="3f2a9c1e-run")

    stamp = "20261122020000"
    assert [(row.volume, row.snapshot, row.ready, row.restore_size_bytes, row.error) for row in result.volumes] == [
        ("apps/es-data", f"es-data-data-{stamp}", True, 5 * GiB, None),
        ("data/pg-data", f"pg-data-data-{stamp}", True, 10 * GiB, None),
        ("data/redis-data", f"redis-data-data-{stamp}", True, 2 * GiB, None),
    ]
    assert [(s.volume, s.reason) for s in result.skipped] == [
        ("apps/scratch", "phase Pending: not bound to a volume, nothing to snapshot")]
    assert result.totals()["restore_size_bytes"] == 17 * GiB and result.pruned == ()
    for row in result.volumes:
        assert row.snapshot_content.startswith("snapcontent-") and row.created_at is not None
        assert row.seconds_waited >= controller.delay - 0.05

    stored = snapshots_in(cluster, "data")[f"pg-data-data-{stamp}"]
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "ops-platform",
                                            GROUP_LABEL: "data", RUN_LABEL: "3f2a9c1e-run"}
    assert stored["metadata"]["annotations"] == {TAKEN_AT_KEY: "2026-11-22T02:00:00Z"}
    assert stored["spec"] == {"source": {"persistentVolumeClaimName": "pg-data"},
                              "volumeSnapshotClassName": SNAPSHOT_CLASS}
    assert "logs" not in str(snapshots_in(cluster, "apps"))
    applies = [r for r in cluster.requests if r.method == "PATCH" and "/volumesnapshots/" in r.path]
    assert len(applies) == 3
    assert all(r.query.get("fieldManager") == "ops-platform" and r.content_type.startswith("application/apply-patch")
               for r in applies)

    pg_row = result.volume_rows()[1]
    assert {k: v for k, v in pg_row.items() if k != "waited (s)"} == {
        "volume": "data/pg-data", "kind": "csi", "snapshot": f"pg-data-data-{stamp}", "ready": True,
        "restore size (bytes)": 10 * GiB, "error": None}
    assert result.skipped_rows() == [{"volume": "apps/scratch", "kind": "csi", "reason": result.skipped[0].reason}]


def test_namespaces_limit_the_group_and_the_default_class_is_left_to_the_cluster(cluster, controller, kube):
    result = run(group(namespaces=["data"]), kube, snapshot_class=None)
    assert [row.volume for row in result.ready] == ["data/pg-data", "data/redis-data"]
    assert snapshots_in(cluster, "apps") == {}
    assert all("volumeSnapshotClassName" not in s["spec"] for s in snapshots_in(cluster, "data").values())


def test_a_failed_snapshot_is_reported_the_others_succeed_and_its_volume_is_not_pruned(cluster, controller, kube):
    clock = StepClock()
    for n in (1, 2):
        assert len(run(group(keep=2), kube, clock=clock, run_id=f"run-{n}").ready) == 3
    controller.failing.add("redis-data")

    # keep lowered to 1: the older snapshots of every volume would go, but not those of redis-data.
    with pytest.raises(SnapshotError) as raised:
        run(group(keep=1), kube, clock=clock, run_id="run-3")

    message = str(raised.value)
    assert "1 of 3 snapshots failed" in message
    assert "VolumeSnapshot data/redis-data-data-20261122140000 of PVC redis-data failed" in message
    assert "volume is busy" in message and f"VolumeSnapshotClass {SNAPSHOT_CLASS}" in message
    result = raised.value.result
    assert [row.volume for row in result.failed] == ["data/redis-data"]
    assert [row.volume for row in result.ready] == ["apps/es-data", "data/pg-data"]
    assert sorted(p.snapshot for p in result.pruned) == [
        "es-data-data-20261122020000", "es-data-data-20261122080000",
        "pg-data-data-20261122020000", "pg-data-data-20261122080000"]
    assert sorted(snapshots_in(cluster, "data")) == [
        "pg-data-data-20261122140000", "redis-data-data-20261122020000",
        "redis-data-data-20261122080000", "redis-data-data-20261122140000"]


def test_a_snapshot_never_ready_times_out_with_a_message_naming_it(cluster, controller, kube):
    controller.stuck.add("pg-data")
    started = time.monotonic()
    with pytest.raises(SnapshotError) as raised:
        run(group(keep=1), kube, timeout=1.0)
    assert time.monotonic() - started < 4

    failed = raised.value.result.failed
    assert len(failed) == 1 and failed[0].volume == "data/pg-data"
    assert failed[0].error.startswith(
        "VolumeSnapshot data/pg-data-data-20261122020000 of PVC pg-data did not reach "
        "status.readyToUse=true within 1 s (last seen: no status yet")
    assert "kubectl describe volumesnapshot -n data pg-data-data-20261122020000" in failed[0].error
    assert [row.volume for row in raised.value.result.ready] == ["apps/es-data", "data/redis-data"]


def test_keep_n_prunes_only_this_groups_snapshots_across_three_runs(cluster, controller, kube):
    put_snapshot(cluster, "data", "pg-data-manual", "pg-data")
    put_snapshot(cluster, "data", "pg-data-other-group", "pg-data", labels={GROUP_LABEL: "other"},
                 annotations={TAKEN_AT_KEY: "2020-01-01T00:00:00Z"}, status={"readyToUse": True})
    put_snapshot(cluster, "data", "gone-data-20200101000000", "gone", labels={GROUP_LABEL: "data"},
                 annotations={TAKEN_AT_KEY: "2020-01-01T00:00:00Z"}, status={"readyToUse": True})
    put_snapshot(cluster, "data", "pg-data-failed-leftover", "pg-data", labels={GROUP_LABEL: "data"},
                 annotations={TAKEN_AT_KEY: "2026-11-21T20:00:00Z"},
                 status={"readyToUse": False, "error": {"message": "old failure"}})
    clock = StepClock()

    results = [run(group(keep=2), kube, clock=clock, run_id=f"run-{n}") for n in (1, 2, 3)]

    assert [sorted(p.snapshot for p in r.pruned) for r in results] == [
        [],
        ["pg-data-failed-leftover"],
        ["es-data-data-20261122020000", "pg-data-data-20261122020000", "redis-data-data-20261122020000"],
    ]
    assert sorted(snapshots_in(cluster, "data")) == [
        "gone-data-20200101000000", "pg-data-data-20261122080000", "pg-data-data-20261122140000",
        "pg-data-manual", "pg-data-other-group", "redis-data-data-20261122080000", "redis-data-data-20261122140000"]
    assert sorted(snapshots_in(cluster, "apps")) == ["es-data-data-20261122080000", "es-data-data-20261122140000"]
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


def test_ebs_volumes_selected_by_tags_are_snapshotted_and_pruned(kube_api, kube, ec2):
    def volume(size: int, tags: dict[str, str]) -> str:
        return ec2.create_volume(AvailabilityZone=AZ, Size=size, TagSpecifications=[
            {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])["VolumeId"]

    wal = volume(20, {"backup": "nightly", "Name": "pg-wal"})
    spool = volume(4, {"backup": "nightly"})
    volume(8, {"backup": "never"})
    csi = volume(8, {"backup": "nightly", "kubernetes.io/created-for/pvc/name": "pg-data"})
    manual = ec2.create_snapshot(VolumeId=wal, Description="taken by hand")["SnapshotId"]
    ebs_group = group(selector="tier=none", keep=2, ebs_volume_tags={"backup": "nightly"})
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


def test_dry_run_changes_nothing_and_says_what_would_happen(cluster, controller, kube, ec2):
    wal = ec2.create_volume(AvailabilityZone=AZ, Size=20, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "backup", "Value": "nightly"}]}])["VolumeId"]
    dry_group = group(keep=1, ebs_volume_tags={"backup": "nightly"})
    ours = [{"Name": f"tag:{GROUP_LABEL}", "Values": ["data"]}]

    planned = run(dry_group, kube, ec2, dry_run=True)
    assert planned.dry_run and planned.failed == () and planned.pruned == ()
    assert [(row.volume, row.snapshot, row.ready) for row in planned.volumes] == [
        ("apps/es-data", "es-data-data-20261122020000", False),
        ("data/pg-data", "pg-data-data-20261122020000", False),
        ("data/redis-data", "redis-data-data-20261122020000", False),
        (wal, f"{wal}-data-20261122020000", False),
    ]
    assert snapshots_in(cluster, "data") == {} and snapshots_in(cluster, "apps") == {}
    assert ec2.describe_snapshots(Filters=ours)["Snapshots"] == []
    assert {r.query.get("dryRun") for r in cluster.requests if "/volumesnapshots/" in r.path and r.method == "PATCH"} \
        == {"All"}

    clock = StepClock()
    taken = run(dry_group, kube, ec2, clock=clock)
    would_prune = run(dry_group, kube, ec2, clock=clock, dry_run=True)
    assert sorted(p.snapshot for p in would_prune.pruned) == sorted(row.snapshot for row in taken.volumes)
    assert len(snapshots_in(cluster, "data")) == 2 and len(snapshots_in(cluster, "apps")) == 1
    assert len(ec2.describe_snapshots(Filters=ours)["Snapshots"]) == 1
    assert would_prune.dry_run and would_prune.totals()["pruned"] == 4


def test_one_refused_apply_fails_that_volume_only(cluster, controller, kube):
    cluster.fail_next("PATCH", r"/namespaces/data/volumesnapshots/pg-data-", 403,
                      message='volumesnapshots.snapshot.storage.k8s.io "pg-data" is forbidden')
    with pytest.raises(SnapshotError) as raised:
        run(group(), kube)
    (failed,) = raised.value.result.failed
    assert failed.volume == "data/pg-data"
    assert "was refused (403" in failed.error and "RBAC" in failed.error
    assert len(raised.value.result.ready) == 2


def test_missing_snapshot_class_is_named_before_anything_is_created(cluster, kube):
    with pytest.raises(SnapshotError, match=(
        r"VolumeSnapshotClass 'gp3-snapshots' does not exist on the cluster at http://127\.0\.0\.1:\d+ "
        rf"\(available: {SNAPSHOT_CLASS}\)")):
        run(group(), kube, snapshot_class="gp3-snapshots")
    assert snapshots_in(cluster, "data") == {}


def test_a_cluster_without_the_snapshot_crds_is_named():
    with KubeApiServer() as server:
        crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": "volumesnapshots.snapshot.storage.k8s.io"},
               "spec": {"group": "snapshot.storage.k8s.io", "scope": "Namespaced",
                        "names": {"plural": "volumesnapshots", "kind": "VolumeSnapshot"},
                        "versions": [{"name": "v1", "served": True, "storage": True}]}}
        server.put_object(crd)
        server.delete_object("apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"])
        server.put_object({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": "pg-data", "namespace": "default", "labels": {"tier": "data"}},
                           "status": {"phase": "Bound"}})
        from kubernetes import client

        kube = KubernetesClient(client.ApiClient(client.Configuration(host=server.url,
                                                                      api_key={"authorization": "Bearer t"})))
        with pytest.raises(SnapshotError, match=(
            "does not serve kind VolumeSnapshot in snapshot.storage.k8s.io/v1.*"
            "install.*external-snapshotter CRDs")):
            run(group(), kube)


def test_kubernetes_down_is_named_with_the_setting():
    from kubernetes import client

    port = free_port()
    kube = KubernetesClient(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")),
                            request_timeout=2)
    with pytest.raises(ServerUnreachableError, match=rf"kubernetes API: connection refused at "
                                                     rf"http://127\.0\.0\.1:{port} \(check KUBECONFIG"):
        run(group(), kube)


def test_listing_pvcs_failing_stops_the_run_before_any_snapshot(cluster, kube):
    cluster.fail_next("GET", r"/persistentvolumeclaims", 500, message="etcdserver: request timed out")
    with pytest.raises(KubernetesError, match="list PersistentVolumeClaim .* failed \\(500.*request timed out"):
        run(group(), kube)
    assert snapshots_in(cluster, "data") == {}


def test_ec2_down_is_named_before_any_snapshot(cluster, kube, aws_env):
    port = free_port()
    down = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{port}",
                        config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(ServerUnreachableError, match=rf"ec2: cannot connect .* at http://127\.0\.0\.1:{port} "
                                                     r"\(check AWS_ENDPOINT_URL / AWS_REGION\)"):
        run(group(ebs_volume_tags={"backup": "nightly"}), kube, down)
    assert snapshots_in(cluster, "data") == {}


def test_ebs_tags_without_an_ec2_client_is_a_missing_setting(cluster, kube):
    with pytest.raises(MissingSettingError, match="volume group 'data' .*ebs_volume_tags.* needs AWS_ENDPOINT_URL"):
        run(group(ebs_volume_tags={"backup": "nightly"}), kube, None)


def test_a_run_id_that_cannot_be_a_label_is_refused(cluster, kube):
    with pytest.raises(SnapshotError, match="the run id 'run 1/2' cannot be a Kubernetes label value"):
        run(group(), kube, run_id="run 1/2")


def test_snapshot_names_fit_63_characters_and_stay_distinct():
    assert snapshot_name("pg-data", "main_db", "20261122020000") == "pg-data-main-db-20261122020000"
    long_a = snapshot_name("a" * 60 + "-x", "data", "20261122020000")
    long_b = snapshot_name("a" * 60 + "-y", "data", "20261122020000")
    assert len(long_a) == len(long_b) == 63 and long_a != long_b
    assert long_a.endswith("-20261122020000") and long_a[0] == "a"


@pytest.mark.parametrize("quantity, expected", [
    ("10Gi", 10 * GiB), ("1500M", 1_500_000_000), ("1e3", 1000), ("1073741824", GiB), (512, 512),
    ("1.5Ki", 1536), ("100m", 1), (None, None),
])
def test_quantities_are_read_as_bytes(quantity, expected):
    assert quantity_bytes(quantity) == expected


def test_a_garbled_restore_size_fails_that_volume(cluster, controller, kube):
    cluster.put_object({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": "odd", "namespace": "data", "labels": {"tier": "data"}},
                        "status": {"phase": "Bound", "capacity": {"storage": "lots"}}})
    with pytest.raises(SnapshotError) as raised:
        run(group(namespaces=["data"]), kube)
    (failed,) = raised.value.result.failed
    assert failed.error == ("VolumeSnapshot data/odd-data-20261122020000 of PVC odd: "
                            "status.restoreSize: 'lots' is not a Kubernetes quantity")


def test_a_garbled_quantity_is_refused():
    with pytest.raises(ValueError, match="'ten gigs' is not a Kubernetes quantity"):
        quantity_bytes("ten gigs")
