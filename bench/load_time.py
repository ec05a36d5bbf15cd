"""Load time of ops_platform.definitions against a trivial one-asset Dagster file.

Each load runs in a fresh interpreter (as `dagster dev` and the code server do),
alternating between the two modules so both see the same machine state. Two
figures: the whole load including `import dagster`, and the part after it
(our spec parsing, resources and asset factories against Dagster's own work
for one asset). Prints medians side by side and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib, sys, time
start = time.perf_counter()
import dagster as dg
after_dagster = time.perf_counter()
module = importlib.import_module(sys.argv[1])
dg.Definitions.validate_loadable(module.defs)
module.defs.get_repository_def().asset_graph
end = time.perf_counter()
print(end - start, end - after_dagster, len(list(module.defs.resolve_all_asset_keys())))
"""


def load_once(module: str) -> tuple[float, float, int]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'bench'}", "PATH": "/usr/bin:/bin",
             "DAGSTER_DISABLE_TELEMETRY": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    total, own, assets = result.stdout.split()
    return float(total), float(own), int(assets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    ours: list[tuple[float, float, int]] = []
    trivial: list[tuple[float, float, int]] = []
    load_once("ops_platform.definitions")  # warm the page cache for both
    load_once("trivial_definitions")
    for _ in range(args.runs):
        ours.append(load_once("ops_platform.definitions"))
        trivial.append(load_once("trivial_definitions"))
    for label, index in (("whole load (import dagster + definitions)", 0), ("definitions after import dagster", 1)):
        our = statistics.median(run[index] for run in ours)
        base = statistics.median(run[index] for run in trivial)
        print(
            f"{label:45s} ops_platform {our * 1000:8.1f} ms ({ours[0][2]} assets)   "
            f"trivial {base * 1000:8.1f} ms ({trivial[0][2]} asset)   ratio {our / base:5.2f}x"
        )
    print(f"medians of {args.runs} runs each, alternating, fresh interpreter per run")


if __name__ == "__main__":
    main()
