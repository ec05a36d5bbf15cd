"""`infra/<layer>`: one asset per layer of the infra plan, depending on the layers it requires.

Materializing a layer server-side-applies its manifests and waits for them to
be ready; run config ``plan: true`` does a server-side dry run instead and
records the diff as an observation, changing nothing.

Each layer declares a `drift` check (WARN) and the plan's requirement checks
of ``LAYER_CHECKS``; the layer's own run yields them, in its one step: after an
apply, drift and requirements against the live cluster; in a plan, drift is
the plan's diff (what the apply would change) and the requirements are
checked against the live cluster as it stands. When the apply fails (an error,
or objects not ready) every check fails with the reason and the run fails. A
check that cannot be evaluated after a good apply (the API server went away)
fails with the reason; the apply still materializes, since it happened.
"""

from collections.abc import Callable

import dagster as dg

from ops_platform.assets.failures import failure, known_errors
from ops_platform.assets.keys import INFRA_GROUP, layer_key
from ops_platform.errors import OpsPlatformError
from ops_platform.layer_checks import LAYER_CHECKS, CheckOutcome, LayerCheck
from ops_platform.layers import DriftReport, LayerResult, apply_layer, detect_drift
from ops_platform.manifests import load_layer_manifests
from ops_platform.metadata import table
from ops_platform.resources.kubernetes import KubernetesClient, KubernetesResource
from ops_platform.spec import Layer, Spec

DRIFT_CHECK = "drift"
DESCRIPTION_MAX_CHARS = 2000


class LayerConfig(dg.Config):
    plan: bool = False  # server-side dry run: show what would change, change nothing
    wait_timeout_seconds: float = 900.0


def build_layer_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_layer_asset(spec, layer) for layer in spec.layers_in_order()]


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


def drift_result(report: DriftReport) -> dg.AssetCheckResult:
    """`drift` after an apply: the live objects against the manifests."""
    off = [row for row in report.rows if row.state != "in_sync"]
    return dg.AssetCheckResult(
        check_name=DRIFT_CHECK,
        passed=not off,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(f"{row.ref} {row.state}: {', '.join(row.differences)}" for row in off)
        [:DESCRIPTION_MAX_CHARS] or "in sync",
        metadata={**{k: dg.MetadataValue.int(v) for k, v in report.counts().items()},
                  "objects": table([{"object": r.ref, "state": r.state,
                                     "differences": "; ".join(r.differences)} for r in report.rows])},
    )


def plan_drift_result(result: LayerResult) -> dg.AssetCheckResult:
    """`drift` in a plan: what applying the manifests would create or change."""
    off = [o for o in result.objects if o.action != "unchanged"]
    return dg.AssetCheckResult(
        check_name=DRIFT_CHECK,
        passed=not off,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(f"{o.ref} {o.action}" + (f" ({o.reason})" if o.reason else "") for o in off)
        [:DESCRIPTION_MAX_CHARS] or "in sync: the plan changes nothing",
        metadata={"plan": True, **layer_metadata(result)},
    )


def requirement_result(name: str, check: LayerCheck, kube: KubernetesClient) -> dg.AssetCheckResult:
    try:
        outcome: CheckOutcome = check(kube)
    except OpsPlatformError as error:
        return dg.AssetCheckResult(check_name=name, passed=False, description=f"could not be checked: {error}")
    return dg.AssetCheckResult(
        check_name=name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.ERROR if outcome.severity == "ERROR" else dg.AssetCheckSeverity.WARN,
        description=outcome.description,
        metadata={"rows": table(outcome.rows)} if outcome.rows else {},
    )


def _drift_after_apply(kube: KubernetesClient, objects: list[dict]) -> dg.AssetCheckResult:
    try:
        return drift_result(detect_drift(kube, objects))
    except OpsPlatformError as error:
        return dg.AssetCheckResult(check_name=DRIFT_CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   description=f"could not be checked: {error}")


def _layer_asset(spec: Spec, layer: Layer) -> dg.AssetsDefinition:
    key = layer_key(layer.name)
    requirements: list[tuple[str, LayerCheck]] = LAYER_CHECKS.get(layer.name, [])

    @dg.asset(
        key=key,
        deps=[layer_key(required) for required in layer.requires],
        group_name=INFRA_GROUP,
        kinds={"kubernetes"},
        owners=[layer.owner or spec.platform.owner],
        pool="kube_api",
        output_required=False,
        check_specs=[
            dg.AssetCheckSpec(DRIFT_CHECK, asset=key,
                              description="The live objects match the layer's manifests (in a plan: the apply "
                              "would change nothing)."),
            *[dg.AssetCheckSpec(name, asset=key, description=_first_line(check, name))
              for name, check in requirements],
        ],
        description=f"§{layer.plan_section} {layer.title}. Manifests: `{layer.manifests}`.",
        metadata={"manifests": dg.MetadataValue.path(layer.manifests), "plan_section": layer.plan_section},
    )
    def _layer(context: dg.AssetExecutionContext, config: LayerConfig, kubernetes: KubernetesResource):
        prefix = f"layer '{layer.name}'" + (" plan" if config.plan else "")
        try:
            with known_errors(prefix):
                kube = kubernetes.get_client()
                objects = load_layer_manifests(layer.manifests)
                result = apply_layer(kube, objects, plan=config.plan, wait_timeout=config.wait_timeout_seconds)
                metadata = layer_metadata(result)
                if result.not_ready:
                    raise failure(prefix, f"{len(result.not_ready)} object(s) not ready: " + "; ".join(
                        f"{o.ref}: {o.reason}" for o in result.not_ready), metadata)
        except dg.Failure as failed:
            reason = f"not checked: {failed.description}"[:DESCRIPTION_MAX_CHARS]
            yield dg.AssetCheckResult(check_name=DRIFT_CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                      description=reason)
            for name, _ in requirements:
                yield dg.AssetCheckResult(check_name=name, passed=False, description=reason)
            raise
        checks = [
            plan_drift_result(result) if config.plan else _drift_after_apply(kube, objects),
            *(requirement_result(name, check, kube) for name, check in requirements),
        ]
        if config.plan:
            context.log_event(dg.AssetObservation(asset_key=key, metadata={"plan": True, **metadata}))
            yield from checks
            return
        yield dg.MaterializeResult(metadata=metadata, check_results=checks)

    return _layer


def _first_line(check: Callable, name: str) -> str:
    return (check.__doc__ or name).strip().splitlines()[0]
