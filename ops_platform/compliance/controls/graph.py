"""What this asset graph's own runs prove: backups, restore tests, certificates (InfraSpec §7).

The evidence is the check results those runs yielded (see
:class:`~ops_platform.compliance.evidence.GraphEvidence`); objectives are per
datastore. Each outcome links the run that produced its evidence (the run's
URL, else its run id), so a reader can open the proof.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from ops_platform.compliance.evidence import BackupEvidence, Evidence, FailedRun, RestoreTestEvidence
from ops_platform.compliance.model import ControlConfig, Outcome, control


def _link(run_id: str | None, url: str | None) -> str | None:
    return url or (f"run {run_id}" if run_id else None)


def _failed_run_link(failed: FailedRun) -> str | None:
    return _link(failed.run_id, failed.url)


def _recency(backup: BackupEvidence) -> float:
    return backup.recovery_point.timestamp() if backup.recovery_point else float("-inf")


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:,.0f} min"


@control(
    id="OPS-BACKUP-001",
    title="The latest backup of each datastore is within the RPO",
    severity="ERROR",
    requirement="InfraSpec §7.1, §7.2 (RPO ≤ 1 h); infra plan §11.1 (Requirements 10.1, 10.3)",
    framework=None,
    remediation="""Look at the datastore's backups/<datastore> asset: fix the failing run or
        its schedule, then materialize it; the RPO is the datastore's rpo_minutes in infra/platform.yaml
        (else objectives.rpo_minutes).""",
    evidence=("graph",),
)
def backups_within_rpo(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    graph = evidence.graph
    if graph is None:
        return
    latest: dict[str, BackupEvidence] = {}
    for backup in graph.backups:
        current = latest.get(backup.datastore)
        if current is None or _recency(backup) > _recency(current):
            latest[backup.datastore] = backup
    for datastore in sorted(set(graph.datastores) | set(latest) | set(graph.failed_backups)):
        subject = f"Datastore {datastore}"
        backup = latest.get(datastore)
        failed = graph.failed_backups.get(datastore)
        failed_note = ""
        if failed is not None:
            where = _failed_run_link(failed)
            failed_note = f"; the latest backup run failed: {failed.description}" + (f" ({where})" if where else "")
        if backup is None:
            yield Outcome(subject, False, "no verified backup found" + failed_note,
                          _failed_run_link(failed) if failed else None)
            continue
        link = _link(backup.run_id, backup.url)
        if backup.recovery_point is None:
            yield Outcome(subject, False, f"backup {backup.backup_id} has no recovery point{failed_note}", link)
            continue
        rpo_minutes = graph.rpo_for(datastore)
        age = graph.now - backup.recovery_point
        verdict = (
            f"latest verified recovery point {backup.recovery_point:%Y-%m-%d %H:%M %Z} ({_minutes(age)} old, "
            f"RPO {rpo_minutes} min), backup {backup.backup_id}{failed_note}"
        )
        yield Outcome(subject, age <= timedelta(minutes=rpo_minutes), verdict, link)


@control(
    id="OPS-RESTORE-001",
    title="The latest restore test of each datastore passed within the RTO",
    severity="ERROR",
    requirement="InfraSpec §7.2 (RTO ≤ 15 min), §7.1 weekly test restores; infra plan §11.3 (Requirements 10.4)",
    framework=None,
    remediation="""Open the restore_tests/<datastore> run linked: fix the restore or speed it
        up (parallelism, smaller base backups); the RTO is the datastore's rto_minutes (else
        objectives.rto_minutes).""",
    evidence=("graph",),
)
def restore_tests_within_rto(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    graph = evidence.graph
    if graph is None:
        return
    latest: dict[str, RestoreTestEvidence] = {}
    for test in graph.restore_tests:
        if test.datastore not in latest or test.finished_at > latest[test.datastore].finished_at:
            latest[test.datastore] = test
    for datastore in sorted(set(graph.restore_tested) | set(latest)):
        subject = f"Datastore {datastore}"
        test = latest.get(datastore)
        if test is None:
            yield Outcome(subject, False, "no restore test found")
            continue
        rto_minutes = graph.rto_for(datastore)
        rto_seconds = rto_minutes * 60
        link = _link(test.run_id, test.url)
        when = f"{test.finished_at:%Y-%m-%d %H:%M %Z}"
        if not test.passed:
            why = f": {test.description}" if test.description else ""
            yield Outcome(subject, False, f"latest restore test ({when}) failed{why}", link)
        elif test.restore_seconds is None:
            yield Outcome(subject, False, f"latest restore test ({when}) recorded no restore time", link)
        elif test.restore_seconds > rto_seconds:
            yield Outcome(
                subject, False,
                f"latest restore test ({when}) took {test.restore_seconds / 60:,.1f} min, "
                f"over the RTO of {rto_minutes} min",
                link,
            )
        else:
            yield Outcome(
                subject, True,
                f"latest restore test ({when}) passed in {test.restore_seconds / 60:,.1f} min "
                f"(RTO {rto_minutes} min)",
                link,
            )


@control(
    id="OPS-CERT-001",
    title="No certificate is near expiry",
    severity="ERROR",
    requirement="infra plan §10.2 (Requirements 9.2): automatic certificate renewal",
    framework=None,
    remediation="""Run certificates/renewals (or the renew_certificate playbook) and check the
        cert-manager Certificate's events; fail_below_days is certificates.fail_below_days. A failed
        inventory: open its run and fix what it names (cluster access, OPS_TRUST_ROOTS).""",
    evidence=("graph",),
)
def certificates_not_expiring(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    graph = evidence.graph
    if graph is None:
        return
    if graph.failed_inventory is not None:
        failed = graph.failed_inventory
        yield Outcome("Certificate inventory", False,
                      f"the latest certificate inventory run failed: {failed.description}", _failed_run_link(failed))
        return
    if not graph.inventory_taken:
        yield Outcome("Certificate inventory", False, "no certificate inventory has run (certificates/inventory)")
        return
    for certificate in sorted(graph.certificates, key=lambda c: c.name):
        subject = f"Certificate {certificate.name}"
        link = _link(certificate.run_id, certificate.url)
        if certificate.not_before is not None and graph.now < certificate.not_before:
            yield Outcome(subject, False, f"not valid until {certificate.not_before:%Y-%m-%d %H:%M %Z}", link)
            continue
        if certificate.days_left is None:
            yield Outcome(subject, False, "expiry unknown: the inventory could not read this certificate", link)
            continue
        days = f"{certificate.days_left:,.1f} days left (threshold {graph.fail_below_days})"
        passed = certificate.days_left >= graph.fail_below_days
        yield Outcome(subject, passed, days if passed else f"expires soon: {days}", link)


CONTROLS = [backups_within_rpo, restore_tests_within_rto, certificates_not_expiring]
