"""Exceptions, scores, trend, the JSON / HTML / Markdown renderings, storage and the CI command."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops_platform.compliance.cli import main
from ops_platform.compliance.controls import CATALOGUE, control_ids
from ops_platform.compliance.evidence import Evidence, ManifestError, load_manifests
from ops_platform.compliance.exceptions import ExceptionsError, load_exceptions, parse_exceptions
from ops_platform.compliance.model import Outcome, control
from ops_platform.compliance.report import (
    SCHEMA_VERSION,
    evaluate,
    latest_report_json,
    store_report,
    trend,
)
from ops_platform.resources.object_store import LocalObjectStore
from ops_platform.spec import REPO_ROOT
from tests.test_compliance_controls import (
    CONFIG,
    REGISTRY,
    SHA,
    default_deny,
    deployment,
    hpa,
    limit_range,
    namespace,
    pdb,
    quota,
    secure_container,
)

NOW = datetime(2026, 5, 4, 7, 0, tzinfo=UTC)


def exception(control: str = "OPS-WL-001", obj: str = "Deployment ontology-editor/legacy-*",
              expires: date | str = "2026-06-30", **extra: Any) -> dict[str, Any]:
    return {"control": control, "object": obj, "owner": "team:platform-sre",
            "justification": "vendor image runs as root until v3 ships", "expires": str(expires), **extra}


def cluster(*objects: dict[str, Any]) -> Evidence:
    return Evidence.from_objects([namespace("ontology-editor"), *objects], source="cluster test")


ROOT_CONTAINER = {"name": "app", "image": f"{REGISTRY}x:{SHA}"}


def test_exceptions_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "exceptions.yaml"
    path.write_text(yaml.safe_dump([exception(), exception("OPS-NET-*", "Namespace data", "2026-01-01")]))
    loaded = load_exceptions(path, known_controls=control_ids())
    assert [e.control for e in loaded.entries] == ["OPS-WL-001", "OPS-NET-*"]
    assert loaded.entries[1].expires == date(2026, 1, 1)
    assert loaded.label(0) == f"{path}#1 (team:platform-sre, until 2026-06-30)"

    path.write_text("# nothing yet\n[]\n")
    assert load_exceptions(path).entries == []
    path.write_text("")
    assert load_exceptions(path).entries == []


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ([exception(ticket="OPS-1")], r"\[1\]\.ticket: unknown key"),
        ([exception(), exception(expires="someday")], r"\[2\]\.expires"),
        ([{k: v for k, v in exception().items() if k != "owner"}], r"\[1\]\.owner: Field required"),
        ([exception(owner="bob")], r"\[1\]\.owner"),
        ([exception(justification="ok")], r"\[1\]\.justification"),
        ([exception(obj="legacy")], r"\[1\]\.object"),
        ({"control": "OPS-WL-001"}, "expected a list"),
        ([exception(control="OPS-WL-999")], r"\[1\]\.control: 'OPS-WL-999' names no control"),
    ],
)
def test_invalid_exceptions_are_rejected_with_the_entry(raw: Any, problem: str) -> None:
    with pytest.raises(ExceptionsError, match=problem):
        parse_exceptions(raw, "infra/compliance/exceptions.yaml", known_controls=control_ids())


def test_unreadable_exceptions_file(tmp_path: Path) -> None:
    with pytest.raises(ExceptionsError, match="not found"):
        load_exceptions(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- control: [unclosed\n")
    with pytest.raises(ExceptionsError, match="bad.yaml line 2: not valid YAML"):
        load_exceptions(bad)


def test_the_repository_exceptions_file_is_valid() -> None:
    load_exceptions(REPO_ROOT / "infra" / "compliance" / "exceptions.yaml", known_controls=control_ids())


def test_exception_excuses_until_it_expires_then_is_reported() -> None:
    evidence = cluster(deployment("legacy-a", containers=[ROOT_CONTAINER]),
                       deployment("legacy-b", containers=[ROOT_CONTAINER]),
                       deployment("new", containers=[ROOT_CONTAINER]))
    exceptions = parse_exceptions(
        [exception(expires="2026-05-04"), exception("OPS-NET-001", "Namespace nowhere", "2026-12-31")], "exc.yaml"
    )

    on_the_day = evaluate(evidence, CATALOGUE, exceptions, now=NOW, config=CONFIG)
    root = on_the_day.result("OPS-WL-001")
    assert (root.total, root.passed, root.excepted, root.failed) == (3, 0, 2, 1)
    assert root.score == pytest.approx(2 / 3)
    assert {f.object: f.excepted_by for f in root.findings} == {
        "Deployment ontology-editor/legacy-a": "exc.yaml#1 (team:platform-sre, until 2026-05-04)",
        "Deployment ontology-editor/legacy-b": "exc.yaml#1 (team:platform-sre, until 2026-05-04)",
        "Deployment ontology-editor/new": None,
    }
    assert on_the_day.unused_exceptions == ["exc.yaml#2 (team:platform-sre, until 2026-12-31)"]
    expiry = on_the_day.result("OPS-EXC-001")
    assert [f.passed for f in expiry.findings] == [True, True]
    assert expiry.findings[0].message.startswith("expires in 0 day(s)")

    next_day = evaluate(evidence, CATALOGUE, exceptions, now=NOW + timedelta(days=1), config=CONFIG)
    assert next_day.result("OPS-WL-001").failed == 3
    expired = next_day.result("OPS-EXC-001")
    assert [(f.object, f.passed) for f in expired.findings] == [("Exception exc.yaml#1", False),
                                                                 ("Exception exc.yaml#2", True)]
    assert "expired on 2026-05-04" in expired.findings[0].message
    assert expired.findings[0].severity == "WARN"
    assert {f.key for f in next_day.open_findings("WARN")} >= {("OPS-EXC-001", "Exception exc.yaml#1")}


def test_scores_per_control_and_overall() -> None:
    @control(id="T-1", title="t1", severity="ERROR", requirement="§0", framework=None, remediation="r",
             evidence=("cluster",))
    def three_of_four(evidence: Evidence, config: object) -> list[Outcome]:
        return [Outcome(f"Thing t/{i}", i != 0, "m") for i in range(4)]

    @control(id="T-2", title="t2", severity="WARN", requirement="§0", framework=None, remediation="r",
             evidence=("cluster",))
    def all_pass(evidence: Evidence, config: object) -> list[Outcome]:
        return [Outcome("Thing t/x", True, "m")]

    @control(id="T-3", title="t3", severity="WARN", requirement="§0", framework=None, remediation="r",
             evidence=("cluster",), reads=("Widget",))
    def nothing(evidence: Evidence, config: object) -> list[Outcome]:
        return []

    @control(id="T-4", title="t4", severity="WARN", requirement="§0", framework=None, remediation="r",
             evidence=("manifests",))
    def other_evidence(evidence: Evidence, config: object) -> list[Outcome]:
        raise AssertionError("a manifests-only control must not run on a cluster")

    evidence = Evidence.from_objects([], not_installed={"Widget": "no Widget CRD"})
    report = evaluate(evidence, [three_of_four, all_pass, nothing, other_evidence], now=NOW)
    assert [r.control.id for r in report.results] == ["T-1", "T-2", "T-3"]
    assert report.result("T-1").score == 0.75
    assert report.result("T-3").score is None and report.result("T-3").note == "not evaluated: no Widget CRD"
    assert report.overall_score == pytest.approx((0.75 + 1.0) / 2)
    assert [f.object for f in report.open_findings()] == ["Thing t/0"]


def test_evaluate_needs_an_aware_clock() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(cluster(), CATALOGUE, now=datetime(2026, 5, 4))


def test_trend_against_the_previous_report() -> None:
    before = evaluate(cluster(deployment("a", containers=[ROOT_CONTAINER]), deployment("b")), CATALOGUE,
                      now=NOW - timedelta(days=7), config=CONFIG)
    current = evaluate(cluster(deployment("a"), deployment("b", containers=[ROOT_CONTAINER])), CATALOGUE,
                       now=NOW, config=CONFIG, previous_report_json=before.to_json())
    t = current.trend
    assert t is not None and t.problem is None
    assert t.previous_generated_at == "2026-04-27T07:00:00Z"
    assert ("OPS-WL-001", "Deployment ontology-editor/b") in t.new_findings
    assert ("OPS-WL-001", "Deployment ontology-editor/a") in t.fixed_findings
    assert t.scores["OPS-WL-001"] == (0.5, 0.5)
    assert t.overall_delta == pytest.approx(0.0)
    assert {"control": "OPS-WL-001", "object": "Deployment ontology-editor/b"} in json.loads(
        current.to_json())["trend"]["new_findings"]


@pytest.mark.parametrize(
    ("previous", "problem"),
    [
        (None, "no previous report"),
        (b"{not json", "not valid JSON"),
        ('{"schema": "something-else"}', "not a compliance report"),
        (json.dumps({"schema": "ops-platform/compliance-report", "schema_version": SCHEMA_VERSION + 1}),
         "schema_version 2"),
        (json.dumps({"schema": "ops-platform/compliance-report", "schema_version": 1,
                     "findings": [{"object": "x"}]}), "missing a field"),
    ],
)
def test_trend_survives_a_bad_previous_report(previous: Any, problem: str) -> None:
    report = evaluate(cluster(), CATALOGUE, now=NOW, config=CONFIG)
    assert problem in (trend(report, previous).problem or "")


def test_json_is_versioned_and_lists_failing_objects_with_remediation() -> None:
    report = evaluate(cluster(deployment("a", containers=[ROOT_CONTAINER]), deployment("b")), CATALOGUE,
                      now=NOW, config=CONFIG)
    data = json.loads(report.to_json())
    assert data["schema"] == "ops-platform/compliance-report" and data["schema_version"] == SCHEMA_VERSION
    assert data["generated_at"] == "2026-05-04T07:00:00Z"
    assert all(not f["passed"] for f in data["findings"])
    root = next(f for f in data["findings"] if f["control"] == "OPS-WL-001")
    assert root["object"] == "Deployment ontology-editor/a" and "runAsNonRoot" in root["remediation"]
    controls = {c["id"]: c for c in data["controls"]}
    assert controls["OPS-WL-001"]["framework"] == "CIS 5.2.7" and controls["OPS-WL-001"]["score"] == 0.5
    everything = json.loads(report.to_json(include_passing=True))
    assert len(everything["findings"]) > len(data["findings"])


def test_html_is_self_contained_and_escaped() -> None:
    evil = "<script>alert(1)</script>"
    report = evaluate(cluster(deployment(evil, containers=[ROOT_CONTAINER])), CATALOGUE, now=NOW, config=CONFIG)
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page and "src=" not in page and "<link" not in page


def test_html_links_only_http_urls() -> None:
    @control(id="T-L", title="links", severity="ERROR", requirement="§0", framework=None, remediation="r",
             evidence=("cluster",))
    def linked(evidence: Evidence, config: object) -> list[Outcome]:
        return [Outcome("Run a", False, "m", "https://dagster.example/runs/1?a=1&b=2"),
                Outcome("Run b", False, "m", "javascript:alert(1)")]

    page = evaluate(cluster(), [linked], now=NOW).to_html()
    assert '<a href="https://dagster.example/runs/1?a=1&amp;b=2">' in page
    assert 'href="javascript' not in page and "javascript:alert(1)" in page


def test_markdown_has_a_summary_table_and_stays_bounded() -> None:
    many = [deployment(f"svc-{i:04d}", containers=[ROOT_CONTAINER]) for i in range(3000)]
    report = evaluate(cluster(*many), CATALOGUE, now=NOW, config=CONFIG)
    text = report.to_markdown(max_failures=20, max_chars=6000)
    assert len(text) <= 6000
    assert "| OPS-WL-001 | Containers run as non-root | ERROR | 0.0% |" in text
    assert "**Top failures** (20 of" in text
    assert "more failing objects: see the JSON or HTML report" in text
    assert text.count("| ERROR | OPS-") <= 20


def test_every_rendering_names_each_controls_sources() -> None:
    """Requirement (infra plan / InfraSpec section), CIS item, and the standard with its field (PSS profile)."""
    report = evaluate(cluster(deployment("a", containers=[ROOT_CONTAINER])), CATALOGUE, now=NOW, config=CONFIG)
    hosts = report.result("OPS-PSS-001").control
    assert hosts.framework and hosts.source == "PSS baseline (host namespaces): spec.hostNetwork, spec.hostPID, spec.hostIPC"
    sources = f"{hosts.requirement}; {hosts.framework}; {hosts.source}"

    controls = {c["id"]: c for c in json.loads(report.to_json())["controls"]}
    assert (controls["OPS-PSS-001"]["requirement"], controls["OPS-PSS-001"]["framework"],
            controls["OPS-PSS-001"]["source"]) == (hosts.requirement, hosts.framework, hosts.source)
    assert controls["OPS-NET-001"]["source"] is None and "InfraSpec §3.3" in controls["OPS-NET-001"]["requirement"]

    lines = report.to_text().splitlines()
    for result in report.results:
        row = next(i for i, line in enumerate(lines) if f" {result.control.id} " in line and " excepted  " in line)
        assert lines[row + 1].startswith(f"        sources: {result.control.requirement}"), result.control.id
    assert f"        sources: {sources}" in lines

    markdown = report.to_markdown()
    assert "| sources |" in markdown and f"| {sources} |" in markdown
    network = report.result("OPS-NET-001").control
    assert f"| {network.requirement}; {network.framework} |" in markdown

    page = report.to_html()
    assert "<th>source</th>" in page and f"<td>{html.escape(hosts.source)}</td>" in page
    assert f"<td>{html.escape(hosts.requirement)}</td><td>{hosts.framework}</td>" in page


def test_markdown_too_small_for_the_sources_points_at_the_full_reports() -> None:
    report = evaluate(cluster(deployment("a")), CATALOGUE, now=NOW, config=CONFIG)
    text = report.to_markdown(max_chars=6000)
    assert len(text) <= 6000 and "| sources |" not in text
    assert "sources of each control (requirement, CIS item, PSS profile and field): see the JSON or HTML" in text


def test_reports_are_stored_and_the_latest_found(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    assert latest_report_json(store) is None
    first = evaluate(cluster(deployment("a")), CATALOGUE, now=NOW - timedelta(days=7), config=CONFIG)
    second = evaluate(cluster(deployment("a", containers=[ROOT_CONTAINER])), CATALOGUE, now=NOW, config=CONFIG)
    stored = store_report(store, first)
    store_report(store, second)
    assert stored.json_key == "compliance/reports/20260427T070000Z/report.json"
    assert stored.html_url.startswith("file://") and stored.html_url.endswith("report.html")
    latest = latest_report_json(store)
    assert latest is not None and json.loads(latest)["generated_at"] == "2026-05-04T07:00:00Z"
    assert store.get_bytes(stored.html_key).startswith(b"<!DOCTYPE html>")


def write_manifests(root: Path, *documents: dict[str, Any], name: str = "app.yaml") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(yaml.safe_dump_all(documents))
    return root


def compliant_app() -> list[dict[str, Any]]:
    return [namespace("ontology-editor"), default_deny("ontology-editor"), quota("ontology-editor"),
            limit_range("ontology-editor"), deployment("onto-backend"),
            pdb("onto-backend", "ontology-editor", {"matchLabels": {"app": "onto-backend"}}),
            hpa("onto-backend", "ontology-editor", "onto-backend")]


@pytest.fixture
def spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A spec naming the registry of the builders; the CLI finds it through OPS_PLATFORM_SPEC."""
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump({
        "platform": {"name": "test", "environments": ["prod"]},
        "objectives": {"rto_minutes": 15, "rpo_minutes": 60},
        "images": {"registry": {"account": "123456789012", "region": "ap-northeast-2"},
                   "services": [{"name": "onto-backend", "environments": ["prod"]}]},
        "compliance": {"exceptions": str(tmp_path / "exceptions.yaml")},
    }))
    monkeypatch.setenv("OPS_PLATFORM_SPEC", str(path))
    return path


def test_cli_passes_compliant_manifests(tmp_path: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests = write_manifests(tmp_path / "infra", *compliant_app())
    (manifests / "notes.yaml").write_text("platform: {name: x}\n")
    assert main(["--manifests", str(manifests)]) == 0
    out = capsys.readouterr().out
    assert "overall 100.0%" in out
    assert "skipped 1 document(s): not a Kubernetes object" in out


def test_cli_fails_on_error_findings_with_file_and_remediation(
    tmp_path: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = deployment("onto-backend", containers=[secure_container(image="nginx:latest")])
    manifests = write_manifests(tmp_path / "infra", *compliant_app()[:4], bad)
    assert main(["--manifests", str(manifests)]) == 1
    captured = capsys.readouterr()
    expected = "ERROR OPS-IMG-002 Deployment ontology-editor/onto-backend: container app: image nginx:latest uses :latest"
    assert expected in captured.out
    assert f"[{manifests / 'app.yaml'}#5]" in captured.out
    assert "fix: Deploy the image by its git sha tag" in captured.out
    assert "open finding(s) at ERROR or above" in captured.err


def test_cli_exceptions_excuse_until_expiry(
    tmp_path: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = deployment("onto-backend", containers=[secure_container(image=f"{REGISTRY}x:latest")])
    manifests = write_manifests(tmp_path / "infra", *compliant_app()[:4], bad)
    exceptions = tmp_path / "exceptions.yaml"  # the spec's compliance.exceptions: found without --exceptions
    exceptions.write_text(yaml.safe_dump([exception("OPS-IMG-002", "Deployment ontology-editor/*", "2999-01-01")]))
    assert main(["--manifests", str(manifests)]) == 0
    assert "1 excepted" in capsys.readouterr().out

    exceptions.write_text(yaml.safe_dump([exception("OPS-IMG-002", "Deployment ontology-editor/*", "2020-01-01")]))
    assert main(["--manifests", str(manifests), "--exceptions", str(exceptions), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    open_ids = {f["control"] for f in report["findings"] if not f["excepted_by"]}
    assert {"OPS-IMG-002", "OPS-EXC-001"} <= open_ids


def test_cli_fail_on_warn(tmp_path: Path, spec_file: Path) -> None:
    manifests = write_manifests(tmp_path / "infra", *compliant_app()[:2], deployment("onto-backend"))
    assert main(["--manifests", str(manifests)]) == 0
    assert main(["--manifests", str(manifests), "--fail-on", "WARN"]) == 1


def test_cli_renders_helm_charts_and_judges_templated_strings(
    tmp_path: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "infra" / "k8s" / "ontology-editor"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: ontology-editor\nversion: 0.1.0\n")
    (chart / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}\n"
    )
    rules = tmp_path / "infra" / "prometheus" / "rules.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: rules}\ndata:\n"
                     "  summary: '{{ $labels.instance }} is down'\n")
    assert main(["--manifests", str(tmp_path / "infra")]) == 0
    assert "Helm template" not in capsys.readouterr().out
    evidence = load_manifests(tmp_path / "infra")
    assert [obj["metadata"]["name"] for obj in evidence.of("Deployment")] == ["ontology-editor"]
    assert evidence.locations["Deployment default/ontology-editor"] == f"{chart}: templates/deployment.yaml#1"
    assert [obj["metadata"]["name"] for obj in evidence.of("ConfigMap")] == ["rules"]
    assert evidence.locations["ConfigMap default/rules"] == f"{rules}#1 (holds {{{{ }}}}: judged as written)"


@pytest.mark.parametrize(
    ("files", "argv", "message"),
    [
        ({}, ["--manifests", "{tmp}/nowhere"], "does not exist"),
        ({"bad.yaml": "kind: Deployment\n  name: [x\n"}, ["--manifests", "{tmp}/infra"], "bad.yaml line 2"),
        ({"exc.yaml": "- control: OPS-WL-001\n  extra: 1\n"},
         ["--manifests", "{tmp}/infra", "--exceptions", "{tmp}/infra/exc.yaml"], "unknown key"),
        ({}, ["--manifests", "{tmp}/infra", "--exceptions", "{tmp}/none.yaml"], "none.yaml not found"),
        ({}, ["--manifests", "{tmp}/infra", "--spec", "{tmp}/none.yaml"], "file not found"),
        ({}, [], "the following arguments are required: --manifests"),
        ({}, ["--manifests", "{tmp}/infra", "--format", "pdf"], "invalid choice: 'pdf'"),
    ],
)
def test_cli_usage_and_parse_errors_exit_2(
    tmp_path: Path, spec_file: Path, capsys: pytest.CaptureFixture[str],
    files: dict[str, str], argv: list[str], message: str,
) -> None:
    infra = tmp_path / "infra"
    infra.mkdir()
    for name, text in files.items():
        (infra / name).write_text(text)
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    assert message in capsys.readouterr().err


def test_load_manifests_splits_documents_and_lists(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "---\n# empty\n---\napiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: one}}\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: two}}\n"
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: three}\n"
    )
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: hidden}\n")
    evidence = load_manifests(tmp_path)
    assert [ns["metadata"]["name"] for ns in evidence.of("Namespace")] == ["one", "two", "three"]
    assert evidence.locations["Namespace three"] == f"{tmp_path / 'a.yaml'}#2"
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifests(tmp_path / "missing")


def test_module_entry_point_runs(tmp_path: Path, spec_file: Path) -> None:
    manifests = write_manifests(tmp_path / "infra", *compliant_app())
    result = subprocess.run(
        [sys.executable, "-m", "ops_platform.compliance", "--manifests", str(manifests), "--format", "markdown"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("**Compliance 100.0%**")
    # The command for CI must not pay for importing Dagster.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, ops_platform.compliance.cli; print('dagster' in sys.modules)"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "False"
