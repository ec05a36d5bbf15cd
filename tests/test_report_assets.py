"""`certificates/inventory` and `compliance/report` in Dagster: real TLS endpoints, the fake
Kubernetes API, the manifests of a directory in place of a cluster, and the graph's own evidence.

The compliance report judges backups and restore tests by the checks their runs yielded. Those
runs are played here by small stand-in assets with the real keys and check names (the contract
of ops_platform/assets/backups.py), run for real on one Dagster instance.
"""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ops_platform.assets import certificates as certificate_assets
from ops_platform.assets import compliance as compliance_assets
from ops_platform.assets.backups import ARTIFACT_CHECKSUM, DATA_VERIFIED, RPO_WITHIN_OBJECTIVE, RTO_WITHIN_OBJECTIVE
from ops_platform.assets.keys import backup_key, restore_test_key
from ops_platform.certificates.checks import CHECKS
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore, ObjectStoreResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec

BASE = load_spec(DEFAULT_SPEC_PATH)
DATASTORE = "redis_cache"
RESTORE_CHECKS = (DATA_VERIFIED, RTO_WITHIN_OBJECTIVE, RPO_WITHIN_OBJECTIVE)
BACKUP_DAYS = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_date="2026-01-08")


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "OPS_TRUST_ROOTS", "DAGSTER_UI_URL"):
        monkeypatch.delenv(name, raising=False)


def checks_of(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def failure_of(result) -> str:
    [event] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return event.step_failure_data.user_failure_data.description


def with_endpoints(*endpoints: str):
    return BASE.model_copy(update={"certificates": BASE.certificates.model_copy(update={"endpoints": list(endpoints)})})


def trust(tls_ca, tmp_path, monkeypatch) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(tls_ca.pem)
    monkeypatch.setenv("OPS_TRUST_ROOTS", str(ca_file))


def run_inventory(spec, instance, kubernetes: KubernetesResource, checked_at: datetime | None = None):
    clock = (lambda: checked_at) if checked_at else certificate_assets.utc_now
    return dg.materialize(
        certificate_assets.build_certificate_assets(spec, clock=clock)[:1],
        resources={"kubernetes": kubernetes}, instance=instance, raise_on_error=False,
    )


# certificates/inventory


def test_the_inventory_run_judges_its_own_certificates(no_cluster, tls_ca, tls_server, tmp_path, monkeypatch):
    healthy = tls_server(tls_ca.issue(["127.0.0.1"], ip_addresses=["127.0.0.1"], days=90))
    expiring = tls_server(tls_ca.issue(["127.0.0.1"], ip_addresses=["127.0.0.1"], days=10))
    checked_at = datetime.now(UTC)
    early_issued = tls_ca.issue(["127.0.0.1"], ip_addresses=["127.0.0.1"], not_before=checked_at + timedelta(days=2),
                                not_after=checked_at + timedelta(days=92))
    early = tls_server(early_issued)
    trust(tls_ca, tmp_path, monkeypatch)
    spec = with_endpoints(healthy.endpoint(), expiring.endpoint(), early.endpoint())

    result = run_inventory(spec, dg.DagsterInstance.ephemeral(), KubernetesResource(), checked_at)

    assert result.success
    [event] = result.asset_materializations_for_node("certificates__inventory")
    assert event.metadata["certificates"].value == 3
    assert event.metadata["checked_at"].value == checked_at.timestamp()
    assert "no Kubernetes cluster is configured" in event.metadata["notes"].value
    assert "| days left | not before | not after |" in event.metadata["inventory"].value
    checks = checks_of(result)
    assert set(checks) == set(CHECKS)
    expiry = checks["expiry"]
    assert not expiry.passed and expiry.severity == dg.AssetCheckSeverity.ERROR
    assert f"{expiring.endpoint()}: expires on" in expiry.description
    assert f"{early.endpoint()}: not valid until" in expiry.description
    assert expiry.metadata["errors"].value == 2 and expiry.metadata["warnings"].value == 0
    assert {r.data["subject"] for r in expiry.metadata["findings"].value.records} == {expiring.endpoint(),
                                                                                       early.endpoint()}
    validity = {r.data["name"]: r.data for r in expiry.metadata["certificates"].value.records}
    assert set(validity) == {healthy.endpoint(), expiring.endpoint(), early.endpoint()}
    assert validity[early.endpoint()]["not_before"] == early_issued.certificate.not_valid_before_utc.isoformat()
    assert validity[early.endpoint()]["not_after"] == early_issued.certificate.not_valid_after_utc.isoformat()
    assert 9.9 < validity[expiring.endpoint()]["days_left"] < 10.1
    assert checks["chain_verifies"].passed and checks["endpoint_reachable"].passed
    assert checks["chain_verifies"].description == "no finding in 3 certificate(s)"


def test_renewal_window_findings_are_warnings(no_cluster, tls_ca, tls_server, tmp_path, monkeypatch):
    soon = tls_server(tls_ca.issue(["127.0.0.1"], ip_addresses=["127.0.0.1"], days=18))
    trust(tls_ca, tmp_path, monkeypatch)
    result = run_inventory(with_endpoints(soon.endpoint()), dg.DagsterInstance.ephemeral(), KubernetesResource())
    expiry = checks_of(result)["expiry"]
    assert not expiry.passed and expiry.severity == dg.AssetCheckSeverity.WARN
    assert "renew_before_days is 21" in expiry.description


NO_SECRETS = [{"apiGroups": ["cert-manager.io"], "resources": ["certificates"], "verbs": ["get", "list", "watch"]}]


def _assert_failed_every_check(result, said: str) -> None:
    assert not result.success
    assert result.asset_materializations_for_node("certificates__inventory") == []
    checks = checks_of(result)
    assert set(checks) == set(CHECKS)
    for check in checks.values():
        assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
        assert check.description.startswith("not judged: certificate inventory failed: kubernetes: list")
        assert said in check.description
    message = failure_of(result)
    assert message.startswith("certificate inventory failed: kubernetes: list") and said in message
    assert message.count("certificate inventory failed") == 1


def test_a_cluster_that_refuses_fails_every_check_and_the_run(no_cluster, kube_cluster, tmp_path):
    """A real 403: the identity's RBAC lacks list on Secrets."""
    kube_cluster.other_identity("no-secrets", NO_SECRETS)
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "no-secrets")
    result = run_inventory(with_endpoints(), dg.DagsterInstance.ephemeral(),
                           KubernetesResource(kubeconfig=str(kubeconfig)))
    _assert_failed_every_check(result, "was refused (403 Forbidden: secrets is forbidden")


def test_a_cluster_that_errs_fails_every_check_and_the_run_fake_injects_500(no_cluster, kube_api, kubeconfig_path):
    """On the fake: the real server cannot be made to answer 500 on demand."""
    kube_api.fail_next("GET", r"^/api/v1/secrets", 500)
    result = run_inventory(with_endpoints(), dg.DagsterInstance.ephemeral(),
                           KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake"))
    _assert_failed_every_check(result, "failed (500 Internal Server Error)")


def test_an_unreadable_trust_roots_file_fails_the_inventory_with_the_setting(no_cluster, tmp_path, monkeypatch):
    missing = tmp_path / "missing-ca.pem"
    monkeypatch.setenv("OPS_TRUST_ROOTS", str(missing))
    result = run_inventory(with_endpoints(), dg.DagsterInstance.ephemeral(), KubernetesResource())
    assert not result.success
    assert all(not c.passed for c in checks_of(result).values()) and len(checks_of(result)) == len(CHECKS)
    assert failure_of(result) == (
        f"certificate inventory failed: trust roots: cannot read {missing}: No such file or directory")


# compliance/report


class BackupRun(dg.Config):
    backup_id: str = ""
    recovery_point: float = 0.0
    fail: str = ""


class RestoreTestRun(dg.Config):
    restore_seconds: float = 120.0
    recovery_point: float = 0.0
    refuse: str = ""
    crash: str = ""


def stand_in_backup(datastore: str) -> dg.AssetsDefinition:
    """`backups/<datastore>` as the contract says: its run verifies the new backup and yields artifact_checksum
    (daily partitions, as the real one: the evidence does not depend on the partition a run was for)."""
    key = backup_key(datastore)

    @dg.asset(key=key, partitions_def=BACKUP_DAYS, check_specs=[dg.AssetCheckSpec(ARTIFACT_CHECKSUM, asset=key)])
    def backup(config: BackupRun):
        if config.fail:
            yield dg.AssetCheckResult(check_name=ARTIFACT_CHECKSUM, passed=False, description=config.fail)
            raise dg.Failure(config.fail)
        yield dg.MaterializeResult(check_results=[dg.AssetCheckResult(
            check_name=ARTIFACT_CHECKSUM, passed=True, description=f"backup {config.backup_id}: artifacts match",
            metadata={"backup_id": config.backup_id,
                      "recovery_point": dg.MetadataValue.timestamp(config.recovery_point),
                      "finished_at": dg.MetadataValue.timestamp(config.recovery_point + 30)},
        )])

    return backup


def stand_in_restore_test(datastore: str) -> dg.AssetsDefinition:
    """`restore_tests/<datastore>`: three checks; a refused test yields all three failed, then fails the run."""
    key = restore_test_key(datastore)

    @dg.asset(key=key, check_specs=[dg.AssetCheckSpec(name, asset=key) for name in RESTORE_CHECKS])
    def restore_test(config: RestoreTestRun):
        if config.crash:
            raise dg.Failure(config.crash)
        if config.refuse:
            for name in RESTORE_CHECKS:
                yield dg.AssetCheckResult(check_name=name, passed=False, description=f"not proven: {config.refuse}")
            raise dg.Failure(config.refuse)
        yield dg.MaterializeResult(check_results=[
            dg.AssetCheckResult(check_name=DATA_VERIFIED, passed=True, description="restored data matches"),
            dg.AssetCheckResult(check_name=RTO_WITHIN_OBJECTIVE, passed=True,
                                metadata={"restore_seconds": config.restore_seconds, "rto_seconds": 900}),
            dg.AssetCheckResult(check_name=RPO_WITHIN_OBJECTIVE, passed=True,
                                metadata={"recovery_point": dg.MetadataValue.timestamp(config.recovery_point),
                                          "data_loss_seconds": 600.0, "rpo_seconds": 3600}),
        ])

    return restore_test


def run_stand_in(asset: dg.AssetsDefinition, instance: dg.DagsterInstance, *, partition: str | None = None,
                 **config):
    if asset.partitions_def is not None and partition is None:
        partition = BACKUP_DAYS.get_last_partition_key()
    op = asset.node_def.name
    return dg.materialize([asset], instance=instance, raise_on_error=False, partition_key=partition,
                          run_config={"ops": {op: {"config": config}}})


@pytest.fixture
def report_spec(tmp_path):
    """One datastore (redis_cache, its RPO 30 min of its own) and an app namespace that passes the network controls."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "app.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "ontology-editor", "labels": {"ops-platform/app-namespace": "true"}}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "default-deny", "namespace": "ontology-editor"},
         "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}},
    ]))
    exceptions = tmp_path / "exceptions.yaml"
    exceptions.write_text("[]\n")
    store = BASE.datastore(DATASTORE).model_copy(update={"rpo_minutes": 30})
    return BASE.model_copy(update={
        "compliance": BASE.compliance.model_copy(update={"manifests": str(manifests), "exceptions": str(exceptions)}),
        "datastores": [store],
        "certificates": BASE.certificates.model_copy(update={"endpoints": []}),
    })


class Reports:
    """Runs compliance/report at a fixed moment and reads back the JSON report it stored."""

    def __init__(self, spec, instance: dg.DagsterInstance, store_dir: Path, now: datetime) -> None:
        self.assets = compliance_assets.build_compliance_assets(spec, clock=lambda: now)
        self.instance = instance
        self.store_dir = store_dir
        self.resources = {"kubernetes": KubernetesResource(),
                          "object_store": ObjectStoreResource(local_dir=str(store_dir))}

    def run(self):
        return dg.materialize(self.assets, resources=self.resources, instance=self.instance, raise_on_error=False)

    def failing(self, result=None) -> dict[tuple[str, str], dict]:
        """(control, object) -> the failing finding of the report the run stored."""
        result = result or self.run()
        assert result.success
        [event] = result.asset_materializations_for_node("compliance__report")
        key = event.metadata["json_url"].value.split("/store/", 1)[1]
        report = json.loads(LocalObjectStore(self.store_dir).get_bytes(key))
        return {(f["control"], f["object"]): f for f in report["findings"]}


def test_compliance_report_on_manifests_with_graph_evidence(no_cluster, report_spec, tmp_path):
    reports = Reports(report_spec, dg.DagsterInstance.ephemeral(), tmp_path / "store", datetime.now(UTC))

    first = reports.run()
    [event] = first.asset_materializations_for_node("compliance__report")
    assert event.metadata["evidence"].value.startswith("manifests")
    # Nothing of this graph has ever run: the graph controls say so.
    failing = reports.failing(first)
    assert failing[("OPS-BACKUP-001", f"Datastore {DATASTORE}")]["message"] == "no verified backup found"
    assert failing[("OPS-RESTORE-001", f"Datastore {DATASTORE}")]["message"] == "no restore test found"
    assert "no certificate inventory has run" in failing[("OPS-CERT-001", "Certificate inventory")]["message"]
    assert not any(control == "OPS-NET-001" for control, _ in failing)
    check = checks_of(first)["no_open_error_findings"]
    assert not check.passed
    assert check.metadata["open_errors"].value == event.metadata["open_errors"].value > 0
    assert "OPS-BACKUP-001" in check.description
    listed = {(r.data["control"], r.data["object"]) for r in check.metadata["open_error_findings"].value.records}
    assert ("OPS-RESTORE-001", f"Datastore {DATASTORE}") in listed

    second = reports.run()
    [again] = second.asset_materializations_for_node("compliance__report")
    assert again.metadata["open_errors"].value == event.metadata["open_errors"].value


def test_a_refused_restore_test_fails_the_control_although_an_earlier_one_passed(no_cluster, report_spec, tmp_path):
    now = datetime.now(UTC)
    instance = dg.DagsterInstance.ephemeral()
    reports = Reports(report_spec, instance, tmp_path / "store", now)
    backup, restore_test = stand_in_backup(DATASTORE), stand_in_restore_test(DATASTORE)
    point = (now - timedelta(minutes=10)).timestamp()
    assert run_stand_in(backup, instance, backup_id="r-1", recovery_point=point).success
    passed = run_stand_in(restore_test, instance, restore_seconds=120.0, recovery_point=point)
    assert passed.success
    subject = ("OPS-RESTORE-001", f"Datastore {DATASTORE}")
    assert subject not in reports.failing()
    assert ("OPS-BACKUP-001", f"Datastore {DATASTORE}") not in reports.failing()

    refused = run_stand_in(restore_test, instance, refuse="restore test of 'redis_cache': target is the source")
    assert not refused.success
    finding = reports.failing()[subject]
    assert "failed: not proven: restore test of 'redis_cache': target is the source" in finding["message"]
    assert finding["message"].count("not proven") == 1
    assert finding["link"] == f"run {refused.run_id}"
    # The materialization of the passing run is still the latest one: it is not what the control reads.
    latest = instance.get_latest_materialization_event(restore_test_key(DATASTORE))
    assert latest is not None and latest.run_id == passed.run_id

    crashed = run_stand_in(restore_test, instance, crash="scratch target unreachable")
    assert not crashed.success and crashed.get_asset_check_evaluations() == []
    finding = reports.failing()[subject]
    assert "run failed before the check was evaluated: scratch target unreachable" in finding["message"]
    assert finding["link"] == f"run {crashed.run_id}"

    assert run_stand_in(restore_test, instance, restore_seconds=1200.0, recovery_point=point).success
    finding = reports.failing()[subject]
    assert "took 20.0 min, over the RTO of 15 min" in finding["message"]


def test_backups_are_judged_by_their_newest_passed_check_against_the_datastores_rpo(
    no_cluster, report_spec, tmp_path
):
    now = datetime.now(UTC)
    instance = dg.DagsterInstance.ephemeral()
    reports = Reports(report_spec, instance, tmp_path / "store", now)
    backup = stand_in_backup(DATASTORE)
    old = run_stand_in(backup, instance, backup_id="r-old", recovery_point=(now - timedelta(minutes=45)).timestamp())
    assert old.success
    mismatch = run_stand_in(backup, instance, fail="backup r-bad: sha256 of dump.rdb does not match the manifest")
    assert not mismatch.success

    finding = reports.failing()[("OPS-BACKUP-001", f"Datastore {DATASTORE}")]
    # 45 min is inside the platform's 60 min RPO, not inside this datastore's own 30 min.
    assert "(45 min old, RPO 30 min), backup r-old" in finding["message"]
    assert (f"the latest backup run failed: backup r-bad: sha256 of dump.rdb does not match the manifest "
            f"(run {mismatch.run_id})") in finding["message"]
    assert finding["link"] == f"run {old.run_id}"

    fresh = run_stand_in(backup, instance, backup_id="r-new", recovery_point=(now - timedelta(minutes=5)).timestamp(),
                         partition="2026-01-02")
    assert fresh.success
    assert ("OPS-BACKUP-001", f"Datastore {DATASTORE}") not in reports.failing()
    graph = compliance_assets.graph_evidence(report_spec, instance, now)
    [evidence] = graph.backups
    assert (evidence.backup_id, evidence.recovery_point, evidence.run_id) == (
        "r-new", datetime.fromtimestamp((now - timedelta(minutes=5)).timestamp(), UTC), fresh.run_id)
    assert graph.failed_backups == {} and graph.rpo_for(DATASTORE) == 30 and graph.rto_for(DATASTORE) == 15

    run_stand_in(backup, instance, fail="object store unreachable")
    graph = compliance_assets.graph_evidence(report_spec, instance, now)
    assert graph.backups[0].backup_id == "r-new"
    assert graph.failed_backups[DATASTORE].description == "object store unreachable"


def test_a_failed_inventory_run_fails_the_certificate_control(
    no_cluster, report_spec, tls_ca, tls_server, kube_cluster, tmp_path, monkeypatch
):
    now = datetime.now(UTC)
    server = tls_server(tls_ca.issue(["127.0.0.1"], ip_addresses=["127.0.0.1"], days=90))
    trust(tls_ca, tmp_path, monkeypatch)
    instance = dg.DagsterInstance.ephemeral()
    kubernetes = KubernetesResource(kubeconfig=str(kube_cluster.write_kubeconfig(tmp_path / "kubeconfig")))
    spec = report_spec.model_copy(update={"certificates": report_spec.certificates.model_copy(
        update={"endpoints": [server.endpoint()]})})
    reports = Reports(spec, instance, tmp_path / "store", now)

    assert run_inventory(spec, instance, kubernetes).success
    assert not any(control == "OPS-CERT-001" for control, _ in reports.failing())
    [certificate] = compliance_assets.graph_evidence(spec, instance, now).certificates
    assert certificate.name == server.endpoint() and 89.9 < certificate.days_left < 90.1
    assert certificate.not_before is not None and certificate.not_after is not None

    kube_cluster.other_identity("no-secrets", NO_SECRETS)  # the cluster's RBAC changed: a real 403
    refused = run_inventory(spec, instance, KubernetesResource(
        kubeconfig=str(kube_cluster.write_kubeconfig(tmp_path / "short-kubeconfig", "no-secrets"))))
    assert not refused.success
    finding = reports.failing()[("OPS-CERT-001", "Certificate inventory")]
    assert finding["message"].startswith("the latest certificate inventory run failed: not judged: "
                                         "certificate inventory failed: kubernetes: list")
    assert "403" in finding["message"] and finding["link"] == f"run {refused.run_id}"


def test_a_report_that_cannot_be_made_fails_its_check_and_the_run(no_cluster, report_spec, tmp_path):
    broken = tmp_path / "broken-exceptions.yaml"
    broken.write_text("- control: [unclosed\n")
    spec = report_spec.model_copy(update={"compliance": report_spec.compliance.model_copy(
        update={"exceptions": str(broken)})})
    result = Reports(spec, dg.DagsterInstance.ephemeral(), tmp_path / "store", datetime.now(UTC)).run()
    assert not result.success
    assert result.asset_materializations_for_node("compliance__report") == []
    check = checks_of(result)["no_open_error_findings"]
    assert not check.passed
    assert check.description.startswith(f"not judged: compliance report failed: compliance exceptions: {broken}")
    assert failure_of(result).startswith(f"compliance report failed: compliance exceptions: {broken}")


def test_a_malformed_manifest_fails_the_check_naming_the_file(no_cluster, report_spec, tmp_path):
    """Every finding excepted, the check passes; a manifest that cannot be read leaves a hole in the report
    and fails it, naming the file."""
    now = datetime.now(UTC)
    Path(report_spec.compliance.exceptions).write_text(yaml.safe_dump([{
        "control": "OPS-*", "object": "* *", "owner": "team:platform-sre",
        "justification": "this test judges the input, not the findings", "expires": (now + timedelta(days=30)).date(),
    }]))
    reports = Reports(report_spec, dg.DagsterInstance.ephemeral(), tmp_path / "store", now)
    clean = checks_of(reports.run())["no_open_error_findings"]
    assert clean.passed and clean.description == "no open ERROR finding"

    bad = Path(report_spec.compliance.manifests) / "bad.yaml"
    bad.write_text("kind: [a, b\n")
    result = reports.run()
    assert result.success, "the report is still made and stored"
    check = checks_of(result)["no_open_error_findings"]
    assert not check.passed and check.metadata["open_errors"].value == 0
    assert check.description.startswith(f"no open ERROR finding; 1 input problem(s), not judged: {bad} line 1, "
                                        "column 7 (document 1): not valid YAML: while parsing a flow sequence")
