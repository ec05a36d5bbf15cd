"""Releases against the fake Kubernetes API over HTTP and moto's ECR.

The fake API server has no controllers, so :class:`DeploymentController`
plays the Deployment controller from a thread, through the API as the real
one does: for each new generation it creates (or, on a rollback, re-adopts)
the ReplicaSet of the pod template with an owner reference, a
``pod-template-hash`` label and the revision annotation, sets the revision
annotation on the Deployment, then writes the status. Images whose tag or
digest (the reference after ``:`` or ``@``) is in ``deadline`` never become
available and hit ProgressDeadlineExceeded; those in ``stuck`` stay
unavailable without a deadline condition. One controller plays one namespace
of one cluster.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import boto3
import pytest
import yaml
from kubernetes import client as k8s_client

from ops_platform.manifests import CRD_SCHEMA_DIR, render_chart
from ops_platform.releases import (
    POD_TEMPLATE_HASH,
    REVISION_ANNOTATION,
    DigestChanged,
    ImageNotFound,
    InvalidTag,
    NotPassedStaging,
    OutsideEnvironment,
    Promotion,
    ProvenRelease,
    ReleaseError,
    ReleaseFailed,
    check_digest,
    dump_promotions,
    gate_of,
    image_of_digest,
    load_promotions,
    next_promotion,
    passed_staging,
    promotion_tag,
    release,
    require_passed_staging,
    resolve_image,
    rollout_state,
)
from ops_platform.resources.ecr import EcrRegistry, ImageInfo, RepositoryNotFound
from ops_platform.resources.kubernetes import KubernetesClient
from ops_platform.spec import Service, load_spec
from tests.fakes.kube_api import KubeApiServer

SERVICES = {service.name: service for service in load_spec().images.services}
REGISTRY = load_spec().registry_of("dev")
FRONTEND, BACKEND = SERVICES["onto-frontend"], SERVICES["onto-backend"]
NAMESPACE = "ontology-editor"
GOOD, NEXT, BROKEN = "0123abc", "4567def", "89abcde"
AT = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)


class DeploymentController:
    def __init__(self, kube_api: KubeApiServer, api_client: k8s_client.ApiClient, namespace: str = NAMESPACE) -> None:
        self.kube_api = kube_api
        self.namespace = namespace
        self.apps = k8s_client.AppsV1Api(api_client)
        self.api_client = api_client
        self.deadline: set[str] = set()
        self.stuck: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DeploymentController:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for deployment in self._items(self.apps.list_namespaced_deployment(self.namespace)):
                if (deployment.get("status") or {}).get("observedGeneration") != deployment["metadata"]["generation"]:
                    self._reconcile(deployment)

    def _items(self, listing: Any) -> list[dict[str, Any]]:
        return [self.api_client.sanitize_for_serialization(item) for item in listing.items]

    def _reconcile(self, deployment: dict[str, Any]) -> None:
        meta = deployment["metadata"]
        template = deployment["spec"]["template"]
        template_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        owned = [
            rs for rs in self._items(self.apps.list_namespaced_replica_set(self.namespace))
            if any(o["uid"] == meta["uid"] for o in rs["metadata"].get("ownerReferences") or [])
        ]
        revision = str(1 + max((int(rs["metadata"]["annotations"][REVISION_ANNOTATION]) for rs in owned), default=0))
        labels = {**template["metadata"]["labels"], POD_TEMPLATE_HASH: template_hash}
        self.kube_api.put_object({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{meta['name']}-{template_hash}",
                "namespace": self.namespace,
                "labels": labels,
                "annotations": {REVISION_ANNOTATION: revision},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {**deployment["spec"]["selector"]["matchLabels"],
                                             POD_TEMPLATE_HASH: template_hash}},
                "template": {**template, "metadata": {**template["metadata"], "labels": labels}},
            },
        })
        live = self.kube_api.get_object("apps/v1", "deployments", meta["name"], self.namespace)
        assert live is not None
        live["metadata"].setdefault("annotations", {})[REVISION_ANNOTATION] = revision
        self.kube_api.put_object(live)
        self.kube_api.set_status("apps/v1", "deployments", meta["name"], self.namespace,
                                 self._status(deployment, f"{meta['name']}-{template_hash}"))

    def _status(self, deployment: dict[str, Any], replicaset: str) -> dict[str, Any]:
        tag = image_reference(deployment["spec"]["template"]["spec"]["containers"][0]["image"])
        generation = deployment["metadata"]["generation"]
        if tag in self.deadline or tag in self.stuck:
            progressing = (
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                 "message": f'ReplicaSet "{replicaset}" has timed out progressing.'}
                if tag in self.deadline else
                {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                 "message": f'ReplicaSet "{replicaset}" is progressing.'}
            )
            return {"observedGeneration": generation, "replicas": 2, "updatedReplicas": 1,
                    "readyReplicas": 1, "availableReplicas": 1, "unavailableReplicas": 1,
                    "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                                   progressing]}
        return {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1,
                "availableReplicas": 1,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                               {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                                "message": f'ReplicaSet "{replicaset}" has successfully progressed.'}]}


@pytest.fixture
def kube(kube_api_client: k8s_client.ApiClient) -> KubernetesClient:
    return KubernetesClient(kube_api_client, request_timeout=5)


@pytest.fixture
def controller(kube_api: KubeApiServer, kube_api_client: k8s_client.ApiClient) -> Iterator[DeploymentController]:
    with DeploymentController(kube_api, kube_api_client) as running:
        yield running


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


def deployment(kube_api: KubeApiServer, name: str) -> dict[str, Any] | None:
    return kube_api.get_object("apps/v1", "deployments", name, NAMESPACE)


def image_reference(image: str) -> str:
    """The digest of ``repo@sha256:...``, or the tag of ``repo:tag``."""
    return image.rsplit("@", 1)[1] if "@" in image else image.rsplit(":", 1)[1]


def image_ref(obj: dict[str, Any] | None) -> str:
    """What the Deployment runs: the digest it is pinned by (the tag when it is not)."""
    assert obj is not None
    return image_reference(obj["spec"]["template"]["spec"]["containers"][0]["image"])


def digest_of(tag: str) -> str:
    """A digest for ``tag`` in the tests that need no ECR."""
    return "sha256:" + hashlib.sha256(tag.encode()).hexdigest()


def writes(kube_api: KubeApiServer) -> list[str]:
    return [f"{r.method} {r.path}" for r in kube_api.requests if r.method not in ("GET", "HEAD")]


def run(kube: KubernetesClient, service: Service, tag: str, *, timeout: float = 5.0, **options: Any) -> Any:
    return release(kube, service, "dev", tag, digest_of(tag), namespace=NAMESPACE, registry=REGISTRY,
                   wait_timeout=timeout, clock=lambda: AT, **options)


def test_release_creates_then_updates_the_service(kube: KubernetesClient, kube_api: KubeApiServer,
                                                   controller: DeploymentController) -> None:
    first = run(kube, FRONTEND, GOOD)
    assert first.revision == "1"
    assert first.image == f"123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/onto-frontend-dev@{digest_of(GOOD)}"
    assert (first.digest, first.released_at) == (digest_of(GOOD), AT)
    assert first.rollout == "1/1 replicas available"
    assert "Namespace ontology-editor" in first.created
    assert f"Deployment {NAMESPACE}/onto-frontend" in first.created
    assert first.changed == [] and first.unchanged == []
    assert not any("onto-backend" in ref for ref in first.created), "the other service is left alone"
    assert deployment(kube_api, "onto-backend") is None

    second = run(kube, FRONTEND, NEXT)
    assert second.revision == "2"
    assert second.created == []
    assert second.changed == [f"Deployment {NAMESPACE}/onto-frontend"]
    assert f"Service {NAMESPACE}/onto-frontend" in second.unchanged
    assert image_ref(deployment(kube_api, "onto-frontend")) == digest_of(NEXT)
    applies = [r for r in kube_api.requests if r.content_type == "application/apply-patch+yaml"]
    assert applies and all(r.query.get("fieldManager") == "ops-platform" for r in applies)


def test_release_of_one_service_keeps_the_other_running(kube: KubernetesClient, kube_api: KubeApiServer,
                                                         controller: DeploymentController) -> None:
    kube_api.put_object(yaml.safe_load((CRD_SCHEMA_DIR / "external-secrets.io" / "externalsecret.yaml").read_text()))
    run(kube, FRONTEND, GOOD)
    frontend_before = deployment(kube_api, "onto-frontend")

    result = run(kube, BACKEND, NEXT)

    assert result.revision == "1"
    assert image_ref(deployment(kube_api, "onto-backend")) == digest_of(NEXT)
    assert f"ExternalSecret {NAMESPACE}/onto-backend" in result.created
    assert deployment(kube_api, "onto-frontend") == frontend_before
    assert "Namespace ontology-editor" in result.unchanged


def test_rollout_past_its_deadline_rolls_back_to_the_previous_replicaset(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    run(kube, FRONTEND, GOOD)
    controller.deadline.add(digest_of(BROKEN))

    with pytest.raises(ReleaseFailed) as failure:
        run(kube, FRONTEND, BROKEN)

    message = str(failure.value)
    assert "ProgressDeadlineExceeded" in message and "has timed out progressing" in message
    assert message.startswith("rollout failed: ProgressDeadlineExceeded"), "the caller names the release"
    rollback = failure.value.rollback
    assert rollback is not None and rollback.revision == "1" and rollback.action == "changed"
    assert rollback.replicaset is not None and rollback.replicaset.startswith("onto-frontend-")
    assert f"rolled back to revision 1 (ReplicaSet {rollback.replicaset})" in message
    live = deployment(kube_api, "onto-frontend")
    assert image_ref(live) == digest_of(GOOD)
    assert POD_TEMPLATE_HASH not in live["spec"]["template"]["metadata"]["labels"]
    previous = kube_api.get_object("apps/v1", "replicasets", rollback.replicaset, NAMESPACE)
    assert previous is not None
    expected = previous["spec"]["template"]
    expected["metadata"]["labels"].pop(POD_TEMPLATE_HASH)
    assert live["spec"]["template"] == expected


def test_rollout_that_stays_unavailable_times_out_and_rolls_back(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    run(kube, FRONTEND, GOOD)
    controller.stuck.add(digest_of(BROKEN))

    with pytest.raises(ReleaseFailed) as failure:
        run(kube, FRONTEND, BROKEN, timeout=1)

    assert "not available after 1 s" in failure.value.reason
    assert "1 unavailable" in failure.value.reason
    assert "is progressing" in failure.value.reason, "the last condition's message is reported"
    assert failure.value.rollback is not None and failure.value.rollback.revision == "1"
    assert image_ref(deployment(kube_api, "onto-frontend")) == digest_of(GOOD)


def test_first_release_that_fails_has_nothing_to_roll_back(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    controller.deadline.add(digest_of(BROKEN))
    with pytest.raises(ReleaseFailed) as failure:
        run(kube, FRONTEND, BROKEN)
    assert failure.value.rollback is None
    assert "nothing to roll back to" in str(failure.value)


@pytest.mark.parametrize("tag, expected", [("latest", "moving tag"), ("v1.2.3", "does not match"),
                                           ("0123ABC", "does not match"), ("", "does not match")])
def test_release_refuses_unpinned_tags_before_applying_anything(
    kube: KubernetesClient, kube_api: KubeApiServer, tag: str, expected: str
) -> None:
    with pytest.raises(InvalidTag, match=expected):
        run(kube, FRONTEND, tag)
    assert writes(kube_api) == []


def test_release_refuses_an_environment_the_service_does_not_have(kube: KubernetesClient,
                                                                   kube_api: KubeApiServer) -> None:
    with pytest.raises(ReleaseError, match="environment 'qa'"):
        release(kube, FRONTEND, "qa", GOOD, digest_of(GOOD), namespace=NAMESPACE, registry=REGISTRY, wait_timeout=1)
    assert writes(kube_api) == []


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
    kube: KubernetesClient, kube_api: KubeApiServer, kube_api_client: k8s_client.ApiClient
) -> None:
    namespaces = {"dev": "ontology-editor-dev", "prod": "ontology-editor-prod"}
    with DeploymentController(kube_api, kube_api_client, namespaces["dev"]), \
            DeploymentController(kube_api, kube_api_client, namespaces["prod"]):
        release(kube, FRONTEND, "prod", GOOD, digest_of(GOOD), namespace=namespaces["prod"], registry=REGISTRY,
                wait_timeout=5)
        prod_before = kube_api.get_object("apps/v1", "deployments", "onto-frontend", namespaces["prod"])

        result = release(kube, FRONTEND, "dev", NEXT, digest_of(NEXT), namespace=namespaces["dev"],
                         registry=REGISTRY, wait_timeout=5)

    assert f"Deployment {namespaces['dev']}/onto-frontend" in result.created
    assert all(namespaces["prod"] not in ref for ref in result.created + result.changed + result.unchanged)
    dev = kube_api.get_object("apps/v1", "deployments", "onto-frontend", namespaces["dev"])
    assert image_ref(dev) == digest_of(NEXT)
    prod = kube_api.get_object("apps/v1", "deployments", "onto-frontend", namespaces["prod"])
    assert prod == prod_before and image_ref(prod) == digest_of(GOOD), "the dev release changed prod"
    assert kube_api.get_object("apps/v1", "deployments", "onto-frontend", NAMESPACE) is None
    assert kube_api.get_object("v1", "namespaces", namespaces["dev"])["metadata"]["labels"]["env"] == "dev"


def stray(kind: str, namespace: str | None, api_version: str = "v1") -> dict[str, Any]:
    metadata = {"name": "onto-frontend-extra", "labels": {"app.kubernetes.io/name": "onto-frontend"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


@pytest.mark.parametrize("extra, shown", [
    (stray("ConfigMap", "ontology-editor-prod"), "ConfigMap ontology-editor-prod/onto-frontend-extra "
                                                 "(ontology-editor-prod)"),
    (stray("ConfigMap", None), "ConfigMap onto-frontend-extra (no namespace: the client's default)"),
    (stray("ClusterRole", NAMESPACE, "rbac.authorization.k8s.io/v1"),
     f"ClusterRole {NAMESPACE}/onto-frontend-extra (cluster-wide)"),
    (stray("Namespace", None), "Namespace onto-frontend-extra (another namespace)"),
])
def test_an_object_rendered_outside_the_environments_namespace_is_refused_before_anything_is_applied(
    kube: KubernetesClient, kube_api: KubeApiServer, extra: dict[str, Any], shown: str
) -> None:
    def render_with_extra(environment: str, values: dict[str, Any], chart_dir: str) -> list[dict[str, Any]]:
        return [*render_chart(environment, values, chart_dir=chart_dir), extra]

    with pytest.raises(OutsideEnvironment) as refused:
        run(kube, FRONTEND, GOOD, render=render_with_extra)

    message = str(refused.value)
    assert message.startswith(f"refused: the chart renders 1 object(s) outside namespace '{NAMESPACE}' of dev: ")
    assert shown in message and message.endswith("nothing applied")
    assert writes(kube_api) == []


def test_a_chart_that_ignores_the_environments_namespace_is_refused(kube: KubernetesClient,
                                                                    kube_api: KubeApiServer) -> None:
    def render_ignoring_namespace(environment: str, values: dict[str, Any], chart_dir: str) -> list[dict[str, Any]]:
        return render_chart(environment, {**values, "namespace": {"name": NAMESPACE}}, chart_dir=chart_dir)

    with pytest.raises(OutsideEnvironment, match=r"outside namespace 'ontology-editor-dev' of dev: "
                                                 r"Namespace ontology-editor \(another namespace\); "
                                                 r"NetworkPolicy ontology-editor/default-deny"):
        release(kube, FRONTEND, "dev", GOOD, digest_of(GOOD), namespace="ontology-editor-dev", registry=REGISTRY,
                render=render_ignoring_namespace, wait_timeout=1)
    assert writes(kube_api) == []


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
