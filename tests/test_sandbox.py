"""`make run` end to end: scripts/sandbox.py starts the seeded datastores and
the Dagster UI, stops everything on Ctrl-C, and reuses its data the next time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import yaml

from ops_platform.local_servers import free_port, port_is_open
from ops_platform.local_servers.postgres import scratch_dir
from ops_platform.spec import REPO_ROOT

pytestmark = pytest.mark.slow


def sandbox_spec_with_free_ports(path: Path, data: Path | None = None) -> dict[str, int]:
    raw = yaml.safe_load((REPO_ROOT / "infra" / "sandbox.yaml").read_text())
    raw["extends"] = str(REPO_ROOT / "infra" / "platform.yaml")
    ports = {"postgres": free_port(), "redis": free_port(), "etcd": free_port()}
    for store in raw["datastores"]:
        if store["engine"] == "postgresql":
            store["connection"]["port"] = ports["postgres"]
        elif store["engine"] == "redis":
            store["connection"]["port"] = ports["redis"]
        elif store["engine"] == "etcd":
            store["connection"]["endpoints"] = [f"http://127.0.0.1:{ports['etcd']}"]
        target = store["restore_test"]["target"]
        target["port"] = free_port()
        target["data_dir"] = str((data or path.parent) / "restore-test" / store["name"])
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return ports


def start_sandbox(spec: Path, data: Path, ui_port: int) -> tuple[subprocess.Popen[str], float]:
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "sandbox.py"),
         "--spec", str(spec), "--dir", str(data), "--port", str(ui_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"},
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "Dagster UI at" in line:
            return process, time.monotonic() - started
    process.wait(timeout=30)
    raise AssertionError(f"sandbox exited with {process.returncode} before the UI was ready:\n{''.join(lines)}")


def stop_sandbox(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


MATERIALIZATION_QUERY = """
query ($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset { assetMaterializations(limit: 1) {
      metadataEntries { label ... on BoolMetadataEntry { boolValue } } } }
  }
}
"""


def wait_for_materialization(port: int, path: list[str], label: str, timeout: float) -> object:
    """The boolean metadata ``label`` of the asset's newest materialization, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql",
            data=json.dumps({"query": MATERIALIZATION_QUERY, "variables": {"path": path}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            asset = json.load(response)["data"]["assetOrError"]
        for event in asset.get("assetMaterializations") or []:
            for entry in event["metadataEntries"]:
                if entry["label"] == label:
                    return entry.get("boolValue")
        time.sleep(1)
    raise AssertionError(f"no materialization of {'/'.join(path)} within {timeout} s")


def test_make_run_starts_serves_stops_and_reuses_data(tmp_path):
    data = scratch_dir("ops-sandbox-test-")
    spec = tmp_path / "sandbox.yaml"
    ports = sandbox_spec_with_free_ports(spec, data)
    ui_port = free_port()
    try:
        process, ready_after = start_sandbox(spec, data, ui_port)
        try:
            assert ready_after < 60
            nodes = graphql(ui_port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
            keys = {"/".join(node["assetKey"]["path"]) for node in nodes}
            assert {"infra/cluster", "backups/postgres_main", "restore_tests/redis_cache",
                    "apps/onto-backend/prod", "snapshots/data"} <= keys
            settings = dict(
                re.match(r"(\w+)=(.*)", line).groups()
                for line in (data / "sandbox.env").read_text().splitlines()
            )
            assert settings["OPS_ENV"] == "local"
            assert oct((data / "sandbox.env").stat().st_mode & 0o777) == "0o600"
            dsn = (f"host=127.0.0.1 port={ports['postgres']} dbname=ontology user=ops "
                   f"password={settings['PG_PASSWORD'].strip(chr(39))}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                assert conn.execute("select count(*) from concept").fetchone()[0] == 2000
                assert conn.execute("select count(*) from relation").fetchone()[0] == 4000
            for name in ("postgres_main", "redis_cache", "etcd_control_plane"):
                verified = wait_for_materialization(ui_port, ["restore_tests", name], "verified", timeout=240)
                assert verified is True, name
            manifests = list((data / "store" / "backups").rglob("manifest.json"))
            assert {path.parts[-4] for path in manifests} == {"postgres_main", "redis_cache", "etcd_control_plane"}
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("insert into concept (name, description) values ('marker', 'kept')")
        finally:
            stop_sandbox(process)
        for port in (*ports.values(), ui_port):
            assert not port_is_open("127.0.0.1", port), f"port {port} still open after Ctrl-C"

        process, _ = start_sandbox(spec, data, ui_port)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                assert conn.execute("select count(*) from concept where name = 'marker'").fetchone()[0] == 1
                assert conn.execute("select count(*) from concept").fetchone()[0] == 2001
        finally:
            stop_sandbox(process)
    finally:
        import shutil

        shutil.rmtree(data, ignore_errors=True)


def test_sandbox_refuses_a_taken_port(tmp_path):
    import socket

    data = scratch_dir("ops-sandbox-test-")
    spec = tmp_path / "sandbox.yaml"
    ports = sandbox_spec_with_free_ports(spec)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports["postgres"]))
        blocker.listen()
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "sandbox.py"), "--spec", str(spec),
             "--dir", str(data), "--port", str(free_port())],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{ports['postgres']} is already in use" in result.stderr
    assert "infra/sandbox.yaml" in result.stderr
