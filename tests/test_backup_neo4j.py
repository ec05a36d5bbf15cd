"""Neo4jBackupDriver against the fake Kubernetes API and moto's S3; the tests play the Job controller.

What the Job's containers would do (neo4j-admin, aws s3 cp) is done here by
:class:`JobController`: it uploads the artifact to S3 as ``aws s3 cp`` would,
creates the Job's pod with the containers' termination messages, and marks
the Job Complete or Failed. Running neo4j-admin itself needs a cluster.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.neo4j_backup import Neo4jBackupDriver
from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore, S3ObjectStore, aws_client
from ops_platform.spec import Datastore, RestoreTest
from tests.fakes.kube_api import KubeApiServer

PASSWORD = "neo4j-secret"
GRAPH = b"neo4j backup artifact " * 5000


@dataclass
class JobController:
    """Plays the Job controller and the kubelet for Jobs in namespace ``data``."""

    kube_api: KubeApiServer
    artifact: bytes = GRAPH
    admin_report: dict[str, Any] = field(default_factory=lambda: {"nodes": 2000, "relationships": 5300,
                                                                 "version": "neo4j 5.26.0"})
    restore_report: dict[str, Any] = field(default_factory=lambda: {"nodes": 2000, "relationships": 5300,
                                                                   "queries": [2000]})
    fail_step: str | None = None  # "neo4j-admin", "upload", "fetch" or "restore"
    report_wrong_sha: bool = False
    never_finish: bool = False
    jobs: list[dict[str, Any]] = field(default_factory=list, repr=False)
    secrets_seen: list[dict[str, Any]] = field(default_factory=list, repr=False)  # hold the password

    @staticmethod
    def env(container: dict[str, Any]) -> dict[str, Any]:
        return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}

    def handle(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        spec = job["spec"]["template"]["spec"]
        secret = self.kube_api.get_object("v1", "secrets", name, "data")
        if secret is not None:
            self.secrets_seen.append(secret)
        if self.never_finish:
            return
        messages: dict[str, tuple[int, str]] = {}
        if name.startswith("neo4j-backup"):
            messages["neo4j-admin"] = (0, json.dumps(self.admin_report))
            upload = self.env(spec["containers"][0])
            bucket, key = _split(upload["ARTIFACT_URL"])
            if self.fail_step != "neo4j-admin":
                boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=self.artifact)
                digest = hashlib.sha256(b"tampered" if self.report_wrong_sha else self.artifact).hexdigest()
                messages["upload"] = (0, json.dumps({"sha256": digest, "bytes": len(self.artifact)}))
        else:
            fetch = self.env(spec["initContainers"][0])
            bucket, key = _split(fetch["ARTIFACT_URL"])
            body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
            if hashlib.sha256(body).hexdigest() != fetch["ARTIFACT_SHA256"]:
                messages["fetch"] = (1, "/work/artifact: FAILED\nsha256sum: WARNING: 1 computed checksum did NOT match")
            else:
                messages["fetch"] = (0, "")
                messages["restore"] = (0, json.dumps(self.restore_report))
        if self.fail_step in ("neo4j-admin", "upload"):
            messages[self.fail_step] = (1, "ERROR: Failed to connect to the backup server at "
                                           "onto-neo4j-admin.data.svc.cluster.local:6362")
        failed = any(code for code, _ in messages.values())
        self.kube_api.put_object(_pod(name, spec, messages))
        condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"} if failed else \
            {"type": "Complete", "status": "True"}
        self.kube_api.set_status("batch/v1", "jobs", name, "data", {
            "startTime": "2026-11-22T02:30:00Z", "conditions": [condition],
            **({"failed": 1} if failed else {"succeeded": 1, "completionTime": "2026-11-22T02:41:00Z"}),
        })


def _split(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


def _pod(job: str, spec: dict[str, Any], messages: dict[str, tuple[int, str]]) -> dict[str, Any]:
    def statuses(containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": c["name"], "ready": False, "restartCount": 0, "image": c["image"],
                 "state": {"terminated": {"exitCode": messages[c["name"]][0], "message": messages[c["name"]][1],
                                          "reason": "Error" if messages[c["name"]][0] else "Completed"}}}
                for c in containers if c["name"] in messages]

    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job}-x7k2p", "namespace": "data",
                         "labels": {"job-name": job, "batch.kubernetes.io/job-name": job}},
            "spec": spec,
            "status": {"phase": "Failed" if any(c for c, _ in messages.values()) else "Succeeded",
                       "initContainerStatuses": statuses(spec["initContainers"]),
                       "containerStatuses": statuses(spec["containers"])}}


@pytest.fixture
def controller(kube_api: KubeApiServer) -> Iterator[JobController]:
    playing = JobController(kube_api)
    stop = threading.Event()
    jobs = kube_api.state.resolve("batch/v1", "jobs")

    def run() -> None:
        while not stop.wait(0.02):
            for job in kube_api.state.list(jobs, "data", {})["items"]:
                if job["metadata"]["uid"] not in {j["metadata"]["uid"] for j in playing.jobs}:
                    playing.jobs.append(job)
                    playing.handle(job)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield playing
    stop.set()
    thread.join(timeout=2)


@pytest.fixture
def kube(kubeconfig_path: Path, kube_api: KubeApiServer) -> KubernetesClient:
    client = KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake").get_client()
    client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "data"}})
    return client


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
        "neo4j": {"namespace": "data", "backup_address": "onto-neo4j-admin.data.svc.cluster.local:6362"},
        "restore_test": {"target": {"url": "neo4j://onto-neo4j.data.svc.cluster.local:7687",
                                    "database": "restoretest"},
                         "verify_sql": ["MATCH (c:Concept) RETURN count(c)"]},
    })


def leftovers(kube_api: KubeApiServer) -> list[str]:
    found = []
    for api_version, plural in (("batch/v1", "jobs"), ("v1", "pods"), ("v1", "secrets")):
        rtype = kube_api.state.resolve(api_version, plural)
        found += [f"{plural}/{o['metadata']['name']}" for o in kube_api.state.list(rtype, "data", {})["items"]]
    return found


def writes(kube_api: KubeApiServer) -> int:
    return sum(1 for r in kube_api.requests if r.method in ("POST", "PUT", "PATCH", "DELETE"))


def test_backup_and_restore_through_jobs(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore, tmp_path: Path
) -> None:
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    driver = Neo4jBackupDriver(kube, job_timeout=5)
    manifest = catalog.run_backup(driver, datastore, "2026-11-22", password=PASSWORD)

    assert manifest.counts == {"nodes": 2000, "relationships": 5300}
    assert manifest.source_version == "neo4j 5.26.0"
    assert manifest.recovery_point.isoformat() == "2026-11-22T02:30:00+00:00"
    [artifact] = manifest.artifacts
    assert artifact.name == "neo4j.backup" and artifact.size == len(GRAPH)
    assert artifact.sha256 == hashlib.sha256(GRAPH).hexdigest() and catalog.verify_artifacts(manifest) == []
    backup_job = controller.jobs[0]
    admin = backup_job["spec"]["template"]["spec"]["initContainers"][0]
    assert "neo4j-admin database backup --from=\"$BACKUP_ADDRESS\" --to-path=/work" in admin["command"][-1]
    assert JobController.env(admin)["BACKUP_ADDRESS"] == "onto-neo4j-admin.data.svc.cluster.local:6362"
    assert PASSWORD not in json.dumps(backup_job) and PASSWORD not in manifest.to_json().decode()
    assert controller.secrets_seen and controller.secrets_seen[0]["metadata"]["name"] == backup_job["metadata"]["name"]
    assert leftovers(kube_api) == []

    with driver.restore(manifest, store, datastore.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
        [query] = restored.run_queries(["MATCH (c:Concept) RETURN count(c)"])
        assert query.ok and query.value == 2000
        assert not restored.run_queries(["MATCH (n) RETURN 1"])[0].ok
    restore_job = controller.jobs[1]
    neo4j = restore_job["spec"]["template"]["spec"]["containers"][0]
    assert JobController.env(neo4j)["DATABASE"] == "restoretest"
    assert JobController.env(neo4j)["VERIFY_CYPHER"] == "MATCH (c:Concept) RETURN count(c)"
    assert leftovers(kube_api) == []


def test_a_backup_leaves_nothing_outside_its_catalog_prefix_so_it_needs_no_expire(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore
) -> None:
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    manifest = catalog.run_backup(Neo4jBackupDriver(kube, job_timeout=5), datastore, "2026-11-22", password=PASSWORD)

    prefix = catalog.prefix(manifest.partition, manifest.backup_id)
    assert sorted(o.key for o in store.list("")) == [f"{prefix}manifest.json", f"{prefix}neo4j.backup"]
    assert leftovers(kube_api) == []
    assert not hasattr(Neo4jBackupDriver, "expire")


def test_failed_job_reports_its_reason_and_log_tail(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore
) -> None:
    controller.fail_step = "neo4j-admin"
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    with pytest.raises(BackupError, match=r"failed \(BackoffLimitExceeded: .*neo4j-admin: ERROR: Failed to connect"):
        catalog.run_backup(Neo4jBackupDriver(kube, job_timeout=5), datastore, "2026-11-22", password=PASSWORD)
    assert catalog.latest() is None and list(store.list("backups/")) == []
    assert leftovers(kube_api) == []


def test_job_that_never_finishes_times_out_and_is_deleted(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore
) -> None:
    controller.never_finish = True
    datastore = spec()
    with pytest.raises(BackupError, match=r"did not finish within 1 s; it was deleted"):
        BackupCatalog(store, datastore.name).run_backup(
            Neo4jBackupDriver(kube, job_timeout=1, wait_grace=0), datastore, "2026-11-22", password=PASSWORD)
    assert leftovers(kube_api) == []


def test_corrupt_upload_is_detected(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore
) -> None:
    controller.report_wrong_sha = True
    datastore = spec()
    catalog = BackupCatalog(store, datastore.name)
    with pytest.raises(BackupError, match="the upload is corrupt"):
        catalog.run_backup(Neo4jBackupDriver(kube, job_timeout=5), datastore, "2026-11-22", password=PASSWORD)
    assert catalog.latest() is None and list(store.list("backups/")) == []


def test_local_store_is_refused_with_the_setting_to_use(
    kube: KubernetesClient, kube_api: KubeApiServer, tmp_path: Path
) -> None:
    datastore = spec()
    with pytest.raises(BackupError, match="configure an S3 store \\(OPS_BACKUP_BUCKET\\)"):
        BackupCatalog(LocalObjectStore(tmp_path), datastore.name).run_backup(
            Neo4jBackupDriver(kube), datastore, "2026-11-22")
    assert writes(kube_api) == 1  # the namespace of the fixture, nothing else


def test_dump_needs_the_data_claim_and_mounts_it(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore
) -> None:
    datastore = spec("dump")
    catalog = BackupCatalog(store, datastore.name)
    with pytest.raises(BackupError, match="needs the data volume claim of the stopped server"):
        catalog.run_backup(Neo4jBackupDriver(kube, method="dump"), datastore, "2026-11-22")
    controller.admin_report = {"version": "neo4j 5.26.0"}
    manifest = catalog.run_backup(Neo4jBackupDriver(kube, method="dump", data_claim="data-onto-neo4j-0",
                                                    job_timeout=5), datastore, "2026-11-22")
    assert manifest.artifacts[0].name == "neo4j.dump" and manifest.counts == {}
    assert manifest.restore["format"] == "neo4j-dump"
    volumes = controller.jobs[0]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "data-onto-neo4j-0"}} in volumes


def test_restore_into_the_source_database_is_refused_before_any_write(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore, tmp_path: Path
) -> None:
    datastore = spec()
    manifest = BackupCatalog(store, datastore.name).run_backup(
        Neo4jBackupDriver(kube, job_timeout=5), datastore, "2026-11-22", password=PASSWORD)
    before = writes(kube_api)
    for target, reason in (("neo4j", "is the source"), ("system", "not a scratch database name")):
        unsafe = RestoreTest(target={"url": "neo4j://onto-neo4j.data.svc.cluster.local:7687", "database": target})
        with pytest.raises(RestoreRefused, match=reason):
            with Neo4jBackupDriver(kube).restore(manifest, store, unsafe, tmp_path):
                pass
    assert writes(kube_api) == before


def test_corrupt_artifact_fails_the_restore_job_and_is_cleaned_up(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore, tmp_path: Path
) -> None:
    datastore = spec()
    manifest = BackupCatalog(store, datastore.name).run_backup(
        Neo4jBackupDriver(kube, job_timeout=5), datastore, "2026-11-22", password=PASSWORD)
    store.put_bytes(manifest.artifacts[0].key, b"bit rot")
    with pytest.raises(RestoreError, match=r"(?s)restore Job .* failed .*fetch: .*checksum did NOT match"):
        with Neo4jBackupDriver(kube, job_timeout=5).restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert leftovers(kube_api) == []


def test_body_failure_deletes_the_restore_job(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: JobController, store: S3ObjectStore, tmp_path: Path
) -> None:
    datastore = spec()
    driver = Neo4jBackupDriver(kube, job_timeout=5)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver, datastore, "2026-11-22", password=PASSWORD)
    with pytest.raises(RuntimeError, match="check failed"):
        with driver.restore(manifest, store, datastore.restore_test, tmp_path):
            raise RuntimeError("check failed")
    assert leftovers(kube_api) == []


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
