"""Applying every infra layer to a real kube-apiserver: the project's code against ``kubectl apply --server-side``.

Both sides apply the same objects as the ServiceAccount ``ops-platform-infra``
(infra/dagster/rbac.yaml) to one real API server (1.20.2, the tests'
``KubeCluster`` of tests/fixtures/kube_server.py), with the CRDs of
infra/crds installed as admin first (what the operators' charts install):
every layer of infra/platform.yaml in dependency order, each in apply order,
as the 1.20 server can take them (``servable_on_1_20``: kinds it serves only
in an older version and custom resources holding an empty string are left
out, counted and printed; ports get ``protocol: TCP``).

1. Create: each run applies the layers with their namespaces renamed for
   that run (``in_namespaces_of``), so every namespaced object is new; the
   cluster-wide ones (roles, storage classes, ...) are created by the first
   run and unchanged after. Ours is ``apply_layer(kube, objects,
   plan=False, wait_timeout=0)`` layer by layer with one new
   ``KubernetesClient`` (discovery included; readiness is checked once and
   not waited for, since nothing runs pods); the baseline is one ``kubectl
   apply --server-side --field-manager=ops-platform -f <dir>`` of the same
   objects written one file per layer in apply order (its discovery and
   OpenAPI download included; kubectl is the one built beside
   kube-apiserver).
2. Re-apply, nothing changed, of the first run's objects: both sides again.
   Forced on both sides (``force=True``, ``--force-conflicts``): the
   controller takes over the StatefulSets' ``volumeClaimTemplates`` after
   the first apply (their manifests do not set apiVersion and kind), so an
   unforced re-apply conflicts.

A first, untimed apply of a copy of its own lets the server settle (right
after the CRDs are installed it stays busy with them for tens of seconds on
two cores: the first apply then takes 3-4 times as long) and creates the
cluster-wide objects. Runs
alternate (ours first, then kubectl first), ``--runs`` of each; the best is
compared (other work on a shared machine only adds time), medians printed
too. Also printed: the cluster's start-up (``cluster.started_seconds``).
Goal: ours / kubectl <= 1.5x for both figures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ops_platform.layers import apply_layer  # noqa: E402
from ops_platform.manifests import load_layer_manifests  # noqa: E402
from ops_platform.resources.kubernetes import KubernetesClient  # noqa: E402
from ops_platform.spec import load_spec  # noqa: E402
from tests.fixtures.kube_server import (  # noqa: E402
    CRD_DIR,
    KubeCluster,
    in_namespaces_of,
    kube_bin_dir,
    servable_on_1_20,
)

IDENTITY = "ops-platform-infra"
Layers = list[tuple[str, list[dict]]]


def layer_objects(prefix: str) -> tuple[Layers, dict[str, list[str]], int]:
    """Every layer's objects as 1.20 takes them, namespaces renamed; what was left out (by reason); how many
    objects were adjusted."""
    layers: Layers = []
    left_out: dict[str, list[str]] = {}
    adjusted = 0
    for layer in load_spec().layers_in_order():
        original = in_namespaces_of(prefix, load_layer_manifests(layer.manifests))
        kept, skipped = servable_on_1_20(original)
        adjusted += sum(1 for obj in kept if obj not in original)
        for reason, refs in skipped.items():
            left_out.setdefault(reason, []).extend(refs)
        layers.append((layer.name, kept))
    return layers, left_out, adjusted


def write_manifests(directory: Path, layers: Layers) -> Path:
    directory.mkdir(parents=True)
    for index, (name, objects) in enumerate(layers):
        (directory / f"{index:02d}-{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return directory


def ours(cluster: KubeCluster, layers: Layers, *, force: bool) -> float:
    api_client = cluster.client_for(IDENTITY)
    try:
        started = time.monotonic()
        kube = KubernetesClient(api_client)
        for _, objects in layers:
            apply_layer(kube, objects, plan=False, wait_timeout=0, force=force)
        return time.monotonic() - started
    finally:
        api_client.close()


def kubectl(cluster: KubeCluster, manifests: Path, kubeconfig: Path, *, force: bool) -> float:
    command = [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), "apply", "--server-side",
               "--field-manager=ops-platform", "-f", str(manifests)] + (["--force-conflicts"] if force else [])
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"kubectl apply failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def alternate(runs: int, sides: list[tuple[str, Callable[[int], float]]]) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {name: [] for name, _ in sides}
    for run in range(runs):
        for name, measure in sides if run % 2 == 0 else list(reversed(sides)):
            figures[name].append(measure(run))
    return figures


def report(figure: str, figures: dict[str, list[float]]) -> None:
    best = {side: min(values) for side, values in figures.items()}
    for side, label in (("ours", "ours (apply_layer per layer)"), ("kubectl", "baseline (kubectl apply --server-side)")):
        print(f"{figure}, {label}: best {best[side]:.2f} s, median {statistics.median(figures[side]):.2f} s "
              f"(runs {', '.join(f'{x:.2f}' for x in figures[side])})")
    ratio = best["ours"] / best["kubectl"]
    print(f"{figure} ratio: {ratio:.2f}x (goal <= 1.5x) {'MET' if ratio <= 1.5 else 'MISS'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each side per figure (default 3)")
    args = parser.parse_args()
    layers, left_out, adjusted = layer_objects("bench")
    count = sum(len(objects) for _, objects in layers)
    print(f"{count} objects in {len(layers)} layers; {adjusted} given protocol TCP on their ports; left out "
          f"{sum(len(refs) for refs in left_out.values())}:")
    for reason, refs in left_out.items():
        print(f"  {len(refs)}: {reason} ({', '.join(refs)})")
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        cluster = KubeCluster(Path(tmp) / "cluster", kube_bin_dir()).start()
        try:
            print(f"cluster started in {cluster.started_seconds:.2f} s (KubeCluster.started_seconds)")
            cluster.install_crds(CRD_DIR)
            kubeconfig = cluster.write_kubeconfig(Path(tmp) / "kubeconfig", IDENTITY)
            warm_up, _, _ = layer_objects("warm")
            print(f"warm-up apply (untimed figure): {ours(cluster, warm_up, force=False):.2f} s")
            runs: dict[str, tuple[Layers, Path]] = {}

            def objects_of(side: str, run: int) -> tuple[Layers, Path]:
                key = f"{side[0]}{run}"
                if key not in runs:
                    renamed, _, _ = layer_objects(key)
                    runs[key] = renamed, write_manifests(Path(tmp) / key, renamed)
                return runs[key]

            created = alternate(args.runs, [
                ("ours", lambda run: ours(cluster, objects_of("ours", run)[0], force=False)),
                ("kubectl", lambda run: kubectl(cluster, objects_of("kubectl", run)[1], kubeconfig, force=False)),
            ])
            reapplied = alternate(args.runs, [
                ("ours", lambda run: ours(cluster, objects_of("ours", 0)[0], force=True)),
                ("kubectl", lambda run: kubectl(cluster, objects_of("kubectl", 0)[1], kubeconfig, force=True)),
            ])
        finally:
            cluster.stop()
    report("create", created)
    report("re-apply", reapplied)


if __name__ == "__main__":
    main()
