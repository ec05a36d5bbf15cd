"""Neo4jBackupDriver on the real API server (as the code location's identity) and moto's S3.

The Secret, the Job, its pods and their cleanup are the real server's: the
Job controller makes the pods and marks the Job Complete or Failed (or
DeadlineExceeded), the garbage collector acts on the deletions. There is no
container runtime here, so :class:`Neo4jContainers` plays what runs in the
pods (neo4j-admin and ``aws s3 cp`` against moto's S3) and the kubelet
stand-in reports the containers terminated with their termination messages,
which is all the driver reads of a pod (it reads no logs).

The namespace is ``data``, the Neo4j namespace of the shipped spec: it is
where infra/dagster/rbac.yaml lets the code location write the Job's Secret.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import yaml
from kubernetes import config

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.neo4j_backup import MANAGED_BY, Neo4jBackupDriver
from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore, S3ObjectStore, aws_client
from ops_platform.spec import Datastore, RestoreTest
from tests.fixtures.kube_server import REPO_ROOT, KubeCluster, KubeletStandIn

PASSWORD = "neo4j-secret"
GRAPH = b"neo4j backup artifact " * 5000
NAMESPACE = "data"
SERVICE_ACCOUNT = "ops-platform-backup"
MANAGED = ",".join(f"{key}={value}" for key, value in MANAGED_BY.items())
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")


@dataclass
class Neo4jContainers:
    """What runs in the pods of the Neo4j Jobs, reported through the kubelet stand-in.

    For each pod the real Job controller makes in ``data``: ``neo4j-admin``
    reports its counts, ``upload`` puts the artifact into S3 as ``aws s3 cp``
    would and reports its sha256; in a restore Job ``fetch`` reads it back and
    checks the sha256, ``restore`` reports the counts and query results.
    """

    cluster: KubeCluster
    kubelet: KubeletStandIn
    s3: Any
    artifact: bytes = GRAPH
    admin_report: dict[str, Any] = field(default_factory=lambda: {"nodes": 2000, "relationships": 5300,
                                                                 "version": "neo4j 5.26.0"})
    restore_report: dict[str, Any] = field(default_factory=lambda: {"nodes": 2000, "relationships": 5300,
                                                                   "queries": [2000]})
    fail_step: str | None = None  # "neo4j-admin" or "upload"
    report_wrong_sha: bool = False
    never_run: bool = False  # the pods stay Pending, as with no node to run them
    jobs: list[dict[str, Any]] = field(default_factory=list, repr=False)  # as the server held them
    secrets_seen: list[dict[str, Any]] = field(default_factory=list, repr=False)  # hold the password
    errors: list[str] = field(default_factory=list)

    @staticmethod
    def env(container: dict[str, Any]) -> dict[str, Any]:
        return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env") or []}

    def run(self, pod: dict[str, Any]) -> None:
        job_name = pod["metadata"]["labels"]["job-name"]

        def started() -> dict[str, Any] | None:  # the controller writes startTime just after making the pod
            job = self.cluster.get_object("batch/v1", "Job", job_name, NAMESPACE) or {}
            return job if (job.get("status") or {}).get("startTime") else None

        self.jobs.append(self.cluster.wait_for(f"Job {job_name} started", started, timeout=10))
        secret = self.cluster.get_object("v1", "Secret", job_name, NAMESPACE)
        if secret is not None:
            self.secrets_seen.append(secret)
        if self.never_run:
            return
        spec = pod["spec"]
        exits: dict[str, tuple[int, str]] = {}
        if job_name.startswith("neo4j-backup"):
            if self.fail_step == "neo4j-admin":
                exits["neo4j-admin"] = (1, "ERROR: Failed to connect to the backup server at "
                                           "onto-neo4j-admin.data.svc.cluster.local:6362")
            else:
                exits["neo4j-admin"] = (0, json.dumps(self.admin_report))
                bucket, key = _split(self.env(spec["containers"][0])["ARTIFACT_URL"])
                self.s3.put_object(Bucket=bucket, Key=key, Body=self.artifact)
                digest = hashlib.sha256(b"tampered" if self.report_wrong_sha else self.artifact).hexdigest()
                exits["upload"] = (0, json.dumps({"sha256": digest, "bytes": len(self.artifact)}))
        else:
            fetch = self.env(spec["initContainers"][0])
            bucket, key = _split(fetch["ARTIFACT_URL"])
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            if hashlib.sha256(body).hexdigest() != fetch["ARTIFACT_SHA256"]:
                exits["fetch"] = (1, "/work/artifact: FAILED\nsha256sum: WARNING: 1 computed checksum did NOT match")
            else:
                exits["fetch"] = (0, "")
                exits["restore"] = (0, json.dumps(self.restore_report))
        self.kubelet.report_terminated(NAMESPACE, pod["metadata"]["name"], exits)


def _split(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


@pytest.fixture(scope="module")
def neo4j_namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """``data`` (made at start from rbac.yaml) with the Jobs' ServiceAccount of the databases layer."""
    if kube_cluster.get_object("v1", "Namespace", NAMESPACE) is None:
        kube_cluster.create_namespace(NAMESPACE)
    layer = REPO_ROOT / "infra" / "layers" / "databases" / "neo4j.yaml"
    [account] = [doc for doc in yaml.safe_load_all(layer.read_text())
                 if doc and doc["kind"] == "ServiceAccount" and doc["metadata"]["name"] == SERVICE_ACCOUNT]
    kube_cluster.put_object(account)
    yield NAMESPACE
    kube_cluster.delete_object("v1", "ServiceAccount", SERVICE_ACCOUNT, NAMESPACE)


def leftovers(cluster: KubeCluster) -> list[str]:
    """What the Neo4j Jobs left in ``data``: their Jobs, Secrets and pods."""
    found = [f"{kind}/{obj['metadata']['name']}"
             for api_version, kind in (("batch/v1", "Job"), ("v1", "Secret"))
             for obj in cluster.list_objects(api_version, kind, NAMESPACE, MANAGED)]
    pods = cluster.list_objects("v1", "Pod", NAMESPACE, "job-name")
    found += [f"Pod/{pod['metadata']['name']}" for pod in pods]
    return [name for name in found if name.split("/")[1].startswith("neo4j-")]


def cleaned_up(cluster: KubeCluster) -> list[str]:
    """What is left once the server has had time to finish the deletions (the garbage collector works in the
    background): nothing, when the cleanup is right."""
    try:
        cluster.wait_for("the Jobs' objects deleted", lambda: not leftovers(cluster), timeout=10)
    except AssertionError:
        pass
    return leftovers(cluster)


def writes_since(cluster: KubeCluster, mark: tuple[int, str]) -> list[dict[str, Any]]:
    """Write requests the code location's identity has sent since ``mark``, from the server's audit log."""
    return [event for event in cluster.audit_events_since(mark) if event["verb"] in WRITE_VERBS]


@pytest.fixture
def kubeconfig(kube_cluster: KubeCluster, tmp_path: Path) -> Path:
    return kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform")


@pytest.fixture
def kube(kubeconfig: Path, kube_cluster: KubeCluster, neo4j_namespace: str) -> Iterator[KubernetesClient]:
    client = KubernetesResource(kubeconfig=str(kubeconfig)).get_client()
    yield client
    client.api_client.close()
    for kind, name in (left.split("/") for left in leftovers(kube_cluster)):  # after a failed test
        kube_cluster.delete_object("batch/v1" if kind == "Job" else "v1", kind, name, NAMESPACE)


@pytest.fixture
def containers(kube_cluster: KubeCluster, kubelet: KubeletStandIn, s3_bucket: str) -> Iterator[Neo4jContainers]:
    playing = Neo4jContainers(kube_cluster, kubelet, boto3.client("s3"))
    stop = threading.Event()

    def watch_pods() -> None:
        seen: set[str] = set()
        while not stop.wait(0.1):
            try:
                pods = kube_cluster.list_objects("v1", "Pod", NAMESPACE, MANAGED)
                for pod in pods:
                    if pod["metadata"]["uid"] not in seen and not pod["metadata"].get("deletionTimestamp"):
                        seen.add(pod["metadata"]["uid"])
                        playing.run(pod)
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                playing.errors.append(repr(exc))

    thread = threading.Thread(target=watch_pods, name="neo4j-containers", daemon=True)
    thread.start()
    yield playing
    stop.set()
    thread.join(timeout=5)
    assert playing.errors == []


@pytest.fixture
def store(s3_bucket: str) -> S3ObjectStore:
    return S3ObjectStore(aws_client("s3", region=None, endpoint_url=None, needed_for="neo4j test"), s3_bucket)


def spec(method: str = "backup") -> Datastore:
    return Datastore.model_validate({
        "name": "neo4j_graph",
        "engine": "neo4j",
        "method": method,
        "connection": {"url": "neo4j://onto-neo4j.data.svc.cluster.local:7687", "database": "neo4j",
                       "user": "neo4j", "password_env": "NEO4J_PASSWORD"},
        "neo4j": {"namespace": NAMESPACE, "backup_address": "onto-neo4j-admin.data.svc.cluster.local:6362"},
        "restore_test": {"target": {"url": "neo4j://onto-neo4j.data.svc.cluster.local:7687",
                                    "database": "restoretest"},
                         "verify_sql": ["MATCH (c:Concept) RETURN count(c)"]},
    })


def test_backup_and_restore_through_jobs(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore,
    tmp_path: Path,
) -> None:
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    driver = Neo4jBackupDriver(kube, job_timeout=30)
    manifest = catalog.run_backup(driver, datastore, "2026-11-22", password=PASSWORD)

    assert manifest.counts == {"nodes": 2000, "relationships": 5300}
    assert manifest.source_version == "neo4j 5.26.0"
    [backup_job] = containers.jobs
    assert manifest.recovery_point.isoformat().replace("+00:00", "Z") == backup_job["status"]["startTime"]
    [artifact] = manifest.artifacts
    assert artifact.name == "neo4j.backup" and artifact.size == len(GRAPH)
    assert artifact.sha256 == hashlib.sha256(GRAPH).hexdigest() and catalog.verify_artifacts(manifest) == []
    admin = backup_job["spec"]["template"]["spec"]["initContainers"][0]
    assert "neo4j-admin database backup --from=\"$BACKUP_ADDRESS\" --to-path=/work" in admin["command"][-1]
    assert Neo4jContainers.env(admin)["BACKUP_ADDRESS"] == "onto-neo4j-admin.data.svc.cluster.local:6362"
    assert PASSWORD not in json.dumps(backup_job) and PASSWORD not in manifest.to_json().decode()
    [secret] = containers.secrets_seen
    assert secret["metadata"]["name"] == backup_job["metadata"]["name"] and secret["type"] == "Opaque"
    assert cleaned_up(kube_cluster) == []

    with driver.restore(manifest, store, datastore.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
        [query] = restored.run_queries(["MATCH (c:Concept) RETURN count(c)"])
        assert query.ok and query.value == 2000
        assert not restored.run_queries(["MATCH (n) RETURN 1"])[0].ok
    restore_job = containers.jobs[1]
    neo4j = restore_job["spec"]["template"]["spec"]["containers"][0]
    assert Neo4jContainers.env(neo4j)["DATABASE"] == "restoretest"
    assert Neo4jContainers.env(neo4j)["VERIFY_CYPHER"] == "MATCH (c:Concept) RETURN count(c)"
    assert cleaned_up(kube_cluster) == []


def test_a_backup_leaves_nothing_outside_its_catalog_prefix_so_it_needs_no_expire(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore
) -> None:
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    manifest = catalog.run_backup(Neo4jBackupDriver(kube, job_timeout=30), datastore, "2026-11-22",
                                  password=PASSWORD)

    prefix = catalog.prefix(manifest.partition, manifest.backup_id)
    assert sorted(o.key for o in store.list("")) == [f"{prefix}manifest.json", f"{prefix}neo4j.backup"]
    assert cleaned_up(kube_cluster) == []
    assert not hasattr(Neo4jBackupDriver, "expire")


def test_failed_job_reports_its_reason_and_the_failed_step_message(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore
) -> None:
    containers.fail_step = "neo4j-admin"
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    with pytest.raises(BackupError, match=r"failed \(BackoffLimitExceeded: Job has reached the specified backoff "
                                          r"limit\) - neo4j-admin: ERROR: Failed to connect"):
        catalog.run_backup(Neo4jBackupDriver(kube, job_timeout=30), datastore, "2026-11-22", password=PASSWORD)
    assert catalog.latest() is None and list(store.list("backups/")) == []
    assert cleaned_up(kube_cluster) == []


def test_job_past_its_deadline_is_failed_by_the_job_controller_and_deleted(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore
) -> None:
    containers.never_run = True
    datastore = spec()
    with pytest.raises(BackupError, match=r"failed \(DeadlineExceeded: Job was active longer than specified "
                                          r"deadline\)"):
        BackupCatalog(store, datastore.name).run_backup(
            Neo4jBackupDriver(kube, job_timeout=1), datastore, "2026-11-22", password=PASSWORD)
    assert cleaned_up(kube_cluster) == []


def test_job_the_controller_does_not_mark_in_time_is_given_up_and_deleted(
    kubeconfig: Path, kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers,
    store: S3ObjectStore,
) -> None:
    """The driver's own bound: each reading of the injected clock is 29.5 s after the last, so the wait is over
    at its second look, long before the controller would mark the Job at its 30 s deadline."""
    containers.never_run = True
    ticks = itertools.count(0.0, 29.5)
    late = KubernetesClient(config.new_client_from_config(config_file=str(kubeconfig)), clock=lambda: next(ticks))
    datastore = spec()
    try:
        with pytest.raises(BackupError, match=r"did not finish within 30 s; it was deleted"):
            BackupCatalog(store, datastore.name).run_backup(
                Neo4jBackupDriver(late, job_timeout=30, wait_grace=0), datastore, "2026-11-22", password=PASSWORD)
    finally:
        late.api_client.close()
    assert len(containers.jobs) == 1
    assert cleaned_up(kube_cluster) == []


def test_corrupt_upload_is_detected(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore
) -> None:
    containers.report_wrong_sha = True
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    with pytest.raises(BackupError, match="the upload is corrupt"):
        catalog.run_backup(Neo4jBackupDriver(kube, job_timeout=30), datastore, "2026-11-22", password=PASSWORD)
    assert catalog.latest() is None and list(store.list("backups/")) == []
    assert cleaned_up(kube_cluster) == []


def test_local_store_is_refused_with_the_setting_to_use(
    kube: KubernetesClient, kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    datastore = spec()
    mark = kube_cluster.audit_mark()
    with pytest.raises(BackupError, match="configure an S3 store \\(OPS_BACKUP_BUCKET\\)"):
        BackupCatalog(LocalObjectStore(tmp_path), datastore.name).run_backup(
            Neo4jBackupDriver(kube), datastore, "2026-11-22")
    assert writes_since(kube_cluster, mark) == []


def test_dump_needs_the_data_claim_and_mounts_it(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore
) -> None:
    datastore = spec("dump")
    catalog = BackupCatalog(store, datastore.name)
    with pytest.raises(BackupError, match="needs the data volume claim of the stopped server"):
        catalog.run_backup(Neo4jBackupDriver(kube, method="dump"), datastore, "2026-11-22")
    containers.admin_report = {"version": "neo4j 5.26.0"}
    manifest = catalog.run_backup(Neo4jBackupDriver(kube, method="dump", data_claim="data-onto-neo4j-0",
                                                    job_timeout=30), datastore, "2026-11-22")
    assert manifest.artifacts[0].name == "neo4j.dump" and manifest.counts == {}
    assert manifest.restore["format"] == "neo4j-dump"
    volumes = containers.jobs[0]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "data-onto-neo4j-0"}} in volumes
    assert containers.secrets_seen == []  # no password, no Secret
    assert cleaned_up(kube_cluster) == []


def test_restore_into_the_source_database_is_refused_before_any_write(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore,
    tmp_path: Path,
) -> None:
    datastore = spec()
    manifest = BackupCatalog(store, datastore.name).run_backup(
        Neo4jBackupDriver(kube, job_timeout=30), datastore, "2026-11-22", password=PASSWORD)
    mark = kube_cluster.audit_mark()
    for target, reason in (("neo4j", "is the source"), ("system", "not a scratch database name")):
        unsafe = RestoreTest(target={"url": "neo4j://onto-neo4j.data.svc.cluster.local:7687", "database": target})
        with pytest.raises(RestoreRefused, match=reason):
            with Neo4jBackupDriver(kube).restore(manifest, store, unsafe, tmp_path):
                pass
    assert writes_since(kube_cluster, mark) == []


def test_corrupt_artifact_fails_the_restore_job_and_is_cleaned_up(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore,
    tmp_path: Path,
) -> None:
    datastore = spec()
    manifest = BackupCatalog(store, datastore.name).run_backup(
        Neo4jBackupDriver(kube, job_timeout=30), datastore, "2026-11-22", password=PASSWORD)
    store.put_bytes(manifest.artifacts[0].key, b"bit rot")
    with pytest.raises(RestoreError, match=r"(?s)restore Job .* failed \(BackoffLimitExceeded: .*fetch: "
                                           r".*checksum did NOT match"):
        with Neo4jBackupDriver(kube, job_timeout=30).restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert cleaned_up(kube_cluster) == []


def test_body_failure_deletes_the_restore_job(
    kube: KubernetesClient, kube_cluster: KubeCluster, containers: Neo4jContainers, store: S3ObjectStore,
    tmp_path: Path,
) -> None:
    datastore = spec()
    driver = Neo4jBackupDriver(kube, job_timeout=30)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver, datastore, "2026-11-22", password=PASSWORD)
    with pytest.raises(RuntimeError, match="check failed"):
        with driver.restore(manifest, store, datastore.restore_test, tmp_path):
            raise RuntimeError("check failed")
    assert cleaned_up(kube_cluster) == []


def test_api_server_down_names_address_and_setting(tmp_path: Path, store: S3ObjectStore) -> None:
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
        BackupCatalog(store, datastore.name).run_backup(Neo4jBackupDriver(kube), datastore, "2026-11-22",
                                                        password=PASSWORD)
