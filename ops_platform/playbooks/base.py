"""What every playbook shares: its context, its parameters, its result, its refusals.

A playbook is one function ``run(ctx, params, **options) -> PlaybookResult``:
``params`` come from the alert's labels (:meth:`PlaybookParams.from_labels`),
``options`` from the remediation's configuration (limits, steps). Every
playbook checks the target namespace against ``ctx.allowed_namespaces``
before any request, honours ``ctx.dry_run`` (server-side dry run, or no
write at all) and reports the target as it was before and after.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from ops_platform.errors import OpsPlatformError
from ops_platform.resources.kubernetes import CLUSTER_SETTING, KubernetesClient

# The releases apply whole objects as "ops-platform"; a playbook applying a
# minimal patch under that same manager would make the server drop every field
# the release set and the patch does not list. Playbooks own only what they set.
PLAYBOOK_FIELD_MANAGER = "ops-platform-playbooks"

# A namespace or object name (DNS-1123 subdomain).
KubeName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]


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
                raise PlaybookRefused(f"playbook {cls.PLAYBOOK}: the alert has no label {label!r}")
            values[name] = value
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"label {cls.LABELS.get(str(e['loc'][0]), str(e['loc'][0]))!r}: {e['msg']}" for e in exc.errors()
            )
            raise PlaybookRefused(f"playbook {cls.PLAYBOOK}: {problems}") from None


def object_name(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"
