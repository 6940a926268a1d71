"""`fedshop simulate`: a federated run of a scenario (pool or Ray engine), with live progress and a verdict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from shared.settings import ENGINES
from simulations.compare import small_shops_of
from simulations.console import print_verdict, step_progress
from simulations.exits import failures_as_messages
from simulations.federated import METHODS, SCENARIO_FILE, resolve_engine, run_federated
from simulations.options import parse_overrides, scenario_or_exit
from simulations.ray_auth import require_ray_token
from simulations.run_report import run_verdict, write_run_report
from simulations.rundir import new_run_dir

if TYPE_CHECKING:  # importing Flower costs a second at every `fedshop` start
    from server.strategies import RoundReport

console = Console()
HEADLINE = ("ctr.auc", "cvr.auc", "ranking.ndcg@10", "sales.wape")  # shown live, when the shops have them


def _headline(report: RoundReport) -> str:
    """Mean over shops of a few validation metrics, e.g. 'val ctr.auc 0.712  ranking.ndcg@10 0.301'.

    Shops report 'val/<task>.<metric>' when a round evaluates several splits, '<task>.<metric>' otherwise.
    """
    parts = []
    for key in HEADLINE:
        values = [m.get(f"val/{key}", m.get(key)) for m in report.evaluate.values()]
        values = [v for v in values if v is not None and v == v]
        if values:
            parts.append(f"{key} {sum(values) / len(values):.3f}")
    return ("val " + "  ".join(parts)) if parts else ""


REPO = Path(__file__).resolve().parents[2]


def flwr_env() -> dict[str, str]:
    """Environment `flwr run` needs here: project-local FLWR_HOME, no runtime installs, no telemetry."""
    env = dict(os.environ)
    env.setdefault("FLWR_HOME", str(REPO / ".flwr"))
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # else uv installs a CUDA torch
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superlink
    require_ray_token(env)  # inherited by the SuperLink `flwr run` spawns, its flwr-simulation and Ray
    return env


def local_superlink_pids(flwr_home: str) -> list[int]:
    """PIDs of the SuperLink `flwr run` spawned for this FLWR_HOME (its --database lies under it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any(a.endswith("flower-superlink") for a in text) and any(a.startswith(flwr_home) for a in text):
            pids.append(int(proc.name))
    return pids


def _flwr_json(args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, env=env, cwd=REPO,
                         check=False)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": (out.stdout + out.stderr).strip()}


def register(app: typer.Typer) -> None:
    """Add `simulate` and `flwr-run`."""

    @app.command("flwr-run")
    def flwr_run(
        run_config: str = typer.Option("", help='e.g. \'num-server-rounds=3 run-dir="/abs/runs/demo"\''),
        num_supernodes: int = typer.Option(8, min=1, help="must equal the scenario's number of training shops"),
        timeout: float = typer.Option(7200.0, min=1.0, help="seconds to wait for the run to finish"),
    ) -> None:
        """`flwr run .` on a local SuperLink, failing unless the run completes (flwr's own exit code does not)."""
        env = flwr_env()
        before = set(local_superlink_pids(env["FLWR_HOME"]))
        args = ["run", ".", "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1"]
        if run_config:
            args += ["--run-config", run_config]
        try:
            started = _flwr_json(args, env)
            if not started.get("success"):
                console.print(f"[red]flwr run failed:[/red] {started.get('error-message', started)}")
                raise typer.Exit(1)
            run_id, status, deadline = str(started["run-id"]), "", time.monotonic() + timeout
            console.print(f"run {run_id} submitted (FLWR_HOME={env['FLWR_HOME']})")
            while time.monotonic() < deadline and not status.startswith("finished"):
                time.sleep(5)
                runs = _flwr_json(["ls", "--run-id", run_id], env).get("runs") or [{}]
                status = str(runs[0].get("status", ""))
            console.print(f"run {run_id}: {status or 'no status'}")
            if status != "finished:completed":
                raise typer.Exit(1)
        finally:
            for pid in set(local_superlink_pids(env["FLWR_HOME"])) - before:  # only the one this call spawned
                os.kill(pid, signal.SIGTERM)

    @app.command("simulate")
    def simulate(
        scenario: str = typer.Argument("default", help="scenario name or path to a .toml (ignored with --resume)"),
        rounds: int | None = typer.Option(None, min=1, help="server rounds (default: federation.rounds)"),
        run_dir: Path | None = typer.Option(None, help="write here instead of runs/<scenario>-<method>-<time>"),
        runs: Path = typer.Option(Path("runs"), help="parent folder of new run directories"),
        resume: Path | None = typer.Option(None, help="continue this run directory from its last checkpoint"),
        seed: int | None = typer.Option(None, help="override the scenario's seed"),
        method: str = typer.Option("fedshop", help=f"one of {sorted(METHODS)}"),
        set_: list[str] = typer.Option([], "--set", help="override a scenario key, e.g. --set federation.rounds=3"),
        engine: str | None = typer.Option(None, help="auto (pool, or ray with --ray-address / RAY_ADDRESS), ray "
                                                     "(Flower's simulation engine) or pool (forked worker processes, "
                                                     "no network listener); default: federation.engine"),
        workers: int | None = typer.Option(None, min=1, help="pool engine: worker processes (default: one per CPU)"),
        ray_address: str | None = typer.Option(None, help="ray engine (auto picks it): join this Ray cluster "
                                                          "(host:port) instead of starting one; needs RAY_AUTH_TOKEN "
                                                          "and a shared disk"),
    ) -> None:
        """Federate the scenario's shops: the encoder is shared, each shop's local part stays home."""
        if method not in METHODS:
            raise typer.BadParameter(f"--method must be one of {sorted(METHODS)}")
        if engine is not None and engine not in ENGINES:
            raise typer.BadParameter(f"--engine must be one of {list(ENGINES)}")
        if resume is not None:
            saved = resume / SCENARIO_FILE
            if not saved.exists():
                console.print(f"[red]error:[/red] {saved} not found: --resume needs a run directory written by "
                              "`fedshop simulate`")
                raise typer.Exit(2)
            scen = scenario_or_exit(str(saved), load_shops=False)  # a bad saved scenario: its error, exit 2
            out = resume
        else:
            extra = parse_overrides(set_)
            if seed is not None:
                extra["seed"] = seed
            scen = scenario_or_exit(scenario, extra, federation=True, rounds=rounds)  # min_shops, join_round
            out = run_dir or new_run_dir(runs, f"{scen.name}-{method}")
        total = rounds or int(scen.federation["rounds"])
        n_shops = len(scen.training_shops())
        label = f"{scen.name} ({method}, {n_shops} shops)"
        with failures_as_messages(console):  # --ray-address with the pool: a message, exit 2
            chosen = resolve_engine(engine or scen.federation["engine"], ray_address)
        with step_progress(console, unit="round") as bar:
            starting = "starting Ray" if chosen == "ray" else "starting workers"
            first = f"round 1 running (includes {starting})" if resume is None else "resuming from the last checkpoint"
            bar.start(label, total, status=first)

            def progress(report: RoundReport, _total: int) -> None:
                left = f", left out {sorted(report.left_out)}" if report.left_out else ""
                status = f"shops done {len(report.train)}/{n_shops}{left}  {_headline(report)}"
                bar.update(label, report.server_round, total, status=status)

            with failures_as_messages(console, partial=out):  # RunFailed, RunStopped, bad settings: a message
                run_federated(scen, out, method=method, rounds=total, resume=resume is not None, progress=progress,
                              engine=engine, workers=workers, ray_address=ray_address,
                              checked=resume is None)  # scenario_or_exit checked it over these rounds
        write_run_report(out, small_shops=small_shops_of(scen))
        print_verdict(console, run_verdict(out))
