"""What every playbook shares: its context, its parameters, its result, its refusals.

A playbook is one function ``run(ctx, params, **options) -> PlaybookResult``:
``params`` come from the alert's labels (:meth:`PlaybookParams.from_labels`),
``options`` from the remediation's configuration (limits, steps). Every
playbook checks the target namespace against ``ctx.allowed_namespaces``
before any request, honours ``ctx.dry_run`` (server-side dry run, or no
write at all) and reports the target as it was before and after.

Playbooks write with :func:`apply_owned`: a server-side apply without
``force``, so a field another field manager owns (an HPA's controller, a
person's ``kubectl``) is reported by name and left alone, never taken; only a
field of the platform's own releases is taken over, and said so
(:data:`OWN_FIELD_MANAGERS`); a playbook may also take a field from any manager
when it says why none can take it back (``take_over_because``: a claim's
storage request only grows).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from ops_platform.errors import OpsPlatformError
from ops_platform.resources.kubernetes import (
    CLUSTER_SETTING,
    FIELD_MANAGER,
    ApplyResult,
    FieldConflict,
    FieldOwner,
    KubernetesClient,
)

# The releases apply whole objects as "ops-platform"; a playbook applying a
# minimal patch under that same manager would make the server drop every field
# the release set and the patch does not list. Playbooks own only what they set.
PLAYBOOK_FIELD_MANAGER = "ops-platform-playbooks"
# Field managers of this code location whose fields a playbook may take over: the releases own what
# they applied (an HPA's minReplicas) and the next release sets it back, so the playbook does not
# take anything from outside the platform. Every other manager's field is a conflict, reported.
OWN_FIELD_MANAGERS = (FIELD_MANAGER,)
RELEASE_SETS_IT_BACK = "the next release sets it back"
# Labels naming a workload that is not a Deployment (kube-state-metrics names).
OTHER_WORKLOAD_LABELS = ("statefulset", "daemonset", "replicaset", "job", "cronjob")

# A namespace or object name (DNS-1123 subdomain).
KubeName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]

# Run tag of a playbook run its guards refused (cooldown, allow-list): the guard held, nothing changed.
REFUSED_TAG = "ops_platform/refused"


class PlaybookRefused(OpsPlatformError):
    """The playbook did nothing: target outside the allow-list, missing label, not allowed by a limit."""


class PlaybookFailed(OpsPlatformError):
    """The playbook acted but the target did not reach the wanted state."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class PlaybookContext:
    """What a playbook runs against.

    ``kube`` None: no cluster is configured (playbooks that need one refuse).
    ``allowed_namespaces`` empty: any namespace (the remediation's ``namespaces``).
    """

    kube: KubernetesClient | None
    dry_run: bool = False
    allowed_namespaces: list[str] = field(default_factory=list)
    clock: Callable[[], datetime] = utc_now

    def check_namespace(self, playbook: str, namespace: str) -> None:
        if self.allowed_namespaces and namespace not in self.allowed_namespaces:
            raise PlaybookRefused(
                f"playbook {playbook}: namespace {namespace!r} is not in the allow-list "
                f"{self.allowed_namespaces} (remediations[].namespaces in infra/platform.yaml)"
            )

    def cluster(self, playbook: str, *, field_manager: str = PLAYBOOK_FIELD_MANAGER) -> KubernetesClient:
        """The client writing as ``field_manager``; refuses when no cluster is configured."""
        if self.kube is None:
            raise PlaybookRefused(f"playbook {playbook}: no Kubernetes cluster is configured (check {CLUSTER_SETTING})")
        if self.kube.field_manager == field_manager:
            return self.kube
        client = copy.copy(self.kube)
        client.field_manager = field_manager
        return client


def existing(
    kube: KubernetesClient, playbook: str, api_version: str, kind: str, name: str, namespace: str | None
) -> tuple[str, dict[str, Any]]:
    """The object's name for messages and the live object; refuses when it does not exist."""
    target = object_name(kind, namespace, name)
    live = kube.get(api_version, kind, name, namespace)
    if live is None:
        raise PlaybookRefused(f"playbook {playbook}: {target} does not exist")
    return target, live


@dataclass(frozen=True)
class PlaybookResult:
    playbook: str
    target: str
    dry_run: bool
    changed: bool
    """Whether the target was (or, in a dry run, would be) changed."""
    before: dict[str, Any]
    after: dict[str, Any]
    summary: str

    def as_metadata(self) -> dict[str, Any]:
        """Plain JSON-able values for the run's metadata."""
        return {"playbook": self.playbook, "target": self.target, "dry_run": self.dry_run,
                "changed": self.changed, "before": self.before, "after": self.after, "summary": self.summary}


class PlaybookParams(BaseModel):
    """Parameters of a playbook, read from the alert's labels.

    ``LABELS`` maps a field to the label carrying it when the names differ.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    PLAYBOOK: ClassVar[str] = ""
    LABELS: ClassVar[dict[str, str]] = {}
    # How :meth:`target` names a field when the label's name does not say the kind (``name``).
    TARGET_NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_labels(cls, labels: Mapping[str, Any]) -> PlaybookParams:
        """Pick this playbook's labels among the alert's many; refuse naming a missing or bad label."""
        if not isinstance(labels, Mapping):
            raise PlaybookRefused(f"playbook {cls.PLAYBOOK}: the alert's labels are not a mapping: {labels!r}")
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            label = cls.LABELS.get(name, name)
            value = labels.get(label)
            if value in (None, ""):
                raise PlaybookRefused(f"playbook {cls.PLAYBOOK}: the alert has no label {label!r}"
                                      f"{cls.missing_hint(label, labels)}")
            values[name] = value
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"label {cls.LABELS.get(str(e['loc'][0]), str(e['loc'][0]))!r}: {e['msg']}" for e in exc.errors()
            )
            raise PlaybookRefused(f"playbook {cls.PLAYBOOK}: {problems}") from None

    @classmethod
    def missing_hint(cls, label: str, labels: Mapping[str, Any]) -> str:
        """What to add to "the alert has no label": why the alert is not one this playbook acts on."""
        return ""

    def target(self) -> str:
        """The object acted on, ``<namespace>/<kind>=<name>`` (``<kind>=<name>`` outside namespaces).

        Cooldowns and the run tag ``ops_platform/target`` are per target: two Certificates of one
        namespace are two targets.
        """
        fields = self.model_dump()
        namespace = fields.pop("namespace", None)
        named = ",".join(f"{self.TARGET_NAMES.get(name, self.LABELS.get(name, name))}={value}"
                         for name, value in fields.items())
        return f"{namespace}/{named}" if namespace else named


class DeploymentParams(PlaybookParams):
    """The parameters of the playbooks that act on one Deployment."""

    namespace: KubeName
    deployment: KubeName

    @classmethod
    def missing_hint(cls, label: str, labels: Mapping[str, Any]) -> str:
        if label != "deployment":
            return ""
        for other in OTHER_WORKLOAD_LABELS:
            if labels.get(other):
                return f" (it names {other} {labels[other]!r}: {cls.PLAYBOOK} acts on Deployments only)"
        if labels.get("pod"):
            return (f" (pod {labels['pod']!r} is not named as a Deployment's pod, e.g. a StatefulSet's or a "
                    f"bare pod: {cls.PLAYBOOK} acts on Deployments only)")
        return ""


@dataclass(frozen=True)
class OwnedApply:
    """What :func:`apply_owned` did: the server's answer, the fields taken from other managers and why."""

    result: ApplyResult
    taken: tuple[FieldOwner, ...] = ()
    reason: str = ""

    @property
    def object(self) -> dict[str, Any]:
        return self.result.object

    @property
    def action(self) -> str:
        return self.result.action

    def note(self) -> str:
        """For the summary: the fields taken over, from which managers, and why."""
        if not self.taken:
            return ""
        fields = ", ".join(f"{owner.field} from {owner.manager!r}" for owner in self.taken)
        return f" (took over {fields}: {self.reason})"


def apply_owned(ctx: PlaybookContext, kube: KubernetesClient, playbook: str, target: str,
                manifest: dict[str, Any], *, take_over_because: str | None = None) -> OwnedApply:
    """Server-side apply without ``force``; refuse naming the manager of any field another party owns.

    A conflict only with :data:`OWN_FIELD_MANAGERS` (a release's field) is applied again with
    ``force`` and reported in :attr:`OwnedApply.taken`; so is a conflict with any manager when
    ``take_over_because`` says why that manager cannot take the field back.
    """
    try:
        return OwnedApply(kube.apply(manifest, dry_run=ctx.dry_run, force=False))
    except FieldConflict as conflict:
        foreign = [owner for owner in conflict.conflicts if owner.manager not in OWN_FIELD_MANAGERS]
        if foreign and take_over_because is None:
            owned = ", ".join(f"{owner.field} is owned by field manager {owner.manager!r}" for owner in foreign)
            raise PlaybookRefused(
                f"playbook {playbook}: {target}: {owned}; the playbook left it unchanged rather than take it "
                f"from {', '.join(sorted({o.manager for o in foreign}))} (change it through that manager, or "
                "have it drop the field, then run the playbook again)"
            ) from None
        reason = take_over_because if foreign else RELEASE_SETS_IT_BACK
        return OwnedApply(kube.apply(manifest, dry_run=ctx.dry_run, force=True), conflict.conflicts, reason)


def object_name(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"
