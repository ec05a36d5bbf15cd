"""The ECR registry against moto's server over real HTTP.

moto's ECR answers every listing in one page and cannot throttle, so the
pagination and throttling tests put a botocore ``Stubber`` on a real boto3
client: it stands in for AWS's answers, not for any of our code.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.ecr import (
    EcrError,
    EcrRegistry,
    EcrResource,
    EcrThrottledError,
    ImageNotFound,
    RepositoryNotFound,
)

REGION = "ap-northeast-2"
MOTO_ACCOUNT = "123456789012"


@pytest.fixture
def ecr_client(aws_env: Any) -> Any:
    return boto3.client("ecr")


def push_image(client: Any, repository: str, tag: str | None, layer: str, config_size: int = 7023) -> str:
    """Push a manifest the way `docker push` ends: PutImage; returns the image digest."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config_size,
            "digest": "sha256:" + hashlib.sha256(f"config-{layer}".encode()).hexdigest(),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": 32654,
                "digest": "sha256:" + hashlib.sha256(layer.encode()).hexdigest(),
            }
        ],
    }
    arguments: dict[str, Any] = {"repositoryName": repository, "imageManifest": json.dumps(manifest)}
    if tag is not None:
        arguments["imageTag"] = tag
    return client.put_image(**arguments)["image"]["imageId"]["imageDigest"]


def test_lists_repositories_by_name_prefix(ecr_client: Any) -> None:
    for name in ("onto-backend", "onto-frontend", "grafana"):
        ecr_client.create_repository(repositoryName=name)
    registry = EcrResource(region=REGION).get_registry()

    everything = {repository.name for repository in registry.list_repositories()}
    onto = list(registry.list_repositories(prefix="onto-"))

    assert everything == {"onto-backend", "onto-frontend", "grafana"}
    assert sorted(repository.name for repository in onto) == ["onto-backend", "onto-frontend"]
    assert all(repository.uri.endswith(f"/{repository.name}") for repository in onto)
    assert all(repository.registry_id == MOTO_ACCOUNT for repository in onto)


def test_lists_images_with_digest_tags_push_time_and_size(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-backend")
    ecr_client.create_repository(repositoryName="onto-frontend")
    digests = [push_image(ecr_client, "onto-backend", f"{n:07x}", f"layer-{n}", config_size=1000 + n) for n in range(5)]
    push_image(ecr_client, "onto-backend", "latest", "layer-4", config_size=1004)  # same manifest, second tag
    untagged = push_image(ecr_client, "onto-backend", None, "layer-untagged")
    push_image(ecr_client, "onto-frontend", "abcdef0", "layer-frontend")
    registry = EcrRegistry(ecr_client, MOTO_ACCOUNT)
    before = datetime.now(timezone.utc) - timedelta(minutes=1)

    tagged = {image.digest: image for image in registry.list_images("onto-backend")}

    assert set(tagged) == set(digests)
    assert tagged[digests[0]].tags == ("0000000",)
    assert set(tagged[digests[4]].tags) == {"0000004", "latest"}
    assert tagged[digests[2]].size_bytes == 1002
    assert all(image.repository == "onto-backend" for image in tagged.values())
    assert all(before < image.pushed_at <= datetime.now(timezone.utc) for image in tagged.values())
    assert [image.digest for image in registry.list_images("onto-backend", tag_status="UNTAGGED")] == [untagged]
    assert len(list(registry.list_images("onto-backend", tag_status="ANY"))) == 6


def test_digest_listing_and_describing_by_digest_agree_with_the_full_listing(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-backend")
    tagged = [push_image(ecr_client, "onto-backend", f"{n:07x}", f"layer-{n}") for n in range(150)]
    push_image(ecr_client, "onto-backend", "latest", "layer-149")  # a second tag on one image
    untagged = push_image(ecr_client, "onto-backend", None, "layer-untagged")
    registry = EcrRegistry(ecr_client, MOTO_ACCOUNT)

    digests = registry.list_image_digests("onto-backend")
    described = registry.describe_images("onto-backend", tagged[::-1])  # 150 digests: two requests of <= 100

    assert digests == set(tagged)
    assert registry.list_image_digests("onto-backend", tag_status="UNTAGGED") == {untagged}
    assert registry.list_image_digests("onto-backend", tag_status="ANY") == {*tagged, untagged}
    full = {image.digest: image for image in registry.list_images("onto-backend")}
    assert {image.digest: image for image in described} == full
    assert registry.describe_images("onto-backend", []) == []


def test_describing_a_digest_that_is_gone_raises_image_not_found(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-backend")
    kept = push_image(ecr_client, "onto-backend", "0000001", "layer-1")
    gone = push_image(ecr_client, "onto-backend", "0000002", "layer-2")
    ecr_client.batch_delete_image(repositoryName="onto-backend", imageIds=[{"imageDigest": gone}])
    registry = EcrRegistry(ecr_client, MOTO_ACCOUNT)

    with pytest.raises(ImageNotFound, match="onto-backend"):
        registry.describe_images("onto-backend", [kept, gone])
    with pytest.raises(RepositoryNotFound, match="onto-backnd"):
        registry.list_image_digests("onto-backnd")


def test_pushed_since_keeps_the_images_pushed_at_or_after_it(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-backend")
    old = {push_image(ecr_client, "onto-backend", f"old{n}", f"old-{n}") for n in range(2)}
    time.sleep(1.1)  # ECR push times have one-second resolution
    new = {push_image(ecr_client, "onto-backend", f"new{n}", f"new-{n}") for n in range(2)}
    registry = EcrRegistry(ecr_client)
    pushed_at = {image.digest: image.pushed_at for image in registry.list_images("onto-backend")}
    cutoff = min(pushed_at[digest] for digest in new)

    since_cutoff = {image.digest for image in registry.list_images("onto-backend", pushed_since=cutoff)}

    assert since_cutoff == new
    assert not since_cutoff & old
    assert list(registry.list_images("onto-backend", pushed_since=cutoff + timedelta(seconds=5))) == []


def test_bad_listing_arguments_are_refused(ecr_client: Any) -> None:
    registry = EcrRegistry(ecr_client)

    with pytest.raises(ValueError, match="timezone"):
        list(registry.list_images("onto-backend", pushed_since=datetime(2024, 5, 1)))
    with pytest.raises(ValueError, match="tag_status"):
        list(registry.list_images("onto-backend", tag_status="tagged"))


def test_missing_repository_names_the_repository_and_registry(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-backend")
    registry = EcrRegistry(ecr_client, MOTO_ACCOUNT)

    with pytest.raises(RepositoryNotFound) as failure:
        list(registry.list_images("onto-backnd"))

    assert "onto-backnd" in str(failure.value) and MOTO_ACCOUNT in str(failure.value)
    assert registry.repository_exists("onto-backend")
    assert not registry.repository_exists("onto-backnd")


def test_endpoint_down_fails_fast_naming_endpoint_and_setting(aws_env: Any) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    registry = EcrResource(region=REGION, endpoint_url=endpoint).get_registry()
    started = time.monotonic()

    with pytest.raises(ServerUnreachableError) as failure:
        list(registry.list_repositories())

    assert time.monotonic() - started < 5
    assert endpoint in str(failure.value) and "AWS_ENDPOINT_URL" in str(failure.value)


def test_no_credentials_is_reported_before_any_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(MissingSettingError) as failure:
        EcrResource(region=REGION, registry_id=MOTO_ACCOUNT).get_registry()

    assert "AWS_ACCESS_KEY_ID" in str(failure.value) and "AWS_PROFILE" in str(failure.value)


def test_unknown_profile_is_named(aws_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "ops-prod")

    with pytest.raises(OpsPlatformError, match="ops-prod.*AWS_PROFILE"):
        EcrResource(region=REGION).get_registry()


@pytest.fixture
def stubbed_client() -> Any:
    client = boto3.client(
        "ecr", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def image_detail(tag: str, pushed_at: datetime) -> dict[str, Any]:
    return {
        "registryId": MOTO_ACCOUNT,
        "repositoryName": "onto-backend",
        "imageDigest": "sha256:" + hashlib.sha256(tag.encode()).hexdigest(),
        "imageTags": [tag],
        "imagePushedAt": pushed_at,
        "imageSizeInBytes": 1024,
    }


def describe_params(next_token: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "repositoryName": "onto-backend",
        "filter": {"tagStatus": "TAGGED"},
        "registryId": MOTO_ACCOUNT,
        "maxResults": 2,
    }
    if next_token:
        params["nextToken"] = next_token
    return params


def test_throttled_page_is_retried_with_backoff_and_the_listing_resumes(stubbed_client: Any) -> None:
    client, stubber = stubbed_client
    pushed = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    stubber.add_response(
        "describe_images",
        {"imageDetails": [image_detail("a", pushed), image_detail("b", pushed)], "nextToken": "page-2"},
        describe_params(),
    )
    stubber.add_client_error("describe_images", "ThrottlingException", "Rate exceeded", 400, describe_params("page-2"))
    stubber.add_client_error("describe_images", "ThrottlingException", "Rate exceeded", 400, describe_params("page-2"))
    stubber.add_response(
        "describe_images",
        {"imageDetails": [image_detail("c", pushed + timedelta(hours=1))]},
        describe_params("page-2"),
    )
    sleeps: list[float] = []
    registry = EcrRegistry(client, MOTO_ACCOUNT, page_size=2, sleep=sleeps.append)

    images = list(registry.list_images("onto-backend"))

    assert [image.tags for image in images] == [("a",), ("b",), ("c",)]
    assert sleeps == [0.5, 1.0]


def test_throttling_that_does_not_stop_gives_a_clear_error(stubbed_client: Any) -> None:
    client, stubber = stubbed_client
    for _ in range(3):
        stubber.add_client_error("describe_repositories", "ThrottlingException", "Rate exceeded", 400)
    sleeps: list[float] = []
    registry = EcrRegistry(client, max_attempts=3, base_delay=1.0, max_delay=1.5, sleep=sleeps.append)

    with pytest.raises(EcrThrottledError, match="throttled.*3 times"):
        list(registry.list_repositories())

    assert sleeps == [1.0, 1.5]


def test_other_errors_are_not_retried(stubbed_client: Any) -> None:
    client, stubber = stubbed_client
    stubber.add_client_error("describe_repositories", "AccessDeniedException", "not authorized", 400)
    sleeps: list[float] = []
    registry = EcrRegistry(client, MOTO_ACCOUNT, sleep=sleeps.append)

    with pytest.raises(EcrError, match="AccessDeniedException"):
        list(registry.list_repositories())

    assert sleeps == []
