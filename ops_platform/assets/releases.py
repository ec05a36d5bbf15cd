"""`apps/<service>/<env>`: releases of each service to each environment."""


import dagster as dg

from ops_platform.assets.keys import APPS_GROUP, layer_key, release_key
from ops_platform.errors import NotImplementedYetError
from ops_platform.resources.ecr import EcrResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.spec import Service, Spec


class ReleaseConfig(dg.Config):
    image_tag: str
    image_digest: str | None = None


def build_release_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    if spec.images is None:
        return []
    return [
        _release_asset(spec, service, environment)
        for service in spec.images.services
        for environment in service.environments
    ]


def _release_asset(spec: Spec, service: Service, environment: str) -> dg.AssetsDefinition:
    assert spec.images is not None
    repository = service.repository(environment)
    registry = spec.images.registry

    @dg.asset(
        key=release_key(service.name, environment),
        deps=[layer_key(layer) for layer in service.requires],
        group_name=APPS_GROUP,
        kinds={"kubernetes", "helm", "ecr"},
        owners=[service.owner or spec.platform.owner],
        description=(
            f"Release of {service.name} to {environment}: image from ECR repository "
            f"`{repository}`, chart `{service.chart}`, namespace `{service.namespace}`."
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
    ) -> None:
        ecr.get_registry()
        kubernetes.get_client()
        raise NotImplementedYetError(
            "releases",
            f"releasing {service.name}:{config.image_tag} to {environment}",
            "the infrastructure-layers and releases issue",
        )

    return _release
