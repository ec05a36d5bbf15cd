"""The manifests of the 13 layers: valid against the Kubernetes 1.30 API and
the CRD schemas kept in infra/crds, consistent with infra/platform.yaml and
the seeds' numbers, and the alert rules checked by promtool itself."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections import Counter
from typing import Any

import pytest
import yaml

from ops_platform.manifests import (
    CRD_SCHEMA_DIR,
    KUBERNETES_VERSION,
    CrdSchemas,
    ManifestDocument,
    ManifestError,
    constraint_crd,
    load_layer_manifests,
    object_ref,
    read_manifest_documents,
    validate_manifest,
)
from ops_platform.spec import REPO_ROOT, load_spec

SPEC = load_spec()
LAYER_NAMES = [layer.name for layer in SPEC.layers]
APP_NAMESPACES = ["ontology-editor", "data", "logging"]
PROMETHEUS_DIR = REPO_ROOT / "infra" / "prometheus"
RULE_FILE = PROMETHEUS_DIR / "ops-alerts.yml"
BUILTIN_GROUPS = {
    "", "apps", "batch", "policy", "autoscaling", "rbac.authorization.k8s.io", "networking.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "apiextensions.k8s.io",
}


@pytest.fixture(scope="module")
def layers() -> dict[str, list[ManifestDocument]]:
    return {layer.name: read_manifest_documents(layer.manifests) for layer in SPEC.layers}


@pytest.fixture(scope="module")
def all_objects(layers) -> list[dict[str, Any]]:
    return [document.obj for documents in layers.values() for document in documents]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind
        and (name is None or obj["metadata"]["name"] == name)
        and (namespace is None or obj["metadata"].get("namespace") == namespace)
    ]


def the(objects: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {namespace}/{name}, found {len(found)}"
    return found[0]


# --- the layer directories -------------------------------------------------------


def test_every_layer_of_the_spec_has_a_manifest_directory_and_nothing_else_does():
    layers_dir = REPO_ROOT / "infra" / "layers"
    assert sorted(p.name for p in layers_dir.iterdir() if p.is_dir()) == sorted(LAYER_NAMES)
    for layer in SPEC.layers:
        assert layer.manifests == f"infra/layers/{layer.name}"
        assert read_manifest_documents(layer.manifests), f"layer {layer.name} has no manifests"
    assert (layers_dir / "README.md").is_file()


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_layer_manifests_are_valid(layers, layer):
    problems = [
        f"{document.location}: {problem}" for document in layers[layer] for problem in validate_manifest(document.obj)
    ]
    assert problems == [], f"Kubernetes {KUBERNETES_VERSION} / infra/crds validation:\n" + "\n".join(problems)


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_every_object_carries_its_layer_label(layers, layer):
    unlabelled = [
        f"{document.location}: {object_ref(document.obj)}"
        for document in layers[layer]
        if document.obj["metadata"].get("labels", {}).get("ops-platform/layer") != layer
    ]
    assert unlabelled == []


def test_no_object_is_defined_twice(all_objects):
    def identity(obj):
        group = obj["apiVersion"].rpartition("/")[0]
        return group, obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]

    duplicates = [key for key, count in Counter(map(identity, all_objects)).items() if count > 1]
    assert duplicates == []


def test_load_layer_manifests_puts_crds_and_namespaces_first_and_constraints_last(tmp_path):
    (tmp_path / "a-workload.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n---\n"
        "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sRequiredLabels\nmetadata: {name: must}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\n"
    )
    (tmp_path / "b-setup.yaml").write_text(
        "# comment-only documents are skipped\n---\n"
        "apiVersion: templates.gatekeeper.sh/v1\nkind: ConstraintTemplate\nmetadata: {name: k8srequiredlabels}\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n"
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
        "metadata: {name: things.example.com}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
    )
    (tmp_path / "notes.md").write_text("not a manifest")
    order = [obj["kind"] for obj in load_layer_manifests(tmp_path)]
    assert order == [
        "CustomResourceDefinition",
        "Namespace",
        "Service",
        "Deployment",
        "ConstraintTemplate",
        "PeerAuthentication",
        "K8sRequiredLabels",
    ]


def test_load_layer_manifests_resolves_spec_paths_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    objects = load_layer_manifests("infra/layers/cluster")
    kinds = [obj["kind"] for obj in objects]
    assert kinds[: kinds.count("Namespace")] == ["Namespace"] * kinds.count("Namespace")
    assert {"ontology-editor", "data", "logging"} <= {obj["metadata"]["name"] for obj in objects}


def test_unreadable_manifests_fail_with_the_file_and_the_reason(tmp_path):
    with pytest.raises(ManifestError, match=r"infra/layers/nowhere does not exist \(check layers\[\]\.manifests"):
        load_layer_manifests("infra/layers/nowhere")
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [unclosed\n")
    with pytest.raises(ManifestError, match=r"broken\.yaml: line \d+, column \d+: not valid YAML"):
        load_layer_manifests(tmp_path)
    broken.write_text("apiVersion: v1\nkind: ConfigMap\n---\n- just\n- a list\n")
    with pytest.raises(ManifestError, match=r"broken\.yaml \(document 2\) is a list, not a Kubernetes object"):
        load_layer_manifests(tmp_path)


# --- the validator itself ---------------------------------------------------------------


DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
        },
    },
}
PEER_AUTHENTICATION = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "default", "namespace": "istio-system"},
    "spec": {"mtls": {"mode": "STRICT"}},
}


def mutated(obj: dict[str, Any], change) -> dict[str, Any]:
    copied = copy.deepcopy(obj)
    change(copied)
    return copied


def test_a_valid_builtin_and_custom_object_have_no_problems():
    assert validate_manifest(DEPLOYMENT) == []
    assert validate_manifest(PEER_AUTHENTICATION) == []


def test_builtin_kinds_are_checked_strictly_against_the_kubernetes_schema():
    typo = mutated(DEPLOYMENT, lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePulPolicy="x"))
    [problem] = validate_manifest(typo)
    assert problem.startswith("Deployment shop/web: spec.template.spec.containers[0]:")
    assert "imagePulPolicy" in problem
    no_selector = mutated(DEPLOYMENT, lambda d: d["spec"].pop("selector"))
    assert validate_manifest(no_selector) == ["Deployment shop/web: spec: 'selector' is a required property"]
    assert validate_manifest({**DEPLOYMENT, "apiVersion": "extensions/v1beta1"}) == [
        f"Deployment shop/web: extensions/v1beta1 Deployment is not a kind of Kubernetes {KUBERNETES_VERSION}"
    ]


def test_custom_resources_are_checked_against_their_crd_schema():
    bad_enum = mutated(PEER_AUTHENTICATION, lambda p: p["spec"]["mtls"].update(mode="STRICTER"))
    [problem] = validate_manifest(bad_enum)
    assert problem.startswith("PeerAuthentication istio-system/default: spec.mtls.mode: 'STRICTER' is not one of")
    unknown_field = mutated(PEER_AUTHENTICATION, lambda p: p["spec"].update(mtlsMode="STRICT"))
    [problem] = validate_manifest(unknown_field)
    assert "spec: Additional properties are not allowed ('mtlsMode' was unexpected)" in problem
    wrong_version = {**PEER_AUTHENTICATION, "apiVersion": "security.istio.io/v2"}
    [problem] = validate_manifest(wrong_version)
    assert "apiVersion security.istio.io/v2 is not served for PeerAuthentication (served: v1, v1beta1" in problem


def test_structural_schema_extensions_behave_like_the_api_server():
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "r", "namespace": "monitoring"},
        "spec": {"groups": [{"name": "g", "rules": [{"record": "one", "expr": 1}]}]},
    }
    assert validate_manifest(rule) == [], "expr is int-or-string"
    schedule = {
        "apiVersion": "velero.io/v1",
        "kind": "Schedule",
        "metadata": {"name": "s", "namespace": "velero"},
        "spec": {"schedule": "0 3 * * *", "template": {"includeClusterResources": None, "ttl": "24h0m0s"}},
    }
    assert validate_manifest(schedule) == [], "nullable booleans accept null"
    elasticsearch = {
        "apiVersion": "elasticsearch.k8s.elastic.co/v1",
        "kind": "Elasticsearch",
        "metadata": {"name": "es", "namespace": "logging"},
        "spec": {
            "version": "8.15.3",
            "nodeSets": [{"name": "all", "count": 1, "podTemplate": {"anything": {"goes": 1}}}],
        },
    }
    assert validate_manifest(elasticsearch) == [], "preserve-unknown-fields subtrees are not checked"
    elasticsearch["spec"]["nodeSets"][0]["count"] = "three"
    [problem] = validate_manifest(elasticsearch)
    assert "spec.nodeSets[0].count: 'three' is not of type 'integer'" in problem


def test_metadata_and_scope_problems_are_reported():
    no_namespace = mutated(DEPLOYMENT, lambda d: d["metadata"].pop("namespace"))
    assert validate_manifest(no_namespace) == [
        "Deployment web: metadata.namespace is missing "
        "(a namespaced object would land in the applying client's default namespace)"
    ]
    unquoted = mutated(DEPLOYMENT, lambda d: d["metadata"]["labels"].update({"ops-platform/app-namespace": True}))
    assert any("value True must be a string (quote it)" in p for p in validate_manifest(unquoted))
    bad_name = mutated(DEPLOYMENT, lambda d: d["metadata"].update(name="Web_1"))
    assert any("metadata.name 'Web_1' is not a DNS subdomain" in p for p in validate_manifest(bad_name))
    namespaced_cluster_kind = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "ClusterIssuer",
        "metadata": {"name": "x", "namespace": "cert-manager"},
        "spec": {"selfSigned": {}},
    }
    assert validate_manifest(namespaced_cluster_kind) == [
        "ClusterIssuer cert-manager/x: metadata.namespace is set on a cluster-scoped kind"
    ]
    assert validate_manifest({"kind": "ConfigMap"}) == [
        "ConfigMap <no name>: apiVersion is missing",
        "ConfigMap <no name>: metadata is missing",
    ]


def test_a_kind_without_schema_names_where_its_crd_belongs():
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "shop"}}
    assert validate_manifest(unknown) == [
        f"Widget shop/w: no schema for Widget (example.com/v1): not a Kubernetes {KUBERNETES_VERSION} kind "
        "and no CRD in infra/crds/example.com/ (add a trimmed copy of its CRD)"
    ]


# --- the CRD schemas kept as data --------------------------------------------------------------


def test_crd_schemas_are_valid_crds_filed_by_group_and_kind():
    documents = read_manifest_documents(CRD_SCHEMA_DIR)
    assert len(documents) >= 30
    for document in documents:
        crd = document.obj
        assert validate_manifest(crd) == [], document.location
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        assert document.source == CRD_SCHEMA_DIR / group / f"{kind.lower()}.yaml"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{group}"
        assert crd["metadata"]["annotations"]["ops-platform/source"], f"{document.location}: where does it come from?"
        assert sum(version.get("storage", False) for version in crd["spec"]["versions"]) == 1


def test_every_custom_kind_the_layers_use_has_its_crd(all_objects):
    schemas = CrdSchemas.load()
    custom = {
        (obj["apiVersion"], obj["kind"]) for obj in all_objects
        if obj["apiVersion"].rpartition("/")[0] not in BUILTIN_GROUPS
    }
    missing = sorted(f"{v} {k}" for v, k in custom if not schemas.covers(v, k))
    assert missing == []
    assert len(custom) >= 25


def test_gatekeeper_constraint_crds_are_the_ones_gatekeeper_generates(layers):
    templates = [d.obj for d in layers["governance"] if d.obj["kind"] == "ConstraintTemplate"]
    assert {t["metadata"]["name"] for t in templates} == {
        "k8srequiredlabels", "k8sallowedrepos", "k8sdisallowedtags",
        # The PSS restricted set, enforced in the app namespace (infra plan §6.4).
        "k8spsshostnamespaces", "k8spssprivilegedcontainers", "k8spssvolumetypes", "k8spsshostports",
        "k8spsscapabilities", "k8spssallowprivilegeescalation", "k8spssrunasnonroot", "k8spssseccomp",
    }
    for template in templates:
        kept = CRD_SCHEMA_DIR / "constraints.gatekeeper.sh" / f"{template['metadata']['name']}.yaml"
        assert kept.is_file(), f"{kept} is missing: write ops_platform.manifests.constraint_crd(template) there"
        assert yaml.safe_load(kept.read_text()) == constraint_crd(template), (
            f"{kept} is out of date with ConstraintTemplate {template['metadata']['name']}: "
            "regenerate it with ops_platform.manifests.constraint_crd"
        )
        assert template["spec"]["crd"]["spec"]["names"]["kind"].lower() == template["metadata"]["name"]


def test_constraint_parameters_are_checked_against_their_template():
    bad = {
        "apiVersion": "constraints.gatekeeper.sh/v1beta1",
        "kind": "K8sAllowedRepos",
        "metadata": {"name": "repos"},
        "spec": {"match": {"kinds": [{"apiGroups": [""], "kinds": ["Pod"]}]}, "parameters": {"repos": "ecr/"}},
    }
    [problem] = validate_manifest(bad)
    assert "spec.parameters.repos: 'ecr/' is not of type 'array'" in problem


# --- cross-references with infra/platform.yaml ----------------------------------------------------


def rule_groups(all_objects) -> list[dict[str, Any]]:
    return [group for rule in find(all_objects, "PrometheusRule") for group in rule["spec"]["groups"]]


def alert_rules(all_objects) -> list[dict[str, Any]]:
    return [rule for group in rule_groups(all_objects) for rule in group["rules"] if "alert" in rule]


def test_every_remediation_alert_is_defined_in_the_prometheus_rules(all_objects):
    alerts = {rule["alert"] for rule in alert_rules(all_objects)}
    wanted = {remediation.alert for remediation in SPEC.remediations}
    assert wanted == {
        "CertificateExpiringSoon", "PodCrashLooping", "ApiHighErrorRate",
        "HighCpuSaturation", "BackupTooOld", "PersistentVolumeFillingUp",
    }
    assert wanted - alerts == set()
    assert {"RestoreTestFailed", "DatabaseConnectionFailure", "IndexLagHigh"} <= alerts


def test_remediation_alerts_carry_the_labels_their_playbooks_act_on(all_objects):
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules(all_objects)}
    needs = {
        "restart_workload": '"deployment"',
        "rollback_deployment": '"deployment"',
        "scale_workload": '"deployment"',
        "expand_pvc": "kubelet_volume_stats",
        "renew_certificate": "certmanager_certificate_expiration_timestamp_seconds",
        "rerun_backup": "ops_platform_backup_last_success_timestamp_seconds",
    }
    for remediation in SPEC.remediations:
        assert needs[remediation.playbook] in expressions[remediation.alert], remediation.alert


def test_infraspec_8_1_alert_thresholds(all_objects):
    rules = {rule["alert"]: rule for rule in alert_rules(all_objects)}
    assert re.search(r"\)\s*>\s*0\.01\s*$", rules["ApiHighErrorRate"]["expr"].strip()), "API 5xx > 1 %"
    assert 'status=~"5.."' in rules["ApiHighErrorRate"]["expr"]
    assert rules["IndexLagHigh"]["expr"].strip().endswith("> 30"), "index lag > 30 s"
    assert "app_db_connection_errors_total" in rules["DatabaseConnectionFailure"]["expr"]
    assert "21 * 24 * 3600" in rules["CertificateExpiringSoon"]["expr"], "certificates.renew_before_days"
    assert SPEC.certificates.renew_before_days == 21


def test_the_velero_schedule_of_the_spec_exists_with_its_namespaces(all_objects):
    [cluster_state] = [store for store in SPEC.datastores if store.engine == "velero"]
    schedule = the(all_objects, "Schedule", cluster_state.velero.schedule, cluster_state.connection.namespace)
    assert schedule["metadata"]["name"] == "onto-cluster-daily"
    template = schedule["spec"]["template"]
    assert template["includedNamespaces"] == cluster_state.velero.included_namespaces == APP_NAMESPACES
    assert template["includeClusterResources"] is False, "restore tests compare itemsRestored with itemsBackedUp"
    the(all_objects, "BackupStorageLocation", template["storageLocation"], "velero")


def test_the_snapshot_class_of_the_spec_volumes_exists(all_objects):
    for volume in SPEC.volumes:
        snapshot_class = the(all_objects, "VolumeSnapshotClass", volume.snapshot_class)
        assert snapshot_class["driver"] == "ebs.csi.aws.com"
        assert snapshot_class["deletionPolicy"] == "Delete", "pruned snapshots must free their EBS snapshots"


def test_the_volume_groups_select_labels_the_data_workloads_put_on_their_claims(all_objects):
    def claim_labels(obj) -> list[dict[str, str]]:
        spec = obj.get("spec", {})
        if obj["kind"] == "StatefulSet":
            return [t["metadata"].get("labels", {}) for t in spec.get("volumeClaimTemplates", [])]
        if obj["kind"] == "Cluster":
            return [spec.get("inheritedMetadata", {}).get("labels", {})]
        if obj["kind"] == "KafkaNodePool":
            return [spec["template"]["persistentVolumeClaim"]["metadata"]["labels"]]
        if obj["kind"] == "Elasticsearch":
            templates = [t for node_set in spec["nodeSets"] for t in node_set.get("volumeClaimTemplates", [])]
            return [t["metadata"].get("labels", {}) for t in templates]
        return []

    for volume in SPEC.volumes:
        key, _, value = volume.selector.partition("=")
        stateful = [
            obj for obj in all_objects if obj["metadata"].get("namespace") in volume.namespaces and claim_labels(obj)
        ]
        assert stateful, volume.name
        for obj in stateful:
            for labels in claim_labels(obj):
                assert labels.get(key) == value, f"{object_ref(obj)}: its volumes are outside group {volume.name}"


def test_the_spec_datastores_are_served_by_the_manifests(all_objects):
    served: set[str] = set()
    for obj in all_objects:
        namespace = obj["metadata"].get("namespace")
        name = obj["metadata"]["name"]
        generated = {
            "Service": [name],
            "Cluster": [f"{name}-rw", f"{name}-ro", f"{name}-r"],
            "Elasticsearch": [f"{name}-es-http"],
            "Milvus": [name],
            "Kafka": [f"{name}-kafka-bootstrap"],
        }.get(obj["kind"], [])
        served |= {f"{service}.{namespace}.svc.cluster.local" for service in generated}

    def host_of(address: str) -> str:
        return re.sub(r"^[a-z0-9+]+://", "", address).split(":")[0].split("/")[0]

    addresses = []
    for store in SPEC.datastores:
        connection = store.connection
        addresses += [a for a in (connection.host, connection.url) if a]
        if store.milvus:
            addresses.append(store.milvus.server_url)
        if store.neo4j:
            addresses.append(store.neo4j.backup_address)
    hosts = {host_of(address) for address in addresses if ".svc.cluster.local" in address}
    assert len(hosts) >= 7
    assert hosts - served == set()


def test_the_postgres_archive_is_the_pgbackrest_repository_of_the_spec(all_objects):
    [postgres] = [store for store in SPEC.datastores if store.method == "pgbackrest"]
    cluster = the(all_objects, "Cluster", "onto-pg", "data")
    assert postgres.connection.host == "onto-pg-rw.data.svc.cluster.local"
    [plugin] = [p for p in cluster["spec"]["plugins"] if p["isWALArchiver"]]
    assert plugin["name"] == "pgbackrest.dalibo.com"
    assert "backup" not in cluster["spec"], "one archive_command: no barman object store next to pgBackRest"
    stanza = the(all_objects, "Stanza", plugin["parameters"]["stanzaRef"], "data")
    configuration = stanza["spec"]["stanzaConfiguration"]
    assert configuration["name"] == postgres.pgbackrest.stanza
    assert [repo["repoPath"] for repo in configuration["s3Repositories"]] == [postgres.pgbackrest.repo_path]
    assert cluster["spec"]["bootstrap"]["initdb"]["database"] == postgres.connection.database
    assert postgres.connection.user in {role["name"] for role in cluster["spec"]["managed"]["roles"]}
    assert cluster["spec"]["instances"] == 3


def test_the_neo4j_backup_job_identity_exists(all_objects):
    [neo4j] = [store for store in SPEC.datastores if store.engine == "neo4j"]
    the(all_objects, "ServiceAccount", neo4j.neo4j.service_account, neo4j.neo4j.namespace)


# --- the seeds' numbers --------------------------------------------------------------------


def test_app_namespaces_have_quota_limits_and_default_deny_in_both_layers(all_objects):
    labelled = [ns["metadata"]["name"] for ns in find(all_objects, "Namespace")
                if ns["metadata"].get("labels", {}).get("ops-platform/app-namespace") == "true"]
    assert sorted(labelled) == sorted(APP_NAMESPACES)
    for namespace in APP_NAMESPACES:
        assert find(all_objects, "ResourceQuota", namespace=namespace), namespace
        assert find(all_objects, "LimitRange", namespace=namespace), namespace
        deny = the(all_objects, "NetworkPolicy", "default-deny", namespace)
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        assert the(all_objects, "AuthorizationPolicy", "default-deny", namespace)["spec"] == {}
        labels = the(all_objects, "Namespace", namespace)["metadata"]["labels"]
        assert labels["istio-injection"] == "enabled"


def test_mesh_wide_mtls_is_strict_and_nothing_weakens_it(all_objects):
    [mesh_wide] = find(all_objects, "PeerAuthentication", "default", "istio-system")
    assert mesh_wide["spec"] == {"mtls": {"mode": "STRICT"}}
    others = [p for p in find(all_objects, "PeerAuthentication") if p is not mesh_wide]
    assert all(p["spec"].get("mtls", {}).get("mode") == "STRICT" and "portLevelMtls" not in p["spec"] for p in others)
    destination_rules = find(all_objects, "DestinationRule")
    assert destination_rules
    assert all(rule["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL" for rule in destination_rules)


def test_traffic_policy_has_circuit_breakers_retries_and_a_weighted_canary(all_objects):
    backend_rule = the(all_objects, "DestinationRule", "onto-backend", "ontology-editor")
    assert backend_rule["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] > 0
    assert {s["name"] for s in backend_rule["spec"]["subsets"]} == {"stable", "canary"}
    service = the(all_objects, "VirtualService", "onto-backend", "ontology-editor")
    [primary] = [route for route in service["spec"]["http"] if route["name"] == "primary"]
    assert sum(destination["weight"] for destination in primary["route"]) == 100
    assert {d["destination"]["subset"] for d in primary["route"]} == {"stable", "canary"}
    assert primary["retries"]["attempts"] >= 2 and primary["timeout"]
    assert any("fault" in route for route in service["spec"]["http"])
    jwt = the(all_objects, "RequestAuthentication", "onto-backend-jwt", "ontology-editor")
    assert jwt["spec"]["jwtRules"][0]["issuer"].startswith("https://")


def test_node_groups_and_ha_replica_counts_follow_the_plan(all_objects):
    expected = the(all_objects, "ConfigMap", "ops-platform-node-groups", "kube-system")
    node_groups = yaml.safe_load(expected["data"]["node-groups.yaml"])
    assert node_groups["control_plane"] == {"nodes": 3, "min_zones": 2}
    assert {(g["name"], g["instance_type"], g["min_size"], g["max_size"]) for g in node_groups["node_groups"]} == {
        ("app", "t3.large", 3, 10), ("data", "r5.xlarge", 3, 6), ("platform", "t3.medium", 2, 4),
    }
    assert the(all_objects, "Alertmanager", "onto", "monitoring")["spec"]["replicas"] >= 2
    assert the(all_objects, "Prometheus", "onto", "monitoring")["spec"]["replicas"] >= 2
    pools = {p["metadata"]["name"]: p["spec"] for p in find(all_objects, "KafkaNodePool", namespace="data")}
    assert pools["broker"]["replicas"] == 3 and pools["broker"]["roles"] == ["broker"]
    assert pools["controller"]["replicas"] == 3 and pools["controller"]["roles"] == ["controller"]
    node_sets = {n["name"]: n for n in the(all_objects, "Elasticsearch", "onto", "logging")["spec"]["nodeSets"]}
    assert node_sets["master"]["config"]["node.roles"] == ["master"]
    assert "master" not in node_sets["data"]["config"]["node.roles"]
    assert the(all_objects, "StatefulSet", "onto-redis", "data")["spec"]["replicas"] == 3


def test_storage_classes_of_the_plan(all_objects):
    classes = {c["metadata"]["name"]: c for c in find(all_objects, "StorageClass")}
    assert {name: c["parameters"]["type"] for name, c in classes.items()} == {
        "fast-ssd": "io2", "standard-ssd": "gp3", "backup-hdd": "sc1",
    }
    for storage_class in classes.values():
        assert storage_class["provisioner"] == "ebs.csi.aws.com"
        assert storage_class["parameters"]["encrypted"] == "true"
        assert storage_class["allowVolumeExpansion"] is True, "the expand_pvc playbook resizes claims"
    used = {obj["spec"]["storageClassName"] for obj in find(all_objects, "PersistentVolumeClaim")}
    assert used <= set(classes)


def test_rbac_roles_are_bound_to_groups_and_none_has_wildcards(all_objects):
    """Break-glass admin is an EKS access policy (Terraform), never a role the layers ship."""
    roles = {r["metadata"]["name"]: r for r in find(all_objects, "ClusterRole")}
    assert {"onto-developer", "onto-operator"} <= set(roles)
    for name, role in roles.items():
        wildcard = any("*" in rule.get("verbs", []) or "*" in rule.get("resources", []) for rule in role["rules"])
        assert not wildcard, name
        if name in ("onto-developer", "onto-operator"):
            assert not any("secrets" in rule.get("resources", []) for rule in role["rules"]), name
    bindings = find(all_objects, "ClusterRoleBinding") + find(all_objects, "RoleBinding")
    bound = {(b["roleRef"]["name"], s["name"]) for b in bindings for s in b["subjects"] if s["kind"] == "Group"}
    assert bound == {
        ("onto-developer", "onto:developers"), ("onto-operator", "onto:operators"),
    }
    developer_bindings = [b for b in find(all_objects, "RoleBinding") if b["roleRef"]["name"] == "onto-developer"]
    assert sorted(b["metadata"]["namespace"] for b in developer_bindings) == sorted(APP_NAMESPACES)


def test_external_secrets_come_from_the_cluster_store(all_objects):
    [store] = find(all_objects, "ClusterSecretStore")
    assert store["spec"]["provider"]["aws"]["service"] == "SecretsManager"
    allowed = set(store["spec"]["conditions"][0]["namespaces"])
    for external in find(all_objects, "ExternalSecret"):
        assert external["spec"]["secretStoreRef"] == {"kind": "ClusterSecretStore", "name": store["metadata"]["name"]}
        assert external["metadata"]["namespace"] in allowed


def test_argo_cd_deploys_the_chart_to_each_environment(all_objects):
    chart = REPO_ROOT / "infra" / "k8s" / "ontology-editor"
    applications = {
        app["metadata"]["labels"]["ops-platform/environment"]: app
        for app in find(all_objects, "Application", namespace="argocd")
    }
    assert sorted(applications) == sorted(SPEC.platform.environments)
    for environment, application in applications.items():
        source = application["spec"]["source"]
        assert source["path"] == "infra/k8s/ontology-editor"
        assert source["helm"]["valueFiles"] == [f"values-{environment}.yaml"]
        assert (chart / f"values-{environment}.yaml").is_file()
        assert "parameters" not in source["helm"], "the release sets image.tag; the layer must not reset it"
        assert application["spec"]["destination"]["namespace"] == "ontology-editor"
    assert "automated" not in applications["prod"]["spec"]["syncPolicy"], "prod syncs after the promotion approval"


def test_images_in_app_namespaces_are_pinned(all_objects):
    def images(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["image"]] if isinstance(node.get("image"), str) and "name" in node else []
            return found + [image for value in node.values() for image in images(value)]
        if isinstance(node, list):
            return [image for item in node for image in images(item)]
        return []

    for obj in all_objects:
        for image in images(obj.get("spec", {})):
            last = image.rsplit("/", 1)[-1]
            assert ("@" in image or ":" in last) and not image.endswith(":latest"), f"{object_ref(obj)}: {image}"


def test_grafana_dashboards_are_json(all_objects):
    dashboards = [
        c for c in find(all_objects, "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert dashboards
    for dashboard in dashboards:
        for text in dashboard["data"].values():
            assert json.loads(text)["panels"]


# --- the alert rules with promtool and amtool ---------------------------------------------------------


def test_the_prometheus_rule_is_the_plain_rule_file(all_objects):
    [rule] = find(all_objects, "PrometheusRule", "ontology-editor-alerts", "monitoring")
    prometheus = the(all_objects, "Prometheus", "onto", "monitoring")
    assert prometheus["spec"]["ruleSelector"]["matchLabels"].items() <= rule["metadata"]["labels"].items()
    assert rule["spec"]["groups"] == yaml.safe_load(RULE_FILE.read_text())["groups"], (
        "infra/prometheus/ops-alerts.yml and PrometheusRule ontology-editor-alerts differ: change both"
    )


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (Debian package prometheus): rule files not checked")
    return binary


def test_promtool_checks_the_rule_file():
    result = subprocess.run([promtool(), "check", "rules", str(RULE_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_show_each_alert_firing_and_quiet():
    result = subprocess.run(
        [promtool(), "test", "rules", "ops-alerts.test.yml"],
        cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "ops-alerts.test.yml").read_text()))
    assert {remediation.alert for remediation in SPEC.remediations} | {"RestoreTestFailed", "IndexLagHigh"} <= tested


def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = copy.deepcopy(yaml.safe_load(RULE_FILE.read_text()))
    broken["groups"][0]["rules"][0]["expr"] = "sum by (service (rate(app_http_requests_total[5m]))"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_the_alertmanager_configuration_template_is_valid(all_objects, tmp_path):
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager): configuration not checked")
    external = the(all_objects, "ExternalSecret", "alertmanager-onto-config", "monitoring")
    template = external["spec"]["target"]["template"]["data"]["alertmanager.yaml"]
    keys = {item["secretKey"] for item in external["spec"]["data"]}
    assert set(re.findall(r"\{\{ \.(\w+) \}\}", template)) == keys
    def placeholder(match: re.Match[str]) -> str:
        return "https://hooks.example.com/x" if match.group(1).endswith("_url") else "placeholder"

    rendered = re.sub(r"\{\{ \.(\w+) \}\}", placeholder, template)
    config = tmp_path / "alertmanager.yml"
    config.write_text(rendered)
    result = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    receivers = {r["name"] for r in yaml.safe_load(rendered)["receivers"]}
    assert {"slack-platform", "pagerduty-platform"} <= receivers


def test_pss_constraints_cover_the_app_namespaces_with_the_reports_exceptions_only(layers):
    pss = {d.obj["metadata"]["name"]: d.obj["spec"]["match"] for d in layers["governance"]
           if d.obj["kind"].startswith("K8sPSS")}
    assert len(pss) == 8
    operators = {"strimzi.io/cluster": ["onto-kafka"],
                 "app.kubernetes.io/instance": ["onto-milvus", "onto-milvus-etcd"],
                 "release": ["onto-milvus-minio"],
                 "elasticsearch.k8s.elastic.co/cluster-name": ["onto"], "kibana.k8s.elastic.co/name": ["onto"]}
    fluent_bit = {"app.kubernetes.io/name": ["fluent-bit"]}
    for name, match in pss.items():
        assert match["namespaces"] == APP_NAMESPACES, name
        excluded = {e["key"]: e["values"] for e in match["labelSelector"]["matchExpressions"]}
        assert all(e["operator"] == "NotIn" for e in match["labelSelector"]["matchExpressions"]), name
        # Fluent Bit: exceptions OPS-PSS-002/012 (hostPath) and OPS-WL-001 (root) only.
        wanted = {**operators, **fluent_bit} if name in {"app-pods-restricted-volumes",
                                                          "app-pods-run-as-non-root"} else operators
        assert excluded == wanted, name
