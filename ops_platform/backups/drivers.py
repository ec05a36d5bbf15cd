"""Which driver backs up which datastore: (engine, method) of the spec -> driver instance."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ops_platform.backups.base import BackupDriver
from ops_platform.errors import MissingSettingError
from ops_platform.spec import Datastore


@dataclass(frozen=True)
class DriverServices:
    """What drivers may need from the environment, each made only when a driver asks.

    ``kubernetes`` builds the cluster client (Velero, Neo4j Jobs);
    ``object_store`` is the ObjectStoreResource, whose S3 settings pgBackRest
    shares; ``environ`` is where passwords and tool settings are read.
    """

    kubernetes: Callable[[], Any]
    object_store: Any = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def password(self, datastore: Datastore) -> str | None:
        return self._secret(datastore.connection.password_env, f"datastore '{datastore.name}' ({datastore.engine})",
                            "the password named by connection.password_env in the platform spec")

    def target_password(self, datastore: Datastore) -> str | None:
        restore_test = datastore.restore_test
        if restore_test is None or restore_test.target.password_env is None:
            return self.password(datastore)
        return self._secret(restore_test.target.password_env, f"the restore test of '{datastore.name}'",
                            "the password named by restore_test.target.password_env")

    def _secret(self, name: str | None, needed_for: str, hint: str) -> str | None:
        if name is None:
            return None
        value = self.environ.get(name)
        if not value:
            raise MissingSettingError(name, needed_for, hint)
        return value


def build_driver(datastore: Datastore, services: DriverServices) -> BackupDriver:
    engine, method = datastore.engine, datastore.method
    if engine == "postgresql" and method == "pg_dump":
        from ops_platform.backups.postgres_dump import PostgresDumpDriver

        return PostgresDumpDriver(target_password=_optional(services.target_password, datastore))
    if engine == "postgresql" and method == "pgbackrest":
        from ops_platform.backups.postgres_pgbackrest import PgBackRestDriver, PgBackRestRepo
        from ops_platform.local_servers.postgres import service_user

        return PgBackRestDriver(
            PgBackRestRepo.from_settings(_pgbackrest_settings(services)),
            run_as=service_user(),
            pg_socket_path=services.environ.get("PGBACKREST_PG1_SOCKET_PATH"),
            source_password=_optional(services.password, datastore),
        )
    if engine == "redis":
        from ops_platform.backups.redis_rdb import RedisRdbDriver

        return RedisRdbDriver(target_password=_optional(services.target_password, datastore))
    if engine == "etcd":
        from ops_platform.backups.etcd_snapshot import EtcdSnapshotDriver, client_ssl_context

        return EtcdSnapshotDriver(ssl_context=client_ssl_context(datastore.connection))
    if engine == "elasticsearch":
        from ops_platform.backups.elasticsearch_snapshot import ElasticsearchSnapshotDriver

        return ElasticsearchSnapshotDriver(password_for=services.environ.get)
    if engine == "milvus":
        from ops_platform.backups.milvus_backup import MilvusBackupDriver, MilvusRestCollections

        options = datastore.milvus
        assert options is not None  # the spec requires the section
        # Restored collections are counted and dropped in the target's Milvus, with the target's token.
        target = datastore.restore_test.target if datastore.restore_test else None
        token_env = (target.password_env if target and options.restore_server_url else None) or options.token_env
        token = services.environ.get(token_env) if token_env else None
        return MilvusBackupDriver(MilvusRestCollections(
            options.restore_server_url or options.server_url, token=token,
            setting="milvus.restore_server_url" if options.restore_server_url else "milvus.server_url"))
    if engine == "neo4j":
        from ops_platform.backups.neo4j_backup import Neo4jBackupDriver

        assert datastore.neo4j is not None
        return Neo4jBackupDriver(
            services.kubernetes(),
            method=method,
            service_account=datastore.neo4j.service_account,
            data_claim=datastore.neo4j.data_claim,
        )
    if engine == "velero":
        from ops_platform.backups.velero_backup import VeleroBackupDriver

        return VeleroBackupDriver(services.kubernetes())
    raise AssertionError(f"the spec admitted {engine}/{method}, which has no driver")


def _optional(getter: Callable[[Datastore], str | None], datastore: Datastore) -> str | None:
    try:
        return getter(datastore)
    except MissingSettingError:
        return None


def _pgbackrest_settings(services: DriverServices) -> dict[str, str]:
    """pgBackRest's repository settings: the environment, with the object store's bucket and KMS key."""
    settings = dict(services.environ)
    store = services.object_store
    if store is not None:
        for name, value in (("OPS_BACKUP_BUCKET", store.bucket), ("OPS_BACKUP_KMS_KEY_ID", store.kms_key_id),
                            ("AWS_REGION", store.region)):
            if value and not settings.get(name):
                settings[name] = value
    return settings
