"""New image tags in ECR, turned into release requests of ``apps/<service>/<env>``.

The cursor keeps, per repository, the newest ``imagePushedAt`` seen and the
digests seen at exactly that time: ECR's push times have a one-second
resolution, so the next scan asks again from that second and drops the digests
it knows. Once that second is older than ``settle_seconds``, no image can still
arrive in it and the digests are dropped too: a repository's entry stays a
timestamp and the digests of at most one second of pushes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from ops_platform.resources.ecr import EcrRegistry, EcrThrottledError, ImageInfo, RepositoryNotFound
from ops_platform.spec import Service

NEVER_FOLLOWED_TAGS = frozenset({"latest"})
SETTLE_SECONDS = 60.0
# 64 bits of a sha256 digest tell apart the images pushed within one second.
_DIGEST_KEY_CHARS = 16


@dataclass(frozen=True)
class ReleaseRequest:
    service: str
    environment: str
    repository: str
    tag: str
    digest: str
    pushed_at: datetime

    @property
    def run_key(self) -> str:
        """One run per image: a tag pushed again with the same digest does not deploy twice."""
        return f"{self.repository}@{self.digest}"


@dataclass(frozen=True)
class RepositoryMark:
    """How far one repository has been read: every image pushed before ``pushed_at``,
    and at ``pushed_at`` those whose digest key is in ``digests`` (all of them when settled)."""

    pushed_at: datetime
    digests: frozenset[str] = frozenset()

    def has_seen(self, image: ImageInfo) -> bool:
        if image.pushed_at != self.pushed_at:
            return image.pushed_at < self.pushed_at
        return not self.digests or digest_key(image.digest) in self.digests


@dataclass
class TagScan:
    requests: list[ReleaseRequest] = field(default_factory=list)
    cursor: dict[str, RepositoryMark] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


def digest_key(digest: str) -> str:
    return digest.removeprefix("sha256:")[:_DIGEST_KEY_CHARS]


def scan_image_tags(
    registry: EcrRegistry,
    services: Iterable[Service],
    environments_of: Callable[[Service], Iterable[str]],
    cursor: Mapping[str, RepositoryMark] | None,
    *,
    now: datetime,
    settle_seconds: float = SETTLE_SECONDS,
) -> TagScan:
    """Release requests for the images pushed since ``cursor``, oldest first, and the new cursor.

    ``environments_of(service)`` names the environments to watch (usually
    ``service.environments``). A repository that is missing, empty or
    throttled is logged and keeps its cursor entry; the others proceed.
    """
    scan = TagScan(cursor=dict(cursor or {}))
    settled_before = now - timedelta(seconds=settle_seconds)
    for service in services:
        tag_pattern = re.compile(service.tag_pattern)
        for environment in environments_of(service):
            repository = service.repository(environment)
            mark = scan.cursor.get(repository)
            images = _read_new_images(registry, repository, mark, scan.log)
            if images is None:
                continue
            unreleased = 0
            for image in images:
                tag = _release_tag(image, tag_pattern)
                if tag is None:
                    unreleased += 1
                    continue
                scan.requests.append(
                    ReleaseRequest(service.name, environment, repository, tag, image.digest, image.pushed_at)
                )
            if unreleased:
                scan.log.append(
                    f"{repository}: {unreleased} new image(s) without a tag matching {service.tag_pattern} "
                    "(or tagged only 'latest'); not released"
                )
            new_mark = _advance(mark, images, settled_before)
            if new_mark is not None:
                scan.cursor[repository] = new_mark
    scan.requests.sort(key=lambda request: (request.pushed_at, request.repository, request.digest))
    return scan


def _read_new_images(
    registry: EcrRegistry, repository: str, mark: RepositoryMark | None, log: list[str]
) -> list[ImageInfo] | None:
    """The images of ``repository`` not yet seen; None when it could not be read to the end."""
    since = mark.pushed_at if mark else None
    try:
        images = list(registry.list_images(repository, pushed_since=since))
    except RepositoryNotFound:
        log.append(f"{repository}: repository does not exist in registry {registry.registry}; skipped")
        return None
    except EcrThrottledError as throttled:
        log.append(f"{repository}: {throttled}; cursor kept, read again next tick")
        return None
    if not images and mark is None:
        log.append(f"{repository}: no tagged image yet")
    return [image for image in images if mark is None or not mark.has_seen(image)]


def _release_tag(image: ImageInfo, tag_pattern: re.Pattern[str]) -> str | None:
    """The tag to deploy the image as: the first (sorted) that the pattern matches; never ``latest``."""
    matching = sorted(
        tag for tag in image.tags if tag not in NEVER_FOLLOWED_TAGS and tag_pattern.search(tag)
    )
    return matching[0] if matching else None


def _advance(
    mark: RepositoryMark | None, new_images: list[ImageInfo], settled_before: datetime
) -> RepositoryMark | None:
    newest = max((image.pushed_at for image in new_images), default=None)
    if newest is None:
        if mark is not None and mark.digests and mark.pushed_at < settled_before:
            return RepositoryMark(mark.pushed_at)
        return mark
    if newest < settled_before:
        return RepositoryMark(newest)
    at_newest = {digest_key(image.digest) for image in new_images if image.pushed_at == newest}
    if mark is not None and mark.pushed_at == newest:
        at_newest |= mark.digests
    return RepositoryMark(newest, frozenset(at_newest))


def dump_cursor(cursor: Mapping[str, RepositoryMark]) -> str:
    """The sensor cursor: ``{"repo": [epoch_seconds, "digestkey,digestkey"]}`` as compact JSON."""
    body = {
        repository: [_epoch(mark.pushed_at), ",".join(sorted(mark.digests))]
        for repository, mark in sorted(cursor.items())
    }
    return json.dumps(body, separators=(",", ":"))


def load_cursor(raw: str | None) -> dict[str, RepositoryMark]:
    """The cursor written by :func:`dump_cursor`; None or "" is a first tick."""
    if not raw:
        return {}
    try:
        body: Any = json.loads(raw)
        return {
            repository: RepositoryMark(
                datetime.fromtimestamp(float(pushed_at), tz=timezone.utc),
                frozenset(key for key in str(digests).split(",") if key),
            )
            for repository, (pushed_at, digests) in body.items()
        }
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"image tag sensor cursor is unreadable ({exc}): {raw[:80]!r}; reset the sensor's cursor "
            "to start again from the tags pushed from now on"
        ) from None


def cursor_size(cursor: Mapping[str, RepositoryMark] | str) -> int:
    """Bytes of the serialized cursor (Dagster stores it with every tick)."""
    raw = cursor if isinstance(cursor, str) else dump_cursor(cursor)
    return len(raw.encode())


def _epoch(moment: datetime) -> int | float:
    seconds = moment.timestamp()
    return int(seconds) if seconds.is_integer() else round(seconds, 6)

