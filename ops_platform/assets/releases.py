"""`apps/<service>/<env>`: releases of each service to each environment.

The image tag comes from run config (the image-tag sensor passes it, for
prod the promotion sensor). A release of environment X reaches only X: its
cluster is the resource ``kubernetes_<X>``, its registry ``ecr_<X>``, and
every object it applies lies in X's namespace (``environments.<X>`` of the
spec); the image is pinned by the digest ECR resolved and the gate checked.

Every release declares a blocking `rollout_available` check that its own run
yields after waiting for the rollout: passed with the image and its digest,
failed with the reason when the release was refused or its rollout failed
(then the run fails). Prod takes only a digest whose staging release passed
that check, so in a run that releases staging and prod, prod waits for
staging to be proven, and a staging rollout that failed never lets its digest
through.
"""

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from ops_platform.assets.failures import failure, known_errors
from ops_platform.assets.keys import APPS_GROUP, layer_key, release_key, release_pool
from ops_platform.environment import ecr_key, kubernetes_key
from ops_platform.metadata import table
from ops_platform.releases import (
    ProvenRelease,
    ReleaseFailed,
    ReleaseResult,
    check_digest,
    gate_of,
    release,
    require_passed_staging,
    resolve_image,
)
from ops_platform.spec import Service, Spec

ROLLOUT_AVAILABLE = "rollout_available"
STAGING_HISTORY_LIMIT = 200


class ReleaseConfig(dg.Config):
    image_tag: str
    image_digest: str | None = None  # when given (by the sensor), must match what ECR has for the tag
    wait_timeout_seconds: float = 600.0


def build_release_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    if spec.images is None:
        return []
    return [
        _release_asset(spec, service, environment)
        for service in spec.images.services
        for environment in service.environments
    ]


def build_release_checks(spec: Spec) -> list[dg.AssetChecksDefinition]:
    """None: `rollout_available` is declared on each release asset and yielded by its run."""
    return []


def proven_releases(
    instance: dg.DagsterInstance, service: str, environment: str, limit: int = STAGING_HISTORY_LIMIT
) -> list[tuple[ProvenRelease, float]]:
    """The releases of ``service`` to ``environment`` whose own run passed `rollout_available`, newest first.

    Each with the evaluation's record id, tag and digest (from the check's
    metadata) and when it was recorded; only the newest ``limit`` passed
    evaluations are read.
    """
    records = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(release_key(service, environment), ROLLOUT_AVAILABLE),
        limit=limit,
        status={AssetCheckExecutionRecordStatus.SUCCEEDED},
    )
    proven = []
    for record in records:
        dagster_event = record.event.dagster_event if record.event else None
        evaluation = dagster_event.event_specific_data if dagster_event else None
        if not isinstance(evaluation, dg.AssetCheckEvaluation) or not evaluation.passed:
            continue
        metadata = evaluation.metadata
        if "image_digest" in metadata and "image_tag" in metadata:
            proven.append((ProvenRelease(record.id, str(metadata["image_tag"].value),
                                         str(metadata["image_digest"].value)), record.create_timestamp))
    return proven


def staging_history(instance: dg.DagsterInstance, service: str) -> list[dict[str, str]]:
    """Tags and digests of the staging releases of ``service`` whose run passed `rollout_available`, newest first.

    Only the newest :data:`STAGING_HISTORY_LIMIT` passed evaluations count.
    """
    return [{"tag": proven.tag, "digest": proven.digest, "at": str(at)}
            for proven, at in proven_releases(instance, service, "staging")]


def release_metadata(result: ReleaseResult, tag: str) -> dict[str, object]:
    return {
        "image_tag": tag,
        "image_digest": result.digest,
        "image": result.image,
        "revision": str(result.revision),
        "objects": table(
            [{"object": ref, "action": action} for action, refs in
             (("created", result.created), ("changed", result.changed), ("unchanged", result.unchanged))
             for ref in refs]
        ),
    }


def _release_asset(spec: Spec, service: Service, environment: str) -> dg.AssetsDefinition:
    assert spec.images is not None
    key = release_key(service.name, environment)
    repository = service.repository(environment)
    registry = spec.registry_of(environment)
    located = spec.environment(environment)
    cluster_key, registry_key = kubernetes_key(environment), ecr_key(environment)
    gated = gate_of(service, environment) is not None
    staging = release_key(service.name, "staging").to_user_string()
    deps = [layer_key(layer) for layer in service.requires]
    if gated:
        deps.append(release_key(service.name, "staging"))

    @dg.asset(
        key=key,
        deps=deps,
        group_name=APPS_GROUP,
        kinds={"kubernetes", "helm", "ecr"},
        owners=[service.owner or spec.platform.owner],
        pool=release_pool(service.name, environment),
        required_resource_keys={cluster_key, registry_key},
        check_specs=[dg.AssetCheckSpec(
            ROLLOUT_AVAILABLE, asset=key, blocking=True,
            description="This run's rollout finished: the Deployment runs the released image and all its "
            "replicas are available. Failed when the release was refused or its rollout failed (rolled back).",
        )],
        description=(
            f"Release of {service.name} to {environment}: image from ECR repository "
            f"`{repository}` pinned by digest, chart `{service.chart}`, into namespace `{located.namespace}` "
            f"of {located.cluster} (resource `{cluster_key}`)."
            + (f" Takes only an image digest whose `{staging}` release passed `{ROLLOUT_AVAILABLE}`."
               if gated else "")
        ),
        metadata={
            "repository": f"{registry.account}.dkr.ecr.{registry.region}.amazonaws.com/{repository}",
            "tag_pattern": service.tag_pattern,
            "chart": dg.MetadataValue.path(service.chart),
            "namespace": located.namespace,
            "cluster": located.cluster,
        },
    )
    def _release(context: dg.AssetExecutionContext, config: ReleaseConfig):
        prefix = f"release of {service.name}:{config.image_tag} to {environment}"
        evidence: dict[str, str] = {"image_tag": config.image_tag}
        try:
            with known_errors(prefix):
                ecr = getattr(context.resources, registry_key)
                image = resolve_image(ecr.get_registry(), service, environment, config.image_tag)
                evidence["image_digest"] = image.digest
                check_digest(image, config.image_tag, config.image_digest)
                if gated:
                    require_passed_staging(staging_history(context.instance, service.name), image.digest,
                                           f"materialize {staging} with this tag first")
                kube = getattr(context.resources, cluster_key).get_client()
                try:
                    result = release(kube, service, environment, config.image_tag, image.digest,
                                     namespace=located.namespace, registry=registry,
                                     wait_timeout=config.wait_timeout_seconds)
                except ReleaseFailed as failed:
                    evidence["rollback"] = str(failed.rollback) if failed.rollback else "nothing to roll back"
                    raise failure(prefix, failed, evidence) from None
        except dg.Failure as refused:
            yield dg.AssetCheckResult(check_name=ROLLOUT_AVAILABLE, passed=False,
                                      description=refused.description, metadata=evidence)
            raise
        yield dg.MaterializeResult(
            metadata=release_metadata(result, config.image_tag),
            check_results=[dg.AssetCheckResult(
                check_name=ROLLOUT_AVAILABLE, passed=True,
                description=f"{result.image} available: {result.rollout}",
                metadata={"image": result.image, "image_tag": config.image_tag, "image_digest": image.digest,
                          "revision": str(result.revision)},
            )],
        )

    return _release
