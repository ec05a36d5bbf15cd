"""What ``--manifests`` reads: odd shapes, malformed files, templates, Helm charts per environment,
and the exit status CI gates on (0 clean, 1 findings, 2 input error, 3 internal error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops_platform.compliance.cli import main
from ops_platform.compliance.controls import CATALOGUE
from ops_platform.compliance.evidence import Evidence, load_manifests, ref
from ops_platform.compliance.model import ControlConfig, Outcome, control
from ops_platform.compliance.report import ControlFailed, evaluate
from ops_platform.spec import REPO_ROOT, load_spec

REGISTRY = "123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/"
NOW = datetime(2026, 5, 4, 7, 0, tzinfo=UTC)
REFUSED = "(the API server would refuse it)"

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: ontology-editor
  labels: {ops-platform/app-namespace: "true", pod-security.kubernetes.io/enforce: restricted}
"""


def deployment_yaml(name: str, *, privileged: bool = False, image: str = f"{REGISTRY}onto-backend-prod:3f9a1c2",
                    ns: str = "ontology-editor") -> str:
    extra = ", privileged: true" if privileged else ""
    return textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: {name}, namespace: {ns}}}
        spec:
          template:
            spec:
              containers:
              - name: app
                image: "{image}"
                securityContext: {{allowPrivilegeEscalation: false{extra}}}
        """)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    """The registry of the builders, no exceptions file."""
    path = tmp_path / "spec" / "platform.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({
        "platform": {"name": "test", "environments": ["prod"]},
        "objectives": {"rto_minutes": 15, "rpo_minutes": 60},
        "images": {"registry": {"account": "123456789012", "region": "ap-northeast-2"},
                   "services": [{"name": "onto-backend", "environments": ["prod"]}]},
        "compliance": {"exceptions": str(tmp_path / "no-exceptions.yaml")},
    }))
    return path


def judge(manifests: Path, spec: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """The CLI's exit status, its JSON report (every finding, passing too) and its stderr."""
    status = main(["--manifests", str(manifests), "--spec", str(spec), "--format", "json", *args])
    captured = capsys.readouterr()
    return status, json.loads(captured.out) if captured.out.strip() else None, captured.err


def failing(report: Any, control_id: str) -> dict[str, str]:
    return {f["object"]: f["message"] for f in report["findings"]
            if f["control"] == control_id and not f["passed"]}


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_exit_status_0_clean_1_findings_2_input_errors_winning_over_findings(
    tmp_path: Path, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean = write(tmp_path / "clean", {"cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"})
    assert judge(clean, spec, capsys)[0] == 0

    findings = write(tmp_path / "findings", {"ns.yaml": NAMESPACE,
                                              "app.yaml": deployment_yaml("legacy", privileged=True)})
    status, report, err = judge(findings, spec, capsys)
    assert status == 1 and "Deployment ontology-editor/legacy" in failing(report, "OPS-WL-002")
    assert "open finding(s) at ERROR or above" in err

    (findings / "broken.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [x\n")
    status, report, err = judge(findings, spec, capsys)
    assert status == 2, "a report with holes must not read as an ordinary failure"
    assert "Deployment ontology-editor/legacy" in failing(report, "OPS-WL-002"), "the rest is still judged"
    where = f"{findings / 'broken.yaml'} line 3, column 18 (document 1)"
    assert f"not judged: {where}: not valid YAML: while parsing a flow sequence" in err

    for usage in (["--set", "image.tag"], ["--fail-on", "DEBUG"]):
        assert judge(clean, spec, capsys, *usage)[0] == 2
    assert judge(tmp_path / "nowhere", spec, capsys)[0] == 2


def test_exit_status_3_on_an_internal_error_never_read_as_findings(tmp_path: Path, spec: Path) -> None:
    """A broken dependency (here a Helm library that fails to load) is a fault of the command, not of the input."""
    broken = write(tmp_path / "site", {"helm_python/__init__.py": textwrap.dedent("""\
        class HelmError(Exception):
            pass

        class Chart:
            @staticmethod
            def load(path):
                raise RuntimeError("libhelm.so: undefined symbol helm_render")
        """)})
    chart = write(tmp_path / "chart", {"Chart.yaml": "apiVersion: v2\nname: app\nversion: 0.1.0\n",
                                       "templates/cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"})
    result = subprocess.run(
        [sys.executable, "-m", "ops_platform.compliance", "--manifests", str(chart), "--spec", str(spec)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": f"{broken}{os.pathsep}{REPO_ROOT}"},
    )
    assert result.returncode == 3, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == ("ops-platform-compliance: internal error, nothing judged: RuntimeError: "
                         "libhelm.so: undefined symbol helm_render (traceback above)")
    assert "Traceback (most recent call last)" in result.stderr and result.stdout == ""


ODD_SHAPES = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: null-template-metadata, namespace: ontology-editor}
spec:
  template:
    metadata:
    spec:
      containers: [{name: app, image: nginx}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: null-container, namespace: ontology-editor}
spec:
  template:
    spec:
      containers: [null]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: string-spec, namespace: ontology-editor}
spec: "replicas: 3"
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: unnamed-container, namespace: ontology-editor}
spec:
  template:
    spec:
      containers: [{image: nginx}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: null-rule, namespace: ontology-editor}
rules: [null]
"""


def test_odd_but_valid_shapes_are_judged_never_a_traceback(
    tmp_path: Path, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifests = write(tmp_path / "infra", {"ns.yaml": NAMESPACE, "odd.yaml": ODD_SHAPES})
    status, report, err = judge(manifests, spec, capsys)
    assert status == 1 and "Traceback" not in err
    root = failing(report, "OPS-WL-001")
    for name in ("null-template-metadata", "null-container", "string-spec", "unnamed-container"):
        assert f"Deployment ontology-editor/{name}" in root, name
    assert root["Deployment ontology-editor/unnamed-container"].startswith("container #0 (unnamed): ")
    assert "container None" not in json.dumps(report)
    assert "Role ontology-editor/null-rule" in failing(report, "OPS-RBAC-001")
    locations = {f["object"]: f["location"] for f in report["findings"]}
    assert locations["Deployment ontology-editor/string-spec"] == f"{manifests / 'odd.yaml'}#3"


def test_a_namespace_whose_labels_are_not_a_mapping_is_no_app_namespace_by_label() -> None:
    """Labels as a list or a string (valid YAML the API server refuses) never make a control fault; a namespace
    named in the configuration stays an app namespace, and the control reading its labels says what is wrong."""
    label = "ops-platform/app-namespace"
    odd = {"listed": [f"{label}=true"], "keyed": [label], "text": f"{label}=true"}
    evidence = Evidence.from_objects(
        [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
         for name, labels in odd.items()]
        + [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app", "labels": {label: "true"}}}]
    )
    assert evidence.app_namespaces(ControlConfig()) == ["app"]
    config = ControlConfig(app_namespaces=("keyed",))
    assert evidence.app_namespaces(config) == ["app", "keyed"]

    report = evaluate(evidence, CATALOGUE, now=NOW, config=config)
    assert report.control_faults == []
    assert failing(report.to_dict(), "OPS-PSS-013")["Namespace keyed"] == (
        "not judged: metadata.labels is a list, not an object")
    assert {f.object for f in report.result("OPS-QUOTA-001").findings} == {"Namespace app", "Namespace keyed"}


@control(id="TEST-REPLICAS", title="replicas are read as a number", severity="ERROR", requirement="test",
         framework=None, remediation="set spec.replicas", evidence=("manifests",), reads=("Deployment",))
def replicas_read_naively(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    """A control written for the usual shape only: ``spec.replicas + 0`` raises on a string."""
    for obj in evidence.of("Deployment"):
        yield Outcome(ref(obj), obj["spec"].get("replicas", 1) + 0 >= 1, "replicas set")


@control(id="TEST-BROKEN", title="always raises", severity="ERROR", requirement="test", framework=None,
         remediation="fix the control", evidence=("manifests",), reads=("Deployment",))
def broken_control(evidence: Evidence, config: ControlConfig) -> Iterator[Outcome]:
    raise KeyError("threshold")
    yield


def test_a_control_that_raises_on_one_object_fails_that_object_and_judges_the_others(tmp_path: Path) -> None:
    documents = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "x"},
                  "spec": {"replicas": replicas}}
                 for name, replicas in (("a", 2), ("b", "two"), ("c", 3), ("d", "three"), ("e", 1))]
    (tmp_path / "d.yaml").write_text(yaml.safe_dump_all(documents))
    report = evaluate(load_manifests(tmp_path), [replicas_read_naively], now=NOW)
    [result] = report.results
    assert {f.object: (f.passed, f.location) for f in result.findings} == {
        f"Deployment x/{name}": (name not in "bd", f"{tmp_path / 'd.yaml'}#{number}")
        for number, name in enumerate("abcde", start=1)
    }
    assert [(fault.object, fault.location) for fault in report.control_faults] == [
        ("Deployment x/b", f"{tmp_path / 'd.yaml'}#2"), ("Deployment x/d", f"{tmp_path / 'd.yaml'}#4"),
    ]
    message = next(f.message for f in result.findings if f.object == "Deployment x/d")
    assert message.startswith("not judged: the control cannot read this object (TypeError: ")
    assert result.score == 0.6


def test_a_control_that_raises_whatever_the_objects_is_a_bug_of_ours(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(deployment_yaml("a"))
    with pytest.raises(ControlFailed, match="control TEST-BROKEN raised KeyError: 'threshold', whatever the objects"):
        evaluate(load_manifests(tmp_path), [broken_control], now=NOW)


def test_a_directory_of_malformed_foreign_templated_and_valid_files(
    tmp_path: Path, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    privileged_template = deployment_yaml("templated", privileged=True, image="{{ .Values.image }}")
    manifests = write(tmp_path / "infra", {
        "ns.yaml": NAMESPACE,
        "app.yaml": deployment_yaml("valid", privileged=True),
        "values.yaml": "replicaCount: 2\nimage: {tag: abc}\n",
        "quoted-template.yaml": privileged_template,
        "broken-template.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}\n"
                                "spec:\n  template: {spec: {containers: [{name: app, securityContext: "
                                "{privileged: true}]}}\n",
        "unclosed.yaml": 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  text: "starts here\n'
                         + "  and runs on\n" * 50,
    })
    status, report, _ = judge(manifests, spec, capsys)
    assert status == 2
    privileged = failing(report, "OPS-WL-002")
    assert set(privileged) == {"Deployment ontology-editor/valid", "Deployment ontology-editor/templated"}
    locations = {f["object"]: f["location"] for f in report["findings"]}
    assert locations["Deployment ontology-editor/templated"] == (
        f"{manifests / 'quoted-template.yaml'}#1 (holds {{{{ }}}}: judged as written)")
    problems = {Path(p["path"]).name: p for p in report["input_problems"]}
    assert set(problems) == {"broken-template.yaml", "unclosed.yaml"}
    assert (problems["broken-template.yaml"]["line"], problems["broken-template.yaml"]["document"]) == (6, 1)
    assert problems["broken-template.yaml"]["reason"].endswith(
        "(it holds {{ }}: a Helm template is rendered only from its chart's templates/ folder)")
    # Where the unclosed string starts, not the end of the file where the parser gives up.
    assert (problems["unclosed.yaml"]["line"], problems["unclosed.yaml"]["column"]) == (5, 9)
    assert "while scanning a quoted scalar: found unexpected end of stream at line 56" in (
        problems["unclosed.yaml"]["reason"])
    assert report["skipped"] == [{"path": f"{manifests / 'values.yaml'}#1",
                                  "reason": "not a Kubernetes object (no apiVersion/kind)"}]


def test_each_document_is_judged_or_reported_with_its_file_and_index(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: first}
        ---
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: ConfigMap, metadata: {name: second}}
        - {apiVersion: v1, kind: ConfigMap, metadata: {name: 42}}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: "third"
        ---
        [just, a, list]
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: fourth
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: after-the-error}
        """))
    (tmp_path / "latin1.yaml").write_bytes(b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: caf\xe9}\n")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    evidence = load_manifests(tmp_path)
    assert [obj["metadata"]["name"] for obj in evidence.of("ConfigMap")] == ["first", "second"]
    a = tmp_path / "a.yaml"
    assert evidence.locations["ConfigMap default/second"] == f"{a}#2 items[0]"
    assert [str(s.path) for s in evidence.skipped] == [f"{a}#4"]
    shown = [str(problem) for problem in evidence.input_problems]
    assert shown[:2] == [
        f"{a} line 5, column 1 (document 2): items[1]: ConfigMap: metadata.name 42 is not a string {REFUSED}",
        f"{a} line 11, column 1 (document 3): ConfigMap: metadata 'third' is not a mapping {REFUSED}",
    ]
    assert shown[2].startswith(f"{a} line 19, column 11 (document 5): not valid YAML: while parsing a flow mapping")
    assert shown[3:] == [
        f"{tmp_path / 'dangling.yaml'}: cannot read the file: No such file or directory",
        (f"{tmp_path / 'latin1.yaml'}: not YAML text (UTF-8 or UTF-16): unacceptable character #x007d: "
         f'invalid trailing UTF-8 octet in "{tmp_path / "latin1.yaml"}", position 52'),
    ]


CHART = {
    "Chart.yaml": "apiVersion: v2\nname: app\nversion: 0.1.0\n",
    "values.yaml": f"image: {{repository: {REGISTRY}app-prod, tag: 3f9a1c2}}\nprivileged: false\n",
    "values-dev.yaml": "replicas: 2\n",
    "values-prod.yaml": "privileged: true\n",
    "templates/_helpers.tpl": '{{- define "app.labels" -}}\napp: {{ .Chart.Name }}\n{{- end -}}\n',
    "templates/NOTES.txt": "Installed {{ .Release.Name }}.\n",
    "templates/deployment.yaml": textwrap.dedent("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: app, namespace: ontology-editor}
        spec:
          selector:
            matchLabels: {{- include "app.labels" . | nindent 6 }}
          template:
            metadata:
              labels: {{- include "app.labels" . | nindent 8 }}
            spec:
              containers:
              - name: app
                image: {{ required "image.tag is required" .Values.image.tag | printf "%s:%s" .Values.image.repository }}
                securityContext: {allowPrivilegeEscalation: false, privileged: {{ .Values.privileged }}}
        """),
    "templates/pdb.yaml": textwrap.dedent("""\
        apiVersion: policy/v1
        kind: PodDisruptionBudget
        metadata: {name: app, namespace: ontology-editor}
        spec:
          maxUnavailable: 1
          selector:
            matchLabels: {{- include "app.labels" . | nindent 6 }}
        """),
}


def test_a_chart_is_rendered_and_judged_per_environment(tmp_path: Path) -> None:
    chart = write(tmp_path / "infra" / "charts" / "app", CHART)
    write(tmp_path / "infra", {"ns.yaml": NAMESPACE})
    evidence = load_manifests(tmp_path / "infra")
    assert evidence.environments == {"dev", "prod"}
    assert evidence.input_problems == [] and evidence.skipped == []
    report = evaluate(evidence, CATALOGUE, now=NOW, config=ControlConfig(registries=(REGISTRY,)))
    privileged = {f.object: (f.passed, f.location) for f in report.result("OPS-WL-002").findings}
    assert privileged == {
        "Deployment ontology-editor/app@dev": (True, f"{chart} (dev): templates/deployment.yaml#1"),
        "Deployment ontology-editor/app@prod": (False, f"{chart} (prod): templates/deployment.yaml#1"),
    }
    # Each environment is its own cluster: the Deployment of dev sees the PDB of dev only.
    budgets = {f.object: (f.passed, f.message.split(" (")[0]) for f in report.result("OPS-AVAIL-001").findings}
    assert budgets == {
        "Deployment ontology-editor/app@dev": (True, "PodDisruptionBudget app"),
        "Deployment ontology-editor/app@prod": (True, "PodDisruptionBudget app"),
    }
    # A shared object judged the same in both environments is reported once.
    [quota] = report.result("OPS-QUOTA-001").findings
    assert (quota.object, quota.location) == ("Namespace ontology-editor", f"{tmp_path / 'infra' / 'ns.yaml'}#1")


def test_a_chart_that_does_not_render_is_an_input_error_naming_the_environment(
    tmp_path: Path, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = write(tmp_path / "app", {**CHART, "values-qa.yaml": "image: {tag: null}\n"})
    status, report, _ = judge(chart, spec, capsys, "--fail-on", "INFO")
    assert status == 2
    [problem] = report["input_problems"]
    assert problem["path"] == f"{chart} (qa)"
    assert problem["reason"].startswith("Helm cannot render the chart: chart ")
    assert "image.tag is required" in problem["reason"]
    assert "Deployment ontology-editor/app@prod" in failing(report, "OPS-WL-002"), "the other environments are judged"

    status, report, _ = judge(chart, spec, capsys, "--set", "image.tag=latest")
    pins = failing(report, "OPS-IMG-002")
    assert {"Deployment ontology-editor/app@dev", "Deployment ontology-editor/app@prod"} <= set(pins)
    assert "app-prod:latest uses :latest" in pins["Deployment ontology-editor/app@dev"]


def test_a_chart_template_given_without_its_chart_is_skipped_with_the_reason(tmp_path: Path) -> None:
    chart = write(tmp_path / "app", CHART)
    evidence = load_manifests(chart / "templates")
    assert sorted((Path(s.path).name, s.reason) for s in evidence.skipped) == [
        (name, f"Helm template of chart {chart}: judged when the chart directory is given (it is rendered)")
        for name in ("deployment.yaml", "pdb.yaml")
    ]
    assert evidence.objects == {} and evidence.input_problems == []


def test_the_shipped_chart_is_judged_in_every_environment_by_the_readme_command() -> None:
    """``--manifests infra/`` renders infra/k8s/ontology-editor with the spec's compliance.chart_values."""
    spec = load_spec()
    evidence = load_manifests(REPO_ROOT / "infra", chart_values=spec.compliance.chart_values)
    assert evidence.environments == {"dev", "staging", "prod"}
    assert evidence.input_problems == []
    report = evaluate(evidence, CATALOGUE, now=NOW, config=ControlConfig.from_spec(spec))
    chart = REPO_ROOT / "infra" / "k8s" / "ontology-editor"
    non_root = {f.object: (f.passed, f.location) for f in report.result("OPS-WL-001").findings}
    for environment in ("dev", "staging", "prod"):
        for component in ("backend", "frontend"):
            assert non_root[f"Deployment ontology-editor/onto-{component}@{environment}"] == (
                True, f"{chart} ({environment}): templates/deployment-{component}.yaml#1")
    open_errors = [f"{f.control_id} {f.object}: {f.message}" for f in report.open_findings("ERROR") if "@" in f.object]
    assert open_errors == [], "the whole tree, with its exceptions, is gated by tests/test_cli.py"


def test_every_rendering_of_the_report_lists_what_was_not_judged(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [a, b\n")
    report = evaluate(load_manifests(tmp_path), CATALOGUE, now=NOW)
    problem = f"{tmp_path / 'bad.yaml'} line 1, column 7 (document 1): not valid YAML: while parsing a flow sequence"
    assert problem in report.to_text() and problem in report.to_html()
    assert "**1 input problem(s), not judged**: " + problem in report.to_markdown()
    assert json.loads(report.to_json())["input_problems"][0]["line"] == 1
