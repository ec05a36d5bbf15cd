"""The preflight of each backup driver: the spec's settings against what the driver needs.

Static: the shipped spec passes, and each broken variant of it fails at load
with the datastore and the field named. Live: real directories, ports and
redis-server; the Elasticsearch, milvus-backup and Kubernetes fakes for the
engines that cannot run here.
"""

from __future__ import annotations

import copy
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops_platform.backups.base import RestoreRefused
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.drivers import DriverServices
from ops_platform.backups.elasticsearch_snapshot import ElasticsearchSnapshotDriver
from ops_platform.backups.milvus_backup import MilvusBackupDriver, MilvusRestCollections
from ops_platform.backups.preflight import (
    preflight_live,
    preflight_static,
    require_preflight,
)
from ops_platform.backups.redis_rdb import RedisRdbDriver
from ops_platform.backups.restore_target import SCRATCH_MARK_FILE
from ops_platform.backups.restore_test import run_restore_test
from ops_platform.backups.velero_backup import RESTORE_TEST_LABEL, VeleroBackupDriver
from ops_platform.local_servers.process import free_port
from ops_platform.local_servers.redis import RedisServer
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore
from ops_platform.spec import DEFAULT_SPEC_PATH, Datastore, SpecError, load_spec
from tests.fakes.elasticsearch import ElasticsearchFake
from tests.fakes.milvus_backup import MilvusBackupFake
from tests.fixtures.backup_sources import redis_backup_source  # noqa: F401

SHIPPED = yaml.safe_load(DEFAULT_SPEC_PATH.read_text())
SANDBOX_PATH = DEFAULT_SPEC_PATH.parent / "sandbox.yaml"
ES_PASSWORD = "es-secret"
MILVUS_TOKEN = "root:Milvus"


def test_the_shipped_specs_pass_the_static_preflight() -> None:
    for path in (DEFAULT_SPEC_PATH, SANDBOX_PATH):
        spec = load_spec(path)
        assert spec.datastores, path
        assert {store.name: preflight_static(store) for store in spec.datastores} == {
            store.name: [] for store in spec.datastores}


def _store(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(store for store in raw["datastores"] if store["name"] == name)


def _target(name: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: _store(raw, name)["restore_test"]["target"].update(changes)


def _drop_target_field(name: str, field: str) -> Callable[[dict[str, Any]], None]:
    return lambda raw: _store(raw, name)["restore_test"]["target"].pop(field)


def _eks_etcd(raw: dict[str, Any]) -> None:
    """What the spec shipped before: the EKS control plane's etcd, over https, without client TLS."""
    raw["datastores"].append({
        "name": "etcd_control_plane", "engine": "etcd", "method": "snapshot", "layer": "cluster",
        "connection": {"endpoints": ["https://10.0.1.10:2379", "https://10.0.2.10:2379"]},
        "schedule": "5,35 * * * *",
        "restore_test": {"target": {"host": "127.0.0.1", "port": 22379, "data_dir": "/tmp/etcd-restore-test"}},
    })


def _milvus(raw: dict[str, Any], **changes: Any) -> None:
    _store(raw, "milvus_vectors")["milvus"].update(changes)


def _pop_milvus(field: str) -> Callable[[dict[str, Any]], None]:
    return lambda raw: _store(raw, "milvus_vectors")["milvus"].pop(field)


def _velero_into_data(raw: dict[str, Any]) -> None:
    _store(raw, "cluster_state")["velero"]["included_namespaces"] = ["data"]
    _store(raw, "cluster_state")["restore_test"]["target"]["namespace"] = "data"


BROKEN = {
    "etcd over https without client TLS": (
        _eks_etcd, "etcd_control_plane", "connection.ca_file: endpoint https://10.0.1.10:2379 is TLS"),
    "redis restore target without data_dir": (
        _drop_target_field("redis_cache", "data_dir"), "redis_cache", "restore_test.target.data_dir: required"),
    "redis scratch server on a network address": (
        _target("redis_cache", host="onto-redis-restore.ops.svc.cluster.local"), "redis_cache",
        "restore_test.target.host: onto-redis-restore.ops.svc.cluster.local is not a loopback address"),
    "redis restore target that is the source": (
        _target("redis_cache", host="onto-redis.data.svc", port=6379), "redis_cache",
        "restore_test.target onto-redis.data.svc:6379 is the source onto-redis.data.svc.cluster.local:6379"),
    "pgbackrest restore target a remote Service": (
        _target("postgres_main", host="onto-pg-restore-test.ops.svc.cluster.local", port=5432), "postgres_main",
        "restore_test.target.host: onto-pg-restore-test.ops.svc.cluster.local is not a loopback address"),
    "pgbackrest restore target without a port": (
        _drop_target_field("postgres_main", "port"), "postgres_main", "restore_test.target.port: required"),
    "pgbackrest pg_host pinned to one pod": (
        lambda raw: _store(raw, "postgres_main")["pgbackrest"].update(pg_host="onto-pg-1.data.svc.cluster.local"),
        "postgres_main", "pgbackrest.pg_host: onto-pg-1.data.svc.cluster.local names one pod"),
    "elasticsearch restore into the live cluster": (
        _target("elasticsearch_logs", url="https://onto-es-http.logging.svc.cluster.local:9200"),
        "elasticsearch_logs", "restore_test.target.url https://onto-es-http.logging.svc.cluster.local:9200 is the "
                              "source"),
    "elasticsearch into_source with a scratch target": (
        lambda raw: _store(raw, "elasticsearch_logs")["restore_test"].update(into_source=True),
        "elasticsearch_logs", "restore_test.into_source: true, but restore_test.target.url"),
    "elasticsearch without rename_prefix": (
        lambda raw: _store(raw, "elasticsearch_logs")["restore_test"].pop("rename_prefix"),
        "elasticsearch_logs", "restore_test.rename_prefix: required"),
    "milvus restore through the live milvus-backup": (
        _target("milvus_vectors", url="http://milvus-backup.data.svc.cluster.local:8080"), "milvus_vectors",
        "restore_test.target.url http://milvus-backup.data.svc.cluster.local:8080 is the source"),
    "milvus scratch restore counted nowhere": (
        _pop_milvus("restore_server_url"), "milvus_vectors", "milvus.restore_server_url: required"),
    "milvus scratch restore counted in the live Milvus": (
        lambda raw: _milvus(raw, restore_server_url="http://onto-milvus.data.svc:19530"), "milvus_vectors",
        "milvus.restore_server_url: http://onto-milvus.data.svc:19530 is milvus.server_url"),
    "velero restore into a backed-up namespace": (
        _velero_into_data, "cluster_state",
        "restore_test.target.namespace: restore of namespace data into data refused"),
    "velero restore test verifying a workload": (
        lambda raw: _store(raw, "cluster_state")["restore_test"].update(
            verify_keys=["apps/v1 Deployment ontology-editor/onto-backend"]),
        "cluster_state", "restore_test.verify_keys[0]: a Velero restore test restores data only"),
    "neo4j restore as the system database": (
        _target("neo4j_graph", database="system"), "neo4j_graph", "restore_test.target.database: 'system'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_variant_of_the_shipped_spec_fails_at_load_with_the_field_named(tmp_path: Path, case: str) -> None:
    mutate, name, problem = BROKEN[case]
    raw = copy.deepcopy(SHIPPED)
    mutate(raw)
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    index = [store["name"] for store in raw["datastores"]].index(name)
    [found] = [p for p in caught.value.problems if p.startswith(f"datastores[{index}:{name}]: ")]
    assert problem in found, found


def test_a_pg_dump_scratch_server_must_be_local() -> None:
    with pytest.raises(ValueError, match=r"restore_test.target.host: db.ops.svc is not a loopback address, but "
                                         r"restore_test.target.data_dir asks the driver to start a scratch server"):
        Datastore.model_validate({
            "name": "pg", "engine": "postgresql", "method": "pg_dump",
            "connection": {"host": "onto-pg-rw.data.svc", "port": 5432, "database": "ontology", "user": "ops"},
            "restore_test": {"target": {"host": "db.ops.svc", "port": 5432, "database": "scratch", "user": "ops",
                                        "data_dir": "/tmp/pg-restore"}},
        })


# -- live: local scratch servers (real directories, ports, redis-server) -----------------------


def redis_store(source: RedisServer, **target: Any) -> Datastore:
    return Datastore.model_validate({
        "name": "redis_cache", "engine": "redis", "method": "rdb",
        "connection": {"host": source.host, "port": source.port, "password_env": "REDIS_PASSWORD"},
        "restore_test": {"target": {"host": "127.0.0.1", "port": free_port(), **target}},
    })


def test_a_target_that_resolves_to_the_source_is_refused_by_run_restore_test_before_any_write(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    # "127.1" is 127.0.0.1 once resolved: the spec cannot tell them apart by name, the run can.
    datastore = redis_store(redis_backup_source, host="127.1", port=redis_backup_source.port,
                            data_dir=str(tmp_path / "scratch"))
    assert preflight_static(datastore) == []
    with pytest.raises(RestoreRefused, match=rf"refused before writing anything: restore_test.target "
                                             rf"127.1:{redis_backup_source.port} is the source "
                                             r".*same resolved address"):
        run_restore_test(datastore, RedisRdbDriver(), BackupCatalog(LocalObjectStore(tmp_path / "store"),
                                                                    datastore.name), tmp_path)
    assert not (tmp_path / "scratch").exists()


def test_a_scratch_directory_that_is_not_ours_or_cannot_be_made_fails_the_live_preflight(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "appendonly.aof").write_text("someone's data")
    [problem] = preflight_live(redis_store(redis_backup_source, data_dir=str(foreign)), RedisRdbDriver())
    assert problem.startswith(f"restore_test.target.data_dir: {foreign} is not empty and was not made by a restore "
                              "test")
    with pytest.raises(RestoreRefused, match="refused before writing anything: restore_test.target.data_dir"):
        run_restore_test(redis_store(redis_backup_source, data_dir=str(foreign)), RedisRdbDriver(),
                         BackupCatalog(LocalObjectStore(tmp_path / "store"), "redis_cache"), tmp_path)
    assert [p.name for p in foreign.iterdir()] == ["appendonly.aof"]

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    [problem] = preflight_live(redis_store(redis_backup_source, data_dir=str(a_file / "scratch")), RedisRdbDriver())
    assert problem == (f"restore_test.target.data_dir: {a_file / 'scratch'} cannot be created: "
                       f"{a_file} is not a directory")

    # /proc refuses a new directory even to root, as /var/lib refuses it to uid 10001
    [problem] = preflight_live(redis_store(redis_backup_source, data_dir="/proc/ops-restore-test"), RedisRdbDriver())
    assert problem.startswith("restore_test.target.data_dir: /proc/ops-restore-test cannot be created or written by "
                              "uid ")

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / SCRATCH_MARK_FILE).write_text("")
    assert preflight_live(redis_store(redis_backup_source, data_dir=str(ours)), RedisRdbDriver()) == []
    assert preflight_live(redis_store(redis_backup_source, data_dir=str(tmp_path / "new" / "dir")),
                          RedisRdbDriver()) == []
    assert not (tmp_path / "new").exists(), "the preflight creates nothing"


def test_a_busy_port_a_foreign_host_and_a_missing_tool_fail_the_live_preflight(
    redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        [problem] = preflight_live(redis_store(redis_backup_source, port=port, data_dir=str(tmp_path / "s")),
                                   RedisRdbDriver())
    assert problem.startswith(f"restore_test.target.port: something already listens on 127.0.0.1:{port}")

    problems = preflight_live(redis_store(redis_backup_source, data_dir=str(tmp_path / "s")),
                              RedisRdbDriver(redis_check_rdb=str(tmp_path / "no-such-redis-check-rdb")))
    assert problems == [f"redis-check-rdb: {tmp_path / 'no-such-redis-check-rdb'} is not an executable file on this "
                        "machine; install it there or give the driver the right path"]

    datastore = redis_store(redis_backup_source, data_dir=str(tmp_path / "s"))
    elsewhere = datastore.model_copy(update={"restore_test": datastore.restore_test.model_copy(update={
        "target": datastore.restore_test.target.model_copy(update={"host": "192.0.2.10"})})})
    problems = preflight_live(elsewhere, RedisRdbDriver())
    assert any(p.startswith("restore_test.target.host: 192.0.2.10 is not a loopback address") for p in problems)
    assert any(p.startswith("restore_test.target.host: 192.0.2.10 is not an address of this machine") for p in problems)


def test_secrets_the_operation_needs_are_named_when_unset(redis_backup_source: RedisServer, tmp_path: Path  # noqa: F811
                                                          ) -> None:
    datastore = redis_store(redis_backup_source, data_dir=str(tmp_path / "s"))
    services = DriverServices(kubernetes=lambda: None, environ={})
    [problem] = preflight_live(datastore, RedisRdbDriver(), services, operation="backup")
    assert problem.startswith("REDIS_PASSWORD: datastore 'redis_cache' (redis) needs REDIS_PASSWORD, which is not set")
    with pytest.raises(Exception, match=r"backup of 'redis_cache' refused before writing anything: REDIS_PASSWORD"):
        require_preflight(datastore, RedisRdbDriver(), services, operation="backup")
    services = DriverServices(kubernetes=lambda: None, environ={"REDIS_PASSWORD": "x"})
    assert preflight_live(datastore, RedisRdbDriver(), services, operation="backup") == []


# -- live: Elasticsearch, Milvus, Velero (their fakes) ----------------------------------------


@pytest.fixture
def es() -> Iterator[ElasticsearchFake]:
    with ElasticsearchFake(password=ES_PASSWORD) as fake:
        fake.indices.update({"logs-2026.11.22": 3000, "onto-concepts": 2000})
        fake.add_repository("onto-snapshots")
        yield fake


@pytest.fixture
def es_scratch(es: ElasticsearchFake) -> Iterator[ElasticsearchFake]:
    with ElasticsearchFake(password=ES_PASSWORD, snapshots=es.snapshots) as fake:
        yield fake


def es_store(source: str, target: str, *, into_source: bool = False) -> Datastore:
    return Datastore.model_validate({
        "name": "elasticsearch_logs", "engine": "elasticsearch", "method": "snapshot",
        "connection": {"url": source, "user": "ops_backup", "password_env": "ES_PASSWORD"},
        "elasticsearch": {"repository": "onto-snapshots", "indices": ["logs-*", "onto-*"]},
        "restore_test": {"target": {"url": target}, "rename_prefix": "restore-test-", "into_source": into_source},
    })


def es_driver() -> ElasticsearchSnapshotDriver:
    return ElasticsearchSnapshotDriver(password_for={"ES_PASSWORD": ES_PASSWORD}.get)


def test_elasticsearch_live_preflight(es: ElasticsearchFake, es_scratch: ElasticsearchFake) -> None:
    es_scratch.cluster_uuid = es.cluster_uuid  # the scratch URL reaches the source cluster after all
    [problem] = preflight_live(es_store(es.url, es_scratch.url), es_driver())
    assert problem.startswith(f"restore_test.target.url: {es_scratch.url} answers as the source cluster")
    es_scratch.cluster_uuid = "another-cluster"

    es_scratch.add_repository("onto-snapshots")
    [problem] = preflight_live(es_store(es.url, es_scratch.url), es_driver())
    assert problem.startswith("elasticsearch.repository: 'onto-snapshots' is registered writable in the restore target")
    es_scratch.add_repository("onto-snapshots", readonly=True)
    assert preflight_live(es_store(es.url, es_scratch.url), es_driver()) == []
    es_scratch.repositories.clear()
    assert preflight_live(es_store(es.url, es_scratch.url), es_driver()) == []
    assert es_scratch.writes() == [] and es.writes() == []

    primaries = 5000 * es.bytes_per_doc
    es.nodes[0]["available"] = es.nodes[0]["total"] - int(es.nodes[0]["total"] * 0.95) + 2 * primaries - 1
    [problem] = preflight_live(es_store(es.url, es.url, into_source=True), es_driver())
    assert problem.startswith(f"restore_test.into_source: {es.url} has {2 * primaries - 1} bytes of room below its "
                              "flood-stage watermark (95%)")
    es.nodes[0]["available"] += 1
    assert preflight_live(es_store(es.url, es.url, into_source=True), es_driver()) == []


@pytest.fixture
def milvus() -> Iterator[MilvusBackupFake]:
    with MilvusBackupFake(token=MILVUS_TOKEN) as fake:
        fake.collections.update({("default", "concept_vectors"): 5000})
        yield fake


def milvus_store(source: MilvusBackupFake, target: str, restore_server_url: str | None) -> Datastore:
    into_source = restore_server_url is None
    return Datastore.model_validate({
        "name": "milvus_vectors", "engine": "milvus", "method": "milvus_backup",
        "connection": {"url": source.backup_url},
        "milvus": {"server_url": source.milvus_url, "collections": ["concept_vectors"],
                   **({} if into_source else {"restore_server_url": restore_server_url})},
        "restore_test": {"target": {"url": target}, "rename_prefix": "restore_test_", "into_source": into_source},
    })


def test_milvus_live_preflight(milvus: MilvusBackupFake) -> None:
    with MilvusBackupFake(token=MILVUS_TOKEN, backups=milvus.backups, lock=milvus.lock) as scratch:
        alias = milvus.milvus_url.replace("127.0.0.1", "127.1")  # the spec names another Milvus; DNS disagrees
        datastore = milvus_store(milvus, scratch.backup_url, alias)
        [problem] = preflight_live(datastore, MilvusBackupDriver(MilvusRestCollections(alias, token=MILVUS_TOKEN)))
        assert problem.startswith(f"milvus.restore_server_url: {alias} is the source Milvus")

        datastore = milvus_store(milvus, scratch.backup_url, scratch.milvus_url)
        driver = MilvusBackupDriver(MilvusRestCollections(scratch.milvus_url, token=MILVUS_TOKEN))
        assert preflight_live(datastore, driver) == []

    datastore = milvus_store(milvus, milvus.backup_url, None)
    driver = MilvusBackupDriver(MilvusRestCollections(milvus.milvus_url, token=MILVUS_TOKEN))
    assert preflight_live(datastore, driver) == []
    milvus.collections[("default", "restore_test_concept_vectors")] = 1
    [problem] = preflight_live(datastore, driver)
    assert problem.startswith("restore_test.rename_prefix: default.restore_test_concept_vectors already exist in the "
                              "source Milvus")
    assert [r for r in milvus.writes() if r.path.endswith("/drop")] == []

    milvus.stop()
    [problem] = preflight_live(datastore, driver)
    assert problem.startswith(f"restore_test.target.url: milvus-backup: connection refused at {milvus.backup_url}")


@pytest.fixture
def kube(kube_cluster, kube_crds, tmp_path: Path) -> Iterator[tuple[KubernetesClient, str]]:
    """The code location's identity on the real server; Velero's namespace and its Schedule made as admin."""
    velero = f"velero-{uuid.uuid4().hex[:6]}"
    kube_cluster.create_namespace(velero)
    kube_cluster.put_object({"apiVersion": "velero.io/v1", "kind": "Schedule",
                             "metadata": {"name": "onto-cluster-daily", "namespace": velero},
                             "spec": {"schedule": "0 3 * * *", "template": {
                                 "includedNamespaces": ["ontology-editor", "data"], "snapshotVolumes": True}}})
    client = KubernetesResource(kubeconfig=str(kube_cluster.write_kubeconfig(tmp_path / "kubeconfig"))).get_client()
    yield client, velero
    kube_cluster.delete_object("v1", "Namespace", velero)
    kube_cluster.delete_object("v1", "Namespace", f"{velero}-restore-data")


def velero_store(velero: str, schedule: str = "onto-cluster-daily") -> Datastore:
    return Datastore.model_validate({
        "name": "cluster_state", "engine": "velero", "method": "velero",
        "connection": {"namespace": velero},
        "velero": {"schedule": schedule, "included_namespaces": ["ontology-editor", "data"]},
        "restore_test": {"target": {"namespace": f"{velero}-restore"}},
    })


def test_velero_live_preflight(kube, kube_cluster) -> None:
    client, velero = kube
    driver = VeleroBackupDriver(client)
    [problem] = preflight_live(velero_store(velero, "onto-cluster-hourly"), driver)
    assert problem.startswith(f"velero.schedule: no Schedule 'onto-cluster-hourly' in namespace {velero}")

    scratch = f"{velero}-restore-data"
    kube_cluster.create_namespace(scratch)  # someone else's namespace where the restore test would write
    [problem] = preflight_live(velero_store(velero), driver)
    assert problem.startswith(f"restore_test.target.namespace: scratch namespace {scratch} exists and "
                              "was not made by a restore test of 'cluster_state'")

    kube_cluster.create_namespace(scratch, {RESTORE_TEST_LABEL: "cluster_state"})
    assert preflight_live(velero_store(velero), driver) == []
