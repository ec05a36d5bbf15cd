"""Neo4j: ``neo4j-admin`` in a Kubernetes Job next to the servers (InfraSpec §7.1).

``neo4j-admin`` has to run in the cluster (the online backup listener, port
6362, is not exposed; a dump reads the store files), so the driver creates a
Job in ``neo4j.namespace`` and waits for it through the Kubernetes API:

- init container ``neo4j-admin`` (image ``neo4j.image``): method ``backup``
  counts nodes and relationships over Bolt (when a password is given; it is
  handed over in a Secret that lives as long as the Job), then runs
  ``neo4j-admin database backup --from=<backup_address> --to-path=/work
  <database>`` (Enterprise, online); method ``dump`` runs ``neo4j-admin
  database dump --to-path=/work <database>`` on the server's data volume
  (``data_claim``), which needs the database **stopped** and no counts;
- container ``upload`` (``uploader_image``, the AWS CLI): computes the
  artifact's sha256 and size and ``aws s3 cp``\\ s it to the artifact key of
  the backup in the S3 object store, with the store's SSE settings, through
  the Job's service account (IRSA: s3:PutObject/GetObject on the prefix,
  kms:GenerateDataKey when SSE-KMS).

Each step reports in its container termination message (JSON, at most 4 KiB);
a failing step's message falls back to its log tail
(``terminationMessagePolicy: FallbackToLogsOnError``). The driver then heads
the object, reads it back to check the sha256 the Job reported, and records
it. Hence: the object store must be S3 (a local directory store cannot be
reached from a pod), and the artifact transits the Job's emptyDir, so the
node needs free ephemeral storage of the size of the backup.

No ``expire``: a backup's only bytes are its artifact under the catalog's
prefix (the Job's emptyDir goes with its pod, Neo4j keeps no backup chain), so
the catalog deleting its artifacts is the whole of retention.

Restore test: a Job fetches the artifact (``aws s3 cp``, sha256 checked),
restores or loads it into ``restore_test.target.database`` of a throwaway
Neo4j started inside the Job's own pod, creates that database, counts nodes
and relationships and runs the ``verify_sql`` Cypher queries (each must
return one value), and reports them in its termination message. The live
servers are never written; cleaning up is deleting the Job and its pods.
The tests run the Jobs on a real API server (Job controller, garbage
collector) and play what runs in the pods; running neo4j-admin needs a cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops_platform.backups.base import (
    Artifact,
    BackupError,
    BackupJob,
    BackupOutcome,
    QueryResult,
    RestoreError,
    RestoreRefused,
    Verification,
    iter_chunks,
)
from ops_platform.backups.restore_target import target_is_source
from ops_platform.errors import OpsPlatformError
from ops_platform.resources.kubernetes import Condition, KubernetesClient, WaitTimeout, status_condition
from ops_platform.resources.object_store import ObjectStore, S3ObjectStore
from ops_platform.spec import Connection, RestoreTest

MANAGED_BY = {"app.kubernetes.io/managed-by": "ops-platform"}
BACKUP_ID_LABEL = "ops-platform/backup-id"
WORK = "/work"
_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
_DATABASE_NAME = re.compile(r"^[a-z][a-z0-9.-]{2,62}$")

COUNT_CYPHER = (
    'count() { cypher-shell -a "$NEO4J_URL" -u "$NEO4J_USER" -d "$1" --format plain "$2" | tail -n 1; }\n'
)
BACKUP_SCRIPT = COUNT_CYPHER + """set -eu
counts=''
if [ -n "${NEO4J_PASSWORD:-}" ]; then
  counts=$(printf '"nodes": %s, "relationships": %s, ' \\
    "$(count "$DATABASE" 'MATCH (n) RETURN count(n)')" "$(count "$DATABASE" 'MATCH ()-[r]->() RETURN count(r)')")
fi
neo4j-admin database backup --from="$BACKUP_ADDRESS" --to-path=/work --type=FULL "$DATABASE"
mv /work/"$DATABASE"-*.backup /work/artifact
printf '{%s"version": "%s"}' "$counts" "$(neo4j-admin --version)" > /dev/termination-log
"""
DUMP_SCRIPT = """set -eu
neo4j-admin database dump --to-path=/work "$DATABASE"
mv /work/"$DATABASE".dump /work/artifact
printf '{"version": "%s"}' "$(neo4j-admin --version)" > /dev/termination-log
"""
UPLOAD_SCRIPT = """set -eu
sha=$(sha256sum /work/artifact | cut -d ' ' -f 1)
size=$(stat -c %s /work/artifact)
aws s3 cp /work/artifact "$ARTIFACT_URL" --only-show-errors $SSE_ARGS
printf '{"sha256": "%s", "bytes": %s}' "$sha" "$size" > /dev/termination-log
"""
FETCH_SCRIPT = """set -eu
aws s3 cp "$ARTIFACT_URL" /work/artifact --only-show-errors
echo "$ARTIFACT_SHA256  /work/artifact" | sha256sum -c -
"""
RESTORE_SCRIPT = COUNT_CYPHER + """set -eu
if [ "$ARTIFACT_FORMAT" = neo4j-backup ]; then
  neo4j-admin database restore --from-path=/work/artifact --overwrite-destination=true "$DATABASE"
else
  mv /work/artifact /work/"$DATABASE".dump
  neo4j-admin database load --from-path=/work --overwrite-destination=true "$DATABASE"
fi
neo4j start
until cypher-shell -a "$NEO4J_URL" -d system 'RETURN 1' >/dev/null 2>&1; do sleep 1; done
cypher-shell -a "$NEO4J_URL" -d system "CREATE DATABASE \\`$DATABASE\\` IF NOT EXISTS WAIT"
results=''
while IFS= read -r query; do
  [ -n "$query" ] && results="$results${results:+, }$(count "$DATABASE" "$query")"
done <<EOF
$VERIFY_CYPHER
EOF
printf '{"nodes": %s, "relationships": %s, "queries": [%s]}' \\
  "$(count "$DATABASE" 'MATCH (n) RETURN count(n)')" "$(count "$DATABASE" 'MATCH ()-[r]->() RETURN count(r)')" \\
  "$results" > /dev/termination-log
neo4j stop
"""


def job_finished() -> Condition:
    return Condition(
        "have condition Complete=True or Failed=True",
        lambda obj: obj is not None
        and "True" in (status_condition(obj, "Complete"), status_condition(obj, "Failed")),
    )


@dataclass
class RestoredGraph:
    """A scratch database restored inside the restore Job's own, throwaway Neo4j; results from its report."""

    description: str
    report: dict[str, Any] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)  # the verify_sql the Job ran, in order

    def counts(self) -> dict[str, int]:
        return {key: int(self.report[key]) for key in ("nodes", "relationships") if key in self.report}

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        values = dict(zip(self.queries, self.report.get("queries") or [], strict=False))
        results = []
        for query in queries:
            if query in values:
                results.append(QueryResult(query, values[query], ok=True))
            else:
                results.append(QueryResult(query, None, ok=False,
                                           error="not run: only restore_test.verify_sql runs inside the restore Job"))
        return results


class Neo4jBackupDriver:
    """Backs up a datastore with ``engine: neo4j``, ``method: backup`` or ``dump``, through Jobs.

    ``service_account`` runs the Jobs (it needs S3 access to the backup
    prefix); ``data_claim`` is the PersistentVolumeClaim of the stopped
    server's data, needed by method ``dump`` only.
    """

    engine = "neo4j"

    def __init__(
        self,
        kube: KubernetesClient,
        *,
        method: str = "backup",
        uploader_image: str = "amazon/aws-cli:2.17.0",
        service_account: str = "ops-platform-backup",
        data_claim: str | None = None,
        job_timeout: float = 3600.0,
        wait_grace: float = 60.0,
    ) -> None:
        if method not in ("backup", "dump"):
            raise ValueError(f"neo4j backup method must be 'backup' or 'dump', not {method!r}")
        self.kube = kube
        self.method = method
        self.uploader_image = uploader_image
        self.service_account = service_account
        self.data_claim = data_claim
        self.job_timeout = job_timeout
        self.wait_grace = wait_grace  # beyond the Job's activeDeadlineSeconds, for the controller to mark it

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        options = datastore.neo4j
        if options is None:
            raise BackupError(f"datastore '{datastore.name}' needs a 'neo4j' section")
        store = _s3_store(job.store, BackupError)
        if datastore.method != self.method:
            raise BackupError(f"datastore '{datastore.name}' uses method {datastore.method}; this driver does "
                              f"{self.method}")
        if self.method == "dump" and not self.data_claim:
            raise BackupError(
                f"neo4j dump of '{datastore.name}' needs the data volume claim of the stopped server "
                "(driver setting data_claim); a dump cannot be taken from a running database"
            )
        database = datastore.connection.database or "neo4j"
        artifact = f"{database}.{'backup' if self.method == 'backup' else 'dump'}"
        key = job.artifact_key(artifact)
        name = _job_name("neo4j-backup", job.backup_id)
        namespace = options.namespace
        created: list[tuple[str, str]] = []
        try:
            if job.password:
                self.kube.apply(_password_secret(name, namespace, job.password))
                created.append(("v1", "Secret"))
            self.kube.apply(self._backup_job(name, namespace, job, options.image, options.backup_address,
                                             database, store.url(key), bool(job.password), _sse_args(store)))
            created.append(("batch/v1", "Job"))
            done, reports = self._run(name, namespace, BackupError, "backup")
            admin, upload = reports.get("neo4j-admin", {}), reports.get("upload", {})
            stored = store.head(key)
            if stored is None:
                raise BackupError(f"neo4j: backup Job {namespace}/{name} completed but {store.url(key)} is missing")
            digest = _sha256(store, key)
            if digest != upload.get("sha256") or stored.size != upload.get("bytes"):
                raise BackupError(
                    f"neo4j: {store.url(key)} holds {stored.size} bytes with sha256 {digest}, the Job uploaded "
                    f"{upload.get('bytes')} bytes with sha256 {upload.get('sha256')}: the upload is corrupt"
                )
        finally:
            self._delete(name, namespace, created)
        counts = {k: int(admin[k]) for k in ("nodes", "relationships") if k in admin}
        started = _timestamp((done.get("status") or {}).get("startTime"))
        return BackupOutcome(
            artifacts=(Artifact(artifact, key, stored.size, digest, stored.url, stored.encryption),),
            source_version=str(admin.get("version") or f"neo4j ({options.image})"),
            recovery_point=started or job.now().astimezone(UTC),
            restore={"format": f"neo4j-{self.method}", "artifact": artifact, "database": database,
                     "url": datastore.connection.url, "image": options.image, "namespace": namespace},
            counts=counts,
            details={"job": f"{namespace}/{name}", "backup_address": options.backup_address,
                     **({} if counts else {"counts": "none: no password for Bolt, or a dump of a stopped database"})},
        )

    def verify(self, manifest: Any, store: ObjectStore) -> Verification:
        """Nothing beyond the catalog's checksum: checking the store files needs neo4j-admin (`database check`)."""
        return Verification(True, (), {"checked": "sha256 by the catalog"})

    @contextmanager
    def restore(
        self, manifest: Any, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> Iterator[RestoredGraph]:
        restore = manifest.restore
        source = Connection(url=restore.get("url"), database=restore["database"])
        target = restore_test.target.database
        if not target or not _DATABASE_NAME.match(target) or target == "system":
            raise RestoreRefused(
                f"restore_test.target.database {target!r} is not a scratch database name "
                "(3-63 lowercase letters, digits, '.', '-'; not 'system')"
            )
        reason = target_is_source(source, RestoreTest(target=Connection(url=restore_test.target.url or source.url,
                                                                       database=target)),
                                  separation="database")
        if reason:
            raise RestoreRefused(f"neo4j restore refused before writing anything: {reason}")
        s3 = _s3_store(store, RestoreError)
        [artifact] = manifest.artifact_list()
        namespace = restore["namespace"]
        name = _job_name("neo4j-restore", manifest.backup_id)
        restored = RestoredGraph(f"neo4j database {target} in the throwaway server of Job {namespace}/{name}",
                                 queries=list(restore_test.verify_sql))
        created: list[tuple[str, str]] = []
        try:
            self.kube.apply(self._restore_job(name, namespace, manifest.backup_id, restore, target,
                                              s3.url(artifact.key), artifact.sha256, restore_test.verify_sql))
            created.append(("batch/v1", "Job"))
            _, reports = self._run(name, namespace, RestoreError, "restore")
            restored.report = reports.get("restore", {})
            yield restored
        finally:
            self._delete(name, namespace, created)

    def _run(
        self, name: str, namespace: str, error: type[OpsPlatformError], what: str
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        try:
            done = self.kube.wait_for("batch/v1", "Job", name, namespace, job_finished(),
                                      timeout=self.job_timeout + self.wait_grace)
        except WaitTimeout:
            raise error(f"neo4j: {what} Job {namespace}/{name} did not finish within {self.job_timeout:g} s; "
                        "it was deleted") from None
        assert done is not None
        messages = self._termination_messages(name, namespace)
        if status_condition(done, "Complete") != "True":
            failed = next(c for c in done["status"]["conditions"] if c.get("type") == "Failed")
            steps = "; ".join(f"{step}: {text[-800:]}" for step, text in messages.items() if text)
            raise error(
                f"neo4j: {what} Job {namespace}/{name} failed ({failed.get('reason')}: {failed.get('message')})"
                + (f" - {steps}" if steps else "")
            )
        reports = {}
        for step, text in messages.items():
            try:
                reports[step] = json.loads(text) if text else {}
            except ValueError:
                raise error(f"neo4j: {what} Job {namespace}/{name} step {step} reported {text[:200]!r}, "
                            "not JSON") from None
        return done, reports

    def _termination_messages(self, name: str, namespace: str) -> dict[str, str]:
        messages: dict[str, str] = {}
        for pod in self.kube.list("v1", "Pod", namespace, label_selector=f"job-name={name}"):
            status = pod.get("status") or {}
            for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
                terminated = ((container.get("state") or {}).get("terminated")) or {}
                if terminated:
                    messages[container["name"]] = terminated.get("message") or ""
        return messages

    def _delete(self, name: str, namespace: str, created: list[tuple[str, str]]) -> None:
        """Jobs deleted through batch/v1 keep their pods (its default propagation is orphan): delete those too."""
        for api_version, kind in reversed(created):
            self.kube.delete(api_version, kind, name, namespace)
        if ("batch/v1", "Job") in created:
            for pod in self.kube.list("v1", "Pod", namespace, label_selector=f"job-name={name}"):
                self.kube.delete("v1", "Pod", pod["metadata"]["name"], namespace)

    def _backup_job(
        self, name: str, namespace: str, job: BackupJob, image: str, backup_address: str, database: str,
        artifact_url: str, with_password: bool, sse_args: str,
    ) -> dict[str, Any]:
        connection = job.datastore.connection
        env = [{"name": "DATABASE", "value": database}, {"name": "BACKUP_ADDRESS", "value": backup_address},
               {"name": "NEO4J_URL", "value": connection.url or ""},
               {"name": "NEO4J_USER", "value": connection.user or "neo4j"}]
        if with_password:
            env.append({"name": "NEO4J_PASSWORD",
                        "valueFrom": {"secretKeyRef": {"name": name, "key": "NEO4J_PASSWORD"}}})
        volumes: list[dict[str, Any]] = [{"name": "work", "emptyDir": {}}]
        mounts = [{"name": "work", "mountPath": WORK}]
        if self.method == "dump":
            volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": self.data_claim}})
            mounts.append({"name": "data", "mountPath": "/data"})
        admin = _container("neo4j-admin", image, BACKUP_SCRIPT if self.method == "backup" else DUMP_SCRIPT,
                           env, mounts)
        upload = _container("upload", self.uploader_image, UPLOAD_SCRIPT,
                            [{"name": "ARTIFACT_URL", "value": artifact_url}, {"name": "SSE_ARGS", "value": sse_args}],
                            [{"name": "work", "mountPath": WORK}])
        return self._job(name, namespace, job.backup_id, [admin], [upload], volumes)

    def _restore_job(
        self, name: str, namespace: str, backup_id: str, restore: dict[str, Any], database: str,
        artifact_url: str, sha256: str, verify_cypher: list[str],
    ) -> dict[str, Any]:
        mounts = [{"name": "work", "mountPath": WORK}]
        fetch = _container("fetch", self.uploader_image, FETCH_SCRIPT,
                           [{"name": "ARTIFACT_URL", "value": artifact_url},
                            {"name": "ARTIFACT_SHA256", "value": sha256}], mounts)
        neo4j = _container("restore", restore["image"], RESTORE_SCRIPT, [
            {"name": "DATABASE", "value": database},
            {"name": "ARTIFACT_FORMAT", "value": restore["format"]},
            {"name": "NEO4J_URL", "value": "neo4j://localhost:7687"},
            {"name": "NEO4J_USER", "value": "neo4j"},
            {"name": "NEO4J_AUTH", "value": "none"},
            {"name": "NEO4J_ACCEPT_LICENSE_AGREEMENT", "value": "yes"},
            {"name": "VERIFY_CYPHER", "value": "\n".join(q.replace("\n", " ") for q in verify_cypher)},
        ], mounts)
        return self._job(name, namespace, backup_id, [fetch], [neo4j],
                         [{"name": "work", "emptyDir": {}}])

    def _job(
        self, name: str, namespace: str, backup_id: str, init: list[dict[str, Any]], main: list[dict[str, Any]],
        volumes: list[dict[str, Any]],
    ) -> dict[str, Any]:
        labels = {**MANAGED_BY, BACKUP_ID_LABEL: _NAME_CHARS.sub("-", backup_id.lower())[:63]}
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": int(self.job_timeout),
                "ttlSecondsAfterFinished": 86400,
                "template": {
                    # In the mesh of `data` (STRICT mTLS), with the proxy as a native sidecar: it
                    # starts before the init container and ends with the Job instead of holding it.
                    "metadata": {"labels": labels, "annotations": {"sidecar.istio.io/nativeSidecar": "true"}},
                    "spec": {"restartPolicy": "Never", "serviceAccountName": self.service_account,
                             "initContainers": init, "containers": main, "volumes": volumes},
                },
            },
        }


def _container(name: str, image: str, script: str, env: list[dict[str, Any]],
               mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "image": image, "command": ["/bin/sh", "-c", script], "env": env,
            "volumeMounts": mounts, "terminationMessagePolicy": "FallbackToLogsOnError"}


def _password_secret(name: str, namespace: str, password: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "stringData": {"NEO4J_PASSWORD": password}}


def _job_name(kind: str, backup_id: str) -> str:
    return f"{kind}-{_NAME_CHARS.sub('-', backup_id.lower())}"[:63].rstrip("-")


def _s3_store(store: ObjectStore, error: type[OpsPlatformError]) -> S3ObjectStore:
    if not isinstance(store, S3ObjectStore):
        raise error(
            f"neo4j: backups are written and read by a Job in the cluster, which cannot reach the object "
            f"store {store.url('x').removesuffix('/x')}; configure an S3 store (OPS_BACKUP_BUCKET)"
        )
    return store


def _sse_args(store: S3ObjectStore) -> str:
    if store.kms_key_id:
        return f"--sse aws:kms --sse-kms-key-id {shlex.quote(store.kms_key_id)}"
    if store.sse:
        return f"--sse {shlex.quote(store.sse)}"
    return ""


def _sha256(store: ObjectStore, key: str) -> str:
    digest = hashlib.sha256()
    with store.get(key) as stream:
        for chunk in iter_chunks(stream):
            digest.update(chunk)
    return digest.hexdigest()


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None
