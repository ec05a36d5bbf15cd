"""PostgreSQL pg_dump backups and restore tests against the bare tools, in one run.

Everything runs here, on loopback: a PostgreSQL 15 started with
``start_postgres`` in a scratch directory (autovacuum off, see
:func:`bench_servers`), holding ``pgbench -i`` databases, and an S3 bucket
on a moto server started by this script. Four figures,
each beside its baseline measured in the same run:

1. Backup throughput (MB/s of ``pg_database_size``, MB = 10^6 bytes):
   ``BackupCatalog(S3ObjectStore, "bench").run_backup(PostgresDumpDriver(), ...)``
   against ``pg_dump -Fc <same database> > /dev/null`` (same TCP login, same
   default compression). Runs alternate (ours first, then the baseline
   first); the best of ``--runs`` is compared, the medians are printed
   too. Best, because the machine may be shared: other work only ever adds
   time to a run. Goal: ratio >= 0.8.
2. Peak RSS of the backup step for a small and a large database: the step
   runs in a child Python process that prints its own ``ru_maxrss`` and
   pg_dump's peak (its ``VmHWM``, polled: ``RUSAGE_CHILDREN`` would report
   the forked Python image, see :class:`ToolPeakRss`). Goal: large / small
   <= 1.2 for both (streaming, not buffering).
3. Restore test time: the whole ``run_restore_test`` call (sha256 read-back,
   ``pg_restore --list`` and full decode, restore into a scratch database on
   the same server, row counts, one ``verify_sql`` query, drop) of the last
   backup of figure 1, verified and marked verified first as the backup
   asset does, against ``pg_restore --no-owner -d <fresh database> <dump
   file>`` of the same dump, read from a local file (downloaded once from
   the store; a file is as fast as a pipe here). A CHECKPOINT precedes every
   run. Runs alternate; best, medians printed too. Goal: <= 1.2.
4. The restore test as an operator runs it: the wall time of ``dagster asset
   materialize -m ops_platform.definitions --select restore_tests/bench``
   (the venv's CLI in a subprocess; its own ``DAGSTER_HOME``; a spec that
   extends infra/platform.yaml with this server as its only datastore;
   ``OPS_ENV=local``, ``OPS_BACKUP_BUCKET`` on the same moto) against plain
   ``pg_restore`` of the same dump, as in figure 3. The backup it restores
   is taken with the CLI first (``--select backups/bench``: backup,
   verification, marker, retention), which also creates the instance's
   storage. Runs alternate; best, medians and where the CLI's time went
   (from the run's event log) printed too. Goal: <= 1.5.

``--quick`` uses ~100 MiB (and ~10 MiB as the small RSS database) for a
check in under a minute; the default (1 GiB) takes about three minutes on
two cores. Servers and temporary directories are removed on exit, Ctrl-C
and SIGTERM included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/backup_postgres.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402
import yaml  # noqa: E402
from psycopg import sql  # noqa: E402

from bench.dagster_cli import CliRun, DagsterCli, phases  # noqa: E402
from ops_platform.backups.catalog import BackupCatalog, day_folder  # noqa: E402
from ops_platform.backups.manifest import BackupManifest  # noqa: E402
from ops_platform.backups.postgres_dump import ARTIFACT_NAME, PostgresDumpDriver, count_rows  # noqa: E402
from ops_platform.backups.restore_test import RestoreTestResult, run_restore_test  # noqa: E402
from ops_platform.local_servers.postgres import (  # noqa: E402
    PostgresServer,
    postgres_bin_dir,
    scratch_dir,
    start_postgres,
)
from ops_platform.local_servers.process import ServerProcess, free_port  # noqa: E402
from ops_platform.resources.object_store import MiB, S3ObjectStore, aws_client  # noqa: E402
from ops_platform.spec import Datastore  # noqa: E402

MB = 1_000_000
REGION = "ap-northeast-2"
BUCKET = "ops-bench-backups"
DATASTORE = "bench"
RESTORE_DATABASE = "bench_restore_test"
BASELINE_RESTORE_DATABASE = "bench_pg_restore"
VERIFY_SQL = ["select sum(abalance) from pgbench_accounts"]
PASSWORD_ENV = "BENCH_PG_PASSWORD"
# Measured with PostgreSQL 15: pg_database_size after `pgbench -i -s N` is about 7.5 MB + N * 15.7 MB.
PGBENCH_BASE_BYTES = 7_500_000
PGBENCH_BYTES_PER_SCALE = 15_700_000

THROUGHPUT_GOAL = 0.8
RSS_GOAL = 1.2
RESTORE_GOAL = 1.2
CLI_RESTORE_GOAL = 1.5


def pgbench_scale(size_mib: float) -> int:
    """The ``pgbench -i -s`` scale whose database is about ``size_mib`` MiB."""
    return max(1, round((size_mib * MiB - PGBENCH_BASE_BYTES) / PGBENCH_BYTES_PER_SCALE))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def today_folder() -> str:
    """The day folder a backup started now is filed under (the asset uses the platform's timezone)."""
    return day_folder(datetime.now(UTC), "UTC")


@dataclass(frozen=True)
class BenchDatabase:
    name: str
    scale: int
    size_bytes: int

    @property
    def label(self) -> str:
        return f"{self.name} ({self.size_bytes / MB:,.0f} MB, pgbench -s {self.scale})"


@dataclass
class Bench:
    """The servers of one run and how to reach them."""

    base: Path
    server: PostgresServer
    store: S3ObjectStore
    bin_dir: Path

    def conninfo(self, database: str) -> str:
        """A libpq target without the password (it goes in PGPASSWORD)."""
        return psycopg.conninfo.make_conninfo(
            host=self.server.host, port=self.server.port, user=self.server.user, dbname=database
        )

    def tool_env(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
        env["PGPASSWORD"] = self.server.password
        return env

    def datastore(self, database: str, name: str = DATASTORE) -> Datastore:
        return Datastore.model_validate(self.datastore_fields(database, name))

    def datastore_fields(self, database: str, name: str = DATASTORE) -> dict[str, Any]:
        """The datastore as a spec file says it (``schedule`` and ``retention`` left to their defaults)."""
        return {
            "name": name,
            "engine": "postgresql",
            "method": "pg_dump",
            "connection": {
                "host": self.server.host,
                "port": self.server.port,
                "database": database,
                "user": self.server.user,
                "password_env": PASSWORD_ENV,
            },
            "restore_test": {
                "target": {
                    "host": self.server.host,
                    "port": self.server.port,
                    "database": RESTORE_DATABASE,
                    "user": self.server.user,
                },
                "verify_sql": VERIFY_SQL,
            },
        }

    def create_pgbench_database(self, name: str, scale: int) -> BenchDatabase:
        with self.server.connect_superuser() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(self.server.user)))
        initialised = subprocess.run(
            # G: rows generated by the server (faster than COPY from the client), then vacuum and primary keys.
            [str(self.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale), "-I", "dtGvp", self.conninfo(name)],
            env=self.tool_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if initialised.returncode != 0:
            raise RuntimeError(f"pgbench -i -s {scale} of {name} failed:\n{initialised.stderr[-3000:]}")
        with self.server.connect_superuser() as conn:
            conn.execute("CHECKPOINT")
            row = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
        assert row is not None
        return BenchDatabase(name, scale, int(row[0]))

    def recreate_database(self, name: str) -> None:
        with self.server.connect_superuser() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
                    sql.Identifier(name), sql.Identifier(self.server.user)
                )
            )

    def checkpoint(self) -> None:
        """Flush what an earlier run left dirty, so no run pays for the one before it."""
        with self.server.connect_superuser() as conn:
            conn.execute("CHECKPOINT")

    def drop_database(self, name: str) -> None:
        with self.server.connect_superuser() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def discard_backups(self, datastore: str) -> None:
        for stored in list(self.store.list(f"backups/{datastore}/")):
            self.store.delete(stored.key)


def point_boto3_at(endpoint: str, config_dir: Path) -> None:
    """boto3's own environment, inherited by the RSS probe; the operator's ~/.aws stays out."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CA_BUNDLE"):
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
            "AWS_CONFIG_FILE": str(config_dir / "config"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )


def moto_answers(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as response:
        return response.status == 200


def s3_store() -> S3ObjectStore:
    client = aws_client("s3", region=None, endpoint_url=None, needed_for="bench", read_timeout=300)
    return S3ObjectStore(client, BUCKET)


def processes_mentioning(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_leftovers(mark: str, timeout: float = 10.0) -> None:
    """Stop what an interrupted start left running under ``mark`` (our scratch dir): initdb, a postmaster.

    Waits for them, so the scratch directory is not removed while they still write in it.
    """
    for signal_number in (signal.SIGINT, signal.SIGKILL):
        pids = processes_mentioning(mark)
        for pid in pids:
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not pids:
            return


@contextmanager
def bench_servers() -> Iterator[Bench]:
    with ExitStack() as cleanup:
        base = scratch_dir("ops-bench-backup-")
        cleanup.callback(shutil.rmtree, base, True)
        cleanup.callback(stop_leftovers, str(base))

        port = free_port()
        (base / "aws").mkdir()
        (base / "moto-tmp").mkdir()
        moto = ServerProcess(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            log_path=base / "moto.log",
            ready=lambda: moto_answers(f"http://127.0.0.1:{port}"),
            env={**os.environ, "TMPDIR": str(base / "moto-tmp")},
            port=port,
        )
        cleanup.callback(moto.stop)  # before start: an interrupted start is stopped too
        moto.start()
        point_boto3_at(moto.url, base / "aws")
        store = s3_store()
        store.client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})

        password = secrets.token_urlsafe(18)
        os.environ[PASSWORD_ENV] = password
        # Autovacuum off: its workers on the freshly restored tables would compete for the cores in timed
        # runs, and one still working in the scratch database at cleanup makes the restore test fail
        # (DROP DATABASE WITH (FORCE) by a role without pg_signal_backend cannot terminate it).
        server = start_postgres(
            base / "pgdata", free_port(), password=password, database="postgres", extra_conf={"autovacuum": "off"}
        )
        cleanup.callback(server.stop)
        with server.connect_superuser() as conn:
            conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(server.user)))
        yield Bench(base=base, server=server, store=store, bin_dir=postgres_bin_dir())


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = action()
    return time.perf_counter() - started, value


def alternate(ours: Callable[[], float], baseline: Callable[[], float], runs: int) -> tuple[list[float], list[float]]:
    """``runs`` rounds; odd rounds run the baseline first so neither side always goes first."""
    our_times: list[float] = []
    base_times: list[float] = []
    for round_number in range(runs):
        if round_number % 2 == 0:
            our_times.append(ours())
            base_times.append(baseline())
        else:
            base_times.append(baseline())
            our_times.append(ours())
    return our_times, base_times


def spread(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


@dataclass(frozen=True)
class Row:
    measurement: str
    ours: str
    baseline: str
    ratio: float
    goal: str
    ok: bool


def count_rows_once(bench: Bench, database: str) -> None:
    with bench.server.connect(database) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        count_rows(conn)


def measure_throughput(bench: Bench, database: BenchDatabase, runs: int) -> tuple[Row, int]:
    """Median seconds of our backup and of pg_dump -Fc > /dev/null; returns the row and the dump size."""
    catalog = BackupCatalog(bench.store, DATASTORE)
    driver = PostgresDumpDriver()
    spec = bench.datastore(database.name)
    folder = today_folder()
    dump_sizes: list[int] = []

    def our_backup() -> float:
        bench.discard_backups(DATASTORE)  # keep moto small; the last backup stays for the restore test
        seconds, manifest = timed(
            lambda: catalog.run_backup(driver, spec, folder, password=bench.server.password)
        )
        dump_sizes.append(manifest.artifact_list()[0].size)
        return seconds

    def pg_dump() -> float:
        seconds, _ = timed(
            lambda: subprocess.run(
                [str(bench.bin_dir / "pg_dump"), "-Fc", f"--dbname={bench.conninfo(database.name)}"],
                env=bench.tool_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                check=True,
            )
        )
        return seconds

    ours, baseline = alternate(our_backup, pg_dump, runs)
    our_best, base_best = min(ours), min(baseline)
    counting = min(timed(lambda: count_rows_once(bench, database.name))[0] for _ in range(runs))
    our_rate = database.size_bytes / MB / our_best
    base_rate = database.size_bytes / MB / base_best
    ratio = our_rate / base_rate
    print(
        f"backup throughput, {database.label}: ops_platform {our_rate:7.1f} MB/s ({our_best:.2f} s)   "
        f"pg_dump -Fc > /dev/null {base_rate:7.1f} MB/s ({base_best:.2f} s)   ratio {ratio:.2f}x   "
        f"goal >= {THROUGHPUT_GOAL}x  {verdict(ratio >= THROUGHPUT_GOAL)}"
    )
    print(
        f"    best of {runs} alternating runs; seconds per run: ops_platform [{spread(ours)}]  pg_dump [{spread(baseline)}]; "
        f"medians {statistics.median(ours):.2f} s vs {statistics.median(baseline):.2f} s = ratio "
        f"{statistics.median(baseline) / statistics.median(ours):.2f}x"
    )
    print(f"    dump {dump_sizes[-1] / MB:.1f} MB in S3 (moto); MB/s are of the database size")
    print(
        f"    of our {our_best:.2f} s, counting the rows of every table before pg_dump starts takes "
        f"{counting:.2f} s (count_rows alone on the same database, best of {runs})"
    )
    row = Row(
        "backup throughput", f"{our_rate:.1f} MB/s", f"{base_rate:.1f} MB/s", ratio, f">= {THROUGHPUT_GOAL}x",
        ratio >= THROUGHPUT_GOAL,
    )
    return row, dump_sizes[-1]


RSS_PROBE = "--rss-probe"


def kib_field(status: str, name: str) -> int:
    """``VmHWM`` of a /proc/<pid>/status text, in KiB."""
    for line in status.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return 0


class ToolPeakRss(threading.Thread):
    """Polls the VmHWM of this process's children named ``command``; the largest one seen is ``peak_kib``.

    ``RUSAGE_CHILDREN`` cannot tell a tool's own peak: at exec the kernel keeps
    the high-water mark of the forked image, i.e. of this Python process.
    """

    def __init__(self, command: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.command = command
        self.interval = interval
        self.peak_kib = 0
        self.seen = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        seen: set[int] = set()
        while not self._stop_event.wait(self.interval):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                    if stat[stat.index("(") + 1 : stat.rindex(")")] != self.command:
                        continue
                    if int(stat[stat.rindex(")") + 2 :].split()[1]) != me:
                        continue
                    hwm = kib_field((entry / "status").read_text(), "VmHWM")
                except (OSError, ValueError):
                    continue
                seen.add(int(entry.name))
                self.peak_kib = max(self.peak_kib, hwm)
            self.seen = len(seen)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def rss_probe(request: str) -> None:
    """The child side of the RSS measurement: one backup, then its peak RSS as JSON on stdout."""
    params = json.loads(request)
    spec = Datastore.model_validate(params["datastore"])
    catalog = BackupCatalog(s3_store(), spec.name)
    driver = PostgresDumpDriver()
    status = Path("/proc/self/status").read_text()
    before = {"rss_kib": kib_field(status, "VmRSS"), "hwm_kib": kib_field(status, "VmHWM")}
    watcher = ToolPeakRss("pg_dump")
    watcher.start()
    started = time.perf_counter()
    manifest = catalog.run_backup(driver, spec, params["folder"], password=os.environ[PASSWORD_ENV])
    seconds = time.perf_counter() - started
    watcher.stop()
    print(
        json.dumps(
            {
                "rss_before_kib": before["rss_kib"],
                "hwm_before_kib": before["hwm_kib"],
                "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rusage_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                "pg_dump_peak_kib": watcher.peak_kib,
                "pg_dump_processes": watcher.seen,
                "seconds": seconds,
                "dump_bytes": manifest.artifact_list()[0].size,
            }
        )
    )


def backup_in_child(bench: Bench, database: BenchDatabase) -> dict[str, Any]:
    name = f"rss_{database.name}"
    request = {
        "datastore": bench.datastore(database.name, name=name).model_dump(mode="json"),
        "folder": today_folder(),
    }
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), RSS_PROBE, json.dumps(request)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the RSS probe of {database.name} failed:\n{result.stderr[-3000:]}")
    bench.discard_backups(name)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_rss(bench: Bench, small: BenchDatabase, large: BenchDatabase) -> list[Row]:
    probes = {db.name: backup_in_child(bench, db) for db in (small, large)}
    rows: list[Row] = []
    for db in (small, large):
        probe = probes[db.name]
        print(
            f"backup step RSS, {db.label}: python peak {probe['peak_kib'] / 1024:6.1f} MiB "
            f"(RSS {probe['rss_before_kib'] / 1024:.1f} MiB and peak {probe['hwm_before_kib'] / 1024:.1f} MiB "
            f"before the backup)   pg_dump peak {probe['pg_dump_peak_kib'] / 1024:5.1f} MiB "
            f"(RUSAGE_CHILDREN {probe['rusage_children_kib'] / 1024:.1f} MiB)   "
            f"{probe['seconds']:.2f} s, dump {probe['dump_bytes'] / MB:.1f} MB"
        )
        if probe["pg_dump_processes"] == 0:
            print("    warning: no pg_dump process was seen while polling; its peak is unknown")
    small_probe, large_probe = probes[small.name], probes[large.name]
    size_ratio = large.size_bytes / small.size_bytes
    for what, field_name in (("python process", "peak_kib"), ("pg_dump", "pg_dump_peak_kib")):
        ratio = large_probe[field_name] / small_probe[field_name]
        print(
            f"peak RSS {what}: {large.name} {large_probe[field_name] / 1024:6.1f} MiB   "
            f"{small.name} {small_probe[field_name] / 1024:6.1f} MiB   ratio {ratio:.2f}x for {size_ratio:.1f}x the data   "
            f"goal <= {RSS_GOAL}x  {verdict(ratio <= RSS_GOAL)}"
        )
        rows.append(
            Row(
                f"peak RSS {what}",
                f"{large_probe[field_name] / 1024:.1f} MiB ({large.name})",
                f"{small_probe[field_name] / 1024:.1f} MiB ({small.name})",
                ratio,
                f"<= {RSS_GOAL}x",
                ratio <= RSS_GOAL,
            )
        )
    print(
        "    python peak is ru_maxrss of the child that ran run_backup (imports included); pg_dump peak is its "
        f"VmHWM polled every 20 ms (the dump and `pg_dump --version`), because RUSAGE_CHILDREN keeps the forked Python image's high-water mark; "
        f"one S3 part is {bench.store.part_size / MiB:.0f} MiB"
    )
    return rows


def download_dump(bench: Bench, manifest: BackupManifest, path: Path) -> None:
    artifact = next(a for a in manifest.artifact_list() if a.name == ARTIFACT_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    with bench.store.get(artifact.key) as stream, open(path, "wb") as out:
        shutil.copyfileobj(stream, out, MiB)


def verify_and_mark(catalog: BackupCatalog, driver: PostgresDumpDriver, manifest: BackupManifest) -> None:
    """What the backup asset does before a backup counts: checksum, the tool's verification, the marker."""
    problems = catalog.verify_artifacts(manifest)
    verification = driver.verify(manifest, catalog.store)
    problems += verification.problems
    if problems:
        raise RuntimeError(f"backup {manifest.backup_id} failed its verification: {'; '.join(problems)}")
    catalog.mark_verified(manifest, verification.checked, datetime.now(UTC))


def plain_pg_restore(bench: Bench, dump_file: Path) -> float:
    """Seconds of ``pg_restore --no-owner -d <fresh database> <file>``; the database is dropped after."""
    bench.recreate_database(BASELINE_RESTORE_DATABASE)
    bench.checkpoint()
    seconds, _ = timed(
        lambda: subprocess.run(
            [
                str(bench.bin_dir / "pg_restore"),
                "--no-owner",
                f"--dbname={bench.conninfo(BASELINE_RESTORE_DATABASE)}",
                str(dump_file),
            ],
            env=bench.tool_env(),
            stdin=subprocess.DEVNULL,
            check=True,
        )
    )
    bench.drop_database(BASELINE_RESTORE_DATABASE)
    return seconds


def measure_restore(bench: Bench, database: BenchDatabase, runs: int) -> Row:
    catalog = BackupCatalog(bench.store, DATASTORE)
    manifest = catalog.latest()
    assert manifest is not None, "the throughput runs leave the last backup in the store"
    assert manifest.restore["database"] == database.name
    driver = PostgresDumpDriver(target_password=bench.server.password)
    seconds, _ = timed(lambda: verify_and_mark(catalog, driver, manifest))
    print(f"    verified backup {manifest.backup_id} (sha256 read-back, pg_restore --list and full decode) "
          f"in {seconds:.2f} s and marked it verified, as the backup asset does")
    dump_file = bench.base / "baseline" / ARTIFACT_NAME
    download_dump(bench, manifest, dump_file)
    spec = bench.datastore(database.name)
    work_dir = bench.base / "restore-work"
    work_dir.mkdir()
    results: list[tuple[float, RestoreTestResult]] = []

    def our_restore_test() -> float:
        bench.checkpoint()
        seconds, result = timed(lambda: run_restore_test(spec, driver, catalog, work_dir))
        if not result.verified:
            raise RuntimeError(f"the restore test did not verify: {result.problems}")
        results.append((seconds, result))
        return seconds

    ours, baseline = alternate(our_restore_test, lambda: plain_pg_restore(bench, dump_file), runs)
    our_best, base_best = min(ours), min(baseline)
    ratio = our_best / base_best
    print(
        f"restore test, {database.label}: ops_platform run_restore_test {our_best:6.2f} s   "
        f"pg_restore --no-owner -d <fresh db> <file> {base_best:6.2f} s   ratio {ratio:.2f}x   "
        f"goal <= {RESTORE_GOAL}x  {verdict(ratio <= RESTORE_GOAL)}"
    )
    print(
        f"    best of {runs} alternating runs; seconds per run: ops_platform [{spread(ours)}]  pg_restore [{spread(baseline)}]; "
        f"medians {statistics.median(ours):.2f} s vs {statistics.median(baseline):.2f} s = ratio "
        f"{statistics.median(ours) / statistics.median(baseline):.2f}x"
    )
    seconds, result = min(results, key=lambda pair: pair[0])
    checks = seconds - result.total_seconds
    print(
        f"    breakdown of the best run ({seconds:.2f} s): checks before restoring (sha256 read-back, pg_restore --list, full decode) "
        f"{checks:.2f} s; restore + counts + verify_sql {result.restore_seconds:.2f} s (the RTO figure); "
        f"drop scratch database {result.total_seconds - result.restore_seconds:.2f} s"
    )
    print(
        f"    restore_seconds alone (what rto_within_objective checks) {result.restore_seconds:.2f} s = "
        f"{result.restore_seconds / base_best:.2f}x pg_restore; the ratio above is the whole run_restore_test call"
    )
    return Row(
        "restore test time", f"{our_best:.2f} s", f"{base_best:.2f} s", ratio, f"<= {RESTORE_GOAL}x",
        ratio <= RESTORE_GOAL,
    )


def write_cli_spec(bench: Bench, database: BenchDatabase) -> Path:
    """The platform spec with this run's server as its only datastore (as infra/sandbox.yaml does)."""
    path = bench.base / "cli" / "platform.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"extends": str(REPO_ROOT / "infra" / "platform.yaml"), "datastores": [bench.datastore_fields(database.name)]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def measure_cli_restore(bench: Bench, database: BenchDatabase, runs: int) -> Row:
    cli = DagsterCli(
        bench.base / "cli",
        write_cli_spec(bench, database),
        {
            "OPS_BACKUP_BUCKET": BUCKET,
            PASSWORD_ENV: bench.server.password,
            **{name: value for name, value in os.environ.items() if name.startswith("AWS_")},
        },
    )
    backup_run = cli.materialize(f"backups/{DATASTORE}")
    catalog = BackupCatalog(bench.store, DATASTORE)
    manifest = catalog.latest_verified()
    assert manifest is not None and manifest.started_at.timestamp() >= backup_run.started_at, \
        "the CLI's backup is the newest verified one"
    dump_file = bench.base / "cli-baseline" / ARTIFACT_NAME
    download_dump(bench, manifest, dump_file)
    select = f"restore_tests/{DATASTORE}"
    cli_runs: list[CliRun] = []

    def cli_restore_test() -> float:
        bench.checkpoint()
        run = cli.materialize(select)
        cli_runs.append(run)
        return run.seconds

    ours, baseline = alternate(cli_restore_test, lambda: plain_pg_restore(bench, dump_file), runs)
    our_best, base_best = min(ours), min(baseline)
    ratio = our_best / base_best
    print(
        f"restore test from the CLI, {database.label}: dagster asset materialize --select {select} "
        f"{our_best:6.2f} s   pg_restore --no-owner -d <fresh db> <file> {base_best:6.2f} s   ratio {ratio:.2f}x   "
        f"goal <= {CLI_RESTORE_GOAL}x  {verdict(ratio <= CLI_RESTORE_GOAL)}"
    )
    print(
        f"    best of {runs} alternating runs; seconds per run: CLI [{spread(ours)}]  pg_restore [{spread(baseline)}]; "
        f"medians {statistics.median(ours):.2f} s vs {statistics.median(baseline):.2f} s = ratio "
        f"{statistics.median(ours) / statistics.median(baseline):.2f}x"
    )
    backup_phases, *restore_phases = phases(cli, [backup_run, *cli_runs])
    best = min(range(len(cli_runs)), key=lambda index: cli_runs[index].seconds)
    where = restore_phases[best]
    print(f"    where the best CLI run's {cli_runs[best].seconds:.2f} s went: {where.describe()}; checks passed "
          f"{where.checks_passed}/{where.checks}")
    print(
        "    inside the step, the restore test's own clock (restore + counts + verify_sql / with the drop) per run: "
        + ", ".join(f"{p.metadata.get('restore_seconds', 0.0):.2f} / {p.metadata.get('total_seconds', 0.0):.2f} s"
                    for p in restore_phases)
    )
    print(
        f"    the backup it restored (backup {manifest.backup_id}), taken first with "
        f"`dagster asset materialize --select backups/{DATASTORE}` (backup, verification, marker, retention; "
        f"the first run also creates the instance's SQLite storage): {backup_run.seconds:.2f} s; "
        f"{backup_phases.describe()}"
    )
    return Row(
        "restore test from the CLI", f"{our_best:.2f} s", f"{base_best:.2f} s", ratio, f"<= {CLI_RESTORE_GOAL}x",
        ratio <= CLI_RESTORE_GOAL,
    )


def print_summary(rows: list[Row]) -> None:
    headers = ("measurement", "ops_platform", "baseline", "ratio", "goal", "result")
    table = [headers, *((r.measurement, r.ours, r.baseline, f"{r.ratio:.2f}x", r.goal, verdict(r.ok)) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    print()
    print("summary")
    for index, line in enumerate(table):
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  " + "  ".join("-" * width for width in widths))


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == RSS_PROBE:
        rss_probe(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~100 MiB database (and ~10 MiB small one): a fast check")
    parser.add_argument("--size-mb", type=float, help="size of the large database in MiB (default 1024, --quick 100)")
    parser.add_argument("--scale", type=int, help="pgbench scale of the large database (overrides --size-mb)")
    parser.add_argument("--small-size-mb", type=float, help="size of the small RSS database in MiB (default large / 10)")
    parser.add_argument("--runs", type=int, default=5, help="alternating backup runs of each side (best)")
    parser.add_argument("--restore-runs", type=int, help="alternating restore runs of each side (best; default 3, --quick 2)")
    args = parser.parse_args()
    size_mib = args.size_mb or (100 if args.quick else 1024)
    large_scale = args.scale or pgbench_scale(size_mib)
    small_scale = pgbench_scale(args.small_size_mb or size_mib / 10)
    restore_runs = args.restore_runs or (2 if args.quick else 3)
    # Also when started from a script that left SIGINT ignored, as shells do for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)

    started = time.perf_counter()
    with bench_servers() as bench:
        print(
            f"PostgreSQL {bench.server.port} and moto S3 {os.environ['AWS_ENDPOINT_URL']} on loopback, "
            f"{os.cpu_count()} cores, autovacuum off; pgbench scales {large_scale} and {small_scale}"
        )
        seconds, large = timed(lambda: bench.create_pgbench_database("bench_large", large_scale))
        print(f"created {large.label} in {seconds:.1f} s")
        seconds, small = timed(lambda: bench.create_pgbench_database("bench_small", small_scale))
        print(f"created {small.label} in {seconds:.1f} s")
        print()
        rows: list[Row] = []
        throughput, _ = measure_throughput(bench, large, args.runs)
        rows.append(throughput)
        print()
        rows.extend(measure_rss(bench, small, large))
        print()
        rows.append(measure_restore(bench, large, restore_runs))
        print()
        rows.append(measure_cli_restore(bench, large, restore_runs))
        print_summary(rows)
    print(f"\nwhole run {time.perf_counter() - started:.0f} s, servers stopped and {bench.base} removed")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and scratch directories removed", file=sys.stderr)
        sys.exit(130)
