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

A field another field manager owns (an autoscaler's replicas) fails the apply
with both named and nothing changed; run config ``force_conflicts: true``
takes such fields over.

Layer runs run as the ServiceAccount ``ops-platform-infra``
(infra/dagster/rbac.yaml), every other run as ``ops-platform``: the K8sRunLauncher
reads the run tag ``dagster-k8s/config`` (run tags only, never op or asset
tags), which the job :data:`INFRA_JOB` carries for every run launched from it,
by hand, schedule or sensor. Its name sorts before ``__ASSET_JOB``: the UI's
Materialize button launches the first job (by name) that every selected
asset is in, so materializing layers from the asset graph launches this job too.
A selection that mixes layers with other assets has only ``__ASSET_JOB`` in
common: in a pod such a run is refused before it applies anything, rather
than half-applying a layer as ``ops-platform`` until the first 403.
"""

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

DRIFT_CHECK = "drift"
DESCRIPTION_MAX_CHARS = 2000
INFRA_SERVICE_ACCOUNT = "ops-platform-infra"
K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY
INFRA_RUN_TAGS = {K8S_CONFIG_TAG: json.dumps({"pod_spec_config": {"service_account_name": INFRA_SERVICE_ACCOUNT}})}
# Upper case sorts before "__ASSET_JOB": the job the UI launches for a Materialize of layers.
INFRA_JOB = "INFRA_layers"


class LayerConfig(dg.Config):
    plan: bool = False  # server-side dry run: show what would change, change nothing
    wait_timeout_seconds: float = 900.0
    force_conflicts: bool = False  # take over fields other field managers own instead of failing


def build_layer_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [_layer_asset(spec, layer) for layer in spec.layers_in_order()]


def build_layer_jobs(spec: Spec) -> "list[UnresolvedAssetJobDefinition]":
    """The job of every layer run: its tags make the run pod run as ``ops-platform-infra``."""
    return [
        dg.define_asset_job(
            INFRA_JOB,
            selection=dg.AssetSelection.assets(*(layer_key(layer.name) for layer in spec.layers_in_order())),
            description="Apply the infra layers (run config `plan: true`: a dry run) as the ServiceAccount "
            f"{INFRA_SERVICE_ACCOUNT}.",
            tags=INFRA_RUN_TAGS,
        )
    ]


def runs_as_infra(tags: Mapping[str, str]) -> bool:
    """Whether a run with these tags runs, under the K8sRunLauncher, as :data:`INFRA_SERVICE_ACCOUNT`."""
    try:
        config = json.loads(tags.get(K8S_CONFIG_TAG) or "{}")
    except ValueError:
        return False
    return (config.get("pod_spec_config") or {}).get("service_account_name") == INFRA_SERVICE_ACCOUNT


def wrong_identity() -> str:
    return (f"refused before applying anything: this run pod runs as the launcher's ServiceAccount, not "
            f"{INFRA_SERVICE_ACCOUNT} (the run has no tag {K8S_CONFIG_TAG} naming it, so it was not launched "
            f"from job {INFRA_JOB}: a selection mixing layers with other assets launches __ASSET_JOB); "
            f"launch job {INFRA_JOB}, or materialize layers only")


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
                if kubernetes.uses_pod_service_account() and not runs_as_infra(context.run.tags):
                    raise failure(prefix, wrong_identity())
                kube = kubernetes.get_client()
                objects = load_layer_manifests(layer.manifests)
                result = apply_layer(kube, objects, plan=config.plan, wait_timeout=config.wait_timeout_seconds,
                                     force=config.force_conflicts)
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
