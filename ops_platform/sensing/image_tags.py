"""New image tags in ECR, turned into release requests of ``apps/<service>/<env>``.

ECR cannot list the images pushed since a time: DescribeImages returns every
image of a repository, with its push time, and is the expensive call;
ListImages returns digests and tags only. So the cursor keeps, per repository:

- a *mark*: the newest ``imagePushedAt`` seen and the digests seen at exactly
  that time (push times have a one-second resolution, so an image can still
  arrive in that second). Once that second is older than ``settle_seconds``
  the digests are dropped: the mark is a timestamp and at most one second of
  digests;
- a *fingerprint* of the repository's digests, in 16 buckets by the digest's
  first hex digit (3 bytes of hash each, 64 base64 characters in all).

A tick lists each repository's digests (ListImages) and compares the buckets:
an unchanged repository costs that one listing; in a changed one only the
changed buckets' images are described (DescribeImages by digest), and those
the mark has not seen are new (a change that leaves a bucket's 3-byte hash as
it was, one in 16.7 million, goes unseen). A repository the cursor does not know yet is
*learned*: described in full to set its mark, nothing released, so a first tick
(or a service newly added to the spec) does not deploy what is already there.
A repository that is missing or empty is remembered as such, and its first
image is released.

Repositories are read ``concurrency`` at a time; none is started once
``budget_seconds`` have passed (those left keep their cursor and are read next
tick), so a tick ends well inside Dagster's sensor timeout even while a large
registry is being learned. Known repositories are read before new ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from ops_platform.resources.ecr import (
    EcrError,
    EcrRegistry,
    EcrThrottledError,
    ImageInfo,
    ImageNotFound,
    RepositoryNotFound,
)
from ops_platform.spec import Service

NEVER_FOLLOWED_TAGS = frozenset({"latest"})
SETTLE_SECONDS = 60.0
CONCURRENCY = 8
# Well inside Dagster's default 60 s sensor evaluation timeout.
BUDGET_SECONDS = 15.0
# 64 bits of a sha256 digest tell apart the images pushed within one second.
_DIGEST_KEY_CHARS = 16
_BUCKETS = 16
_BUCKET_HASH_BYTES = 3
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


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
    and at ``pushed_at`` those whose digest key is in ``digests`` (all of them when settled).

    ``fingerprint`` is the bucketed hash of the repository's digests when it
    was last read ("" when unknown: every bucket is read again)."""

    pushed_at: datetime
    digests: frozenset[str] = frozenset()
    fingerprint: str = ""

    def has_seen(self, image: ImageInfo) -> bool:
        if image.pushed_at != self.pushed_at:
            return image.pushed_at < self.pushed_at
        return not self.digests or digest_key(image.digest) in self.digests


@dataclass
class TagScan:
    requests: list[ReleaseRequest] = field(default_factory=list)
    cursor: dict[str, RepositoryMark] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    learned: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Target:
    service: Service
    environment: str
    repository: str


@dataclass
class _Read:
    """What reading one repository gave: its new mark (None: keep the old one), its new images."""

    mark: RepositoryMark | None = None
    images: list[ImageInfo] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    learned: bool = False
    deferred: bool = False


def digest_key(digest: str) -> str:
    return digest.removeprefix("sha256:")[:_DIGEST_KEY_CHARS]


def fingerprint(digests: Iterable[str]) -> str:
    """16 buckets of digests (by first hex digit), 3 bytes of sha256 each, as 64 base64 characters."""
    buckets: list[list[str]] = [[] for _ in range(_BUCKETS)]
    for digest in digests:
        buckets[_bucket(digest)].append(digest.removeprefix("sha256:"))
    raw = b"".join(
        hashlib.sha256(",".join(sorted(bucket)).encode()).digest()[:_BUCKET_HASH_BYTES] for bucket in buckets
    )
    return base64.urlsafe_b64encode(raw).decode()


def _changed_buckets(old: str, new: str) -> set[int]:
    if len(old) != len(new):
        return set(range(_BUCKETS))
    old_raw, new_raw = base64.urlsafe_b64decode(old), base64.urlsafe_b64decode(new)
    size = _BUCKET_HASH_BYTES
    return {
        bucket for bucket in range(_BUCKETS)
        if old_raw[bucket * size : (bucket + 1) * size] != new_raw[bucket * size : (bucket + 1) * size]
    }


def _bucket(digest: str) -> int:
    hexdigits = digest.removeprefix("sha256:")
    return int(hexdigits[0], 16) % _BUCKETS if hexdigits else 0


def scan_image_tags(
    registry: EcrRegistry | Mapping[str, EcrRegistry],
    services: Iterable[Service],
    environments_of: Callable[[Service], Iterable[str]],
    cursor: Mapping[str, RepositoryMark] | None,
    *,
    now: datetime,
    settle_seconds: float = SETTLE_SECONDS,
    concurrency: int = CONCURRENCY,
    budget_seconds: float = BUDGET_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> TagScan:
    """Release requests for the images pushed since ``cursor``, oldest first, and the new cursor.

    ``registry`` holds every environment's repositories, or is a mapping of
    each environment to its registry. ``environments_of(service)`` names the
    environments to watch (usually ``service.environments``); the cursor
    keeps the repositories watched, so one watched again later is learned
    afresh. A repository that is throttled, refused or changing while read is
    logged and keeps its cursor entry; the others proceed. Repositories not
    in ``cursor`` are learned (see the module doc).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    settled_before = now - timedelta(seconds=settle_seconds)
    deadline = clock() + budget_seconds
    targets = [
        _Target(service, environment, service.repository(environment))
        for service in services
        for environment in environments_of(service)
    ]
    registries = {target.environment: _registry_of(registry, target.environment) for target in targets}
    watched = {target.repository for target in targets}
    scan = TagScan(cursor={repository: mark for repository, mark in (cursor or {}).items() if repository in watched})
    # Known repositories first: their new tags are what a tick is for; learning can wait a tick.
    targets.sort(key=lambda target: target.repository not in scan.cursor)

    # A registry-wide failure (unreachable, no credentials) ends the tick: no read starts after it.
    failed = threading.Event()

    def read(target: _Target) -> _Read:
        if clock() > deadline or failed.is_set():
            return _Read(deferred=True)
        try:
            return _read_repository(registries[target.environment], target.repository,
                                    scan.cursor.get(target.repository), settled_before)
        except BaseException:
            failed.set()
            raise

    if concurrency == 1 or len(targets) <= 1:
        reads = [read(target) for target in targets]
    else:
        with ThreadPoolExecutor(min(concurrency, len(targets)), thread_name_prefix="ecr-scan") as pool:
            reads = list(pool.map(read, targets))

    for target, result in zip(targets, reads, strict=True):
        scan.log.extend(result.log)
        if result.deferred:
            scan.deferred.append(target.repository)
            continue
        if result.learned:
            scan.learned.append(target.repository)
        if result.mark is not None:
            scan.cursor[target.repository] = result.mark
        _add_requests(scan, target, result.images)
    if scan.deferred:
        scan.log.append(
            f"{len(scan.deferred)} repositories not read within {budget_seconds:g} s "
            f"({', '.join(scan.deferred[:5])}{', ...' if len(scan.deferred) > 5 else ''}); read next tick"
        )
    scan.requests.sort(key=lambda request: (request.pushed_at, request.repository, request.digest))
    return scan


def _registry_of(registry: EcrRegistry | Mapping[str, EcrRegistry], environment: str) -> EcrRegistry:
    if isinstance(registry, EcrRegistry):
        return registry
    if environment not in registry:
        raise ValueError(f"no ECR registry given for environment {environment!r} (have: {', '.join(registry)})")
    return registry[environment]


def _add_requests(scan: TagScan, target: _Target, images: list[ImageInfo]) -> None:
    service = target.service
    tag_pattern = re.compile(service.tag_pattern)
    unreleased = 0
    for image in images:
        tag = _release_tag(image, tag_pattern)
        if tag is None:
            unreleased += 1
            continue
        scan.requests.append(
            ReleaseRequest(service.name, target.environment, target.repository, tag, image.digest, image.pushed_at)
        )
    if unreleased:
        scan.log.append(
            f"{target.repository}: {unreleased} new image(s) without a tag matching {service.tag_pattern} "
            "(or tagged only 'latest'); not released"
        )


def _read_repository(
    registry: EcrRegistry, repository: str, mark: RepositoryMark | None, settled_before: datetime
) -> _Read:
    """Read one repository against its mark; errors that concern it alone are logged, not raised."""
    try:
        if mark is None:
            return _learn(registry, repository, settled_before)
        return _read_changes(registry, repository, mark, settled_before)
    except RepositoryNotFound:
        missing = f"{repository}: repository does not exist in registry {registry.registry}"
        if mark is None:
            # Remembered as empty: once it exists, its first image is released.
            return _Read(mark=RepositoryMark(EPOCH, fingerprint=fingerprint(())), log=[f"{missing}; skipped"])
        return _Read(mark=_advance(mark, [], settled_before, fingerprint(())), log=[f"{missing} (any more); skipped"])
    except EcrThrottledError as throttled:
        return _Read(log=[f"{repository}: {throttled}; cursor kept, read again next tick"])
    except ImageNotFound as gone:
        return _Read(log=[f"{repository}: changed while being read ({gone}); cursor kept, read again next tick"])
    except EcrError as error:
        return _Read(log=[f"{repository}: not read: {error}; cursor kept"])


def _learn(registry: EcrRegistry, repository: str, settled_before: datetime) -> _Read:
    images = list(registry.list_images(repository))
    if not images:
        return _Read(
            mark=RepositoryMark(EPOCH, fingerprint=fingerprint(())), log=[f"{repository}: no tagged image yet"]
        )
    mark = _advance(None, images, settled_before, fingerprint(image.digest for image in images))
    learned = (f"{repository}: learned {len(images)} image(s), newest pushed {mark.pushed_at.isoformat()}; "
               "none released, new pushes will be")
    return _Read(mark=mark, learned=True, log=[learned])


def _read_changes(
    registry: EcrRegistry, repository: str, mark: RepositoryMark, settled_before: datetime
) -> _Read:
    digests = registry.list_image_digests(repository)
    now_fingerprint = fingerprint(digests)
    if mark.fingerprint == now_fingerprint:
        return _Read(mark=_advance(mark, [], settled_before, now_fingerprint))
    changed = _changed_buckets(mark.fingerprint, now_fingerprint)
    described = registry.describe_images(repository, (digest for digest in digests if _bucket(digest) in changed))
    new_images = [image for image in described if image.tags and not mark.has_seen(image)]
    return _Read(mark=_advance(mark, new_images, settled_before, now_fingerprint), images=new_images)


def _release_tag(image: ImageInfo, tag_pattern: re.Pattern[str]) -> str | None:
    """The tag to deploy the image as: the first (sorted) that the pattern matches; never ``latest``."""
    matching = sorted(
        tag for tag in image.tags if tag not in NEVER_FOLLOWED_TAGS and tag_pattern.search(tag)
    )
    return matching[0] if matching else None


def _advance(
    mark: RepositoryMark | None, new_images: list[ImageInfo], settled_before: datetime, now_fingerprint: str
) -> RepositoryMark:
    """The mark after ``new_images`` (``mark`` or the images must be given), with the repository's fingerprint.

    The digests at the newest second are kept until that second is older than ``settled_before``.
    """
    newest = max((image.pushed_at for image in new_images), default=None)
    if newest is None:
        assert mark is not None, "a repository without a mark is learned from its images"
        settled = not mark.digests or mark.pushed_at < settled_before
        return RepositoryMark(mark.pushed_at, frozenset() if settled else mark.digests, now_fingerprint)
    if newest < settled_before:
        return RepositoryMark(newest, fingerprint=now_fingerprint)
    at_newest = {digest_key(image.digest) for image in new_images if image.pushed_at == newest}
    if mark is not None and mark.pushed_at == newest:
        at_newest |= mark.digests
    return RepositoryMark(newest, frozenset(at_newest), now_fingerprint)


def dump_cursor(cursor: Mapping[str, RepositoryMark]) -> str:
    """The sensor cursor, ``{"repo": [epoch_seconds, "digestkey,digestkey", "fingerprint"]}`` as compact JSON."""
    body = {
        repository: [_epoch(mark.pushed_at), ",".join(sorted(mark.digests)), mark.fingerprint]
        for repository, mark in sorted(cursor.items())
    }
    return json.dumps(body, separators=(",", ":"))


def load_cursor(raw: str | None) -> dict[str, RepositoryMark]:
    """The cursor written by :func:`dump_cursor`; None or "" is a first tick.

    An entry without a fingerprint (written before there was one) is kept:
    its repository's images are all described once and compared with the mark.
    """
    if not raw:
        return {}
    try:
        body: Any = json.loads(raw)
        cursor: dict[str, RepositoryMark] = {}
        for repository, entry in body.items():
            pushed_at, digests, *rest = entry
            if len(rest) > 1 or not isinstance(repository, str):
                raise ValueError(f"entry of {repository!r} has {len(entry)} fields")
            fingerprint_text = str(rest[0]) if rest else ""
            if fingerprint_text and len(base64.urlsafe_b64decode(fingerprint_text)) != _BUCKETS * _BUCKET_HASH_BYTES:
                raise ValueError(f"fingerprint of {repository!r} is not {_BUCKETS} buckets")
            cursor[repository] = RepositoryMark(
                datetime.fromtimestamp(float(pushed_at), tz=timezone.utc),
                frozenset(key for key in str(digests).split(",") if key),
                fingerprint_text,
            )
        return cursor
    except (ValueError, TypeError, AttributeError) as exc:  # binascii.Error is a ValueError
        raise ValueError(
            f"image tag sensor cursor is unreadable ({exc}): {raw[:80]!r}; reset the sensor's cursor "
            "to learn every repository again (new pushes are released from the tick after)"
        ) from None


def cursor_size(cursor: Mapping[str, RepositoryMark] | str) -> int:
    """Bytes of the serialized cursor (Dagster stores it with every tick)."""
    raw = cursor if isinstance(cursor, str) else dump_cursor(cursor)
    return len(raw.encode())


def _epoch(moment: datetime) -> int | float:
    seconds = moment.timestamp()
    return int(seconds) if seconds.is_integer() else round(seconds, 6)

