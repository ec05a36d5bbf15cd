"""The README's picture is the graph the shipped spec builds, and it documents
every setting the code reads from the environment."""

import re

from ops_platform.spec import REPO_ROOT
from scripts.render_readme import with_diagram

README = (REPO_ROOT / "README.md").read_text()


def test_asset_graph_picture_is_current():
    assert with_diagram(README) == README, "run: .venv/bin/python scripts/render_readme.py"
    assert "infra__cluster --> infra__storage" in README


def test_every_environment_setting_is_documented():
    code = "\n".join(path.read_text() for path in (REPO_ROOT / "ops_platform").rglob("*.py"))
    names = set(re.findall(r'(?:setting|EnvVar|environ\.get|getenv)\(\s*"([A-Z][A-Z0-9_]+)"', code))
    names |= set(re.findall(r'ENV_VAR\s*=\s*"([A-Z][A-Z0-9_]+)"', code))
    assert {"OPS_ENV", "KUBECONFIG", "OPS_BACKUP_BUCKET", "ALERTMANAGER_URL"} <= names
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert not missing, f"README lacks {missing}"
