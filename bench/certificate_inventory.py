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
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/certificate_inventory.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from ops_platform.certificates.inventory import build_inventory  # noqa: E402
from ops_platform.certificates.probe import probe_endpoint  # noqa: E402
from ops_platform.certificates.x509_info import certificate_info  # noqa: E402
from tests.fixtures.tls import CertificateAuthority, IssuedCertificate, TlsServer  # noqa: E402

GOAL_RATIO = 2.0
DOMAIN = "bench.test"


def serve(pems: list[tuple[bytes, bytes]], delay_min: float, delay_max: float, conn: Connection) -> None:
    """Child process: start the servers, send their ports, serve until told to stop."""
    servers = [
        TlsServer(IssuedCertificate.from_pem(*pem), delay=lambda: random.uniform(delay_min, delay_max)).start()
        for pem in pems
    ]
    conn.send([server.port for server in servers])
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
    args = parser.parse_args()

    root = CertificateAuthority("bench root")
    intermediate = root.intermediate("bench intermediate")
    issued = [intermediate.issue([f"*.{DOMAIN}"], days=60 + index) for index in range(args.servers)]
    receiver, sender = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=serve, args=([(i.chain_pem, i.key_pem) for i in issued], args.delay_min, args.delay_max, sender), daemon=True
    )
    child.start()
    try:
        ports: list[int] = receiver.recv()
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


if __name__ == "__main__":
    main()
