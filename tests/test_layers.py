"""Applying layers, plans, readiness, drift and the layer checks, against the fake API server over HTTP,
and the `infra/<layer>` assets whose own run yields drift and the requirement checks."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator

import dagster as dg
import pytest
import yaml

from ops_platform import layer_checks
from ops_platform.assets import infra as infra_assets
from ops_platform.assets.keys import layer_key
from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers import free_port
from ops_platform.layers import LayerError, apply_layer, detect_drift
from ops_platform.manifests import REPO_ROOT, load_layer_manifests
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesError, KubernetesResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}
WIDGET = {"apiVersion": "example.com/v1", "kind": "Widget",
          "metadata": {"name": "gear", "namespace": "shop"}, "spec": {"teeth": 12}}
NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "settings", "namespace": "shop"}, "data": {"mode": "strict"}}
DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "nginx:1.27"},
                                    {"name": "sidecar", "image": "envoy:1.30"}]},
        },
    },
}
LAYER = [CRD, NAMESPACE, CONFIGMAP, DEPLOYMENT, WIDGET]


@pytest.fixture
def kube(kubeconfig_path) -> KubernetesClient:
    return KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake").get_client()


def with_data(mode: str) -> dict:
    changed = copy.deepcopy(CONFIGMAP)
    changed["data"]["mode"] = mode
    return changed


def make_available(kube_api, name: str = "web", namespace: str = "shop") -> None:
    deployment = kube_api.get_object("apps/v1", "deployments", name, namespace)
    replicas = deployment["spec"]["replicas"]
    kube_api.set_status("apps/v1", "deployments", name, namespace, {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": replicas, "availableReplicas": replicas, "readyReplicas": replicas,
        "conditions": [{"type": "Available", "status": "True"}],
    })


@pytest.fixture
def deployment_controller(kube_api) -> Iterator[None]:
    """Makes shop/web available 0.3 s after it appears, as the Deployment controller would."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            if kube_api.get_object("apps/v1", "deployments", "web", "shop") is not None:
                stop.wait(0.3)
                make_available(kube_api)
                return
            stop.wait(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=2)


def by_ref(result) -> dict:
    return {outcome.ref: outcome for outcome in result.objects}


def test_apply_creates_then_is_unchanged_then_changed(kube, kube_api, deployment_controller):
    started = time.monotonic()
    first = apply_layer(kube, LAYER, plan=False, wait_timeout=10)
    assert time.monotonic() - started < 5
    assert [o.action for o in first.objects] == ["created"] * 5
    assert all(o.ready for o in first.objects), first.not_ready
    assert first.totals() == {"created": 5, "changed": 0, "unchanged": 0, "not_ready": 0}
    assert kube_api.get_object("example.com/v1", "widgets", "gear", "shop")["spec"] == {"teeth": 12}
    stored = kube_api.get_object("v1", "configmaps", "settings", "shop")
    managers = {entry["manager"] for entry in stored["metadata"]["managedFields"]}
    assert managers == {"ops-platform"}

    again = apply_layer(kube, LAYER, plan=False, wait_timeout=2)
    assert again.totals() == {"created": 0, "changed": 0, "unchanged": 5, "not_ready": 0}

    changed = apply_layer(kube, [CRD, NAMESPACE, with_data("relaxed"), DEPLOYMENT, WIDGET], plan=False, wait_timeout=2)
    assert by_ref(changed)["ConfigMap shop/settings"].action == "changed"
    assert changed.totals()["unchanged"] == 4
    assert kube_api.get_object("v1", "configmaps", "settings", "shop")["data"] == {"mode": "relaxed"}


def test_plan_stores_nothing_and_shows_the_diff(kube, kube_api, deployment_controller):
    fresh = apply_layer(kube, LAYER, plan=True, wait_timeout=5)
    assert [o.action for o in fresh.objects] == ["would create"] * 5
    assert all(o.ready is None for o in fresh.objects)
    assert "widgets.example.com is created by this layer" in by_ref(fresh)["Widget shop/gear"].reason
    assert kube_api.get_object("v1", "namespaces", "shop") is None
    assert kube_api.get_object("apiextensions.k8s.io/v1", "customresourcedefinitions", "widgets.example.com") is None

    apply_layer(kube, LAYER, plan=False, wait_timeout=5)
    version = kube_api.get_object("v1", "configmaps", "settings", "shop")["metadata"]["resourceVersion"]
    planned = apply_layer(kube, [CRD, NAMESPACE, with_data("relaxed"), DEPLOYMENT, WIDGET], plan=True, wait_timeout=5)
    outcome = by_ref(planned)["ConfigMap shop/settings"]
    assert outcome.action == "would change"
    assert "-  mode: strict" in outcome.diff and "+  mode: relaxed" in outcome.diff
    assert "managedFields" not in outcome.diff and "resourceVersion" not in outcome.diff
    assert planned.totals() == {"created": 0, "changed": 1, "unchanged": 4, "not_ready": 0}
    stored = kube_api.get_object("v1", "configmaps", "settings", "shop")
    assert stored["data"] == {"mode": "strict"} and stored["metadata"]["resourceVersion"] == version


def test_plan_diff_is_bounded(kube, kube_api):
    kube.apply(NAMESPACE)
    kube.apply({**CONFIGMAP, "data": {f"key{i}": "a" for i in range(200)}})
    planned = apply_layer(kube, [{**CONFIGMAP, "data": {f"key{i}": "b" for i in range(200)}}],
                          plan=True, wait_timeout=1)
    diff = planned.objects[0].diff
    assert diff.count("\n") <= 81 and "more lines)" in diff.splitlines()[-1]


def test_deployment_never_available_is_not_ready_with_the_reason(kube, kube_api):
    started = time.monotonic()
    result = apply_layer(kube, [NAMESPACE, DEPLOYMENT, CONFIGMAP], plan=False, wait_timeout=1.0)
    assert time.monotonic() - started < 4
    web = by_ref(result)["Deployment shop/web"]
    assert web.ready is False and web.action == "created"
    assert web.reason == "not available within the layer's 1 s wait: 0/2 replicas available; no status reported yet"
    assert by_ref(result)["ConfigMap shop/settings"].ready is True
    assert kube_api.get_object("v1", "configmaps", "settings", "shop") is not None
    assert [o.ref for o in result.not_ready] == ["Deployment shop/web"]
    assert result.totals()["not_ready"] == 1


def test_stale_status_of_an_older_generation_is_not_ready(kube, kube_api):
    apply_layer(kube, [NAMESPACE, DEPLOYMENT], plan=False, wait_timeout=0)
    make_available(kube_api)
    bumped = copy.deepcopy(DEPLOYMENT)
    bumped["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:1.28"
    result = apply_layer(kube, [bumped], plan=False, wait_timeout=0.5)
    assert result.objects[0].action == "changed" and result.objects[0].ready is False
    assert "generation 2 not yet observed" in result.objects[0].reason


def test_custom_resource_not_ready_until_its_ready_condition_is_true(kube, kube_api):
    apply_layer(kube, [CRD, NAMESPACE, WIDGET], plan=False, wait_timeout=1)
    kube_api.set_status("example.com/v1", "widgets", "gear", "shop",
                        {"conditions": [{"type": "Ready", "status": "False", "message": "gear slipping"}]})
    result = apply_layer(kube, [WIDGET], plan=False, wait_timeout=0.3)
    assert result.objects[0].ready is False and "Ready=False (gear slipping)" in result.objects[0].reason

    def become_ready() -> None:
        time.sleep(0.3)
        kube_api.set_status("example.com/v1", "widgets", "gear", "shop",
                            {"conditions": [{"type": "Ready", "status": "True"}]})

    threading.Thread(target=become_ready, daemon=True).start()
    assert apply_layer(kube, [WIDGET], plan=False, wait_timeout=5).objects[0].ready is True


def test_ops_platform_takes_ownership_and_unforced_apply_reports_the_conflict(kube, kube_api, kube_api_client):
    other = KubernetesClient(kube_api_client, field_manager="helm")
    apply_layer(kube, [NAMESPACE, CONFIGMAP], plan=False, wait_timeout=1)
    other.apply(with_data("loose"))
    assert kube_api.get_object("v1", "configmaps", "settings", "shop")["data"] == {"mode": "loose"}

    result = apply_layer(kube, [NAMESPACE, CONFIGMAP], plan=False, wait_timeout=1)
    assert by_ref(result)["ConfigMap shop/settings"].action == "changed"
    stored = kube_api.get_object("v1", "configmaps", "settings", "shop")
    assert stored["data"] == {"mode": "strict"}
    owners = {e["manager"] for e in stored["metadata"]["managedFields"] if "f:mode" in str(e.get("fieldsV1"))}
    assert owners == {"ops-platform"}

    other.apply(with_data("loose"))
    conflict = r"(?s)apply ConfigMap shop/settings .*another manager owns: .data.mode \(owned by 'helm'\); nothing was changed"
    with pytest.raises(KubernetesError, match=conflict):
        kube.apply(CONFIGMAP, force=False)


def test_missing_crd_is_a_clear_error_and_nothing_is_applied(kube, kube_api):
    for plan in (True, False):
        with pytest.raises(LayerError, match=r"kind Widget \(example.com/v1\) is not served: install the "
                                             r"CustomResourceDefinition of Widget in group example.com "
                                             r"\(needed by Widget shop/gear\)"):
            apply_layer(kube, [NAMESPACE, CONFIGMAP, WIDGET], plan=plan, wait_timeout=1)
    assert kube_api.get_object("v1", "namespaces", "shop") is None


def test_api_server_failure_mid_layer_names_the_object(kube, kube_api):
    kube_api.fail_next("PATCH", r"/configmaps/settings", 500, message="etcdserver: request timed out")
    with pytest.raises(KubernetesError, match=r"apply ConfigMap shop/settings .*500.*etcdserver: request timed out"):
        apply_layer(kube, [NAMESPACE, CONFIGMAP, DEPLOYMENT], plan=False, wait_timeout=1)
    assert kube_api.get_object("apps/v1", "deployments", "web", "shop") is None


def test_api_server_down_names_host_and_setting(tmp_path):
    port = free_port()
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "down",
        "clusters": [{"name": "down", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "down", "context": {"cluster": "down", "user": "down"}}],
    }))
    kube = KubernetesResource(kubeconfig=str(config), request_timeout=2).get_client()
    with pytest.raises(ServerUnreachableError, match=rf"127.0.0.1:{port}.*KUBECONFIG"):
        apply_layer(kube, [NAMESPACE], plan=True, wait_timeout=1)
    with pytest.raises(ServerUnreachableError):
        detect_drift(kube, [NAMESPACE])


def test_drift_in_sync_then_drifted_then_missing(kube, kube_api):
    apply_layer(kube, [NAMESPACE, CONFIGMAP, DEPLOYMENT], plan=False, wait_timeout=0)
    report = detect_drift(kube, [NAMESPACE, CONFIGMAP, DEPLOYMENT])
    assert report.in_sync and report.counts() == {"in_sync": 3, "drifted": 0, "missing": 0}

    live = kube_api.get_object("apps/v1", "deployments", "web", "shop")
    live["spec"]["replicas"] = 5
    # Reordered containers and an injected one are not drift; a changed image is.
    live["spec"]["template"]["spec"]["containers"] = [
        {"name": "istio-proxy", "image": "istio/proxyv2"},
        {"name": "sidecar", "image": "envoy:1.30"},
        {"name": "app", "image": "nginx:1.26"},
    ]
    kube_api.put_object(live)
    kube_api.delete_object("v1", "configmaps", "settings", "shop")

    rows = {row.ref: row for row in detect_drift(kube, [NAMESPACE, CONFIGMAP, DEPLOYMENT, WIDGET]).rows}
    assert rows["Namespace shop"].state == "in_sync"
    assert rows["ConfigMap shop/settings"].state == "missing"
    assert rows["Deployment shop/web"].state == "drifted"
    assert rows["Deployment shop/web"].differences == [
        "spec.replicas: manifest 2, live 5",
        "spec.template.spec.containers[name=app].image: manifest nginx:1.27, live nginx:1.26",
    ]
    assert rows["Widget shop/gear"].state == "missing"
    assert "not served" in rows["Widget shop/gear"].differences[0]


def test_drift_compares_positional_lists_whole(kube, kube_api):
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "default-deny", "namespace": "shop"},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    apply_layer(kube, [NAMESPACE, policy], plan=False, wait_timeout=0)
    live = kube_api.get_object("networking.k8s.io/v1", "networkpolicies", "default-deny", "shop")
    live["spec"]["policyTypes"] = ["Ingress"]
    kube_api.put_object(live)
    [row] = detect_drift(kube, [policy]).rows
    assert row.differences == ['spec.policyTypes: manifest ["Ingress","Egress"], live ["Ingress"]']


def test_real_storage_layer_plan_then_apply(kube, kube_api):
    objects = load_layer_manifests("infra/layers/storage")
    planned = apply_layer(kube, objects, plan=True, wait_timeout=1)
    assert planned.totals() == {"created": 4, "changed": 0, "unchanged": 0, "not_ready": 0}
    assert kube_api.get_object("storage.k8s.io/v1", "storageclasses", "fast-ssd") is None
    assert failed_check(layer_checks.storage_classes_present, kube)

    applied = apply_layer(kube, objects, plan=False, wait_timeout=1)
    assert applied.totals() == {"created": 4, "changed": 0, "unchanged": 0, "not_ready": 0}
    assert kube_api.get_object("storage.k8s.io/v1", "storageclasses", "fast-ssd")["parameters"]["type"] == "io2"
    assert layer_checks.storage_classes_present(kube).passed
    assert detect_drift(kube, objects).in_sync
    assert apply_layer(kube, objects, plan=True, wait_timeout=1).totals()["unchanged"] == 4


def test_real_cluster_and_security_layers(kube, kube_api):
    # The fake does not serve PriorityClass: of the cluster layer, the namespaces only.
    apply_layer(kube, load_layer_manifests("infra/layers/cluster/namespaces.yaml"), plan=False, wait_timeout=1)
    security = load_layer_manifests("infra/layers/security")
    with pytest.raises(LayerError, match="ExternalSecret in group external-secrets.io"):
        apply_layer(kube, security, plan=True, wait_timeout=1)

    crds = load_layer_manifests(REPO_ROOT / "infra" / "crds" / "external-secrets.io")
    result = apply_layer(kube, crds + security, plan=False, wait_timeout=0.5)
    assert result.created == len(crds) + len(security)
    # No External Secrets controller in the fake: the stores and secrets never report Ready.
    assert {o.ref.split()[0] for o in result.not_ready} == {"ExternalSecret", "ClusterSecretStore"}
    assert all("no status reported" in o.reason for o in result.not_ready)
    assert layer_checks.default_deny_in_app_namespaces(kube).passed


def failed_check(check, kube) -> bool:
    return not check(kube).passed


def node(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def test_control_plane_check(kube, kube_api):
    assert failed_check(layer_checks.control_plane_nodes, kube)
    for index, zone in enumerate(["a", "a", "a"]):
        kube_api.put_object(node(f"cp{index}", **{"node-role.kubernetes.io/control-plane": "",
                                                  "topology.kubernetes.io/zone": f"ap-northeast-2{zone}"}))
    outcome = layer_checks.control_plane_nodes(kube)
    assert not outcome.passed and "3 control-plane nodes in 1 zones" in outcome.description
    kube_api.put_object(node("cp2", **{"node-role.kubernetes.io/control-plane": "",
                                       "topology.kubernetes.io/zone": "ap-northeast-2c"}))
    assert layer_checks.control_plane_nodes(kube).passed


def test_control_plane_check_on_eks(kube, kube_api):
    kube_api.put_object(node("ip-10-0-1-1", **{"eks.amazonaws.com/nodegroup": "app"}))
    outcome = layer_checks.control_plane_nodes(kube)
    assert outcome.passed and outcome.description.startswith("managed control plane (EKS)")


def test_node_group_sizes_check(kube, kube_api):
    sizes = {"app": 3, "data": 3, "platform": 1}
    for group, count in sizes.items():
        for index in range(count):
            kube_api.put_object(node(f"{group}-{index}", **{"eks.amazonaws.com/nodegroup": group}))
    outcome = layer_checks.node_group_sizes(kube)
    assert not outcome.passed and outcome.description.endswith("platform has 1 (range 2-4)")
    kube_api.put_object(node("platform-1", **{"ops-platform/node-group": "platform"}))
    assert layer_checks.node_group_sizes(kube).passed


def apply_crds(kube, *paths: str) -> None:
    crds = [crd for path in paths for crd in load_layer_manifests(REPO_ROOT / "infra" / "crds" / path)]
    apply_layer(kube, crds, plan=False, wait_timeout=2)


def test_mtls_check(kube, kube_api):
    outcome = layer_checks.mtls_strict(kube)
    assert not outcome.passed and "CRD peerauthentications.security.istio.io not installed" in outcome.description
    apply_crds(kube, "security.istio.io/peerauthentication.yaml")
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}})
    assert "no PeerAuthentication 'default'" in layer_checks.mtls_strict(kube).description
    policy = load_layer_manifests("infra/layers/service_mesh/peer-authentication.yaml")[0]
    kube.apply({**policy, "spec": {"mtls": {"mode": "PERMISSIVE"}}})
    assert layer_checks.mtls_strict(kube).description == "mesh-wide mTLS mode PERMISSIVE"
    kube.apply(policy)
    assert layer_checks.mtls_strict(kube).passed


def app_namespace(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"ops-platform/app-namespace": "true"}}}


def test_default_deny_check(kube, kube_api):
    assert "no namespace labelled" in layer_checks.default_deny_in_app_namespaces(kube).description
    kube.apply(app_namespace("shop"))
    allow = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow-dns", "namespace": "shop"},
             "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 53}]}]}}
    kube.apply(allow)
    outcome = layer_checks.default_deny_in_app_namespaces(kube)
    assert not outcome.passed and outcome.description.endswith(": shop")
    kube.apply({**allow, "metadata": {"name": "default-deny", "namespace": "shop"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
    assert layer_checks.default_deny_in_app_namespaces(kube).passed


def test_alertmanager_check(kube, kube_api):
    assert "alertmanagers.monitoring.coreos.com" in layer_checks.alertmanager_replicas(kube).description
    apply_crds(kube, "monitoring.coreos.com/alertmanager.yaml")
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}})
    manager = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Alertmanager",
               "metadata": {"name": "onto", "namespace": "monitoring"}, "spec": {"replicas": 1}}
    kube.apply(manager)
    outcome = layer_checks.alertmanager_replicas(kube)
    assert not outcome.passed and outcome.rows == [{"alertmanager": "monitoring/onto", "replicas": 1}]
    kube.apply({**manager, "spec": {"replicas": 2}})
    assert layer_checks.alertmanager_replicas(kube).passed


def test_gatekeeper_audit_check(kube, kube_api):
    assert "constrainttemplates.templates.gatekeeper.sh" in layer_checks.gatekeeper_audit_clean(kube).description
    apply_crds(kube, "templates.gatekeeper.sh", "constraints.gatekeeper.sh/k8srequiredlabels.yaml")
    template = {"apiVersion": "templates.gatekeeper.sh/v1", "kind": "ConstraintTemplate",
                "metadata": {"name": "k8srequiredlabels"},
                "spec": {"crd": {"spec": {"names": {"kind": "K8sRequiredLabels"}}}, "targets": []}}
    constraint = {"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": "K8sRequiredLabels",
                  "metadata": {"name": "must-have-owner"}, "spec": {}}
    kube.apply(template)
    kube.apply(constraint)
    outcome = layer_checks.gatekeeper_audit_clean(kube)
    assert not outcome.passed and "K8sRequiredLabels/must-have-owner not audited yet" in outcome.description
    kube_api.set_status("constraints.gatekeeper.sh/v1beta1", "k8srequiredlabels", "must-have-owner", None,
                        {"totalViolations": 4})
    outcome = layer_checks.gatekeeper_audit_clean(kube)
    assert not outcome.passed and outcome.description == "4 violations across 1 constraints"
    kube_api.set_status("constraints.gatekeeper.sh/v1beta1", "k8srequiredlabels", "must-have-owner", None,
                        {"totalViolations": 0})
    assert layer_checks.gatekeeper_audit_clean(kube).passed


def test_quota_and_limit_range_check(kube, kube_api):
    kube.apply(app_namespace("shop"))
    kube.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "quota", "namespace": "shop"},
                "spec": {"hard": {"pods": "20"}}})
    outcome = layer_checks.quota_and_limit_range_in_app_namespaces(kube)
    assert not outcome.passed and outcome.description == "shop lacks a LimitRange"
    kube.apply({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "limits", "namespace": "shop"},
                "spec": {"limits": [{"type": "Container", "default": {"cpu": "500m"}}]}})
    assert layer_checks.quota_and_limit_range_in_app_namespaces(kube).passed


def test_every_check_is_mapped_to_a_layer_of_the_platform():
    layers = {layer["name"] for layer in yaml.safe_load((REPO_ROOT / "infra" / "platform.yaml").read_text())["layers"]}
    assert set(layer_checks.LAYER_CHECKS) <= layers
    names = [name for checks in layer_checks.LAYER_CHECKS.values() for name, _ in checks]
    assert len(names) == len(set(names)) == 8


SPEC = load_spec(DEFAULT_SPEC_PATH)


def layer_spec(**manifests: str):
    """The platform spec with the manifests of some layers replaced (the fake does not serve every kind)."""
    layers = [layer.model_copy(update={"manifests": manifests[layer.name]}) if layer.name in manifests else layer
              for layer in SPEC.layers]
    return SPEC.model_copy(update={"layers": layers})


def materialize_layers(names, kubeconfig, *, spec=SPEC, plan=False, wait_timeout=2.0, instance=None):
    assets = [a for a in infra_assets.build_layer_assets(spec) if {layer_key(n) for n in names} & set(a.keys)]
    return dg.materialize(
        assets,
        resources={"kubernetes": KubernetesResource(kubeconfig=str(kubeconfig), context="fake", request_timeout=2)},
        run_config={"ops": {f"infra__{name}": {"config": {"plan": plan, "wait_timeout_seconds": wait_timeout}}
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


def test_layer_run_yields_drift_and_requirement_checks_in_its_one_step(kubeconfig_path, kube_api):
    spec = layer_spec(cluster="infra/layers/cluster/namespaces.yaml")
    result = materialize_layers(["cluster", "storage"], kubeconfig_path, spec=spec)

    assert result.success
    by_step = checks_by_step(result)
    assert set(by_step) == {"infra__cluster", "infra__storage"}, "one step per asset, none per check"
    assert set(by_step["infra__cluster"]) == {"drift", "control_plane_nodes", "node_group_sizes"}
    assert set(by_step["infra__storage"]) == {"drift", "storage_classes_present"}
    storage = by_step["infra__storage"]
    assert storage["drift"].passed and storage["drift"].description == "in sync"
    assert storage["drift"].severity == dg.AssetCheckSeverity.WARN
    assert storage["storage_classes_present"].passed
    # Against the live cluster: the fake has no nodes.
    control_plane = by_step["infra__cluster"]["control_plane_nodes"]
    assert not control_plane.passed and control_plane.severity == dg.AssetCheckSeverity.ERROR
    assert control_plane.description.startswith("0 control-plane nodes")
    [materialization] = result.asset_materializations_for_node("infra__storage")
    assert materialization.metadata["created"].value == 4


def test_layer_plan_checks_drift_as_the_diff_and_requirements_live(kubeconfig_path, kube_api):
    instance = dg.DagsterInstance.ephemeral()
    planned = materialize_layers(["storage"], kubeconfig_path, plan=True, instance=instance)

    assert planned.success
    assert planned.asset_materializations_for_node("infra__storage") == []
    assert kube_api.get_object("storage.k8s.io/v1", "storageclasses", "fast-ssd") is None
    checks = checks_by_step(planned)["infra__storage"]
    assert not checks["drift"].passed and checks["drift"].severity == dg.AssetCheckSeverity.WARN
    assert "StorageClass fast-ssd would create" in checks["drift"].description
    assert checks["drift"].metadata["created"].value == 4
    assert not checks["storage_classes_present"].passed
    assert checks["storage_classes_present"].description.startswith("storage classes missing: fast-ssd")

    assert materialize_layers(["storage"], kubeconfig_path, instance=instance).success
    fast = kube_api.get_object("storage.k8s.io/v1", "storageclasses", "fast-ssd")
    fast["parameters"]["type"] = "gp3"
    kube_api.put_object(fast)

    replanned = checks_by_step(materialize_layers(["storage"], kubeconfig_path, plan=True, instance=instance))
    assert not replanned["infra__storage"]["drift"].passed
    assert replanned["infra__storage"]["drift"].description == "StorageClass fast-ssd would change"
    assert "+  type: io2" in replanned["infra__storage"]["drift"].metadata["diff"].value
    assert replanned["infra__storage"]["storage_classes_present"].passed


def test_drift_after_apply_is_the_live_cluster_against_the_manifests(kubeconfig_path, kube_api, tmp_path):
    """A controller that changes what was applied before it is ready (an autoscaler) shows as drift."""
    (tmp_path / "web.yaml").write_text(yaml.safe_dump_all([NAMESPACE, DEPLOYMENT]))

    def autoscale() -> None:
        while kube_api.get_object("apps/v1", "deployments", "web", "shop") is None:
            time.sleep(0.01)
        live = kube_api.get_object("apps/v1", "deployments", "web", "shop")
        kube_api.put_object({**live, "spec": {**live["spec"], "replicas": 3}})
        make_available(kube_api)

    scaler = threading.Thread(target=autoscale, daemon=True)
    scaler.start()
    result = materialize_layers(["storage"], kubeconfig_path, spec=layer_spec(storage=str(tmp_path)),
                                wait_timeout=10)
    scaler.join(timeout=5)

    assert result.success
    drift = checks_by_step(result)["infra__storage"]["drift"]
    assert not drift.passed and drift.severity == dg.AssetCheckSeverity.WARN
    assert drift.description == "Deployment shop/web drifted: spec.replicas: manifest 2, live 3"
    assert drift.metadata["drifted"].value == 1


def test_layer_whose_objects_are_not_ready_fails_every_check_with_the_reason(kubeconfig_path, kube_api, tmp_path):
    (tmp_path / "web.yaml").write_text(yaml.safe_dump_all([NAMESPACE, DEPLOYMENT]))
    result = materialize_layers(["storage"], kubeconfig_path, spec=layer_spec(storage=str(tmp_path)),
                                wait_timeout=0.3)

    assert not result.success
    assert result.asset_materializations_for_node("infra__storage") == []
    assert layer_failure(result) == ("layer 'storage': 1 object(s) not ready: Deployment shop/web: not available "
                                     "within the layer's 0.3 s wait: 0/2 replicas available; no status reported yet")
    checks = checks_by_step(result)["infra__storage"]
    assert set(checks) == {"drift", "storage_classes_present"}
    assert all(not c.passed and c.description == f"not checked: {layer_failure(result)}" for c in checks.values())
    assert checks["drift"].severity == dg.AssetCheckSeverity.WARN


def test_layer_apply_refused_by_the_api_server_fails_every_check(kubeconfig_path, kube_api):
    kube_api.fail_next("PATCH", r"/storageclasses/fast-ssd", 500, message="etcdserver: request timed out")
    result = materialize_layers(["storage"], kubeconfig_path)

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
    port = free_port()
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "down", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "down", "user": "down"}}],
    }))
    result = materialize_layers(["storage"], config)
    assert not result.success
    description = layer_failure(result)
    assert description.startswith("layer 'storage': kubernetes") and description.count("layer 'storage'") == 1
    assert f"127.0.0.1:{port}" in description and "KUBECONFIG" in description
    assert all(not c.passed for c in checks_by_step(result)["infra__storage"].values())
