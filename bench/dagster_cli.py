"""`dagster asset materialize` as an operator runs it, and where its wall time went.

:class:`DagsterCli` runs the venv's ``dagster`` CLI in a subprocess against
``ops_platform.definitions``, with its own ``DAGSTER_HOME`` (SQLite storage)
and a spec file written by the benchmark. The inherited environment loses
every ``OPS_*``, ``DAGSTER_*``, ``PG*`` and ``KUBECONFIG`` variable, so only
what the benchmark sets reaches the code location.

:func:`phases` reads a run's event log back (after the timed runs: importing
dagster in the benchmark process would perturb the in-process baselines) and
splits the wall time into: start-up until the run starts (CLI import,
definitions load, instance), the step process's own start-up (the
multiprocess executor loads the definitions again), the step itself, the
end of the run after the step, and the exit after the run succeeded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DAGSTER = Path(sys.executable).parent / "dagster"
DEFINITIONS_MODULE = "ops_platform.definitions"
DROPPED_PREFIXES = ("OPS_", "DAGSTER_", "PG")
DROPPED = ("KUBECONFIG",)


@dataclass(frozen=True)
class CliRun:
    select: str
    seconds: float
    started_at: float  # time.time() just before the process started
    finished_at: float  # time.time() once it exited


@dataclass(frozen=True)
class Phases:
    startup: float  # process start -> RUN_START
    step_startup: float  # RUN_START -> STEP_START
    step: float  # STEP_START -> STEP_SUCCESS
    run_end: float  # STEP_SUCCESS -> RUN_SUCCESS
    exit: float  # RUN_SUCCESS -> process exit
    checks_passed: int  # asset check evaluations of the run that passed
    checks: int
    metadata: dict[str, object] = field(default_factory=dict)  # of the run's materialization, plain values

    def describe(self) -> str:
        return (
            f"start-up to RUN_START {self.startup:.2f} s (CLI, definitions, instance); "
            f"step process start-up {self.step_startup:.2f} s (loads the definitions again); "
            f"step {self.step:.2f} s; step end to RUN_SUCCESS {self.run_end:.2f} s; "
            f"RUN_SUCCESS to exit {self.exit:.2f} s"
        )


class DagsterCli:
    def __init__(self, base: Path, spec_file: Path, settings: dict[str, str]) -> None:
        self.home = base / "dagster_home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").touch()
        tmp = base / "dagster-tmp"
        tmp.mkdir(exist_ok=True)
        inherited = {
            name: value for name, value in os.environ.items()
            if not name.startswith(DROPPED_PREFIXES) and name not in DROPPED
        }
        self.env = {
            **inherited,
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_DISABLE_TELEMETRY": "1",
            "OPS_ENV": "local",
            "OPS_PLATFORM_SPEC": str(spec_file),
            "TMPDIR": str(tmp),
            **settings,
        }

    def command(self, select: str) -> list[str]:
        return [str(DAGSTER), "asset", "materialize", "-m", DEFINITIONS_MODULE, "--select", select]

    def materialize(self, select: str, command: list[str] | None = None) -> CliRun:
        """One materialization; raises with the CLI's last output when it fails."""
        started_at = time.time()
        started = time.perf_counter()
        result = subprocess.run(
            command or self.command(select), cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True,
        )
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(
                f"`dagster asset materialize --select {select}` exited {result.returncode}:\n"
                f"{result.stderr[-4000:]}"
            )
        return CliRun(select, seconds, started_at, time.time())


TRIVIAL_DEFINITIONS = REPO_ROOT / "bench" / "trivial_definitions.py"


def floor(cli: DagsterCli) -> CliRun:
    """The same CLI, instance and environment materializing the one asset of bench/trivial_definitions.py:
    what any `dagster asset materialize` costs on this machine, whatever the code location does."""
    return cli.materialize("one_asset", [str(DAGSTER), "asset", "materialize", "-f", str(TRIVIAL_DEFINITIONS),
                                         "--select", "one_asset"])


def materialization_metadata(cli: DagsterCli, key: str) -> dict[str, object]:
    """The plain values of the latest materialization of ``key`` (``a/b``) in ``cli``'s instance."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(cli.home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(key.split("/")))
        if event is None or event.asset_materialization is None:
            return {}
        return plain(event.asset_materialization.metadata)


def plain(metadata: dict[str, object]) -> dict[str, object]:
    return {name: getattr(value, "value", value) for name, value in metadata.items()}


def phases(cli: DagsterCli, runs: list[CliRun]) -> list[Phases]:
    """The phases of ``runs`` (in order), from the event log of ``cli``'s instance."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(cli.home)) as instance:
        records = sorted(instance.get_run_records(), key=lambda record: record.create_timestamp.timestamp())
        found: list[Phases] = []
        for run in runs:
            record = next(
                r for r in records if run.started_at <= r.create_timestamp.timestamp() <= run.finished_at
            )
            times: dict[str, float] = {}
            evaluations = []
            metadata: dict[str, object] = {}
            for entry in instance.all_logs(record.dagster_run.run_id):
                event = entry.dagster_event
                if event is None:
                    continue
                times.setdefault(event.event_type_value, entry.timestamp)
                if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                    evaluations.append(event.event_specific_data.passed)
                if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                    metadata = plain(event.step_materialization_data.materialization.metadata)
            found.append(Phases(
                startup=times["PIPELINE_START"] - run.started_at,
                step_startup=times["STEP_START"] - times["PIPELINE_START"],
                step=times["STEP_SUCCESS"] - times["STEP_START"],
                run_end=times["PIPELINE_SUCCESS"] - times["STEP_SUCCESS"],
                exit=run.finished_at - times["PIPELINE_SUCCESS"],
                checks_passed=sum(evaluations),
                checks=len(evaluations),
                metadata=metadata,
            ))
        return found
