"""Releases against the fake Kubernetes API over HTTP and moto's ECR.

The fake API server has no controllers, so :class:`DeploymentController`
plays the Deployment controller from a thread, through the API as the real
one does: for each new generation it creates (or, on a rollback, re-adopts)
the ReplicaSet of the pod template with an owner reference, a
``pod-template-hash`` label and the revision annotation, sets the revision
annotation on the Deployment, then writes the status. Images whose tag is in
``deadline`` never become available and hit ProgressDeadlineExceeded; tags
in ``stuck`` stay unavailable without a deadline condition.
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

from ops_platform.manifests import CRD_SCHEMA_DIR
from ops_platform.releases import (
    POD_TEMPLATE_HASH,
    REVISION_ANNOTATION,
    DigestChanged,
    ImageNotFound,
    InvalidTag,
    NotPassedStaging,
    ReleaseError,
    ReleaseFailed,
    check_digest,
    passed_staging,
    release,
    require_passed_staging,
    resolve_image,
    rollout_state,
)
from ops_platform.resources.ecr import EcrRegistry, RepositoryNotFound
from ops_platform.resources.kubernetes import KubernetesClient
from ops_platform.spec import Service, load_spec
from tests.fakes.kube_api import KubeApiServer

SERVICES = {service.name: service for service in load_spec().images.services}
FRONTEND, BACKEND = SERVICES["onto-frontend"], SERVICES["onto-backend"]
NAMESPACE = "ontology-editor"
GOOD, NEXT, BROKEN = "0123abc", "4567def", "89abcde"
AT = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)


class DeploymentController:
    def __init__(self, kube_api: KubeApiServer, api_client: k8s_client.ApiClient) -> None:
        self.kube_api = kube_api
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
            for deployment in self._items(self.apps.list_namespaced_deployment(NAMESPACE)):
                if (deployment.get("status") or {}).get("observedGeneration") != deployment["metadata"]["generation"]:
                    self._reconcile(deployment)

    def _items(self, listing: Any) -> list[dict[str, Any]]:
        return [self.api_client.sanitize_for_serialization(item) for item in listing.items]

    def _reconcile(self, deployment: dict[str, Any]) -> None:
        meta = deployment["metadata"]
        template = deployment["spec"]["template"]
        template_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        owned = [
            rs for rs in self._items(self.apps.list_namespaced_replica_set(NAMESPACE))
            if any(o["uid"] == meta["uid"] for o in rs["metadata"].get("ownerReferences") or [])
        ]
        revision = str(1 + max((int(rs["metadata"]["annotations"][REVISION_ANNOTATION]) for rs in owned), default=0))
        labels = {**template["metadata"]["labels"], POD_TEMPLATE_HASH: template_hash}
        self.kube_api.put_object({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{meta['name']}-{template_hash}",
                "namespace": NAMESPACE,
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
        live = self.kube_api.get_object("apps/v1", "deployments", meta["name"], NAMESPACE)
        assert live is not None
        live["metadata"].setdefault("annotations", {})[REVISION_ANNOTATION] = revision
        self.kube_api.put_object(live)
        self.kube_api.set_status("apps/v1", "deployments", meta["name"], NAMESPACE,
                                 self._status(deployment, f"{meta['name']}-{template_hash}"))

    def _status(self, deployment: dict[str, Any], replicaset: str) -> dict[str, Any]:
        tag = deployment["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]
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


def image_tag(obj: dict[str, Any] | None) -> str:
    assert obj is not None
    return obj["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]


def writes(kube_api: KubeApiServer) -> list[str]:
    return [f"{r.method} {r.path}" for r in kube_api.requests if r.method not in ("GET", "HEAD")]


def run(kube: KubernetesClient, service: Service, tag: str, *, timeout: float = 5.0) -> Any:
    return release(kube, service, "dev", tag, f"sha256:{tag}", wait_timeout=timeout, clock=lambda: AT)


def test_release_creates_then_updates_the_service(kube: KubernetesClient, kube_api: KubeApiServer,
                                                   controller: DeploymentController) -> None:
    first = run(kube, FRONTEND, GOOD)
    assert first.revision == "1"
    assert first.image == f"123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/onto-frontend-dev:{GOOD}"
    assert (first.digest, first.released_at) == (f"sha256:{GOOD}", AT)
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
    assert image_tag(deployment(kube_api, "onto-frontend")) == NEXT
    applies = [r for r in kube_api.requests if r.content_type == "application/apply-patch+yaml"]
    assert applies and all(r.query.get("fieldManager") == "ops-platform" for r in applies)


def test_release_of_one_service_keeps_the_other_running(kube: KubernetesClient, kube_api: KubeApiServer,
                                                         controller: DeploymentController) -> None:
    kube_api.put_object(yaml.safe_load((CRD_SCHEMA_DIR / "external-secrets.io" / "externalsecret.yaml").read_text()))
    run(kube, FRONTEND, GOOD)
    frontend_before = deployment(kube_api, "onto-frontend")

    result = run(kube, BACKEND, NEXT)

    assert result.revision == "1"
    assert image_tag(deployment(kube_api, "onto-backend")) == NEXT
    assert f"ExternalSecret {NAMESPACE}/onto-backend" in result.created
    assert deployment(kube_api, "onto-frontend") == frontend_before
    assert "Namespace ontology-editor" in result.unchanged


def test_rollout_past_its_deadline_rolls_back_to_the_previous_replicaset(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    run(kube, FRONTEND, GOOD)
    controller.deadline.add(BROKEN)

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
    assert image_tag(live) == GOOD
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
    controller.stuck.add(BROKEN)

    with pytest.raises(ReleaseFailed) as failure:
        run(kube, FRONTEND, BROKEN, timeout=1)

    assert "not available after 1 s" in failure.value.reason
    assert "1 unavailable" in failure.value.reason
    assert "is progressing" in failure.value.reason, "the last condition's message is reported"
    assert failure.value.rollback is not None and failure.value.rollback.revision == "1"
    assert image_tag(deployment(kube_api, "onto-frontend")) == GOOD


def test_first_release_that_fails_has_nothing_to_roll_back(
    kube: KubernetesClient, kube_api: KubeApiServer, controller: DeploymentController
) -> None:
    controller.deadline.add(BROKEN)
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
        release(kube, FRONTEND, "qa", GOOD, "sha256:x", wait_timeout=1)
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
