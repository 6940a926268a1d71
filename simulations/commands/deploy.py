"""Commands for a real deployment: `certs`, `coordinator {start,register,unregister,run,stop,status}`,
`merchant {start,stop,status}`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

coordinator_app = typer.Typer(help="Run the coordinator: a TLS SuperLink with authenticated SuperNodes.",
                              no_args_is_help=True)
merchant_app = typer.Typer(help="Run one merchant's SuperNode over its own shop data.", no_args_is_help=True)


FOREGROUND_HELP = ("Stay in the foreground while the Flower process runs (systemd Type=simple, a container's main "
                   "process): SIGTERM/SIGINT stop it; exit 1 if it dies on its own, so a supervisor restarts it.")


def stay_in_foreground(pid: int, what: str, stop: Callable[[], object], poll: float = 1.0) -> None:
    """Block while ``pid`` runs; on SIGTERM/SIGINT call ``stop`` and return; if it exits by itself, exit 1.

    The Flower process runs in its own session (so `stop` can end its whole group); this keeps a
    supervisor's main process alive beside it and turns the supervisor's stop signal into `stop`.
    """
    import signal
    import time

    from simulations.deploy.processes import pid_alive

    asked: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: asked.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pid_alive(pid) and not asked:
            time.sleep(poll)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if asked:
        stop()
        typer.echo(f"{what} stopped ({signal.Signals(asked[0]).name})")
        return
    typer.secho(f"Error: the {what} (PID {pid}) exited on its own; see its log", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def certs(
    out: Path = typer.Option(..., "--out", help="Folder for ca.crt, server.pem/.key and merchants/<name>.key/.pub."),
    merchants: str = typer.Option("3", "--merchants", help="A count (merchant-1..N) or names: shop-a,shop-b."),
    host: list[str] = typer.Option(["localhost"], "--host", help="DNS name(s) in the server certificate."),
    ip: list[str] = typer.Option(["127.0.0.1"], "--ip", help="IP address(es) in the server certificate."),
    merchant_keys_only: bool = typer.Option(False, "--merchant-keys-only",
                                            help="Only (re)create merchant key pairs: new merchants, key rotation."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Create the CA, the coordinator's TLS certificate and one SuperNode key pair per merchant."""
    from simulations.deploy.certs import CertsExistError, parse_merchants, write_certs, write_merchant_keys

    try:
        names = parse_merchants(merchants)
        if merchant_keys_only:
            paths = write_merchant_keys(out, names, force=force)
        else:
            paths = write_certs(out, names, hosts=host, ips=ip, force=force)
    except (CertsExistError, ValueError) as err:
        raise _fail(err) from None
    if not merchant_keys_only:
        typer.echo(f"CA certificate      {paths.ca_cert}   (give to every merchant)")
        typer.echo(f"trusted entities    {paths.trusted_entities}   (give to every merchant: the app-signing key)")
        typer.echo(f"app-signing key     {paths.app_key}   (coordinator only: signs every run's app)")
        typer.echo(f"CA key              {paths.ca_key}   (keep offline)")
        typer.echo(f"server certificate  {paths.server_cert} + {paths.server_key.name}  (coordinator only)")
    for name, (private, public) in paths.merchant_keys.items():
        typer.echo(f"merchant {name:<12} {private} (merchant only)  {public.name} (register on coordinator)")


@coordinator_app.command("start")
def coordinator_start(
    home: Path = typer.Option(..., "--home", help="Coordinator folder (PID, log, state, FLWR_HOME)."),
    certs_dir: Path = typer.Option(None, "--certs", help="Folder from `fedshop certs` (default HOME/certs)."),
    port_base: int = typer.Option(0, "--port-base", min=0, max=65535,
                                  help="SuperLink port (Fleet, Control and Runtime APIs share "
                                  "it in flwr 1.42); 0 picks a free port."),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Interface to listen on; 0.0.0.0 for other hosts."),
    public_host: str = typer.Option(None, "--public-host", help="Name merchants dial (must be in the cert)."),
    foreground: bool = typer.Option(False, "--foreground", help=FOREGROUND_HELP),
    state_db: bool = typer.Option(False, "--state-db", help="Keep the SuperLink's state in HOME/superlink.db "
                                  "(SQLite: node IDs and run history survive a restart; ~2x the SuperLink's CPU per "
                                  "request). Default: in memory, merchants re-registered at every start."),
) -> None:
    """Start `flower-superlink` with TLS and --enable-supernode-auth, record its PID, wait until ready.

    Merchants registered before (merchants.json) are registered again when the SuperLink does not know them.
    """
    from simulations.deploy.coordinator import STATE_MEMORY, start_coordinator
    from simulations.deploy.processes import ProcessStartError

    try:
        info = start_coordinator(home, certs_dir or home / "certs", port=port_base or None, host=bind,
                                 public_host=public_host, state_db=state_db, warn=typer.echo)
    except (FileNotFoundError, ValueError, RuntimeError, ProcessStartError) as err:
        raise _fail(err) from None
    state = "in memory" if info.state == STATE_MEMORY else f"in {info.state}"
    typer.echo(f"SuperLink ready on {info.address} (TLS, SuperNode auth; Control API for this host only at "
               f"{info.control_address}; state {state}); log {home / 'superlink.log'}")
    trusted = Path(info.app_key).with_name("trusted-entities.yaml")
    typer.echo(f"Merchants connect with --superlink {info.address} --ca {info.ca_cert} --trusted-entities {trusted}")
    if foreground:
        from simulations.deploy.coordinator import stop_coordinator
        from simulations.deploy.processes import read_record

        stay_in_foreground(read_record(home / "superlink.json").pid, "SuperLink", lambda: stop_coordinator(home))


@coordinator_app.command("register")
def coordinator_register(
    public_key: Path = typer.Argument(..., help="A merchant's .pub from `fedshop certs`."),
    home: Path = typer.Option(..., "--home"),
    name: str = typer.Option(None, "--name", help="Label for the SuperNode."),
    shop_index: int = typer.Option(None, "--shop-index", min=0, help="Bind this key to the merchant's --shop-index: "
                                   "replies from it that claim another shop are dropped and reported."),
) -> None:
    """Allow a merchant's SuperNode key (`flwr supernode register`), bound to its shop-index."""
    from simulations.deploy.coordinator import register_merchant

    try:
        node_id = register_merchant(home, public_key, name=name, shop_index=shop_index)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise _fail(err) from None
    typer.echo(f"registered {public_key.name} as SuperNode {node_id}")


@coordinator_app.command("unregister")
def coordinator_unregister(node_id: int = typer.Argument(...), home: Path = typer.Option(..., "--home")) -> None:
    """Revoke a merchant's SuperNode (e.g. a rotated or leaked key)."""
    from simulations.deploy.coordinator import unregister_merchant

    try:
        current = unregister_merchant(home, node_id)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise _fail(err) from None
    again = f" (registered again as {current} after a coordinator restart)" if current != node_id else ""
    typer.echo(f"unregistered SuperNode {current}{again}")


@coordinator_app.command("run")
def coordinator_run(
    scenario: str = typer.Argument(None, help="Built-in scenario name or TOML path; every merchant must resolve it "
                                   "too (a built-in name, or the same path on each merchant host). Not with --resume."),
    home: Path = typer.Option(..., "--home"),
    rounds: int = typer.Option(0, "--rounds", min=0, help="num-server-rounds (0: the scenario's federation.rounds)."),
    config: list[str] = typer.Option([], "--config", "-c", help="Extra run config KEY=VALUE (repeatable), e.g. "
                                     "-c round-timeout=120.0"),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where the run directory is created."),
    app_dir: Path = typer.Option(None, "--app", help="Flower app folder (default: this fedshop checkout)."),
    resume: Path = typer.Option(None, "--resume", help="Continue this run directory (e.g. a failed run) from its "
                                "last checkpoint, with the config it was submitted with; --rounds sets a new total."),
) -> None:
    """Submit a run with `flwr run --stream`, stream progress, exit non-zero unless it completed.

    The run directory gets what a simulation writes: config.toml, versions.json, scenario.toml,
    then metrics.csv and checkpoints/ from the ServerApp.
    """
    from shared.scenario import ScenarioError, load_scenario
    from simulations.deploy.coordinator import REPO_ROOT, deployment_run_config, submit_run
    from simulations.options import parse_overrides
    from simulations.rundir import new_run_dir

    if (resume is None) == (scenario is None):
        raise _fail(ValueError("give either a SCENARIO for a new run or --resume RUN_DIR to continue one"))
    if resume is not None:
        from simulations.deploy.coordinator import resume_run_config

        run_dir = resume.resolve()
        try:
            run_config = resume_run_config(run_dir, rounds=rounds or None, extra=parse_overrides(config))
        except (FileNotFoundError, ValueError, typer.BadParameter) as err:
            raise _fail(err) from None
        _check_merchants(home, run_config)
        _resume(home, run_config, run_dir, app_dir or REPO_ROOT)
        return
    if Path(scenario).suffix == ".toml" or Path(scenario).exists():
        scenario = str(Path(scenario).resolve())
    try:
        # Settings only: the coordinator holds no shop data, so the scenario's shops are not loaded here.
        loaded = load_scenario(scenario)
        extra = parse_overrides(config)
        run_dir = new_run_dir(runs_dir, loaded.name).resolve()
        run_config = deployment_run_config(loaded, scenario, run_dir, rounds=rounds or None, extra=extra)
    except (ScenarioError, ValueError, typer.BadParameter) as err:
        raise _fail(err) from None
    try:
        _check_merchants(home, run_config)
    except typer.Exit:
        shutil.rmtree(run_dir, ignore_errors=True)  # made a moment ago by new_run_dir: nothing ran in it
        raise
    try:
        outcome = submit_run(home, run_config, app=app_dir or REPO_ROOT, run_dir=str(run_dir))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise _fail(err) from None
    colour = typer.colors.GREEN if outcome.ok else typer.colors.RED
    typer.secho(f"run {outcome.run_id}: {outcome.status}; run dir {run_dir}", fg=colour)
    if not outcome.ok:
        _say_why_failed(run_dir)
        raise typer.Exit(code=1)


def _check_merchants(home: Path, run_config: dict) -> None:
    """Refuse (one line, exit 1) a run that more merchants must join than are registered; warn if unknowable."""
    from simulations.deploy.coordinator import check_registered_merchants

    try:
        check_registered_merchants(home, run_config,
                                   warn=lambda line: typer.secho(line, fg=typer.colors.YELLOW, err=True))
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from None


def _say_why_failed(run_dir: Path) -> None:
    """The ServerApp's reason for a failed run (`failed.txt`: which rounds, which shops, the fix), if any."""
    from server.server_app import failure_reason

    reason = failure_reason(run_dir)
    if reason:
        typer.secho(f"run failed: {reason}", fg=typer.colors.RED, err=True)


def _resume(home: Path, run_config: dict, run_dir: Path, app_dir: Path) -> None:
    """Submit the resumed run, report its final status, exit 1 unless it completed."""
    from simulations.deploy.coordinator import submit_run

    try:
        outcome = submit_run(home, run_config, app=app_dir, run_dir=str(run_dir))
    except (FileNotFoundError, RuntimeError) as err:
        raise _fail(err) from None
    colour = typer.colors.GREEN if outcome.ok else typer.colors.RED
    typer.secho(f"run {outcome.run_id} (resumed): {outcome.status}; run dir {run_dir}", fg=colour)
    if not outcome.ok:
        _say_why_failed(run_dir)
        raise typer.Exit(code=1)


@coordinator_app.command("stop")
def coordinator_stop(home: Path = typer.Option(..., "--home")) -> None:
    """Stop the SuperLink by its recorded PID."""
    from simulations.deploy.coordinator import stop_coordinator

    try:
        stopped = stop_coordinator(home)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from None
    typer.echo("SuperLink stopped" if stopped else "SuperLink was not running")


@merchant_app.command("start")
def merchant_start(
    shop_dir: Path = typer.Option(..., "--shop-dir", help="The merchant's data (validated before anything starts)."),
    state_dir: Path = typer.Option(..., "--state-dir", help="Where the shop's local part persists across runs."),
    superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the coordinator's SuperLink."),
    ca: Path = typer.Option(..., "--ca", help="The coordinator's CA certificate (ca.crt)."),
    key: Path = typer.Option(..., "--key", help="This merchant's SuperNode private key (.key)."),
    trusted_entities: Path = typer.Option(..., "--trusted-entities", help="The coordinator's trusted-entities.yaml: "
                                          "this SuperNode runs only apps signed by a key in it."),
    port: int = typer.Option(0, "--port", min=0, max=65535,
                             help="Local Runtime API port, distinct per SuperNode on a host; 0 = free."),
    shop_index: int = typer.Option(None, "--shop-index", min=0, help="This merchant's number (0, 1, ...): metrics.csv "
                                   "labels its rows shop-<index>; without it they say node-<SuperNode ID>."),
    retry_for: float = typer.Option(0.0, "--retry-for", min=0.0, help="Seconds to keep retrying a refused activation "
                                    "(after a crash the SuperLink holds the node for two heartbeat intervals)."),
    heartbeat_interval: float = typer.Option(30.0, "--heartbeat-interval", min=10.0, max=1800.0,
                                             help="Seconds between this SuperNode's heartbeats (Flower: 30). "
                                             "The SuperLink notices a crash after two; 10 = back in 20 s."),
    foreground: bool = typer.Option(False, "--foreground", help=FOREGROUND_HELP),
    cap: list[str] = typer.Option([], "--cap", help="KEY=N: the most work this shop accepts per round, e.g. "
                                  "--cap cap-local-epochs=100, or the longest test sleep: --cap cap-fault-sleep=5 "
                                  "(keys and defaults: docs/deployment.md, 'Node config')."),
    allow_test_faults: bool = typer.Option(False, "--allow-test-faults", help="Obey the coordinator's test-only "
                                           "fault-inject/fault-sleep (test federations only; sleeps up to "
                                           "cap-fault-sleep, default 60 s)."),
    allow_scenario_path: Path = typer.Option(None, "--allow-scenario-path", help="The one scenario file, besides "
                                             "the built-in names, that the coordinator may have this shop load "
                                             "(its run config must name exactly this absolute path)."),
    isolation: str = typer.Option("process", "--isolation",
                                  help="process: one long-lived ClientApp process serves every message (imports "
                                  "once); subprocess: Flower's default, a fresh process per message."),
) -> None:
    """Validate the shop, check the coordinator answers, then start `flower-supernode` (TLS, key, signed apps)."""
    from simulations.commands.validate import shop_report
    from simulations.deploy.merchant import start_merchant  # CoordinatorUnreachable is a RuntimeError
    from simulations.deploy.processes import ProcessStartError

    policy: dict[str, int | bool | str] = {"allow-test-faults": True} if allow_test_faults else {}
    if allow_scenario_path is not None:  # checked now, by the merchant: a run naming it then loads it as it is
        from shared.scenario import ScenarioError, load_scenario

        try:
            load_scenario(str(allow_scenario_path.resolve()))
        except (ScenarioError, OSError) as err:
            raise _fail(ValueError(f"--allow-scenario-path {allow_scenario_path}: {err}")) from None
        policy["allow-scenario-path"] = str(allow_scenario_path.resolve())
    for item in cap:
        key, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise _fail(ValueError(f"--cap {item}: not KEY=N. Fix: e.g. --cap cap-local-epochs=100"))
        policy[key.strip()] = int(value)
    report = shop_report(shop_dir)
    if not report["ok"]:
        typer.secho(f"Shop data rejected, nothing started: {report['error']['message']}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(code=2)
    _echo_validation(report)
    try:
        merchant = start_merchant(shop_dir, state_dir, superlink, ca=ca, key=key, trusted_entities=trusted_entities,
                                  port=port or None, validate=False, shop_name=report["name"],
                                  shop_index=shop_index, retry_for=retry_for, policy=policy,
                                  heartbeat_interval=heartbeat_interval, isolation=isolation)
    except (FileNotFoundError, ValueError, RuntimeError, ProcessStartError) as err:
        raise _fail(err) from None
    typer.echo(f"SuperNode {merchant.node_id} connected (PID {merchant.pid}); log {merchant.log}")
    if merchant.clientapp_pid is not None:
        typer.echo(f"long-lived ClientApp PID {merchant.clientapp_pid} (same log)")
    typer.echo(f"Check it any time with `fedshop merchant status --state-dir {state_dir}`")
    if foreground:
        from simulations.deploy.merchant import stop_merchant

        stay_in_foreground(merchant.pid, "SuperNode", lambda: stop_merchant(state_dir))


def _echo_validation(report: dict[str, Any]) -> None:
    """The shop's validation result in a few lines (what `fedshop validate` shows for it)."""
    splits = ", ".join(f"{name} {n:,}" for name, n in report["splits"].items())
    typer.echo(f"Shop {report['name']} validated: {report['rows']:,} rows, {report['users']:,} users, "
               f"{report['items']:,} items; tasks {', '.join(report['tasks']) or '-'}; rows per split: {splits}")
    for warning in report["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW)


@merchant_app.command("stop")
def merchant_stop(state_dir: Path = typer.Option(..., "--state-dir")) -> None:
    """Stop this merchant's SuperNode by its recorded PID (the local part stays in the state dir)."""
    from simulations.deploy.merchant import stop_merchant

    try:
        stopped = stop_merchant(state_dir)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from None
    typer.echo("SuperNode stopped" if stopped else "SuperNode was not running")


@merchant_app.command("status")
def merchant_status(
    state_dir: Path = typer.Option(..., "--state-dir", help="The --state-dir given to `merchant start`."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """This merchant: shop, key fingerprint, coordinator, whether its SuperNode runs, its last trained round."""
    from simulations.deploy.status import merchant_status as read_status

    try:
        status = read_status(state_dir)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from None
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    node, local = status["supernode"], status["local-part"]
    index = "" if status["shop-index"] is None else f", shop-index {status['shop-index']}"
    typer.echo(f"merchant     {status['shop'] or '(unknown: never started)'}{index}  (shop dir "
               f"{status['shop-dir'] or '-'})")
    typer.echo(f"key          {status['key-fingerprint'] or '-'}  {status['key'] or ''}")
    if status["coordinator"]:
        reach = {True: "answers", False: "does not answer", None: "not probed"}[status.get("coordinator-reachable")]
        typer.echo(f"coordinator  {status['coordinator']} ({reach})")
    else:
        typer.echo("coordinator  - (never started here)")
    if node["running"]:
        typer.secho(f"SuperNode    running, PID {node['pid']}, node {status['node-id']}, since {status['started-at']}",
                    fg=typer.colors.GREEN)
    else:
        typer.secho("SuperNode    not running" + (f" (stale PID record {node['pid']})" if node["pid"] else ""),
                    fg=typer.colors.YELLOW)
    if local is None:
        typer.echo("local part   none yet (no training round finished here)")
    elif "error" in local:
        typer.secho(f"local part   {local['file']}: {local['error']}", fg=typer.colors.YELLOW)
    else:
        typer.echo(f"local part   round {local['round']} of run {local['run'] or '-'}, rounds_trained "
                   f"{local['rounds_trained']}, saved {local['saved-at']}")
    typer.echo(f"log          {status['log']}")
    if status.get("coordinator-problem"):
        typer.secho(status["coordinator-problem"], fg=typer.colors.YELLOW)


@coordinator_app.command("status")
def coordinator_status(
    home: Path = typer.Option(..., "--home"),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Registered merchants (name, shop-index, key), which are online, and the runs (`flwr supernode ls`, `flwr ls`)."""
    from simulations.deploy.status import coordinator_status as read_status

    try:
        status = read_status(home)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise _fail(err) from None
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    if not console.is_terminal:  # a pipe or the journal: full node IDs and fingerprints, no 80-column cut
        console = Console(soft_wrap=True, width=200)
    link = status["superlink"]
    if link["running"]:
        console.print(f"SuperLink [green]running[/] (PID {link['pid']}) at {escape(status['address'])}; "
                      f"log {escape(status['log'])}", highlight=False)
    else:
        console.print(f"SuperLink [yellow]not running[/] (address was {escape(status['address'])}); nodes and runs "
                      f"unknown. Fix: `fedshop coordinator start --home {escape(status['home'])}`", highlight=False)
    merchants = Table(title=f"Registered merchants ({len(status['merchants'])})")
    for header in ("node", "name", "shop-index", "state", "online since", "key"):
        merchants.add_column(header, overflow="fold")  # an ID cut short is useless: fold, never "…"
    for entry in status["merchants"]:
        merchants.add_row(entry["node-id"], escape(entry["name"] or "-"),
                          "-" if entry["shop-index"] is None else str(entry["shop-index"]), escape(entry["state"]),
                          entry["online-at"] or "-", entry["key-fingerprint"] or "-")
    console.print(merchants)
    if status["runs"] is not None:
        runs = Table(title=f"Runs ({len(status['runs'])})")
        for header in ("run", "status", "submitted", "finished", "elapsed"):
            runs.add_column(header)
        for run in status["runs"]:
            runs.add_row(str(run["run-id"]), escape(str(run["status"])), str(run["pending-at"] or "-"),
                         str(run["finished-at"] or "-"), str(run["elapsed"] or "-"))
        console.print(runs)
    console.print("Flower's own view: FLWR_HOME=" + escape(str(Path(status["home"]) / "flwr")) +
                  " flwr ls fedshop (runs), flwr log RUN_ID fedshop (a run's log)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `certs`, `coordinator` and `merchant` to the root app."""
    app.command("certs")(certs)
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(merchant_app, name="merchant")
