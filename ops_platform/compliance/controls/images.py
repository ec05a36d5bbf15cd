"""Images of the app workloads: from the platform registry, pinned (InfraSpec §2.3; infra plan §7).

References are read by the grammar of the OCI distribution reference
(github.com/distribution/reference)::

    reference := name [ ":" tag ] [ "@" digest ]
    name      := [ domain "/" ] path-component [ "/" path-component ]*
    tag       := [\\w][\\w.-]{0,127}
    digest    := algorithm ":" hex

and a digest is pinned only when its algorithm is one the OCI image spec
registers with the length it gives (sha256: 64 lowercase hex, sha512: 128).
A digest is never read as a tag: ``repo@sha512:<32 hex>`` is an invalid
digest, not a tag that looks like a git sha.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ops_platform.compliance.controls.pods import POD_READS, Container, PodTemplate, judge_pods, per_container
from ops_platform.compliance.controls.shapes import text
from ops_platform.compliance.evidence import Evidence
from ops_platform.compliance.model import ControlConfig, Outcome, control

ANY_ECR = re.compile(r"^[0-9]{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/")
GIT_SHA_TAG = re.compile(r"^[0-9a-f]{7,40}$")
TAG = re.compile(r"^[\w][\w.-]{0,127}$")
PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
DOMAIN = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[+._-][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
NAME_MAX = 255


class ImageReferenceError(ValueError):
    """Not an image reference by the distribution grammar; the message says which part."""


@dataclass(frozen=True)
class ImageReference:
    name: str
    tag: str | None
    digest: str | None


def parse_image_reference(image: str) -> ImageReference:
    """``name[:tag][@digest]`` by the distribution grammar; raises ImageReferenceError naming the bad part."""
    if not image:
        raise ImageReferenceError("empty image reference")
    rest, has_digest, digest = image.partition("@")
    if has_digest and not DIGEST.match(digest):
        raise ImageReferenceError(f"digest {digest!r} is not <algorithm>:<hex, at least 32 digits>")
    name, tag = rest, None
    last_colon, last_slash = rest.rfind(":"), rest.rfind("/")
    if last_colon > last_slash:  # a colon before the last slash is a registry port
        name, tag = rest[:last_colon], rest[last_colon + 1:]
        if not TAG.match(tag):
            raise ImageReferenceError(f"tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    if len(name) > NAME_MAX:
        raise ImageReferenceError(f"repository name is longer than {NAME_MAX} characters")
    components = name.split("/")
    first = components[0]
    if len(components) > 1 and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        if not DOMAIN.match(first):
            raise ImageReferenceError(f"registry {first!r} is not a host[:port]")
        components = components[1:]
    for component in components:
        if not PATH_COMPONENT.match(component):
            raise ImageReferenceError(f"repository path component {component!r} is not lowercase [a-z0-9] "
                                 "separated by '.', '_', '__' or '-'")
    return ImageReference(name, tag, digest if has_digest else None)


def digest_problem(digest: str) -> str | None:
    """Why a digest does not pin content (None: it does)."""
    algorithm, _, encoded = digest.partition(":")
    length = DIGEST_LENGTHS.get(algorithm)
    if length is None:
        return f"digest algorithm {algorithm!r} is not one the OCI image spec registers (sha256, sha512)"
    if len(encoded) != length or not re.fullmatch(r"[0-9a-f]+", encoded):
        return f"digest {digest} is not {algorithm}:<{length} lowercase hex digits>"
    return None


def pin_problem(image: str) -> str | None:
    """Why an image reference is not pinned by a valid digest or a git sha tag (None: it is)."""
    shown = image or "(none)"
    try:
        reference = parse_image_reference(image)
    except ImageReferenceError as exc:
        return f"image {shown} is not a valid reference: {exc}"
    if reference.digest is not None:
        problem = digest_problem(reference.digest)
        return f"image {image}: {problem}" if problem else None
    if reference.tag is None:
        return f"image {image} has no tag (means :latest)"
    if reference.tag == "latest":
        return f"image {image} uses :latest"
    if not GIT_SHA_TAG.match(reference.tag):
        return f"image {image}: tag {reference.tag!r} is not a git sha (7-40 hex) and there is no digest"
    return None


def _image(container: Container) -> str:
    return text(container.spec.get("image"), f"{container.label} image") or ""


def _registry_problem(config: ControlConfig) -> Callable[[Container, PodTemplate], str | None]:
    def problem(container: Container, template: PodTemplate) -> str | None:
        image = _image(container)
        if config.registries:
            if any(image.startswith(prefix) for prefix in config.registries):
                return None
            return f"image {image or '(none)'} is not from {' or '.join(config.registries)}"
        return None if ANY_ECR.match(image) else f"image {image or '(none)'} is not from an ECR registry"

    return problem


@control(
    id="OPS-IMG-001",
    title="Images come from the platform registry",
    severity="ERROR",
    requirement="InfraSpec §2.3 (ECR, scanned with Trivy); infra plan §7.2 (Requirements 6.2)",
    framework="CIS 5.5.1",
    source="Gatekeeper library k8sallowedrepos",
    remediation="""Push the image through CI to the platform's ECR registry
        (<account>.dkr.ecr.<region>.amazonaws.com/<service>-<environment>) and deploy it from there.""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def platform_registry(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return judge_pods(evidence, config, per_container(_registry_problem(config)),
                      "every image comes from the platform registry")


@control(
    id="OPS-IMG-002",
    title="Images are pinned by git sha or digest, never :latest",
    severity="ERROR",
    requirement="InfraSpec §2.3 (<service>-<environment>:<git-sha>); infra plan §7.4 (Requirements 6.5) rollback",
    framework=None,
    source="OCI distribution reference grammar; kube-linter latest-tag",
    remediation="""Deploy the image by its git sha tag (as CI pushes it) or by digest
        (@sha256:<64 hex>, as the release gate checked it).""",
    evidence=("cluster", "manifests"),
    reads=POD_READS,
)
def pinned_images(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    return judge_pods(evidence, config, per_container(lambda container, _: pin_problem(_image(container))),
                      "every image is pinned")


CONTROLS = [platform_registry, pinned_images]
