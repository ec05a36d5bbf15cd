"""Where a datastore's backups live in the object store, which is the latest, what to prune.

Layout: ``backups/<datastore>/<partition>/<backup_id>/<artifact>`` with
``manifest.json`` beside the artifacts, written last. A backup is committed
when its manifest exists; a failed backup has none, so the previous one stays
the latest, and its leftovers are removed by the driver or, later, by
:meth:`BackupCatalog.prune`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

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


VERIFIED_NAME = "verified.json"


def new_backup_id(now: datetime) -> str:
    """Sorts in time order: ``20261122T020000Z-3f9a1c``."""
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class CatalogListing:
    manifests: list[BackupManifest]  # newest first
    garbled: list[ManifestError]
    orphans: list[str]  # backup prefixes with artifacts and no manifest
    verified: frozenset[str] = frozenset()  # backup ids with a verification marker

    def newest_verified(self) -> BackupManifest | None:
        return next((m for m in self.manifests if m.backup_id in self.verified), None)


@dataclass(frozen=True)
class Pruned:
    backup_id: str
    manifest_url: str
    engine: str = ""  # what the driver's expire removed in the engine, if anything


@dataclass(frozen=True)
class RetentionPlan:
    keep: list[BackupManifest]
    delete: list[BackupManifest]
    reasons: dict[str, str] = field(default_factory=dict)  # backup_id -> why kept
    pruned: list[Pruned] = field(default_factory=list)  # what prune actually deleted
    errors: list[str] = field(default_factory=list)  # what prune could not delete, and why


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

    def verified_key(self, manifest: BackupManifest) -> str:
        return f"{self.prefix(manifest.partition, manifest.backup_id)}{VERIFIED_NAME}"

    def mark_verified(self, manifest: BackupManifest, checked: dict[str, Any], verified_at: datetime) -> str:
        """Record that ``manifest``'s backup passed its checksum and the tool's own verification.

        Written after the manifest: only a verified backup counts towards
        retention and is restored by restore tests. Returns the marker's URL.
        """
        key = self.verified_key(manifest)
        body = {"backup_id": manifest.backup_id, "verified_at": verified_at.astimezone(UTC).isoformat(),
                "checked": {name: str(value) for name, value in checked.items()}}
        self.store.put_bytes(key, json.dumps(body, indent=2, sort_keys=True).encode(),
                             content_type="application/json")
        return self.store.url(key)

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
        verified: set[str] = set()
        for stored in self.store.list(self.root):
            relative = stored.key[len(self.root):]
            parts = relative.split("/")
            if len(parts) < 3:
                continue
            backup_prefix = f"{self.root}{parts[0]}/{parts[1]}/"
            prefixes.add(backup_prefix)
            if parts[2] == VERIFIED_NAME and len(parts) == 3:
                verified.add(parts[1])
            if parts[2] != MANIFEST_NAME or len(parts) != 3:
                continue
            committed.add(backup_prefix)
            try:
                manifests.append(self.read_manifest(stored.key))
            except ManifestError as error:
                garbled.append(error)
        manifests.sort(key=lambda m: (m.finished_at, m.backup_id), reverse=True)
        committed_ids = {m.backup_id for m in manifests}
        return CatalogListing(manifests, garbled, sorted(prefixes - committed), frozenset(verified & committed_ids))

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

    def latest_verified(self) -> BackupManifest | None:
        """The newest backup that passed its verification: what restore tests restore."""
        return self.listing().newest_verified()

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

    def plan_retention(
        self, retention: Retention, manifests: Iterable[BackupManifest], verified: Iterable[str],
        *, timezone: str = "UTC", now: datetime | None = None,
    ) -> RetentionPlan:
        """What to keep: only verified backups count towards retention.

        Kept: the newest verified backup, always; the newest verified backup of
        each of the last ``hourly`` hours, ``daily`` days and ``weekly`` weeks
        that have one (bucketed in ``timezone``); an unverified backup newer than
        the newest verified one (it may be under verification, or failed it and
        awaits a person) until it is ``ORPHAN_AGE`` old. Everything else goes.
        """
        zone = ZoneInfo(timezone)
        now = now or datetime.now(UTC)
        verified = set(verified)
        ordered = sorted(manifests, key=lambda m: (m.finished_at, m.backup_id), reverse=True)
        good = [m for m in ordered if m.backup_id in verified]
        reasons: dict[str, str] = {}
        if good:
            reasons[good[0].backup_id] = "newest verified"
        buckets: dict[str, list[object]] = {"hourly": [], "daily": [], "weekly": []}
        limits = {"hourly": retention.hourly, "daily": retention.daily, "weekly": retention.weekly}
        for manifest in good:
            local = manifest.recovery_point.astimezone(zone)
            keys = {
                "hourly": (local.date(), local.hour),
                "daily": local.date(),
                "weekly": tuple(local.isocalendar())[:2],
            }
            for kind, bucket in keys.items():
                seen = buckets[kind]
                if bucket not in seen and len(seen) < limits[kind]:
                    seen.append(bucket)
                    reasons.setdefault(manifest.backup_id, f"{kind} {_bucket_label(kind, bucket)}")
        newest_good_at = good[0].finished_at if good else None
        for manifest in ordered:
            if manifest.backup_id in verified:
                continue
            if (newest_good_at is None or manifest.finished_at > newest_good_at) and \
                    now - manifest.finished_at <= ORPHAN_AGE:
                reasons.setdefault(manifest.backup_id, "not verified (newer than the newest verified)")
        keep = [m for m in ordered if m.backup_id in reasons]
        delete = [m for m in ordered if m.backup_id not in reasons]
        return RetentionPlan(keep, delete, reasons)

    def prune(
        self, retention: Retention, *, timezone: str = "UTC", now: datetime | None = None,
        expire: Callable[[BackupManifest, ObjectStore], str] | None = None,
    ) -> RetentionPlan:
        """Apply retention; never raises for what it cannot delete, it reports it in ``errors``.

        ``expire`` (the driver's) removes what the engine keeps of a dropped
        backup first; when it fails, our records of that backup stay, so the
        catalog never forgets something the engine still holds. Garbled
        manifests are never deleted: a person must look at them.
        """
        now = now or datetime.now(UTC)
        listing = self.listing()
        plan = self.plan_retention(retention, listing.manifests, listing.verified, timezone=timezone, now=now)
        for manifest in plan.delete:
            manifest_key = self.manifest_key(manifest.partition, manifest.backup_id)
            engine = ""
            try:
                if expire is not None:
                    engine = expire(manifest, self.store)
                # The manifest goes first: a half-deleted backup is then uncommitted, never broken.
                self.store.delete(manifest_key)
                self._discard(self.prefix(manifest.partition, manifest.backup_id))
            except Exception as error:  # Object Lock, no DeleteObject, the engine refusing: report, go on
                plan.errors.append(f"backup {manifest.backup_id}: {error}")
                continue
            plan.pruned.append(Pruned(manifest.backup_id, self.store.url(manifest_key), engine))
        for orphan in listing.orphans:
            written = backup_time_of(orphan)
            if written is not None and now - written > ORPHAN_AGE:
                try:
                    self._discard(orphan)
                except Exception as error:
                    plan.errors.append(f"leftovers {orphan}: {error}")
        return plan

    def _discard(self, prefix: str) -> None:
        for stored in list(self.store.list(prefix)):
            self.store.delete(stored.key)


def _bucket_label(kind: str, bucket: object) -> str:
    if kind == "hourly":
        day, hour = bucket  # type: ignore[misc]
        return f"{day.isoformat()} {hour:02d}h"
    if kind == "weekly":
        year, week = bucket  # type: ignore[misc]
        return f"{year}-W{week:02d}"
    return bucket.isoformat()  # type: ignore[attr-defined]


def day_folder(started_at: datetime, timezone: str) -> str:
    """The folder a backup is filed under: the day it started, in the platform's timezone."""
    return started_at.astimezone(ZoneInfo(timezone)).date().isoformat()


def backup_time_of(prefix: str) -> datetime | None:
    """When a backup started, from its directory name (``.../<backup_id>/``)."""
    backup_id = prefix.rstrip("/").rsplit("/", 1)[-1]
    try:
        return datetime.strptime(backup_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
