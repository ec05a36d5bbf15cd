"""`infra/<layer>`: one asset per layer of the infra plan, depending on the layers it requires."""


import dagster as dg

from ops_platform.assets.keys import INFRA_GROUP, layer_key
from ops_platform.errors import NotImplementedYetError
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.spec import Layer, Spec


def build_layer_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_layer_asset(spec, layer) for layer in spec.layers_in_order()]


def _layer_asset(spec: Spec, layer: Layer) -> dg.AssetsDefinition:
    @dg.asset(
        key=layer_key(layer.name),
        deps=[layer_key(required) for required in layer.requires],
        group_name=INFRA_GROUP,
        kinds={"kubernetes"},
        owners=[layer.owner or spec.platform.owner],
        description=f"§{layer.plan_section} {layer.title}. Manifests: `{layer.manifests}`.",
        metadata={"manifests": dg.MetadataValue.path(layer.manifests), "plan_section": layer.plan_section},
    )
    def _layer(context: dg.AssetExecutionContext, kubernetes: KubernetesResource) -> None:
        kubernetes.get_client()
        raise NotImplementedYetError(
            "infra layers",
            f"applying layer '{layer.name}' ({layer.manifests})",
            "the infrastructure-layers issue",
        )

    return _layer
