"""VeleroBackupDriver against the fake Kubernetes API; the tests play Velero's controller.

The backed-up namespaces hold what a production namespace holds: data
(ConfigMaps, Secrets, claims) and what must never come back in a restore
test (a Deployment configured for the production database, a CronJob, an
Ingress). The played Velero restores what the Restore's includedResources
select, as Velero does.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from tests.fakes.kube_api import KubeApiServer

Status = dict[str, Any]


def crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.velero.io"},
        "spec": {
            "group": "velero.io",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                          "schema": {"openAPIV3Schema": {"type": "object",
                                                         "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }


SCHEDULE = {
    "apiVersion": VELERO_API,
    "kind": "Schedule",
    "metadata": {"name": "onto-cluster-daily", "namespace": "velero"},
    "spec": {
        "schedule": "0 3 * * *",
        "template": {"includedNamespaces": ["*"], "storageLocation": "default", "ttl": "720h0m0s",
                     "snapshotVolumes": True},
    },
}


@pytest.fixture
def kube(kubeconfig_path: Path, kube_api: KubeApiServer) -> KubernetesClient:
    client = KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake").get_client()
    for kind, plural in (("Backup", "backups"), ("Restore", "restores"), ("Schedule", "schedules"),
                         ("DeleteBackupRequest", "deletebackuprequests")):
        client.apply(crd(kind, plural))
    client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "velero"}})
    for namespace in ("ontology-editor", "data"):
        client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    client.apply(SCHEDULE)
    return client


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


def spec(target: str = "velero-restore-test", namespaces: list[str] | None = None) -> Datastore:
    return Datastore.model_validate({
        "name": "cluster_state",
        "engine": "velero",
        "method": "velero",
        "connection": {"namespace": "velero"},
        "velero": {"schedule": "onto-cluster-daily",
                   "included_namespaces": namespaces if namespaces is not None else ["ontology-editor", "data"]},
        "restore_test": {"target": {"namespace": target},
                         "verify_keys": ["v1 ConfigMap ontology-editor/onto-backend-config"]},
    })


# What the backed-up namespaces hold: (apiVersion, kind, plural, name).
LIVE_OBJECTS = [
    ("v1", "ConfigMap", "configmaps", "onto-backend-config"),
    ("v1", "Secret", "secrets", "onto-backend-db"),
    ("v1", "PersistentVolumeClaim", "persistentvolumeclaims", "onto-data"),
    ("apps/v1", "Deployment", "deployments", "onto-backend"),
    ("batch/v1", "CronJob", "cronjobs", "onto-ilm"),
    ("networking.k8s.io/v1", "Ingress", "ingresses", "onto"),
]


def seed_live_namespaces(kube_api: KubeApiServer, namespaces: tuple[str, ...] = ("ontology-editor", "data")) -> None:
    for namespace in namespaces:
        for api_version, kind, _, name in LIVE_OBJECTS:
            spec = {"data": {"DATABASE_URL": "postgresql://onto-pg-rw.data.svc:5432/ontology"}} if kind == "ConfigMap" \
                else {"spec": {}}
            kube_api.put_object({"apiVersion": api_version, "kind": kind,
                                 "metadata": {"name": name, "namespace": namespace}, **spec})
        kube_api.put_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "scratch-only", "namespace": namespace, "labels": {"velero.io/exclude-from-backup": "true"}}})


def plays_velero_restore(kube_api: KubeApiServer) -> Callable[[dict[str, Any]], Status]:
    """Velero restoring the seeded objects its Restore selects (includedResources) into the mapped namespaces,
    then marking the Restore Completed."""
    def restore(obj: dict[str, Any]) -> Status:
        spec = obj["spec"]
        included = spec.get("includedResources") or ["*"]
        for source, scratch in spec["namespaceMapping"].items():
            for api_version, kind, plural, name in LIVE_OBJECTS:
                if "*" in included or plural in included:
                    original = kube_api.get_object(api_version, plural, name, source)
                    kube_api.put_object({"apiVersion": api_version, "kind": kind,
                                         "metadata": {"name": name, "namespace": scratch},
                                         **{k: v for k, v in original.items() if k in ("data", "spec")}})
        return restore_completed(6)(obj)
    return restore


@contextmanager
def velero_controller(
    kube_api: KubeApiServer, plural: str, status_for: Callable[[dict[str, Any]], Status | None],
    on_done: Callable[[dict[str, Any]], None] = lambda obj: None,
) -> Iterator[list[dict[str, Any]]]:
    """Plays Velero: each new object of ``plural`` in namespace velero gets ``status_for(obj)`` as its status."""
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    rtype = kube_api.state.resolve(VELERO_API, plural)

    def run() -> None:
        while not stop.wait(0.02):
            for obj in kube_api.state.list(rtype, "velero", {})["items"]:
                if obj["metadata"]["name"] in {s["metadata"]["name"] for s in seen}:
                    continue
                seen.append(obj)
                status = status_for(obj)
                if status is not None:
                    kube_api.set_status(VELERO_API, plural, obj["metadata"]["name"], "velero", status)
                    on_done(obj)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=2)


def completed(items: int) -> Callable[[dict[str, Any]], Status]:
    return lambda obj: {"phase": "Completed", "startTimestamp": "2026-11-22T03:00:01Z",
                        "completionTimestamp": "2026-11-22T03:02:10Z", "formatVersion": "1.1.0",
                        "expiration": "2026-12-22T03:00:01Z", "errors": 0, "warnings": 1,
                        "progress": {"totalItems": items, "itemsBackedUp": items}}


def restore_completed(items: int) -> Callable[[dict[str, Any]], Status]:
    return lambda obj: {"phase": "Completed", "errors": 0, "warnings": 0,
                        "progress": {"totalItems": items, "itemsRestored": items}}


def writes(kube_api: KubeApiServer) -> int:
    return sum(1 for r in kube_api.requests if r.method in ("POST", "PUT", "PATCH", "DELETE"))


def test_restore_brings_back_data_only_into_namespaces_fenced_before_the_restore(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path
) -> None:
    seed_live_namespaces(kube_api)
    datastore = spec()
    driver = VeleroBackupDriver(kube, backup_timeout=5)
    with velero_controller(kube_api, "backups", completed(42)):
        manifest = BackupCatalog(store, datastore.name).run_backup(driver, datastore, "2026-11-22")
    kube_api.requests.clear()

    with velero_controller(kube_api, "restores", plays_velero_restore(kube_api)) as restores:
        with driver.restore(manifest, store, datastore.restore_test, tmp_path):
            for scratch in ("velero-restore-test-ontology-editor", "velero-restore-test-data"):
                for api_version, _, plural, name in LIVE_OBJECTS:
                    restored = kube_api.get_object(api_version, plural, name, scratch)
                    assert (restored is not None) == (plural in ("configmaps", "secrets", "persistentvolumeclaims")), \
                        (plural, scratch)
                fence = kube_api.get_object("networking.k8s.io/v1", "networkpolicies", SCRATCH_POLICY, scratch)
                assert fence["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    [restore] = restores
    assert restore["spec"]["includedResources"] == ["persistentvolumeclaims", "persistentvolumes", "configmaps",
                                                    "secrets"]
    assert set(restore["spec"]) == {"backupName", "includedNamespaces", "namespaceMapping", "includedResources"}
    writes = [(r.method, r.path) for r in kube_api.requests if r.method in ("POST", "PUT", "PATCH")]
    restore_created = writes.index(next(w for w in writes if "/restores" in w[1]))
    for scratch in ("velero-restore-test-ontology-editor", "velero-restore-test-data"):
        fenced = writes.index(next(w for w in writes if w[1].endswith(f"/namespaces/{scratch}/networkpolicies/"
                                                                       f"{SCRATCH_POLICY}")))
        assert fenced < restore_created, f"{scratch} was fenced after the Restore was created"


def test_backup_restore_into_scratch_namespaces_and_cleanup(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path
) -> None:
    seed_live_namespaces(kube_api)
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    driver = VeleroBackupDriver(kube, backup_timeout=5)
    with velero_controller(kube_api, "backups", completed(42)) as backups:
        manifest = catalog.run_backup(driver, datastore, "2026-11-22")

    [backup] = backups
    assert backup["metadata"]["name"] == f"onto-cluster-daily-ops-{manifest.backup_id.lower()}"
    assert backup["metadata"]["labels"]["velero.io/schedule-name"] == "onto-cluster-daily"
    assert backup["spec"]["includedNamespaces"] == ["ontology-editor", "data"]
    assert backup["spec"]["ttl"] == "720h0m0s" and backup["spec"]["storageLocation"] == "default"
    assert manifest.counts == {f"{resource}:{namespace}": 1 for namespace in ("ontology-editor", "data")
                               for resource in ("persistentvolumeclaims", "configmaps", "secrets")}
    assert manifest.details["items_backed_up"] == 42
    assert manifest.recovery_point.isoformat() == "2026-11-22T03:00:01+00:00"
    record = json.loads(store.get_bytes(manifest.artifacts[0].key))
    assert record["status"]["phase"] == "Completed" and catalog.verify_artifacts(manifest) == []
    assert driver.verify(manifest, store).ok

    with velero_controller(kube_api, "restores", plays_velero_restore(kube_api)) as restores:
        with driver.restore(manifest, store, datastore.restore_test, tmp_path) as restored:
            assert restored.counts() == manifest.counts
            [query] = restored.run_queries(["v1 ConfigMap ontology-editor/onto-backend-config"])
            assert query.ok
            assert not restored.run_queries(["v1 ConfigMap logging/onto-backend-config"])[0].ok
            assert not restored.run_queries(["apps/v1 Deployment ontology-editor/onto-backend"])[0].ok
            scratch = kube_api.get_object("v1", "namespaces", "velero-restore-test-ontology-editor")
            assert scratch["metadata"]["labels"][RESTORE_TEST_LABEL] == "cluster_state"

    [restore] = restores
    assert restore["spec"]["backupName"] == backup["metadata"]["name"]
    assert restore["spec"]["namespaceMapping"] == {"ontology-editor": "velero-restore-test-ontology-editor",
                                                   "data": "velero-restore-test-data"}
    assert kube_api.get_object(VELERO_API, "restores", restore["metadata"]["name"], "velero") is None
    assert kube_api.get_object("v1", "namespaces", "velero-restore-test-data") is None
    assert kube_api.get_object("v1", "namespaces", "ontology-editor") is not None
    assert kube_api.get_object("apps/v1", "deployments", "onto-backend", "ontology-editor") is not None


def test_single_namespace_maps_to_the_target_namespace(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(namespaces=["data"])
    driver = VeleroBackupDriver(kube, backup_timeout=5)
    with velero_controller(kube_api, "backups", completed(5)):
        manifest = BackupCatalog(store, datastore.name).run_backup(driver, datastore, "2026-11-22")
    with velero_controller(kube_api, "restores", restore_completed(5)) as restores:
        with driver.restore(manifest, store, datastore.restore_test, tmp_path):
            assert kube_api.get_object("v1", "namespaces", "velero-restore-test") is not None
    assert restores[0]["spec"]["namespaceMapping"] == {"data": "velero-restore-test"}
    assert kube_api.get_object("v1", "namespaces", "velero-restore-test") is None


@pytest.mark.parametrize("phase", ["Failed", "PartiallyFailed"])
def test_failed_backup_reports_velero_reasons_and_commits_nothing(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, phase: str
) -> None:
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    failure = {"phase": phase, "errors": 3, "warnings": 2,
               "failureReason": "error getting backup storage location: BackupStorageLocation default not found"}
    with velero_controller(kube_api, "backups", lambda obj: failure):
        with pytest.raises(BackupError, match=rf"ended {phase} - failure reason: error getting backup storage.*3 errors"):
            catalog.run_backup(VeleroBackupDriver(kube, backup_timeout=5), datastore, "2026-11-22")
    assert catalog.latest() is None and list(store.list("backups/")) == []


def test_backup_that_never_finishes_times_out(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore
) -> None:
    datastore = spec()
    with velero_controller(kube_api, "backups", lambda obj: {"phase": "InProgress"}):
        with pytest.raises(BackupError, match=r"did not finish within 1 s; Velero may still complete it"):
            BackupCatalog(store, datastore.name).run_backup(
                VeleroBackupDriver(kube, backup_timeout=1), datastore, "2026-11-22")


def test_missing_schedule_names_the_spec_field(kube: KubernetesClient, kube_api: KubeApiServer,
                                               store: LocalObjectStore) -> None:
    kube_api.delete_object(VELERO_API, "schedules", "onto-cluster-daily", "velero")
    datastore = spec()
    with pytest.raises(BackupError, match=r"no Schedule 'onto-cluster-daily' in namespace velero.*velero.schedule"):
        BackupCatalog(store, datastore.name).run_backup(VeleroBackupDriver(kube), datastore, "2026-11-22")


def test_api_server_down_names_address_and_setting(tmp_path: Path, store: LocalObjectStore) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "down",
        "clusters": [{"name": "down", "cluster": {"server": address}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "down", "context": {"cluster": "down", "user": "down"}}],
    }))
    kube = KubernetesResource(kubeconfig=str(kubeconfig), context="down").get_client()
    datastore = spec()
    with pytest.raises(ServerUnreachableError, match=rf"{address} \(check KUBECONFIG"):
        BackupCatalog(store, datastore.name).run_backup(VeleroBackupDriver(kube), datastore, "2026-11-22")


def _committed(kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, datastore: Datastore):
    with velero_controller(kube_api, "backups", completed(42)):
        return BackupCatalog(store, datastore.name).run_backup(
            VeleroBackupDriver(kube, backup_timeout=5), datastore, "2026-11-22")


@pytest.mark.parametrize("target", ["data", "velero", "kube-system"])
def test_restore_over_a_live_namespace_is_refused_before_any_write(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path, target: str
) -> None:
    datastore = spec(namespaces=["data"])
    manifest = _committed(kube, kube_api, store, datastore)
    before = writes(kube_api)
    with pytest.raises(RestoreRefused, match=f"into {target} refused before writing anything"):
        with VeleroBackupDriver(kube).restore(manifest, store, RestoreTest(target={"namespace": target}), tmp_path):
            pass
    assert writes(kube_api) == before


def test_existing_namespace_not_made_by_a_restore_test_is_refused(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(namespaces=["data"])
    manifest = _committed(kube, kube_api, store, datastore)
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "velero-restore-test"}})
    before = writes(kube_api)
    with pytest.raises(RestoreRefused, match="already exists and was not made by a restore test"):
        with VeleroBackupDriver(kube).restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert writes(kube_api) == before
    assert kube_api.get_object("v1", "namespaces", "velero-restore-test") is not None


def test_failed_restore_cleans_up(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(namespaces=["data"])
    manifest = _committed(kube, kube_api, store, datastore)
    failure = {"phase": "PartiallyFailed", "errors": 1, "warnings": 0}
    with velero_controller(kube_api, "restores", lambda obj: failure) as restores:
        with pytest.raises(RestoreError, match="ended PartiallyFailed - 1 errors"):
            with VeleroBackupDriver(kube, restore_timeout=5).restore(
                    manifest, store, datastore.restore_test, tmp_path):
                pass
    assert kube_api.get_object(VELERO_API, "restores", restores[0]["metadata"]["name"], "velero") is None
    assert kube_api.get_object("v1", "namespaces", "velero-restore-test") is None


def test_body_failure_cleans_up(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(namespaces=["data"])
    manifest = _committed(kube, kube_api, store, datastore)
    with velero_controller(kube_api, "restores", restore_completed(42)):
        with pytest.raises(RuntimeError, match="check failed"):
            with VeleroBackupDriver(kube, restore_timeout=5).restore(
                    manifest, store, datastore.restore_test, tmp_path):
                raise RuntimeError("check failed")
    assert kube_api.get_object("v1", "namespaces", "velero-restore-test") is None
    assert kube_api.state.list(kube_api.state.resolve(VELERO_API, "restores"), "velero", {})["items"] == []


def backups_in_cluster(kube_api: KubeApiServer) -> list[str]:
    rtype = kube_api.state.resolve(VELERO_API, "backups")
    return sorted(o["metadata"]["name"] for o in kube_api.state.list(rtype, "velero", {})["items"])


def delete_requests(kube_api: KubeApiServer) -> list[dict[str, Any]]:
    rtype = kube_api.state.resolve(VELERO_API, "deletebackuprequests")
    return kube_api.state.list(rtype, "velero", {})["items"]


@contextmanager
def velero_deletions(kube_api: KubeApiServer, errors: list[str] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Plays Velero's backup deletion controller: removes the Backup (its files and snapshots are Velero's
    business), marks the request Processed and, after a clean deletion, deletes the backup's requests;
    with ``errors`` the Backup stays, Deleting, and the request keeps the errors."""

    def process(request: dict[str, Any]) -> Status:
        name = request["spec"]["backupName"]
        backup = kube_api.get_object(VELERO_API, "backups", name, "velero")
        if backup is None:
            return {"phase": "Processed", "errors": ["backup not found"]}
        if errors:
            kube_api.set_status(VELERO_API, "backups", name, "velero", {**backup["status"], "phase": "Deleting"})
            return {"phase": "Processed", "errors": errors}
        kube_api.delete_object(VELERO_API, "backups", name, "velero")
        return {"phase": "Processed"}

    def clean_up(request: dict[str, Any]) -> None:
        if errors:
            return
        labels = request["metadata"]["labels"]
        for other in delete_requests(kube_api):
            if all(other["metadata"]["labels"].get(k) == labels[k]
                   for k in ("velero.io/backup-name", "velero.io/backup-uid")):
                kube_api.delete_object(VELERO_API, "deletebackuprequests", other["metadata"]["name"], "velero")

    with velero_controller(kube_api, "deletebackuprequests", process, clean_up) as requests:
        yield requests


def test_expire_deletes_only_that_backup_through_a_delete_backup_request(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore
) -> None:
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    with velero_controller(kube_api, "backups", completed(42)):
        old = catalog.run_backup(VeleroBackupDriver(kube, backup_timeout=5), datastore, "2026-11-21")
        kept = catalog.run_backup(VeleroBackupDriver(kube, backup_timeout=5), datastore, "2026-11-22")
    name = old.restore["backup_name"]
    uid = kube_api.get_object(VELERO_API, "backups", name, "velero")["metadata"]["uid"]
    driver = VeleroBackupDriver(kube, delete_timeout=5)

    with velero_deletions(kube_api) as requests:
        said = driver.expire(old, store)

    [request] = requests
    assert request["metadata"]["namespace"] == "velero" and request["metadata"]["name"].startswith(f"{name}-")
    assert request["metadata"]["labels"] == {"velero.io/backup-name": name, "velero.io/backup-uid": uid}
    assert request["spec"] == {"backupName": name}
    assert said.startswith(f"velero: deleted Backup velero/{name} with its files in the backup storage location")
    assert backups_in_cluster(kube_api) == [kept.restore["backup_name"]]
    assert delete_requests(kube_api) == []
    assert driver.verify(kept, store).ok

    before = writes(kube_api)
    assert "was already gone (expired by its ttl or deleted); nothing to delete" in driver.expire(old, store)
    assert writes(kube_api) == before


def test_expire_reports_what_velero_could_not_delete(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore
) -> None:
    datastore = spec()
    manifest = _committed(kube, kube_api, store, datastore)
    name = manifest.restore["backup_name"]
    read_only = "cannot delete backup because backup storage location default is currently in read-only mode"

    with velero_deletions(kube_api, errors=[read_only]):
        with pytest.raises(BackupError, match=rf"Velero could not delete Backup velero/{name}: {read_only} "
                                              rf"\(DeleteBackupRequest velero/{name}-"):
            VeleroBackupDriver(kube, delete_timeout=5).expire(manifest, store)

    assert backups_in_cluster(kube_api) == [name]


def test_expire_of_a_backup_velero_finds_gone_is_fine(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore
) -> None:
    datastore = spec()
    manifest = _committed(kube, kube_api, store, datastore)
    name = manifest.restore["backup_name"]

    def ttl_expired_first(request: dict[str, Any]) -> Status:
        kube_api.delete_object(VELERO_API, "backups", name, "velero")
        return {"phase": "Processed", "errors": ["backup not found"]}

    with velero_controller(kube_api, "deletebackuprequests", ttl_expired_first):
        said = VeleroBackupDriver(kube, delete_timeout=5).expire(manifest, store)
    assert said.startswith(f"velero: Backup velero/{name} was already gone when Velero processed")


@pytest.mark.parametrize("velero_says, shown", [
    (None, r"not picked up yet \(is the Velero server running\?\)"),
    ({"phase": "InProgress"}, "InProgress"),
])
def test_expire_that_velero_does_not_finish_gives_up_after_the_timeout(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, velero_says: Status | None, shown: str
) -> None:
    datastore = spec()
    manifest = _committed(kube, kube_api, store, datastore)
    name = manifest.restore["backup_name"]
    with velero_controller(kube_api, "deletebackuprequests", lambda request: velero_says):
        with pytest.raises(BackupError, match=rf"Backup velero/{name} was not deleted within 1 s: "
                                              rf"DeleteBackupRequest velero/{name}-\w+ \(velero.io/v1\) is {shown}; "
                                              "Velero may still finish it"):
            VeleroBackupDriver(kube, delete_timeout=1).expire(manifest, store)
    assert backups_in_cluster(kube_api) == [name]


def test_expire_of_a_long_backup_name_labels_the_request_as_velero_does(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore
) -> None:
    schedule = "onto-cluster-daily-with-a-rather-long-name"
    kube.apply({**SCHEDULE, "metadata": {"name": schedule, "namespace": "velero"}})
    datastore = Datastore.model_validate({**spec().model_dump(exclude_none=True),
                                          "velero": {"schedule": schedule, "included_namespaces": ["data"]}})
    with velero_controller(kube_api, "backups", completed(7)):
        manifest = BackupCatalog(store, datastore.name).run_backup(
            VeleroBackupDriver(kube, backup_timeout=5), datastore, "2026-11-22")
    name = manifest.restore["backup_name"]
    assert name == backup_name(schedule, manifest.backup_id) and len(name) > 63

    with velero_deletions(kube_api) as requests:
        VeleroBackupDriver(kube, delete_timeout=5).expire(manifest, store)

    label = requests[0]["metadata"]["labels"]["velero.io/backup-name"]
    assert label == name[:57] + hashlib.sha256(name.encode()).hexdigest()[:6]
    assert backups_in_cluster(kube_api) == []


def test_expire_with_the_api_server_down_is_a_backup_error_naming_it(
    kube: KubernetesClient, kube_api: KubeApiServer, store: LocalObjectStore, tmp_path: Path
) -> None:
    manifest = _committed(kube, kube_api, store, spec())
    address = f"http://127.0.0.1:{free_port()}"
    kubeconfig = tmp_path / "down-kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "down",
        "clusters": [{"name": "down", "cluster": {"server": address}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "down", "context": {"cluster": "down", "user": "down"}}],
    }))
    down = KubernetesResource(kubeconfig=str(kubeconfig), context="down").get_client()
    with pytest.raises(BackupError, match=rf"could not delete Backup velero/{manifest.restore['backup_name']}: "
                                          rf".*connection refused at {address} \(check KUBECONFIG"):
        VeleroBackupDriver(down).expire(manifest, store)
    assert backups_in_cluster(kube_api) == [manifest.restore["backup_name"]]
