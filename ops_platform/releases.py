"""Releases of one service of the Ontology Editor chart to one environment.

Plain Python, no Dagster import. The shell (``apps/<service>/<env>``) calls:

1. :func:`resolve_image`: the tag must be a pinned git sha (the service's
   ``tag_pattern``, never ``latest``) that exists in ECR repository
   ``<service>-<env>``; gives the image digest.
2. :func:`check_digest`: the tag still has the digest the caller saw (a
   re-pushed tag is refused); for prod, :func:`require_passed_staging` on the
   history of staging releases whose rollout became available: only a digest
   that passed staging is promoted.
3. :func:`release`: render the chart for this service only, into the
   environment's namespace, with the image pinned by the digest the gate
   checked (``<repository>@sha256:...``; the tag only labels it); refuse the
   release before anything is applied when an object would land outside that
   namespace (:func:`check_blast_radius`); server-side apply this service's
   objects and the shared ones, wait for the Deployment's rollout, and roll
   back to the previous ReplicaSet's pod template (as ``kubectl rollout
   undo`` does) when it does not become available. The result says how the
   rollout finished (``rollout``).

The chart's HorizontalPodAutoscalers and PodDisruptionBudgets take the API
version the cluster serves (:func:`cluster_api_versions`, as charts do with
Helm's ``.Capabilities``): autoscaling/v2 and policy/v1 where served (EKS
today), else the older version of the same fields; a cluster serving neither
refuses the release before anything is applied, never skips the objects.

Promotion (:class:`Promotion`, :func:`next_promotion`, :func:`promotion_tag`):
prod follows the newest staging release whose rollout became available,
once prod's repository holds that digest; until then the digest waits.

Errors say what went wrong with *this* release, without naming it: the caller
(the asset) puts ``release of <service>:<tag> to <env>`` in front, once.

Which objects are applied: those labelled ``app.kubernetes.io/name=<service>``
plus the shared ones (no such label: the Namespace and the namespace-wide
NetworkPolicies). The other service's objects are left alone, so releasing
onto-backend never touches onto-frontend's Deployment (its image tag is not
known here, and re-applying it with any tag would roll it). The shared objects
render identically for both services, so applying them from either release is
idempotent.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ops_platform.errors import OpsPlatformError
from ops_platform.manifests import (
    CLUSTER_SCOPED_BUILTIN_KINDS,
    ManifestDocument,
    apply_order,
    object_ref,
    render_chart,
    resolve_manifest_dir,
)
from ops_platform.resources.ecr import EcrRegistry, ImageInfo
from ops_platform.resources.ecr import ImageNotFound as EcrImageNotFound
from ops_platform.resources.kubernetes import (
    Condition,
    KindNotServed,
    KubernetesClient,
    WaitTimeout,
)
from ops_platform.spec import Registry, Service

NAME_LABEL = "app.kubernetes.io/name"
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
POD_TEMPLATE_HASH = "pod-template-hash"
MOVING_TAGS = frozenset({"latest"})
# Chart values key -> kind and its API versions, newest first: the chart's default (values.yaml), then the
# version of the same fields that older clusters serve (autoscaling/v2 since 1.23, policy/v1 since 1.21).
SERVED_VERSIONS = {
    "autoscaling": ("HorizontalPodAutoscaler", ("autoscaling/v2", "autoscaling/v2beta2")),
    "podDisruptionBudget": ("PodDisruptionBudget", ("policy/v1", "policy/v1beta1")),
}


class ReleaseError(OpsPlatformError):
    """A release was refused before anything was applied."""


class InvalidTag(ReleaseError):
    """The tag is not a pinned image tag of the service."""


class ImageNotFound(ReleaseError):
    """The tag is not in the service's ECR repository for the environment."""


class DigestChanged(ReleaseError):
    """The tag now points at another image than the one the caller was told about."""


class NotPassedStaging(ReleaseError):
    """Prod was asked for a digest that no staging release has proven."""


class OutsideEnvironment(ReleaseError):
    """A rendered object would land outside the environment's namespace."""


class NotServed(ReleaseError):
    """The cluster serves none of the API versions the chart can render a kind in."""


class ReleaseFailed(OpsPlatformError):
    """The rollout did not become available; ``rollback`` says what was restored."""

    def __init__(self, message: str, *, reason: str, rollback: Rollback | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.rollback = rollback


@dataclass(frozen=True)
class PreviousRevision:
    """The Deployment as it ran before the release, recorded before applying."""

    revision: str | None
    replicaset: str | None
    template: dict[str, Any]


@dataclass(frozen=True)
class Rollback:
    revision: str | None
    replicaset: str | None
    action: str  # the apply's action: changed (restored) or unchanged


@dataclass(frozen=True)
class ReleaseResult:
    service: str
    environment: str
    revision: str | None
    image: str
    digest: str
    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    released_at: datetime | None = None
    rollout: str = ""  # how the rollout finished, as rollout_state says it ("2/2 replicas available")


def gate_of(service: Service, environment: str) -> str | None:
    """The environment whose proven releases ``environment`` takes its digests from: staging for prod, else None."""
    return "staging" if environment == "prod" and "staging" in service.environments else None


def check_tag(service: Service, tag: str) -> None:
    """Raise :class:`InvalidTag` unless ``tag`` is a pinned tag of ``service``."""
    if tag in MOVING_TAGS:
        raise InvalidTag(
            f"tag {tag!r} is a moving tag; release a git sha "
            f"(tag_pattern {service.tag_pattern} of {service.name} in infra/platform.yaml)"
        )
    if not re.fullmatch(service.tag_pattern, tag):
        raise InvalidTag(
            f"tag {tag!r} does not match the tag_pattern {service.tag_pattern} of {service.name} "
            "(infra/platform.yaml)"
        )


def resolve_image(registry: EcrRegistry, service: Service, environment: str, tag: str) -> ImageInfo:
    """The ECR image of ``tag`` in ``<service>-<environment>``; its digest pins the release."""
    _check_environment(service, environment)
    check_tag(service, tag)
    repository = service.repository(environment)
    for image in registry.list_images(repository, tag_status="TAGGED"):
        if tag in image.tags:
            return image
    raise ImageNotFound(
        f"ecr: tag {tag!r} is not in repository '{repository}' of registry {registry.registry} "
        f"(was the image pushed for {environment}?)"
    )


def passed_staging(history: Iterable[Mapping[str, Any]], tag_or_digest: str) -> bool:
    """Whether a staging release whose rollout became available shipped this digest (``sha256:...``) or tag.

    ``history`` holds records ``{tag, digest, at}`` of staging releases whose
    rollout became available (not merely applied). The prod gate should pass
    the digest resolved in ECR: a tag alone could have been re-pushed with
    other content since.
    """
    key = "digest" if tag_or_digest.startswith("sha256:") else "tag"
    for index, record in enumerate(history):
        if not isinstance(record, Mapping) or key not in record:
            raise ValueError(f"staging history record {index} has no {key!r}: {record!r}")
        if record[key] == tag_or_digest:
            return True
    return False


def check_digest(image: ImageInfo, tag: str, expected: str | None) -> None:
    """Raise :class:`DigestChanged` when ``expected`` is given and ECR's digest of ``tag`` is another."""
    if expected and expected != image.digest:
        raise DigestChanged(
            f"ECR now has digest {image.digest} for tag {tag!r}, not {expected} (the tag was re-pushed); "
            "nothing applied"
        )


def require_passed_staging(history: Iterable[Mapping[str, Any]], digest: str, how: str) -> None:
    """Raise :class:`NotPassedStaging` unless ``history`` (see :func:`passed_staging`) holds ``digest``.

    ``how`` tells the operator how to get the digest through staging.
    """
    if not passed_staging(history, digest):
        raise NotPassedStaging(
            f"refused: digest {digest} has not passed staging (no staging release of it became available; "
            f"{how}); nothing applied"
        )


def chart_component(service: Service) -> str:
    """The key of ``service`` in the chart's values.yaml (frontend / backend), found by its ``name``."""
    values_file = resolve_manifest_dir(service.chart) / "values.yaml"
    values = yaml.safe_load(values_file.read_text()) or {}
    for key, section in values.items():
        if isinstance(section, dict) and section.get("name") == service.name:
            return key
    raise ReleaseError(
        f"no section with name: {service.name} in {values_file} (the chart does not deploy this service)"
    )


def service_objects(objects: Iterable[dict[str, Any]], service: Service) -> list[dict[str, Any]]:
    """This service's objects and the shared ones, in apply order (Namespace first)."""
    kept = [
        ManifestDocument(Path(service.chart), index, obj)
        for index, obj in enumerate(objects)
        if (obj.get("metadata", {}).get("labels") or {}).get(NAME_LABEL, service.name) == service.name
    ]
    return [document.obj for document in apply_order(kept)]


def release_values(service: Service, tag: str, digest: str, namespace: str, registry: Registry) -> dict[str, Any]:
    """Chart values of one release: the environment's namespace and registry, the image pinned by ``digest``."""
    component = chart_component(service)
    return {
        "namespace": {"name": namespace},
        # image.tag is the chart's fallback for the other component, whose objects are not applied.
        "image": {"tag": tag, "registry": {"account": registry.account, "region": registry.region}},
        component: {"image": {"tag": tag, "digest": digest}},
    }


def served_api_versions(serves: Callable[[str, str], bool], cluster: str = "the cluster") -> dict[str, Any]:
    """Chart values choosing, for each kind of :data:`SERVED_VERSIONS`, the newest API version ``serves(api_version, kind)``.

    Raises :class:`NotServed` when ``cluster`` serves none of a kind's versions.
    """
    values: dict[str, Any] = {}
    for key, (kind, versions) in SERVED_VERSIONS.items():
        served = next((version for version in versions if serves(version, kind)), None)
        if served is None:
            raise NotServed(
                f"refused: {cluster} serves {kind} in none of {', '.join(versions)} (the chart's "
                f"{key}.apiVersion); upgrade the cluster or add the version it serves to SERVED_VERSIONS in "
                "ops_platform/releases.py; nothing applied"
            )
        values[key] = {"apiVersion": served}
    return values


def cluster_api_versions(kube: KubernetesClient) -> dict[str, Any]:
    """:func:`served_api_versions` of the cluster of ``kube``, from its discovery."""

    def serves(api_version: str, kind: str) -> bool:
        try:
            kube.kind(api_version, kind)
        except KindNotServed:
            return False
        return True

    return served_api_versions(serves, f"the cluster at {kube.host}")


def check_blast_radius(
    objects: Iterable[dict[str, Any]], environment: str, namespace: str, namespaced: Callable[[dict[str, Any]], bool]
) -> None:
    """Raise :class:`OutsideEnvironment` unless every object lies in ``namespace`` (the Namespace itself aside).

    ``namespaced(obj)`` says whether the cluster serves the object's kind per
    namespace; a cluster-wide kind is refused even with a namespace set (the
    server would ignore it and apply the object for the whole cluster).
    """
    outside = []
    for obj in objects:
        metadata = obj.get("metadata") or {}
        if obj.get("kind") == "Namespace" and obj.get("apiVersion") == "v1":
            if metadata.get("name") != namespace:
                outside.append(f"{object_ref(obj)} (another namespace)")
        elif obj.get("kind") in CLUSTER_SCOPED_BUILTIN_KINDS or not namespaced(obj):
            outside.append(f"{object_ref(obj)} (cluster-wide)")
        elif metadata.get("namespace") != namespace:
            where = metadata.get("namespace") or "no namespace: the client's default"
            outside.append(f"{object_ref(obj)} ({where})")
    if outside:
        raise OutsideEnvironment(
            f"refused: the chart renders {len(outside)} object(s) outside namespace {namespace!r} of {environment}: "
            f"{'; '.join(outside)} (a release writes only to its environment's namespace: fix the chart "
            f"or environments.{environment}.namespace in infra/platform.yaml); nothing applied"
        )


def release(
    kube: KubernetesClient,
    service: Service,
    environment: str,
    tag: str,
    digest: str,
    *,
    namespace: str,
    registry: Registry,
    render: Callable[..., list[dict[str, Any]]] = render_chart,
    wait_timeout: float = 600.0,
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> ReleaseResult:
    """Apply the chart for ``service`` with its image pinned by ``digest`` into ``namespace``; wait for the rollout.

    ``kube`` is the environment's cluster, ``registry`` the environment's ECR
    registry. Raises :class:`OutsideEnvironment` before applying anything when
    an object would land outside ``namespace``, and :class:`ReleaseFailed`
    (after the rollback) when the rollout does not become available within
    ``wait_timeout`` seconds.
    """
    _check_environment(service, environment)
    check_tag(service, tag)
    values = {**release_values(service, tag, digest, namespace, registry), **cluster_api_versions(kube)}
    objects = service_objects(render(environment, values, chart_dir=service.chart), service)
    check_blast_radius(objects, environment, namespace,
                       lambda obj: kube.kind(obj["apiVersion"], obj["kind"]).namespaced)
    deployment = _the_deployment(objects, service)
    previous = previous_revision(kube, service.name, namespace)

    result = ReleaseResult(
        service=service.name,
        environment=environment,
        revision=None,
        image=_image_of(deployment),
        digest=digest,
        released_at=clock(),
    )
    for obj in objects:
        applied = kube.apply(obj)
        getattr(result, applied.action).append(object_ref(obj))

    try:
        live = wait_for_rollout(kube, service.name, namespace, wait_timeout)
    except RolloutFailed as failure:
        rollback = roll_back(kube, deployment, previous)
        raise ReleaseFailed(
            _failure_message(failure.reason, rollback), reason=failure.reason, rollback=rollback
        ) from None
    revision = (live.get("metadata", {}).get("annotations") or {}).get(REVISION_ANNOTATION)
    return replace(result, revision=revision, rollout=rollout_state(live)[1])


def previous_revision(kube: KubernetesClient, name: str, namespace: str) -> PreviousRevision | None:
    """The running revision of Deployment ``name``: its revision annotation, ReplicaSet and pod template."""
    deployment = kube.get("apps/v1", "Deployment", name, namespace)
    if deployment is None:
        return None
    revision = (deployment["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION)
    replicaset = _replicaset_of_revision(kube, deployment, revision) if revision else None
    if replicaset is not None:
        template = _without_hash(replicaset["spec"]["template"])
        return PreviousRevision(revision, replicaset["metadata"]["name"], template)
    return PreviousRevision(revision, None, copy.deepcopy(deployment["spec"]["template"]))


def _replicaset_of_revision(
    kube: KubernetesClient, deployment: dict[str, Any], revision: str
) -> dict[str, Any] | None:
    uid = deployment["metadata"].get("uid")
    for replicaset in kube.list("apps/v1", "ReplicaSet", deployment["metadata"]["namespace"]):
        owners = replicaset["metadata"].get("ownerReferences") or []
        owned = any(o.get("kind") == "Deployment" and o.get("uid") == uid for o in owners)
        annotations = replicaset["metadata"].get("annotations") or {}
        if owned and annotations.get(REVISION_ANNOTATION) == revision:
            return replicaset
    return None


def _without_hash(template: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(template)
    (template.get("metadata", {}).get("labels") or {}).pop(POD_TEMPLATE_HASH, None)
    return template


class RolloutFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def rollout_state(deployment: dict[str, Any] | None) -> tuple[str, str]:
    """("complete" | "failed" | "progressing", why) of a Deployment, as ``kubectl rollout status`` judges it."""
    if deployment is None:
        return "progressing", "the Deployment does not exist"
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    generation = deployment["metadata"].get("generation", 0)
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), None)
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return "failed", f"ProgressDeadlineExceeded: {progressing.get('message', '')}".rstrip(": ")
    if status.get("observedGeneration", 0) < generation:
        return "progressing", f"generation {generation} not yet observed by the controller"
    desired = spec.get("replicas", 1)
    updated, available = status.get("updatedReplicas", 0), status.get("availableReplicas", 0)
    total = status.get("replicas", 0)
    if updated == desired and available == desired and total == desired:
        return "complete", f"{available}/{desired} replicas available"
    return "progressing", (
        f"{updated}/{desired} replicas updated, {available}/{desired} available, "
        f"{status.get('unavailableReplicas', max(desired - available, 0))} unavailable"
    )


def wait_for_rollout(kube: KubernetesClient, name: str, namespace: str, timeout: float) -> dict[str, Any]:
    """The Deployment once its rollout is complete; :class:`RolloutFailed` on a deadline or timeout."""
    condition = Condition(
        "finish its rollout", lambda obj: rollout_state(obj)[0] in ("complete", "failed")
    )
    try:
        live = kube.wait_for("apps/v1", "Deployment", name, namespace, condition, timeout=timeout)
    except WaitTimeout:
        live = kube.get("apps/v1", "Deployment", name, namespace)
        raise RolloutFailed(
            f"not available after {timeout:g} s: {_with_last_condition(live, rollout_state(live)[1])}"
        ) from None
    state, why = rollout_state(live)
    if state == "failed":
        raise RolloutFailed(_with_last_condition(live, why))
    assert live is not None
    return live


def _with_last_condition(deployment: dict[str, Any] | None, why: str) -> str:
    conditions = ((deployment or {}).get("status") or {}).get("conditions") or []
    if not conditions or "ProgressDeadlineExceeded" in why:
        return why
    last = conditions[-1]
    return f"{why}; last condition {last.get('type')}={last.get('status')}: {last.get('message', '')}"


def roll_back(
    kube: KubernetesClient, deployment: dict[str, Any], previous: PreviousRevision | None
) -> Rollback | None:
    """Re-apply the previous pod template over the rendered Deployment; None when there was no previous one."""
    if previous is None:
        return None
    restored = copy.deepcopy(deployment)
    restored["spec"]["template"] = previous.template
    applied = kube.apply(restored)
    return Rollback(previous.revision, previous.replicaset, applied.action)


def _failure_message(reason: str, rollback: Rollback | None) -> str:
    if rollback is None:
        undone = "nothing to roll back to (first release of the Deployment)"
    else:
        source = f"ReplicaSet {rollback.replicaset}" if rollback.replicaset else "the previous Deployment template"
        undone = f"rolled back to revision {rollback.revision} ({source})"
    return f"rollout failed: {reason}; {undone}"


def _the_deployment(objects: list[dict[str, Any]], service: Service) -> dict[str, Any]:
    for obj in objects:
        if obj.get("kind") == "Deployment" and obj["metadata"]["name"] == service.name:
            return obj
    raise ReleaseError(f"the chart {service.chart} renders no Deployment {service.name}")


def _image_of(deployment: dict[str, Any]) -> str:
    return deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def _check_environment(service: Service, environment: str) -> None:
    if environment not in service.environments:
        raise ReleaseError(
            f"environment {environment!r} is not one of {service.environments} of {service.name} "
            "(images.services in infra/platform.yaml)"
        )


@dataclass(frozen=True)
class ProvenRelease:
    """A release whose own run passed `rollout_available`: the evaluation's record id, its tag and digest."""

    record: int
    tag: str
    digest: str


@dataclass(frozen=True)
class Promotion:
    """Where promoting one service into a gated environment stands.

    ``seen`` is the newest proven release of the gate environment already
    taken into account; ``pending`` the proven release waiting for its digest
    to reach the gated environment's repository.
    """

    seen: int = 0
    pending: ProvenRelease | None = None


def next_promotion(state: Promotion | None, newest: ProvenRelease | None) -> Promotion:
    """The state after looking at the gate's newest proven release.

    Without a state (a first tick), the releases proven so far are only
    learned: turning the sensor on promotes nothing that was proven before.
    A newer proven release replaces the pending one: prod follows staging's
    newest proven digest, not every one in between.
    """
    if state is None:
        return Promotion(seen=newest.record if newest else 0)
    if newest is None or newest.record <= state.seen:
        return state
    return Promotion(seen=newest.record, pending=newest)


def image_of_digest(registry: EcrRegistry, repository: str, digest: str) -> ImageInfo | None:
    """The image ``digest`` in ``repository``, None while it has not been pushed there."""
    try:
        images = registry.describe_images(repository, [digest])
    except EcrImageNotFound:
        return None
    return next((image for image in images if image.digest == digest), None)


def promotion_tag(image: ImageInfo, service: Service, proven_tag: str) -> str | None:
    """The tag to release ``image`` with: the proven release's tag when the image carries it, else its pinned tag."""
    if proven_tag in image.tags:
        return proven_tag
    pinned = sorted(t for t in image.tags if t not in MOVING_TAGS and re.fullmatch(service.tag_pattern, t))
    return pinned[0] if pinned else None


def dump_promotions(state: Mapping[str, Promotion]) -> str:
    """The promotion sensor's cursor: ``{"<service>/<env>": [seen, pending record, tag, digest]}`` (compact JSON)."""
    body = {
        key: [entry.seen] + ([entry.pending.record, entry.pending.tag, entry.pending.digest] if entry.pending else [])
        for key, entry in sorted(state.items())
    }
    return json.dumps(body, separators=(",", ":"))


def load_promotions(raw: str | None) -> dict[str, Promotion]:
    """The cursor written by :func:`dump_promotions`; None or "" is a first tick."""
    if not raw:
        return {}
    try:
        state = {}
        for key, entry in json.loads(raw).items():
            if len(entry) not in (1, 4):
                raise ValueError(f"entry of {key!r} has {len(entry)} fields")
            pending = ProvenRelease(int(entry[1]), str(entry[2]), str(entry[3])) if len(entry) == 4 else None
            state[str(key)] = Promotion(int(entry[0]), pending)
        return state
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"promotion sensor cursor is unreadable ({exc}): {raw[:80]!r}; reset the sensor's cursor "
            "(what staging proved until then is learned, not promoted)"
        ) from None
