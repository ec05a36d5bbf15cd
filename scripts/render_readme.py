"""Rewrites the asset graph picture in README.md from the shipped spec."""

import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from ops_platform.diagram import render_mermaid  # noqa: E402
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec  # noqa: E402

BEGIN, END = "<!-- asset-graph:begin -->", "<!-- asset-graph:end -->"


def with_diagram(readme: str) -> str:
    diagram = render_mermaid(load_spec(DEFAULT_SPEC_PATH))
    return re.sub(
        re.escape(BEGIN) + r".*?" + re.escape(END),
        lambda _: f"{BEGIN}\n{diagram}{END}",
        readme,
        flags=re.S,
    )


if __name__ == "__main__":
    path = REPO_ROOT / "README.md"
    path.write_text(with_diagram(path.read_text()))
