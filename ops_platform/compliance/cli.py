"""``python -m ops_platform.compliance --manifests infra/``: the static compliance check, for CI.

Judges the manifests under a directory with every control that applies to
manifests, applies the exceptions file and prints a text or JSON report.
Exit status: 0 when no open finding is at or above ``--fail-on`` (ERROR by
default), 1 when there is one, 2 on a usage error or an unreadable input
(manifests, spec, exceptions), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from ops_platform.compliance.controls import CATALOGUE, control_ids
from ops_platform.compliance.evidence import load_manifests
from ops_platform.compliance.exceptions import ExceptionsFile, load_exceptions
from ops_platform.compliance.model import SEVERITIES, ControlConfig
from ops_platform.compliance.report import evaluate
from ops_platform.errors import OpsPlatformError
from ops_platform.spec import REPO_ROOT, Spec, load_spec, spec_path

PROG = "ops-platform-compliance"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Judge Kubernetes manifests offline with the compliance controls. Exit status: 0 clean, "
        "1 open findings at --fail-on or above, 2 bad usage or unreadable input.",
    )
    parser.add_argument("--manifests", required=True, type=Path, help="file or directory of Kubernetes YAML")
    parser.add_argument(
        "--exceptions", type=Path,
        help="exceptions file (default: compliance.exceptions of the spec, when that file exists)",
    )
    parser.add_argument(
        "--spec", type=Path,
        help="platform spec giving app namespaces and registry (default: OPS_PLATFORM_SPEC or infra/platform.yaml)",
    )
    parser.add_argument("--format", choices=("text", "json", "markdown", "html"), default="text")
    parser.add_argument("--fail-on", choices=SEVERITIES, default="ERROR",
                        help="lowest severity of an open finding that fails the run (default: ERROR)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        spec = _spec(args.spec)
        exceptions = _exceptions(args.exceptions, spec)
        evidence = load_manifests(args.manifests)
    except OpsPlatformError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    config = ControlConfig.from_spec(spec) if spec is not None else ControlConfig()
    report = evaluate(evidence, CATALOGUE, exceptions, now=datetime.now(UTC), config=config)
    render = {"text": report.to_text, "json": report.to_json, "markdown": report.to_markdown, "html": report.to_html}
    print(render[args.format]())
    failing_severities = SEVERITIES[: SEVERITIES.index(args.fail_on) + 1]
    blocking = [f for f in report.open_findings() if f.severity in failing_severities]
    if blocking:
        print(f"{PROG}: {len(blocking)} open finding(s) at {args.fail_on} or above", file=sys.stderr)
        return 1
    return 0


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
