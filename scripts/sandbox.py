"""`make run`: the local sandbox and the Dagster UI.

Starts PostgreSQL (seeded with an ontology schema), Redis and etcd on the
loopback ports of infra/sandbox.yaml with their data under .sandbox/, writes
their settings to .sandbox/sandbox.env, and runs `dagster dev` on
127.0.0.1:3000 with OPS_ENV=local. Ctrl-C stops everything it started; the
next run reuses the data.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from ops_platform.local_servers import ServerProcess, ServerStartError, port_is_open  # noqa: E402
from ops_platform.local_servers.etcd import start_etcd  # noqa: E402
from ops_platform.local_servers.postgres import start_postgres  # noqa: E402
from ops_platform.local_servers.redis import start_redis  # noqa: E402
from ops_platform.spec import Datastore, Spec, load_spec  # noqa: E402

SEED_CONCEPTS = 2000
ONTOLOGY_SCHEMA = f"""
create table if not exists concept (
    id bigserial primary key,
    name text not null unique,
    description text not null,
    created_at timestamptz not null default now()
);
create table if not exists property (
    id bigserial primary key,
    concept_id bigint not null references concept(id) on delete cascade,
    key text not null,
    value_type text not null,
    value text not null
);
create table if not exists relation (
    id bigserial primary key,
    source_id bigint not null references concept(id) on delete cascade,
    target_id bigint not null references concept(id) on delete cascade,
    kind text not null
);
insert into concept (name, description)
select 'concept-' || i, 'seeded concept number ' || i
from generate_series(1, {SEED_CONCEPTS}) as i
where not exists (select 1 from concept);
insert into property (concept_id, key, value_type, value)
select c.id, k.key, 'string', k.key || '-of-' || c.name
from concept c cross join (values ('label'), ('definition'), ('source')) as k(key)
where not exists (select 1 from property);
insert into relation (source_id, target_id, kind)
select c.id, 1 + (c.id * 7 + r) % {SEED_CONCEPTS}, (array['is_a', 'part_of'])[1 + r % 2]
from concept c cross join generate_series(0, 1) as r
where not exists (select 1 from relation);
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(REPO_ROOT / "infra" / "sandbox.yaml"))
    parser.add_argument("--dir", default=str(REPO_ROOT / ".sandbox"), help="data directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000, help="port of the Dagster UI")
    parser.add_argument(
        "--no-first-backups", dest="first_backups", action="store_false",
        help="do not back up and restore-test the datastores on the first start",
    )
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    sandbox = Path(args.dir).absolute()
    sandbox.mkdir(parents=True, exist_ok=True)
    secrets_env = load_or_create_secrets(sandbox / "secrets.env")

    started: list[ServerProcess] = []
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    began = time.monotonic()
    try:
        for store in spec.datastores:
            server = start_datastore(store, sandbox, secrets_env)
            if server is not None:
                started.append(server)
                print(f"sandbox: {store.name} ({store.engine}) on {server.host}:{server.port}", flush=True)
        settings = sandbox_settings(args.spec, sandbox, secrets_env)
        write_env_file(sandbox / "sandbox.env", settings)
        dagster = start_dagster(sandbox, settings, args.host, args.port)
        started.append(dagster)
        print(
            f"sandbox: Dagster UI at http://{args.host}:{args.port} "
            f"(ready {time.monotonic() - began:.1f} s after start); Ctrl-C stops everything",
            flush=True,
        )
        if args.first_backups and not any((sandbox / "store" / "backups").rglob("manifest.json")):
            first = start_first_backups(spec, sandbox, settings)
            started.append(first)
            print(f"sandbox: taking the first backups and restore tests (log {first.log_path})", flush=True)
        while dagster.running():
            time.sleep(0.5)
        print(f"sandbox: dagster dev exited with code {dagster.process.returncode}", flush=True)
        return 1 if not stop_requested else 0
    except KeyboardInterrupt:
        print("sandbox: stopping", flush=True)
        return 0
    except ServerStartError as exc:
        print(f"sandbox: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for server in reversed(started):
            server.stop()


def load_or_create_secrets(path: Path) -> dict[str, str]:
    """Passwords of the sandbox servers: made once, kept for the next run."""
    values = read_env_file(path) if path.exists() else {}
    for name in ("PG_PASSWORD", "REDIS_PASSWORD"):
        values.setdefault(name, secrets.token_urlsafe(18))
    write_env_file(path, values)
    return values


def start_datastore(store: Datastore, sandbox: Path, secrets_env: dict[str, str]) -> ServerProcess | None:
    conn = store.connection
    password = secrets_env.get(conn.password_env) if conn.password_env else None
    data_dir = sandbox / store.name
    if store.engine == "postgresql":
        ensure_free(store, conn.host, conn.port)
        server = start_postgres(
            data_dir, conn.port, host=conn.host, user=conn.user, password=password or "",
            database=conn.database,
        )
        with server.connect() as connection:
            connection.execute(ONTOLOGY_SCHEMA)
        return server
    if store.engine == "redis":
        ensure_free(store, conn.host, conn.port)
        server = start_redis(data_dir, conn.port, host=conn.host, password=password)
        client = server.client()
        if client.dbsize() == 0:
            for i in range(500):
                client.hset(f"concept:{i}", mapping={"name": f"concept-{i}", "views": i % 17})
            client.set("ontology:schema_version", "1")
        return server
    if store.engine == "etcd":
        endpoint = (conn.endpoints or [""])[0]
        host, port = endpoint.split("//")[-1].rsplit(":", 1)
        ensure_free(store, host, int(port))
        server = start_etcd(data_dir, int(port), int(port) + 1, host=host)
        seed_etcd(server.url)
        return server
    print(f"sandbox: {store.name} ({store.engine}) has no local server; skipped", flush=True)
    return None


def ensure_free(store: Datastore, host: str | None, port: int | None) -> None:
    if host and port and port_is_open(host, port):
        raise ServerStartError(
            f"{store.name}: port {host}:{port} is already in use (another sandbox running? "
            "stop it, or change the port in infra/sandbox.yaml)"
        )


def seed_etcd(url: str) -> None:
    import base64
    import json

    def put(key: str, value: str) -> None:
        body = json.dumps(
            {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value.encode()).decode()}
        ).encode()
        request = urllib.request.Request(f"{url}/v3/kv/put", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    for i in range(50):
        put(f"/ontology/config/feature-{i}", "enabled" if i % 2 else "disabled")


def sandbox_settings(spec_file: str, sandbox: Path, secrets_env: dict[str, str]) -> dict[str, str]:
    return {
        "OPS_ENV": "local",
        "OPS_PLATFORM_SPEC": str(Path(spec_file).absolute()),
        "OPS_BACKUP_DIR": str(sandbox / "store"),
        "DAGSTER_HOME": str(sandbox / "dagster_home"),
        **secrets_env,
    }


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


def write_env_file(path: Path, values: dict[str, str]) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(values.items())))


def start_dagster(sandbox: Path, settings: dict[str, str], host: str, port: int) -> ServerProcess:
    if port_is_open(host, port):
        raise ServerStartError(f"dagster: port {host}:{port} is already in use (use --port)")
    home = Path(settings["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").touch()
    tmp = sandbox / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, **settings, "TMPDIR": str(tmp), "DAGSTER_DISABLE_TELEMETRY": "1"}
    server = ServerProcess(
        "dagster dev",
        [
            str(Path(sys.executable).parent / "dagster"), "dev",
            "-w", str(REPO_ROOT / "workspace.yaml"),
            "-h", host, "-p", str(port),
        ],
        log_path=sandbox / "dagster.log",
        ready=lambda: _ui_answers(host, port),
        cwd=REPO_ROOT,
        env=env,
        host=host,
        port=port,
        stop_signal=signal.SIGINT,
    )
    return server.start(start_timeout=120)


WORKSPACE_QUERY = (
    "{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus "
    "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
)


def start_first_backups(spec: Spec, sandbox: Path, settings: dict[str, str]) -> ServerProcess:
    """Back up every sandbox datastore, then restore-test each, as runs of the
    sandbox's Dagster instance, so the UI shows them from the start."""
    dagster = str(Path(sys.executable).parent / "dagster")
    backups = ",".join(f"backups/{store.name}" for store in spec.datastores)
    restore_tests = ",".join(f"restore_tests/{s.name}" for s in spec.datastores if s.restore_test)
    script = (
        f"{shlex.quote(dagster)} asset materialize -m ops_platform.definitions "
        f"--select {shlex.quote(backups)} && "
        f"{shlex.quote(dagster)} asset materialize -m ops_platform.definitions "
        f"--select {shlex.quote(restore_tests)}"
    )
    env = {**os.environ, **settings, "TMPDIR": str(sandbox / "tmp"), "DAGSTER_DISABLE_TELEMETRY": "1"}
    process = ServerProcess(
        "first backups", ["bash", "-c", script], log_path=sandbox / "first-backups.log",
        ready=lambda: True, cwd=REPO_ROOT, env=env,
    )
    return process.start()


def _ui_answers(host: str, port: int) -> bool:
    """Ready when the UI answers and the code location has loaded (or failed to load)."""
    import json

    request = urllib.request.Request(
        f"http://{host}:{port}/graphql",
        data=json.dumps({"query": WORKSPACE_QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        entries = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
    if not entries or any(entry["loadStatus"] != "LOADED" for entry in entries):
        return False
    for entry in entries:
        if entry["locationOrLoadError"]["__typename"] == "PythonError":
            print(f"sandbox: code location {entry['name']} failed to load:\n"
                  f"{entry['locationOrLoadError']['message']}", file=sys.stderr, flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
