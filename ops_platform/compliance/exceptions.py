"""Exceptions to the controls: ``infra/compliance/exceptions.yaml``.

The file is a YAML list; each entry excuses the failing findings of one
control on the objects its glob matches, until its expiry date (inclusive)::

    - control: OPS-WL-001                      # a control id (or a glob: OPS-WL-*)
      object: "Deployment ontology-editor/*"   # glob on "Kind namespace/name"
      owner: team:platform-sre                 # team:<name> or an e-mail address
      justification: why the risk is accepted and what replaces the control
      expires: 2026-09-30

Unknown keys are rejected. An expired exception excuses nothing and is itself
a finding of control OPS-EXC-001, until it is renewed or removed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from ops_platform.compliance.model import Control, Finding
from ops_platform.errors import OpsPlatformError
from ops_platform.spec import Owner

EXPIRED_EXCEPTION = Control(
    id="OPS-EXC-001",
    title="Compliance exceptions are not expired",
    severity="WARN",
    requirement="infra plan §13.3 (Requirements 12.5): compliance reporting with owned, dated exceptions",
    framework=None,
    remediation="""Fix the excused findings and delete the exception, or renew it with a new
        expiry date and a fresh justification approved by its owner.""",
    evidence=frozenset({"cluster", "graph", "manifests"}),
)
ObjectGlob = Annotated[str, StringConstraints(pattern=r"^\S+ \S+$")]


class ExceptionsError(OpsPlatformError):
    """The exceptions file cannot be read or is invalid; the message names the file and entry."""


class ControlException(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    control: Annotated[str, StringConstraints(pattern=r"^[A-Z*?\[\]0-9-]+$")]
    object: ObjectGlob = Field(description='Glob on "Kind namespace/name" (or "Kind name").')
    owner: Owner
    justification: Annotated[str, StringConstraints(strip_whitespace=True, min_length=10)]
    expires: date

    def expired(self, now: datetime) -> bool:
        return now.date() > self.expires

    def matches(self, finding: Finding) -> bool:
        return fnmatch.fnmatchcase(finding.control_id, self.control) and fnmatch.fnmatchcase(
            finding.object, self.object
        )


_ENTRIES = TypeAdapter(list[ControlException])


@dataclass(frozen=True)
class ExceptionsFile:
    """The exceptions in force, and where they come from (to name them in findings)."""

    source: str
    entries: list[ControlException] = field(default_factory=list)

    @classmethod
    def none(cls) -> ExceptionsFile:
        return cls("(no exceptions file)")

    def label(self, index: int) -> str:
        entry = self.entries[index]
        return f"{self.source}#{index + 1} ({entry.owner}, until {entry.expires.isoformat()})"


def load_exceptions(path: str | Path, *, known_controls: set[str] | None = None) -> ExceptionsFile:
    """Read and validate the exceptions file; an empty file or ``[]`` holds no exception."""
    source = Path(path)
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise ExceptionsError(f"compliance exceptions: {source} not found (check compliance.exceptions)") from None
    except OSError as exc:
        raise ExceptionsError(f"compliance exceptions: cannot read {source}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ExceptionsError(f"compliance exceptions: {source}{where}: not valid YAML") from None
    return parse_exceptions(raw, str(source), known_controls=known_controls)


def parse_exceptions(raw: object, source: str, *, known_controls: set[str] | None = None) -> ExceptionsFile:
    if raw is None:
        return ExceptionsFile(source)
    if not isinstance(raw, list):
        raise ExceptionsError(
            f"compliance exceptions: {source}: expected a list of exceptions, got {type(raw).__name__}"
        )
    try:
        entries = _ENTRIES.validate_python(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = "".join(f"[{part + 1}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"  - {location.lstrip('.')}: {message}")
        raise ExceptionsError(f"compliance exceptions: invalid {source}:\n" + "\n".join(problems)) from None
    if known_controls is not None:
        for number, entry in enumerate(entries, start=1):
            if not any(fnmatch.fnmatchcase(control_id, entry.control) for control_id in known_controls):
                raise ExceptionsError(
                    f"compliance exceptions: {source}[{number}].control: {entry.control!r} names no control "
                    f"of the catalogue"
                )
    return ExceptionsFile(source, entries)
