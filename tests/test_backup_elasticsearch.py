"""ElasticsearchSnapshotDriver against the fake Elasticsearch REST API (tests/fakes/elasticsearch.py).

Restore tests go to a scratch cluster: a second fake sharing the source's
snapshot bucket, as two clusters registering one repository do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from ops_platform.backups.base import BackupError, RestoreError, RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.elasticsearch_snapshot import ElasticsearchClient, ElasticsearchSnapshotDriver, snapshot_name
from ops_platform.errors import OpsPlatformError, ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.object_store import LocalObjectStore
from ops_platform.spec import Datastore, RestoreTest
from tests.fakes.elasticsearch import ElasticsearchFake

PASSWORD = "es-secret"
PREFIX = "restore-test-"


SCRATCH_URL = "https://onto-restore-test-es-http.ops.svc.cluster.local:9200"


@pytest.fixture
def es() -> Iterator[ElasticsearchFake]:
    with ElasticsearchFake(password=PASSWORD) as fake:
        fake.indices.update({"logs-2026.11.21": 1200, "logs-2026.11.22": 340, "onto-concepts": 2000, "other": 7})
        fake.add_repository("onto-snapshots")
        yield fake


@pytest.fixture
def scratch(es: ElasticsearchFake) -> Iterator[ElasticsearchFake]:
    """The restore-test cluster: empty, the source's repository bucket not registered yet."""
    with ElasticsearchFake(password=PASSWORD, snapshots=es.snapshots) as fake:
        yield fake


def spec(url: str, *, target_url: str = SCRATCH_URL, prefix: str | None = PREFIX, into_source: bool = False
         ) -> Datastore:
    return Datastore.model_validate({
        "name": "elasticsearch_logs",
        "engine": "elasticsearch",
        "method": "snapshot",
        "connection": {"url": url, "user": "ops_backup", "password_env": "ES_PASSWORD"},
        "elasticsearch": {"repository": "onto-snapshots", "indices": ["logs-*", "onto-*"]},
        "restore_test": {"target": {"url": target_url}, "rename_prefix": prefix, "into_source": into_source,
                         "verify_keys": ["onto-concepts"]},
    })


def into(url: str, *, into_source: bool = False, prefix: str | None = PREFIX) -> RestoreTest:
    return RestoreTest(target={"url": url}, rename_prefix=prefix, into_source=into_source,
                       verify_keys=["onto-concepts"])


def driver(**overrides) -> ElasticsearchSnapshotDriver:
    options = {"password_for": {"ES_PASSWORD": PASSWORD}.get, "poll_interval": 0.01, "snapshot_timeout": 5.0}
    return ElasticsearchSnapshotDriver(**{**options, **overrides})


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


def test_restore_into_the_source_cluster_without_the_opt_in_is_refused_before_any_write(
    es: ElasticsearchFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match=r"restore_test.target.url .* is the source .*restore_test.into_source"):
        spec(es.url, target_url=es.url)
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    writes_before = len(es.writes())
    same_via_localhost = es.url.replace("127.0.0.1", "localhost")

    with pytest.raises(RestoreRefused, match=r"refused before writing anything: restore_test.target.url .* is the "
                                             r"source .*same resolved address.*restore_test.into_source: true"):
        with driver().restore(manifest, store, into(same_via_localhost), tmp_path):
            pass
    assert len(es.writes()) == writes_before


def test_a_target_that_answers_as_the_source_cluster_is_refused_before_any_write(
    es: ElasticsearchFake, scratch: ElasticsearchFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    scratch.cluster_uuid = es.cluster_uuid  # another name and port for the source: a proxy, an alias

    with pytest.raises(RestoreRefused, match=rf"it answers as the source cluster \(cluster_uuid {es.cluster_uuid}"):
        with driver().restore(manifest, store, into(scratch.url), tmp_path):
            pass
    assert scratch.writes() == [] and scratch.repositories == {}


def test_backup_verify_restore_into_a_scratch_cluster_and_cleanup(
    es: ElasticsearchFake, scratch: ElasticsearchFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(es.url, target_url=scratch.url)
    catalog = BackupCatalog(store, datastore.name)
    manifest = catalog.run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)

    assert catalog.latest() == manifest
    assert manifest.counts == {"docs:logs-2026.11.21": 1200, "docs:logs-2026.11.22": 340, "docs:onto-concepts": 2000}
    assert [a.name for a in manifest.artifacts] == ["snapshot.json"]
    assert catalog.verify_artifacts(manifest) == []
    record = json.loads(store.get_bytes(manifest.artifacts[0].key))
    assert record["snapshot"]["state"] == "SUCCESS" and record["repository"] == "onto-snapshots"
    assert manifest.restore["snapshot"] == snapshot_name(manifest.backup_id)
    assert manifest.restore["cluster_uuid"] == es.cluster_uuid
    assert manifest.source_version == "elasticsearch 8.15.0"
    assert PASSWORD not in manifest.to_json().decode()
    snapshot_puts = [r for r in es.requests if r.method == "PUT"]
    assert snapshot_puts[0].query == {"wait_for_completion": "false"}
    assert snapshot_puts[0].body["include_global_state"] is False
    assert "other" not in snapshot_puts[0].body["indices"]

    assert driver().verify(manifest, store).ok
    es.indices["onto-concepts"] = 2500  # written after the snapshot: the restore shows the snapshot's data
    source_writes = len(es.writes())

    with driver().restore(manifest, store, datastore.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
        assert scratch.indices[f"{PREFIX}onto-concepts"] == 2000
        [query] = restored.run_queries(["onto-concepts"])
        assert query.ok and query.value == 2000
        assert not restored.run_queries(["never-backed-up"])[0].ok

    assert len(es.writes()) == source_writes, "the source cluster is only read"
    assert not [name for name in es.indices if name.startswith(PREFIX)]
    assert es.indices["onto-concepts"] == 2500 and es.indices["other"] == 7
    assert scratch.repositories["onto-snapshots"] == {
        "type": "s3", "settings": {"bucket": "onto-snapshots", "base_path": "snapshots", "readonly": True}}
    restore_call = next(r for r in scratch.requests if r.path.endswith("/_restore"))
    assert restore_call.body["rename_replacement"] == f"{PREFIX}$1"
    assert restore_call.body["include_aliases"] is False and restore_call.body["include_global_state"] is False
    assert scratch.index_settings[f"{PREFIX}onto-concepts"] == {"index.number_of_replicas": 0}
    assert not [name for name in scratch.indices if name.startswith(PREFIX)]

    with driver().restore(manifest, store, datastore.restore_test, tmp_path) as again:  # registered: reused
        assert again.counts() == manifest.counts
    assert [r.method for r in scratch.requests if r.path == "/_snapshot/onto-snapshots"].count("PUT") == 1


def test_a_scratch_cluster_with_the_repository_registered_writable_is_refused_before_any_write(
    es: ElasticsearchFake, scratch: ElasticsearchFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(es.url, target_url=scratch.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    scratch.add_repository("onto-snapshots")

    with pytest.raises(RestoreRefused, match=r"'onto-snapshots' is registered there writable, and two clusters "
                                             r"writing one repository corrupt it"):
        with driver().restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert scratch.writes() == [] and scratch.indices == {}

    scratch.add_repository("onto-snapshots", bucket="another-bucket", readonly=True)
    with pytest.raises(RestoreRefused, match=r"has bucket 'another-bucket', the backup's has 'onto-snapshots'"):
        with driver().restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert scratch.writes() == []


def test_restore_into_the_source_cluster_with_the_opt_in_needs_room_below_the_flood_stage(
    es: ElasticsearchFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(es.url, target_url=es.url, into_source=True)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    snapshot_bytes = (1200 + 340 + 2000) * es.bytes_per_doc
    # 95 % of 100 GiB may be used; 2 x the snapshot more than is used already leaves 1 byte short
    es.nodes[0]["available"] = es.nodes[0]["total"] - (int(es.nodes[0]["total"] * 0.95) - 2 * snapshot_bytes + 1)
    writes_before = len(es.writes())

    with pytest.raises(RestoreRefused, match=rf"has {2 * snapshot_bytes - 1} bytes of room below its flood-stage "
                                             rf"watermark \(95%\).*needs {2 * snapshot_bytes} "
                                             rf"\({snapshot_bytes} bytes"):
        with driver().restore(manifest, store, datastore.restore_test, tmp_path):
            pass
    assert len(es.writes()) == writes_before

    es.cluster_settings["persistent"]["cluster.routing.allocation.disk.watermark.flood_stage"] = "2gb"
    es.nodes[0]["available"] = 2 * 1024**3 + 2 * snapshot_bytes
    with driver().restore(manifest, store, datastore.restore_test, tmp_path) as restored:
        assert restored.counts() == manifest.counts
        assert es.index_settings[f"{PREFIX}onto-concepts"] == {"index.number_of_replicas": 0}
    assert not [name for name in es.indices if name.startswith(PREFIX)]
    assert es.indices["onto-concepts"] == 2000


@pytest.mark.parametrize("state", ["FAILED", "PARTIAL"])
def test_failed_snapshot_fails_the_backup_and_keeps_the_previous_one(
    es: ElasticsearchFake, store: LocalObjectStore, state: str
) -> None:
    datastore = spec(es.url)
    catalog = BackupCatalog(store, datastore.name)
    first = catalog.run_backup(driver(), datastore, "2026-11-21", password=PASSWORD)
    es.fail_next_snapshot(state, reason="IndexShardSnapshotFailedException[disk full]")

    with pytest.raises(BackupError, match=rf"ended {state}: .*shards failed.*disk full") as caught:
        catalog.run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)

    assert "the snapshot was deleted" in str(caught.value)
    assert catalog.latest() == first
    assert list(store.list("backups/elasticsearch_logs/2026-11-22/")) == []
    assert [name for _, name in es.snapshots] == [first.restore["snapshot"]]


def test_snapshot_that_never_finishes_times_out_and_is_aborted(es: ElasticsearchFake, store: LocalObjectStore) -> None:
    es.hold_snapshots()
    datastore = spec(es.url)
    catalog = BackupCatalog(store, datastore.name)

    with pytest.raises(BackupError, match=r"did not finish within 0.2 s \(last state IN_PROGRESS\); it was aborted"):
        catalog.run_backup(driver(snapshot_timeout=0.2), datastore, "2026-11-22", password=PASSWORD)

    assert es.snapshots == {} and catalog.latest() is None
    assert list(store.list("backups/")) == []


def test_missing_repository_names_the_spec_field(es: ElasticsearchFake, store: LocalObjectStore) -> None:
    es.repositories.clear()
    datastore = spec(es.url)
    with pytest.raises(BackupError, match=r"repository 'onto-snapshots' is not registered .*elasticsearch.repository"):
        BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    assert not [r for r in es.requests if r.method == "PUT"]


def test_repository_failing_verification_is_reported(es: ElasticsearchFake, store: LocalObjectStore) -> None:
    es.fail_verification("access denied to bucket onto-snapshots")
    datastore = spec(es.url)
    with pytest.raises(BackupError, match=r"failed verification .*access denied"):
        BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)


def test_server_down_names_url_and_setting(store: LocalObjectStore) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    datastore = spec(url)
    with pytest.raises(ServerUnreachableError) as caught:
        BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    message = str(caught.value)
    assert url in message and "connection.url of datastore 'elasticsearch_logs'" in message
    assert "refused" in message


def test_wrong_password_is_reported_without_the_password(es: ElasticsearchFake, store: LocalObjectStore) -> None:
    datastore = spec(es.url)
    with pytest.raises(OpsPlatformError, match="authentication failed .*ops_backup.*ES_PASSWORD") as caught:
        BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password="wrong-one")
    assert "wrong-one" not in str(caught.value) and PASSWORD not in str(caught.value)


def test_restore_target_unreachable_names_the_spec_field(
    es: ElasticsearchFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RestoreError, match=rf"{down}.*restore_test.target.url"):
        with driver().restore(manifest, store, into(down), tmp_path):
            pass


def test_cleanup_runs_when_the_check_fails_and_leftovers_are_replaced(
    es: ElasticsearchFake, scratch: ElasticsearchFake, store: LocalObjectStore, tmp_path: Path
) -> None:
    datastore = spec(es.url, target_url=scratch.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    scratch.indices.update({f"{PREFIX}onto-concepts": 1, "kept": 3})  # left by an interrupted restore test; not ours

    with pytest.raises(RuntimeError, match="verification blew up"):
        with driver().restore(manifest, store, datastore.restore_test, tmp_path) as restored:
            assert restored.counts()["docs:onto-concepts"] == 2000
            raise RuntimeError("verification blew up")

    assert sorted(scratch.indices) == ["kept"]
    assert sorted(es.indices) == ["logs-2026.11.21", "logs-2026.11.22", "onto-concepts", "other"]


def test_verify_reports_a_snapshot_deleted_from_the_repository(es: ElasticsearchFake, store: LocalObjectStore) -> None:
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    es.snapshots.clear()
    verification = driver().verify(manifest, store)
    assert not verification.ok
    assert "no longer in repository onto-snapshots" in verification.problems[0]


def test_no_matching_index_is_a_clear_error(es: ElasticsearchFake, store: LocalObjectStore) -> None:
    datastore = spec(es.url)
    es.indices.clear()
    with pytest.raises(BackupError, match=r"no open index .* matches logs-\*, onto-\*"):
        BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)


def test_object_store_down_deletes_the_snapshot_it_could_not_record(es: ElasticsearchFake, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    broken_store = LocalObjectStore(blocked / "store")
    datastore = spec(es.url)
    with pytest.raises(OpsPlatformError, match="not-a-directory"):
        BackupCatalog(broken_store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    assert es.snapshots == {}
    assert [r.method for r in es.requests if "/_snapshot/onto-snapshots/ops-" in r.path][-1] == "DELETE"


def listed_snapshots(es: ElasticsearchFake) -> list[str]:
    client = ElasticsearchClient(es.url, user="ops_backup", password=PASSWORD, setting="the test's fake")
    return [s["snapshot"] for s in client.request("GET", "/_snapshot/onto-snapshots/_all")["snapshots"]]


def test_expire_deletes_only_that_snapshot_and_an_already_gone_one_is_fine(
    es: ElasticsearchFake, store: LocalObjectStore
) -> None:
    datastore = spec(es.url)
    catalog = BackupCatalog(store, datastore.name)
    old = catalog.run_backup(driver(), datastore, "2026-11-21", password=PASSWORD)
    kept = catalog.run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    assert listed_snapshots(es) == [old.restore["snapshot"], kept.restore["snapshot"]]

    said = driver().expire(old, store)

    assert said == f"elasticsearch: deleted snapshot {old.restore['snapshot']} in repository onto-snapshots at {es.url}"
    assert listed_snapshots(es) == [kept.restore["snapshot"]]
    [delete] = [r for r in es.writes() if r.method == "DELETE"]
    assert delete.path == f"/_snapshot/onto-snapshots/{old.restore['snapshot']}"
    assert driver().verify(kept, store).ok
    assert "was already gone; nothing to delete" in driver().expire(old, store)
    assert listed_snapshots(es) == [kept.restore["snapshot"]]


def test_expire_while_a_restore_reads_the_snapshot_is_refused_and_keeps_it(
    es: ElasticsearchFake, store: LocalObjectStore
) -> None:
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    es.restore_in_progress("onto-snapshots", manifest.restore["snapshot"])

    with pytest.raises(BackupError) as caught:
        driver().expire(manifest, store)

    message = str(caught.value)
    assert f"DELETE /_snapshot/onto-snapshots/{manifest.restore['snapshot']} at {es.url} failed (503 " in message
    assert "cannot delete snapshot during a restore in progress" in message
    assert "can be deleted once that ends" in message
    assert listed_snapshots(es) == [manifest.restore["snapshot"]]


def test_expire_with_the_repository_unregistered_says_how_to_mend_it(
    es: ElasticsearchFake, store: LocalObjectStore
) -> None:
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    es.repositories.clear()
    with pytest.raises(BackupError, match=r"failed \(404 repository_missing_exception: .*"
                                          r"register the repository again \(PUT _snapshot/onto-snapshots"):
        driver().expire(manifest, store)
    assert list(es.snapshots) == [("onto-snapshots", manifest.restore["snapshot"])]


def test_expire_with_the_server_down_or_a_wrong_password_is_a_clear_backup_error(
    es: ElasticsearchFake, store: LocalObjectStore
) -> None:
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)

    with pytest.raises(BackupError, match="authentication failed .*ops_backup.*ES_PASSWORD") as caught:
        driver(password_for={"ES_PASSWORD": "wrong-one"}.get).expire(manifest, store)
    assert "wrong-one" not in str(caught.value)

    es.stop()
    with pytest.raises(BackupError) as caught:
        driver().expire(manifest, store)
    message = str(caught.value)
    assert f"could not delete snapshot {manifest.restore['snapshot']} in repository onto-snapshots" in message
    assert f"connection refused at {es.url}" in message
    assert "check connection.url of datastore 'elasticsearch_logs'" in message


def test_expire_timeout_bounds_the_wait_for_the_deletion(es: ElasticsearchFake, store: LocalObjectStore) -> None:
    datastore = spec(es.url)
    manifest = BackupCatalog(store, datastore.name).run_backup(driver(), datastore, "2026-11-22", password=PASSWORD)
    with es.lock:  # the fake answers nothing while a test holds its lock, like a master busy deleting files
        with pytest.raises(BackupError, match=r"no answer within 0.2 s"):
            driver(expire_timeout=0.2).expire(manifest, store)
