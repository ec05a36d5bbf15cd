"""One alert_sensor tick: select_remediations over 5,000 active alerts and 200 mappings.

Goal: under 2 s. Synthetic Alert objects (every alert maps, most are cut by
the cap or cooldowns, as in an alert storm); then, with ``--alertmanager``,
the same 5,000 alerts posted to a real Alertmanager started here and fetched
through ``fetch_firing_alerts`` (tolerant parse) before the selection.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ops_platform.resources.alerting import Alert, Alertmanager, PostableAlert  # noqa: E402
from ops_platform.sensing.alerts import RemediationState, fetch_firing_alerts, select_remediations  # noqa: E402
from ops_platform.spec import PLAYBOOKS, Remediation  # noqa: E402

GOAL_SECONDS = 2.0


def mappings(count: int) -> list[Remediation]:
    return [
        Remediation(
            alert=f"BenchAlert{n % 50}",
            playbook=PLAYBOOKS[n % len(PLAYBOOKS)],
            matchers={"team": f"team{n // 50}"},
            auto_remediate=True,
        )
        for n in range(count)
    ]


def label_sets(count: int) -> list[dict[str, str]]:
    return [
        {
            "alertname": f"BenchAlert{n % 50}",
            "team": f"team{n % 4}",
            "namespace": f"ns-{n % 20}",
            "deployment": f"web-{n % 300}",
            "pod": f"web-{n}",
        }
        for n in range(count)
    ]


def synthetic(count: int, now: datetime) -> list[Alert]:
    return [
        Alert(
            fingerprint=f"{n:016x}",
            labels=labels,
            annotations={},
            starts_at=now - timedelta(seconds=n % 600),
            ends_at=now + timedelta(minutes=5),
            updated_at=now,
            state="active",
            silenced_by=(),
            inhibited_by=(),
            receivers=("null",),
            generator_url=None,
        )
        for n, labels in enumerate(label_sets(count))
    ]


def tick(alerts: list[Alert], remediations: list[Remediation], state: RemediationState, now: datetime) -> tuple[float, int, RemediationState]:
    started = time.perf_counter()
    decision = select_remediations(alerts, remediations, state, now=now, environment="prod", max_concurrent=20)
    cursor = decision.state.to_json()
    elapsed = time.perf_counter() - started
    return elapsed, len(decision.requests), RemediationState.from_json(cursor)


def report(label: str, seconds: float, requests: int) -> None:
    verdict = "PASS" if seconds < GOAL_SECONDS else "MISS"
    print(f"{label}: {seconds:.3f} s, {requests} requests (goal < {GOAL_SECONDS:.0f} s) {verdict}")


def with_alertmanager(count: int, remediations: list[Remediation]) -> None:
    from ops_platform.local_servers.process import ServerProcess, find_binary, free_port
    import requests

    home = Path(tempfile.mkdtemp(prefix="bench-am-"))
    (home / "am.yml").write_text('route: {receiver: "null"}\nreceivers: [{name: "null"}]\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return requests.get(f"{url}/-/ready", timeout=0.5).status_code == 200

    server = ServerProcess(
        "alertmanager",
        [find_binary("prometheus-alertmanager"), f"--config.file={home / 'am.yml'}", f"--storage.path={home / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        log_path=home / "am.log", ready=ready, port=port,
    )
    with server.start():
        client = Alertmanager(url, timeout=30)
        now = datetime.now(UTC)
        batch = [PostableAlert(labels, starts_at=now - timedelta(minutes=1)) for labels in label_sets(count)]
        for start in range(0, count, 1000):
            client.post_alerts(batch[start : start + 1000])
        started = time.perf_counter()
        alerts, problems = fetch_firing_alerts(client)
        fetched = time.perf_counter() - started
        elapsed, requested, _ = tick(alerts, remediations, RemediationState(), datetime.now(UTC))
        print(f"  fetched {len(alerts)} alerts from a real Alertmanager in {fetched:.3f} s ({len(problems)} unreadable)")
        report("tick with fetch from Alertmanager (fetch + select)", fetched + elapsed, requested)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--alerts", type=int, default=5000)
    parser.add_argument("--mappings", type=int, default=200)
    parser.add_argument("--alertmanager", action="store_true", help="also fetch the alerts from a real Alertmanager")
    args = parser.parse_args()
    remediations = mappings(args.mappings)
    now = datetime.now(UTC)
    alerts = synthetic(args.alerts, now)
    print(f"{args.alerts} active alerts, {args.mappings} mappings, max_concurrent 20, environment prod")
    first, requested, state = tick(alerts, remediations, RemediationState(), now)
    report("first tick (empty state)", first, requested)
    second, requested, state = tick(alerts, remediations, state, now + timedelta(minutes=1))
    report("second tick (same alerts, state from the cursor)", second, requested)
    print(f"  cursor: {len(state.to_json())} bytes")
    if args.alertmanager:
        with_alertmanager(args.alerts, remediations)


if __name__ == "__main__":
    main()
