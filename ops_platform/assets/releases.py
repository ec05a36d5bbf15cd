"""`apps/<service>/<env>`: releases of each service to each environment.

The image tag comes from run config (the image-tag sensor passes it). Prod
takes only an image digest that a staging release materialized before; every
release has a blocking `rollout_available` check, so in a run that releases
staging and prod, prod waits for staging to be proven.
"""

import dagster as dg

from ops_platform.assets.keys import APPS_GROUP, layer_key, release_key
from ops_platform.errors import OpsPlatformError
from ops_platform.metadata import table
from ops_platform.releases import ReleaseFailed, passed_staging, release, resolve_image, rollout_state
from ops_platform.resources.ecr import EcrResource
from ops_platform.resources.kubernetes import KubernetesResource
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
    if spec.images is None:
        return []
    return [
        _rollout_check(service, environment)
        for service in spec.images.services
        for environment in service.environments
    ]


def staging_history(instance: dg.DagsterInstance, service: str) -> list[dict[str, str]]:
    """The tags and digests that staging releases of ``service`` materialized."""
    records = instance.fetch_materializations(release_key(service, "staging"), limit=STAGING_HISTORY_LIMIT).records
    history = []
    for record in records:
        materialization = record.asset_materialization
        if materialization is None:
            continue
        metadata = materialization.metadata
        if "image_digest" in metadata and "image_tag" in metadata:
            history.append({"tag": str(metadata["image_tag"].value), "digest": str(metadata["image_digest"].value),
                            "at": str(record.timestamp)})
    return history


def _release_asset(spec: Spec, service: Service, environment: str) -> dg.AssetsDefinition:
    assert spec.images is not None
    repository = service.repository(environment)
    registry = spec.images.registry
    gated = environment == "prod" and "staging" in service.environments
    deps = [layer_key(layer) for layer in service.requires]
    if gated:
        deps.append(release_key(service.name, "staging"))

    @dg.asset(
        key=release_key(service.name, environment),
        deps=deps,
        group_name=APPS_GROUP,
        kinds={"kubernetes", "helm", "ecr"},
        owners=[service.owner or spec.platform.owner],
        pool="kube_api",
        description=(
            f"Release of {service.name} to {environment}: image from ECR repository "
            f"`{repository}`, chart `{service.chart}`, namespace `{service.namespace}`."
            + (" Takes only an image digest that passed staging." if gated else "")
        ),
        metadata={
            "repository": f"{registry.account}.dkr.ecr.{registry.region}.amazonaws.com/{repository}",
            "tag_pattern": service.tag_pattern,
            "chart": dg.MetadataValue.path(service.chart),
        },
    )
    def _release(
        context: dg.AssetExecutionContext,
        config: ReleaseConfig,
        kubernetes: KubernetesResource,
        ecr: EcrResource,
    ) -> dg.MaterializeResult:
        try:
            image = resolve_image(ecr.get_registry(), service, environment, config.image_tag)
        except OpsPlatformError as error:
            raise dg.Failure(f"release of {service.name} to {environment}: {error}") from None
        if config.image_digest and config.image_digest != image.digest:
            raise dg.Failure(
                f"release of {service.name}:{config.image_tag} to {environment}: ECR now has digest "
                f"{image.digest} for the tag, not {config.image_digest} (the tag was re-pushed); nothing applied"
            )
        if gated and not passed_staging(staging_history(context.instance, service.name), image.digest):
            raise dg.Failure(
                f"release of {service.name}:{config.image_tag} to prod refused: digest {image.digest} has not "
                f"been released to staging (materialize {release_key(service.name, 'staging').to_user_string()} "
                "with this tag first); nothing applied"
            )
        try:
            result = release(
                kubernetes.get_client(), service, environment, config.image_tag, image.digest,
                wait_timeout=config.wait_timeout_seconds,
            )
        except ReleaseFailed as failed:
            raise dg.Failure(
                f"release of {service.name}:{config.image_tag} to {environment} failed: {failed.reason}",
                metadata={"rollback": str(failed.rollback) if failed.rollback else "nothing to roll back"},
            ) from None
        except OpsPlatformError as error:
            raise dg.Failure(f"release of {service.name} to {environment}: {error}") from None
        return dg.MaterializeResult(
            metadata={
                "image_tag": config.image_tag,
                "image_digest": image.digest,
                "image": result.image,
                "revision": str(result.revision),
                "objects": table(
                    [{"object": ref, "action": action} for action, refs in
                     (("created", result.created), ("changed", result.changed), ("unchanged", result.unchanged))
                     for ref in refs]
                ),
            }
        )

    return _release


def _rollout_check(service: Service, environment: str) -> dg.AssetChecksDefinition:
    key = release_key(service.name, environment)

    @dg.asset_check(asset=key, name=ROLLOUT_AVAILABLE, blocking=True,
                    description="The Deployment runs the released image and all its replicas are available.")
    def _check(context: dg.AssetCheckExecutionContext, kubernetes: KubernetesResource) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            return dg.AssetCheckResult(passed=False, description="never released")
        image = str(event.asset_materialization.metadata["image"].value)
        deployments = kubernetes.get_client().list(
            "apps/v1", "Deployment", service.namespace, label_selector=f"app.kubernetes.io/name={service.name}"
        )
        if not deployments:
            return dg.AssetCheckResult(passed=False, description=f"no Deployment of {service.name} in {service.namespace}")
        problems = []
        for deployment in deployments:
            images = {c.get("image") for c in deployment["spec"]["template"]["spec"].get("containers", [])}
            state, why = rollout_state(deployment)
            if image not in images:
                problems.append(f"{deployment['metadata']['name']} runs {sorted(images)}, not {image}")
            elif state != "complete":
                problems.append(f"{deployment['metadata']['name']}: rollout {state} ({why})")
        return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or f"{image} available")

    return _check
