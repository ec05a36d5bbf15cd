"""What a compliance control is, what it finds, and how its result is scored.

A :class:`Control` is a small function over an evidence snapshot that judges
objects one by one and yields an :class:`Outcome` per object (passed or not,
and why). :func:`ops_platform.compliance.report.evaluate` turns outcomes into
:class:`Finding` s (adding the control's severity and remediation, the
exception that excuses a failure, the manifest file an object came from) and
scores each control in a :class:`ControlResult`.

Framework ids are those of the CIS Kubernetes Benchmark v1.8 (the EKS
benchmark where the control is about the managed control plane).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ops_platform.compliance.evidence import Evidence
    from ops_platform.spec import Spec

Severity = Literal["ERROR", "WARN", "INFO"]
EvidenceKind = Literal["cluster", "graph", "manifests"]
SEVERITIES: tuple[Severity, ...] = ("ERROR", "WARN", "INFO")
CIS_BENCHMARK = "CIS Kubernetes Benchmark v1.8"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One object judged by one control.

    ``object`` names it as ``"Kind namespace/name"`` (``"Kind name"`` when it
    is cluster-scoped); ``link`` points at the run or URL that produced the
    evidence, when there is one.
    """

    object: str
    passed: bool
    message: str
    link: str | None = None


@dataclass(frozen=True)
class ControlConfig:
    """What the controls need to know about this platform that the objects do not say."""

    app_namespaces: tuple[str, ...] = ()
    """Namespaces of the applications, besides those labelled ``app_namespace_label``."""
    app_namespace_label: str = "ops-platform/app-namespace=true"
    admin_roles: tuple[str, ...] = ("admin", "cluster-admin", "ops-platform:admin")
    """Roles and ClusterRoles allowed to use wildcards."""
    break_glass_groups: tuple[str, ...] = ("ops-platform:break-glass",)
    """The only groups a ClusterRoleBinding may grant cluster-admin to."""
    registries: tuple[str, ...] = ()
    """Image prefixes of the platform registry; empty: any ECR registry."""
    istio_root_namespace: str = "istio-system"

    @classmethod
    def from_spec(cls, spec: Spec, **overrides: object) -> ControlConfig:
        """App namespaces, admin roles and break-glass groups from the spec's compliance
        section; the registry and the services' namespaces from its images section."""
        values: dict[str, object] = {
            "admin_roles": tuple(spec.compliance.admin_roles),
            "break_glass_groups": tuple(spec.compliance.break_glass_groups),
        }
        namespaces = set(spec.compliance.app_namespaces)
        if spec.images is not None:
            registry = spec.images.registry
            values["registries"] = (f"{registry.account}.dkr.ecr.{registry.region}.amazonaws.com/",)
            namespaces |= {service.namespace for service in spec.images.services}
        if namespaces:
            values["app_namespaces"] = tuple(sorted(namespaces))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


CheckFunction = Callable[["Evidence", ControlConfig], Iterable[Outcome]]


@dataclass(frozen=True)
class Control:
    """One entry of the catalogue.

    ``requirement`` is the seed requirement the control proves (section of the
    infra plan or InfraSpec, and its requirement numbers); ``framework`` the
    CIS id where one exists; ``source`` the other public standard or policy
    checker it follows, with the field it reads (``"PSS baseline:
    spec.hostNetwork"``, ``"kube-linter no-read-only-root-fs"``), where one
    exists; ``evidence`` the kinds of evidence it can judge;
    ``reads`` the object kinds it reads, which the cluster collector lists.
    ``check`` is None only for controls that report.evaluate computes from
    something else than evidence (the expired-exception control).
    """

    id: str
    title: str
    severity: Severity
    requirement: str
    framework: str | None
    remediation: str
    evidence: frozenset[EvidenceKind]
    reads: tuple[str, ...] = ()
    check: CheckFunction | None = field(default=None, compare=False, repr=False)
    source: str | None = None

    def applies_to(self, evidence_kinds: Iterable[str]) -> bool:
        return self.check is not None and bool(self.evidence & set(evidence_kinds))


def control(
    *,
    id: str,
    title: str,
    severity: Severity,
    requirement: str,
    framework: str | None,
    remediation: str,
    evidence: Iterable[EvidenceKind],
    reads: Iterable[str] = (),
    source: str | None = None,
) -> Callable[[CheckFunction], Control]:
    """Make a check function a :class:`Control` of the catalogue."""

    def wrap(check: CheckFunction) -> Control:
        return Control(
            id=id,
            title=title,
            severity=severity,
            requirement=requirement,
            framework=framework,
            remediation=" ".join(remediation.split()),
            evidence=frozenset(evidence),
            reads=tuple(reads),
            check=check,
            source=source,
        )

    return wrap


@dataclass(frozen=True, slots=True)
class Finding:
    """An outcome with its control's severity and remediation, after exceptions."""

    control_id: str
    object: str
    passed: bool
    message: str
    remediation: str
    severity: Severity
    excepted_by: str | None = None
    link: str | None = None
    location: str | None = None

    @property
    def open(self) -> bool:
        """Failing and not excused by an exception."""
        return not self.passed and self.excepted_by is None

    @property
    def key(self) -> tuple[str, str]:
        return (self.control_id, self.object)


@dataclass(frozen=True)
class ControlResult:
    """A control's findings and score: the share of its objects that pass.

    An object excused by a valid exception counts as passing (the risk is
    accepted and owned); :attr:`excepted` says how many. ``score`` is None
    when the control found no object in scope; ``note`` says why.
    """

    control: Control
    findings: tuple[Finding, ...]
    note: str | None = None

    @property
    def total(self) -> int:
        return len(self.findings)

    @property
    def passed(self) -> int:
        return sum(1 for finding in self.findings if finding.passed)

    @property
    def excepted(self) -> int:
        return sum(1 for finding in self.findings if not finding.passed and finding.excepted_by)

    @property
    def failed(self) -> int:
        return sum(1 for finding in self.findings if finding.open)

    @property
    def score(self) -> float | None:
        if not self.findings:
            return None
        return (self.total - self.failed) / self.total

    def open_findings(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.open]
