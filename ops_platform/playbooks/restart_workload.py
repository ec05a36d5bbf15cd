"""Rollout restart of a Deployment, as ``kubectl rollout restart`` does.

Sets the pod template annotation ``kubectl.kubernetes.io/restartedAt`` to now;
the Deployment controller then replaces every pod with a new ReplicaSet.
"""

from __future__ import annotations

from ops_platform.playbooks.base import (
    DeploymentParams,
    PlaybookContext,
    PlaybookResult,
    apply_owned,
    existing,
)

NAME = "restart_workload"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


class RestartParams(DeploymentParams):
    PLAYBOOK = NAME


def run(ctx: PlaybookContext, params: RestartParams) -> PlaybookResult:
    ctx.check_namespace(NAME, params.namespace)
    kube = ctx.cluster(NAME)
    target, live = existing(kube, NAME, "apps/v1", "Deployment", params.deployment, params.namespace)
    restarted_at = ctx.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": params.deployment, "namespace": params.namespace},
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: restarted_at}}}},
    }
    applied = apply_owned(ctx, kube, NAME, target, patch)
    verb = "would restart" if ctx.dry_run else "restarted"
    return PlaybookResult(
        playbook=NAME,
        target=target,
        dry_run=ctx.dry_run,
        changed=applied.action != "unchanged",
        before=_restart_state(live),
        after=_restart_state(applied.object),
        summary=f"{verb} {target} (pod template annotation {RESTARTED_AT}={restarted_at}){applied.note()}",
    )


def _restart_state(deployment: dict) -> dict:
    template = deployment["spec"]["template"]
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    return {
        "restartedAt": annotations.get(RESTARTED_AT),
        "generation": deployment["metadata"].get("generation"),
        "replicas": deployment["spec"].get("replicas"),
    }
