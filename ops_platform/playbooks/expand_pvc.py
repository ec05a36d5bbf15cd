"""Grow a PersistentVolumeClaim by a step, up to a limit, when its StorageClass allows expansion.

The new request is the current one plus ``step_percent`` (at least
``min_step``), rounded up to a whole GiB and capped at ``limit``. The CSI
driver then resizes the volume (and the filesystem, on the next mount or
online). A StorageClass without ``allowVolumeExpansion: true`` would make the
API server reject the change, so the playbook refuses first, naming the class.

The request is always someone else's field: the StatefulSet controller's
(``kube-controller-manager``, which made the claim from its
``volumeClaimTemplates`` and never sets it again), a chart's or a person's.
The playbook takes it over and names that manager in the summary: the API
server refuses a smaller request, so no manager can take the growth back.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from ops_platform.playbooks.base import (
    KubeName,
    PlaybookContext,
    PlaybookParams,
    PlaybookRefused,
    PlaybookResult,
    apply_owned,
    existing,
)

NAME = "expand_pvc"
ONLY_GROWS = ("a claim's storage request only grows (the API server refuses a smaller one), "
              "so no manager can shrink it back")
GI = 1024**3
_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([+]?[0-9]*\.?[0-9]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?)$")


class ExpandParams(PlaybookParams):
    PLAYBOOK = NAME
    namespace: KubeName
    persistentvolumeclaim: KubeName


def parse_quantity(quantity: str | int) -> int:
    """Bytes in a Kubernetes quantity (``10Gi``, ``500M``, ``1.5Ti``, ``1e9``), rounded up."""
    text = str(quantity).strip()
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number) * (Decimal(10) ** int(exponent[1:]) if exponent else 1)
    except InvalidOperation:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}") from None
    factor = _BINARY.get(suffix or "") or _DECIMAL[suffix or ""]
    return math.ceil(value * factor)


def format_quantity(size: int) -> str:
    """The shortest exact binary form: ``1099511627776`` -> ``1Ti``, ``1536Mi`` stays ``1536Mi``."""
    for suffix, factor in sorted(_BINARY.items(), key=lambda item: -item[1]):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def next_size(current: int, *, step_percent: float, min_step: int, limit: int) -> int:
    grown = current + max(math.ceil(current * step_percent / 100), min_step)
    return min(math.ceil(grown / GI) * GI, limit)


def run(
    ctx: PlaybookContext,
    params: ExpandParams,
    *,
    step_percent: float = 20.0,
    min_step: str = "1Gi",
    limit: str = "1Ti",
) -> PlaybookResult:
    try:
        min_step_bytes, limit_bytes = parse_quantity(min_step), parse_quantity(limit)
    except ValueError as exc:
        raise PlaybookRefused(f"playbook {NAME}: {exc} (min_step / limit of the remediation)") from None
    ctx.check_namespace(NAME, params.namespace)
    kube = ctx.cluster(NAME)
    target, pvc = existing(kube, NAME, "v1", "PersistentVolumeClaim", params.persistentvolumeclaim, params.namespace)
    class_name = pvc["spec"].get("storageClassName")
    if not class_name:
        raise PlaybookRefused(f"playbook {NAME}: {target} has no storageClassName; it cannot be expanded")
    storage_class = kube.get("storage.k8s.io/v1", "StorageClass", class_name)
    if storage_class is None:
        raise PlaybookRefused(f"playbook {NAME}: StorageClass {class_name!r} of {target} does not exist")
    if storage_class.get("allowVolumeExpansion") is not True:
        raise PlaybookRefused(f"playbook {NAME}: StorageClass {class_name!r} of {target} does not allow volume "
                              "expansion (allowVolumeExpansion is not true)")
    requested = ((pvc["spec"].get("resources") or {}).get("requests") or {}).get("storage")
    try:
        current = parse_quantity(requested)
    except ValueError as exc:
        raise PlaybookRefused(f"playbook {NAME}: {target} spec.resources.requests.storage: {exc}") from None
    before = {"storage": requested, "capacity": ((pvc.get("status") or {}).get("capacity") or {}).get("storage"),
              "storageClassName": class_name}
    wanted = next_size(current, step_percent=step_percent, min_step=min_step_bytes, limit=limit_bytes)
    if wanted <= current:
        return PlaybookResult(NAME, target, ctx.dry_run, False, before=before, after=before,
                              summary=f"{target} left as is: {requested} is already at the limit {limit}")
    applied = apply_owned(
        ctx, kube, NAME, target,
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": params.persistentvolumeclaim, "namespace": params.namespace},
         "spec": {"resources": {"requests": {"storage": format_quantity(wanted)}}}},
        take_over_because=ONLY_GROWS,
    )
    new_request = applied.object["spec"]["resources"]["requests"]["storage"]
    capped = f" (capped at the limit {limit})" if wanted == limit_bytes else ""
    verb = "would grow" if ctx.dry_run else "grew"
    return PlaybookResult(
        NAME, target, ctx.dry_run, True, before=before,
        after={**before, "storage": new_request},
        summary=f"{verb} the request of {target} from {requested} to {new_request}{capped}{applied.note()}",
    )
