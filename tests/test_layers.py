"""Applying layers, plans, readiness, drift and the layer checks against the real API server
(tests/fixtures/kube_server.py), and the ``infra/<layer>`` assets whose own run yields drift and the
requirement checks.

The code runs as ``ops-platform-infra``, the identity of layer runs (infra/dagster/rbac.yaml), and
layer runs run as that identity in Kubernetes (the run tag the K8sRunLauncher reads). Set-up is
done as admin: the CRDs the operators' charts install, statuses controllers write, another field
manager's update, a Gatekeeper that makes the CRD of a ConstraintTemplate. Namespaces the code
fixes (the layers' own) are renamed per test where the test applies them, so tests do not share
them. Only the injected 500s stay on the fake server, the one that can fail a request on demand.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from kubernetes import client

from ops_platform import definitions, layer_checks
from ops_platform.assets import infra as infra_assets
from ops_platform.assets.keys import layer_key
from ops_platform.errors import ServerUnreachableError
from ops_platform.layers import CUSTOM_KINDS_REPORTING_READY, LayerError, apply_layer, detect_drift, readiness_of
from ops_platform.local_servers import free_port
from ops_platform.manifests import REPO_ROOT, constraint_crd, load_layer_manifests, object_ref
from ops_platform.resources.kubernetes import FieldConflict, KubernetesClient, KubernetesError, KubernetesResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.fixtures.kube_server import CRD_DIR, in_namespaces_of, servable_on_1_20

INFRA = "ops-platform-infra"
CRD_API, CRD_KIND = "apiextensions.k8s.io/v1", "CustomResourceDefinition"
STANZA_CRD_FILE = CRD_DIR / "pgbackrest.dalibo.com" / "stanza.yaml"
SPEC = load_spec(DEFAULT_SPEC_PATH)


# --- objects and set-up ------------------------------------------------------------------------


def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def configmap(ns: str, mode: str = "strict", **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": ns},
            "data": data or {"mode": mode}}


def deployment(ns: str, image: str = "nginx:1.27", version: str = "1", **spec: object) -> dict:
    labels = {"app": "web", "version": version}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                {"name": "app", "image": image, "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                 "resources": {"requests": {"cpu": "1000m", "memory": "1024Mi"}}},
                {"name": "sidecar", "image": "envoy:1.30"},
            ]}},
            **spec,
        },
    }


def stanza(ns: str) -> dict:
    return {"apiVersion": "pgbackrest.dalibo.com/v1", "kind": "Stanza", "metadata": {"name": "main", "namespace": ns},
            "spec": {"stanzaConfiguration": {"name": "main"}}}


def widget(ns: str) -> dict:
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "gear", "namespace": ns},
            "spec": {"teeth": 12}}


def by_ref(result) -> dict:
    return {outcome.ref: outcome for outcome in result.objects}


def update_as(kube_cluster, manager: str, api, method: str, *args, body: dict) -> None:
    """An Update (not an apply) by another field manager, as an autoscaler or `kubectl edit` makes it."""
    getattr(api(kube_cluster.admin_client()), method)(*args, body, field_manager=manager)


@pytest.fixture
def kubeconfig(kube_cluster, tmp_path) -> Path:
    return kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", INFRA)


@pytest.fixture
def kube(kubeconfig) -> KubernetesClient:
    return KubernetesResource(kubeconfig=str(kubeconfig), request_timeout=10).get_client()


@pytest.fixture
def shop(kube_cluster) -> Iterator[str]:
    """The name of a namespace the layer under test creates (it does not exist yet); deleted afterwards."""
    name = f"shop-{uuid.uuid4().hex[:8]}"
    yield name
    kube_cluster.delete_object("v1", "Namespace", name)


def remove_crd(kube_cluster, name: str) -> None:
    kube_cluster.delete_object(CRD_API, CRD_KIND, name)
    kube_cluster.wait_for(f"CRD {name} gone", lambda: kube_cluster.get_object(CRD_API, CRD_KIND, name) is None)


@pytest.fixture
def stanza_crd(kube_cluster) -> Iterator[dict]:
    """The Stanza CRD, absent from the server at the start (the layer under test creates it); restored after."""
    [crd] = load_layer_manifests(STANZA_CRD_FILE)
    installed = kube_cluster.get_object(CRD_API, CRD_KIND, crd["metadata"]["name"]) is not None
    remove_crd(kube_cluster, crd["metadata"]["name"])
    yield crd
    remove_crd(kube_cluster, crd["metadata"]["name"])
    if installed:
        kube_cluster.install_crds(STANZA_CRD_FILE)


@pytest.fixture
def renamed(kube_cluster) -> Iterator[str]:
    """A prefix for the layers' namespaces in this test; those namespaces are deleted afterwards."""
    prefix = f"l{uuid.uuid4().hex[:6]}"
    yield prefix
    for item in kube_cluster.list_objects("v1", "Namespace"):
        if item["metadata"]["name"].startswith(f"{prefix}-"):
            kube_cluster.delete_object("v1", "Namespace", item["metadata"]["name"])


# --- apply, plan, readiness --------------------------------------------------------------------


def test_apply_creates_then_is_unchanged_then_changed(kube, kube_cluster, kubelet, stanza_crd, shop):
    """CRDs first, Established, then their custom resources; a rollout the controllers complete."""
    kubelet.run(shop, {"app": "web"}, "ready")
    layer = [stanza_crd, namespace(shop), configmap(shop), deployment(shop), stanza(shop)]
    first = apply_layer(kube, layer, plan=False, wait_timeout=60)
    assert [o.action for o in first.objects] == ["created"] * 5
    assert all(o.ready for o in first.objects), first.not_ready
    assert first.totals() == {"created": 5, "changed": 0, "unchanged": 0, "conflicts": 0, "not_ready": 0}
    assert kube_cluster.get_object("pgbackrest.dalibo.com/v1", "Stanza", "main", shop)["spec"] == stanza(shop)["spec"]
    stored = kube_cluster.get_object("v1", "ConfigMap", "settings", shop)
    assert {(e["manager"], e["operation"]) for e in stored["metadata"]["managedFields"]} == {("ops-platform", "Apply")}
    live = kube_cluster.get_object("apps/v1", "Deployment", "web", shop)
    assert live["status"]["updatedReplicas"] == live["status"]["availableReplicas"] == 2

    again = apply_layer(kube, layer, plan=False, wait_timeout=10)
    assert again.totals() == {"created": 0, "changed": 0, "unchanged": 5, "conflicts": 0, "not_ready": 0}

    changed = apply_layer(kube, [stanza_crd, namespace(shop), configmap(shop, "relaxed"), deployment(shop),
                                 stanza(shop)], plan=False, wait_timeout=10)
    assert by_ref(changed)[f"ConfigMap {shop}/settings"].action == "changed"
    assert changed.totals()["unchanged"] == 4
    assert kube_cluster.get_object("v1", "ConfigMap", "settings", shop)["data"] == {"mode": "relaxed"}


def test_plan_stores_nothing_and_shows_the_diff(kube, kube_cluster, stanza_crd, shop):
    layer = [stanza_crd, namespace(shop), configmap(shop), stanza(shop)]
    fresh = apply_layer(kube, layer, plan=True, wait_timeout=5)
    assert [o.action for o in fresh.objects] == ["would create"] * 4
    assert all(o.ready is None for o in fresh.objects)
    outcomes = by_ref(fresh)
    assert outcomes[f"Stanza {shop}/main"].reason == (
        "not dry-run: its CRD stanzas.pgbackrest.dalibo.com is created by this layer")
    assert outcomes[f"ConfigMap {shop}/settings"].reason == (
        f"not dry-run: its namespace {shop} is created by this layer")
    assert kube_cluster.get_object("v1", "Namespace", shop) is None
    assert kube_cluster.get_object(CRD_API, CRD_KIND, "stanzas.pgbackrest.dalibo.com") is None

    apply_layer(kube, layer, plan=False, wait_timeout=5)
    version = kube_cluster.get_object("v1", "ConfigMap", "settings", shop)["metadata"]["resourceVersion"]
    planned = apply_layer(kube, [stanza_crd, namespace(shop), configmap(shop, "relaxed"), stanza(shop)],
                          plan=True, wait_timeout=5)
    outcome = by_ref(planned)[f"ConfigMap {shop}/settings"]
    assert outcome.action == "would change"
    assert "-  mode: strict" in outcome.diff and "+  mode: relaxed" in outcome.diff
    assert "managedFields" not in outcome.diff and "resourceVersion" not in outcome.diff
    assert planned.totals() == {"created": 0, "changed": 1, "unchanged": 3, "conflicts": 0, "not_ready": 0}
    stored = kube_cluster.get_object("v1", "ConfigMap", "settings", shop)
    assert stored["data"] == {"mode": "strict"} and stored["metadata"]["resourceVersion"] == version


def test_plan_diff_is_bounded(kube, kube_namespace):
    kube.apply(configmap(kube_namespace, **{f"key{i}": "a" for i in range(200)}))
    planned = apply_layer(kube, [configmap(kube_namespace, **{f"key{i}": "b" for i in range(200)})],
                          plan=True, wait_timeout=1)
    diff = planned.objects[0].diff
    assert diff.count("\n") <= 81 and "more lines)" in diff.splitlines()[-1]


def test_deployment_whose_pods_never_run_is_not_ready_with_the_reason(kube, kube_cluster, kube_namespace):
    result = apply_layer(kube, [deployment(kube_namespace), configmap(kube_namespace)], plan=False, wait_timeout=0.5)
    web = by_ref(result)[f"Deployment {kube_namespace}/web"]
    assert web.ready is False and web.action == "created"
    assert web.reason.startswith("not available within the layer's 0.5 s wait: 0/2 replicas available")
    assert by_ref(result)[f"ConfigMap {kube_namespace}/settings"].ready is True
    assert kube_cluster.get_object("v1", "ConfigMap", "settings", kube_namespace) is not None
    assert [o.ref for o in result.not_ready] == [f"Deployment {kube_namespace}/web"]


def test_rollout_whose_new_pods_crash_is_not_ready_though_the_old_pods_serve(kube, kubelet, kube_namespace):
    """Old pods keep the Deployment Available; the new ReplicaSet never becomes available and the rollout
    passes its progress deadline: not ready, said at once (not after the layer's whole wait)."""
    kubelet.run(kube_namespace, {"app": "web", "version": "1"}, "ready")
    kubelet.run(kube_namespace, {"app": "web", "version": "2"}, "crash")
    assert apply_layer(kube, [deployment(kube_namespace)], plan=False, wait_timeout=60).objects[0].ready

    bumped = deployment(kube_namespace, image="nginx:1.28", version="2", progressDeadlineSeconds=2)
    [outcome] = apply_layer(kube, [bumped], plan=False, wait_timeout=120).objects
    assert outcome.action == "changed" and outcome.ready is False
    assert outcome.reason.startswith("will not be available: 2/2 replicas available; 1/2 updated; "
                                     "2 old replica(s) left")
    assert "Available=True" in outcome.reason and "has timed out progressing" in outcome.reason


def test_custom_resource_not_ready_until_its_ready_condition_is_true(kube, kube_cluster, kube_crds, kube_namespace):
    cert = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "onto-tls", "namespace": kube_namespace},
            "spec": {"secretName": "onto-tls", "dnsNames": ["onto.test"],
                     "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}}
    assert ("cert-manager.io", "Certificate") in CUSTOM_KINDS_REPORTING_READY
    apply_layer(kube, [cert], plan=False, wait_timeout=0)
    kube_cluster.set_status("cert-manager.io/v1", "Certificate", "onto-tls", kube_namespace,
                            {"conditions": [{"type": "Ready", "status": "False", "message": "issuing"}]})
    [outcome] = apply_layer(kube, [cert], plan=False, wait_timeout=0.3).objects
    assert outcome.ready is False and "Ready=False (issuing)" in outcome.reason

    def issued() -> None:
        kube_cluster.set_status("cert-manager.io/v1", "Certificate", "onto-tls", kube_namespace,
                                {"conditions": [{"type": "Ready", "status": "True", "message": "issued"}]})

    timer = threading.Timer(0.3, issued)
    timer.start()
    assert apply_layer(kube, [cert], plan=False, wait_timeout=10).objects[0].ready is True
    timer.join()


def test_constraints_wait_for_the_crd_gatekeeper_makes_of_their_template(kube, kube_cluster, kube_crds):
    """Gatekeeper (played here as admin) makes a constraint kind's CRD once it sees the template: the
    layer applies the template, waits for that CRD, then applies the constraint."""
    [template] = [t for t in load_layer_manifests("infra/layers/governance/constraint-templates.yaml")
                  if t["metadata"]["name"] == "k8sdisallowedtags"]
    name = f"no-latest-{uuid.uuid4().hex[:6]}"
    constraint = {"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": "K8sDisallowedTags",
                  "metadata": {"name": name},
                  "spec": {"enforcementAction": "dryrun", "parameters": {"tags": ["latest"]}}}
    crd = constraint_crd(template)
    installed = kube_cluster.get_object(CRD_API, CRD_KIND, crd["metadata"]["name"]) is not None
    remove_crd(kube_cluster, crd["metadata"]["name"])
    kube_cluster.delete_object("templates.gatekeeper.sh/v1", "ConstraintTemplate", "k8sdisallowedtags")
    planned = apply_layer(kube, [template, constraint], plan=True, wait_timeout=5)
    assert by_ref(planned)[f"K8sDisallowedTags {name}"].reason == (
        "not dry-run: its CRD k8sdisallowedtags.constraints.gatekeeper.sh is made by Gatekeeper from "
        "ConstraintTemplate k8sdisallowedtags of this layer")

    def gatekeeper() -> None:
        kube_cluster.wait_for("the ConstraintTemplate", lambda: kube_cluster.get_object(
            "templates.gatekeeper.sh/v1", "ConstraintTemplate", "k8sdisallowedtags"))
        kube_cluster.put_object(crd, manager="gatekeeper")

    thread = threading.Thread(target=gatekeeper, daemon=True)
    thread.start()
    try:
        result = apply_layer(kube, [template, constraint], plan=False, wait_timeout=30)
        thread.join(timeout=10)
        assert [o.action for o in result.objects] == ["created", "created"]
        assert kube_cluster.get_object("constraints.gatekeeper.sh/v1beta1", "K8sDisallowedTags", name)
    finally:
        remove_crd(kube_cluster, crd["metadata"]["name"])
        if installed:
            kube_cluster.install_crds(CRD_DIR / "constraints.gatekeeper.sh" / "k8sdisallowedtags.yaml")


def test_missing_crd_is_a_clear_error_and_nothing_is_applied(kube, kube_cluster, shop):
    for plan in (True, False):
        with pytest.raises(LayerError, match=r"kind Widget \(example.com/v1\) is not served: install the "
                                             r"CustomResourceDefinition of Widget in group example.com "
                                             rf"\(needed by Widget {shop}/gear\)"):
            apply_layer(kube, [namespace(shop), configmap(shop), widget(shop)], plan=plan, wait_timeout=1)
    assert kube_cluster.get_object("v1", "Namespace", shop) is None


def test_api_server_failure_mid_layer_names_the_object_fake_injects_500(kubeconfig_path, kube_api):
    kube = KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake").get_client()
    kube_api.fail_next("PATCH", r"/configmaps/settings", 500, message="etcdserver: request timed out")
    with pytest.raises(KubernetesError, match=r"apply ConfigMap shop/settings .*500.*etcdserver: request timed out"):
        apply_layer(kube, [namespace("shop"), configmap("shop"), deployment("shop")], plan=False, wait_timeout=1)
    assert kube_api.get_object("apps/v1", "deployments", "web", "shop") is None


def kubeconfig_of_a_server_down(path: Path, context: str = "down") -> tuple[Path, int]:
    port = free_port()
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": "down", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": context, "context": {"cluster": "down", "user": "down"}}],
    }))
    return path, port


def test_api_server_down_names_host_and_setting(tmp_path):
    config, port = kubeconfig_of_a_server_down(tmp_path / "kubeconfig")
    kube = KubernetesResource(kubeconfig=str(config), request_timeout=2).get_client()
    with pytest.raises(ServerUnreachableError, match=rf"127.0.0.1:{port}.*KUBECONFIG"):
        apply_layer(kube, [namespace("shop")], plan=True, wait_timeout=1)
    with pytest.raises(ServerUnreachableError):
        detect_drift(kube, [namespace("shop")])


# --- field managers and drift ------------------------------------------------------------------


def test_unforced_apply_reports_the_other_manager_and_changes_nothing(kube, kube_cluster, kube_namespace):
    apply_layer(kube, [deployment(kube_namespace), configmap(kube_namespace)], plan=False, wait_timeout=0)
    update_as(kube_cluster, "hpa-controller", client.AppsV1Api, "patch_namespaced_deployment", "web", kube_namespace,
              body={"spec": {"replicas": 5}})
    kube_cluster.put_object(configmap(kube_namespace, "loose"), manager="helm")

    with pytest.raises(FieldConflict) as conflict:
        apply_layer(kube, [deployment(kube_namespace)], plan=False, wait_timeout=0)
    assert [(c.manager, c.field) for c in conflict.value.conflicts] == [("hpa-controller", ".spec.replicas")]
    with pytest.raises(FieldConflict, match=r"\.data\.mode \(owned by 'helm'\); nothing was changed"):
        apply_layer(kube, [configmap(kube_namespace)], plan=False, wait_timeout=0)
    assert kube_cluster.get_object("apps/v1", "Deployment", "web", kube_namespace)["spec"]["replicas"] == 5
    assert kube_cluster.get_object("v1", "ConfigMap", "settings", kube_namespace)["data"] == {"mode": "loose"}

    planned = by_ref(apply_layer(kube, [deployment(kube_namespace)], plan=True, wait_timeout=0))
    web = planned[f"Deployment {kube_namespace}/web"]
    assert web.action == "would conflict" and web.reason == (
        "the apply would fail: another field manager owns .spec.replicas (owned by 'hpa-controller') "
        "(force_conflicts takes them over)")

    forced = apply_layer(kube, [deployment(kube_namespace), configmap(kube_namespace)], plan=False, wait_timeout=0,
                         force=True)
    assert [o.action for o in forced.objects] == ["changed", "changed"]
    assert kube_cluster.get_object("apps/v1", "Deployment", "web", kube_namespace)["spec"]["replicas"] == 2


def test_no_drift_after_apply_though_the_server_defaults_and_normalises(kube, kube_cluster, kube_namespace):
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "default-deny", "namespace": kube_namespace},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": kube_namespace},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    objects = [deployment(kube_namespace), policy, service]
    apply_layer(kube, objects, plan=False, wait_timeout=0)
    live = kube_cluster.get_object("apps/v1", "Deployment", "web", kube_namespace)
    assert live["spec"]["strategy"]["type"] == "RollingUpdate"
    assert live["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert kube_cluster.get_object("v1", "Service", "web", kube_namespace)["spec"]["clusterIP"]

    report = detect_drift(kube, objects)
    assert report.in_sync and report.counts() == {"in_sync": 3, "drifted": 0, "missing": 0}

    update_as(kube_cluster, "hpa-controller", client.AppsV1Api, "patch_namespaced_deployment", "web", kube_namespace,
              body={"spec": {"replicas": 5}})
    update_as(kube_cluster, "kubectl-edit", client.NetworkingV1Api, "patch_namespaced_network_policy",
              "default-deny", kube_namespace, body={"spec": {"policyTypes": ["Ingress"]}})
    kube_cluster.delete_object("v1", "Service", "web", kube_namespace)
    rows = {row.ref: row for row in detect_drift(kube, [*objects, widget(kube_namespace)]).rows}
    assert rows[f"Deployment {kube_namespace}/web"].state == "drifted"
    assert rows[f"Deployment {kube_namespace}/web"].differences == [
        "spec.replicas: manifest 2, live 5 (set by 'hpa-controller')"]
    assert rows[f"NetworkPolicy {kube_namespace}/default-deny"].differences == [
        'spec.policyTypes: manifest ["Ingress","Egress"], live ["Ingress"] (set by \'kubectl-edit\')']
    assert rows[f"Service {kube_namespace}/web"].state == "missing"
    assert rows[f"Widget {kube_namespace}/gear"].state == "missing"
    assert "not served" in rows[f"Widget {kube_namespace}/gear"].differences[0]


def test_drift_matches_named_items_and_leaves_other_managers_items_alone(kube, kube_cluster, kube_namespace):
    apply_layer(kube, [deployment(kube_namespace)], plan=False, wait_timeout=0)
    # A container injected by another manager (a mesh's sidecar injector) is not drift: an apply keeps it.
    update_as(kube_cluster, "sidecar-injector", client.AppsV1Api, "patch_namespaced_deployment", "web",
              kube_namespace, body={"spec": {"template": {"spec": {"containers": [
                  {"name": "istio-proxy", "image": "istio/proxyv2:1.22"}]}}}})
    assert detect_drift(kube, [deployment(kube_namespace)]).in_sync
    update_as(kube_cluster, "kubectl-set-image", client.AppsV1Api, "patch_namespaced_deployment", "web",
              kube_namespace, body={"spec": {"template": {"spec": {"containers": [
                  {"name": "sidecar", "image": "envoy:1.31"}]}}}})
    [row] = detect_drift(kube, [deployment(kube_namespace)]).rows
    assert row.state == "drifted"
    assert row.differences == [("spec.template.spec.containers[name=sidecar].image: manifest envoy:1.30, "
                                "live envoy:1.31 (set by 'kubectl-set-image')")]


# --- the layers of infra/platform.yaml ---------------------------------------------------------


def test_every_layer_applies_as_the_infra_identity_and_is_in_sync(kube, kube_cluster, kube_crds, renamed):
    """Every object of every layer the 1.20 server can take (servable_on_1_20 says which it leaves
    out and why), applied as ops-platform-infra: no refusal, and no drift right after."""
    for layer in SPEC.layers_in_order():
        layer_objects, _ = servable_on_1_20(in_namespaces_of(renamed, load_layer_manifests(layer.manifests)))
        assert layer_objects, layer.name
        # force: other tests of the session may have put some of the cluster-wide objects as their own manager.
        result = apply_layer(kube, layer_objects, plan=False, wait_timeout=0, force=True)
        assert result.created + result.changed + result.unchanged == len(layer_objects)
        # Nothing runs the pods and no operator reports: what is not ready is what waits for one, said why.
        manifests = {object_ref(obj): obj for obj in layer_objects}
        assert all(readiness_of(manifests[o.ref]) and o.reason for o in result.not_ready), result.not_ready
        drift = detect_drift(kube, layer_objects)
        assert drift.in_sync, (layer.name, [(row.ref, row.differences) for row in drift.drifted])

    # The layers' requirement checks as the layer runs make them, as the infra identity.
    assert layer_checks.storage_classes_present(kube).passed
    deny = layer_checks.default_deny_in_app_namespaces(kube)
    assert {f"{renamed}-ontology-editor", f"{renamed}-data", f"{renamed}-logging"} <= {
        row["namespace"] for row in deny.rows if row["ok"]}
    quotas = layer_checks.quota_and_limit_range_in_app_namespaces(kube)
    assert {f"{renamed}-ontology-editor", f"{renamed}-data", f"{renamed}-logging"} <= {
        row["namespace"] for row in quotas.rows if row["resource_quotas"] and row["limit_ranges"]}
    assert layer_checks.control_plane_nodes(kube).description.startswith("0 control-plane nodes")


@pytest.fixture
def without_storage_classes(kube_cluster) -> Iterator[list[dict]]:
    """The storage layer's objects, none of them on the server at the start (removed as admin) nor after."""
    objects = load_layer_manifests("infra/layers/storage")

    def remove() -> None:
        for obj in objects:
            kube_cluster.delete_object(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])

    remove()
    yield objects
    remove()


def test_storage_layer_plan_then_apply(kube, kube_cluster, kube_crds, without_storage_classes):
    objects = without_storage_classes
    planned = apply_layer(kube, objects, plan=True, wait_timeout=1)
    assert planned.totals() == {"created": 4, "changed": 0, "unchanged": 0, "conflicts": 0, "not_ready": 0}
    assert kube_cluster.get_object("storage.k8s.io/v1", "StorageClass", "fast-ssd") is None
    assert not layer_checks.storage_classes_present(kube).passed

    applied = apply_layer(kube, objects, plan=False, wait_timeout=1)
    assert applied.totals() == {"created": 4, "changed": 0, "unchanged": 0, "conflicts": 0, "not_ready": 0}
    assert kube_cluster.get_object("storage.k8s.io/v1", "StorageClass", "fast-ssd")["parameters"]["type"] == "io2"
    assert layer_checks.storage_classes_present(kube).passed
    assert detect_drift(kube, objects).in_sync
    assert apply_layer(kube, objects, plan=True, wait_timeout=1).totals()["unchanged"] == 4


# --- the layer checks --------------------------------------------------------------------------


def node(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


@pytest.fixture
def nodes(kube_cluster) -> Iterator[list[str]]:
    """Nodes a test registers (as the cloud's node groups would), removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        kube_cluster.delete_object("v1", "Node", name)


def register(kube_cluster, nodes: list[str], obj: dict) -> None:
    kube_cluster.put_object(obj)
    nodes.append(obj["metadata"]["name"])


def test_control_plane_check(kube, kube_cluster, nodes):
    assert layer_checks.control_plane_nodes(kube).description.startswith("0 control-plane nodes")
    for index in range(3):
        register(kube_cluster, nodes, node(f"cp{index}", **{"node-role.kubernetes.io/control-plane": "",
                                                            "topology.kubernetes.io/zone": "ap-northeast-2a"}))
    outcome = layer_checks.control_plane_nodes(kube)
    assert not outcome.passed and "3 control-plane nodes in 1 zones" in outcome.description
    register(kube_cluster, nodes, node("cp2", **{"node-role.kubernetes.io/control-plane": "",
                                                 "topology.kubernetes.io/zone": "ap-northeast-2c"}))
    assert layer_checks.control_plane_nodes(kube).passed


def test_control_plane_check_on_eks_and_node_group_sizes(kube, kube_cluster, nodes):
    sizes = {"app": 3, "data": 3, "platform": 1}
    for group, count in sizes.items():
        for index in range(count):
            register(kube_cluster, nodes, node(f"{group}-{index}", **{"eks.amazonaws.com/nodegroup": group}))
    outcome = layer_checks.control_plane_nodes(kube)
    assert outcome.passed and outcome.description.startswith("managed control plane (EKS)")
    outcome = layer_checks.node_group_sizes(kube)
    assert not outcome.passed and outcome.description.endswith("platform has 1 (range 2-4)")
    register(kube_cluster, nodes, node("platform-1", **{"ops-platform/node-group": "platform"}))
    assert layer_checks.node_group_sizes(kube).passed


def test_checks_of_kinds_whose_crd_is_missing_name_the_crd(kube_cluster, kubeconfig, kube_crds):
    files = {"peerauthentications.security.istio.io": "security.istio.io/peerauthentication.yaml",
             "alertmanagers.monitoring.coreos.com": "monitoring.coreos.com/alertmanager.yaml",
             "constrainttemplates.templates.gatekeeper.sh": "templates.gatekeeper.sh/constrainttemplate.yaml"}
    for name in files:
        remove_crd(kube_cluster, name)
    try:
        kube = KubernetesResource(kubeconfig=str(kubeconfig)).get_client()
        assert "CRD peerauthentications.security.istio.io not installed" in layer_checks.mtls_strict(kube).description
        assert "alertmanagers.monitoring.coreos.com" in layer_checks.alertmanager_replicas(kube).description
        assert ("constrainttemplates.templates.gatekeeper.sh"
                in layer_checks.gatekeeper_audit_clean(kube).description)
    finally:
        kube_cluster.install_crds(*(CRD_DIR / path for path in files.values()))


def test_mtls_check(kube, kube_cluster, kube_crds):
    kube_cluster.create_namespace("istio-system")
    kube_cluster.delete_object("security.istio.io/v1", "PeerAuthentication", "default", "istio-system")
    assert "no PeerAuthentication 'default'" in layer_checks.mtls_strict(kube).description
    policy = load_layer_manifests("infra/layers/service_mesh/peer-authentication.yaml")[0]
    kube.apply({**policy, "spec": {"mtls": {"mode": "PERMISSIVE"}}})
    assert layer_checks.mtls_strict(kube).description == "mesh-wide mTLS mode PERMISSIVE"
    kube.apply(policy)
    assert layer_checks.mtls_strict(kube).passed


def app_namespace(kube_cluster, name: str) -> None:
    kube_cluster.create_namespace(name, labels={"ops-platform/app-namespace": "true"})


def test_default_deny_check(kube, kube_cluster, kube_namespace):
    app_namespace(kube_cluster, kube_namespace)
    allow = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow-dns", "namespace": kube_namespace},
             "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                      "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}}
    kube.apply(allow)
    outcome = layer_checks.default_deny_in_app_namespaces(kube)
    assert not outcome.passed and kube_namespace in outcome.description
    assert {"namespace": kube_namespace, "default_deny_policy": "", "ok": False} in outcome.rows
    kube.apply({**allow, "metadata": {"name": "default-deny", "namespace": kube_namespace},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
    outcome = layer_checks.default_deny_in_app_namespaces(kube)
    assert {"namespace": kube_namespace, "default_deny_policy": "default-deny", "ok": True} in outcome.rows


def test_alertmanager_check(kube, kube_cluster, kube_crds, kube_namespace):
    for other in kube_cluster.list_objects("monitoring.coreos.com/v1", "Alertmanager"):
        kube_cluster.delete_object("monitoring.coreos.com/v1", "Alertmanager", other["metadata"]["name"],
                                   other["metadata"]["namespace"])
    assert layer_checks.alertmanager_replicas(kube).description == "no Alertmanager in the cluster"
    manager = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Alertmanager",
               "metadata": {"name": "onto", "namespace": kube_namespace}, "spec": {"replicas": 1}}
    kube.apply(manager)
    outcome = layer_checks.alertmanager_replicas(kube)
    assert not outcome.passed and outcome.rows == [{"alertmanager": f"{kube_namespace}/onto", "replicas": 1}]
    kube.apply({**manager, "spec": {"replicas": 2}})
    assert layer_checks.alertmanager_replicas(kube).passed


def test_gatekeeper_audit_check(kube, kube_cluster, kube_crds):
    for template in kube_cluster.list_objects("templates.gatekeeper.sh/v1", "ConstraintTemplate"):
        kube_cluster.delete_object("templates.gatekeeper.sh/v1", "ConstraintTemplate", template["metadata"]["name"])
    for other in kube_cluster.list_objects("constraints.gatekeeper.sh/v1beta1", "K8sRequiredLabels"):
        kube_cluster.delete_object("constraints.gatekeeper.sh/v1beta1", "K8sRequiredLabels", other["metadata"]["name"])
    assert "no Gatekeeper constraints in the cluster" in layer_checks.gatekeeper_audit_clean(kube).description
    template = {"apiVersion": "templates.gatekeeper.sh/v1", "kind": "ConstraintTemplate",
                "metadata": {"name": "k8srequiredlabels"},
                "spec": {"crd": {"spec": {"names": {"kind": "K8sRequiredLabels"}}}, "targets": []}}
    constraint = {"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": "K8sRequiredLabels",
                  "metadata": {"name": "must-have-owner"}, "spec": {}}
    kube.apply(template)
    kube.apply(constraint)
    outcome = layer_checks.gatekeeper_audit_clean(kube)
    assert not outcome.passed and "K8sRequiredLabels/must-have-owner not audited yet" in outcome.description
    kube_cluster.set_status("constraints.gatekeeper.sh/v1beta1", "K8sRequiredLabels", "must-have-owner", None,
                            {"totalViolations": 4})
    outcome = layer_checks.gatekeeper_audit_clean(kube)
    assert not outcome.passed and outcome.description == "4 violations across 1 constraints"
    kube_cluster.set_status("constraints.gatekeeper.sh/v1beta1", "K8sRequiredLabels", "must-have-owner", None,
                            {"totalViolations": 0})
    assert layer_checks.gatekeeper_audit_clean(kube).passed


def test_quota_and_limit_range_check(kube, kube_cluster, kube_namespace):
    app_namespace(kube_cluster, kube_namespace)
    kube.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "quota", "namespace": kube_namespace},
                "spec": {"hard": {"pods": "20"}}})
    outcome = layer_checks.quota_and_limit_range_in_app_namespaces(kube)
    assert f"{kube_namespace} lacks a LimitRange" in outcome.description and not outcome.passed
    kube.apply({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "limits", "namespace": kube_namespace},
                "spec": {"limits": [{"type": "Container", "default": {"cpu": "500m"}}]}})
    outcome = layer_checks.quota_and_limit_range_in_app_namespaces(kube)
    assert {"namespace": kube_namespace, "resource_quotas": 1, "limit_ranges": 1} in outcome.rows
    assert kube_namespace not in outcome.description


def test_every_check_is_mapped_to_a_layer_of_the_platform():
    layers = {layer["name"] for layer in yaml.safe_load((REPO_ROOT / "infra" / "platform.yaml").read_text())["layers"]}
    assert set(layer_checks.LAYER_CHECKS) <= layers
    names = [name for checks in layer_checks.LAYER_CHECKS.values() for name, _ in checks]
    assert len(names) == len(set(names)) == 8


# --- the infra/<layer> assets ------------------------------------------------------------------


def layer_spec(**manifests: str):
    """The platform spec with the manifests of some layers replaced."""
    layers = [layer.model_copy(update={"manifests": manifests[layer.name]}) if layer.name in manifests else layer
              for layer in SPEC.layers]
    return SPEC.model_copy(update={"layers": layers})


def write_layer(directory: Path, objects: list[dict]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    return str(directory)


def materialize_layers(names, kubeconfig, *, spec=SPEC, plan=False, wait_timeout=2.0, force=False, instance=None):
    assets = [a for a in infra_assets.build_layer_assets(spec) if {layer_key(n) for n in names} & set(a.keys)]
    return dg.materialize(
        assets,
        resources={"kubernetes": KubernetesResource(kubeconfig=str(kubeconfig), request_timeout=5)},
        run_config={"ops": {f"infra__{name}": {"config": {"plan": plan, "wait_timeout_seconds": wait_timeout,
                                                          "force_conflicts": force}}
                            for name in names}},
        instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False,
    )


def checks_by_step(result) -> dict[str, dict[str, dg.AssetCheckEvaluation]]:
    """Each step of the run with the check evaluations it yielded; asserts one step per asset."""
    steps = {e.step_key for e in result.all_events if e.is_step_start}
    by_step: dict[str, dict[str, dg.AssetCheckEvaluation]] = {step: {} for step in steps}
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            by_step[event.step_key][evaluation.check_name] = evaluation
    return by_step


def layer_failure(result) -> str:
    event = next(e for e in result.all_events if e.is_step_failure)
    return event.step_failure_data.user_failure_data.description


def test_layer_assets_declare_their_checks_and_no_standalone_checks_remain():
    specs = {key.path[1]: {spec.name for spec in asset.check_specs}
             for asset in infra_assets.build_layer_assets(SPEC) for key in asset.keys}
    assert specs["storage"] == {"drift", "storage_classes_present"}
    assert specs["governance"] == {"drift", "gatekeeper_audit_clean", "quota_and_limit_range_in_app_namespaces"}
    assert specs["logging"] == {"drift"}
    assert not any(spec.blocking for asset in infra_assets.build_layer_assets(SPEC) for spec in asset.check_specs)


def test_layer_run_yields_drift_and_requirement_checks_in_its_one_step(kubeconfig, kube_crds, renamed, tmp_path,
                                                                      without_storage_classes):
    cluster = in_namespaces_of(renamed, load_layer_manifests("infra/layers/cluster"))
    spec = layer_spec(cluster=write_layer(tmp_path / "cluster", cluster))
    result = materialize_layers(["cluster", "storage"], kubeconfig, spec=spec)

    assert result.success
    by_step = checks_by_step(result)
    assert set(by_step) == {"infra__cluster", "infra__storage"}, "one step per asset, none per check"
    assert set(by_step["infra__cluster"]) == {"drift", "control_plane_nodes", "node_group_sizes"}
    assert set(by_step["infra__storage"]) == {"drift", "storage_classes_present"}
    storage = by_step["infra__storage"]
    assert storage["drift"].passed and storage["drift"].description == "in sync"
    assert storage["drift"].severity == dg.AssetCheckSeverity.WARN
    assert storage["storage_classes_present"].passed
    assert by_step["infra__cluster"]["drift"].passed
    # Against the live cluster, listed as the infra identity: one node, the kubelet stand-in, no control plane.
    control_plane = by_step["infra__cluster"]["control_plane_nodes"]
    assert not control_plane.passed and control_plane.severity == dg.AssetCheckSeverity.ERROR
    assert control_plane.description.startswith("0 control-plane nodes")
    [materialization] = result.asset_materializations_for_node("infra__storage")
    assert materialization.metadata["created"].value == 4


def test_layer_plan_checks_drift_as_the_diff_and_requirements_live(kubeconfig, kube_cluster, kube_crds,
                                                                   without_storage_classes):
    instance = dg.DagsterInstance.ephemeral()
    planned = materialize_layers(["storage"], kubeconfig, plan=True, instance=instance)

    assert planned.success
    assert planned.asset_materializations_for_node("infra__storage") == []
    assert kube_cluster.get_object("storage.k8s.io/v1", "StorageClass", "fast-ssd") is None
    checks = checks_by_step(planned)["infra__storage"]
    assert not checks["drift"].passed and checks["drift"].severity == dg.AssetCheckSeverity.WARN
    assert "StorageClass fast-ssd would create" in checks["drift"].description
    assert checks["drift"].metadata["created"].value == 4
    assert not checks["storage_classes_present"].passed
    assert checks["storage_classes_present"].description.startswith("storage classes missing: fast-ssd")

    assert materialize_layers(["storage"], kubeconfig, instance=instance).success
    update_as(kube_cluster, "kubectl-edit", client.StorageV1Api, "patch_storage_class", "fast-ssd",
              body={"allowVolumeExpansion": False})

    replanned = checks_by_step(materialize_layers(["storage"], kubeconfig, plan=True, instance=instance))
    assert not replanned["infra__storage"]["drift"].passed
    assert replanned["infra__storage"]["drift"].description == (
        "StorageClass fast-ssd would conflict (the apply would fail: another field manager owns "
        ".allowVolumeExpansion (owned by 'kubectl-edit') (force_conflicts takes them over))")
    assert replanned["infra__storage"]["drift"].metadata["conflicts"].value == 1
    assert replanned["infra__storage"]["storage_classes_present"].passed


def test_drift_after_apply_is_the_live_cluster_against_the_manifests(kubeconfig, kube_cluster, kubelet,
                                                                    kube_namespace, tmp_path):
    """An autoscaler that changes what was applied while the layer waits for it shows as drift."""
    spec = layer_spec(storage=write_layer(tmp_path / "web", [deployment(kube_namespace)]))

    def autoscale() -> None:
        kube_cluster.wait_for("the Deployment", lambda: kube_cluster.get_object(
            "apps/v1", "Deployment", "web", kube_namespace))
        update_as(kube_cluster, "hpa-controller", client.AppsV1Api, "patch_namespaced_deployment", "web",
                  kube_namespace, body={"spec": {"replicas": 3}})
        kubelet.run(kube_namespace, {"app": "web"}, "ready")

    scaler = threading.Thread(target=autoscale, daemon=True)
    scaler.start()
    result = materialize_layers(["storage"], kubeconfig, spec=spec, wait_timeout=60)
    scaler.join(timeout=10)

    assert result.success
    drift = checks_by_step(result)["infra__storage"]["drift"]
    assert not drift.passed and drift.severity == dg.AssetCheckSeverity.WARN
    assert drift.description == (f"Deployment {kube_namespace}/web drifted: spec.replicas: manifest 2, live 3 "
                                 "(set by 'hpa-controller')")
    assert drift.metadata["drifted"].value == 1


def test_layer_whose_objects_are_not_ready_fails_every_check_with_the_reason(kubeconfig, kube_namespace, tmp_path):
    spec = layer_spec(storage=write_layer(tmp_path / "web", [deployment(kube_namespace)]))
    result = materialize_layers(["storage"], kubeconfig, spec=spec, wait_timeout=0.3)

    assert not result.success
    assert result.asset_materializations_for_node("infra__storage") == []
    description = layer_failure(result)
    assert description.startswith(f"layer 'storage': 1 object(s) not ready: Deployment {kube_namespace}/web: not "
                                  "available within the layer's 0.3 s wait: 0/2 replicas available")
    checks = checks_by_step(result)["infra__storage"]
    assert set(checks) == {"drift", "storage_classes_present"}
    assert all(not c.passed and c.description == f"not checked: {description}" for c in checks.values())
    assert checks["drift"].severity == dg.AssetCheckSeverity.WARN


def test_layer_apply_conflict_fails_the_run_naming_the_manager_unless_forced(kubeconfig, kube_cluster,
                                                                            kube_namespace, tmp_path):
    spec = layer_spec(storage=write_layer(tmp_path / "settings", [configmap(kube_namespace)]))
    kube_cluster.put_object(configmap(kube_namespace, "loose"), manager="helm")
    result = materialize_layers(["storage"], kubeconfig, spec=spec)
    assert not result.success
    description = layer_failure(result)
    assert description.startswith(f"layer 'storage': kubernetes: apply ConfigMap {kube_namespace}/settings (v1) as "
                                  "field manager 'ops-platform' would change field(s) another manager owns: "
                                  ".data.mode (owned by 'helm'); nothing was changed")
    assert kube_cluster.get_object("v1", "ConfigMap", "settings", kube_namespace)["data"] == {"mode": "loose"}

    assert materialize_layers(["storage"], kubeconfig, spec=spec, force=True).success
    assert kube_cluster.get_object("v1", "ConfigMap", "settings", kube_namespace)["data"] == {"mode": "strict"}


def test_layer_apply_refused_by_the_api_server_fails_every_check_fake_injects_500(kubeconfig_path, kube_api):
    kube_api.fail_next("PATCH", r"/storageclasses/fast-ssd", 500, message="etcdserver: request timed out")
    result = dg.materialize(
        [a for a in infra_assets.build_layer_assets(SPEC) if layer_key("storage") in a.keys],
        resources={"kubernetes": KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake")},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
    )
    assert not result.success
    description = layer_failure(result)
    assert description.startswith("layer 'storage': kubernetes") and description.count("layer 'storage'") == 1
    assert "etcdserver: request timed out" in description
    checks = checks_by_step(result)["infra__storage"]
    assert all(not c.passed and "etcdserver: request timed out" in c.description for c in checks.values())


def test_layer_without_kubeconfig_fails_naming_the_setting(tmp_path):
    for plan in (False, True):
        result = materialize_layers(["storage"], tmp_path / "no-kubeconfig", plan=plan)
        assert not result.success
        description = layer_failure(result)
        assert description.startswith("layer 'storage'" + (" plan" if plan else "") + ": this operation on the "
                                      "Kubernetes cluster needs KUBECONFIG, which is not set")
        assert description.count("layer 'storage'") == 1
        checks = checks_by_step(result)["infra__storage"]
        assert set(checks) == {"drift", "storage_classes_present"}
        assert all(not c.passed and "KUBECONFIG" in c.description for c in checks.values())


def test_layer_with_the_api_server_down_fails_naming_host_and_setting(tmp_path):
    config, port = kubeconfig_of_a_server_down(tmp_path / "kubeconfig")
    result = materialize_layers(["storage"], config)
    assert not result.success
    description = layer_failure(result)
    assert description.startswith("layer 'storage': kubernetes") and description.count("layer 'storage'") == 1
    assert f"127.0.0.1:{port}" in description and "KUBECONFIG" in description
    assert all(not c.passed for c in checks_by_step(result)["infra__storage"].values())


# --- which ServiceAccount the runs run as ------------------------------------------------------


def test_a_layer_run_in_a_pod_without_the_infra_identity_is_refused_before_applying(monkeypatch):
    """In a pod (the pod's ServiceAccount, no kubeconfig) a run not tagged for ops-platform-infra."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    storage = [a for a in infra_assets.build_layer_assets(SPEC) if layer_key("storage") in a.keys]

    def run(tags: dict[str, str]):
        return dg.materialize(storage, resources={"kubernetes": KubernetesResource()}, tags=tags,
                              instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)

    refused = run({})
    assert not refused.success
    assert layer_failure(refused).startswith("layer 'storage': refused before applying anything: this run pod runs "
                                             "as the launcher's ServiceAccount, not ops-platform-infra")
    assert "launch job INFRA_layers" in layer_failure(refused)
    # Tagged, the run gets past the guard to the pod's credentials, which this test process does not have.
    tagged = run(infra_assets.INFRA_RUN_TAGS)
    assert not tagged.success and "refused before" not in layer_failure(tagged)
    assert "KUBERNETES_SERVICE_HOST" in layer_failure(tagged)


DAGSTER_DIR = REPO_ROOT / "infra" / "dagster"
RUN_IMAGE = "registry.test/ops-platform:1"


@pytest.fixture(scope="module")
def repository():
    return definitions.build_definitions(SPEC, "local").get_repository_def()


def launcher_configs() -> dict[str, dict]:
    """The K8sRunLauncher's config as infra/dagster/dagster.yaml has it, and as the Helm chart renders
    infra/dagster/values.yaml (runK8sConfig's keys in snake case, what they hold as written)."""
    instance = yaml.safe_load((DAGSTER_DIR / "dagster.yaml").read_text())["run_launcher"]["config"]
    helm = yaml.safe_load((DAGSTER_DIR / "values.yaml").read_text())["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s_config = {"pod_template_spec_metadata": helm["runK8sConfig"]["podTemplateSpecMetadata"],
                      "pod_spec_config": helm["runK8sConfig"]["podSpecConfig"],
                      "container_config": helm["runK8sConfig"]["containerConfig"]}
    return {
        "dagster.yaml": instance,
        "values.yaml": {"service_account_name": "ops-platform", "job_namespace": helm["jobNamespace"],
                        "run_k8s_config": run_k8s_config},
    }


@pytest.fixture
def run_launcher(tmp_path):
    """Make K8sRunLauncher(config, kubeconfig): the daemon's launcher, talking to the cluster of ``kubeconfig``.

    Its constructor loads the kubeconfig into the client library's default configuration: restored after.
    """
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher
    from kubernetes.client import Configuration

    saved = Configuration.get_default_copy()

    def make(config: dict, kubeconfig: Path) -> K8sRunLauncher:
        processed = process_config(K8sRunLauncher.config_type(), {
            **config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig),
            # The Helm chart adds these; infra/dagster/dagster.yaml lacks them.
            "instance_config_map": "dagster-instance", "job_image": RUN_IMAGE})
        assert processed.success, processed.errors
        return K8sRunLauncher.from_config_value(None, processed.value)

    yield make
    Configuration.set_default(saved)


def run_pod_service_account(launcher, job_name: str, tags: dict[str, str]) -> str:
    """The ServiceAccount of the run pod the launcher would make for a run of ``job_name`` with ``tags``."""
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s.job import construct_dagster_k8s_job

    context = launcher.get_container_context_for_run(DagsterRun(job_name=job_name, run_id=uuid.uuid4().hex, tags=tags))
    job = construct_dagster_k8s_job(context.get_k8s_job_config(RUN_IMAGE, launcher), args=[], job_name="run",
                                    pod_name="run", component="run_worker",
                                    user_defined_k8s_config=context.run_k8s_config)
    return job.spec.template.spec.service_account_name


def test_layer_runs_run_as_the_infra_identity_and_no_other_run_does(repository, run_launcher, tmp_path):
    """Per job, and per asset as the UI launches it: its Materialize button launches the first job (by
    name) that every selected asset is in (dagster-webserver's getCommonJob), with that job's tags."""
    from dagster._core.remote_representation.external_data import asset_node_snaps_from_repo

    infra_keys = {layer_key(layer.name) for layer in SPEC.layers}
    jobs = {job.name: job for job in repository.get_all_jobs()}
    infra_job = repository.get_job(infra_assets.INFRA_JOB)
    assert infra_job.asset_layer.executable_asset_keys == infra_keys
    # The launcher only builds the run pods here: a kubeconfig of a cluster it never calls.
    kubeconfig, _ = kubeconfig_of_a_server_down(tmp_path / "kubeconfig")
    for source, config in launcher_configs().items():
        launcher = run_launcher(config, kubeconfig)
        for name, job in jobs.items():
            layers = job.asset_layer.executable_asset_keys & infra_keys
            if name == "__ASSET_JOB":  # every asset: the UI launches it for no layer (below)
                continue
            # A job (a schedule's or sensor's too) that runs a layer runs layers only, as the infra identity.
            assert layers in (set(), job.asset_layer.executable_asset_keys), name
            expected = INFRA if layers else "ops-platform"
            assert run_pod_service_account(launcher, name, job.tags) == expected, (source, name)
        for snap in asset_node_snaps_from_repo(repository):
            launched = snap.job_names[0]
            expected = INFRA if snap.asset_key in infra_keys else "ops-platform"
            assert run_pod_service_account(launcher, launched, repository.get_job(launched).tags) == expected, (
                source, snap.asset_key, launched)
    # The layers together, as "materialize all" of the infra group launches them: every layer in the job.
    assert all(infra_assets.INFRA_JOB in snap.job_names for snap in asset_node_snaps_from_repo(repository)
               if snap.asset_key in infra_keys)


def test_the_run_pod_of_a_layer_run_runs_as_the_infra_service_account(repository, run_launcher, kube_cluster,
                                                                      tmp_path):
    """K8sRunLauncher.launch_run on the real server: the Job controller makes the run pods, whose
    ServiceAccount the admission plugin checks exists in namespace dagster."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.launcher import LaunchRunContext

    launcher = run_launcher(launcher_configs()["dagster.yaml"],
                            kube_cluster.write_kubeconfig(tmp_path / "daemon-kubeconfig", "admin"))
    recon = ReconstructableRepository.for_module("ops_platform.definitions", "defs")
    home = tmp_path / "dagster-home"
    home.mkdir()
    launched: dict[str, str] = {}
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        launcher.register_instance(instance)
        for job_name in (infra_assets.INFRA_JOB, "backup_postgres_main"):
            job = repository.get_job(job_name)
            origin = recon.get_reconstructable_job(job_name).get_python_origin()
            run = instance.create_run_for_job(job, tags=job.tags, job_code_origin=origin)
            launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
            launched[job_name] = run.run_id
    try:
        def pod_of(run_id: str) -> dict | None:
            pods = kube_cluster.list_objects("v1", "Pod", "dagster", f"dagster/run-id={run_id}")
            return pods[0] if pods else None

        infra_pod = kube_cluster.wait_for("the layer run's pod", lambda: pod_of(launched[infra_assets.INFRA_JOB]))
        backup_pod = kube_cluster.wait_for("the backup run's pod", lambda: pod_of(launched["backup_postgres_main"]))
        assert infra_pod["spec"]["serviceAccountName"] == INFRA
        assert backup_pod["spec"]["serviceAccountName"] == "ops-platform"
    finally:
        batch = client.BatchV1Api(kube_cluster.admin_client())
        for run_id in launched.values():
            batch.delete_namespaced_job(f"dagster-run-{run_id}", "dagster", propagation_policy="Background")
