"""`infra/<layer>`: one asset per layer of the infra plan, depending on the layers it requires.

Materializing a layer server-side-applies its manifests and waits for them to
be ready; run config ``plan: true`` does a server-side dry run instead and
records the diff as an observation, changing nothing. Each layer has a
`drift` check and the plan's requirement checks of ``LAYER_CHECKS``.
"""

import dagster as dg

from ops_platform.assets.keys import INFRA_GROUP, layer_key
from ops_platform.errors import OpsPlatformError
from ops_platform.layer_checks import LAYER_CHECKS, CheckOutcome
from ops_platform.layers import LayerResult, apply_layer, detect_drift
from ops_platform.manifests import load_layer_manifests
from ops_platform.metadata import table
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.spec import Layer, Spec

DRIFT_CHECK = "drift"


class LayerConfig(dg.Config):
    plan: bool = False  # server-side dry run: show what would change, change nothing
    wait_timeout_seconds: float = 900.0


def build_layer_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_layer_asset(spec, layer) for layer in spec.layers_in_order()]


def build_layer_checks(spec: Spec) -> list[dg.AssetChecksDefinition]:
    checks: list[dg.AssetChecksDefinition] = []
    for layer in spec.layers:
        checks.append(_drift_check(layer))
        for name, function in LAYER_CHECKS.get(layer.name, []):
            checks.append(_requirement_check(layer, name, function))
    return checks


def layer_metadata(result: LayerResult) -> dict[str, object]:
    totals = result.totals()
    diffs = [f"**{o.ref}**\n```diff\n{o.diff}\n```" for o in result.objects if o.diff]
    return {
        **{name: dg.MetadataValue.int(count) for name, count in totals.items()},
        "objects": table(
            [{"object": o.ref, "action": o.action, "ready": o.ready, "reason": o.reason} for o in result.objects]
        ),
        **({"diff": dg.MetadataValue.md("\n\n".join(diffs))} if diffs else {}),
    }


def _layer_asset(spec: Spec, layer: Layer) -> dg.AssetsDefinition:
    key = layer_key(layer.name)

    @dg.asset(
        key=key,
        deps=[layer_key(required) for required in layer.requires],
        group_name=INFRA_GROUP,
        kinds={"kubernetes"},
        owners=[layer.owner or spec.platform.owner],
        pool="kube_api",
        output_required=False,
        description=f"§{layer.plan_section} {layer.title}. Manifests: `{layer.manifests}`.",
        metadata={"manifests": dg.MetadataValue.path(layer.manifests), "plan_section": layer.plan_section},
    )
    def _layer(context: dg.AssetExecutionContext, config: LayerConfig, kubernetes: KubernetesResource):
        kube = kubernetes.get_client()
        try:
            objects = load_layer_manifests(layer.manifests)
            result = apply_layer(kube, objects, plan=config.plan, wait_timeout=config.wait_timeout_seconds)
        except OpsPlatformError as error:
            raise dg.Failure(f"layer '{layer.name}': {error}") from None
        metadata = layer_metadata(result)
        if config.plan:
            context.log_event(dg.AssetObservation(asset_key=key, metadata={"plan": True, **metadata}))
            return
        if result.not_ready:
            raise dg.Failure(
                f"layer '{layer.name}': {len(result.not_ready)} object(s) not ready: "
                + "; ".join(f"{o.ref}: {o.reason}" for o in result.not_ready),
                metadata=metadata,
            )
        yield dg.MaterializeResult(metadata=metadata)

    return _layer


def _drift_check(layer: Layer) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=layer_key(layer.name), name=DRIFT_CHECK,
                    description="The live objects still match the layer's manifests.")
    def _check(kubernetes: KubernetesResource) -> dg.AssetCheckResult:
        report = detect_drift(kubernetes.get_client(), load_layer_manifests(layer.manifests))
        off = [row for row in report.rows if row.state != "in_sync"]
        return dg.AssetCheckResult(
            passed=not off,
            severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(f"{row.ref} {row.state}: {', '.join(row.differences)}" for row in off)[:2000]
            or "in sync",
            metadata={**{k: dg.MetadataValue.int(v) for k, v in report.counts().items()},
                      "objects": table([{"object": r.ref, "state": r.state,
                                         "differences": "; ".join(r.differences)} for r in report.rows])},
        )

    return _check


def _requirement_check(layer: Layer, name: str, function) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=layer_key(layer.name), name=name,
                    description=(function.__doc__ or name).strip().splitlines()[0])
    def _check(kubernetes: KubernetesResource) -> dg.AssetCheckResult:
        outcome: CheckOutcome = function(kubernetes.get_client())
        return dg.AssetCheckResult(
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.ERROR if outcome.severity == "ERROR" else dg.AssetCheckSeverity.WARN,
            description=outcome.description,
            metadata={"rows": table(outcome.rows)} if outcome.rows else {},
        )

    return _check
