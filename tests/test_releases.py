"""Releases on the real API server (tests/fixtures/kube_server.py) as the code location's ServiceAccount
``ops-platform``, and ECR on moto.

The kube-controller-manager rolls the Deployments out (ReplicaSets, revisions, the autoscaler's scale) and
the kubelet stand-in makes their pods Ready or crash-loop, so a release waits for a real rollout and a
failed one rolls back to the previous ReplicaSet. Each test releases into a namespace of its own; what the
code wrote is read from the server's audit log.

The server is Kubernetes 1.20: the chart's PodDisruptionBudgets and HorizontalPodAutoscalers go in
policy/v1beta1 and autoscaling/v2beta2 there. Their policy/v1 and autoscaling/v2 form, which EKS serves,
is covered by schema validation (tests/test_helm_chart.py) and by the fake API server (the test named so).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from kubernetes import client as k8s_client

from ops_platform.manifests import render_chart, validate_manifest
from ops_platform.releases import (
    NAME_LABEL,
    POD_TEMPLATE_HASH,
    REVISION_ANNOTATION,
    DigestChanged,
    ImageNotFound,
    InvalidTag,
    NotPassedStaging,
    NotServed,
    OutsideEnvironment,
    Promotion,
    ProvenRelease,
    ReleaseError,
    ReleaseFailed,
    check_digest,
    cluster_api_versions,
    dump_promotions,
    gate_of,
    image_of_digest,
    load_promotions,
    next_promotion,
    passed_staging,
    promotion_tag,
    release,
    release_values,
    require_passed_staging,
    resolve_image,
    rollout_state,
    served_api_versions,
)
from ops_platform.resources.ecr import EcrRegistry, ImageInfo, RepositoryNotFound
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.spec import REPO_ROOT, Service, load_spec
from tests.fixtures.kube_server import CRD_DIR, KubeCluster, KubeletStandIn

SERVICES = {service.name: service for service in load_spec().images.services}
REGISTRY = load_spec().registry_of("dev")
FRONTEND, BACKEND = SERVICES["onto-frontend"], SERVICES["onto-backend"]
GOOD, NEXT, BROKEN = "0123abc", "4567def", "89abcde"
AT = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
SERVED_ON_1_20 = {"autoscaling": {"apiVersion": "autoscaling/v2beta2"},
                  "podDisruptionBudget": {"apiVersion": "policy/v1beta1"}}


@pytest.fixture(scope="session")
def chart_prerequisites(kube_cluster: KubeCluster) -> None:
    """What the layers put in place before any release: the PriorityClasses of the cluster layer (without
    onto-app, admission refuses every pod of the chart) and the CRD of the chart's ExternalSecret."""
    kube_cluster.install_crds(CRD_DIR / "external-secrets.io")
    for document in yaml.safe_load_all((REPO_ROOT / "infra/layers/cluster/priority-classes.yaml").read_text()):
        if document and document.get("kind") == "PriorityClass":
            kube_cluster.put_object(document)


@pytest.fixture
def kube(kube_cluster: KubeCluster, chart_prerequisites: None, tmp_path: Path) -> KubernetesClient:
    """The code location's client, from a kubeconfig of the ServiceAccount ops-platform."""
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform")
    return KubernetesResource(kubeconfig=str(kubeconfig), request_timeout=10).get_client()


@pytest.fixture
def other_namespace(kube_cluster: KubeCluster, kube_namespace: str) -> Iterator[str]:
    """A second namespace of the same cluster: another environment's."""
    name = f"{kube_namespace[:57]}-prod"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.delete_object("v1", "Namespace", name)


@pytest.fixture
def ecr(aws_env: Any) -> Any:
    return boto3.client("ecr")


def push_image(ecr: Any, repository: str, tag: str) -> str:
    layer = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 7023, "digest": layer},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 32654,
                    "digest": layer}],
    }
    answer = ecr.put_image(repositoryName=repository, imageManifest=json.dumps(manifest), imageTag=tag)
    return answer["image"]["imageId"]["imageDigest"]


def digest_of(tag: str) -> str:
    """A digest for ``tag`` in the tests that need no ECR."""
    return "sha256:" + hashlib.sha256(tag.encode()).hexdigest()


def image_reference(image: str) -> str:
    """The digest of ``repo@sha256:...``, or the tag of ``repo:tag``."""
    return image.rsplit("@", 1)[1] if "@" in image else image.rsplit(":", 1)[1]


def image_ref(obj: dict[str, Any] | None) -> str:
    """What a Deployment or ReplicaSet runs: the digest it is pinned by (the tag when it is not)."""
    assert obj is not None
    return image_reference(obj["spec"]["template"]["spec"]["containers"][0]["image"])


def deployment(cluster: KubeCluster, namespace: str, name: str = "onto-frontend") -> dict[str, Any] | None:
    return cluster.get_object("apps/v1", "Deployment", name, namespace)


def replicasets(cluster: KubeCluster, namespace: str, service: str = "onto-frontend") -> list[dict[str, Any]]:
    return cluster.list_objects("apps/v1", "ReplicaSet", namespace, f"{NAME_LABEL}={service}")


def revision(obj: dict[str, Any] | None) -> str | None:
    assert obj is not None
    return (obj["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION)


def pods_ready(kubelet: KubeletStandIn, namespace: str, service: str = "onto-frontend") -> None:
    kubelet.run(namespace, {NAME_LABEL: service}, "ready")


def new_pods_crash(kubelet: KubeletStandIn, cluster: KubeCluster, namespace: str,
                   service: str = "onto-frontend") -> None:
    """From now on every new pod of ``service`` crash-loops; those of the ReplicaSets running now stay ready."""
    kubelet.run(namespace, {NAME_LABEL: service}, "crash")
    for replicaset in replicasets(cluster, namespace, service):
        if replicaset["spec"].get("replicas"):
            template_hash = replicaset["metadata"]["labels"][POD_TEMPLATE_HASH]
            kubelet.run(namespace, {NAME_LABEL: service, POD_TEMPLATE_HASH: template_hash}, "ready")


_audit_read: dict[Path, tuple[int, list[dict[str, Any]]]] = {}


def code_events(cluster: KubeCluster) -> list[dict[str, Any]]:
    """The audit events of ``ops-platform`` so far; the log only grows, so each read goes on from the last."""
    username = cluster.identity("ops-platform").username
    offset, events = _audit_read.get(cluster.audit_log, (0, []))
    marker = f'"username":"{username}"'
    with cluster.audit_log.open("rb") as log:
        log.seek(offset)
        for line in log:
            if not line.endswith(b"\n"):
                break  # being written: read it next time
            offset += len(line)
            text = line.decode()
            if marker in text:
                event = json.loads(text)
                if event.get("stage") == "ResponseComplete":
                    events.append(event)
    _audit_read[cluster.audit_log] = (offset, events)
    return events


def code_writes(cluster: KubeCluster, *namespaces: str, name: str | None = None) -> list[str]:
    """Every write ``ops-platform`` sent (allowed or not) into ``namespaces``, or to objects called ``name``."""
    found = []
    for event in code_events(cluster):
        ref = event.get("objectRef") or {}
        if event["verb"] not in WRITE_VERBS:
            continue
        inside = ref.get("namespace") in namespaces or (
            ref.get("resource") == "namespaces" and ref.get("name") in namespaces)
        if inside or (name is not None and ref.get("name") == name):
            found.append(f"{event['verb']} {ref.get('resource')} {ref.get('namespace') or '-'}/{ref.get('name')}")
    return found


def run(kube: KubernetesClient, service: Service, tag: str, namespace: str, *, timeout: float = 30.0,
        **options: Any) -> Any:
    return release(kube, service, "dev", tag, digest_of(tag), namespace=namespace, registry=REGISTRY,
                   wait_timeout=timeout, clock=lambda: AT, **options)


def test_release_creates_then_updates_the_service(kube: KubernetesClient, kube_cluster: KubeCluster,
                                                   kube_namespace: str, kubelet: KubeletStandIn) -> None:
    ns = kube_namespace
    pods_ready(kubelet, ns)
    first = run(kube, FRONTEND, GOOD, ns)
    assert first.revision == "1"
    assert first.image == f"123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/onto-frontend-dev@{digest_of(GOOD)}"
    assert (first.digest, first.released_at) == (digest_of(GOOD), AT)
    assert re.fullmatch(r"(\d+)/\1 replicas available", first.rollout)
    assert f"Namespace {ns}" in first.changed, "the release labels the namespace the cluster layer made"
    assert f"Deployment {ns}/onto-frontend" in first.created
    assert f"HorizontalPodAutoscaler {ns}/onto-frontend" in first.created
    assert first.unchanged == []
    assert not any("onto-backend" in ref for ref in first.created), "the other service is left alone"
    assert deployment(kube_cluster, ns, "onto-backend") is None

    second = run(kube, FRONTEND, NEXT, ns)
    assert second.revision == "2"
    assert second.created == []
    assert second.changed == [f"Deployment {ns}/onto-frontend"]
    assert f"Service {ns}/onto-frontend" in second.unchanged
    live = deployment(kube_cluster, ns)
    assert image_ref(live) == digest_of(NEXT)
    assert {"manager": "ops-platform", "operation": "Apply"} in [
        {key: entry.get(key) for key in ("manager", "operation")} for entry in live["metadata"]["managedFields"]]
    by_revision = {revision(rs): rs for rs in replicasets(kube_cluster, ns)}
    assert image_ref(by_revision["2"]) == digest_of(NEXT) and image_ref(by_revision["1"]) == digest_of(GOOD)
    assert by_revision["1"]["spec"]["replicas"] == 0, "the old ReplicaSet is scaled down once the new one is ready"


def test_autoscaler_and_budget_go_in_the_versions_1_20_serves_and_keep_the_replicas_a_release_takes_the_image(
    kube: KubernetesClient, kube_cluster: KubeCluster, kube_namespace: str, kubelet: KubeletStandIn
) -> None:
    assert cluster_api_versions(kube) == SERVED_ON_1_20
    pods_ready(kubelet, kube_namespace)
    run(kube, FRONTEND, GOOD, kube_namespace)

    hpa = kube_cluster.get_object("autoscaling/v2beta2", "HorizontalPodAutoscaler", "onto-frontend", kube_namespace)
    assert hpa is not None and hpa["spec"]["scaleTargetRef"]["name"] == "onto-frontend"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    pdb = kube_cluster.get_object("policy/v1beta1", "PodDisruptionBudget", "onto-frontend", kube_namespace)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1

    # The autoscaler's scale and a person's `kubectl set image`, both as field managers of their own.
    apps = k8s_client.AppsV1Api(kube_cluster.admin_client())
    apps.patch_namespaced_deployment_scale("onto-frontend", kube_namespace, {"spec": {"replicas": 3}},
                                           field_manager="horizontal-pod-autoscaler")
    apps.patch_namespaced_deployment(
        "onto-frontend", kube_namespace,
        {"spec": {"template": {"spec": {"containers": [{"name": "frontend",
                                                        "image": f"{FRONTEND.repository('dev')}:hotfix"}]}}}},
        field_manager="kubectl-set")

    result = run(kube, FRONTEND, NEXT, kube_namespace)

    assert result.rollout == "3/3 replicas available", "the chart leaves the replicas to the autoscaler"
    live = deployment(kube_cluster, kube_namespace)
    assert live["spec"]["replicas"] == 3
    assert image_ref(live) == digest_of(NEXT), "the release takes the image back from the hand edit"
    assert result.revision == "3"


def test_release_of_one_service_keeps_the_other_running(kube: KubernetesClient, kube_cluster: KubeCluster,
                                                         kube_namespace: str, kubelet: KubeletStandIn) -> None:
    ns = kube_namespace
    pods_ready(kubelet, ns, "onto-frontend")
    pods_ready(kubelet, ns, "onto-backend")
    run(kube, FRONTEND, GOOD, ns)
    frontend_before = deployment(kube_cluster, ns)

    result = run(kube, BACKEND, NEXT, ns)

    assert result.revision == "1"
    assert image_ref(deployment(kube_cluster, ns, "onto-backend")) == digest_of(NEXT)
    assert f"ExternalSecret {ns}/onto-backend" in result.created
    assert f"Namespace {ns}" in result.unchanged
    frontend = deployment(kube_cluster, ns)
    assert frontend["spec"]["template"] == frontend_before["spec"]["template"]
    assert revision(frontend) == revision(frontend_before) == "1"
    assert code_writes(kube_cluster, ns, name="onto-frontend").count(f"patch deployments {ns}/onto-frontend") == 1


def test_crashing_rollout_past_its_progress_deadline_rolls_back_to_the_previous_replicaset(
    kube: KubernetesClient, kube_cluster: KubeCluster, kube_namespace: str, kubelet: KubeletStandIn
) -> None:
    ns = kube_namespace
    pods_ready(kubelet, ns)
    run(kube, FRONTEND, GOOD, ns)
    # The chart leaves the default deadline (600 s); one second, set as another manager, keeps the test short.
    kube_cluster.put_object({"apiVersion": "apps/v1", "kind": "Deployment",
                             "metadata": {"name": "onto-frontend", "namespace": ns},
                             "spec": {"progressDeadlineSeconds": 1}})
    [good] = replicasets(kube_cluster, ns)
    new_pods_crash(kubelet, kube_cluster, ns)

    with pytest.raises(ReleaseFailed) as failure:
        run(kube, FRONTEND, BROKEN, ns)

    message = str(failure.value)
    assert message.startswith("rollout failed: ProgressDeadlineExceeded"), "the caller names the release"
    assert "has timed out progressing" in message
    rollback = failure.value.rollback
    assert rollback is not None and (rollback.revision, rollback.action) == ("1", "changed")
    assert rollback.replicaset == good["metadata"]["name"]
    assert f"rolled back to revision 1 (ReplicaSet {rollback.replicaset})" in message

    def rolled_back() -> dict[str, dict[str, Any]] | None:
        found = {rs["metadata"]["name"]: rs for rs in replicasets(kube_cluster, ns)}
        old = found[rollback.replicaset]
        broken = [rs for name, rs in found.items() if name != rollback.replicaset]
        ready = old["spec"]["replicas"] >= 1 and (old.get("status") or {}).get("readyReplicas") == old["spec"]["replicas"]
        return found if ready and broken and all(rs["spec"]["replicas"] == 0 for rs in broken) else None

    found = kube_cluster.wait_for("the previous ReplicaSet back up, the broken one at 0", rolled_back)
    [broken] = [rs for name, rs in found.items() if name != rollback.replicaset]
    assert image_ref(broken) == digest_of(BROKEN) and image_ref(found[rollback.replicaset]) == digest_of(GOOD)
    live = deployment(kube_cluster, ns)
    assert image_ref(live) == digest_of(GOOD)
    assert POD_TEMPLATE_HASH not in live["spec"]["template"]["metadata"]["labels"]
    assert revision(live) == revision(found[rollback.replicaset]) == "3", "as kubectl rollout undo: a new revision"


def test_crashing_rollout_that_outlasts_the_wait_rolls_back(
    kube: KubernetesClient, kube_cluster: KubeCluster, kube_namespace: str, kubelet: KubeletStandIn
) -> None:
    ns = kube_namespace
    pods_ready(kubelet, ns)
    run(kube, FRONTEND, GOOD, ns)
    new_pods_crash(kubelet, kube_cluster, ns)

    with pytest.raises(ReleaseFailed) as failure:
        run(kube, FRONTEND, BROKEN, ns, timeout=2)

    reason = failure.value.reason
    assert reason.startswith("not available after 2 s: ") and re.search(r"\b[1-9]\d* unavailable", reason)
    # The controller's own words, which change as it goes ('Created new replica set ...', then
    # 'ReplicaSet ... is progressing.'): the last condition and its message are reported.
    assert re.search(r"last condition Progressing=True: .*(?i:replica ?set)", reason), reason
    assert failure.value.rollback is not None and failure.value.rollback.revision == "1"
    kube_cluster.wait_for("the crashing ReplicaSet scaled to 0", lambda: all(
        rs["spec"]["replicas"] == 0 for rs in replicasets(kube_cluster, ns) if image_ref(rs) == digest_of(BROKEN)))
    assert image_ref(deployment(kube_cluster, ns)) == digest_of(GOOD)


def test_first_release_that_fails_has_nothing_to_roll_back(
    kube: KubernetesClient, kube_cluster: KubeCluster, kube_namespace: str, kubelet: KubeletStandIn
) -> None:
    kubelet.run(kube_namespace, {NAME_LABEL: "onto-frontend"}, "crash")
    with pytest.raises(ReleaseFailed) as failure:
        run(kube, FRONTEND, BROKEN, kube_namespace, timeout=2)
    assert failure.value.rollback is None
    assert "nothing to roll back to" in str(failure.value)
    assert image_ref(deployment(kube_cluster, kube_namespace)) == digest_of(BROKEN), "nothing else to run"


@pytest.mark.parametrize("tag, expected", [("latest", "moving tag"), ("v1.2.3", "does not match"),
                                           ("0123ABC", "does not match"), ("", "does not match")])
def test_release_refuses_unpinned_tags_before_applying_anything(
    kube: KubernetesClient, kube_cluster: KubeCluster, kube_namespace: str, tag: str, expected: str
) -> None:
    with pytest.raises(InvalidTag, match=expected):
        run(kube, FRONTEND, tag, kube_namespace)
    assert code_writes(kube_cluster, kube_namespace) == []


def test_release_refuses_an_environment_the_service_does_not_have(kube: KubernetesClient, kube_cluster: KubeCluster,
                                                                   kube_namespace: str) -> None:
    with pytest.raises(ReleaseError, match="environment 'qa'"):
        release(kube, FRONTEND, "qa", GOOD, digest_of(GOOD), namespace=kube_namespace, registry=REGISTRY,
                wait_timeout=1)
    assert code_writes(kube_cluster, kube_namespace) == []


def test_releases_keep_policy_v1_and_autoscaling_v2_where_served_on_fake_server_1_20_has_neither(
    kube_api_client: k8s_client.ApiClient,
) -> None:
    """EKS serves policy/v1 and autoscaling/v2 (the fake does too): the release renders them, valid objects."""
    served = cluster_api_versions(KubernetesClient(kube_api_client, request_timeout=5))
    assert served == {"autoscaling": {"apiVersion": "autoscaling/v2"}, "podDisruptionBudget": {"apiVersion": "policy/v1"}}
    values = {**release_values(FRONTEND, GOOD, digest_of(GOOD), "ontology-editor-dev", REGISTRY), **served}
    objects = render_chart("dev", values, chart_dir=FRONTEND.chart)
    kept = {obj["kind"]: obj for obj in objects if obj["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")}
    assert {kind: obj["apiVersion"] for kind, obj in kept.items()} == {
        "HorizontalPodAutoscaler": "autoscaling/v2", "PodDisruptionBudget": "policy/v1"}
    assert [problem for obj in kept.values() for problem in validate_manifest(obj)] == []


def test_a_cluster_serving_neither_version_of_a_kind_refuses_the_release() -> None:
    def serves(api_version: str, kind: str) -> bool:
        return kind != "PodDisruptionBudget"

    with pytest.raises(NotServed, match=r"^refused: the cluster at https://eks.test serves PodDisruptionBudget in "
                                        r"none of policy/v1, policy/v1beta1 .*; nothing applied$"):
        served_api_versions(serves, "the cluster at https://eks.test")


def test_resolve_image_gives_the_digest_of_the_tag(ecr: Any) -> None:
    ecr.create_repository(repositoryName="onto-frontend-staging")
    digest = push_image(ecr, "onto-frontend-staging", GOOD)
    push_image(ecr, "onto-frontend-staging", NEXT)

    image = resolve_image(EcrRegistry(ecr), FRONTEND, "staging", GOOD)

    assert (image.repository, image.digest, image.tags) == ("onto-frontend-staging", digest, (GOOD,))


def test_resolve_image_refuses_bad_and_missing_tags(ecr: Any) -> None:
    ecr.create_repository(repositoryName="onto-frontend-dev")
    push_image(ecr, "onto-frontend-dev", GOOD)
    push_image(ecr, "onto-frontend-dev", "latest")
    registry = EcrRegistry(ecr)

    with pytest.raises(InvalidTag, match="moving tag"):
        resolve_image(registry, FRONTEND, "dev", "latest")
    with pytest.raises(InvalidTag, match="tag_pattern"):
        resolve_image(registry, FRONTEND, "dev", "release-1")
    with pytest.raises(ImageNotFound, match=f"tag '{NEXT}' is not in repository 'onto-frontend-dev'"):
        resolve_image(registry, FRONTEND, "dev", NEXT)
    with pytest.raises(RepositoryNotFound, match="onto-frontend-prod"):
        resolve_image(registry, FRONTEND, "prod", GOOD)


def test_passed_staging_gates_prod_on_the_digest() -> None:
    history = [
        {"tag": GOOD, "digest": "sha256:aaa", "at": "2025-05-01T10:00:00Z"},
        {"tag": NEXT, "digest": "sha256:bbb", "at": "2025-05-01T11:00:00Z"},
    ]
    assert passed_staging(history, "sha256:bbb")
    assert passed_staging(history, GOOD)
    assert not passed_staging(history, "sha256:ccc")
    assert not passed_staging(history, BROKEN)
    assert not passed_staging([], "sha256:aaa")
    with pytest.raises(ValueError, match="record 0 has no 'digest'"):
        passed_staging([{"tag": GOOD}], "sha256:aaa")

    require_passed_staging(history, "sha256:aaa", "release it to staging first")
    with pytest.raises(NotPassedStaging, match=r"digest sha256:ccc has not passed staging .*"
                                               r"release it to staging first\); nothing applied"):
        require_passed_staging(history, "sha256:ccc", "release it to staging first")


def test_check_digest_refuses_a_repushed_tag(ecr: Any) -> None:
    ecr.create_repository(repositoryName="onto-frontend-dev")
    digest = push_image(ecr, "onto-frontend-dev", GOOD)
    image = resolve_image(EcrRegistry(ecr), FRONTEND, "dev", GOOD)
    check_digest(image, GOOD, None)
    check_digest(image, GOOD, digest)
    with pytest.raises(DigestChanged, match=rf"ECR now has digest {digest} for tag '{GOOD}', not sha256:0+ "
                                            r"\(the tag was re-pushed\)"):
        check_digest(image, GOOD, "sha256:" + "0" * 64)


def test_stale_status_is_not_a_finished_rollout() -> None:
    done = {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    stale = {"metadata": {"generation": 2}, "spec": {"replicas": 2}, "status": done}
    fresh = {"metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": done}
    short = {"metadata": {"generation": 1}, "spec": {"replicas": 3}, "status": done}
    assert rollout_state(stale)[0] == "progressing"
    assert rollout_state(fresh) == ("complete", "2/2 replicas available")
    assert rollout_state(short) == ("progressing", "2/3 replicas updated, 2/3 available, 1 unavailable")


def test_releases_of_two_environments_in_one_cluster_stay_in_their_namespaces(
    kube: KubernetesClient, kube_cluster: KubeCluster, kube_namespace: str, other_namespace: str,
    kubelet: KubeletStandIn,
) -> None:
    dev, prod = kube_namespace, other_namespace
    pods_ready(kubelet, dev)
    pods_ready(kubelet, prod)
    release(kube, FRONTEND, "prod", GOOD, digest_of(GOOD), namespace=prod, registry=REGISTRY, wait_timeout=30)
    prod_before = deployment(kube_cluster, prod)
    prod_writes = code_writes(kube_cluster, prod)

    result = release(kube, FRONTEND, "dev", NEXT, digest_of(NEXT), namespace=dev, registry=REGISTRY,
                     wait_timeout=30)

    assert f"Deployment {dev}/onto-frontend" in result.created
    assert all(prod not in ref for ref in result.created + result.changed + result.unchanged)
    assert image_ref(deployment(kube_cluster, dev)) == digest_of(NEXT)
    prod_after = deployment(kube_cluster, prod)
    assert image_ref(prod_after) == digest_of(GOOD), "the dev release changed prod"
    assert prod_after["spec"]["template"] == prod_before["spec"]["template"] and revision(prod_after) == "1"
    assert code_writes(kube_cluster, prod) == prod_writes, "the dev release wrote into prod's namespace"
    assert kube_cluster.get_object("v1", "Namespace", dev)["metadata"]["labels"]["env"] == "dev"
    assert kube_cluster.get_object("v1", "Namespace", prod)["metadata"]["labels"]["env"] == "prod"


def stray(kind: str, namespace: str | None, api_version: str = "v1") -> dict[str, Any]:
    metadata = {"name": "onto-frontend-extra", "labels": {"app.kubernetes.io/name": "onto-frontend"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


@pytest.mark.parametrize("where, kind, api_version, shown", [
    ("{other}", "ConfigMap", "v1", "ConfigMap {other}/onto-frontend-extra ({other})"),
    (None, "ConfigMap", "v1", "ConfigMap onto-frontend-extra (no namespace: the client's default)"),
    ("{ns}", "ClusterRole", "rbac.authorization.k8s.io/v1", "ClusterRole {ns}/onto-frontend-extra (cluster-wide)"),
    (None, "Namespace", "v1", "Namespace onto-frontend-extra (another namespace)"),
])
def test_an_object_rendered_outside_the_environments_namespace_is_refused_before_anything_is_applied(
    kube: KubernetesClient, kube_cluster: KubeCluster, kube_namespace: str, other_namespace: str,
    where: str | None, kind: str, api_version: str, shown: str,
) -> None:
    names = {"ns": kube_namespace, "other": other_namespace}
    extra = stray(kind, where.format(**names) if where else None, api_version)

    def render_with_extra(environment: str, values: dict[str, Any], chart_dir: str) -> list[dict[str, Any]]:
        return [*render_chart(environment, values, chart_dir=chart_dir), extra]

    with pytest.raises(OutsideEnvironment) as refused:
        run(kube, FRONTEND, GOOD, kube_namespace, render=render_with_extra)

    message = str(refused.value)
    assert message.startswith(
        f"refused: the chart renders 1 object(s) outside namespace '{kube_namespace}' of dev: ")
    assert shown.format(**names) in message and message.endswith("nothing applied")
    assert code_writes(kube_cluster, kube_namespace, other_namespace, "default", name="onto-frontend-extra") == []


def test_a_chart_that_ignores_the_environments_namespace_is_refused(kube: KubernetesClient, kube_cluster: KubeCluster,
                                                                    kube_namespace: str) -> None:
    def render_ignoring_namespace(environment: str, values: dict[str, Any], chart_dir: str) -> list[dict[str, Any]]:
        return render_chart(environment, {**values, "namespace": {"name": "ontology-editor"}}, chart_dir=chart_dir)

    with pytest.raises(OutsideEnvironment, match=rf"outside namespace '{kube_namespace}' of dev: "
                                                 r"Namespace ontology-editor \(another namespace\); "
                                                 r"NetworkPolicy ontology-editor/default-deny"):
        run(kube, FRONTEND, GOOD, kube_namespace, render=render_ignoring_namespace)
    assert code_writes(kube_cluster, kube_namespace, "ontology-editor") == []


def test_only_prod_with_a_staging_release_is_gated() -> None:
    assert [gate_of(BACKEND, env) for env in ("dev", "staging", "prod")] == [None, None, "staging"]
    assert gate_of(Service(name="onto-backend", environments=["dev", "prod"]), "prod") is None


def test_promotion_learns_first_then_follows_the_newest_proven_release() -> None:
    first, second, third = (ProvenRelease(n, tag, digest_of(tag)) for n, tag in ((3, GOOD), (7, NEXT), (9, BROKEN)))
    learned = next_promotion(None, first)
    assert learned == Promotion(seen=3), "what staging proved before the sensor ran is not promoted"
    assert next_promotion(None, None) == Promotion(seen=0)
    assert next_promotion(learned, first) == learned
    waiting = next_promotion(learned, second)
    assert waiting == Promotion(seen=7, pending=second)
    assert next_promotion(waiting, second) == waiting, "a digest waits until its image reaches prod"
    assert next_promotion(waiting, third) == Promotion(seen=9, pending=third), "the newest proven one replaces it"
    assert next_promotion(waiting, None) == waiting

    state = {"onto-backend/prod": waiting, "onto-frontend/prod": learned}
    assert load_promotions(dump_promotions(state)) == state
    assert load_promotions(None) == {} and load_promotions("") == {}
    with pytest.raises(ValueError, match="promotion sensor cursor is unreadable .* reset the sensor's cursor"):
        load_promotions('{"onto-backend/prod": [1, 2]}')


def test_promotion_finds_the_digest_in_the_prod_repository_and_its_tag(ecr: Any) -> None:
    ecr.create_repository(repositoryName="onto-backend-prod")
    registry = EcrRegistry(ecr)
    assert image_of_digest(registry, "onto-backend-prod", "sha256:" + "1" * 64) is None
    digest = push_image(ecr, "onto-backend-prod", GOOD)
    image = image_of_digest(registry, "onto-backend-prod", digest)
    assert image is not None and image.tags == (GOOD,)
    with pytest.raises(RepositoryNotFound):
        image_of_digest(registry, "onto-backend-qa", digest)

    pushed = datetime(2025, 5, 1, tzinfo=timezone.utc)
    assert promotion_tag(image, BACKEND, GOOD) == GOOD
    assert promotion_tag(ImageInfo("r", digest, ("latest", NEXT), pushed, None), BACKEND, GOOD) == NEXT
    assert promotion_tag(ImageInfo("r", digest, ("latest",), pushed, None), BACKEND, GOOD) is None
