"""Roll a Deployment back to its previous ReplicaSet's pod template, as ``kubectl rollout undo`` does.

For the API 5xx > 1 % alert. The previous revision is the ReplicaSet owned by
the Deployment with the highest ``deployment.kubernetes.io/revision`` below
the current one; its template (without ``pod-template-hash``) is applied as the
releases' own rollback does (:func:`ops_platform.releases.roll_back`): the
live Deployment with the template replaced, under the release's field manager,
so the fields the release set and the old template lacks are removed.
"""

from __future__ import annotations

import copy
from typing import Any

from ops_platform.playbooks.base import (
    DeploymentParams,
    PlaybookContext,
    PlaybookRefused,
    PlaybookResult,
    apply_owned,
    existing,
)
from ops_platform.releases import POD_TEMPLATE_HASH, REVISION_ANNOTATION, PreviousRevision
from ops_platform.resources.kubernetes import FIELD_MANAGER, KubernetesClient

NAME = "rollback_deployment"


class RollbackParams(DeploymentParams):
    PLAYBOOK = NAME


def run(ctx: PlaybookContext, params: RollbackParams) -> PlaybookResult:
    ctx.check_namespace(NAME, params.namespace)
    kube = ctx.cluster(NAME, field_manager=FIELD_MANAGER)
    target, live = existing(kube, NAME, "apps/v1", "Deployment", params.deployment, params.namespace)
    current = _revision(live)
    previous = previous_replicaset(kube, live)
    if previous is None:
        raise PlaybookRefused(f"playbook {NAME}: {target} has no ReplicaSet older than revision {current} "
                              "to roll back to")
    applied = apply_owned(ctx, kube, NAME, target, _restored(live, previous.template))
    verb = "would roll back" if ctx.dry_run else "rolled back"
    return PlaybookResult(
        NAME, target, ctx.dry_run, applied.action != "unchanged",
        before={"revision": current, "images": _images(live["spec"]["template"])},
        after={"revision": previous.revision, "replicaset": previous.replicaset,
               "images": _images(applied.object["spec"]["template"])},
        summary=f"{verb} {target} from revision {current} to revision {previous.revision} "
                f"(ReplicaSet {previous.replicaset}){applied.note()}",
    )


def previous_replicaset(kube: KubernetesClient, deployment: dict[str, Any]) -> PreviousRevision | None:
    """The ReplicaSet of the revision before the Deployment's current one, with its template."""
    current = _revision_number(deployment)
    uid = deployment["metadata"].get("uid")
    older = []
    for replicaset in kube.list("apps/v1", "ReplicaSet", deployment["metadata"]["namespace"]):
        owners = replicaset["metadata"].get("ownerReferences") or []
        if not any(o.get("kind") == "Deployment" and o.get("uid") == uid for o in owners):
            continue
        revision = _revision_number(replicaset)
        if revision is not None and (current is None or revision < current):
            older.append((revision, replicaset))
    if not older:
        return None
    revision, replicaset = max(older, key=lambda item: item[0])
    template = copy.deepcopy(replicaset["spec"]["template"])
    (template.get("metadata", {}).get("labels") or {}).pop(POD_TEMPLATE_HASH, None)
    return PreviousRevision(str(revision), replicaset["metadata"]["name"], template)


def _restored(live: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    meta = live["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != REVISION_ANNOTATION}
    metadata: dict[str, Any] = {"name": meta["name"], "namespace": meta["namespace"]}
    if meta.get("labels"):
        metadata["labels"] = meta["labels"]
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
            "spec": {**copy.deepcopy(live["spec"]), "template": template}}


def _revision(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION)


def _revision_number(obj: dict[str, Any]) -> int | None:
    revision = _revision(obj)
    return int(revision) if revision and revision.isdigit() else None


def _images(template: dict[str, Any]) -> list[str]:
    return [c.get("image", "") for c in (template.get("spec") or {}).get("containers") or []]
