"""What every backup driver is: back up -> BackupOutcome, verify, restore into a scratch target.

Plain Python, no Dagster import. A driver module (``postgres_dump.py``,
``redis.py``, ...) holds one class implementing :class:`BackupDriver` for
one engine and method of the spec; :mod:`ops_platform.backups.drivers` maps
(engine, method) to it. The catalog (:mod:`ops_platform.backups.catalog`)
owns the layout in the object store and writes the manifest, so a driver
only streams its artifacts into the keys it is given and says what a restore
will need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ops_platform.errors import OpsPlatformError
from ops_platform.spec import Datastore, RestoreTest

if TYPE_CHECKING:  # the object store pulls in boto3 and dagster; the spec's preflight needs only this module
    from ops_platform.resources.object_store import ObjectStore, StoredObject


class BackupError(OpsPlatformError):
    """A backup failed; nothing it wrote was committed, the previous backup stays the latest."""


class RestoreError(OpsPlatformError):
    """A restore into the scratch target failed; the scratch target was cleaned up."""


class RestoreRefused(OpsPlatformError):
    """A restore was refused before anything was written (target is the source, bad artifact)."""


@dataclass(frozen=True)
class Artifact:
    """One object of a backup in the object store."""

    name: str  # file name within the backup, e.g. "dump.pgdump"
    key: str  # store key
    size: int
    sha256: str
    url: str
    encryption: str | None = None

    @classmethod
    def from_stored(cls, name: str, stored: StoredObject) -> Artifact:
        if stored.sha256 is None:
            raise BackupError(f"object store returned no sha256 for {stored.url}")
        return cls(name, stored.key, stored.size, stored.sha256, stored.url, stored.encryption)


@dataclass(frozen=True)
class BackupJob:
    """Everything a driver needs to take one backup.

    ``artifact_key(name)`` gives the store key for an artifact file of this
    backup; a driver writes only there.
    """

    datastore: Datastore
    store: ObjectStore
    partition: str
    backup_id: str
    prefix: str  # "backups/<datastore>/<partition>/<backup_id>/"
    password: str | None = None  # resolved from the datastore's password_env
    work_dir: Path | None = None  # scratch space for tools that need a file
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def artifact_key(self, name: str) -> str:
        return f"{self.prefix}{name}"


@dataclass(frozen=True)
class BackupOutcome:
    """What a driver returns after a successful backup; the catalog turns it into a manifest."""

    artifacts: tuple[Artifact, ...]
    source_version: str
    recovery_point: datetime  # newest point in time this backup can restore
    restore: dict[str, Any]  # what a restore needs (format, tool version, label, ...)
    counts: dict[str, int] = field(default_factory=dict)  # rows / keys / documents at backup time
    details: dict[str, Any] = field(default_factory=dict)  # shown in metadata (tool output, ...)
    # Bytes read from the source (database size, dataset size); None when the tool does not say.
    source_bytes: int | None = None
    # Bytes the backup occupies where it is kept, when that is not our artifacts (pgBackRest's
    # repository, the engine's snapshot repository); None: the artifacts' sizes.
    stored_bytes: int | None = None


@dataclass(frozen=True)
class QueryResult:
    query: str
    value: Any
    ok: bool
    error: str | None = None


def key_query(query: str, count: Callable[[], int], errors: tuple[type[Exception], ...]) -> QueryResult:
    """A ``verify_keys`` query: it passes when ``count()`` finds at least one key; ``errors`` fail it."""
    try:
        found = count()
    except errors as error:
        return QueryResult(query, None, False, str(error))
    return QueryResult(query, found, found > 0, None if found else "no such key")


class Restored(Protocol):
    """A scratch target holding a restored backup, alive inside ``driver.restore(...)``."""

    description: str  # e.g. "postgresql 127.0.0.1:55433/ontology_restore_test"

    def counts(self) -> dict[str, int]:
        """Same keys as the manifest's counts, measured on the restored data."""
        ...

    def run_queries(self, queries: list[str]) -> list[QueryResult]:
        """The spec's verify_sql / verify_keys, run against the restored data."""
        ...

    # A driver that restores to a point in time (WAL replay) sets ``recovery_point`` to the
    # point the restore reached and proved; unset or None, the restore proved the backup's
    # own recovery point (the manifest's).


@dataclass(frozen=True)
class Verification:
    ok: bool
    problems: tuple[str, ...] = ()
    checked: dict[str, Any] = field(default_factory=dict)


class BackupDriver(Protocol):
    engine: str
    method: str

    def backup(self, job: BackupJob) -> BackupOutcome:
        """Take the backup, streaming artifacts into ``job.store`` under ``job.prefix``.

        On failure, raise :class:`BackupError` (or let the cause propagate)
        after removing what it wrote; never leave a half artifact under a key
        the catalog will commit.
        """
        ...

    def verify(self, manifest: Any, store: ObjectStore) -> Verification:
        """Integrity of a committed backup beyond our sha256 (e.g. ``pgbackrest verify``).

        A driver whose restore itself proves the artifact (hashing what it
        restores) sets ``restore_verifies_artifact = True``; the restore test
        then skips this second read.
        """
        ...

    def restore(
        self, manifest: Any, store: ObjectStore, restore_test: RestoreTest, work_dir: Path
    ) -> AbstractContextManager[Restored]:
        """Restore into ``restore_test.target`` (never the source) and yield it; clean up on exit."""
        ...

    # Optional: ``expire(manifest, store) -> str`` removes what the engine keeps of a backup that
    # retention drops (an Elasticsearch snapshot, a milvus-backup backup, a pgBackRest backup
    # set) and says what it removed; raises BackupError when it cannot. Drivers whose
    # backups live only in our artifacts do not define it.


def iter_chunks(stream: Any, size: int = 1024 * 1024) -> Iterator[bytes]:
    while True:
        chunk = stream.read(size)
        if not chunk:
            return
        yield chunk
