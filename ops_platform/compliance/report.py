"""Judge evidence with the catalogue, apply exceptions, score, compare, render and store.

:func:`evaluate` gives a :class:`Report`: per control, every object judged and
the share that passes (an object excused by a valid exception counts as
passing, and is counted apart); overall, the mean of the control scores, so a
control over five namespaces weighs as much as one over five thousand
containers. :func:`trend` compares with the previous report's JSON. A report
renders as JSON (machine-readable, versioned by ``schema_version``), HTML
(self-contained, for people), Markdown (bounded, for the Dagster UI) and text
(for the CLI); :func:`store_report` and :func:`latest_report_json` keep them in
the object store.

A control that raises on an object it does not expect (a shape it was not
written for) does not sink the report: :func:`evaluate` finds the object
that makes it raise, fails it with the reason (a :class:`ControlFault`, also
listed apart) and judges the others. A control that raises whatever the
objects is a bug of ours: :class:`ControlFailed`.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from ops_platform.compliance.evidence import (
    CONSTRAINTS,
    Evidence,
    InputProblem,
    Obj,
    SkippedDocument,
    collector_paused,
    ref,
)
from ops_platform.compliance.exceptions import EXPIRED_EXCEPTION, ExceptionsFile
from ops_platform.compliance.model import (
    CIS_BENCHMARK,
    SEVERITIES,
    Control,
    ControlConfig,
    ControlResult,
    Finding,
    Outcome,
)

if TYPE_CHECKING:
    from ops_platform.resources.object_store import ObjectStore

SCHEMA = "ops-platform/compliance-report"
SCHEMA_VERSION = 1
REPORTS_PREFIX = "compliance/reports"
EXPIRY_WARNING_DAYS = 14
MAX_FAULTS_PER_CONTROL = 10
"""Objects a control may fail on before it is taken for broken (each costs a bisection of the evidence)."""


class ControlFailed(Exception):
    """A control raised whatever the objects (or on too many of them): a bug of the control, not of the input."""


@dataclass(frozen=True)
class ControlFault:
    """A control raised on one object: the object is reported failing with the reason, the others judged."""

    control_id: str
    object: str
    reason: str
    location: str | None = None

    def __str__(self) -> str:
        where = f" [{self.location}]" if self.location else ""
        return f"{self.control_id} could not judge {self.object}{where}: {self.reason}"


@dataclass(frozen=True)
class Trend:
    """How a report compares with the previous one; ``problem`` says why there is nothing to compare."""

    previous_generated_at: str | None = None
    overall_before: float | None = None
    overall_now: float | None = None
    scores: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    new_findings: list[tuple[str, str]] = field(default_factory=list)
    fixed_findings: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None

    @property
    def overall_delta(self) -> float | None:
        if self.overall_before is None or self.overall_now is None:
            return None
        return self.overall_now - self.overall_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "previous_generated_at": self.previous_generated_at,
            "overall_before": self.overall_before,
            "overall_now": self.overall_now,
            "overall_delta": self.overall_delta,
            "scores": {control_id: {"before": before, "now": now} for control_id, (before, now) in self.scores.items()},
            "new_findings": [{"control": c, "object": o} for c, o in self.new_findings],
            "fixed_findings": [{"control": c, "object": o} for c, o in self.fixed_findings],
            "problem": self.problem,
        }


@dataclass
class Report:
    generated_at: datetime
    source: str
    evidence_kinds: list[str]
    results: list[ControlResult]
    exceptions_source: str
    unused_exceptions: list[str] = field(default_factory=list)
    skipped: list[SkippedDocument] = field(default_factory=list)
    trend: Trend | None = None
    input_problems: list[InputProblem] = field(default_factory=list)
    """Input that could not be judged (malformed YAML, unreadable file, a chart that does not render):
    the report covers the rest only."""
    control_faults: list[ControlFault] = field(default_factory=list)

    @property
    def overall_score(self) -> float | None:
        scores = [result.score for result in self.results if result.score is not None]
        return sum(scores) / len(scores) if scores else None

    def result(self, control_id: str) -> ControlResult:
        return next(result for result in self.results if result.control.id == control_id)

    def open_findings(self, severity: str | None = None) -> list[Finding]:
        """Failing findings no exception excuses, most severe first."""
        found = [
            finding
            for result in self.results
            for finding in result.findings
            if finding.open and (severity is None or finding.severity == severity)
        ]
        return sorted(found, key=lambda f: (SEVERITIES.index(f.severity), f.control_id, f.object))

    def excepted_findings(self) -> list[Finding]:
        return [f for result in self.results for f in result.findings if not f.passed and f.excepted_by]

    def summary(self) -> dict[str, Any]:
        return {
            "controls": len(self.results),
            "objects": sum(result.total for result in self.results),
            "passed": sum(result.passed for result in self.results),
            "failed": sum(result.failed for result in self.results),
            "excepted": sum(result.excepted for result in self.results),
            "open_by_severity": {
                severity: sum(1 for r in self.results for f in r.findings if f.open and f.severity == severity)
                for severity in SEVERITIES
            },
            "input_problems": len(self.input_problems),
        }

    def to_dict(self, *, include_passing: bool = False) -> dict[str, Any]:
        findings = [
            _finding_dict(finding)
            for result in self.results
            for finding in result.findings
            if include_passing or not finding.passed
        ]
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "generated_at": _iso(self.generated_at),
            "source": self.source,
            "evidence": self.evidence_kinds,
            "framework": CIS_BENCHMARK,
            "overall_score": self.overall_score,
            "summary": self.summary(),
            "controls": [_result_dict(result) for result in self.results],
            "findings": findings,
            "exceptions": {"source": self.exceptions_source, "unused": self.unused_exceptions},
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "input_problems": [
                {"path": p.path, "document": p.document, "line": p.line, "column": p.column, "reason": p.reason}
                for p in self.input_problems
            ],
            "control_faults": [
                {"control": f.control_id, "object": f.object, "location": f.location, "reason": f.reason}
                for f in self.control_faults
            ],
            "trend": self.trend.to_dict() if self.trend else None,
        }

    def to_json(self, *, include_passing: bool = False) -> str:
        return json.dumps(self.to_dict(include_passing=include_passing), indent=1, ensure_ascii=False)

    def to_markdown(self, *, max_failures: int = 20, max_chars: int = 16_000) -> str:
        return _markdown(self, max_failures, max_chars)

    def to_html(self) -> str:
        return _html(self)

    def to_text(self, *, max_failures: int | None = None) -> str:
        return "\n".join(_text_lines(self, max_failures))

    def write_text(self, out: TextIO, *, max_failures: int | None = None) -> None:
        """The text report line by line (a report of a million findings is never one string)."""
        out.writelines(line + "\n" for line in _text_lines(self, max_failures))

    def write_json(self, out: TextIO, *, include_passing: bool = False) -> None:
        """:meth:`to_json`, written as it is encoded."""
        json.dump(self.to_dict(include_passing=include_passing), out, indent=1, ensure_ascii=False)
        out.write("\n")


def evaluate(
    evidence: Evidence,
    controls: Iterable[Control],
    exceptions: ExceptionsFile | None = None,
    *,
    now: datetime,
    config: ControlConfig | None = None,
    previous_report_json: str | bytes | None = None,
) -> Report:
    """Run every control that applies to the evidence, apply the exceptions, score.

    ``now`` (timezone-aware) decides which exceptions have expired. Evidence
    with charts rendered for several environments is judged once per
    environment (see :func:`_merged_views`).
    """
    if now.tzinfo is None:
        raise ValueError("compliance: evaluate needs a timezone-aware now")
    config = config or ControlConfig()
    exceptions = exceptions or ExceptionsFile.none()
    active = [(i, e) for i, e in enumerate(exceptions.entries) if not e.expired(now)]
    used: set[int] = set()
    results: list[ControlResult] = []
    faults: list[ControlFault] = []
    views: list[tuple[str | None, Evidence]] = [
        (environment, evidence.for_environment(environment)) for environment in sorted(evidence.environments)
    ] or [(None, evidence)]
    run_expired_control = False
    with collector_paused():
        for control in controls:
            if control is EXPIRED_EXCEPTION or control.id == EXPIRED_EXCEPTION.id:
                run_expired_control = True
                continue
            if not control.applies_to(evidence.kinds):
                continue
            findings = _merged_views([
                (environment, _judge(control, view, config, active, used, exceptions, faults))
                for environment, view in views
            ])
            results.append(ControlResult(control, findings, None if findings else _why_empty(control, evidence)))
    if run_expired_control:
        results.append(_expired_exceptions(exceptions, now))
    report = Report(
        generated_at=now.astimezone(UTC),
        source=evidence.source,
        evidence_kinds=sorted(evidence.kinds),
        results=results,
        exceptions_source=exceptions.source,
        unused_exceptions=[exceptions.label(i) for i, _ in active if i not in used],
        skipped=list(evidence.skipped),
        input_problems=list(evidence.input_problems),
        control_faults=list(dict.fromkeys(faults)),
    )
    if previous_report_json is not None:
        report.trend = trend(report, previous_report_json)
    return report


def _merged_views(per_environment: list[tuple[str | None, tuple[Finding, ...]]]) -> tuple[Finding, ...]:
    """One control's findings over each environment's view, as one list.

    An object judged the same in every environment is reported once; one that
    a chart rendered for one environment is already named ``...@<env>``; any
    other (a shared object judged differently, or only in some environments,
    because of what the charts add) once per environment, named ``...@<env>``.
    """
    if len(per_environment) == 1:
        return per_environment[0][1]
    by_object: dict[str, dict[str | None, list[Finding]]] = {}
    for environment, findings in per_environment:
        for finding in findings:
            by_object.setdefault(finding.object, {}).setdefault(environment, []).append(finding)
    merged: list[Finding] = []
    for subject, by_environment in by_object.items():
        variants = list(by_environment.values())
        same_everywhere = len(variants) == len(per_environment) and all(v == variants[0] for v in variants)
        rendered_for_one = len(variants) == 1 and subject.endswith(f"@{next(iter(by_environment))}")
        if same_everywhere or rendered_for_one:
            merged += variants[0]
        else:
            merged += [replace(f, object=f"{subject}@{environment}")
                       for environment, findings in by_environment.items() for f in findings]
    return tuple(merged)


def _judge(
    control: Control,
    evidence: Evidence,
    config: ControlConfig,
    active: Sequence[tuple[int, Any]],
    used: set[int],
    exceptions: ExceptionsFile,
    faults: list[ControlFault],
) -> tuple[Finding, ...]:
    """The control's findings; when it raises, those of every object but the ones it raises on, which fail."""
    assert control.check is not None
    try:
        return tuple(
            _finding(control, outcome, active, used, exceptions, evidence)
            for outcome in control.check(evidence, config)
        )
    except Exception as exc:  # noqa: BLE001 - isolated below, or raised as ControlFailed
        culprits, outcomes = _isolate(control, evidence, config, exc)
    faults += culprits
    outcomes += [Outcome(fault.object, False, f"not judged: {fault.reason}") for fault in culprits]
    return tuple(_finding(control, outcome, active, used, exceptions, evidence) for outcome in outcomes)


def _isolate(
    control: Control, evidence: Evidence, config: ControlConfig, error: Exception
) -> tuple[list[ControlFault], list[Outcome]]:
    """The objects the control raises on, and its outcomes without them.

    Each is found by bisection: the shortest prefix of the objects the control
    reads (other kinds kept whole) on which it raises ends with one. It is
    left out and the control run again, until it runs clean.
    """
    assert control.check is not None
    check = control.check
    candidates = [
        obj
        for kind in dict.fromkeys(control.reads or evidence.objects)
        for obj in (evidence.constraints() if kind == CONSTRAINTS else evidence.of(kind))
    ]
    read = {id(obj) for obj in candidates}
    left_out: set[int] = set()
    faults: list[ControlFault] = []

    def run(prefix: list[Obj] | None) -> tuple[list[Outcome], Exception | None]:
        """The control over the evidence, of the objects it reads only ``prefix`` (None: all but those left out)."""
        allowed = None if prefix is None else {id(obj) for obj in prefix}
        restricted = _restricted(evidence, lambda obj: id(obj) not in left_out and (
            allowed is None or id(obj) not in read or id(obj) in allowed))
        try:
            return list(check(restricted, config)), None
        except Exception as exc:  # noqa: BLE001
            return [], exc

    while True:
        if len(faults) == MAX_FAULTS_PER_CONTROL or run([])[1] is not None:
            raise ControlFailed(
                f"control {control.id} raised {type(error).__name__}: {error}"
                + (f" (after failing on {len(faults)} objects)" if faults else ", whatever the objects")
            ) from error
        low, high = 0, len(candidates)  # it raises on candidates[:high] (with ``error``), not on [:low]
        while high - low > 1:
            middle = (low + high) // 2
            middle_error = run(candidates[:middle])[1]
            if middle_error is not None:
                high, error = middle, middle_error
            else:
                low = middle
        culprit = candidates.pop(high - 1)
        left_out.add(id(culprit))
        subject = ref(culprit)
        reason = f"the control cannot read this object ({type(error).__name__}: {error}); check its shape"
        faults.append(ControlFault(control.id, subject, reason, evidence.locations.get(subject)))
        outcomes, next_error = run(None)
        if next_error is None:
            return faults, outcomes
        error = next_error


def _restricted(evidence: Evidence, keep: Any) -> Evidence:
    """A copy of the evidence holding only the objects ``keep(obj)`` accepts (same facts, fresh indexes)."""
    objects = {kind: [obj for obj in objs if keep(obj)] for kind, objs in evidence.objects.items()}
    return replace(evidence, objects=objects, _index={})


def _finding(
    control: Control,
    outcome: Outcome,
    active: Sequence[tuple[int, Any]],
    used: set[int],
    exceptions: ExceptionsFile,
    evidence: Evidence,
) -> Finding:
    finding = Finding(
        control_id=control.id,
        object=sys.intern(outcome.object),  # one string per object, whatever the number of controls
        passed=outcome.passed,
        message=outcome.message,
        remediation=control.remediation,
        severity=control.severity,
        link=outcome.link,
        location=evidence.locations.get(outcome.object),
    )
    if finding.passed:
        return finding
    for index, entry in active:
        if entry.matches(finding):
            used.add(index)
            return replace(finding, excepted_by=exceptions.label(index))
    return finding


def _why_empty(control: Control, evidence: Evidence) -> str:
    missing = [kind for kind in control.reads if kind in evidence.not_installed]
    if missing:
        return "not evaluated: " + "; ".join(evidence.not_installed[kind] for kind in missing)
    return "no object in scope"


def _expired_exceptions(exceptions: ExceptionsFile, now: datetime) -> ControlResult:
    control = EXPIRED_EXCEPTION
    findings = []
    for index, entry in enumerate(exceptions.entries):
        subject = f"Exception {exceptions.source}#{index + 1}"
        scope = f"{entry.control} on {entry.object!r}, owner {entry.owner}"
        days_left = (entry.expires - now.date()).days
        if days_left < 0:
            message = f"expired on {entry.expires.isoformat()} ({scope}): it no longer excuses anything"
        elif days_left <= EXPIRY_WARNING_DAYS:
            message = f"expires in {days_left} day(s) on {entry.expires.isoformat()} ({scope})"
        else:
            message = f"valid until {entry.expires.isoformat()} ({scope})"
        findings.append(
            Finding(control.id, subject, days_left >= 0, message, control.remediation, control.severity,
                    location=exceptions.source)
        )
    return ControlResult(control, tuple(findings), None if findings else "no exception recorded")


def trend(report: Report, previous_report_json: str | bytes | dict[str, Any] | None) -> Trend:
    """Scores before and now, and which open findings are new or fixed since the previous report.

    A missing, garbled or newer-schema previous report gives a Trend with a
    ``problem`` instead of raising: the new report matters more than its trend.
    """
    if previous_report_json is None:
        return Trend(problem="no previous report")
    try:
        previous = (
            previous_report_json if isinstance(previous_report_json, dict) else json.loads(previous_report_json)
        )
    except (ValueError, UnicodeDecodeError) as exc:
        return Trend(problem=f"previous report is not valid JSON: {exc}")
    if not isinstance(previous, dict) or previous.get("schema") != SCHEMA:
        return Trend(problem="previous report is not a compliance report")
    version = previous.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        return Trend(problem=f"previous report has schema_version {version!r}, this code reads up to {SCHEMA_VERSION}")
    try:
        before_scores = {c["id"]: c.get("score") for c in previous.get("controls") or []}
        before_open = {
            (f["control"], f["object"])
            for f in previous.get("findings") or []
            if not f["passed"] and not f.get("excepted_by")
        }
    except (KeyError, TypeError) as exc:
        return Trend(problem=f"previous report is missing a field: {exc}")
    now_scores = {result.control.id: result.score for result in report.results}
    now_open = {finding.key for finding in report.open_findings()}
    return Trend(
        previous_generated_at=previous.get("generated_at"),
        overall_before=previous.get("overall_score"),
        overall_now=report.overall_score,
        scores={cid: (before_scores.get(cid), now_scores.get(cid)) for cid in sorted(before_scores | now_scores)},
        new_findings=sorted(now_open - before_open),
        fixed_findings=sorted(before_open - now_open),
    )


@dataclass(frozen=True)
class StoredReport:
    json_url: str
    html_url: str
    json_key: str
    html_key: str


def report_keys(generated_at: datetime, prefix: str = REPORTS_PREFIX) -> tuple[str, str]:
    """``compliance/reports/20260504T070000Z/report.json`` and ``.../report.html``: keys sort in time order."""
    folder = f"{prefix}/{generated_at.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    return f"{folder}/report.json", f"{folder}/report.html"


def store_report(store: ObjectStore, report: Report, *, prefix: str = REPORTS_PREFIX) -> StoredReport:
    """Write the report's JSON and HTML to the object store."""
    json_key, html_key = report_keys(report.generated_at, prefix)
    stored_json = store.put_bytes(json_key, report.to_json().encode(), content_type="application/json")
    stored_html = store.put_bytes(html_key, report.to_html().encode(), content_type="text/html; charset=utf-8")
    return StoredReport(stored_json.url, stored_html.url, json_key, html_key)


def latest_report_json(store: ObjectStore, *, prefix: str = REPORTS_PREFIX) -> bytes | None:
    """The JSON of the newest stored report, or None when there is none yet."""
    keys = [stored.key for stored in store.list(prefix + "/") if stored.key.endswith("/report.json")]
    return store.get_bytes(max(keys)) if keys else None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _percent(score: float | None) -> str:
    return "n/a" if score is None else f"{score * 100:.1f}%"


def _result_dict(result: ControlResult) -> dict[str, Any]:
    control = result.control
    return {
        "id": control.id,
        "title": control.title,
        "severity": control.severity,
        "requirement": control.requirement,
        "framework": control.framework,
        "source": control.source,
        "remediation": control.remediation,
        "evidence": sorted(control.evidence),
        "score": result.score,
        "objects": result.total,
        "passed": result.passed,
        "failed": result.failed,
        "excepted": result.excepted,
        "note": result.note,
    }


def _finding_dict(finding: Finding) -> dict[str, Any]:
    return {
        "control": finding.control_id,
        "object": finding.object,
        "passed": finding.passed,
        "severity": finding.severity,
        "message": finding.message,
        "remediation": finding.remediation,
        "excepted_by": finding.excepted_by,
        "link": finding.link,
        "location": finding.location,
    }


def _sources(control: Control) -> str:
    """What a control follows: the infra plan / InfraSpec section, the CIS item, the other standard and its field."""
    return "; ".join(part for part in (control.requirement, control.framework, control.source) if part)


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(report: Report, max_failures: int, max_chars: int) -> str:
    summary = report.summary()
    open_counts = ", ".join(f"{count} {sev}" for sev, count in summary["open_by_severity"].items())
    lines = [
        f"**Compliance {_percent(report.overall_score)}** — {report.source}, {_iso(report.generated_at)}",
        "",
        f"{summary['objects']} objects judged by {summary['controls']} controls; open findings: {open_counts}; "
        f"{summary['excepted']} excepted.",
    ]
    if report.input_problems:
        shown = "; ".join(_md_cell(str(problem))[:200] for problem in report.input_problems[:3])
        more = f" and {len(report.input_problems) - 3} more" if len(report.input_problems) > 3 else ""
        lines.append(f"**{len(report.input_problems)} input problem(s), not judged**: {shown}{more}.")
    if report.trend and report.trend.problem is None:
        delta = report.trend.overall_delta
        shown = "n/a" if delta is None else f"{delta * 100:+.1f} points"
        lines.append(
            f"Since {report.trend.previous_generated_at}: {shown}, {len(report.trend.new_findings)} new, "
            f"{len(report.trend.fixed_findings)} fixed."
        )
    table = _md_controls(report, with_sources=True)
    if len("\n".join(lines + table)) > max_chars - 120:
        table = _md_controls(report, with_sources=False)
        table.append("\n_The sources of each control (requirement, CIS item, PSS profile and field): "
                     "see the JSON or HTML report._")
    lines += table
    failures = report.open_findings()
    if failures:
        lines += ["", f"**Top failures** ({min(len(failures), max_failures)} of {len(failures)})", "",
                  "| severity | control | object | problem |", "| --- | --- | --- | --- |"]
    text = "\n".join(lines)
    shown = 0
    for finding in failures[:max_failures]:
        row = (
            f"\n| {finding.severity} | {finding.control_id} | {_md_cell(finding.object)} | "
            f"{_md_cell(finding.message[:200])} |"
        )
        if len(text) + len(row) > max_chars - 120:
            break
        text += row
        shown += 1
    if shown < len(failures):
        text += f"\n\n_{len(failures) - shown} more failing objects: see the JSON or HTML report._"
    return text


def _md_controls(report: Report, *, with_sources: bool) -> list[str]:
    """The control table; ``with_sources`` adds what each control follows (:func:`_sources`)."""
    header = "| control | title | severity | score | failing | excepted |" + (" sources |" if with_sources else "")
    lines = ["", header, "|" + " --- |" * (7 if with_sources else 6)]
    for result in report.results:
        control = result.control
        row = (
            f"| {control.id} | {_md_cell(control.title)} | {control.severity} | {_percent(result.score)} | "
            f"{result.failed} | {result.excepted} |"
        )
        if with_sources:
            row += f" {_md_cell(_sources(control))} |"
        lines.append(row)
    return lines


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#1b1b1b;max-width:80em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}.ERROR{color:#b00020;font-weight:bold}.WARN{color:#a15c00}
.pass{color:#1a7f37}.muted{color:#666}code{font-size:90%}
"""


def _safe_link(link: str | None) -> str:
    if not link:
        return ""
    if link.startswith(("https://", "http://")):
        escaped = html.escape(link, quote=True)
        return f'<a href="{escaped}">{escaped}</a>'
    return html.escape(link)


def _html(report: Report) -> str:
    e = html.escape
    summary = report.summary()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Compliance report {e(_iso(report.generated_at))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Compliance report: {e(_percent(report.overall_score))}</h1>",
        f"<p>{e(report.source)} — generated {e(_iso(report.generated_at))} — evidence: "
        f"{e(', '.join(report.evidence_kinds))} — framework ids: {e(CIS_BENCHMARK)}</p>",
        f"<p>{summary['objects']} objects, {summary['passed']} passed, {summary['failed']} failing, "
        f"{summary['excepted']} excepted (exceptions: {e(report.exceptions_source)}).</p>",
    ]
    if report.trend is not None:
        t = report.trend
        if t.problem:
            parts.append(f"<p class=muted>Trend: {e(t.problem)}</p>")
        else:
            delta = "n/a" if t.overall_delta is None else f"{t.overall_delta * 100:+.1f} points"
            parts.append(
                f"<p>Since {e(str(t.previous_generated_at))}: {e(delta)}; {len(t.new_findings)} new findings, "
                f"{len(t.fixed_findings)} fixed.</p>"
            )
    parts.append(
        "<h2>Controls</h2><table><tr><th>id</th><th>title</th><th>severity</th><th>score</th><th>objects</th>"
        "<th>failing</th><th>excepted</th><th>requirement</th><th>framework</th><th>source</th><th>note</th></tr>"
    )
    for result in report.results:
        c = result.control
        parts.append(
            f"<tr><td>{e(c.id)}</td><td>{e(c.title)}</td><td class={c.severity}>{c.severity}</td>"
            f"<td>{e(_percent(result.score))}</td><td>{result.total}</td><td>{result.failed}</td>"
            f"<td>{result.excepted}</td><td>{e(c.requirement)}</td><td>{e(c.framework or '')}</td>"
            f"<td>{e(c.source or '')}</td><td>{e(result.note or '')}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Failing objects</h2>")
    failing_results = [result for result in report.results if result.failed]
    if not failing_results:
        parts.append("<p class=pass>None.</p>")
    for result in failing_results:
        c = result.control
        parts.append(f"<h3><span class={c.severity}>{c.severity}</span> {e(c.id)} {e(c.title)}</h3>")
        parts.append(f"<p><b>Remediation:</b> {e(c.remediation)}</p>")
        parts.append("<table><tr><th>object</th><th>problem</th><th>where</th><th>evidence</th></tr>")
        for f in result.open_findings():
            parts.append(
                f"<tr><td>{e(f.object)}</td><td>{e(f.message)}</td><td>{e(f.location or '')}</td>"
                f"<td>{_safe_link(f.link)}</td></tr>"
            )
        parts.append("</table>")
    excepted = report.excepted_findings()
    if excepted:
        parts.append(
            "<h2>Excepted</h2><table><tr><th>control</th><th>object</th><th>problem</th><th>exception</th></tr>"
        )
        for f in excepted:
            parts.append(
                f"<tr><td>{e(f.control_id)}</td><td>{e(f.object)}</td><td>{e(f.message)}</td>"
                f"<td>{e(f.excepted_by or '')}</td></tr>"
            )
        parts.append("</table>")
    if report.unused_exceptions:
        parts.append("<h2>Exceptions that excused nothing</h2><ul>")
        parts += [f"<li>{e(label)}</li>" for label in report.unused_exceptions]
        parts.append("</ul>")
    if report.input_problems:
        parts.append(f"<h2>Input problems ({len(report.input_problems)}): not judged</h2><ul>")
        parts += [f"<li>{e(str(problem))}</li>" for problem in report.input_problems]
        parts.append("</ul>")
    if report.control_faults:
        parts.append(f"<h2>Objects a control could not read ({len(report.control_faults)})</h2><ul>")
        parts += [f"<li>{e(str(fault))}</li>" for fault in report.control_faults]
        parts.append("</ul>")
    if report.skipped:
        parts.append(f"<h2>Skipped documents ({len(report.skipped)})</h2><ul>")
        parts += [f"<li><code>{e(s.path)}</code>: {e(s.reason)}</li>" for s in report.skipped]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _text_lines(report: Report, max_failures: int | None) -> Iterator[str]:
    summary = report.summary()
    yield (
        f"compliance: {report.source} ({', '.join(report.evidence_kinds)}), overall {_percent(report.overall_score)}, "
        f"{summary['objects']} objects, {summary['failed']} failing, {summary['excepted']} excepted"
    )
    failures = report.open_findings()
    for finding in failures[:max_failures]:
        where = f" [{finding.location}]" if finding.location else ""
        yield f"{finding.severity:5} {finding.control_id} {finding.object}: {finding.message}{where}"
    if max_failures is not None and len(failures) > max_failures:
        yield f"... {len(failures) - max_failures} more failing objects"
    yield ""
    for result in report.results:
        note = f" ({result.note})" if result.note else ""
        yield (
            f"{_percent(result.score):>6}  {result.control.id:15} {result.control.severity:5} "
            f"{result.failed:>5} failing {result.excepted:>3} excepted  {result.control.title}{note}"
        )
        yield f"{'':8}sources: {_sources(result.control)}"
        if result.failed:
            yield f"{'':8}fix: {result.control.remediation}"
    for label in report.unused_exceptions:
        yield f"note: exception {label} excused nothing"
    skipped_by_reason: dict[str, int] = {}
    for skipped in report.skipped:
        skipped_by_reason[skipped.reason] = skipped_by_reason.get(skipped.reason, 0) + 1
    for reason, count in sorted(skipped_by_reason.items()):
        yield f"skipped {count} document(s): {reason}"
    for fault in report.control_faults:
        yield f"control fault: {fault}"
    for problem in report.input_problems:
        yield f"input problem: {problem}"
