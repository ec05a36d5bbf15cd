"""Scale a Deployment out by a step (or to a wanted count) within the remediation's limits.

When a HorizontalPodAutoscaler targets the Deployment, its ``minReplicas`` is
raised instead of ``spec.replicas``: the HPA owns the replica count and would
scale a directly patched Deployment straight back to what its metrics say, so
the floor is the only lasting lever. The HPA's own ``maxReplicas`` is a limit
too. The defaults 2 and 10 are the HPA of InfraSpec §3.3.
"""

from __future__ import annotations

from typing import Any

from ops_platform.playbooks.base import (
    DeploymentParams,
    PlaybookContext,
    PlaybookRefused,
    PlaybookResult,
    apply_owned,
    existing,
    object_name,
)
from ops_platform.resources.kubernetes import KubernetesClient

NAME = "scale_workload"
# The playbook reads and sets only scaleTargetRef, minReplicas and maxReplicas, all of autoscaling/v1,
# which every Kubernetes version serves (autoscaling/v2 only from 1.23, v2beta2 only until 1.25); the
# server converts, so the metrics and behavior a release applied in v2 are kept.
HPA_API = "autoscaling/v1"


class ScaleParams(DeploymentParams):
    PLAYBOOK = NAME


def run(
    ctx: PlaybookContext,
    params: ScaleParams,
    *,
    replicas: int | None = None,
    step: int = 1,
    min_replicas: int = 2,
    max_replicas: int = 10,
) -> PlaybookResult:
    """Scale to ``replicas``, or to the current count + ``step``, kept within ``[min_replicas, max_replicas]``."""
    if not 1 <= min_replicas <= max_replicas:
        raise PlaybookRefused(f"playbook {NAME}: min_replicas {min_replicas} and max_replicas {max_replicas} "
                              "must satisfy 1 <= min <= max")
    ctx.check_namespace(NAME, params.namespace)
    kube = ctx.cluster(NAME)
    target, deployment = existing(kube, NAME, "apps/v1", "Deployment", params.deployment, params.namespace)
    hpa = _hpa_of(kube, params.namespace, params.deployment)
    if hpa is not None:
        return _raise_hpa_floor(ctx, kube, params, hpa, replicas, step, min_replicas, max_replicas)
    current = deployment["spec"].get("replicas", 1)
    wanted = replicas if replicas is not None else current + step
    target_count = max(min_replicas, min(wanted, max_replicas))
    if target_count == current:
        return _unchanged(ctx, target, {"replicas": current}, wanted, min_replicas, max_replicas)
    applied = apply_owned(
        ctx, kube, NAME, target,
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": params.deployment, "namespace": params.namespace},
         "spec": {"replicas": target_count}},
    )
    verb = "would scale" if ctx.dry_run else "scaled"
    return PlaybookResult(
        NAME, target, ctx.dry_run, True,
        before={"replicas": current},
        after={"replicas": applied.object["spec"].get("replicas")},
        summary=f"{verb} {target} from {current} to {target_count} replicas{_capped(wanted, target_count)}"
                f"{applied.note()}",
    )


def _raise_hpa_floor(
    ctx: PlaybookContext,
    kube: KubernetesClient,
    params: ScaleParams,
    hpa: dict[str, Any],
    replicas: int | None,
    step: int,
    min_replicas: int,
    max_replicas: int,
) -> PlaybookResult:
    spec = hpa["spec"]
    name = hpa["metadata"]["name"]
    ceiling = min(max_replicas, spec.get("maxReplicas", max_replicas))
    current = spec.get("minReplicas", 1)
    wanted = replicas if replicas is not None else current + step
    floor = max(min(min_replicas, ceiling), min(wanted, ceiling))
    target = object_name("HorizontalPodAutoscaler", params.namespace, name)
    before = {"minReplicas": current, "maxReplicas": spec.get("maxReplicas")}
    if floor == current:
        return _unchanged(ctx, target, before, wanted, min_replicas, ceiling)
    applied = apply_owned(
        ctx, kube, NAME, target,
        {"apiVersion": HPA_API, "kind": "HorizontalPodAutoscaler",
         "metadata": {"name": name, "namespace": params.namespace},
         "spec": {"minReplicas": floor}},
    )
    after_spec = applied.object["spec"]
    verb = "would raise" if ctx.dry_run else "raised"
    return PlaybookResult(
        NAME, target, ctx.dry_run, True,
        before=before,
        after={"minReplicas": after_spec.get("minReplicas"), "maxReplicas": after_spec.get("maxReplicas")},
        summary=(f"{verb} minReplicas of {target} (which scales Deployment {params.deployment}) from {current} "
                 f"to {floor}{_capped(wanted, floor)}{applied.note()}"),
    )


def _hpa_of(kube: KubernetesClient, namespace: str, deployment: str) -> dict[str, Any] | None:
    for hpa in kube.list(HPA_API, "HorizontalPodAutoscaler", namespace):
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        if ref.get("kind") == "Deployment" and ref.get("name") == deployment:
            return hpa
    return None


def _unchanged(ctx: PlaybookContext, target: str, state: dict[str, Any], wanted: int,
               min_replicas: int, max_replicas: int) -> PlaybookResult:
    return PlaybookResult(
        NAME, target, ctx.dry_run, False, before=state, after=state,
        summary=f"{target} left as is: {wanted} wanted, kept within [{min_replicas}, {max_replicas}], "
                f"already {next(iter(state.values()))}",
    )


def _capped(wanted: int, got: int) -> str:
    return f" ({wanted} wanted, kept within the limits)" if wanted != got else ""
