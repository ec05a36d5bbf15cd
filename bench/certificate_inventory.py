"""Certificate inventory of many live endpoints with bounded concurrency.

A child process serves ``--servers`` real TLS servers on 127.0.0.1 (the
TlsServer of tests/fixtures/tls.py), each waiting a random
``--delay-min``..``--delay-max`` seconds before answering a ClientHello, as a
far or busy endpoint would. ``--endpoints`` endpoints
(``svc-<n>.bench.test:<port>``, resolved to 127.0.0.1) spread over them.

Ours: ``build_inventory(None, endpoints, concurrency=...)``: probe, parse,
verify the chain, check names and key, sort.

Baseline, measured in the same run: the slowest single handshake seen when
probing every server ``--samples`` times one after the other, times the
number of endpoints, divided by the concurrency: the time a perfect pool
would take if every handshake were the slowest. Goal: ours <= 2 x baseline,
with every endpoint inventoried and no error.

The baseline counts no CPU. A TLS handshake costs about 1.5 ms of CPU on
each side with OpenSSL 3.0, so on a small machine a high ``--concurrency``
makes the run CPU-bound (client and servers share the cores): the ``cpu``
line prints that floor so a MISS can be told apart from a slow inventory.

The CLI figure (skip it with ``--no-cli``): the wall time of ``dagster asset
materialize -m ops_platform.definitions --select certificates/inventory``
(the venv's CLI in a subprocess, its own ``DAGSTER_HOME``, ``OPS_ENV=local``,
no cluster: ``KUBECONFIG`` unset, so endpoints only) against the scan
itself, ``build_inventory`` in this process with the arguments the asset
passes (the spec's thresholds, the asset's probe timeout, the default
concurrency, the system trust store plus the bench root), in one run, runs
alternating. A spec cannot say ``resolve``, so the same servers also listen
on ``ceil(endpoints / servers)`` loopback ports each, and the spec (it extends
infra/platform.yaml and sets ``certificates.endpoints``) lists the
``--endpoints`` endpoints ``127.0.0.1:<port>``, spread over the servers as
above; the certificates name 127.0.0.1 as well, and the bench root reaches the
CLI through ``OPS_TRUST_ROOTS``. The first CLI run, which creates the
instance's SQLite storage, is not timed. Goal: CLI <= 1.5 x the scan.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/certificate_inventory.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from bench.dagster_cli import CliRun, DagsterCli, floor, materialization_metadata, phases  # noqa: E402
from ops_platform.certificates.inventory import Inventory, build_inventory  # noqa: E402
from ops_platform.certificates.probe import probe_endpoint  # noqa: E402
from ops_platform.certificates.x509_info import certificate_info, load_trust_roots  # noqa: E402
from ops_platform.spec import load_spec  # noqa: E402
from tests.fixtures.tls import CertificateAuthority, IssuedCertificate, TlsServer, _close_listener  # noqa: E402

GOAL_RATIO = 2.0
CLI_GOAL_RATIO = 1.5
DOMAIN = "bench.test"
ADDRESS = "127.0.0.1"
INVENTORY_SELECT = "certificates/inventory"
# What the asset passes to build_inventory (ops_platform/assets/certificates.py: take_inventory).
ASSET_PROBE_TIMEOUT = 5.0


class ManyPortTlsServer(TlsServer):
    """A :class:`TlsServer` listening on ``ports`` loopback ports: distinct endpoints with no name to resolve."""

    def __init__(self, issued: IssuedCertificate, *, ports: int, delay: Callable[[], float]) -> None:
        super().__init__(issued, delay=delay)
        extra = [socket.create_server((ADDRESS, 0), backlog=256) for _ in range(ports - 1)]
        self.listeners = [self._listener, *extra]
        self.ports = [listener.getsockname()[1] for listener in self.listeners]

    def _accept(self) -> None:
        with selectors.DefaultSelector() as selector:
            for listener in self.listeners:
                selector.register(listener, selectors.EVENT_READ)
            while not self._stopped.is_set():
                for key, _ in selector.select(timeout=0.2):
                    try:
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except OSError:
                        continue
                    threading.Thread(target=self._handle, args=(conn, self._context), daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        for listener in self.listeners:
            _close_listener(listener)


def serve(
    pems: list[tuple[bytes, bytes]], ports: int, delay_min: float, delay_max: float, conn: Connection
) -> None:
    """Child process: start the servers, send their ports, serve until told to stop."""
    servers = [
        ManyPortTlsServer(
            IssuedCertificate.from_pem(*pem), ports=ports, delay=lambda: random.uniform(delay_min, delay_max)
        ).start()
        for pem in pems
    ]
    conn.send([server.ports for server in servers])
    while conn.recv() != "stop":
        conn.send(resource.getrusage(resource.RUSAGE_SELF))
    for server in servers:
        server.stop()


def _server_cpu(conn: Connection) -> float:
    conn.send("rusage")
    usage = conn.recv()
    return usage.ru_utime + usage.ru_stime


def slowest_handshake(ports: list[int], samples: int, resolve: dict[str, str]) -> float:
    slowest = 0.0
    for _ in range(samples):
        for index, port in enumerate(ports):
            result = probe_endpoint(f"svc-{index}.{DOMAIN}:{port}", timeout=5, resolve=resolve)
            if result.error:
                raise SystemExit(f"baseline probe failed: {result.error}")
            slowest = max(slowest, result.seconds)
    return slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20, help="default: build_inventory's own default")
    parser.add_argument("--delay-min", type=float, default=0.020)
    parser.add_argument("--delay-max", type=float, default=0.050)
    parser.add_argument("--samples", type=int, default=3, help="sequential probes of each server for the baseline")
    parser.add_argument("--cli-runs", type=int, default=3, help="alternating runs of the CLI figure (best)")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI figure")
    args = parser.parse_args()

    root = CertificateAuthority("bench root")
    intermediate = root.intermediate("bench intermediate")
    issued = [
        intermediate.issue([f"*.{DOMAIN}"], ip_addresses=[ADDRESS], days=60 + index) for index in range(args.servers)
    ]
    ports_per_server = 1 if args.no_cli else math.ceil(args.endpoints / args.servers)
    receiver, sender = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=serve,
        args=([(i.chain_pem, i.key_pem) for i in issued], ports_per_server, args.delay_min, args.delay_max, sender),
        daemon=True,
    )
    child.start()
    cli_figure = None
    try:
        server_ports: list[list[int]] = receiver.recv()
        ports = [each[0] for each in server_ports]
        endpoints = [f"svc-{n}.{DOMAIN}:{ports[n % len(ports)]}" for n in range(args.endpoints)]
        resolve = {endpoint.rpartition(":")[0]: "127.0.0.1" for endpoint in endpoints}

        slowest = slowest_handshake(ports, args.samples, resolve)
        baseline = slowest * args.endpoints / args.concurrency

        server_cpu_before = _server_cpu(receiver)
        started, cpu_started = time.perf_counter(), time.process_time()
        inventory = build_inventory(
            None, endpoints, concurrency=args.concurrency, probe_timeout=5,
            trust_roots=[certificate_info(root.certificate)], resolve=resolve,
        )
        ours = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
        server_cpu = _server_cpu(receiver) - server_cpu_before
        if not args.no_cli:
            cli_endpoints = [
                f"{ADDRESS}:{server_ports[n % args.servers][n // args.servers]}" for n in range(args.endpoints)
            ]
            with tempfile.TemporaryDirectory(prefix="ops-bench-certificates-") as scratch:
                cli_figure = measure_cli(Path(scratch), root, cli_endpoints, args.cli_runs)
    finally:
        receiver.send("stop")
        child.join(timeout=10)

    errors = [row for row in inventory.rows if row.error]
    findings = inventory.findings()
    ratio = ours / baseline
    verdict = "PASS" if ratio <= GOAL_RATIO and not errors and len(inventory.rows) == args.endpoints else "MISS"
    print(f"endpoints            {args.endpoints} over {args.servers} TLS servers, handshake delay "
          f"{args.delay_min * 1000:.0f}-{args.delay_max * 1000:.0f} ms, concurrency {args.concurrency}")
    print(f"rows                 {len(inventory.rows)} ({len(errors)} with errors, {len(findings)} findings)")
    print(f"ours                 {ours:.3f} s  (build_inventory: probe, parse, verify chain, checks, sort)")
    print(f"slowest handshake    {slowest * 1000:.1f} ms  ({args.samples * args.servers} sequential probes)")
    print(f"baseline             {baseline:.3f} s  (slowest handshake x {args.endpoints} / {args.concurrency})")
    cores = len(os.sched_getaffinity(0))
    print(f"cpu                  ours {client_cpu:.2f} s, the TLS servers {server_cpu:.2f} s, on {cores} cores: "
          f"at least {(client_cpu + server_cpu) / cores:.2f} s of wall time whatever the concurrency "
          f"(load average {os.getloadavg()[0]:.1f})")
    print(f"ratio                {ratio:.2f}  (goal <= {GOAL_RATIO:.1f})  {verdict}")
    if cli_figure is not None:
        print()
        for line in cli_figure:
            print(line)


def inventory_problems(inventory: Inventory, expected: int) -> list[str]:
    problems = [f"{row.name}: {row.error}" for row in inventory.rows if row.error][:3]
    if len(inventory.rows) != expected:
        problems.append(f"{len(inventory.rows)} rows for {expected} endpoints")
    findings = inventory.findings()
    if findings:
        problems.append(f"{len(findings)} findings, e.g. {findings[0].subject}: {findings[0].message}")
    return problems


def measure_cli(scratch: Path, root: CertificateAuthority, endpoints: list[str], runs: int) -> list[str]:
    """The CLI figure's lines: the asset materialized by the CLI against the scan in this process."""
    trust_root = scratch / "bench-root.pem"
    trust_root.write_bytes(root.pem)
    spec_file = scratch / "platform.yaml"
    spec_file.write_text(yaml.safe_dump({
        "extends": str(REPO_ROOT / "infra" / "platform.yaml"),
        "certificates": {"renew_before_days": 21, "fail_below_days": 14, "endpoints": endpoints},
    }, sort_keys=False))
    certificates = load_spec(spec_file).certificates
    cli = DagsterCli(scratch, spec_file, {"OPS_TRUST_ROOTS": str(trust_root)})

    def scan() -> float:
        roots = load_trust_roots([trust_root])  # as the asset does, but outside the timed scan
        started = time.perf_counter()
        inventory = build_inventory(
            None, endpoints, probe_timeout=ASSET_PROBE_TIMEOUT, trust_roots=roots,
            renew_before_days=certificates.renew_before_days, fail_below_days=certificates.fail_below_days,
        )
        seconds = time.perf_counter() - started
        problems = inventory_problems(inventory, len(endpoints))
        if problems:
            raise SystemExit(f"the in-process scan did not inventory every endpoint cleanly: {'; '.join(problems)}")
        return seconds

    cli_runs: list[CliRun] = []

    def materialize() -> float:
        run = cli.materialize(INVENTORY_SELECT)
        cli_runs.append(run)
        return run.seconds

    first = cli.materialize(INVENTORY_SELECT)
    floor(cli)  # untimed: its first run too
    ours: list[float] = []
    baseline: list[float] = []
    floors: list[float] = []
    for round_number in range(runs):
        if round_number % 2 == 0:
            ours.append(materialize())
            baseline.append(scan())
            floors.append(floor(cli).seconds)
        else:
            floors.append(floor(cli).seconds)
            baseline.append(scan())
            ours.append(materialize())
    first_phases, *run_phases = phases(cli, [first, *cli_runs])
    metadata = materialization_metadata(cli, INVENTORY_SELECT)
    incomplete = [p for p in run_phases if p.checks_passed != p.checks or p.checks == 0]
    our_best, base_best = min(ours), min(baseline)
    ratio = our_best / base_best
    ok = ratio <= CLI_GOAL_RATIO and not incomplete and metadata.get("certificates") == len(endpoints)
    best = run_phases[ours.index(our_best)]
    return [
        f"cli                  dagster asset materialize --select {INVENTORY_SELECT}: {len(endpoints)} endpoints "
        f"{ADDRESS}:<port> ({len(set(e.rpartition(':')[2] for e in endpoints))} ports on the same servers)",
        f"cli rows             {metadata.get('certificates')} certificates in the last materialization; checks passed "
        f"per run {', '.join(f'{p.checks_passed}/{p.checks}' for p in run_phases)}",
        f"cli ours             {our_best:.3f} s  (best of {runs}; runs [{', '.join(f'{t:.2f}' for t in ours)}], "
        f"median {statistics.median(ours):.2f} s)",
        f"cli baseline         {base_best:.3f} s  (build_inventory in this process, best of {runs}; runs "
        f"[{', '.join(f'{t:.2f}' for t in baseline)}], median {statistics.median(baseline):.2f} s)",
        f"cli where            {best.describe()}",
        f"cli first run        {first.seconds:.2f} s, not timed (creates the instance's SQLite storage)",
        f"cli floor            {min(floors):.3f} s  (the same CLI materializing the one asset of "
        f"bench/trivial_definitions.py, best of {runs}); ours over the floor {our_best - min(floors):.2f} s for a "
        f"{base_best:.2f} s scan; the goal allows {base_best * CLI_GOAL_RATIO:.2f} s in all",
        f"cli ratio            {ratio:.2f}  (goal <= {CLI_GOAL_RATIO:.1f}; medians "
        f"{statistics.median(ours) / statistics.median(baseline):.2f})  {'PASS' if ok else 'MISS'}",
    ]


if __name__ == "__main__":
    main()
