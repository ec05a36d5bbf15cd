"""The Kubernetes client wrapper against the real API server (tests/fixtures/kube_server.py).

The client runs as the code location's ServiceAccount ``ops-platform`` on
the kinds its ClusterRole grants; tests of the client itself on kinds that
identity may not touch (a CRD of the test's own) run as admin and say so.
Set-up (objects of other teams, statuses a controller writes, another field
manager's update) is done as admin. Only the injected 500 stays on the fake
server, which is the one that can fail a request on demand.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes import config as k8s_config

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError
from ops_platform.local_servers import free_port
from ops_platform.resources.kubernetes import (
    FieldConflict,
    FieldOwner,
    KindNotServed,
    KubernetesClient,
    KubernetesError,
    KubernetesResource,
    NamespaceNotFound,
    WaitTimeout,
    condition_true,
    deleted,
    field_managers,
)
from tests.fixtures.kube_server import ISSUER

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [{"name": "v1", "served": True, "storage": True,
                      "schema": {"openAPIV3Schema": {"type": "object",
                                                     "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}


def configmap(namespace: str, name: str = "ops-settings", mode: str = "strict", tier: str = "ops") -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": {"tier": tier}}, "data": {"mode": mode}}


def deployment(namespace: str, replicas: int = 2) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "onto-backend", "namespace": namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "backend"}},
                     "template": {"metadata": {"labels": {"app": "backend"}},
                                  "spec": {"containers": [{"name": "app", "image": "registry.test/backend:1"}]}}}}


def certificate(namespace: str) -> dict:
    return {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "onto-tls", "namespace": namespace},
            "spec": {"secretName": "onto-tls", "dnsNames": ["onto.company.com"],
                     "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}}


@pytest.fixture
def kubeconfig(kube_cluster, tmp_path) -> Path:
    """The code location's kubeconfig: the ServiceAccount ops-platform, context ``kind-test``."""
    return kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform")


@pytest.fixture
def kube(kubeconfig) -> KubernetesClient:
    return KubernetesResource(kubeconfig=str(kubeconfig), request_timeout=5).get_client()


@pytest.fixture
def admin_kube(kube_cluster):
    """The client as admin: for tests of the client itself on kinds ops-platform may not touch."""
    api_client = kube_cluster.client_for("admin")
    yield KubernetesClient(api_client, request_timeout=5)
    api_client.close()


def test_apply_creates_then_reports_unchanged_then_changed(kube, kube_cluster, kube_namespace):
    first = kube.apply(configmap(kube_namespace))
    assert first.action == "created" and first.before is None
    stored = kube_cluster.get_object("v1", "ConfigMap", "ops-settings", kube_namespace)
    assert stored["data"] == {"mode": "strict"}
    again = kube.apply(configmap(kube_namespace))
    assert again.action == "unchanged"
    assert again.object["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
    changed = kube.apply(configmap(kube_namespace, mode="relaxed"))
    assert changed.action == "changed" and changed.before["data"] == {"mode": "strict"}
    managed = kube_cluster.get_object("v1", "ConfigMap", "ops-settings", kube_namespace)["metadata"]["managedFields"]
    assert [(entry["manager"], entry["operation"]) for entry in managed] == [("ops-platform", "Apply")]

    def applies() -> list[dict]:
        return [event for event in kube_cluster.audit_events(kube_cluster.identity("ops-platform").username)
                if event["verb"] == "patch" and event["objectRef"].get("namespace") == kube_namespace]

    kube_cluster.wait_for("three applies in the audit log", lambda: len(applies()) == 3)
    assert all("fieldManager=ops-platform" in event["requestURI"] for event in applies())


def test_dry_run_apply_changes_nothing(kube, kube_cluster, kube_namespace):
    result = kube.apply(configmap(kube_namespace), dry_run=True)
    assert result.action == "created" and result.dry_run
    assert kube_cluster.get_object("v1", "ConfigMap", "ops-settings", kube_namespace) is None
    kube.apply(configmap(kube_namespace))
    result = kube.apply(configmap(kube_namespace, mode="relaxed"), dry_run=True)
    assert result.action == "changed" and result.object["data"] == {"mode": "relaxed"}
    assert kube_cluster.get_object("v1", "ConfigMap", "ops-settings", kube_namespace)["data"] == {"mode": "strict"}


def test_get_and_list_with_label_and_field_selectors(kube, kube_namespace):
    kube.apply(configmap(kube_namespace))
    kube.apply(configmap(kube_namespace, name="other", tier="web"))
    names = [item["metadata"]["name"]
             for item in kube.list("v1", "ConfigMap", kube_namespace, label_selector="tier=ops")]
    assert names == ["ops-settings"]
    assert len(kube.list("v1", "ConfigMap", kube_namespace, label_selector="tier in (ops,web)")) == 2
    assert [item["metadata"]["name"] for item in kube.list(
        "v1", "ConfigMap", kube_namespace, field_selector="metadata.name=other")] == ["other"]
    assert kube.get("v1", "ConfigMap", "missing", kube_namespace) is None


def test_status_patch_of_a_custom_resource(kube, kube_cluster, kube_crds, kube_namespace):
    """A Certificate that cert-manager's chart made; ops-platform may patch its status (certificates/status)."""
    kube_cluster.put_object(certificate(kube_namespace))
    conditions = [{"type": "Issuing", "status": "True", "reason": "ManuallyTriggered", "message": "renew"}]
    patched = kube.patch_status("cert-manager.io/v1", "Certificate", "onto-tls", kube_namespace,
                                {"conditions": conditions})
    assert patched["status"]["conditions"] == conditions
    stored = kube_cluster.get_object("cert-manager.io/v1", "Certificate", "onto-tls", kube_namespace)
    assert stored["status"]["conditions"] == conditions
    assert stored["spec"]["secretName"] == "onto-tls"


def test_status_patch_of_an_object_deleted_meanwhile_is_a_readable_error(kube, kube_crds, kube_namespace):
    """A 404 on the status subresource names the object (a renewal reports it failed, it does not crash)."""
    with pytest.raises(KubernetesError, match=r"patch status of Certificate .*/gone .*: it does not exist") as error:
        kube.patch_status("cert-manager.io/v1", "Certificate", "gone", kube_namespace, {"conditions": []})
    assert isinstance(error.value, OpsPlatformError)


def test_a_kind_is_served_once_its_crd_is_installed_and_not_after_it_is_removed(admin_kube, kube_cluster,
                                                                              kube_namespace, tmp_path):
    """As admin: Widget is a kind of this test alone, which no identity of rbac.yaml may read."""
    with pytest.raises(KindNotServed, match=r"does not serve kind Widget in example.com/v1 .*CustomResourceDefinition"):
        admin_kube.get("example.com/v1", "Widget", "gear", kube_namespace)
    (tmp_path / "widget.yaml").write_text(yaml.safe_dump(WIDGET_CRD))
    kube_cluster.install_crds(tmp_path / "widget.yaml")
    try:
        widget = {"apiVersion": "example.com/v1", "kind": "Widget",
                  "metadata": {"name": "gear", "namespace": kube_namespace}, "spec": {"teeth": 12}}
        assert admin_kube.apply(widget).action == "created"
        assert [w["spec"] for w in admin_kube.list("example.com/v1", "Widget", kube_namespace)] == [{"teeth": 12}]
    finally:
        kube_cluster.delete_object("apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.example.com")
    kube_cluster.wait_for("the Widget CRD gone", lambda: kube_cluster.get_object(
        "apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.example.com") is None)
    with pytest.raises(KindNotServed, match=r"listing Widget .* answered 404: the cluster no longer serves the kind"):
        admin_kube.list("example.com/v1", "Widget", kube_namespace)
    with pytest.raises(KindNotServed, match=r"get Widget .*/gear .* answered 404: the cluster no longer serves"):
        admin_kube.get("example.com/v1", "Widget", "gear", kube_namespace)


def test_delete_and_dry_run_delete(kube, kube_cluster, kube_namespace):
    """A pod another controller made: ops-platform may delete pods (a playbook restarts one)."""
    kube_cluster.wait_for("the namespace's default ServiceAccount", lambda: kube_cluster.get_object(
        "v1", "ServiceAccount", "default", kube_namespace))
    kube_cluster.put_object({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": "web-0", "namespace": kube_namespace},
                             "spec": {"automountServiceAccountToken": False,
                                      "containers": [{"name": "app", "image": "registry.test/web:1"}]}})
    assert kube.delete("v1", "Pod", "web-0", kube_namespace, dry_run=True) is True
    assert kube.get("v1", "Pod", "web-0", kube_namespace) is not None
    assert kube.delete("v1", "Pod", "web-0", kube_namespace) is True
    assert kube.wait_for("v1", "Pod", "web-0", kube_namespace, deleted(), timeout=10) is None
    assert kube.delete("v1", "Pod", "web-0", kube_namespace) is False


def test_wait_for_sees_a_rollout_become_available(kube, kubelet, kube_namespace):
    kubelet.run(kube_namespace, {"app": "backend"}, "ready")
    kube.apply(deployment(kube_namespace))
    found = kube.wait_for("apps/v1", "Deployment", "onto-backend", kube_namespace, condition_true("Available"),
                          timeout=30)
    assert found["status"]["availableReplicas"] == 2


def test_wait_for_deletion(kube, kube_cluster, kube_namespace):
    kube.apply(configmap(kube_namespace))
    timer = threading.Timer(0.2, lambda: kube_cluster.delete_object("v1", "ConfigMap", "ops-settings", kube_namespace))
    timer.start()
    assert kube.wait_for("v1", "ConfigMap", "ops-settings", kube_namespace, deleted(), timeout=10) is None
    timer.join()


def test_wait_timeout_names_object_condition_and_last_status(kube_cluster, kube_crds, kube_namespace):
    kube_cluster.put_object(certificate(kube_namespace))
    kube_cluster.set_status("cert-manager.io/v1", "Certificate", "onto-tls", kube_namespace,
                            {"conditions": [{"type": "Ready", "status": "False", "message": "issuing"}]})
    # The clock: the deadline is set at 0, one watch window (1 s) starts at 0.5, then time is up.
    ticks = iter([0.0, 0.5, 5.0])
    api_client = kube_cluster.client_for("ops-platform")
    try:
        kube = KubernetesClient(api_client, clock=lambda: next(ticks))
        with pytest.raises(WaitTimeout) as caught:
            kube.wait_for("cert-manager.io/v1", "Certificate", "onto-tls", kube_namespace, condition_true("Ready"),
                          timeout=1)
    finally:
        api_client.close()
    message = str(caught.value)
    assert f"Certificate {kube_namespace}/onto-tls" in message
    assert "timed out after 1 s" in message and "have condition Ready=True" in message
    assert "Ready=False (issuing)" in message
    assert caught.value.last["status"]["conditions"][0]["message"] == "issuing"


def test_server_error_is_reported_with_its_message_fake_injects_500(kubeconfig_path, kube_api):
    kube = KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake").get_client()
    kube.apply(configmap("default"))
    kube_api.fail_next("PATCH", r"/configmaps/ops-settings$", 500, message="etcd leader changed")
    with pytest.raises(KubernetesError, match="apply ConfigMap default/ops-settings .*500.*etcd leader changed"):
        kube.apply(configmap("default", mode="x"))


def test_forbidden_names_rbac(kube_cluster, kube_namespace):
    """ops-platform may not write Secrets outside the Neo4j namespace: the server's 403, as the code reports it."""
    api_client = kube_cluster.client_for("ops-platform", expect_refusals=True)
    try:
        kube = KubernetesClient(api_client)
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": kube_namespace},
                  "stringData": {"password": "x"}}
        with pytest.raises(KubernetesError, match=r"apply Secret .* was refused \(403 Forbidden: .*cannot patch "
                                                  r"resource \"secrets\".*check the credentials and RBAC"):
            kube.apply(secret)
    finally:
        api_client.close()
    assert kube_cluster.get_object("v1", "Secret", "s", kube_namespace) is None


def test_an_apply_that_creates_needs_the_create_verb(kube_cluster, kube_namespace):
    """An identity of this test alone (made as admin) that may get and patch ConfigMaps but not create them:
    the server refuses the apply of a new one without a reason; the error gives it."""

    rbac = "rbac.authorization.k8s.io/v1"
    kube_cluster.put_object({"apiVersion": "v1", "kind": "ServiceAccount",
                             "metadata": {"name": "patcher", "namespace": kube_namespace}})
    kube_cluster.put_object({"apiVersion": rbac, "kind": "Role",
                             "metadata": {"name": "patcher", "namespace": kube_namespace},
                             "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"]}]})
    kube_cluster.put_object({"apiVersion": rbac, "kind": "RoleBinding",
                             "metadata": {"name": "patcher", "namespace": kube_namespace},
                             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "patcher"},
                             "subjects": [{"kind": "ServiceAccount", "name": "patcher", "namespace": kube_namespace}]})
    token = client.CoreV1Api(kube_cluster.admin_client()).create_namespaced_service_account_token(
        "patcher", kube_namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[ISSUER]))).status.token
    config = kube_cluster.kubeconfig("admin")
    config["users"][0]["user"]["token"] = token
    api_client = k8s_config.new_client_from_config_dict(config)
    try:
        with pytest.raises(KubernetesError, match=r"was refused \(403 Forbidden: .* is forbidden: \(an apply that "
                                                  r"creates the object needs the verb create besides patch\)"):
            KubernetesClient(api_client).apply(configmap(kube_namespace))
    finally:
        api_client.close()


def test_unforced_apply_over_another_managers_update_is_a_field_conflict(kube, kube_cluster, kube_namespace):
    """An autoscaler's update of spec.replicas: the server records it as an Update manager and refuses the apply."""
    kube.apply(deployment(kube_namespace))
    client.AppsV1Api(kube_cluster.admin_client()).patch_namespaced_deployment(
        "onto-backend", kube_namespace, {"spec": {"replicas": 5}}, field_manager="hpa-controller")
    before = kube_cluster.get_object("apps/v1", "Deployment", "onto-backend", kube_namespace)

    with pytest.raises(FieldConflict) as conflict:
        kube.apply(deployment(kube_namespace), force=False)
    assert conflict.value.conflicts == (FieldOwner("hpa-controller", ".spec.replicas"),)
    assert conflict.value.managers == ["hpa-controller"]
    assert (f"apply Deployment {kube_namespace}/onto-backend (apps/v1) as field manager 'ops-platform' would "
            "change field(s) another manager owns: .spec.replicas (owned by 'hpa-controller'); nothing was "
            "changed") in str(conflict.value)
    # The controller goes on writing the status (the resourceVersion moves); the spec is as it was.
    after = kube_cluster.get_object("apps/v1", "Deployment", "onto-backend", kube_namespace)
    assert after["spec"] == before["spec"] and after["spec"]["replicas"] == 5
    assert field_managers(after, ("spec", "replicas")) == ["hpa-controller"]

    forced = kube.apply(deployment(kube_namespace), force=True)
    assert forced.action == "changed" and forced.object["spec"]["replicas"] == 2
    assert field_managers(forced.object, ("spec", "replicas")) == ["ops-platform"]


def test_field_managers_are_read_from_the_server(kube, kube_cluster, kube_namespace):
    kube.apply(deployment(kube_namespace))
    client.AppsV1Api(kube_cluster.admin_client()).patch_namespaced_deployment(
        "onto-backend", kube_namespace, {"spec": {"replicas": 3}}, field_manager="hpa-controller")
    live = kube.get("apps/v1", "Deployment", "onto-backend", kube_namespace)
    assert field_managers(live, ("spec", "replicas")) == ["hpa-controller"]
    image = ("spec", "template", "spec", "containers", {"name": "app"}, "image")
    assert field_managers(live, image) == ["ops-platform"]
    assert field_managers(live, ("spec", "selector", "matchLabels", "app")) == ["ops-platform"]
    assert field_managers(live, ("spec", "paused")) == []


def test_malformed_manifest(kube):
    with pytest.raises(KubernetesError, match="needs apiVersion, kind and metadata.name"):
        kube.apply({"kind": "ConfigMap", "metadata": {}})


def test_no_kubeconfig_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(MissingSettingError, match="KUBECONFIG"):
        KubernetesResource().get_client()
    with pytest.raises(MissingSettingError, match="KUBECONFIG"):
        KubernetesResource(kubeconfig=str(tmp_path / "missing")).get_client()


def test_kubeconfig_from_the_environment(kubeconfig, kube_namespace, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube = KubernetesResource().get_client()
    assert kube.apply(configmap(kube_namespace)).action == "created"


def test_unknown_context_names_the_setting(kubeconfig):
    with pytest.raises(OpsPlatformError, match="context 'prod'.*OPS_KUBE_CONTEXT"):
        KubernetesResource(kubeconfig=str(kubeconfig), context="prod").get_client()


def kubeconfig_for(path: Path, server: str) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "down",
        "clusters": [{"name": "down", "cluster": {"server": server}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "down", "context": {"cluster": "down", "user": "down"}}],
    }))
    return path


def test_server_down_names_host_and_setting(tmp_path):
    port = free_port()
    kube = KubernetesResource(kubeconfig=str(kubeconfig_for(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")),
                              request_timeout=2).get_client()
    with pytest.raises(ServerUnreachableError) as caught:
        kube.get("v1", "ConfigMap", "x", "default")
    assert f"127.0.0.1:{port}" in str(caught.value) and "KUBECONFIG" in str(caught.value)


def test_server_that_never_answers_times_out(tmp_path):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        server = f"http://127.0.0.1:{silent.getsockname()[1]}"
        kube = KubernetesResource(kubeconfig=str(kubeconfig_for(tmp_path / "kubeconfig", server)),
                                  request_timeout=0.5).get_client()
        with pytest.raises(ServerUnreachableError, match="no answer"):
            kube.get("v1", "ConfigMap", "x", "default")


def test_wait_outlasting_the_request_timeout(kubeconfig, kube_cluster, kube_namespace):
    """Watch windows end before the 2 s request timeout; the wait goes on over several of them."""
    kube = KubernetesResource(kubeconfig=str(kubeconfig), request_timeout=2).get_client()
    kube.apply(configmap(kube_namespace))
    timer = threading.Timer(2.5, lambda: kube_cluster.delete_object("v1", "ConfigMap", "ops-settings", kube_namespace))
    timer.start()
    assert kube.wait_for("v1", "ConfigMap", "ops-settings", kube_namespace, deleted(), timeout=10) is None
    timer.join()


def test_list_in_a_missing_namespace_is_empty_as_the_server_answers(kube):
    assert kube.list("v1", "ConfigMap", "nowhere") == []


def test_apply_into_a_missing_namespace_is_a_clear_error(kube):
    with pytest.raises(NamespaceNotFound, match="apply ConfigMap nowhere/ops-settings .*404 .*namespace"):
        kube.apply(configmap("nowhere"))
