"""`ops-platform`: the command line for operators and CI."""

import json
import subprocess
import sys

import yaml

from ops_platform.spec import REPO_ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops_platform.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_unknown_command_is_a_usage_error():
    result = run("deploy")
    assert result.returncode == 2
    assert "compliance" in result.stderr


def test_compliance_passes_and_fails_on_manifests(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "ns.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                                   "metadata": {"name": "x", "namespace": "default"}}))
    assert run("compliance", "--manifests", str(clean)).returncode == 0
    missing = run("compliance", "--manifests", str(clean), "--exceptions", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "none.yaml" in missing.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "role.yaml").write_text(yaml.safe_dump({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "everything"},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}))
    result = run("compliance", "--manifests", str(bad))
    assert result.returncode == 1
    assert "OPS-RBAC-001" in result.stdout


def test_the_shipped_manifests_pass_their_own_compliance():
    """What CI runs: every manifest of infra/ judged with the spec's registry and the exceptions file."""
    result = run("compliance", "--manifests", "infra/", "--format", "json")
    report = json.loads(result.stdout)
    open_errors = [f"{f['control']} {f['object']}: {f['message']}" for f in report["findings"]
                   if f["severity"] == "ERROR" and not f["passed"] and not f["excepted_by"]]
    assert (result.returncode, open_errors) == (0, []), result.stderr
    assert report["exceptions"]["unused"] == [], "an exception that excuses nothing any more: delete it"
