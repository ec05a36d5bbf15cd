"""The ECR registry the release sensor watches for new image tags."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import dagster as dg
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import Field

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError
from ops_platform.resources.object_store import CREDENTIALS_SETTING, ENDPOINT_SETTING, aws_client, aws_errors

TAG_STATUSES = ("TAGGED", "UNTAGGED", "ANY")
THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)
REGISTRY_SETTING = "images.registry.account in infra/platform.yaml"
# ECR's largest page for DescribeImages and ListImages, and its most imageIds per DescribeImages.
MAX_PAGE_SIZE = 1000
MAX_IMAGE_IDS = 100

_T = TypeVar("_T")


class EcrError(OpsPlatformError):
    """ECR refused or failed a request."""


class RepositoryNotFound(EcrError):
    def __init__(self, repository: str, registry: str) -> None:
        self.repository = repository
        self.registry = registry
        super().__init__(
            f"ecr: repository '{repository}' does not exist in registry {registry} "
            f"(check the service's repository and {REGISTRY_SETTING})"
        )


class EcrThrottledError(EcrError):
    """ECR kept throttling a request after every retry."""


class ImageNotFound(EcrError):
    """An image asked for by digest is not (or no longer) in the repository."""


@dataclass(frozen=True)
class Repository:
    name: str
    uri: str
    registry_id: str
    created_at: datetime | None


@dataclass(frozen=True)
class ImageInfo:
    repository: str
    digest: str
    tags: tuple[str, ...]
    pushed_at: datetime
    size_bytes: int | None


class EcrRegistry:
    """Repositories and images of one registry (an AWS account in a region).

    Listings ask for ``page_size`` entries a page (ECR's maximum unless told;
    None leaves ECR's default of 100). Every request that ECR throttles is retried ``max_attempts`` times in all,
    waiting ``base_delay`` seconds, then twice as long each time up to
    ``max_delay``; ``sleep`` is the clock to wait with. Listings resume from
    the page that was throttled.
    """

    def __init__(
        self,
        client: Any,
        registry_id: str | None = None,
        *,
        page_size: int | None = MAX_PAGE_SIZE,
        max_attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.client = client
        self.registry_id = registry_id or None
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep

    @property
    def registry(self) -> str:
        """The registry as people name it in messages."""
        account = self.registry_id or "of the credentials' account"
        return f"{account} ({self.client.meta.region_name})"

    def list_repositories(self, prefix: str | None = None) -> Iterator[Repository]:
        """Repositories whose name starts with ``prefix`` (all when None)."""
        for page in self._pages("describe_repositories", None, **self._registry_param()):
            for entry in page.get("repositories", []):
                if prefix and not entry["repositoryName"].startswith(prefix):
                    continue
                yield Repository(
                    name=entry["repositoryName"],
                    uri=entry["repositoryUri"],
                    registry_id=entry["registryId"],
                    created_at=entry.get("createdAt"),
                )

    def list_images(
        self,
        repository: str,
        *,
        tag_status: str = "TAGGED",
        pushed_since: datetime | None = None,
    ) -> Iterator[ImageInfo]:
        """Images of ``repository``, those pushed at or after ``pushed_since`` when given.

        ``tag_status`` is TAGGED, UNTAGGED or ANY. ECR's push times have a
        one-second resolution, so a caller keeping a cursor should ask again
        from the last push time it saw and drop the digests it already knows.
        """
        if pushed_since is not None and pushed_since.tzinfo is None:
            raise ValueError("pushed_since must be timezone-aware (e.g. datetime.now(timezone.utc))")
        for page in self._image_pages("describe_images", repository, tag_status):
            for detail in page.get("imageDetails", []):
                image = _image_info(repository, detail)
                # Checked here as well: not every ECR-compatible endpoint applies the filter.
                if not _has_tag_status(bool(image.tags), tag_status):
                    continue
                if pushed_since is not None and image.pushed_at < pushed_since:
                    continue
                yield image

    def list_image_digests(self, repository: str, *, tag_status: str = "TAGGED") -> set[str]:
        """Digests of the images in ``repository`` (ListImages: no push times, far less to read)."""
        return {
            image_id["imageDigest"]
            for page in self._image_pages("list_images", repository, tag_status)
            # ListImages gives one entry per tag; an untagged image's entry has no imageTag.
            for image_id in page.get("imageIds", [])
            if _has_tag_status(bool(image_id.get("imageTag")), tag_status)
        }

    def describe_images(self, repository: str, digests: Iterable[str]) -> list[ImageInfo]:
        """The images of ``repository`` with these digests, asked for 100 at a time.

        Raises :class:`ImageNotFound` when one of them is no longer there.
        """
        wanted = sorted(set(digests))
        images: list[ImageInfo] = []
        for start in range(0, len(wanted), MAX_IMAGE_IDS):
            image_ids = [{"imageDigest": digest} for digest in wanted[start : start + MAX_IMAGE_IDS]]
            response = self._retrying(
                "describe_images",
                repository,
                lambda ids=image_ids: self.client.describe_images(  # type: ignore[misc]
                    repositoryName=repository, imageIds=ids, **self._registry_param()
                ),
            )
            images.extend(_image_info(repository, detail) for detail in response.get("imageDetails", []))
        return images

    def repository_exists(self, name: str) -> bool:
        try:
            self._retrying(
                "describe_repositories",
                name,
                lambda: self.client.describe_repositories(repositoryNames=[name], **self._registry_param()),
            )
        except RepositoryNotFound:
            return False
        return True

    def _image_pages(self, operation: str, repository: str, tag_status: str) -> Iterator[dict[str, Any]]:
        if tag_status not in TAG_STATUSES:
            raise ValueError(f"tag_status must be one of {TAG_STATUSES}, not {tag_status!r}")
        return self._pages(
            operation, repository, repositoryName=repository, filter={"tagStatus": tag_status},
            **self._registry_param(),
        )

    def _registry_param(self) -> dict[str, str]:
        return {"registryId": self.registry_id} if self.registry_id else {}

    def _pages(self, operation: str, repository: str | None, **params: Any) -> Iterator[dict[str, Any]]:
        """Pages of a listing, each fetched (and retried) on its own.

        Each page starts a paginator at the previous page's token, so a
        throttled page is asked again rather than the whole listing.
        """
        starting_token: str | None = None
        while True:
            page = self._retrying(operation, repository, lambda: self._page(operation, params, starting_token))
            yield page
            next_token = page.get("nextToken")
            if not next_token:
                return
            from botocore.paginate import TokenEncoder

            starting_token = TokenEncoder().encode({"nextToken": next_token})

    def _page(self, operation: str, params: dict[str, Any], starting_token: str | None) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.page_size:
            config["PageSize"] = self.page_size
        if starting_token:
            config["StartingToken"] = starting_token
        pages = self.client.get_paginator(operation).paginate(**params, PaginationConfig=config)
        return next(iter(pages))

    def _retrying(self, operation: str, repository: str | None, request: Callable[[], _T]) -> _T:
        waited = 0.0
        for attempt in range(1, self.max_attempts + 1):
            try:
                return request()
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code not in THROTTLING_CODES:
                    raise self._translate(error, operation, repository) from error
                if attempt == self.max_attempts:
                    raise EcrThrottledError(
                        f"ecr: {operation} on registry {self.registry} was throttled ({code}) "
                        f"{attempt} times over {waited:.1f} s; try again later or lower the polling rate"
                    ) from error
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                self.sleep(delay)
                waited += delay
            except aws_errors() as error:
                raise self._translate(error, operation, repository) from error
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _translate(self, error: Exception, operation: str, repository: str | None) -> OpsPlatformError:
        endpoint = str(self.client.meta.endpoint_url)
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return MissingSettingError(CREDENTIALS_SETTING, f"ECR registry {self.registry}")
        if isinstance(error, (BotoConnectionError, HTTPClientError)):
            return ServerUnreachableError(
                "ecr", endpoint, f"{ENDPOINT_SETTING} / AWS_REGION", f"cannot connect ({type(error).__name__})"
            )
        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            message = error.response.get("Error", {}).get("Message", "")
            if code == "RepositoryNotFoundException" and repository is not None:
                return RepositoryNotFound(repository, self.registry)
            if code == "ImageNotFoundException":
                return ImageNotFound(f"ecr: {operation} in repository '{repository}': {message}")
            return EcrError(f"ecr: {operation} on registry {self.registry} failed at {endpoint}: {code}: {message}")
        return EcrError(
            f"ecr: {operation} failed: {endpoint} did not answer like ECR ({error}) (check {ENDPOINT_SETTING})"
        )


def _image_info(repository: str, detail: dict[str, Any]) -> ImageInfo:
    return ImageInfo(
        repository=repository,
        digest=detail["imageDigest"],
        tags=tuple(detail.get("imageTags") or ()),
        pushed_at=detail["imagePushedAt"].astimezone(timezone.utc),
        size_bytes=detail.get("imageSizeInBytes"),
    )


def _has_tag_status(tagged: bool, tag_status: str) -> bool:
    return tag_status == "ANY" or tagged == (tag_status == "TAGGED")


class EcrResource(dg.ConfigurableResource):
    """The ECR registry that holds the platform's service images."""

    region: str | None = Field(default=None, description="AWS region of the registry; unset uses AWS_REGION.")
    registry_id: str | None = Field(
        default=None,
        description="AWS account id that owns the registry (images.registry.account); unset: the credentials' account.",
    )
    endpoint_url: str | None = Field(
        default=None, description=f"ECR endpoint; unset uses boto3's default ({ENDPOINT_SETTING} or AWS itself)."
    )
    connect_timeout_seconds: float = Field(
        default=5.0, description="How long to wait for the ECR endpoint to accept a connection."
    )

    def get_registry(self) -> EcrRegistry:
        registry = self.registry_id or "of the credentials' account"
        client = aws_client(
            "ecr",
            region=self.region,
            endpoint_url=self.endpoint_url,
            needed_for=f"ECR registry {registry}",
            connect_timeout=self.connect_timeout_seconds,
        )
        return EcrRegistry(client, self.registry_id)
