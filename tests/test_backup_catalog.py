"""The catalog: commit marker, verification marker, retention over verified backups only,
checksum verification, garbled manifests, prune failures — on the local store and on S3
(moto server)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from ops_platform.backups.base import Artifact, BackupError, BackupJob, BackupOutcome, Verification
from ops_platform.backups.catalog import ORPHAN_AGE, BackupCatalog
from ops_platform.backups.manifest import ManifestError, parse_manifest
from ops_platform.resources.object_store import LocalObjectStore, ObjectStoreError, S3ObjectStore, aws_client
from ops_platform.spec import Datastore, Retention

DATASTORE = Datastore.model_validate(
    {"name": "kv", "engine": "redis", "method": "rdb", "connection": {"host": "127.0.0.1", "port": 1}}
)


class BytesDriver:
    """A driver whose 'datastore' is a byte string: enough to exercise the catalog for real."""

    engine = "redis"
    method = "rdb"

    def __init__(self, payload: bytes = b"snapshot-bytes" * 1000, fail_after_write: bool = False) -> None:
        self.payload = payload
        self.fail_after_write = fail_after_write

    def backup(self, job: BackupJob) -> BackupOutcome:
        stored = job.store.put(job.artifact_key("dump.rdb"), io.BytesIO(self.payload))
        if self.fail_after_write:
            raise BackupError("source went away after the artifact was written")
        return BackupOutcome(
            artifacts=(Artifact.from_stored("dump.rdb", stored),),
            source_version="7.0.15",
            recovery_point=job.now(),
            restore={"format": "rdb"},
            counts={"keys:db0": 3},
        )

    def verify(self, manifest, store) -> Verification:
        return Verification(True)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    request.getfixturevalue("aws_env")
    bucket = request.getfixturevalue("s3_bucket")
    client = aws_client("s3", region="ap-northeast-2", endpoint_url=None, needed_for="test")
    return S3ObjectStore(client, bucket, prefix="ops/")


def verified_backup(catalog, driver, folder, **kwargs):
    """A backup as the backup asset leaves it after its checks passed."""
    manifest = catalog.run_backup(driver, DATASTORE, folder, **kwargs)
    catalog.mark_verified(manifest, {"sha256": "ok"}, manifest.finished_at)
    return manifest


class DeleteDeniedStore(LocalObjectStore):
    """Stands in for an S3 bucket whose policy (or Object Lock) denies DeleteObject to us."""

    def delete(self, key: str) -> None:
        raise ObjectStoreError(f"s3 delete of {key}: AccessDenied (s3:DeleteObject is denied by the bucket policy)")


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def test_backup_is_committed_by_its_manifest(store):
    catalog = BackupCatalog(store, "kv")
    manifest = catalog.run_backup(BytesDriver(), DATASTORE, "2026-11-20")
    assert catalog.latest() == manifest
    assert manifest.sha256 == manifest.artifacts[0].sha256
    assert manifest.bytes == len(b"snapshot-bytes" * 1000)
    assert manifest.counts == {"keys:db0": 3}
    raw = json.loads(store.get_bytes(catalog.manifest_key("2026-11-20", manifest.backup_id)))
    for field in ("datastore", "engine", "method", "partition", "started_at", "finished_at", "bytes",
                  "sha256", "source_version", "encryption", "restore"):
        assert field in raw
    assert catalog.verify_artifacts(manifest) == []


def test_failed_backup_leaves_previous_latest_and_nothing_behind(store):
    catalog = BackupCatalog(store, "kv")
    good = catalog.run_backup(BytesDriver(), DATASTORE, "2026-11-20")
    with pytest.raises(BackupError, match="source went away"):
        catalog.run_backup(BytesDriver(fail_after_write=True), DATASTORE, "2026-11-21")
    assert catalog.latest() == good
    keys = [obj.key for obj in store.list("backups/kv/")]
    assert all(good.backup_id in key for key in keys)


def test_corrupt_artifact_is_detected(store):
    catalog = BackupCatalog(store, "kv")
    manifest = catalog.run_backup(BytesDriver(), DATASTORE, "2026-11-20")
    artifact = manifest.artifact_list()[0]
    store.put(artifact.key, io.BytesIO(b"X" + b"snapshot-bytes" * 1000))
    problems = catalog.verify_artifacts(manifest)
    assert len(problems) == 2
    assert "bytes in the store" in problems[0]
    assert "does not match the manifest" in problems[1]


def test_missing_artifact_is_detected(store):
    catalog = BackupCatalog(store, "kv")
    manifest = catalog.run_backup(BytesDriver(), DATASTORE, "2026-11-20")
    store.delete(manifest.artifact_list()[0].key)
    assert catalog.verify_artifacts(manifest) == [f"{manifest.artifacts[0].url}: missing from the store"]


def test_garbled_manifest_is_reported_passed_over_and_never_pruned(store):
    catalog = BackupCatalog(store, "kv")
    clock = Clock(datetime(2026, 11, 1, 2, tzinfo=UTC))
    older = verified_backup(catalog, BytesDriver(), "2026-11-01", now=clock)
    newer = catalog.run_backup(BytesDriver(), DATASTORE, "2026-11-02", now=clock)
    garbled_key = catalog.manifest_key("2026-11-02", newer.backup_id)
    store.put_bytes(garbled_key, b'{"backup_id": "x", "bytes": "many"')
    listing = catalog.listing()
    assert [m.backup_id for m in listing.manifests] == [older.backup_id]
    assert len(listing.garbled) == 1 and "not JSON" in str(listing.garbled[0])
    assert catalog.latest() == older
    catalog.prune(Retention(daily=1, weekly=0), now=clock.now + ORPHAN_AGE * 2)
    assert store.head(garbled_key) is not None
    assert store.head(newer.artifact_list()[0].key) is not None


def test_manifest_problems_are_named():
    with pytest.raises(ManifestError, match="expected a JSON object"):
        parse_manifest(b"[]", "s3://b/m.json")
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps({"backup_id": "x", "format": "other/9"}).encode(), "s3://b/m.json")
    message = str(caught.value)
    assert "s3://b/m.json" in message and "unknown manifest format" in message and "datastore: Field required" in message


def test_manifest_of_another_datastore_is_refused(store):
    catalog = BackupCatalog(store, "kv")
    manifest = catalog.run_backup(BytesDriver(), DATASTORE, "2026-11-20")
    other = BackupCatalog(store, "other")
    store.put_bytes(other.manifest_key("2026-11-20", manifest.backup_id), manifest.to_json())
    assert other.latest() is None
    assert "belongs to datastore 'kv'" in str(other.listing().garbled[0])


def test_retention_keeps_daily_weekly_and_newest(tmp_path):
    store = LocalObjectStore(tmp_path)
    catalog = BackupCatalog(store, "kv")
    start = datetime(2026, 10, 1, 2, tzinfo=UTC)  # a Thursday
    manifests = []
    for day in range(40):
        when = start + timedelta(days=day)
        manifests.append(
            verified_backup(catalog, BytesDriver(b"x"), when.date().isoformat(), now=lambda when=when: when)
        )
    # Two backups on the last day: only the newer counts for that day.
    last_day = start + timedelta(days=39, hours=3)
    newest = verified_backup(catalog, BytesDriver(b"y"), last_day.date().isoformat(), now=lambda: last_day)
    plan = catalog.prune(Retention(daily=7, weekly=4), now=last_day)
    kept = catalog.listing().manifests
    assert kept[0] == newest
    assert {m.backup_id for m in kept} == {m.backup_id for m in plan.keep}
    kept_days = sorted({m.recovery_point.date() for m in kept})
    assert len(kept) == 7 + 2  # 7 daily, 4 weekly of which 2 already inside the daily window
    assert kept_days[-7:] == [(last_day - timedelta(days=n)).date() for n in range(6, -1, -1)]
    weeks = {tuple(m.recovery_point.isocalendar())[:2] for m in kept}
    assert len(weeks) >= 4
    assert len(list(store.list("backups/kv/"))) == 3 * len(kept)  # artifact, manifest, verification marker
    assert [p.backup_id for p in plan.pruned] == [m.backup_id for m in plan.delete]


def test_retention_never_deletes_the_only_backup(tmp_path):
    catalog = BackupCatalog(LocalObjectStore(tmp_path), "kv")
    only = verified_backup(catalog, BytesDriver(), "2026-01-01", now=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    catalog.prune(Retention(daily=1, weekly=0), now=datetime(2026, 11, 1, tzinfo=UTC))
    assert catalog.latest() == only


def test_an_unverified_newest_backup_never_gets_the_last_verified_one_deleted(store):
    catalog = BackupCatalog(store, "kv")
    clock = Clock(datetime(2026, 11, 1, 2, tzinfo=UTC))
    good = verified_backup(catalog, BytesDriver(), "2026-11-01", now=clock)
    clock.now += timedelta(days=1)
    corrupt = catalog.run_backup(BytesDriver(b"corrupt"), DATASTORE, "2026-11-02", now=clock)  # failed its check
    plan = catalog.prune(Retention(daily=1, weekly=0), now=clock.now)
    assert plan.delete == []
    assert plan.reasons[good.backup_id] == "newest verified"
    assert "not verified" in plan.reasons[corrupt.backup_id]
    assert catalog.latest_verified() == good
    assert catalog.verify_artifacts(good) == []
    # A day later the unverified one is a failed backup's leftover; the verified one still stays.
    plan = catalog.prune(Retention(daily=1, weekly=0), now=clock.now + ORPHAN_AGE * 2)
    assert [m.backup_id for m in plan.delete] == [corrupt.backup_id]
    assert [m.backup_id for m in catalog.listing().manifests] == [good.backup_id]


def test_unverified_backups_do_not_count_towards_retention(tmp_path):
    catalog = BackupCatalog(LocalObjectStore(tmp_path), "kv")
    clock = Clock(datetime(2026, 11, 1, 2, tzinfo=UTC))
    first = verified_backup(catalog, BytesDriver(), "2026-11-01", now=clock)
    clock.now += timedelta(days=1)
    second = verified_backup(catalog, BytesDriver(), "2026-11-02", now=clock)
    clock.now += timedelta(days=1)
    for _ in range(3):  # three newer backups that never verified
        catalog.run_backup(BytesDriver(b"bad"), DATASTORE, "2026-11-03", now=clock)
    plan = catalog.prune(Retention(daily=2, weekly=0), now=clock.now)
    kept_verified = [m.backup_id for m in plan.keep if m.backup_id in catalog.listing().verified]
    assert kept_verified == [second.backup_id, first.backup_id]


def test_hourly_retention_buckets_hours_in_the_platform_timezone(tmp_path):
    catalog = BackupCatalog(LocalObjectStore(tmp_path), "kv")
    start = datetime(2026, 11, 30, 14, 10, tzinfo=UTC)  # 23:10 in Seoul
    for half_hours in range(8):
        when = start + timedelta(minutes=30 * half_hours)
        verified_backup(catalog, BytesDriver(b"x"), "d", now=lambda when=when: when)
    # The day boundary is Seoul's: 23:10 and 23:40 KST belong to 2026-11-30, the rest to 2026-12-01.
    daily = catalog.plan_retention(Retention(daily=2, weekly=0), catalog.listing().manifests,
                                   catalog.listing().verified, timezone="Asia/Seoul")
    assert sorted(daily.reasons.values()) == ["daily 2026-11-30", "newest verified"]
    utc_daily = catalog.plan_retention(Retention(daily=2, weekly=0), catalog.listing().manifests,
                                       catalog.listing().verified, timezone="UTC")
    assert sorted(utc_daily.reasons.values()) == ["newest verified"]  # all eight fall on 2026-11-30 in UTC
    plan = catalog.prune(Retention(hourly=3, daily=1, weekly=0), timezone="Asia/Seoul",
                         now=start + timedelta(hours=4))
    reasons = sorted(plan.reasons.values())
    # Four hours of two backups each: the newest of each of the last three hours (02h is the newest).
    assert reasons == ["hourly 2026-12-01 00h", "hourly 2026-12-01 01h", "newest verified"]
    assert len(plan.delete) == 5


def test_a_prune_the_store_denies_is_reported_and_loses_nothing(tmp_path):
    writable = LocalObjectStore(tmp_path)
    catalog = BackupCatalog(writable, "kv")
    clock = Clock(datetime(2026, 11, 1, 2, tzinfo=UTC))
    old = verified_backup(catalog, BytesDriver(), "2026-11-01", now=clock)
    clock.now += timedelta(days=3)
    new = verified_backup(catalog, BytesDriver(), "2026-11-04", now=clock)
    denied = BackupCatalog(DeleteDeniedStore(tmp_path), "kv")
    plan = denied.prune(Retention(daily=1, weekly=0), now=clock.now)
    assert plan.pruned == []
    assert len(plan.errors) == 1 and old.backup_id in plan.errors[0] and "AccessDenied" in plan.errors[0]
    assert {m.backup_id for m in catalog.listing().manifests} == {old.backup_id, new.backup_id}
    assert catalog.listing().verified == {old.backup_id, new.backup_id}


def test_engine_expiry_runs_first_and_a_refusal_keeps_our_records(tmp_path):
    catalog = BackupCatalog(LocalObjectStore(tmp_path), "kv")
    clock = Clock(datetime(2026, 11, 1, 2, tzinfo=UTC))
    old = verified_backup(catalog, BytesDriver(), "2026-11-01", now=clock)
    clock.now += timedelta(days=3)
    verified_backup(catalog, BytesDriver(), "2026-11-04", now=clock)

    def refuse(manifest, store):
        raise BackupError(f"snapshot {manifest.backup_id} is in use by a running restore")

    plan = catalog.prune(Retention(daily=1, weekly=0), now=clock.now, expire=refuse)
    assert "in use by a running restore" in plan.errors[0]
    assert old.backup_id in {m.backup_id for m in catalog.listing().manifests}

    expired = []
    plan = catalog.prune(Retention(daily=1, weekly=0), now=clock.now,
                         expire=lambda manifest, store: expired.append(manifest.backup_id) or "snapshot deleted")
    assert expired == [old.backup_id]
    assert [(p.backup_id, p.engine) for p in plan.pruned] == [(old.backup_id, "snapshot deleted")]
    assert old.backup_id not in {m.backup_id for m in catalog.listing().manifests}


def test_orphans_of_failed_runs_are_removed_after_a_day(tmp_path):
    store = LocalObjectStore(tmp_path)
    catalog = BackupCatalog(store, "kv")
    verified_backup(catalog, BytesDriver(), "2026-11-20")
    orphan = "backups/kv/2026-11-19/20261119T020000Z-abcdef/dump.rdb"
    fresh_orphan = "backups/kv/2026-11-22/20261122T020000Z-abcdef/dump.rdb"
    store.put_bytes(orphan, b"half")
    store.put_bytes(fresh_orphan, b"in progress")
    catalog.prune(Retention(), now=datetime(2026, 11, 22, 3, tzinfo=UTC))
    assert store.head(orphan) is None
    assert store.head(fresh_orphan) is not None


def test_driver_writing_outside_its_prefix_is_refused(tmp_path):
    class Stray(BytesDriver):
        def backup(self, job):
            stored = job.store.put("elsewhere/dump.rdb", io.BytesIO(b"x"))
            return BackupOutcome((Artifact.from_stored("dump.rdb", stored),), "7", job.now(), {})

    catalog = BackupCatalog(LocalObjectStore(tmp_path), "kv")
    with pytest.raises(BackupError, match="outside its backup prefix"):
        catalog.run_backup(Stray(), DATASTORE, "2026-11-20")
    assert catalog.latest() is None


def test_store_down_during_backup_reports_the_store_not_the_cleanup(aws_env, s3_bucket, monkeypatch):
    from ops_platform.errors import ServerUnreachableError
    from ops_platform.local_servers import free_port

    client = aws_client("s3", region="ap-northeast-2", endpoint_url=f"http://127.0.0.1:{free_port()}",
                        needed_for="test", connect_timeout=1, max_attempts=1)
    catalog = BackupCatalog(S3ObjectStore(client, s3_bucket), "kv")
    with pytest.raises(Exception) as caught:
        catalog.run_backup(BytesDriver(), DATASTORE, "2026-11-20")
    assert isinstance(caught.value, ServerUnreachableError) or isinstance(caught.value.__cause__, ServerUnreachableError)
    assert "AWS_ENDPOINT_URL" in str(caught.value)
    assert any("removed by a later prune" in note for note in getattr(caught.value, "__notes__", []))
