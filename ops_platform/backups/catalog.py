"""Where a datastore's backups live in the object store, which is the latest, what to prune.

Layout: ``backups/<datastore>/<partition>/<backup_id>/<artifact>`` with
``manifest.json`` beside the artifacts, written last. A backup is committed
when its manifest exists; a failed backup has none, so the previous one stays
the latest, and its leftovers are removed by the driver or, later, by
:meth:`BackupCatalog.prune`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from ops_platform.backups.base import (
    BackupDriver,
    BackupError,
    BackupJob,
    BackupOutcome,
    iter_chunks,
)
from ops_platform.backups.manifest import (
    MANIFEST_NAME,
    BackupManifest,
    ManifestError,
    parse_manifest,
)
from ops_platform.resources.object_store import ObjectNotFound, ObjectStore
from ops_platform.spec import Datastore, Retention

log = logging.getLogger(__name__)

BACKUPS_PREFIX = "backups"
# A backup directory without a manifest this old is a failed run's leftover.
ORPHAN_AGE = timedelta(days=1)


def new_backup_id(now: datetime) -> str:
    """Sorts in time order: ``20261122T020000Z-3f9a1c``."""
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class CatalogListing:
    manifests: list[BackupManifest]  # newest first
    garbled: list[ManifestError]
    orphans: list[str]  # backup prefixes with artifacts and no manifest


@dataclass(frozen=True)
class RetentionPlan:
    keep: list[BackupManifest]
    delete: list[BackupManifest]
    reasons: dict[str, str] = field(default_factory=dict)  # backup_id -> why kept


class BackupCatalog:
    """The backups of one datastore in one object store."""

    def __init__(self, store: ObjectStore, datastore: str) -> None:
        self.store = store
        self.datastore = datastore
        self.root = f"{BACKUPS_PREFIX}/{datastore}/"

    def prefix(self, partition: str, backup_id: str) -> str:
        return f"{self.root}{partition}/{backup_id}/"

    def manifest_key(self, partition: str, backup_id: str) -> str:
        return f"{self.prefix(partition, backup_id)}{MANIFEST_NAME}"

    def run_backup(
        self,
        driver: BackupDriver,
        datastore: Datastore,
        partition: str,
        *,
        password: str | None = None,
        work_dir: Path | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> BackupManifest:
        """Take one backup with ``driver`` and commit it; on failure nothing is committed."""
        started_at = now()
        backup_id = new_backup_id(started_at)
        prefix = self.prefix(partition, backup_id)
        job = BackupJob(
            datastore=datastore,
            store=self.store,
            partition=partition,
            backup_id=backup_id,
            prefix=prefix,
            password=password,
            work_dir=work_dir,
            now=now,
        )
        try:
            outcome = driver.backup(job)
            return self.commit(job, outcome, started_at, now())
        except BaseException as failure:
            try:
                self._discard(prefix)
            except Exception as cleanup_error:  # the store may be what failed; keep the first error
                log.warning("could not remove %s after a failed backup: %s", prefix, cleanup_error)
                failure.add_note(f"leftovers under {prefix} are removed by a later prune")
            raise

    def commit(
        self, job: BackupJob, outcome: BackupOutcome, started_at: datetime, finished_at: datetime
    ) -> BackupManifest:
        for artifact in outcome.artifacts:
            if not artifact.key.startswith(job.prefix):
                raise BackupError(
                    f"driver wrote artifact {artifact.key} outside its backup prefix {job.prefix}"
                )
        manifest = BackupManifest.build(
            backup_id=job.backup_id,
            datastore=job.datastore.name,
            engine=job.datastore.engine,
            method=job.datastore.method,
            partition=job.partition,
            started_at=started_at,
            finished_at=finished_at,
            recovery_point=outcome.recovery_point,
            artifacts=outcome.artifacts,
            source_version=outcome.source_version,
            restore=outcome.restore,
            counts=outcome.counts,
            details=outcome.details,
            source_bytes=outcome.source_bytes,
            **({"bytes": outcome.stored_bytes} if outcome.stored_bytes is not None else {}),
        )
        self.store.put_bytes(
            self.manifest_key(job.partition, job.backup_id),
            manifest.to_json(),
            content_type="application/json",
        )
        return manifest

    def listing(self) -> CatalogListing:
        manifests: list[BackupManifest] = []
        garbled: list[ManifestError] = []
        prefixes: set[str] = set()
        committed: set[str] = set()
        for stored in self.store.list(self.root):
            relative = stored.key[len(self.root):]
            parts = relative.split("/")
            if len(parts) < 3:
                continue
            backup_prefix = f"{self.root}{parts[0]}/{parts[1]}/"
            prefixes.add(backup_prefix)
            if parts[2] != MANIFEST_NAME or len(parts) != 3:
                continue
            committed.add(backup_prefix)
            try:
                manifests.append(self.read_manifest(stored.key))
            except ManifestError as error:
                garbled.append(error)
        manifests.sort(key=lambda m: (m.finished_at, m.backup_id), reverse=True)
        return CatalogListing(manifests, garbled, sorted(prefixes - committed))

    def read_manifest(self, key: str) -> BackupManifest:
        url = self.store.url(key)
        try:
            raw = self.store.get_bytes(key)
        except ObjectNotFound:
            raise ManifestError(url, "missing (the backup was never committed)") from None
        manifest = parse_manifest(raw, url)
        if manifest.datastore != self.datastore:
            raise ManifestError(url, f"belongs to datastore {manifest.datastore!r}, not {self.datastore!r}")
        return manifest

    def latest(self) -> BackupManifest | None:
        """The newest committed backup whose manifest reads; garbled ones are passed over."""
        listing = self.listing()
        return listing.manifests[0] if listing.manifests else None

    def latest_in_partition(self, partition: str) -> BackupManifest | None:
        for manifest in self.listing().manifests:
            if manifest.partition == partition:
                return manifest
        return None

    def verify_artifacts(self, manifest: BackupManifest) -> list[str]:
        """Re-read every artifact from the store and compare size and sha256 with the manifest."""
        problems: list[str] = []
        for artifact in manifest.artifact_list():
            head = self.store.head(artifact.key)
            if head is None:
                problems.append(f"{artifact.url}: missing from the store")
                continue
            if head.size != artifact.size:
                problems.append(f"{artifact.url}: {head.size} bytes in the store, manifest says {artifact.size}")
            digest = hashlib.sha256()
            with self.store.get(artifact.key) as stream:
                for chunk in iter_chunks(stream):
                    digest.update(chunk)
            if digest.hexdigest() != artifact.sha256:
                problems.append(
                    f"{artifact.url}: sha256 {digest.hexdigest()} does not match the manifest's {artifact.sha256}"
                )
        return problems

    def plan_retention(self, retention: Retention, manifests: Iterable[BackupManifest]) -> RetentionPlan:
        """Keep the newest backup, the newest of each of the last ``daily`` days and of the last ``weekly`` weeks."""
        ordered = sorted(manifests, key=lambda m: (m.finished_at, m.backup_id), reverse=True)
        reasons: dict[str, str] = {}
        if ordered:
            reasons[ordered[0].backup_id] = "newest"
        days: list[date] = []
        weeks: list[tuple[int, int]] = []
        for manifest in ordered:
            day = manifest.recovery_point.date()
            if day not in days and len(days) < retention.daily:
                days.append(day)
                reasons.setdefault(manifest.backup_id, f"daily {day.isoformat()}")
            week = tuple(manifest.recovery_point.isocalendar())[:2]
            if week not in weeks and len(weeks) < retention.weekly:
                weeks.append(week)  # type: ignore[arg-type]
                reasons.setdefault(manifest.backup_id, f"weekly {week[0]}-W{week[1]:02d}")
        keep = [m for m in ordered if m.backup_id in reasons]
        delete = [m for m in ordered if m.backup_id not in reasons]
        return RetentionPlan(keep, delete, reasons)

    def prune(self, retention: Retention, *, now: datetime | None = None) -> RetentionPlan:
        """Apply retention. Garbled manifests are never deleted: a person must look at them."""
        listing = self.listing()
        plan = self.plan_retention(retention, listing.manifests)
        for manifest in plan.delete:
            # The manifest goes first: a half-deleted backup is then uncommitted, never broken.
            self.store.delete(self.manifest_key(manifest.partition, manifest.backup_id))
            self._discard(self.prefix(manifest.partition, manifest.backup_id))
        now = now or datetime.now(UTC)
        for orphan in listing.orphans:
            written = backup_time_of(orphan)
            if written is not None and now - written > ORPHAN_AGE:
                self._discard(orphan)
        return plan

    def _discard(self, prefix: str) -> None:
        for stored in list(self.store.list(prefix)):
            self.store.delete(stored.key)


def backup_time_of(prefix: str) -> datetime | None:
    """When a backup started, from its directory name (``.../<backup_id>/``)."""
    backup_id = prefix.rstrip("/").rsplit("/", 1)[-1]
    try:
        return datetime.strptime(backup_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
