"""A restore test: prove the newest verified backup restores, with its data, within RTO and RPO.

Run the live preflight (:mod:`ops_platform.backups.preflight`: the target is
not the source by resolved address, the scratch target is ready), fetch the
newest verified backup, check its artifacts against the manifest again,
restore into the scratch target, compare counts with the manifest, run the
spec's verification queries, clean up, and measure. Plain Python; the Dagster
asset only records the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops_platform.backups.base import BackupDriver, QueryResult, RestoreRefused, Verification
from ops_platform.backups.catalog import BackupCatalog
from ops_platform.backups.manifest import BackupManifest
from ops_platform.backups.preflight import preflight_live
from ops_platform.spec import Datastore


@dataclass(frozen=True)
class RestoreTestResult:
    datastore: str
    backup_id: str
    partition: str
    target: str
    restore_seconds: float  # restore + verification, until the data was proven usable
    total_seconds: float  # including cleanup
    recovery_point: datetime  # the newest point the restore proved (PITR target, else the backup's)
    backup_age_seconds: float  # test start - proven recovery point: the data loss had disaster struck then
    expected_counts: dict[str, int]
    observed_counts: dict[str, int]
    queries: list[QueryResult]
    problems: list[str] = field(default_factory=list)
    recovery_note: str = ""  # how the driver chose the recovery point (e.g. why no point-in-time target)

    @property
    def verified(self) -> bool:
        return not self.problems


def compare_counts(
    expected: dict[str, int], observed: dict[str, int], tolerance: float = 0.0, *, replayed: bool = False
) -> list[str]:
    """Counts after the restore against the backup's.

    ``replayed``: the restore replayed changes past the backup (point-in-time
    recovery), so more than the backup held is expected; fewer is data loss.
    """
    problems = []
    for key, want in sorted(expected.items()):
        got = observed.get(key)
        if got is None:
            problems.append(f"{key}: missing after restore (backup had {want})")
        elif replayed and got >= want * (1 - tolerance):
            continue
        elif abs(got - want) > tolerance * max(want, 1):
            problems.append(f"{key}: {got} after restore, backup had {want}")
    return problems


def run_restore_test(
    datastore: Datastore,
    driver: BackupDriver,
    catalog: BackupCatalog,
    work_dir: Path,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    monotonic: Callable[[], float] = time.monotonic,
) -> RestoreTestResult:
    """Restore the newest verified backup of ``datastore`` into its restore-test target and verify it.

    Raises :class:`RestoreRefused` before anything is written when the live
    preflight finds a problem (the target is the source, the scratch target
    is not ready), there is no verified backup, or it no longer matches its
    checksum; a failed restore raises the driver's error after its cleanup.
    """
    test_started_at = now()
    restore_test = datastore.restore_test
    if restore_test is None:
        raise RestoreRefused(f"datastore '{datastore.name}' has no restore_test in the platform spec")
    problems = preflight_live(datastore, driver, operation="restore_test")
    if problems:
        raise RestoreRefused(
            f"restore test of '{datastore.name}' refused before writing anything: {'; '.join(problems)} "
            "(check restore_test in the platform spec)"
        )
    manifest = _newest_verified(catalog, datastore.name)
    problems = catalog.verify_artifacts(manifest)
    if problems:
        raise RestoreRefused(
            f"restore test of '{datastore.name}' refused: backup {manifest.backup_id} failed its "
            f"checksum ({'; '.join(problems)}); nothing was restored or deleted"
        )
    verification = (
        Verification(True) if getattr(driver, "restore_verifies_artifact", False)
        else driver.verify(manifest, catalog.store)
    )
    if not verification.ok:
        raise RestoreRefused(
            f"restore test of '{datastore.name}' refused: backup {manifest.backup_id} failed "
            f"verification ({'; '.join(verification.problems)}); nothing was restored or deleted"
        )

    queries_to_run = list(restore_test.verify_sql or restore_test.verify_keys)
    started = monotonic()
    with driver.restore(manifest, catalog.store, restore_test, work_dir) as restored:
        observed = restored.counts()
        queries = restored.run_queries(queries_to_run)
        restore_seconds = monotonic() - started
        target = restored.description
        proven = getattr(restored, "recovery_point", None)
        recovery_note = getattr(restored, "recovery_note", "") or ""
    total_seconds = monotonic() - started

    recovery_point = proven or manifest.recovery_point
    tolerance = float(manifest.restore.get("counts_tolerance", 0.0))
    found = compare_counts(manifest.counts, observed, tolerance, replayed=recovery_point > manifest.recovery_point)
    found += [f"query {q.query!r} failed: {q.error or q.value}" for q in queries if not q.ok]
    return RestoreTestResult(
        datastore=datastore.name,
        backup_id=manifest.backup_id,
        partition=manifest.partition,
        target=target,
        restore_seconds=restore_seconds,
        total_seconds=total_seconds,
        recovery_point=recovery_point,
        # A point-in-time target is taken after the test started: no data loss, not a negative one.
        backup_age_seconds=max(0.0, (test_started_at - recovery_point).total_seconds()),
        recovery_note=recovery_note,
        expected_counts=dict(manifest.counts),
        observed_counts=observed,
        queries=queries,
        problems=found,
    )


def _newest_verified(catalog: BackupCatalog, name: str) -> BackupManifest:
    listing = catalog.listing()
    newest = listing.newest_verified()
    if newest is None:
        unverified = len(listing.manifests) + len(listing.garbled)
        detail = (f"{unverified} backup(s) exist but none passed its verification" if unverified
                  else f"materialize backups/{name} first")
        raise RestoreRefused(f"no verified backup of '{name}' to restore ({detail}); nothing was restored")
    return newest


def result_rows(result: RestoreTestResult) -> list[dict[str, Any]]:
    keys = sorted(set(result.expected_counts) | set(result.observed_counts))
    return [
        {"what": key, "backup": result.expected_counts.get(key), "restored": result.observed_counts.get(key)}
        for key in keys
    ]
