"""VeleroBackupDriver on the real API server, as the code location's identity; the test plays Velero's server.

Velero's server is not running here (no container runtime), so
:class:`VeleroStandIn` does its part as admin: it writes the status of the
Backups, Restores and DeleteBackupRequests the driver creates, restores the
objects a Restore selects and deletes Backups, as Velero's controllers do.
Everything else is the real server's: the velero.io CRDs (the trimmed copies
of infra/crds), RBAC, the scratch namespaces, their NetworkPolicies, and
namespace deletion, which is asynchronous (Terminating until the namespace
controller has emptied it).

The backed-up namespaces hold what a production namespace holds: data
(ConfigMaps, Secrets, claims) and what must never come back in a restore
test (a Deployment configured for the production database, a CronJob, an
Ingress). Each test has namespaces of its own (:class:`World`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.velero_backup import (
    RESTORE_TEST_LABEL,
    SCRATCH_POLICY,
    VELERO_API,
    VeleroBackupDriver,
    backup_name,
)
from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore
from ops_platform.spec import Datastore, RestoreTest
from tests.fixtures.kube_server import KubeCluster

Status = dict[str, Any]
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
DATA_RESOURCES = ("configmaps", "secrets", "persistentvolumeclaims")


@dataclass(frozen=True)
class World:
    """What one test has: its Schedule in Velero's namespace (shared by the module's tests), the two backed-up
    namespaces and the restore test's target, all named after ``prefix``."""

    prefix: str
    velero: str

    @property
    def schedule(self) -> str:
        return f"{self.prefix}-daily"

    @property
    def onto(self) -> str:
        return f"{self.prefix}-onto"

    @property
    def data(self) -> str:
        return f"{self.prefix}-data"

    @property
    def target(self) -> str:
        return f"{self.prefix}-restore"

    def scratch(self, source: str) -> str:
        return f"{self.target}-{source}"

    def mine(self, obj: dict[str, Any]) -> bool:
        """A Velero object of this test: named after its Schedule, or restoring one of its Backups."""
        return (obj["metadata"]["name"].startswith(self.prefix)
                or str((obj.get("spec") or {}).get("backupName", "")).startswith(self.prefix))


def schedule(world: World, name: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": VELERO_API,
        "kind": "Schedule",
        "metadata": {"name": name or world.schedule, "namespace": world.velero},
        "spec": {
            "schedule": "0 3 * * *",
            "template": {"includedNamespaces": ["*"], "storageLocation": "default", "ttl": "720h0m0s",
                         "snapshotVolumes": True},
        },
    }


@pytest.fixture(scope="module")
def velero_namespace(kube_cluster: KubeCluster, kube_crds: list[str]) -> Iterator[str]:
    """Velero's namespace, one for the module: each test has its own Schedule and Velero objects in it."""
    name = f"velero-{uuid.uuid4().hex[:6]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.delete_object("v1", "Namespace", name)


@pytest.fixture
def world(kube_cluster: KubeCluster, velero_namespace: str) -> Iterator[World]:
    """The test's Schedule (as the infra layer ships one), as admin; afterwards its Velero objects and every
    namespace of the test are deleted, scratch ones included. The backed-up namespaces exist once seeded:
    listing an absent namespace's objects finds none, which is all a backup without a seed needs."""
    world = World(f"v{uuid.uuid4().hex[:6]}", velero_namespace)
    kube_cluster.put_object(schedule(world))
    yield world
    for kind in ("Restore", "DeleteBackupRequest", "Backup", "Schedule"):
        for obj in kube_cluster.list_objects(VELERO_API, kind, world.velero):
            if world.mine(obj):
                kube_cluster.delete_object(VELERO_API, kind, obj["metadata"]["name"], world.velero)
    for namespace in kube_cluster.list_objects("v1", "Namespace"):
        if namespace["metadata"]["name"].startswith(f"{world.prefix}-"):
            kube_cluster.delete_object("v1", "Namespace", namespace["metadata"]["name"])


@pytest.fixture
def kube(kube_cluster: KubeCluster, tmp_path: Path) -> Iterator[KubernetesClient]:
    path = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform")
    client = KubernetesResource(kubeconfig=str(path)).get_client()
    yield client
    client.api_client.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


def spec(world: World, target: str | None = None, namespaces: list[str] | None = None) -> Datastore:
    return Datastore.model_validate({
        "name": "cluster_state",
        "engine": "velero",
        "method": "velero",
        "connection": {"namespace": world.velero},
        "velero": {"schedule": world.schedule,
                   "included_namespaces": namespaces if namespaces is not None else [world.onto, world.data]},
        "restore_test": {"target": {"namespace": target or world.target},
                         "verify_keys": [f"v1 ConfigMap {world.onto}/onto-backend-config"]},
    })


def live_objects(namespace: str) -> list[dict[str, Any]]:
    """A production namespace: its data, and a Deployment, a CronJob and an Ingress that must never come back.

    The CronJob is batch/v1beta1: the 1.20 server of the tests has no batch/v1 CronJob.
    """
    labels = {"app": "onto-backend"}
    pod = {"containers": [{"name": "app", "image": "registry.test/onto-backend:1",
                           "envFrom": [{"configMapRef": {"name": "onto-backend-config"}}]}]}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "onto-backend-config"},
         "data": {"DATABASE_URL": "postgresql://onto-pg-rw.data.svc:5432/ontology"}},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "onto-backend-db"},
         "stringData": {"password": "production"}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "onto-data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "onto-backend"},
         "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod}}},
        {"apiVersion": "batch/v1beta1", "kind": "CronJob", "metadata": {"name": "onto-ilm"},
         "spec": {"schedule": "0 1 * * *", "jobTemplate": {"spec": {"template": {
             "spec": {**pod, "restartPolicy": "Never"}}}}}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "onto"},
         "spec": {"rules": [{"host": "onto.company.com", "http": {"paths": [{
             "path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "onto-backend", "port": {"number": 80}}}}]}}]}},
    ]


RESOURCE_OF = {"ConfigMap": "configmaps", "Secret": "secrets", "PersistentVolumeClaim": "persistentvolumeclaims",
               "Deployment": "deployments", "CronJob": "cronjobs", "Ingress": "ingresses"}


def seed_live_namespaces(cluster: KubeCluster, *namespaces: str) -> None:
    for namespace in namespaces:
        cluster.create_namespace(namespace)
        for obj in live_objects(namespace):
            cluster.put_object({**obj, "metadata": {**obj["metadata"], "namespace": namespace}})
        cluster.put_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "scratch-only", "namespace": namespace, "labels": {"velero.io/exclude-from-backup": "true"}}})


def restored_copy(original: dict[str, Any], namespace: str) -> dict[str, Any]:
    """What Velero writes back: the object without its server-set metadata and status, in the mapped namespace."""
    copy = {key: value for key, value in original.items() if key not in ("metadata", "status")}
    copy["metadata"] = {"name": original["metadata"]["name"], "namespace": namespace,
                        "labels": original["metadata"].get("labels") or {}}
    if copy.get("kind") == "PersistentVolumeClaim":
        copy["spec"] = {k: v for k, v in copy["spec"].items() if k != "volumeName"}
    return copy


class VeleroStandIn:
    """Plays Velero's server for one kind in Velero's namespace: ``status_for`` decides each new object's status.

    A stand-in: Velero's controllers are not running here. It writes as admin,
    as Velero's own service account would; ``seen`` holds the objects as they
    were created, ``fenced`` whether every scratch namespace of a Restore had
    its deny-all NetworkPolicy when the Restore appeared.
    """

    def __init__(self, cluster: KubeCluster, world: World, kind: str,
                 status_for: Callable[[dict[str, Any]], Status | None],
                 on_done: Callable[[dict[str, Any]], None] = lambda obj: None) -> None:
        self.cluster, self.world, self.namespace, self.kind = cluster, world, world.velero, kind
        self.status_for, self.on_done = status_for, on_done
        self.seen: list[dict[str, Any]] = []
        self.fenced: dict[str, bool] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"velero-{kind}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                for obj in self.cluster.list_objects(VELERO_API, self.kind, self.namespace):
                    if not self.world.mine(obj) or obj["metadata"]["uid"] in {o["metadata"]["uid"] for o in self.seen}:
                        continue
                    self.seen.append(obj)
                    if self.kind == "Restore":
                        for scratch in (obj["spec"].get("namespaceMapping") or {}).values():
                            self.fenced[scratch] = self.cluster.get_object(
                                "networking.k8s.io/v1", "NetworkPolicy", SCRATCH_POLICY, scratch) is not None
                    status = self.status_for(obj)
                    if status is not None:
                        self.cluster.set_status(VELERO_API, self.kind, obj["metadata"]["name"], self.namespace,
                                                status)
                        self.on_done(obj)
            except Exception as exc:  # noqa: BLE001 - asserted empty when the stand-in stops
                self.errors.append(repr(exc))

    def __enter__(self) -> VeleroStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert self.errors == []


def completed(items: int) -> Callable[[dict[str, Any]], Status]:
    return lambda obj: {"phase": "Completed", "startTimestamp": "2026-11-22T03:00:01Z",
                        "completionTimestamp": "2026-11-22T03:02:10Z", "formatVersion": "1.1.0",
                        "expiration": "2026-12-22T03:00:01Z", "errors": 0, "warnings": 1,
                        "progress": {"totalItems": items, "itemsBackedUp": items}}


def restore_completed(items: int) -> Callable[[dict[str, Any]], Status]:
    return lambda obj: {"phase": "Completed", "errors": 0, "warnings": 0,
                        "progress": {"totalItems": items, "itemsRestored": items}}


def plays_velero_restore(cluster: KubeCluster) -> Callable[[dict[str, Any]], Status]:
    """Velero restoring the objects its Restore selects (includedResources) into the mapped namespaces,
    then marking the Restore Completed."""
    def restore(obj: dict[str, Any]) -> Status:
        included = obj["spec"].get("includedResources") or ["*"]
        for source, scratch in obj["spec"]["namespaceMapping"].items():
            for template in live_objects(source):
                if "*" in included or RESOURCE_OF[template["kind"]] in included:
                    original = cluster.get_object(template["apiVersion"], template["kind"],
                                                  template["metadata"]["name"], source)
                    cluster.put_object(restored_copy(original, scratch), manager="velero-server")
        return restore_completed(6)(obj)
    return restore


def writes_since(cluster: KubeCluster, mark: tuple[int, str]) -> list[dict[str, Any]]:
    """Write requests the code location's identity has sent since ``mark``, from the server's audit log."""
    return [event for event in cluster.audit_events_since(mark) if event["verb"] in WRITE_VERBS]


def gone_or_terminating(cluster: KubeCluster, namespace: str) -> bool:
    """Deleted as far as the code can tell: namespace deletion finishes in the background."""
    found = cluster.get_object("v1", "Namespace", namespace)
    return found is None or found["status"].get("phase") == "Terminating"


def _committed(cluster: KubeCluster, kube: KubernetesClient, store: LocalObjectStore, datastore: Datastore,
               world: World, partition: str = "2026-11-22"):
    with VeleroStandIn(cluster, world, "Backup", completed(42)):
        return BackupCatalog(store, datastore.name).run_backup(
            VeleroBackupDriver(kube, backup_timeout=10), datastore, partition)


def test_restore_brings_back_data_only_into_namespaces_fenced_before_the_restore(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    seed_live_namespaces(kube_cluster, world.onto, world.data)
    datastore = spec(world)
    driver = VeleroBackupDriver(kube, backup_timeout=10)
    manifest = _committed(kube_cluster, kube, store, datastore, world)

    with VeleroStandIn(kube_cluster, world, "Restore", plays_velero_restore(kube_cluster)) as velero:
        with driver.restore(manifest, store, datastore.restore_test, tmp_path):
            for source in (world.onto, world.data):
                scratch = world.scratch(source)
                for obj in live_objects(source):
                    restored = kube_cluster.get_object(obj["apiVersion"], obj["kind"], obj["metadata"]["name"],
                                                       scratch)
                    assert (restored is not None) == (RESOURCE_OF[obj["kind"]] in DATA_RESOURCES), (obj, scratch)
                fence = kube_cluster.get_object("networking.k8s.io/v1", "NetworkPolicy", SCRATCH_POLICY, scratch)
                assert fence["spec"]["podSelector"] == {} and fence["spec"]["policyTypes"] == ["Ingress", "Egress"]
                assert not fence["spec"].get("ingress") and not fence["spec"].get("egress")

    [restore] = velero.seen
    assert velero.fenced == {world.scratch(world.onto): True, world.scratch(world.data): True}
    assert restore["spec"]["includedResources"] == ["persistentvolumeclaims", "persistentvolumes", "configmaps",
                                                    "secrets"]
    assert set(restore["spec"]) == {"backupName", "includedNamespaces", "namespaceMapping", "includedResources"}


def test_backup_restore_into_scratch_namespaces_and_cleanup(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    seed_live_namespaces(kube_cluster, world.onto, world.data)
    datastore = spec(world)
    catalog = BackupCatalog(store, datastore.name)
    driver = VeleroBackupDriver(kube, backup_timeout=10)
    with VeleroStandIn(kube_cluster, world, "Backup", completed(42)) as velero:
        manifest = catalog.run_backup(driver, datastore, "2026-11-22")

    [backup] = velero.seen
    assert backup["metadata"]["name"] == f"{world.schedule}-ops-{manifest.backup_id.lower()}"
    assert backup["metadata"]["labels"]["velero.io/schedule-name"] == world.schedule
    assert backup["spec"]["includedNamespaces"] == [world.onto, world.data]
    assert backup["spec"]["ttl"] == "720h0m0s" and backup["spec"]["storageLocation"] == "default"
    # The data the namespaces hold, without what the cluster makes in every namespace (kube-root-ca.crt,
    # service-account token Secrets) and what is labelled excluded.
    assert manifest.counts == {f"{resource}:{namespace}": 1 for namespace in (world.onto, world.data)
                               for resource in ("persistentvolumeclaims", "configmaps", "secrets")}
    assert manifest.details["items_backed_up"] == 42
    assert manifest.recovery_point.isoformat() == "2026-11-22T03:00:01+00:00"
    record = json.loads(store.get_bytes(manifest.artifacts[0].key))
    assert record["status"]["phase"] == "Completed" and catalog.verify_artifacts(manifest) == []
    assert driver.verify(manifest, store).ok

    with VeleroStandIn(kube_cluster, world, "Restore", plays_velero_restore(kube_cluster)) as velero:
        with driver.restore(manifest, store, datastore.restore_test, tmp_path) as restored:
            assert restored.counts() == manifest.counts
            [query] = restored.run_queries([f"v1 ConfigMap {world.onto}/onto-backend-config"])
            assert query.ok
            assert not restored.run_queries(["v1 ConfigMap logging/onto-backend-config"])[0].ok
            assert not restored.run_queries([f"apps/v1 Deployment {world.onto}/onto-backend"])[0].ok
            scratch = kube_cluster.get_object("v1", "Namespace", world.scratch(world.onto))
            assert scratch["metadata"]["labels"][RESTORE_TEST_LABEL] == "cluster_state"

    [restore] = velero.seen
    assert restore["spec"]["backupName"] == backup["metadata"]["name"]
    assert restore["spec"]["namespaceMapping"] == {world.onto: world.scratch(world.onto),
                                                   world.data: world.scratch(world.data)}
    assert kube_cluster.get_object(VELERO_API, "Restore", restore["metadata"]["name"], world.velero) is None
    assert gone_or_terminating(kube_cluster, world.scratch(world.onto))
    assert gone_or_terminating(kube_cluster, world.scratch(world.data))
    assert kube_cluster.get_object("v1", "Namespace", world.onto)["status"]["phase"] == "Active"
    assert kube_cluster.get_object("apps/v1", "Deployment", "onto-backend", world.onto) is not None


def test_a_restore_test_run_again_waits_for_its_terminating_scratch_namespace(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    """Run again at once, the restore test finds its last scratch namespace Terminating (the namespace controller
    empties it in the background): the driver deletes it again, waits until it is gone and makes it anew. When
    it does not go within namespace_timeout (another controller's finalizer holds it), the driver gives up."""
    datastore = spec(world, namespaces=[world.data])
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    scratch = world.target
    hold = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": scratch,
                                                                  "finalizers": ["ops-platform.test/hold"]}}
    try:
        with VeleroStandIn(kube_cluster, world, "Restore", restore_completed(3)):
            with VeleroBackupDriver(kube, restore_timeout=10).restore(manifest, store, datastore.restore_test,
                                                                      tmp_path):
                first = kube_cluster.get_object("v1", "Namespace", scratch)["metadata"]["uid"]
            assert kube_cluster.get_object("v1", "Namespace", scratch)["status"]["phase"] == "Terminating"

            mark = kube_cluster.audit_mark()
            with VeleroBackupDriver(kube, restore_timeout=10, namespace_timeout=30).restore(
                    manifest, store, datastore.restore_test, tmp_path):
                again = kube_cluster.get_object("v1", "Namespace", scratch)
                assert again["status"]["phase"] == "Active" and again["metadata"]["uid"] != first
                kube_cluster.put_object(hold)
        sent = [(e["verb"], e["objectRef"]["resource"]) for e in writes_since(kube_cluster, mark)]
        assert sent.index(("delete", "namespaces")) < sent.index(("patch", "restores"))

        with pytest.raises(RestoreError, match=rf"leftover scratch namespace {scratch} is still terminating after 1 s"):
            with VeleroBackupDriver(kube, namespace_timeout=1).restore(manifest, store, datastore.restore_test,
                                                                       tmp_path):
                pass
    finally:  # never leave the namespace held
        if kube_cluster.get_object("v1", "Namespace", scratch):
            kube_cluster.put_object({**hold, "metadata": {**hold["metadata"], "finalizers": []}})


def test_single_namespace_maps_to_the_target_namespace(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(world, namespaces=[world.data])
    driver = VeleroBackupDriver(kube, backup_timeout=10)
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    with VeleroStandIn(kube_cluster, world, "Restore", restore_completed(5)) as velero:
        with driver.restore(manifest, store, datastore.restore_test, tmp_path):
            assert kube_cluster.get_object("v1", "Namespace", world.target) is not None
    assert velero.seen[0]["spec"]["namespaceMapping"] == {world.data: world.target}
    assert gone_or_terminating(kube_cluster, world.target)


@pytest.mark.parametrize("phase", ["Failed", "PartiallyFailed"])
def test_failed_backup_reports_velero_reasons_and_commits_nothing(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, phase: str
) -> None:
    datastore = spec(world)
    catalog = BackupCatalog(store, datastore.name)
    failure = {"phase": phase, "errors": 3, "warnings": 2,
               "failureReason": "error getting backup storage location: BackupStorageLocation default not found"}
    with VeleroStandIn(kube_cluster, world, "Backup", lambda obj: failure):
        with pytest.raises(BackupError,
                           match=rf"ended {phase} - failure reason: error getting backup storage.*3 errors"):
            catalog.run_backup(VeleroBackupDriver(kube, backup_timeout=10), datastore, "2026-11-22")
    assert catalog.latest() is None and list(store.list("backups/")) == []


def test_backup_that_never_finishes_times_out(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore
) -> None:
    datastore = spec(world)
    with VeleroStandIn(kube_cluster, world, "Backup", lambda obj: {"phase": "InProgress"}):
        with pytest.raises(BackupError, match=r"did not finish within 1 s; Velero may still complete it"):
            BackupCatalog(store, datastore.name).run_backup(
                VeleroBackupDriver(kube, backup_timeout=1), datastore, "2026-11-22")


def test_missing_schedule_names_the_spec_field(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore
) -> None:
    kube_cluster.delete_object(VELERO_API, "Schedule", world.schedule, world.velero)
    datastore = spec(world)
    with pytest.raises(BackupError,
                       match=rf"no Schedule '{world.schedule}' in namespace {world.velero}.*velero.schedule"):
        BackupCatalog(store, datastore.name).run_backup(VeleroBackupDriver(kube), datastore, "2026-11-22")


def test_api_server_down_names_address_and_setting(tmp_path: Path, store: LocalObjectStore) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    kube = KubernetesResource(kubeconfig=str(_down_kubeconfig(tmp_path, address)), context="down").get_client()
    datastore = spec(World("down", "velero"))
    with pytest.raises(ServerUnreachableError, match=rf"{address} \(check KUBECONFIG"):
        BackupCatalog(store, datastore.name).run_backup(VeleroBackupDriver(kube), datastore, "2026-11-22")


@pytest.mark.parametrize("role", ["backed-up", "velero", "kube-system"])
def test_restore_over_a_live_namespace_is_refused_before_any_write(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path,
    role: str,
) -> None:
    datastore = spec(world, namespaces=[world.data])
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    target = {"backed-up": world.data, "velero": world.velero, "kube-system": "kube-system"}[role]
    mark = kube_cluster.audit_mark()
    with pytest.raises(RestoreRefused, match=f"into {target} refused before writing anything"):
        with VeleroBackupDriver(kube).restore(manifest, store, RestoreTest(target={"namespace": target}), tmp_path):
            pass
    assert writes_since(kube_cluster, mark) == []


def test_existing_namespace_not_made_by_a_restore_test_is_refused(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(world, namespaces=[world.data])
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    kube_cluster.create_namespace(world.target)  # another team's
    mark = kube_cluster.audit_mark()
    with pytest.raises(RestoreRefused, match="already exists and was not made by a restore test"):
        with VeleroBackupDriver(kube).restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert writes_since(kube_cluster, mark) == []
    assert kube_cluster.get_object("v1", "Namespace", world.target)["status"]["phase"] == "Active"


def test_a_foreign_scratch_namespace_is_refused_before_a_leftover_one_is_deleted(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(world)
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    kube_cluster.create_namespace(world.scratch(world.onto), labels={RESTORE_TEST_LABEL: datastore.name})  # left
    kube_cluster.create_namespace(world.scratch(world.data))  # another team's
    mark = kube_cluster.audit_mark()
    with pytest.raises(RestoreRefused, match=f"scratch namespace {world.scratch(world.data)} already exists"):
        with VeleroBackupDriver(kube).restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert writes_since(kube_cluster, mark) == []
    assert kube_cluster.get_object("v1", "Namespace", world.scratch(world.onto))["status"]["phase"] == "Active"


def test_failed_restore_cleans_up(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(world, namespaces=[world.data])
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    failure = {"phase": "PartiallyFailed", "errors": 1, "warnings": 0}
    with VeleroStandIn(kube_cluster, world, "Restore", lambda obj: failure) as velero:
        with pytest.raises(RestoreError, match="ended PartiallyFailed - 1 errors"):
            with VeleroBackupDriver(kube, restore_timeout=10).restore(
                    manifest, store, datastore.restore_test, tmp_path):
                pass
    assert kube_cluster.get_object(VELERO_API, "Restore", velero.seen[0]["metadata"]["name"], world.velero) is None
    assert gone_or_terminating(kube_cluster, world.target)


def test_body_failure_cleans_up(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(world, namespaces=[world.data])
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    with VeleroStandIn(kube_cluster, world, "Restore", restore_completed(42)):
        with pytest.raises(RuntimeError, match="check failed"):
            with VeleroBackupDriver(kube, restore_timeout=10).restore(
                    manifest, store, datastore.restore_test, tmp_path):
                raise RuntimeError("check failed")
    assert gone_or_terminating(kube_cluster, world.target)
    assert [r for r in kube_cluster.list_objects(VELERO_API, "Restore", world.velero) if world.mine(r)] == []


def backups_in_cluster(cluster: KubeCluster, world: World) -> list[str]:
    return sorted(o["metadata"]["name"] for o in cluster.list_objects(VELERO_API, "Backup", world.velero)
                  if world.mine(o))


def delete_requests(cluster: KubeCluster, world: World) -> list[dict[str, Any]]:
    return [o for o in cluster.list_objects(VELERO_API, "DeleteBackupRequest", world.velero) if world.mine(o)]


@contextmanager
def velero_deletions(cluster: KubeCluster, world: World, errors: list[str] | None = None) -> Iterator[VeleroStandIn]:
    """Plays Velero's backup deletion controller: removes the Backup (its files and snapshots are Velero's
    business), marks the request Processed and, after a clean deletion, deletes the backup's requests;
    with ``errors`` the Backup stays, Deleting, and the request keeps the errors."""

    def process(request: dict[str, Any]) -> Status:
        name = request["spec"]["backupName"]
        backup = cluster.get_object(VELERO_API, "Backup", name, world.velero)
        if backup is None:
            return {"phase": "Processed", "errors": ["backup not found"]}
        if errors:
            cluster.set_status(VELERO_API, "Backup", name, world.velero, {**backup["status"], "phase": "Deleting"})
            return {"phase": "Processed", "errors": errors}
        cluster.delete_object(VELERO_API, "Backup", name, world.velero)
        return {"phase": "Processed"}

    def clean_up(request: dict[str, Any]) -> None:
        if errors:
            return
        labels = request["metadata"]["labels"]
        for other in delete_requests(cluster, world):
            if all(other["metadata"]["labels"].get(k) == labels[k]
                   for k in ("velero.io/backup-name", "velero.io/backup-uid")):
                cluster.delete_object(VELERO_API, "DeleteBackupRequest", other["metadata"]["name"], world.velero)

    with VeleroStandIn(cluster, world, "DeleteBackupRequest", process, clean_up) as velero:
        yield velero


def test_expire_deletes_only_that_backup_through_a_delete_backup_request(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore
) -> None:
    datastore = spec(world)
    old = _committed(kube_cluster, kube, store, datastore, world, "2026-11-21")
    kept = _committed(kube_cluster, kube, store, datastore, world, "2026-11-22")
    name = old.restore["backup_name"]
    uid = kube_cluster.get_object(VELERO_API, "Backup", name, world.velero)["metadata"]["uid"]
    driver = VeleroBackupDriver(kube, delete_timeout=10)

    with velero_deletions(kube_cluster, world) as velero:
        said = driver.expire(old, store)

    [request] = velero.seen
    assert request["metadata"]["namespace"] == world.velero and request["metadata"]["name"].startswith(f"{name}-")
    assert request["metadata"]["labels"] == {"velero.io/backup-name": name, "velero.io/backup-uid": uid}
    assert request["spec"] == {"backupName": name}
    assert said.startswith(f"velero: deleted Backup {world.velero}/{name} with its files in the backup storage "
                           "location")
    assert backups_in_cluster(kube_cluster, world) == [kept.restore["backup_name"]]
    assert delete_requests(kube_cluster, world) == []
    assert driver.verify(kept, store).ok

    mark = kube_cluster.audit_mark()
    assert "was already gone (expired by its ttl or deleted); nothing to delete" in driver.expire(old, store)
    assert writes_since(kube_cluster, mark) == []


def test_expire_reports_what_velero_could_not_delete(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore
) -> None:
    manifest = _committed(kube_cluster, kube, store, spec(world), world)
    name = manifest.restore["backup_name"]
    read_only = "cannot delete backup because backup storage location default is currently in read-only mode"

    with velero_deletions(kube_cluster, world, errors=[read_only]):
        with pytest.raises(BackupError, match=rf"Velero could not delete Backup {world.velero}/{name}: {read_only} "
                                              rf"\(DeleteBackupRequest {world.velero}/{name}-"):
            VeleroBackupDriver(kube, delete_timeout=10).expire(manifest, store)

    assert backups_in_cluster(kube_cluster, world) == [name]
    assert not VeleroBackupDriver(kube).verify(manifest, store).ok  # Deleting, not Completed


def test_expire_of_a_backup_velero_finds_gone_is_fine(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore
) -> None:
    manifest = _committed(kube_cluster, kube, store, spec(world), world)
    name = manifest.restore["backup_name"]

    def ttl_expired_first(request: dict[str, Any]) -> Status:
        kube_cluster.delete_object(VELERO_API, "Backup", name, world.velero)
        return {"phase": "Processed", "errors": ["backup not found"]}

    with VeleroStandIn(kube_cluster, world, "DeleteBackupRequest", ttl_expired_first):
        said = VeleroBackupDriver(kube, delete_timeout=10).expire(manifest, store)
    assert said.startswith(f"velero: Backup {world.velero}/{name} was already gone when Velero processed")


@pytest.mark.parametrize("velero_says, shown", [
    (None, r"not picked up yet \(is the Velero server running\?\)"),
    ({"phase": "InProgress"}, "InProgress"),
])
def test_expire_that_velero_does_not_finish_gives_up_after_the_timeout(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore,
    velero_says: Status | None, shown: str,
) -> None:
    manifest = _committed(kube_cluster, kube, store, spec(world), world)
    name = manifest.restore["backup_name"]
    with VeleroStandIn(kube_cluster, world, "DeleteBackupRequest", lambda request: velero_says):
        with pytest.raises(BackupError, match=rf"Backup {world.velero}/{name} was not deleted within 1 s: "
                                              rf"DeleteBackupRequest {world.velero}/{name}-\w+ \(velero.io/v1\) is "
                                              rf"{shown}; Velero may still finish it"):
            VeleroBackupDriver(kube, delete_timeout=1).expire(manifest, store)
    assert backups_in_cluster(kube_cluster, world) == [name]


def test_expire_of_a_long_backup_name_labels_the_request_as_velero_does(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore
) -> None:
    long_schedule = f"{world.schedule}-with-a-rather-long-name"
    kube_cluster.put_object(schedule(world, long_schedule))
    datastore = Datastore.model_validate({**spec(world).model_dump(exclude_none=True),
                                          "velero": {"schedule": long_schedule, "included_namespaces": [world.data]}})
    manifest = _committed(kube_cluster, kube, store, datastore, world)
    name = manifest.restore["backup_name"]
    assert name == backup_name(long_schedule, manifest.backup_id) and len(name) > 63

    with velero_deletions(kube_cluster, world) as velero:
        VeleroBackupDriver(kube, delete_timeout=10).expire(manifest, store)

    label = velero.seen[0]["metadata"]["labels"]["velero.io/backup-name"]
    assert label == name[:57] + hashlib.sha256(name.encode()).hexdigest()[:6]
    assert backups_in_cluster(kube_cluster, world) == []


def _down_kubeconfig(tmp_path: Path, address: str) -> Path:
    kubeconfig = tmp_path / "down-kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "down",
        "clusters": [{"name": "down", "cluster": {"server": address}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "down", "context": {"cluster": "down", "user": "down"}}],
    }))
    return kubeconfig


def test_expire_with_the_api_server_down_is_a_backup_error_naming_it(
    kube: KubernetesClient, kube_cluster: KubeCluster, world: World, store: LocalObjectStore, tmp_path: Path
) -> None:
    manifest = _committed(kube_cluster, kube, store, spec(world), world)
    address = f"http://127.0.0.1:{free_port()}"
    down = KubernetesResource(kubeconfig=str(_down_kubeconfig(tmp_path, address)), context="down").get_client()
    with pytest.raises(BackupError, match=rf"could not delete Backup {world.velero}/{manifest.restore['backup_name']}: "
                                          rf".*connection refused at {address} \(check KUBECONFIG"):
        VeleroBackupDriver(down).expire(manifest, store)
    assert backups_in_cluster(kube_cluster, world) == [manifest.restore["backup_name"]]
