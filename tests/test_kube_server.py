"""The real API server of the tests (tests/fixtures/kube_server.py) and the identities of infra/dagster/rbac.yaml.

What the server decides is what production decides: RBAC with the code
location's ServiceAccounts, controllers that roll out, garbage-collect and
finish namespaces, and the kubelet stand-in's part (pods Ready, crashing,
Jobs succeeding or failing).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from tests.fixtures.kube_server import KubeBinariesMissing, KubeCluster, kube_bin_dir


def _deployment(name: str, namespace: str, replicas: int = 2) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": "registry.test/app:1"}]}}}}


def _job(name: str, namespace: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": namespace},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"job": name}}, "spec": {
                "restartPolicy": "Never", "containers": [{"name": "run", "image": "registry.test/tool:1"}]}}}}


def _status(cluster: KubeCluster, api_version: str, kind: str, name: str, namespace: str) -> dict:
    return (cluster.get_object(api_version, kind, name, namespace) or {}).get("status") or {}


def test_missing_binaries_fail_with_the_way_to_build_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_KUBE_BIN_DIR", str(tmp_path))
    with pytest.raises(KubeBinariesMissing, match="install-kube-apiserver.sh"):
        kube_bin_dir()


def test_rollout_completes_when_the_kubelet_stand_in_readies_the_pods(kube_cluster, kube_namespace, kubelet) -> None:
    kubelet.run(kube_namespace, {"app": "web"}, "ready")
    kube_cluster.put_object(_deployment("web", kube_namespace))
    kube_cluster.wait_for("web available", lambda: _status(
        kube_cluster, "apps/v1", "Deployment", "web", kube_namespace).get("availableReplicas") == 2)
    replica_sets = kube_cluster.list_objects("apps/v1", "ReplicaSet", kube_namespace)
    assert [rs["metadata"]["ownerReferences"][0]["name"] for rs in replica_sets] == ["web"]
    pods = kube_cluster.list_objects("v1", "Pod", kube_namespace, "app=web")
    assert {pod["spec"]["nodeName"] for pod in pods} == {"kubelet-stand-in"}


def test_crashing_pods_keep_a_rollout_unavailable(kube_cluster, kube_namespace, kubelet) -> None:
    kubelet.run(kube_namespace, {"app": "web"}, "crash")
    kube_cluster.put_object(_deployment("web", kube_namespace, replicas=1))
    kube_cluster.wait_for("a crashing pod", lambda: any(
        (pod.get("status") or {}).get("containerStatuses")
        for pod in kube_cluster.list_objects("v1", "Pod", kube_namespace, "app=web")))
    status = _status(kube_cluster, "apps/v1", "Deployment", "web", kube_namespace)
    assert not status.get("availableReplicas")
    assert status.get("unavailableReplicas") == 1


def test_jobs_complete_or_fail_as_their_pods_do(kube_cluster, kube_namespace, kubelet) -> None:
    kubelet.run(kube_namespace, {"job": "good"}, "succeed")
    kubelet.run(kube_namespace, {"job": "bad"}, "fail")
    kube_cluster.put_object(_job("good", kube_namespace))
    kube_cluster.put_object(_job("bad", kube_namespace))

    def condition(name: str) -> str | None:
        for cond in _status(kube_cluster, "batch/v1", "Job", name, kube_namespace).get("conditions") or []:
            if cond["status"] == "True":
                return cond["type"]
        return None

    assert kube_cluster.wait_for("good finished", lambda: condition("good")) == "Complete"
    assert kube_cluster.wait_for("bad finished", lambda: condition("bad")) == "Failed"


def test_garbage_collector_removes_what_a_deleted_deployment_owned(kube_cluster, kube_namespace) -> None:
    kube_cluster.put_object(_deployment("web", kube_namespace, replicas=1))
    kube_cluster.wait_for("a ReplicaSet", lambda: kube_cluster.list_objects("apps/v1", "ReplicaSet", kube_namespace))
    kube_cluster.delete_object("apps/v1", "Deployment", "web", kube_namespace)
    kube_cluster.wait_for("the ReplicaSet collected",
                          lambda: not kube_cluster.list_objects("apps/v1", "ReplicaSet", kube_namespace))


def test_a_deleted_namespace_terminates_before_it_goes(kube_cluster) -> None:
    kube_cluster.create_namespace("going")
    kube_cluster.put_object({"apiVersion": "v1", "kind": "ConfigMap",
                             "metadata": {"name": "c", "namespace": "going"}, "data": {"a": "b"}})
    kube_cluster.delete_object("v1", "Namespace", "going")
    phase = (kube_cluster.get_object("v1", "Namespace", "going") or {}).get("status", {}).get("phase")
    assert phase in ("Terminating", None)
    kube_cluster.wait_for("namespace gone", lambda: kube_cluster.get_object("v1", "Namespace", "going") is None)


# --- the identities ----------------------------------------------------------------------------


def _forbidden(call) -> int:
    with pytest.raises(client.ApiException) as refused:
        call()
    return refused.value.status


def test_code_location_identity_is_refused_what_its_role_lacks(kube_cluster, kube_namespace) -> None:
    api = kube_cluster.client_for("ops-platform", expect_refusals=True)
    try:
        core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
        assert _forbidden(lambda: core.delete_node("kubelet-stand-in")) == 403
        assert _forbidden(lambda: core.create_namespaced_secret(
            kube_namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="s")))) == 403
        assert _forbidden(lambda: rbac.create_cluster_role_binding(client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name="me-admin"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole",
                                      name="cluster-admin"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="ops-platform",
                                           namespace="dagster")]))) == 403
        # and allowed what it has
        assert client.AppsV1Api(api).list_namespaced_deployment(kube_namespace).items == []
    finally:
        api.close()


def test_infra_identity_cannot_make_itself_cluster_admin(kube_cluster) -> None:
    api = kube_cluster.client_for("ops-platform-infra", expect_refusals=True)
    try:
        rbac = client.RbacAuthorizationV1Api(api)
        wildcard = client.V1ClusterRole(metadata=client.V1ObjectMeta(name="not-shipped"), rules=[
            client.V1PolicyRule(api_groups=["*"], resources=["*"], verbs=["*"])])
        assert _forbidden(lambda: rbac.create_cluster_role(wildcard)) == 403
        assert _forbidden(lambda: rbac.create_cluster_role_binding(client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name="infra-admin"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole",
                                      name="cluster-admin"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="ops-platform-infra",
                                           namespace="dagster")]))) == 403
    finally:
        api.close()


def test_infra_identity_may_ship_the_layers_roles_it_does_not_hold(kube_cluster) -> None:
    """onto-operator grants pods/exec, which the infra identity lacks: only the resourceNames-bound escalate
    lets it create the role; the same rules under another name are refused."""
    def operator_role(name: str) -> dict:
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
                "rules": [{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}]}

    api = kube_cluster.client_for("ops-platform-infra", expect_refusals=True)
    try:
        rbac = client.RbacAuthorizationV1Api(api)
        rbac.patch_cluster_role("onto-operator", operator_role("onto-operator"), field_manager="ops-platform",
                                _content_type="application/apply-patch+yaml")
        assert kube_cluster.get_object("rbac.authorization.k8s.io/v1", "ClusterRole", "onto-operator")
        assert _forbidden(lambda: rbac.patch_cluster_role(
            "renamed-operator", operator_role("renamed-operator"), field_manager="ops-platform",
            _content_type="application/apply-patch+yaml")) == 403
    finally:
        api.close()
        kube_cluster.delete_object("rbac.authorization.k8s.io/v1", "ClusterRole", "onto-operator")


def test_audit_log_records_what_an_identity_sent(kube_cluster, kube_namespace) -> None:
    api = kube_cluster.client_for("ops-platform")
    try:
        client.CoreV1Api(api).list_namespaced_config_map(kube_namespace)
    finally:
        api.close()
    events = kube_cluster.audit_events(kube_cluster.identity("ops-platform").username)
    assert any(event["verb"] == "list" and event["objectRef"].get("resource") == "configmaps"
               and event["objectRef"].get("namespace") == kube_namespace for event in events)


def test_the_crds_of_infra_install_and_serve_their_kinds(kube_cluster, kube_crds, kube_namespace) -> None:
    assert "certificates.cert-manager.io" in kube_crds
    kube_cluster.put_object({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                             "metadata": {"name": "c", "namespace": kube_namespace},
                             "spec": {"secretName": "c-tls", "dnsNames": ["onto.test"],
                                      "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}})
    assert kube_cluster.get_object("cert-manager.io/v1", "Certificate", "c", kube_namespace)


def test_a_deleted_running_pod_goes_as_its_kubelet_confirms(kube_cluster, kube_namespace, kubelet) -> None:
    kubelet.run(kube_namespace, {"app": "web"}, "ready")
    kube_cluster.put_object(_deployment("web", kube_namespace, replicas=1))
    pod = kube_cluster.wait_for("a running pod", lambda: next(
        (p for p in kube_cluster.list_objects("v1", "Pod", kube_namespace, "app=web")
         if (p.get("status") or {}).get("phase") == "Running"), None))
    kubelet.clear()  # no rule left: the stand-in still confirms deletions of the pods it runs
    kube_cluster.delete_object("v1", "Pod", pod["metadata"]["name"], kube_namespace)
    kube_cluster.wait_for("the pod gone", lambda: kube_cluster.get_object(
        "v1", "Pod", pod["metadata"]["name"], kube_namespace) is None)
