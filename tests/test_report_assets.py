"""`certificates/inventory` and `compliance/report` in Dagster: real TLS endpoints,
the manifests of a directory in place of a cluster, and the graph's own evidence."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from ops_platform.assets import certificates as certificate_assets
from ops_platform.assets import compliance as compliance_assets
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import LocalObjectStore, ObjectStoreResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec

BASE = load_spec(DEFAULT_SPEC_PATH)


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)


def checks_of(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_inventory_of_endpoints_without_a_cluster(no_cluster, tls_ca, tls_server, tmp_path, monkeypatch):
    healthy = tls_server(tls_ca.issue(["127.0.0.1"], days=90))
    expiring = tls_server(tls_ca.issue(["127.0.0.1"], days=10))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(tls_ca.pem)
    monkeypatch.setenv("OPS_TRUST_ROOTS", str(ca_file))
    spec = BASE.model_copy(update={"certificates": BASE.certificates.model_copy(
        update={"endpoints": [healthy.endpoint(), expiring.endpoint()]})})
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*certificate_assets.build_certificate_assets(spec)[:1], *certificate_assets.build_certificate_checks(spec)],
        resources={"kubernetes": KubernetesResource()}, instance=instance, raise_on_error=False,
    )
    assert result.success
    [event] = result.asset_materializations_for_node("certificates__inventory")
    assert event.metadata["certificates"].value == 2
    assert "no Kubernetes cluster is configured" in event.metadata["notes"].value
    checks = checks_of(result)
    assert not checks["expiry"].passed
    assert checks["expiry"].severity == dg.AssetCheckSeverity.ERROR
    assert expiring.endpoint() in checks["expiry"].description
    assert checks["chain_verifies"].passed
    assert checks["endpoint_reachable"].passed


def test_compliance_report_on_manifests_with_graph_evidence(no_cluster, tmp_path):
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
    spec = BASE.model_copy(update={
        "compliance": BASE.compliance.model_copy(update={"manifests": str(manifests), "exceptions": str(exceptions)}),
        "datastores": BASE.datastores[:1],
    })
    resources = {"kubernetes": KubernetesResource(),
                 "object_store": ObjectStoreResource(local_dir=str(tmp_path / "store"))}
    instance = dg.DagsterInstance.ephemeral()
    assets = [*compliance_assets.build_compliance_assets(spec), *compliance_assets.build_compliance_checks(spec)]

    first = dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False)
    assert first.success
    [event] = first.asset_materializations_for_node("compliance__report")
    assert event.metadata["evidence"].value.startswith("manifests")
    # No backup or restore test of postgres_main has ever run: the graph controls say so.
    report = json.loads(LocalObjectStore(tmp_path / "store").get_bytes(
        event.metadata["json_url"].value.split("/store/", 1)[1]))
    failing = {f["control"] for f in report["findings"]}
    assert {"OPS-BACKUP-001", "OPS-RESTORE-001"} <= failing
    assert "OPS-NET-001" not in failing
    assert event.metadata["open_errors"].value > 0
    assert not checks_of(first)["no_open_error_findings"].passed

    second = dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False)
    [event] = second.asset_materializations_for_node("compliance__report")
    again = json.loads(LocalObjectStore(tmp_path / "store").get_bytes(
        event.metadata["json_url"].value.split("/store/", 1)[1]))
    assert again["trend"]["previous_generated_at"] == report["generated_at"]
    assert again["trend"]["overall_delta"] == 0
