"""MilvusBackupDriver against the fake milvus-backup REST server and Milvus REST v2 (tests/fakes/milvus_backup.py).

Restore tests go to a scratch Milvus: a second fake whose milvus-backup reads
the source's backups (one backup bucket) and writes to its own Milvus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.milvus_backup import (
    MilvusBackupClient,
    MilvusBackupDriver,
    MilvusRestCollections,
    backup_name,
)
from ops_platform.errors import OpsPlatformError, ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.object_store import LocalObjectStore
from ops_platform.spec import Datastore, RestoreTest
from tests.fakes.milvus_backup import MilvusBackupFake

PREFIX = "restore_test_"
TOKEN = "root:Milvus"


@pytest.fixture
def milvus() -> Iterator[MilvusBackupFake]:
    with MilvusBackupFake(token=TOKEN) as fake:
        fake.collections.update({("default", "concept_vectors"): 5000, ("default", "relation_vectors"): 1200,
                                 ("default", "scratchpad"): 3})
        yield fake


@pytest.fixture
def scratch(milvus: MilvusBackupFake) -> Iterator[MilvusBackupFake]:
    """The restore-test Milvus and its milvus-backup, which sees the source's backups (their bucket)."""
    with MilvusBackupFake(token=TOKEN, backups=milvus.backups, lock=milvus.lock) as fake:
        yield fake


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


def spec(url: str, prefix: str | None = PREFIX, *, scratch: MilvusBackupFake | None = None,
         milvus_url: str | None = None) -> Datastore:
    """``scratch``: restore into that Milvus; without, into the source (``into_source``)."""
    target = {"url": scratch.backup_url} if scratch else {"url": url}
    return Datastore.model_validate({
        "name": "milvus_vectors",
        "engine": "milvus",
        "method": "milvus_backup",
        "connection": {"url": url},
        "milvus": {"server_url": milvus_url or url, "collections": ["concept_vectors", "relation_vectors"],
                   **({"restore_server_url": scratch.milvus_url} if scratch else {})},
        "restore_test": {"target": target, "rename_prefix": prefix, "into_source": scratch is None,
                         "verify_keys": ["concept_vectors"]},
    })


def driver(fake: MilvusBackupFake, **overrides) -> MilvusBackupDriver:
    collections = MilvusRestCollections(fake.milvus_url, token=TOKEN)
    options = {"poll_interval": 0.01, "backup_timeout": 5.0, "restore_timeout": 5.0}
    return MilvusBackupDriver(collections, **{**options, **overrides})


def test_restore_through_the_source_milvus_backup_without_the_opt_in_is_refused_before_any_write(
    milvus: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match=r"restore_test.target.url .* is the source .*restore_test.into_source"):
        Datastore.model_validate({**spec(milvus.backup_url).model_dump(exclude_none=True), "restore_test": {
            "target": {"url": milvus.backup_url}, "rename_prefix": PREFIX}})
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    writes = len(milvus.writes())
    alias = milvus.backup_url.replace("127.0.0.1", "localhost")

    with pytest.raises(RestoreRefused, match=r"refused before writing anything: restore_test.target.url .* is the "
                                             r"source .*same resolved address.*restore_test.into_source: true"):
        with driver(milvus).restore(manifest, store, RestoreTest(target={"url": alias}, rename_prefix=PREFIX),
                                    tmp_path):
            pass
    assert len(milvus.writes()) == writes


def test_a_scratch_restore_counted_in_the_source_milvus_is_refused_before_any_write(
    milvus: MilvusBackupFake, scratch: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match=r"milvus.restore_server_url: required"):
        Datastore.model_validate({**spec(milvus.backup_url, scratch=scratch).model_dump(exclude_none=True),
                                  "milvus": {"server_url": milvus.milvus_url}})
    datastore = spec(milvus.backup_url, scratch=scratch, milvus_url=milvus.milvus_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    writes = len(milvus.writes()) + len(scratch.writes())

    with pytest.raises(RestoreRefused, match=rf"counted and dropped in {milvus.milvus_url}, the source Milvus"):
        with driver(milvus).restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert len(milvus.writes()) + len(scratch.writes()) == writes


def test_backup_restore_into_a_scratch_milvus_renamed_and_dropped(
    milvus: MilvusBackupFake, scratch: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(milvus.backup_url, scratch=scratch)
    catalog = BackupCatalog(store, datastore.name)
    manifest = catalog.run_backup(driver(milvus), datastore, "2026-11-22")

    assert manifest.counts == {"rows:default.concept_vectors": 5000, "rows:default.relation_vectors": 1200}
    assert manifest.restore["backup_name"] == backup_name(manifest.backup_id)
    assert manifest.source_version == "milvus v2.4.5"
    create = next(r for r in milvus.requests if r.path == "/api/v1/create")
    assert create.body == {"backup_name": manifest.restore["backup_name"],
                           "collection_names": ["concept_vectors", "relation_vectors"], "async": True}
    record = json.loads(store.get_bytes(manifest.artifacts[0].key))
    assert record["state_code"] == 2 and catalog.verify_artifacts(manifest) == []
    assert driver(milvus).verify(manifest, store).ok
    milvus.collections[("default", "concept_vectors")] = 9999  # live data moves on
    source_writes = len(milvus.writes())

    with driver(scratch).restore(manifest, store, datastore.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
        assert scratch.collections[("default", f"{PREFIX}concept_vectors")] == 5000
        [query] = restored.run_queries(["concept_vectors"])
        assert query.ok and query.value == 5000

    assert len(milvus.writes()) == source_writes, "the source Milvus and its milvus-backup are only read"
    restore = next(r for r in scratch.requests if r.path == "/api/v1/restore")
    assert restore.body["collection_renames"] == {"concept_vectors": f"{PREFIX}concept_vectors",
                                                  "relation_vectors": f"{PREFIX}relation_vectors"}
    assert scratch.collections == {}
    assert sorted(name for _, name in milvus.collections) == ["concept_vectors", "relation_vectors", "scratchpad"]
    assert milvus.collections[("default", "concept_vectors")] == 9999


def test_restore_into_the_source_with_the_opt_in_renames_and_drops(
    milvus: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    milvus.collections[("default", "concept_vectors")] = 9999

    with driver(milvus).restore(manifest, store, datastore.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
        assert milvus.collections[("default", f"{PREFIX}concept_vectors")] == 5000

    assert sorted(name for _, name in milvus.collections) == ["concept_vectors", "relation_vectors", "scratchpad"]
    assert milvus.collections[("default", "concept_vectors")] == 9999


def test_failed_backup_is_deleted_and_nothing_committed(milvus: MilvusBackupFake, store: LocalObjectStore) -> None:
    datastore = spec(milvus.backup_url)
    catalog = BackupCatalog(store, datastore.name)
    first = catalog.run_backup(driver(milvus), datastore, "2026-11-21")
    milvus.fail_next("backup", "fail to copy binlog: NoSuchBucket")

    with pytest.raises(BackupError, match=r"ended FAIL: fail to copy binlog: NoSuchBucket"):
        catalog.run_backup(driver(milvus), datastore, "2026-11-22")

    assert catalog.latest() == first
    assert list(milvus.backups) == [first.restore["backup_name"]]
    assert list(store.list("backups/milvus_vectors/2026-11-22/")) == []


def test_backup_that_never_finishes_times_out(milvus: MilvusBackupFake, store: LocalObjectStore) -> None:
    milvus.hold()
    datastore = spec(milvus.backup_url)
    with pytest.raises(BackupError, match=r"did not finish within 0.2 s \(last state EXECUTING, progress 50 %\)"):
        BackupCatalog(store, datastore.name).run_backup(driver(milvus, backup_timeout=0.2), datastore, "2026-11-22")
    assert milvus.backups == {}


def test_unknown_collection_is_reported(milvus: MilvusBackupFake, store: LocalObjectStore) -> None:
    del milvus.collections[("default", "relation_vectors")]
    datastore = spec(milvus.backup_url)
    with pytest.raises(BackupError, match=r"code 400.*relation_vectors.*milvus.collections"):
        BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")


def test_simple_responses_give_no_counts_and_say_why(milvus: MilvusBackupFake, store: LocalObjectStore) -> None:
    milvus.simple_response = True
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    assert manifest.counts == {}
    assert "http.simpleResponse: true" in manifest.details["counts"]


def test_server_down_names_url_and_setting(milvus: MilvusBackupFake, store: LocalObjectStore) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    datastore = spec(url)
    with pytest.raises(ServerUnreachableError, match=rf"milvus-backup: connection refused at {url} "
                                                     r"\(check connection.url of datastore 'milvus_vectors'\)"):
        BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")


@pytest.mark.parametrize("prefix, reason", [
    (None, "rename_prefix is required"),
    ("relation_", "is itself a backed-up collection"),
    ("restore-test-", "is not a Milvus collection name"),
])
def test_restore_that_could_touch_source_collections_is_refused_before_any_write(
    milvus: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path, prefix: str | None, reason: str
) -> None:
    milvus.collections[("default", "vectors")] = 10
    datastore = Datastore.model_validate({
        **spec(milvus.backup_url).model_dump(exclude_none=True),
        "milvus": {"server_url": milvus.backup_url, "collections": ["vectors", "relation_vectors"]},
    })
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    writes = len(milvus.writes())
    with pytest.raises(RestoreRefused, match=reason):
        with driver(milvus).restore(manifest, store, RestoreTest(target={"url": milvus.backup_url},
                                                                 rename_prefix=prefix, into_source=True), tmp_path):
            pass
    assert len(milvus.writes()) == writes


def test_failed_restore_drops_what_it_created(milvus: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    milvus.collections[("default", f"{PREFIX}concept_vectors")] = 1  # left by an interrupted restore test
    milvus.fail_next("restore", "bulk insert failed: segment 3000 not found")

    with pytest.raises(RestoreError, match=r"ended FAIL: bulk insert failed"):
        with driver(milvus).restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert sorted(name for _, name in milvus.collections) == ["concept_vectors", "relation_vectors", "scratchpad"]


def test_body_failure_drops_the_restored_collections(
    milvus: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    with pytest.raises(RuntimeError, match="check failed"):
        with driver(milvus).restore(manifest, store, datastore.restore_test, tmp_path):
            assert ("default", f"{PREFIX}relation_vectors") in milvus.collections
            raise RuntimeError("check failed")
    assert not [name for _, name in milvus.collections if name.startswith(PREFIX)]
    drops = [r.body["collectionName"] for r in milvus.requests if r.path.endswith("/drop")]
    assert drops and all(name.startswith(PREFIX) for name in drops)


def test_restore_target_unreachable_names_the_spec_field(
    milvus: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RestoreError, match=rf"{down} \(check restore_test.target.url\)"):
        with driver(milvus).restore(manifest, store, RestoreTest(target={"url": down}, rename_prefix=PREFIX),
                                    tmp_path):
            pass


def test_milvus_token_is_sent_and_a_wrong_one_reported(
    milvus: MilvusBackupFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    wrong = MilvusBackupDriver(MilvusRestCollections(milvus.milvus_url, token="root:wrong"), poll_interval=0.01)
    with pytest.raises(RestoreError, match=r"code 1800\): user hasn't authenticated") as caught:
        with wrong.restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert "root:wrong" not in str(caught.value)


def test_verify_reports_a_deleted_backup(milvus: MilvusBackupFake, store: LocalObjectStore) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    milvus.backups.clear()
    verification = driver(milvus).verify(manifest, store)
    assert not verification.ok and "backup does not exist" in verification.problems[0]


def test_object_store_down_deletes_the_backup_it_could_not_record(milvus: MilvusBackupFake, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    datastore = spec(milvus.backup_url)
    with pytest.raises(OpsPlatformError, match="not-a-directory"):
        BackupCatalog(LocalObjectStore(blocked / "store"), datastore.name).run_backup(
            driver(milvus), datastore, "2026-11-22")
    assert milvus.backups == {}


def listed_backups(milvus: MilvusBackupFake) -> list[str]:
    client = MilvusBackupClient(milvus.backup_url, setting="the test's fake")
    return [backup["name"] for backup in client.call("GET", "/list")]


def test_expire_deletes_only_that_backup_and_an_already_gone_one_is_fine(
    milvus: MilvusBackupFake, store: LocalObjectStore
) -> None:
    datastore = spec(milvus.backup_url)
    catalog = BackupCatalog(store, datastore.name)
    old = catalog.run_backup(driver(milvus), datastore, "2026-11-21")
    kept = catalog.run_backup(driver(milvus), datastore, "2026-11-22")
    name = old.restore["backup_name"]

    said = driver(milvus).expire(old, store)

    assert said == f"milvus-backup: deleted backup {name} at {milvus.backup_url}"
    assert listed_backups(milvus) == [kept.restore["backup_name"]]
    [delete] = [r for r in milvus.writes() if r.method == "DELETE"]
    assert (delete.path, delete.query) == ("/api/v1/delete", {"backup_name": name})
    assert driver(milvus).verify(kept, store).ok
    assert "was already gone; nothing to delete" in driver(milvus).expire(old, store)
    assert listed_backups(milvus) == [kept.restore["backup_name"]]


def test_expire_that_cannot_remove_the_files_says_where_to_look(
    milvus: MilvusBackupFake, store: LocalObjectStore
) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    milvus.fail_deletes()

    with pytest.raises(BackupError) as caught:
        driver(milvus).expire(manifest, store)

    message = str(caught.value)
    assert f"could not delete backup {manifest.restore['backup_name']} at {milvus.backup_url} (code 3)" in message
    assert "success" not in message and "milvus-backup server's log" in message
    assert listed_backups(milvus) == [manifest.restore["backup_name"]]
    assert "deleted backup" in driver(milvus).expire(manifest, store)  # the next prune retries
    assert listed_backups(milvus) == []


def test_expire_at_a_url_that_does_not_serve_the_api_is_not_taken_for_gone(
    milvus: MilvusBackupFake, store: LocalObjectStore
) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    wrong_path = f"{milvus.backup_url}/milvus-backup"  # an HTTP 404, not milvus-backup's code 404
    elsewhere = manifest.model_copy(update={"restore": {**manifest.restore, "url": wrong_path}})
    with pytest.raises(BackupError, match=r"could not delete backup .*failed \(404\): 404 page not found"):
        driver(milvus).expire(elsewhere, store)
    assert listed_backups(milvus) == [manifest.restore["backup_name"]]


def test_expire_with_the_server_down_names_url_and_setting(milvus: MilvusBackupFake, store: LocalObjectStore) -> None:
    datastore = spec(milvus.backup_url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(milvus), datastore, "2026-11-22")
    milvus.stop()
    with pytest.raises(BackupError, match=rf"could not delete backup {manifest.restore['backup_name']}: "
                                          rf"milvus-backup: connection refused at {milvus.backup_url} "
                                          r"\(check connection.url of datastore 'milvus_vectors'\)"):
        driver(milvus).expire(manifest, store)
