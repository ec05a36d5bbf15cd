"""Velero: a Backup made from the template of the datastore's Schedule (infra plan §11.1).

Everything goes through the Kubernetes API (``velero.io/v1`` custom
resources); the bytes live in Velero's BackupStorageLocation. The catalog
stores ``backup.json``, the finished Backup object, as the checksummed record.

Backup: read Schedule ``velero.schedule`` in ``connection.namespace``, create
Backup ``<schedule>-ops-<backup_id>`` from its ``spec.template`` (labelled
``velero.io/schedule-name`` like the backups Velero makes itself, namespaces
narrowed to ``velero.included_namespaces`` when set), wait for a final phase.
Completed is a backup; Failed, PartiallyFailed and FailedValidation are not.
Counts: the data objects a restore test brings back (PersistentVolumeClaims,
ConfigMaps, Secrets, per namespace, as the template selects them), listed
just before the Backup is created; ``itemsBackedUp`` is in the details.

Expire (retention drops the backup): what ``velero backup delete`` does, a
DeleteBackupRequest in the Velero namespace (label ``velero.io/backup-name``,
``spec.backupName``), so Velero itself removes the backup's files from the
BackupStorageLocation, its volume snapshots and its Restores, then the Backup.
The driver waits ``delete_timeout`` for Velero to process the request and the
Backup to disappear, and reports Velero's errors or what it still waits for.
A Backup already gone (its ``ttl`` expired first) counts as expired.

Restore test: data only, into fenced scratch namespaces. Every backed-up
namespace is mapped to a scratch namespace (``namespaceMapping``): one
namespace goes to ``restore_test.target.namespace``; several go to
``<rename_prefix><ns>`` or, without a prefix, ``<target.namespace>-<ns>``.
The driver creates the scratch namespaces (labelled; one that exists without
the label is refused, it would be deleted afterwards) and in each a
NetworkPolicy denying all ingress and egress, BEFORE it creates the Restore.
The Restore brings back only data (``includedResources``: PersistentVolumeClaims
and their PersistentVolumes, ConfigMaps, Secrets): no Deployment, StatefulSet,
Job or CronJob that would start production-connected processes, no Ingress
answering for a production host, no Certificate, ExternalSecret or operator
object (a CloudNativePG Cluster archiving into the production stanza). It
never overwrites what exists (no ``existingResourcePolicy``). The only
cluster-scoped objects it may write are PersistentVolumes of the claims it
restores, which Velero renames when the original exists; the shipped schedule
backs up no cluster resources, so restored claims are provisioned anew. On
exit the Restore and the scratch namespaces are deleted.

Limits: volume contents are not checked. A Backup that times out cannot be
cancelled through the API; it is left to Velero and the message says so.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
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
)
from ops_platform.backups.restore_target import VELERO_DATA_KINDS, scratch_namespaces
from ops_platform.errors import OpsPlatformError
from ops_platform.resources.kubernetes import (
    Condition,
    KindNotServed,
    KubernetesClient,
    WaitTimeout,
    deleted,
    describe,
)
from ops_platform.resources.object_store import ObjectStore
from ops_platform.spec import Datastore, RestoreTest

VELERO_API = "velero.io/v1"
BACKUP_ARTIFACT = "backup.json"
SCHEDULE_LABEL = "velero.io/schedule-name"
BACKUP_NAME_LABEL = "velero.io/backup-name"
BACKUP_UID_LABEL = "velero.io/backup-uid"
BACKUP_ID_LABEL = "ops-platform/backup-id"
RESTORE_TEST_LABEL = "ops-platform/restore-test"
DONE_PHASES = ("Completed", "Failed", "PartiallyFailed", "FailedValidation")
EXCLUDE_LABEL = "velero.io/exclude-from-backup"
SCRATCH_POLICY = "ops-restore-test-deny-all"
# The namespaced data a restore test brings back and counts (PersistentVolumes are cluster-scoped).
COUNTED_RESOURCES = ("persistentvolumeclaims", "configmaps", "secrets")
# What the cluster itself puts in every namespace, a scratch one included, whatever Velero restores: the
# root CA publisher's ConfigMap and (before Kubernetes 1.24) the service accounts' token Secrets.
ROOT_CA_CONFIGMAP = "kube-root-ca.crt"
SERVICE_ACCOUNT_TOKEN = "kubernetes.io/service-account-token"


def finished() -> Condition:
    return Condition(
        f"reach a final phase ({', '.join(DONE_PHASES)})",
        lambda obj: obj is not None and (obj.get("status") or {}).get("phase") in DONE_PHASES,
    )


def processed() -> Condition:
    """A DeleteBackupRequest Velero has finished with; it removes the request itself after a clean deletion."""
    return Condition(
        "be processed by Velero (phase Processed)",
        lambda obj: obj is None or (obj.get("status") or {}).get("phase") == "Processed",
    )


@dataclass
class RestoredNamespaces:
    """Backed-up namespaces restored into scratch namespaces."""

    kube: KubernetesClient
    velero_namespace: str
    restore_name: str
    mapping: dict[str, str]  # source namespace -> scratch namespace
    description: str
    restore: dict[str, Any] = field(default_factory=dict)
    counted: tuple[str, ...] | None = None  # resources the backup counted; None: a manifest of before they were

    def counts(self) -> dict[str, int]:
        """The restored data objects, under their source namespace's name (the backup's counts)."""
        if self.counted is None:
            progress = (self.restore.get("status") or {}).get("progress") or {}
            return {"items": int(progress.get("itemsRestored", 0))}
        return {f"{resource}:{source}": count
                for source, scratch in self.mapping.items()
                for resource, count in data_counts(self.kube, scratch, self.counted).items()}

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        """``verify_keys`` name objects that must exist after the restore:
        ``<apiVersion> <Kind> <source namespace>/<name>``, e.g. ``apps/v1 Deployment ontology-editor/onto-backend``;
        each is looked up in the scratch namespace its namespace maps to."""
        results = []
        for query in queries:
            try:
                api_version, kind, where = query.split()
                source_namespace, name = where.split("/", 1)
            except ValueError:
                results.append(QueryResult(query, None, ok=False,
                                           error="expected '<apiVersion> <Kind> <namespace>/<name>'"))
                continue
            scratch = self.mapping.get(source_namespace)
            if scratch is None:
                results.append(QueryResult(query, None, ok=False,
                                           error=f"namespace {source_namespace} is not in the backup"))
                continue
            try:
                found = self.kube.get(api_version, kind, name, scratch) is not None
            except OpsPlatformError as error:
                results.append(QueryResult(query, None, ok=False, error=str(error)))
                continue
            results.append(QueryResult(query, found, ok=found,
                                       error=None if found else f"{kind} {scratch}/{name} was not restored"))
        return results


class VeleroBackupDriver:
    """Backs up a datastore with ``engine: velero``, ``method: velero`` through the Kubernetes API."""

    engine = "velero"
    method = "velero"

    def __init__(
        self,
        kube: KubernetesClient,
        *,
        backup_timeout: float = 3600.0,
        restore_timeout: float = 3600.0,
        namespace_timeout: float = 300.0,
        delete_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.backup_timeout = backup_timeout
        self.restore_timeout = restore_timeout
        self.namespace_timeout = namespace_timeout
        self.delete_timeout = delete_timeout
        self.clock = clock

    def backup(self, job: BackupJob) -> BackupOutcome:
        datastore = job.datastore
        options = datastore.velero
        velero_namespace = datastore.connection.namespace
        if options is None or velero_namespace is None:
            raise BackupError(f"datastore '{datastore.name}' needs connection.namespace and a 'velero' section")
        schedule = self.kube.get(VELERO_API, "Schedule", options.schedule, velero_namespace)
        if schedule is None:
            raise BackupError(
                f"velero: no Schedule '{options.schedule}' in namespace {velero_namespace} at {self.kube.host} "
                f"(check velero.schedule and connection.namespace of datastore '{datastore.name}')"
            )
        template = dict((schedule.get("spec") or {}).get("template") or {})
        if options.included_namespaces:
            template["includedNamespaces"] = list(options.included_namespaces)
        name = backup_name(options.schedule, job.backup_id)
        counted = counted_resources(template)
        counts = {f"{resource}:{namespace}": count
                  for namespace in template.get("includedNamespaces") or [] if namespace != "*"
                  for resource, count in data_counts(self.kube, namespace, counted, _selector(template)).items()}
        self.kube.apply({
            "apiVersion": VELERO_API,
            "kind": "Backup",
            "metadata": {
                "name": name,
                "namespace": velero_namespace,
                "labels": {SCHEDULE_LABEL: options.schedule, BACKUP_ID_LABEL: job.backup_id.lower()},
            },
            "spec": template,
        })
        try:
            done = self.kube.wait_for(VELERO_API, "Backup", name, velero_namespace, finished(),
                                      timeout=self.backup_timeout)
        except WaitTimeout:
            raise BackupError(
                f"velero: Backup {velero_namespace}/{name} did not finish within {self.backup_timeout:g} s; "
                f"Velero may still complete it (`velero backup describe {name}`, "
                f"`velero backup delete {name}` to drop it)"
            ) from None
        assert done is not None
        status = done.get("status") or {}
        if status.get("phase") != "Completed":
            raise BackupError(f"velero: Backup {velero_namespace}/{name} ended {_outcome(status)}")
        stored = job.store.put_bytes(
            job.artifact_key(BACKUP_ARTIFACT),
            json.dumps(done, indent=2, sort_keys=True, default=str).encode(),
            content_type="application/json",
        )
        progress = status.get("progress") or {}
        annotations = (done.get("metadata") or {}).get("annotations") or {}
        kubernetes_version = annotations.get("velero.io/source-cluster-k8s-gitversion", "unknown")
        return BackupOutcome(
            artifacts=(Artifact.from_stored(BACKUP_ARTIFACT, stored),),
            source_version=f"velero backup format {status.get('formatVersion', '?')}, kubernetes {kubernetes_version}",
            recovery_point=_timestamp(status.get("startTimestamp")) or job.now().astimezone(UTC),
            restore={
                "format": "velero-backup",
                "backup_name": name,
                "velero_namespace": velero_namespace,
                "schedule": options.schedule,
                "included_namespaces": list(template.get("includedNamespaces") or []),
                "counted_resources": list(counted),
            },
            counts=counts,
            details={
                "backup": f"{velero_namespace}/{name}",
                "items_backed_up": progress.get("itemsBackedUp"),
                "counts_measured": "data objects listed just before the Backup was created",
                "total_items": progress.get("totalItems"),
                "warnings": status.get("warnings", 0),
                "expiration": status.get("expiration"),
                "storage_location": template.get("storageLocation"),
            },
        )

    def verify(self, manifest: Any, store: ObjectStore) -> Verification:
        """The Backup still exists in the cluster and is Completed."""
        restore = manifest.restore
        checked = {"backup": f"{restore['velero_namespace']}/{restore['backup_name']}"}
        try:
            found = self.kube.get(VELERO_API, "Backup", restore["backup_name"], restore["velero_namespace"])
        except OpsPlatformError as error:
            return Verification(False, (str(error),), checked)
        if found is None:
            return Verification(False, (f"velero Backup {checked['backup']} no longer exists (expired or deleted)",),
                                checked)
        phase = (found.get("status") or {}).get("phase")
        if phase != "Completed":
            return Verification(False, (f"velero Backup {checked['backup']} is {phase}, not Completed",), checked)
        return Verification(True, (), {**checked, "phase": phase})

    def expire(self, manifest: Any, store: ObjectStore) -> str:
        """Have Velero delete the Backup with its stored files and volume snapshots, as `velero backup delete`."""
        restore = manifest.restore
        namespace, name = restore["velero_namespace"], restore["backup_name"]
        backup = f"Backup {namespace}/{name}"
        deadline = self.clock() + self.delete_timeout
        try:
            found = self.kube.get(VELERO_API, "Backup", name, namespace)
            if found is None:
                return f"velero: {backup} was already gone (expired by its ttl or deleted); nothing to delete"
            request = delete_backup_request(name, namespace, (found.get("metadata") or {}).get("uid", ""))
            self.kube.apply(request)
            return self._await_deletion(backup, name, namespace, request["metadata"]["name"], deadline)
        except BackupError:
            raise
        except OpsPlatformError as error:
            raise BackupError(f"velero: could not delete {backup}: {error}") from None

    def _await_deletion(self, backup: str, name: str, namespace: str, request_name: str, deadline: float) -> str:
        request = describe(VELERO_API, "DeleteBackupRequest", request_name, namespace)
        try:
            done = self.kube.wait_for(VELERO_API, "DeleteBackupRequest", request_name, namespace, processed(),
                                      timeout=max(deadline - self.clock(), 0.0))
        except WaitTimeout:
            pending = self.kube.get(VELERO_API, "DeleteBackupRequest", request_name, namespace) or {}
            phase = (pending.get("status") or {}).get("phase")
            raise BackupError(
                f"velero: {backup} was not deleted within {self.delete_timeout:g} s: {request} is "
                f"{phase or 'not picked up yet (is the Velero server running?)'}; Velero may still finish it "
                f"(`kubectl -n {namespace} get deletebackuprequest {request_name} -o yaml`)"
            ) from None
        errors = [str(e) for e in ((done or {}).get("status") or {}).get("errors") or []]
        if errors == ["backup not found"]:
            return f"velero: {backup} was already gone when Velero processed {request}; nothing to delete"
        if errors:
            raise BackupError(
                f"velero: Velero could not delete {backup}: {'; '.join(errors)} ({request}; "
                f"`velero backup describe {name}` shows what is left)"
            )
        try:
            self.kube.wait_for(VELERO_API, "Backup", name, namespace, deleted(),
                               timeout=max(deadline - self.clock(), 0.0))
        except WaitTimeout:
            raise BackupError(
                f"velero: {backup} still exists {self.delete_timeout:g} s after Velero processed {request} "
                f"without errors (`velero backup describe {name}`)"
            ) from None
        return (f"velero: deleted {backup} with its files in the backup storage location and its volume "
                f"snapshots ({request})")

    @contextmanager
    def restore(
        self, manifest: Any, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> Iterator[RestoredNamespaces]:
        restore = manifest.restore
        velero_namespace = restore["velero_namespace"]
        mapping = scratch_namespaces(
            restore["included_namespaces"], velero_namespace, restore_test.target.namespace,
            restore_test.rename_prefix,
        )
        self._refuse_foreign_namespaces(mapping, manifest.datastore)
        restore_name = f"ops-restore-{manifest.backup_id.lower()}-{secrets.token_hex(3)}"
        counted = restore.get("counted_resources")
        restored = RestoredNamespaces(
            self.kube, velero_namespace, restore_name, mapping,
            f"velero restore {restore['backup_name']} (data only) into namespaces {', '.join(mapping.values())}",
            counted=None if counted is None else tuple(counted),
        )
        try:
            for scratch in mapping.values():
                self.kube.apply({"apiVersion": "v1", "kind": "Namespace",
                                 "metadata": {"name": scratch, "labels": {RESTORE_TEST_LABEL: manifest.datastore}}})
            for scratch in mapping.values():  # fenced before anything is restored into it
                self.kube.apply(scratch_network_policy(scratch, manifest.datastore))
            self.kube.apply({
                "apiVersion": VELERO_API,
                "kind": "Restore",
                "metadata": {"name": restore_name, "namespace": velero_namespace,
                             "labels": {RESTORE_TEST_LABEL: manifest.datastore}},
                "spec": {
                    "backupName": restore["backup_name"],
                    "includedNamespaces": list(mapping),
                    "namespaceMapping": mapping,
                    "includedResources": list(VELERO_DATA_KINDS),
                },
            })
            try:
                done = self.kube.wait_for(VELERO_API, "Restore", restore_name, velero_namespace, finished(),
                                          timeout=self.restore_timeout)
            except WaitTimeout:
                raise RestoreError(
                    f"velero: Restore {velero_namespace}/{restore_name} did not finish within "
                    f"{self.restore_timeout:g} s; it and the scratch namespaces were deleted"
                ) from None
            assert done is not None
            status = done.get("status") or {}
            if status.get("phase") != "Completed":
                raise RestoreError(f"velero: Restore {velero_namespace}/{restore_name} ended {_outcome(status)}")
            restored.restore = done
            yield restored
        finally:
            self._cleanup(restored)

    def preflight(self, datastore: Datastore) -> list[str]:
        """Live checks of a restore test before it starts (see :mod:`ops_platform.backups.preflight`).

        The Schedule exists and names its namespaces, their scratch namespaces
        are not live, system or foreign ones, and the cluster serves
        NetworkPolicy (the fence of the scratch namespaces).
        """
        options, restore_test = datastore.velero, datastore.restore_test
        velero_namespace = datastore.connection.namespace
        assert options is not None and restore_test is not None and velero_namespace is not None
        schedule = self.kube.get(VELERO_API, "Schedule", options.schedule, velero_namespace)
        if schedule is None:
            return [f"velero.schedule: no Schedule '{options.schedule}' in namespace {velero_namespace} at "
                    f"{self.kube.host} (check velero.schedule and connection.namespace)"]
        template = (schedule.get("spec") or {}).get("template") or {}
        included = list(options.included_namespaces or template.get("includedNamespaces") or [])
        try:
            mapping = scratch_namespaces(included, velero_namespace, restore_test.target.namespace,
                                         restore_test.rename_prefix)
        except RestoreRefused as refused:
            return [f"restore_test.target.namespace: {refused}"]
        problems = []
        for scratch in mapping.values():
            existing = self.kube.get("v1", "Namespace", scratch)
            labels = ((existing or {}).get("metadata") or {}).get("labels") or {}
            if existing is not None and labels.get(RESTORE_TEST_LABEL) != datastore.name:
                problems.append(f"restore_test.target.namespace: scratch namespace {scratch} exists and was not made "
                                f"by a restore test of '{datastore.name}'; the restore test would delete it: pick "
                                "another restore_test.target.namespace or rename_prefix")
        try:
            self.kube.kind("networking.k8s.io/v1", "NetworkPolicy")
        except KindNotServed as error:
            problems.append(f"{error}: the scratch namespaces cannot be fenced off the network")
        return problems

    def _refuse_foreign_namespaces(self, mapping: dict[str, str], datastore: str) -> None:
        """Refuse before any write if a scratch namespace is someone else's; then delete the ones an earlier
        restore test left (Terminating ones included: deletion finishes in the background) and wait for all."""
        leftovers = []
        for scratch in mapping.values():
            existing = self.kube.get("v1", "Namespace", scratch)
            if existing is None:
                continue
            labels = (existing.get("metadata") or {}).get("labels") or {}
            if labels.get(RESTORE_TEST_LABEL) != datastore:
                raise RestoreRefused(
                    f"scratch namespace {scratch} already exists and was not made by a restore test of "
                    f"'{datastore}' (no label {RESTORE_TEST_LABEL}={datastore}); refusing to restore into it, "
                    "since the restore test deletes its scratch namespaces (check restore_test.target.namespace)"
                )
            leftovers.append(scratch)
        for scratch in leftovers:
            self.kube.delete("v1", "Namespace", scratch)
        deadline = self.clock() + self.namespace_timeout
        for scratch in leftovers:
            try:
                self.kube.wait_for("v1", "Namespace", scratch, None, deleted(),
                                   timeout=max(deadline - self.clock(), 0.0))
            except WaitTimeout:
                raise RestoreError(
                    f"velero: leftover scratch namespace {scratch} is still terminating after "
                    f"{self.namespace_timeout:g} s (`kubectl get namespace {scratch} -o yaml` shows what holds it: "
                    "its finalizers and status.conditions)"
                ) from None

    def _cleanup(self, restored: RestoredNamespaces) -> None:
        problems = []
        for api_version, kind, name, namespace in [
            (VELERO_API, "Restore", restored.restore_name, restored.velero_namespace),
            *(("v1", "Namespace", scratch, None) for scratch in restored.mapping.values()),
        ]:
            try:
                self.kube.delete(api_version, kind, name, namespace)
            except OpsPlatformError as error:
                problems.append(str(error))
        if problems:
            raise RestoreError(f"velero: cleanup of the restore test failed: {'; '.join(problems)}")


def backup_name(schedule: str, backup_id: str) -> str:
    return f"{schedule}-ops-{backup_id.lower()}"


def delete_backup_request(backup: str, namespace: str, uid: str) -> dict[str, Any]:
    """The DeleteBackupRequest `velero backup delete` creates (its generateName, spelled out for apply)."""
    return {
        "apiVersion": VELERO_API,
        "kind": "DeleteBackupRequest",
        "metadata": {
            "name": f"{backup[:240]}-{secrets.token_hex(3)}",
            "namespace": namespace,
            "labels": {BACKUP_NAME_LABEL: velero_label(backup), BACKUP_UID_LABEL: uid},
        },
        "spec": {"backupName": backup},
    }


def velero_label(name: str) -> str:
    """Velero's ``label.GetValidName``: a name longer than a label value ends in 6 hex digits of its sha256."""
    if len(name) <= 63:
        return name
    return name[:57] + hashlib.sha256(name.encode()).hexdigest()[:6]


def scratch_network_policy(namespace: str, datastore: str) -> dict[str, Any]:
    """No traffic into or out of a scratch namespace's pods: restored data reaches nothing, nothing reaches it."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": SCRATCH_POLICY, "namespace": namespace, "labels": {RESTORE_TEST_LABEL: datastore}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }


def counted_resources(template: dict[str, Any]) -> tuple[str, ...]:
    """The data resources a backup of ``template`` holds: :data:`COUNTED_RESOURCES` less what it filters out."""
    included = {str(r).split(".")[0] for r in template.get("includedResources") or ["*"]}
    excluded = {str(r).split(".")[0] for r in template.get("excludedResources") or []}
    return tuple(r for r in COUNTED_RESOURCES if ("*" in included or r in included) and r not in excluded)


def data_counts(
    kube: KubernetesClient, namespace: str, resources: tuple[str, ...], label_selector: str | None = None
) -> dict[str, int]:
    """How many of each data resource ``namespace`` holds that Velero backs up (not labelled excluded),
    leaving out what the cluster makes in every namespace: a scratch namespace has those too, restored or not."""
    listed = {
        "persistentvolumeclaims": lambda: kube.list("v1", "PersistentVolumeClaim", namespace,
                                                    label_selector=label_selector),
        "configmaps": lambda: kube.list("v1", "ConfigMap", namespace, label_selector=label_selector),
        "secrets": lambda: kube.list("v1", "Secret", namespace, label_selector=label_selector),
    }
    return {resource: sum(1 for obj in listed[resource]()
                          if ((obj.get("metadata") or {}).get("labels") or {}).get(EXCLUDE_LABEL) != "true"
                          and not _made_by_the_cluster(resource, obj))
            for resource in resources}


def _made_by_the_cluster(resource: str, obj: dict[str, Any]) -> bool:
    if resource == "configmaps":
        return (obj.get("metadata") or {}).get("name") == ROOT_CA_CONFIGMAP
    return resource == "secrets" and obj.get("type") == SERVICE_ACCOUNT_TOKEN


def _selector(template: dict[str, Any]) -> str | None:
    labels = (template.get("labelSelector") or {}).get("matchLabels") or {}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or None


def _outcome(status: dict[str, Any]) -> str:
    parts = [str(status.get("phase"))]
    if status.get("failureReason"):
        parts.append(f"failure reason: {status['failureReason']}")
    if status.get("validationErrors"):
        parts.append(f"validation errors: {'; '.join(status['validationErrors'])}")
    parts.append(f"{status.get('errors', 0)} errors, {status.get('warnings', 0)} warnings")
    return " - ".join(parts) + " (see `velero backup logs` / `velero restore logs`)"


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None
