"""A Mermaid picture of the asset graph, for the README.

Drawn from the Dagster asset graph itself (keys, groups, dependencies), so the
picture is the graph. `python -m ops_platform.diagram [spec]` prints it; a
test keeps the README's copy equal to what the shipped spec produces.
"""

from __future__ import annotations

import sys

from ops_platform.spec import Spec, load_spec

GROUP_ORDER = ("infra", "backups", "restore_tests", "snapshots", "apps", "certificates", "compliance")


def render_mermaid(spec: Spec) -> str:
    from ops_platform.definitions import build_definitions

    graph = build_definitions(spec, "local").resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda key: key.to_user_string())
    order = {layer.name: index for index, layer in enumerate(spec.layers_in_order())}
    keys.sort(key=lambda key: (key.path[0] != "infra", order.get(key.path[-1], 0)))

    def node(key: object) -> str:
        return key.to_python_identifier().replace("-", "_")  # type: ignore[attr-defined]

    lines = ["```mermaid", "flowchart LR"]
    groups = sorted({graph.get(key).group_name for key in keys}, key=lambda g: (g not in GROUP_ORDER, GROUP_ORDER.index(g) if g in GROUP_ORDER else 0, g))
    for group in groups:
        lines.append(f"  subgraph {group}")
        for key in keys:
            if graph.get(key).group_name == group:
                lines.append(f'    {node(key)}["{key.to_user_string()}"]')
        lines.append("  end")
    for key in keys:
        for parent in sorted(graph.get(key).parent_keys, key=lambda k: k.to_user_string()):
            lines.append(f"  {node(parent)} --> {node(key)}")
    lines.append("```")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_mermaid(load_spec(sys.argv[1] if len(sys.argv) > 1 else None)), end="")
