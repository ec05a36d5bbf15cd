"""The Kubernetes resource against the fake API server, through the unchanged client."""

from __future__ import annotations

import threading
import time

import pytest

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError
from ops_platform.local_servers import free_port
from ops_platform.resources.kubernetes import (
    KubernetesError,
    KubernetesResource,
    WaitTimeout,
    condition_true,
    deleted,
)

CONFIGMAP = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "ops-settings", "namespace": "default", "labels": {"tier": "ops"}},
    "data": {"mode": "strict"},
}

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "certificates.cert-manager.io"},
    "spec": {
        "group": "cert-manager.io",
        "scope": "Namespaced",
        "names": {"plural": "certificates", "singular": "certificate", "kind": "Certificate"},
        "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                      "schema": {"openAPIV3Schema": {"type": "object"}}}],
    },
}


@pytest.fixture
def kube(kubeconfig_path):
    return KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake").get_client()


def test_apply_creates_then_reports_unchanged_then_changed(kube, kube_api):
    first = kube.apply(CONFIGMAP)
    assert first.action == "created"
    assert kube_api.get_object("v1", "configmaps", "ops-settings", "default")["data"] == {"mode": "strict"}
    assert kube.apply(CONFIGMAP).action == "unchanged"
    changed = {**CONFIGMAP, "data": {"mode": "relaxed"}}
    assert kube.apply(changed).action == "changed"
    applies = [r for r in kube_api.requests if r.method == "PATCH"]
    assert applies and all(r.query.get("fieldManager") == "ops-platform" for r in applies)
    assert all(r.content_type.startswith("application/apply-patch") for r in applies)


def test_dry_run_apply_changes_nothing(kube, kube_api):
    result = kube.apply(CONFIGMAP, dry_run=True)
    assert result.action == "created" and result.dry_run
    assert kube_api.get_object("v1", "configmaps", "ops-settings", "default") is None
    kube.apply(CONFIGMAP)
    result = kube.apply({**CONFIGMAP, "data": {"mode": "relaxed"}}, dry_run=True)
    assert result.action == "changed"
    assert kube_api.get_object("v1", "configmaps", "ops-settings", "default")["data"] == {"mode": "strict"}


def test_get_and_list_with_label_selector(kube):
    kube.apply(CONFIGMAP)
    kube.apply({**CONFIGMAP, "metadata": {"name": "other", "namespace": "default", "labels": {"tier": "web"}}})
    names = [item["metadata"]["name"] for item in kube.list("v1", "ConfigMap", "default", label_selector="tier=ops")]
    assert names == ["ops-settings"]
    assert len(kube.list("v1", "ConfigMap", "default", label_selector="tier in (ops,web)")) == 2
    assert kube.get("v1", "ConfigMap", "missing", "default") is None


def test_custom_kind_after_its_crd_and_status_patch(kube, kube_api):
    with pytest.raises(KubernetesError, match="does not serve kind Certificate .*CustomResourceDefinition"):
        kube.get("cert-manager.io/v1", "Certificate", "onto-tls", "default")
    kube.apply(CRD)
    cert = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "onto-tls", "namespace": "default"},
            "spec": {"secretName": "onto-tls", "dnsNames": ["onto.company.com"]}}
    assert kube.apply(cert).action == "created"
    conditions = [{"type": "Issuing", "status": "True", "reason": "ManuallyTriggered"}]
    patched = kube.patch_status("cert-manager.io/v1", "Certificate", "onto-tls", "default", {"conditions": conditions})
    assert patched["status"]["conditions"] == conditions
    assert kube_api.requests[-1].path.endswith("/certificates/onto-tls/status")


def test_delete_and_dry_run_delete(kube, kube_api):
    kube.apply(CONFIGMAP)
    assert kube.delete("v1", "ConfigMap", "ops-settings", "default", dry_run=True) is True
    assert kube.get("v1", "ConfigMap", "ops-settings", "default") is not None
    assert kube.delete("v1", "ConfigMap", "ops-settings", "default") is True
    assert kube.get("v1", "ConfigMap", "ops-settings", "default") is None
    assert kube.delete("v1", "ConfigMap", "ops-settings", "default") is False


def test_wait_for_sees_a_condition_set_later(kube, kube_api):
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "onto-backend", "namespace": "default"},
                  "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "b"}},
                           "template": {"metadata": {"labels": {"app": "b"}},
                                        "spec": {"containers": [{"name": "b", "image": "b:1"}]}}}}
    kube.apply(deployment)

    def controller() -> None:
        time.sleep(0.3)
        kube_api.set_status("apps/v1", "deployments", "onto-backend", "default",
                            {"conditions": [{"type": "Available", "status": "True"}]})

    thread = threading.Thread(target=controller)
    thread.start()
    started = time.monotonic()
    found = kube.wait_for("apps/v1", "Deployment", "onto-backend", "default", condition_true("Available"), timeout=10)
    thread.join()
    assert found["status"]["conditions"][0]["status"] == "True"
    assert time.monotonic() - started < 5


def test_wait_for_deletion(kube, kube_api):
    kube.apply(CONFIGMAP)
    threading.Timer(0.2, lambda: kube_api.delete_object("v1", "configmaps", "ops-settings", "default")).start()
    assert kube.wait_for("v1", "ConfigMap", "ops-settings", "default", deleted(), timeout=10) is None


def test_wait_timeout_names_object_and_condition(kube, kube_api):
    kube.apply(CRD)
    kube.apply({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                "metadata": {"name": "onto-tls", "namespace": "default"}, "spec": {"secretName": "s"}})
    kube_api.set_status("cert-manager.io/v1", "certificates", "onto-tls", "default",
                        {"conditions": [{"type": "Ready", "status": "False", "message": "issuing"}]})
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        kube.wait_for("cert-manager.io/v1", "Certificate", "onto-tls", "default", condition_true("Ready"), timeout=1.5)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "Certificate default/onto-tls" in message
    assert "have condition Ready=True" in message
    assert "Ready=False (issuing)" in message
    assert 1.4 < elapsed < 5


def test_server_error_is_reported_with_its_message(kube, kube_api):
    kube.apply(CONFIGMAP)
    kube_api.fail_next("PATCH", r"/configmaps/ops-settings$", 500, message="etcd leader changed")
    with pytest.raises(KubernetesError, match="apply ConfigMap default/ops-settings .*500.*etcd leader changed"):
        kube.apply({**CONFIGMAP, "data": {"mode": "x"}})


def test_forbidden_names_rbac(kube, kube_api):
    kube_api.fail_next("GET", r"/configmaps", 403, message="configmaps is forbidden")
    with pytest.raises(KubernetesError, match="refused \\(403.*RBAC"):
        kube.list("v1", "ConfigMap", "default")


def test_malformed_manifest(kube):
    with pytest.raises(KubernetesError, match="needs apiVersion, kind and metadata.name"):
        kube.apply({"kind": "ConfigMap", "metadata": {}})


def test_no_kubeconfig_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(MissingSettingError, match="KUBECONFIG"):
        KubernetesResource().get_client()
    with pytest.raises(MissingSettingError, match="KUBECONFIG"):
        KubernetesResource(kubeconfig=str(tmp_path / "missing")).get_client()


def test_unknown_context_names_the_setting(kubeconfig_path):
    with pytest.raises(OpsPlatformError, match="context 'prod'.*OPS_KUBE_CONTEXT"):
        KubernetesResource(kubeconfig=str(kubeconfig_path), context="prod").get_client()


def test_server_down_names_host_and_setting(tmp_path, kube_api):
    config = kube_api.kubeconfig("t", "down")
    port = free_port()
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    import json

    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    client = KubernetesResource(kubeconfig=str(path), context="down").get_client()
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError) as caught:
        client.get("v1", "ConfigMap", "x", "default")
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "KUBECONFIG" in str(caught.value)
    assert time.monotonic() - started < 10


def test_server_that_never_answers_times_out(tmp_path, kube_api):
    import json
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = kube_api.kubeconfig("t", "silent")
        config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{silent.getsockname()[1]}"
        path = tmp_path / "kubeconfig"
        path.write_text(json.dumps(config))
        client = KubernetesResource(kubeconfig=str(path), context="silent", request_timeout=1).get_client()
        started = time.monotonic()
        with pytest.raises(ServerUnreachableError, match="no answer"):
            client.get("v1", "ConfigMap", "x", "default")
        # 1 s per attempt; urllib3 tries a GET four times.
        assert time.monotonic() - started < 8


def test_wait_outlasting_the_request_timeout(kubeconfig_path, kube_api):
    kube = KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake", request_timeout=2).get_client()
    kube.apply(CONFIGMAP)
    threading.Timer(3.5, lambda: kube_api.delete_object("v1", "configmaps", "ops-settings", "default")).start()
    assert kube.wait_for("v1", "ConfigMap", "ops-settings", "default", deleted(), timeout=10) is None


def test_list_in_a_missing_namespace_is_a_clear_error(kube, kube_api):
    kube_api.fail_next("GET", r"/namespaces/nowhere/configmaps", 404, message='namespaces "nowhere" not found')
    with pytest.raises(KubernetesError, match="listing ConfigMap .* in namespace nowhere .*404"):
        kube.list("v1", "ConfigMap", "nowhere")


def test_apply_into_a_missing_namespace_is_a_clear_error(kube):
    manifest = {**CONFIGMAP, "metadata": {**CONFIGMAP["metadata"], "namespace": "nowhere"}}
    with pytest.raises(KubernetesError, match="apply ConfigMap nowhere/ops-settings .*404 .*namespace"):
        kube.apply(manifest)
