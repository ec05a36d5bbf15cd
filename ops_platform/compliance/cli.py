"""``python -m ops_platform.compliance --manifests infra/``: the static compliance check, for CI.

Judges the manifests under a directory with every control that applies to
manifests, applies the exceptions file and prints a text, JSON, Markdown or
HTML report. YAML files are streamed; each Helm chart found (a directory with
a Chart.yaml) is rendered once per ``values-<env>.yaml``, with the spec's
``compliance.chart_values`` and ``--set`` on top, and its objects named
``Kind namespace/name@<env>``.

Exit status, the most serious that applies:

- 3 internal error: an unexpected exception (a bug of this command, or of a
  library it runs): a one-line reason on stderr after the traceback. Nothing
  can be concluded about the manifests.
- 2 input error: bad usage, a manifests path that does not exist, an invalid
  spec or exceptions file (nothing judged); or some input could not be
  judged (malformed YAML, with the line and column where the problem starts;
  an unreadable file or directory; an object whose metadata the API server
  would refuse; a chart that does not render). In the second case the report
  of everything else is still printed, and 2 wins over 1: a report with holes
  must not pass, nor pass for an ordinary failure.
- 1 open findings: at least one open finding at or above ``--fail-on``
  (ERROR by default). An object a control cannot read is such a finding.
- 0 clean.

Documents that are not Kubernetes objects (no apiVersion/kind: the spec,
Helm values) are listed as skipped and do not change the status.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops_platform.compliance.controls import CATALOGUE, control_ids
from ops_platform.compliance.evidence import load_manifests
from ops_platform.compliance.exceptions import ExceptionsFile, load_exceptions
from ops_platform.compliance.model import SEVERITIES, ControlConfig
from ops_platform.compliance.report import evaluate
from ops_platform.errors import OpsPlatformError
from ops_platform.manifests import deep_merge
from ops_platform.spec import REPO_ROOT, Spec, load_spec, spec_path

PROG = "ops-platform-compliance"
EXIT_CLEAN, EXIT_FINDINGS, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Judge Kubernetes manifests and Helm charts offline with the compliance controls.",
        epilog="Exit status: 0 clean; 1 open findings at --fail-on or above; 2 input error (bad usage, "
        "unreadable spec or exceptions, or a manifest that could not be judged: malformed YAML, unreadable "
        "file, chart that does not render; the rest is still reported, and 2 wins over 1); 3 internal error.",
    )
    parser.add_argument("--manifests", required=True, type=Path,
                        help="file or directory of Kubernetes YAML; Helm charts in it are rendered per environment")
    parser.add_argument(
        "--exceptions", type=Path,
        help="exceptions file (default: compliance.exceptions of the spec, when that file exists)",
    )
    parser.add_argument(
        "--spec", type=Path,
        help="platform spec giving app namespaces, registry and chart values "
        "(default: OPS_PLATFORM_SPEC or infra/platform.yaml)",
    )
    parser.add_argument("--set", dest="chart_values", action="append", default=[], metavar="KEY=VALUE",
                        help="a value every Helm chart is rendered with, as a string (helm --set-string), over "
                        "the spec's compliance.chart_values; repeatable")
    parser.add_argument("--format", choices=("text", "json", "markdown", "html"), default="text")
    parser.add_argument("--fail-on", choices=SEVERITIES, default="ERROR",
                        help="lowest severity of an open finding that fails the run (default: ERROR)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except Exception as exc:  # noqa: BLE001 - status 3 must never be mistaken for findings (1) or input (2)
        traceback.print_exc()
        print(f"{PROG}: internal error, nothing judged: {type(exc).__name__}: {exc} (traceback above)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
        overrides = _set_values(args.chart_values)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        spec = _spec(args.spec)
        exceptions = _exceptions(args.exceptions, spec)
        chart_values = deep_merge(spec.compliance.chart_values if spec is not None else {}, overrides)
        evidence = load_manifests(args.manifests, chart_values=chart_values)
    except OpsPlatformError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    config = ControlConfig.from_spec(spec) if spec is not None else ControlConfig()
    report = evaluate(evidence, CATALOGUE, exceptions, now=datetime.now(UTC), config=config)
    if args.format == "text":
        report.write_text(sys.stdout)
    elif args.format == "json":
        report.write_json(sys.stdout)
    else:
        print(report.to_markdown() if args.format == "markdown" else report.to_html())
    for fault in report.control_faults:
        print(f"{PROG}: {fault}", file=sys.stderr)
    for problem in report.input_problems:
        print(f"{PROG}: not judged: {problem}", file=sys.stderr)
    failing_severities = SEVERITIES[: SEVERITIES.index(args.fail_on) + 1]
    blocking = [f for f in report.open_findings() if f.severity in failing_severities]
    if blocking:
        print(f"{PROG}: {len(blocking)} open finding(s) at {args.fail_on} or above", file=sys.stderr)
    if report.input_problems:
        print(f"{PROG}: {len(report.input_problems)} input problem(s): the report covers the rest only",
              file=sys.stderr)
        return EXIT_INPUT
    return EXIT_FINDINGS if blocking else EXIT_CLEAN


def _set_values(assignments: Sequence[str]) -> dict[str, Any]:
    """``["image.tag=0123abc"]`` -> ``{"image": {"tag": "0123abc"}}``."""
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, has_value, value = assignment.partition("=")
        path = key.split(".")
        if not has_value or not all(path):
            raise UsageError(f"--set {assignment!r}: expected KEY=VALUE, KEY a dotted path such as image.tag")
        values = deep_merge(values, _nested(path, value))
    return values


def _nested(path: list[str], value: str) -> dict[str, Any]:
    return {path[0]: _nested(path[1:], value) if len(path) > 1 else value}


def _spec(path: Path | None) -> Spec | None:
    chosen = spec_path(path)
    if path is None and not chosen.is_file():
        return None
    return load_spec(chosen)


def _exceptions(path: Path | None, spec: Spec | None) -> ExceptionsFile:
    if path is None:
        if spec is None:
            return ExceptionsFile.none()
        path = _resolve(Path(spec.compliance.exceptions))
        if not path.is_file():
            return ExceptionsFile.none()
    return load_exceptions(path, known_controls=control_ids())


def _resolve(path: Path) -> Path:
    """A spec-relative path as the spec gives it: from the working directory, else from the repository."""
    if path.is_absolute() or (Path.cwd() / path).exists():
        return path
    return REPO_ROOT / path


if __name__ == "__main__":
    sys.exit(main())
