"""The fake Kubernetes API server, driven by the unchanged official client."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from tests.fakes.kube_api import KubeApiServer

CERTIFICATE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "certificates.cert-manager.io"},
    "spec": {
        "group": "cert-manager.io",
        "scope": "Namespaced",
        "names": {"plural": "certificates", "singular": "certificate", "kind": "Certificate",
                  "shortNames": ["cert"]},
        "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                      "schema": {"openAPIV3Schema": {"type": "object"}}}],
    },
}


def deployment(name: str, replicas: int = 1, image: str = "nginx:1.27") -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "main", "image": image}]}}},
    }


def status_of(error: ApiException) -> dict:
    """The Status object the server answered with."""
    return json.loads(error.body)


def config_map(name: str, labels: dict[str, str] | None = None, **data: str) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=labels), data=data)


@pytest.fixture
def core(kube_api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube_api_client)


@pytest.fixture
def dynamic(kube_api_client: client.ApiClient) -> DynamicClient:
    return DynamicClient(kube_api_client)


def test_namespace_and_config_map_lifecycle(core: client.CoreV1Api) -> None:
    namespace = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="backups")))
    assert namespace.status.phase == "Active"
    assert namespace.metadata.labels == {"kubernetes.io/metadata.name": "backups"}

    created = core.create_namespaced_config_map("backups", config_map("plan", retention="7"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.kind == "ConfigMap"
    assert int(created.metadata.resource_version) > int(namespace.metadata.resource_version)

    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map("backups", config_map("plan"))
    assert exists.value.status == 409
    assert status_of(exists.value)["reason"] == "AlreadyExists"

    assert core.read_namespaced_config_map("plan", "backups").data == {"retention": "7"}
    core.delete_namespaced_config_map("plan", "backups")
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_config_map("plan", "backups")
    assert missing.value.status == 404
    assert status_of(missing.value)["message"] == 'configmaps "plan" not found'

    core.create_namespaced_config_map("backups", config_map("left-behind"))
    core.delete_namespace("backups")
    assert "backups" not in [n.metadata.name for n in core.list_namespace().items]
    assert core.list_config_map_for_all_namespaces().items == []


def test_status_bodies_carry_reason_code_and_details(core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as missing_namespace:
        core.create_namespaced_config_map("nowhere", config_map("plan"))
    assert missing_namespace.value.status == 404
    assert status_of(missing_namespace.value)["details"] == {"name": "nowhere", "kind": "namespaces"}

    with pytest.raises(ApiException) as nameless:
        core.create_namespaced_config_map("default", client.V1ConfigMap(data={"a": "b"}))
    assert nameless.value.status == 422
    assert status_of(nameless.value)["details"]["causes"][0]["field"] == "metadata.name"

    with pytest.raises(ApiException) as bad_name:
        core.create_namespaced_config_map("default", config_map("Backup_Plan"))
    assert bad_name.value.status == 422


def test_generate_name_gives_a_fresh_name(core: client.CoreV1Api) -> None:
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(generate_name="restore-"))
    first = core.create_namespaced_config_map("default", body)
    second = core.create_namespaced_config_map("default", body)
    assert first.metadata.name.startswith("restore-") and first.metadata.name != second.metadata.name


def test_label_and_field_selectors(core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map("default", config_map("a", {"tier": "data", "env": "prod"}))
    core.create_namespaced_config_map("default", config_map("b", {"tier": "data", "env": "dev"}))
    core.create_namespaced_config_map("default", config_map("c", {"tier": "web"}))

    def names(**selectors: str) -> list[str]:
        return [i.metadata.name for i in core.list_namespaced_config_map("default", **selectors).items]

    assert names(label_selector="tier=data") == ["a", "b"]
    assert names(label_selector="tier==data,env!=prod") == ["b"]
    assert names(label_selector="env in (prod, staging)") == ["a"]
    assert names(label_selector="env notin (prod)") == ["b", "c"]
    assert names(label_selector="env") == ["a", "b"]
    assert names(label_selector="!env") == ["c"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c", label_selector="tier") == ["a", "b"]
    with pytest.raises(ApiException) as bad:
        names(field_selector="data.retention=7")
    assert bad.value.status == 400


def test_lists_across_namespaces_paginate_and_carry_a_resource_version(core: client.CoreV1Api) -> None:
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="other")))
    core.create_namespaced_config_map("default", config_map("a"))
    core.create_namespaced_config_map("other", config_map("b"))
    everywhere = core.list_config_map_for_all_namespaces()
    assert [(i.metadata.namespace, i.metadata.name) for i in everywhere.items] == [("default", "a"), ("other", "b")]
    assert everywhere.kind == "ConfigMapList" and everywhere.metadata.resource_version

    first = core.list_config_map_for_all_namespaces(limit=1)
    rest = core.list_config_map_for_all_namespaces(limit=1, _continue=first.metadata._continue)
    assert [i.metadata.name for i in first.items + rest.items] == ["a", "b"]
    assert rest.metadata._continue is None


def test_dynamic_server_side_apply_creates_then_updates(kube_api: KubeApiServer, dynamic: DynamicClient) -> None:
    deployments = dynamic.resources.get(api_version="apps/v1", kind="Deployment")
    assert deployments.namespaced and "status" in deployments.subresources

    dry = deployments.server_side_apply(body=deployment("web"), field_manager="ops", dry_run="All")
    assert dry.metadata.name == "web"
    assert kube_api.get_object("apps/v1", "Deployment", "web", "default") is None

    created = deployments.server_side_apply(body=deployment("web"), field_manager="ops")
    assert created.metadata.generation == 1
    assert created.metadata.managedFields[0]["manager"] == "ops"
    unchanged = deployments.server_side_apply(body=deployment("web"), field_manager="ops")
    assert unchanged.metadata.resourceVersion == created.metadata.resourceVersion

    updated = deployments.server_side_apply(body=deployment("web", replicas=3), field_manager="ops")
    assert updated.metadata.generation == 2 and updated.spec.replicas == 3
    assert updated.metadata.uid == created.metadata.uid
    assert int(updated.metadata.resourceVersion) > int(created.metadata.resourceVersion)

    apply_requests = [r for r in kube_api.requests if r.method == "PATCH"]
    assert {r.content_type for r in apply_requests} == {"application/apply-patch+yaml"}
    assert all(r.query["fieldManager"] == "ops" for r in apply_requests)


def test_apply_conflicts_between_managers_unless_forced(dynamic: DynamicClient) -> None:
    deployments = dynamic.resources.get(api_version="apps/v1", kind="Deployment")
    deployments.server_side_apply(body=deployment("web", replicas=2), field_manager="ops")
    with pytest.raises(ConflictError) as conflict:
        deployments.server_side_apply(body=deployment("web", replicas=5), field_manager="autoscaler")
    assert ".spec.replicas" in conflict.value.body
    forced = deployments.server_side_apply(body=deployment("web", replicas=5), field_manager="autoscaler",
                                           force_conflicts=True)
    assert forced.spec.replicas == 5


def test_apply_removes_fields_its_manager_stopped_applying(dynamic: DynamicClient) -> None:
    deployments = dynamic.resources.get(api_version="apps/v1", kind="Deployment")
    first = deployment("web")
    first["metadata"]["labels"]["tier"] = "web"
    first["spec"]["template"]["spec"]["containers"].append({"name": "proxy", "image": "envoy"})
    deployments.server_side_apply(body=first, field_manager="ops")

    applied = deployments.server_side_apply(body=deployment("web"), field_manager="ops")
    assert applied.metadata.labels.to_dict() == {"app": "web"}
    assert [c["name"] for c in applied.spec.template.spec.containers] == ["main"]
    assert applied.metadata.generation == 2


def test_apply_of_a_crd_makes_its_custom_objects_usable(kube_api: KubeApiServer, dynamic: DynamicClient,
                                                       kube_api_client: client.ApiClient) -> None:
    crds = dynamic.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    crd = crds.server_side_apply(body=CERTIFICATE_CRD, field_manager="ops")
    assert {c["type"]: c["status"] for c in crd.status.conditions} == {"Established": "True",
                                                                        "NamesAccepted": "True"}

    certificates = dynamic.resources.get(api_version="cert-manager.io/v1", kind="Certificate")
    certificate = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                   "metadata": {"name": "onto", "namespace": "default"},
                   "spec": {"secretName": "onto-tls", "dnsNames": ["onto.company.com"]}}
    assert certificates.server_side_apply(body=certificate, field_manager="ops").spec.secretName == "onto-tls"

    custom = client.CustomObjectsApi(kube_api_client)
    custom.patch_namespaced_custom_object_status(
        "cert-manager.io", "v1", "default", "certificates", "onto",
        {"status": {"notAfter": "2030-01-01T00:00:00Z"}})
    stored = custom.get_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates", "onto")
    assert stored["status"] == {"notAfter": "2030-01-01T00:00:00Z"}
    with pytest.raises(ApiException) as strategic:
        certificates.patch(body={"metadata": {"name": "onto"}, "spec": {"secretName": "x"}}, namespace="default")
    assert strategic.value.status == 415

    crds.delete(name="certificates.cert-manager.io")
    with pytest.raises(ApiException) as gone:
        custom.list_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates")
    assert gone.value.status == 404
    crds.create(body=CERTIFICATE_CRD)
    assert kube_api.get_object("cert-manager.io/v1", "Certificate", "onto", "default") is None


def test_status_subresource_is_separate_from_the_main_endpoint(kube_api_client: client.ApiClient,
                                                               dynamic: DynamicClient) -> None:
    apps = client.AppsV1Api(kube_api_client)
    created = apps.create_namespaced_deployment("default", {**deployment("web"), "status": {"replicas": 9}})
    assert created.status is None

    patched = apps.patch_namespaced_deployment_status(
        "web", "default", {"status": {"readyReplicas": 1}, "spec": {"replicas": 4}})
    assert patched.status.ready_replicas == 1
    assert patched.spec.replicas == 1 and patched.metadata.generation == 1

    ignored = apps.patch_namespaced_deployment("web", "default", {"status": {"readyReplicas": 0}})
    assert ignored.status.ready_replicas == 1
    assert ignored.metadata.resource_version == patched.metadata.resource_version

    scale = apps.patch_namespaced_deployment_scale("web", "default", {"spec": {"replicas": 3}})
    assert scale.spec.replicas == 3
    assert apps.read_namespaced_deployment("web", "default").metadata.generation == 2


def test_replace_with_a_stale_resource_version_conflicts(core: client.CoreV1Api) -> None:
    original = core.create_namespaced_config_map("default", config_map("plan", retention="7"))
    original.data = {"retention": "14"}
    core.replace_namespaced_config_map("plan", "default", original)
    original.data = {"retention": "30"}
    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_config_map("plan", "default", original)
    assert stale.value.status == 409
    assert (status_of(stale.value)["reason"], status_of(stale.value)["code"]) == ("Conflict", 409)
    assert core.read_namespaced_config_map("plan", "default").data == {"retention": "14"}


def test_patch_types(core: client.CoreV1Api, kube_api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(kube_api_client)
    apps.create_namespaced_deployment("default", deployment("web"))
    sidecar = {"spec": {"template": {"spec": {"containers": [{"name": "proxy", "image": "envoy"}]}}}}
    merged = apps.patch_namespaced_deployment("web", "default", sidecar)
    assert [c.name for c in merged.spec.template.spec.containers] == ["main", "proxy"]

    core.create_namespaced_config_map("default", config_map("plan", a="1", b="2"))
    json_patched = core.patch_namespaced_config_map("plan", "default", [
        {"op": "replace", "path": "/data/a", "value": "10"}, {"op": "remove", "path": "/data/b"},
        {"op": "add", "path": "/metadata/labels", "value": {"tier": "data"}}])
    assert json_patched.data == {"a": "10"} and json_patched.metadata.labels == {"tier": "data"}
    with pytest.raises(ApiException) as bad_path:
        core.patch_namespaced_config_map("plan", "default", [{"op": "remove", "path": "/data/zzz"}])
    assert bad_path.value.status == 422


def test_finalizers_hold_a_deleted_object(kube_api: KubeApiServer, core: client.CoreV1Api) -> None:
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="held", finalizers=["ops/cleanup"]))
    core.create_namespaced_config_map("default", body)
    core.delete_namespaced_config_map("held", "default")
    held = core.read_namespaced_config_map("held", "default")
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}})
    assert kube_api.get_object("v1", "configmaps", "held", "default") is None


def test_watch_streams_added_modified_deleted_then_times_out(kube_api: KubeApiServer,
                                                             core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map("default", config_map("before"))
    listed = core.list_namespaced_config_map("default")

    def change_later() -> None:
        time.sleep(0.2)
        core.create_namespaced_config_map("default", config_map("plan", retention="7"))
        kube_api.put_object({"apiVersion": "v1", "kind": "ConfigMap",
                             "metadata": {"name": "plan", "namespace": "default"}, "data": {"retention": "8"}})
        core.delete_namespaced_config_map("plan", "default")

    writer = threading.Thread(target=change_later)
    writer.start()
    started = time.monotonic()
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_config_map, "default", resource_version=listed.metadata.resource_version,
        timeout_seconds=1)]
    writer.join()
    assert events == [("ADDED", "plan"), ("MODIFIED", "plan"), ("DELETED", "plan")]
    assert 0.9 < time.monotonic() - started < 3


def test_watch_without_resource_version_starts_with_current_state(core: client.CoreV1Api,
                                                                  dynamic: DynamicClient) -> None:
    core.create_namespaced_config_map("default", config_map("a", {"tier": "data"}))
    core.create_namespaced_config_map("default", config_map("b"))
    config_maps = dynamic.resources.get(api_version="v1", kind="ConfigMap")
    watcher = watch.Watch()
    events = config_maps.watch(namespace="default", label_selector="tier=data", timeout=5, watcher=watcher)
    first = next(events)
    core.create_namespaced_config_map("default", config_map("c", {"tier": "data"}))
    second = next(events)
    watcher.stop()
    assert [(e["type"], e["object"].metadata.name) for e in (first, second)] == [("ADDED", "a"), ("ADDED", "c")]


def test_watch_from_before_a_reset_is_expired(kube_api: KubeApiServer, core: client.CoreV1Api) -> None:
    old = core.list_namespace().metadata.resource_version
    kube_api.reset()
    with pytest.raises(ApiException) as expired:
        list(watch.Watch().stream(core.list_namespace, resource_version=old, timeout_seconds=1))
    assert expired.value.status == 410


def test_set_status_hook_reaches_watchers(kube_api: KubeApiServer, kube_api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(kube_api_client)
    created = apps.create_namespaced_deployment("default", deployment("web"))
    kube_api.set_status("apps/v1", "deployments", "web", "default", {"readyReplicas": 1})
    watcher = watch.Watch()
    events = watcher.stream(apps.list_namespaced_deployment, "default",
                            resource_version=created.metadata.resource_version, timeout_seconds=5)
    event = next(events)
    watcher.stop()
    assert (event["type"], event["object"].status.ready_replicas) == ("MODIFIED", 1)


def test_injected_failures_and_the_request_log(kube_api: KubeApiServer, core: client.CoreV1Api) -> None:
    kube_api.fail_next("GET", r"/namespaces/default/configmaps$", 500)
    with pytest.raises(ApiException) as broken:
        core.list_namespaced_config_map("default")
    assert broken.value.status == 500
    assert core.list_namespaced_config_map("default").items == []

    # urllib3 itself retries a GET answered 429 with Retry-After, as against a real server.
    kube_api.fail_next("GET", r"/api/v1/namespaces$", 429, retry_after=0)
    assert core.list_namespace().items
    assert [r.path for r in kube_api.requests[-2:]] == ["/api/v1/namespaces", "/api/v1/namespaces"]


def test_a_required_token_rejects_other_tokens(kube_api: KubeApiServer, core: client.CoreV1Api) -> None:
    kube_api.required_token = "the-right-one"
    with pytest.raises(ApiException) as denied:
        core.list_namespace()
    assert denied.value.status == 401


def test_unknown_paths_are_not_found(kube_api_client: client.ApiClient) -> None:
    with pytest.raises(ApiException) as unknown:
        kube_api_client.call_api("/apis/example.com/v1/widgets", "GET", auth_settings=["BearerToken"])
    assert unknown.value.status == 404
    assert status_of(unknown.value)["kind"] == "Status"


def test_discovery_cache_file_is_removed_on_reset(kube_api: KubeApiServer, dynamic: DynamicClient) -> None:
    dynamic.resources.get(api_version="v1", kind="Pod")
    assert kube_api.discovery_cache_file.exists()
    kube_api.reset()
    assert not kube_api.discovery_cache_file.exists()
    with pytest.raises(NotFoundError):
        dynamic.resources.get(api_version="v1", kind="ConfigMap").get(name="absent", namespace="default")


def test_dry_run_create_and_delete_store_nothing(kube_api: KubeApiServer, core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map("default", config_map("plan"), dry_run="All")
    assert kube_api.get_object("v1", "ConfigMap", "plan", "default") is None
    core.create_namespaced_config_map("default", config_map("plan"))
    core.delete_namespaced_config_map("plan", "default", dry_run="All")
    assert kube_api.get_object("v1", "ConfigMap", "plan", "default") is not None


def _raw_request(server: KubeApiServer, method: str, path: str, body: str, content_type: str,
                 token: str | None = "any") -> tuple[int, dict]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(server.url + path, data=body.encode(), method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_apply_accepts_a_yaml_body(kube_api: KubeApiServer) -> None:
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: plan\ndata:\n  retention: '7'\n"
    path = "/api/v1/namespaces/default/configmaps/plan?fieldManager=ops"
    code, created = _raw_request(kube_api, "PATCH", path, manifest, "application/apply-patch+yaml")
    assert (code, created["data"]) == (201, {"retention": "7"})
    code, status = _raw_request(kube_api, "PATCH", path.split("?")[0], manifest, "application/apply-patch+yaml")
    assert (code, status["reason"]) == (400, "BadRequest")


def test_a_request_without_a_bearer_token_is_unauthorized(kube_api: KubeApiServer) -> None:
    code, status = _raw_request(kube_api, "POST", "/api/v1/namespaces", '{"metadata": {"name": "x"}}',
                                "application/json", token=None)
    assert (code, status["reason"]) == (401, "Unauthorized")
    assert kube_api.get_object("v1", "Namespace", "x") is None


def test_watch_reports_objects_leaving_a_selector_as_deleted(kube_api: KubeApiServer,
                                                             core: client.CoreV1Api) -> None:
    start = core.list_namespaced_config_map("default").metadata.resource_version
    core.create_namespaced_config_map("default", config_map("plan", {"tier": "data"}))
    core.patch_namespaced_config_map("plan", "default", {"metadata": {"labels": {"tier": "web"}}})
    core.patch_namespaced_config_map("plan", "default", {"metadata": {"labels": {"tier": "data"}}})
    watcher = watch.Watch()
    events = watcher.stream(core.list_namespaced_config_map, "default", label_selector="tier=data",
                            resource_version=start, timeout_seconds=5)
    assert [next(events)["type"] for _ in range(3)] == ["ADDED", "DELETED", "ADDED"]
    watcher.stop()
