"""Start-up time of the tests' real Kubernetes API server (tests/fixtures/kube_server.py).

Ours: ``KubeCluster.start()``: certificates and keys, etcd, kube-apiserver
until ``/readyz``, kube-controller-manager, the stand-in Node, the
ServiceAccounts and roles of infra/dagster/rbac.yaml with a token each, and
the kubelet stand-in: everything a test session pays once.

Baseline, in the same run: etcd and kube-apiserver alone (same binary, same
flags) until ``/readyz``, nothing after: the part no fixture can avoid. Runs alternate,
``--runs`` of each; medians are printed with their ratio (goal: <= 1.5x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ops_platform.local_servers.etcd import start_etcd  # noqa: E402
from ops_platform.local_servers.process import ServerProcess, free_port  # noqa: E402
from tests.fixtures.kube_server import KubeCluster, kube_bin_dir  # noqa: E402


def ours(workdir: Path) -> float:
    started = time.monotonic()
    cluster = KubeCluster(workdir, kube_bin_dir()).start()
    elapsed = time.monotonic() - started
    cluster.stop()
    return elapsed


def bare(workdir: Path) -> float:
    """etcd + kube-apiserver to /readyz with the fixture's own flags, nothing else."""
    cluster = KubeCluster(workdir, kube_bin_dir())
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    cluster._write_credentials()
    cluster.etcd = start_etcd(workdir / "etcd", free_port(), free_port(), name="kube")
    apiserver = ServerProcess("kube-apiserver", cluster._apiserver_argv(), log_path=workdir / "apiserver.log",
                              ready=cluster._apiserver_ready, port=cluster.port).start(start_timeout=90)
    elapsed = time.monotonic() - started
    apiserver.stop()
    cluster.etcd.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"ours": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="bench-kube-") as tmp:
        for run in range(args.runs):
            figures["bare"].append(bare(Path(tmp) / f"bare-{run}"))
            figures["ours"].append(ours(Path(tmp) / f"ours-{run}"))
    ours_s, bare_s = statistics.median(figures["ours"]), statistics.median(figures["bare"])
    ratio = ours_s / bare_s
    print(f"kube fixture start-up: {ours_s:.2f} s (runs {', '.join(f'{x:.2f}' for x in figures['ours'])})")
    print(f"baseline etcd + bare kube-apiserver to /readyz: {bare_s:.2f} s "
          f"(runs {', '.join(f'{x:.2f}' for x in figures['bare'])})")
    print(f"ratio: {ratio:.2f}x (goal <= 1.5x) {'MET' if ratio <= 1.5 else 'MISS'}")


if __name__ == "__main__":
    main()
