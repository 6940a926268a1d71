"""The coordinator host: a TLS SuperLink with SuperNode authentication, registration, runs, stop.

Everything lives under one home folder::

    <home>/coordinator.json   address, port, certificate paths (written by `start`)
    <home>/superlink.json     PID record; <home>/superlink.log its output
    <home>/superlink.db       SuperLink state, only with ``state_db=True`` (`start --state-db`)
    <home>/flwr/              FLWR_HOME: config.toml with the `fedshop` connection, installed FABs
    <home>/merchants.json     node ID -> name, shop-index, public key and fingerprint of each registered key

By default the SuperLink keeps its state in memory (Flower's ``:flwr-in-memory:``): half the SuperLink CPU
per request of its SQLite state. Registrations are then rebuilt on every `start` from merchants.json:
each recorded key is registered again (Flower gives it a new node ID) and merchants.json is rewritten
once with the new IDs (`restore_registrations`). Runs and their history do not survive a restart in
memory; run directories (checkpoints, metrics) do, so `run --resume` still works.

The SuperLink runs through `simulations.deploy.superlink_launcher`, which serves other hosts only its
Fleet API; the operator's `flwr` calls (runs, registrations) go over loopback. Every submitted FAB is
signed with the app-signing key from the certificates folder (`simulations.deploy.app_signing`).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from shared.atomic import atomic_write_text
from shared.scenario import Scenario
from simulations.deploy.app_signing import SIGNATURE_KEY, SIGNING_KEY_FILE, build_fab, load_signing_key, sign_fab
from simulations.deploy.certs import key_fingerprint
from simulations.deploy.flwr_config import CONNECTION, coordinator_env, flwr_bin, flwr_env, write_connection
from simulations.deploy.processes import (
    ProcessStartError,
    free_port,
    port_open,
    read_record,
    recorded_running,
    start_process,
    stop_recorded,
    wait_ready,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
STATE_MEMORY = ":flwr-in-memory:"  # Flower's in-memory LinkState (flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME)
STATE_DB_FILE = "superlink.db"
MERCHANTS_FILE = "merchants.json"


@dataclass
class Coordinator:
    """Where a started coordinator listens and which files it uses."""

    home: str
    host: str
    port: int
    address: str  # host:port that `flwr` and SuperNodes dial
    ca_cert: str
    server_cert: str
    server_key: str
    control_address: str = ""  # host:port the operator's `flwr` dials (loopback unless bound to one address)
    app_key: str = ""  # Ed25519 key every submitted FAB is signed with
    state: str = STATE_MEMORY  # where the SuperLink keeps registrations and runs: STATE_MEMORY or the .db path

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of every `flwr` call made for this coordinator."""
        return Path(self.home) / "flwr"

    def env(self) -> dict[str, str]:
        """Environment for `flwr` CLI calls against this coordinator."""
        return flwr_env(self.flwr_home)


@dataclass
class RunOutcome:
    """How a submitted run ended."""

    run_id: int
    status: str  # e.g. finished:completed, finished:failed
    run_dir: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the run finished and completed."""
        return self.status == "finished:completed"


def load_coordinator(home: str | Path) -> Coordinator:
    """The coordinator recorded in ``home`` by `start_coordinator`."""
    path = Path(home) / "coordinator.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no coordinator here. Fix: run `fedshop coordinator start --home {home}`")
    return Coordinator(**json.loads(path.read_text()))


def _require_files(**paths: Path) -> None:
    missing = [f"{name} ({p})" for name, p in paths.items() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing certificate file(s): {', '.join(missing)}. Fix: create them with "
                                "`fedshop certs --out DIR` and pass --certs DIR")


def _operator_host(host: str) -> tuple[str, tuple[str, ...]]:
    """(host the operator's `flwr` dials, non-loopback peers the Control guard must also let in)."""
    if host in ("0.0.0.0", "::", "localhost"):
        return "127.0.0.1", ()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValueError(f"--bind {host}: not an IP address. Fix: pass 127.0.0.1, 0.0.0.0 or one of this host's "
                         "addresses") from None
    # Bound to one address: local `flwr` calls arrive from that address, which only this host can use.
    return host, () if loopback else (host,)


def start_coordinator(home: str | Path, certs: str | Path, *, port: int | None = None, host: str = "127.0.0.1",
                      public_host: str | None = None, env: dict[str, str] | None = None,
                      timeout: float = 60.0, state_db: bool = False,
                      warn: Callable[[str], object] = print) -> Coordinator:
    """Start `flower-superlink` with TLS and SuperNode auth, Control and Runtime APIs for this host only.

    ``state_db`` keeps the SuperLink's state in ``<home>/superlink.db`` (SQLite; node IDs and runs survive a
    restart, at about twice the SuperLink CPU per request); by default it is in memory and the merchants
    of merchants.json are registered again (`restore_registrations`, problems go to ``warn``). Returns once
    it accepts connections and the registrations are restored.
    """
    home, certs = Path(home).resolve(), Path(certs).resolve()
    ca, cert, key = certs / "ca.crt", certs / "server.pem", certs / "server.key"
    _require_files(ca=ca, server_cert=cert, server_key=key)
    load_signing_key(certs / SIGNING_KEY_FILE)  # before anything starts: no key, no signed runs
    operator_host, allowed = _operator_host(host)
    record = home / "superlink.json"
    if record.exists() and recorded_running(running := read_record(record)):
        raise RuntimeError(f"a SuperLink from {home} already runs (PID {running.pid}). Fix: "
                           f"`fedshop coordinator stop --home {home}` first")
    port = port or free_port(host)
    dial_host = public_host or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    state = str(home / STATE_DB_FILE) if state_db else STATE_MEMORY
    info = Coordinator(str(home), host, port, f"{dial_host}:{port}", str(ca), str(cert), str(key),
                       control_address=f"{operator_host}:{port}", app_key=str(certs / SIGNING_KEY_FILE), state=state)
    info.flwr_home.mkdir(parents=True, exist_ok=True)
    guard = [sys.executable, "-m", "simulations.deploy.superlink_launcher",
             *[arg for peer in allowed for arg in ("--allow", peer)], "--"]
    command = [*guard, "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
               "--ssl-keyfile", str(key), "--enable-supernode-auth", "--host", host, "--port", str(port),
               "--database", state, "--disable-runtime-dependency-installation"]
    log = home / "superlink.log"
    proc = start_process("flower-superlink", command, log_path=log, record_path=record,
                         env=coordinator_env(info.flwr_home, env))
    try:
        wait_ready(proc, lambda: port_open(operator_host, port), timeout=timeout, log_path=log,
               what="flower-superlink")
    except ProcessStartError:
        stop_recorded(record)
        raise
    atomic_write_text(home / "coordinator.json", json.dumps(asdict(info), indent=2))
    write_connection(info.flwr_home, info.control_address, ca)
    try:
        remap = restore_registrations(home, warn=warn)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as err:
        stop_recorded(record)
        raise RuntimeError(f"the SuperLink started but the merchants of {home / MERCHANTS_FILE} could not be "
                           f"registered again ({err}); SuperLink stopped. Fix: see {log}, then start again") from None
    for old, new in remap.items():
        entry = registered_merchants(home)[new]
        warn(f"merchant {entry.get('name') or entry.get('key-fingerprint')} (shop-index {entry.get('shop-index')}) "
             f"registered again: SuperNode {old} -> {new}")
    if remap:
        warn("running merchants rejoin under their new node IDs by themselves (their SuperNode launcher re-activates "
             "by key); one whose SuperNode stopped (started by an older fedshop) needs `fedshop merchant start` again")
    return info


def stop_coordinator(home: str | Path, timeout: float = 10.0) -> bool:
    """Stop the SuperLink started from ``home`` by its recorded PID; False when it was not running."""
    return stop_recorded(Path(home) / "superlink.json", timeout=timeout)


def _flwr(info: Coordinator, *args: str, timeout: float = 60.0) -> dict:
    """Run one `flwr ... --format json` command against the coordinator and return its JSON answer."""
    proc = subprocess.run([flwr_bin("flwr"), *args, "--format", "json"], env=info.env(), capture_output=True,
                          text=True, timeout=timeout)
    start = proc.stdout.find("{")
    try:
        answer = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (proc.stdout + proc.stderr).strip()[-800:]
        raise RuntimeError(f"`flwr {' '.join(args)}` failed: {detail}")
    return answer


def registered_merchants(home: str | Path) -> dict[str, dict]:
    """``<home>/merchants.json``: node ID (text) -> {"name", "shop-index", "key", "public-key", ...} from `register`."""
    path = Path(home) / MERCHANTS_FILE
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except ValueError as err:
        raise ValueError(f"{path}: unreadable ({err}). Fix: restore it, or delete it and register the merchants "
                         "again") from None


def _write_merchants(home: str | Path, merchants: dict[str, dict]) -> None:
    atomic_write_text(Path(home) / MERCHANTS_FILE, json.dumps(merchants, indent=2))


def _flwr_register(home: str | Path, key_path: Path, name: str | None) -> int:
    """`flwr supernode register KEY [--name NAME]`: the node ID Flower gave the key."""
    args = ["supernode", "register", str(key_path), CONNECTION]
    if name:
        args += ["--name", name]
    return int(_flwr(load_coordinator(home), *args)["node-id"])


def register_merchant(home: str | Path, public_key: str | Path, *, name: str | None = None,
                      shop_index: int | None = None) -> int:
    """Register a merchant's SuperNode public key with the SuperLink; returns its node ID.

    With ``shop_index`` the node ID is bound to that shop: replies from this key that claim another
    shop-index are dropped and reported by the ServerApp (server/node_identity.py). The key itself is
    recorded in merchants.json too, so `start` can register it again after a restart.
    """
    key = Path(public_key)
    if not key.is_file():
        raise FileNotFoundError(f"{key}: no such public key. Fix: pass the merchant's .pub file from `fedshop certs`")
    if shop_index is not None and shop_index < 0:
        raise ValueError(f"--shop-index {shop_index}: must be 0 or more. Fix: number merchants 0, 1, 2, ...")
    fingerprint = key_fingerprint(key)  # a file that is no OpenSSH key fails here, before Flower sees it
    merchants = registered_merchants(home)
    taken = [node for node, entry in merchants.items() if shop_index is not None
             and entry.get("shop-index") == shop_index]
    if taken:
        raise ValueError(f"--shop-index {shop_index} is already bound to SuperNode {', '.join(taken)}; nothing "
                         "registered. Fix: `fedshop coordinator unregister` that node first (key rotation) or give "
                         "this merchant its own --shop-index")
    node_id = _flwr_register(home, key.resolve(), name)
    # Flower keeps the name but `flwr supernode ls` does not show it: `coordinator status` reads it here.
    merchants[str(node_id)] = {"name": name or "", "shop-index": shop_index, "key": str(key.resolve()),
                               "key-fingerprint": fingerprint, "public-key": key.read_text().strip()}
    _write_merchants(home, merchants)
    return node_id


def _recorded_key(node_id: str, entry: dict, scratch: Path) -> Path:
    """A file holding the public key an entry of merchants.json was registered with (its fingerprint checked)."""
    if text := entry.get("public-key"):
        path = scratch / f"{node_id}.pub"
        path.write_text(text + "\n")
    else:  # recorded before the key itself was kept: the file, if it still holds the same key
        path = Path(str(entry.get("key", "")))
    if key_fingerprint(path) != entry.get("key-fingerprint"):
        raise ValueError(f"{path} is not the key registered as {entry.get('key-fingerprint')}")
    return path


def restore_registrations(home: str | Path, warn: Callable[[str], object] = print) -> dict[str, str]:
    """Register every key of merchants.json the SuperLink does not know (all of them after an in-memory restart).

    Flower gives each key a new node ID; merchants.json is rewritten once (atomically) with the new IDs,
    each entry keeping its name, shop-index, key and fingerprint and listing its old IDs under
    ``previous-node-ids``. Returns old ID -> new ID. A key that cannot be registered again (file gone,
    Flower's error) keeps its entry under the old ID and is named in a ``warn`` line with the fix.
    Running SuperNodes are refused under their old ID and rejoin by their key (`supernode_launcher`).
    """
    home = Path(home)
    merchants = registered_merchants(home)
    if not merchants:
        return {}
    known = {str(node.get("node-id")) for node in list_merchants(home)
             if str(node.get("status", "")) not in ("unregistered", "deleted")}
    missing = [node for node in merchants if node not in known]
    if not missing:
        return {}
    remap: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=home, prefix=".keys-") as scratch:
        def again(old: str) -> tuple[str, int | str]:
            entry = merchants[old]
            try:
                return old, _flwr_register(home, _recorded_key(old, entry, Path(scratch)), entry.get("name"))
            except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as err:
                return old, str(err)

        with ThreadPoolExecutor(max_workers=min(4, len(missing))) as pool:  # each `flwr` call is a ~1 s process
            results = list(pool.map(again, missing))
    restored: dict[str, dict] = {}
    outcome = dict(results)
    for old, entry in merchants.items():
        new = outcome.get(old)
        if isinstance(new, int):
            remap[old] = str(new)
            previous = [*entry.get("previous-node-ids", []), old][-5:]
            restored[str(new)] = {**entry, "previous-node-ids": previous}
        else:
            restored[old] = entry
            if new is not None:
                label = entry.get("name") or entry.get("key-fingerprint")
                warn(f"warning: could not register merchant {label} (node {old}, shop-index "
                     f"{entry.get('shop-index')}) again: {new}. Its SuperNode is refused until you run "
                     f"`fedshop coordinator unregister {old} --home {home}` and `fedshop coordinator register "
                     "KEY.pub` with its public key")
    _write_merchants(home, restored)
    return remap


def current_node_id(home: str | Path, node_id: int) -> int:
    """``node_id``, or the node ID it was re-registered under after coordinator restarts (merchants.json)."""
    merchants = registered_merchants(home)
    if str(node_id) in merchants:
        return node_id
    for node, entry in merchants.items():
        if str(node_id) in [str(old) for old in entry.get("previous-node-ids", [])]:
            return int(node)
    return node_id


def unregister_merchant(home: str | Path, node_id: int) -> int:
    """Remove a SuperNode (e.g. before registering a rotated key) so its old key is refused; returns its ID.

    An ID from before a coordinator restart is mapped to the key's current ID first.
    """
    node_id = current_node_id(home, node_id)
    _flwr(load_coordinator(home), "supernode", "unregister", str(node_id), CONNECTION)
    merchants = registered_merchants(home)
    if merchants.pop(str(node_id), None) is not None:
        _write_merchants(home, merchants)
    return node_id


def list_merchants(home: str | Path, timeout: float = 60.0) -> list[dict]:
    """The registered SuperNodes as `flwr supernode ls` reports them."""
    return list(_flwr(load_coordinator(home), "supernode", "ls", CONNECTION, timeout=timeout).get("nodes", []))


def check_registered_merchants(home: str | Path, run_config: dict[str, Any],
                               warn: Callable[[str], object] = print) -> None:
    """Refuse a run whose min-shops exceeds the merchants registered at the SuperLink, before it is submitted.

    Counted are the nodes `flwr supernode ls` lists in any state but ``unregistered`` (a registered
    merchant may come online later). When the SuperLink cannot be asked (not running, or no answer), the
    check is skipped with a ``warn`` line: the submission then meets the SuperLink's own error.
    """
    from shared.federation_plan import SECAGG_MIN_SHOPS

    min_shops, secure = int(run_config.get("min-shops", 2)), bool(run_config.get("secure-aggregation", False))
    record = Path(home) / "superlink.json"
    try:
        if not (record.exists() and recorded_running(read_record(record))):
            raise RuntimeError(f"no running SuperLink recorded in {record}")
        nodes = list_merchants(home, timeout=20.0)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as err:
        warn(f"warning: could not list the merchants registered at the SuperLink ({err}); min_shops={min_shops} "
             "is not checked against them")
        return
    count = sum(1 for node in nodes if str(node.get("status", "")) != "unregistered")
    are = "merchant is" if count == 1 else "merchants are"
    if min_shops > count:
        raise ValueError(f"min_shops={min_shops} but only {count} {are} registered: register more with "
                         "`fedshop coordinator register` or lower federation.min_shops")
    if secure and count < SECAGG_MIN_SHOPS:
        raise ValueError(f"secure_aggregation=true but only {count} {are} registered: SecAgg+ needs at least "
                         f"{SECAGG_MIN_SHOPS}. Register more with `fedshop coordinator register` or set "
                         "federation.secure_aggregation = false")


def list_runs(home: str | Path) -> list[dict]:
    """The SuperLink's runs as `flwr ls` reports them (run-id, status, pending-at, finished-at, ...)."""
    return list(_flwr(load_coordinator(home), "ls", CONNECTION).get("runs", []))


def run_status(home: str | Path, run_id: int) -> str:
    """The run's status text from `flwr ls --run-id` (e.g. running, finished:completed)."""
    runs = _flwr(load_coordinator(home), "ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
    if not runs:
        raise RuntimeError(f"run {run_id} unknown to the SuperLink")
    return str(runs[0]["status"])


def _config_arg(run_config: dict[str, object]) -> str:
    """`--run-config` text: TOML values (strings JSON-quoted, which TOML basic strings accept)."""
    parts = []
    for key, value in run_config.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def deployment_run_config(scenario: Scenario, scenario_ref: str, run_dir: Path, *, rounds: int | None = None,
                          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config of a deployed run, as a simulation of ``scenario`` would have it; writes the run dir.

    Like `simulations.federated.run_federated`: config.toml, versions.json and scenario.toml (a record;
    merchants load ``scenario_ref`` themselves). Keys are checked against the ServerApp's settings here,
    so a typo fails before anything is submitted.
    """
    from server.server_app import split_privacy
    from simulations.federated import SCENARIO_FILE, run_config
    from simulations.rundir import write_run_info

    config = {**run_config(scenario, run_dir, method="fedshop", rounds=rounds, resume=False), **(extra or {}),
              "scenario": scenario_ref, "run-dir": str(run_dir)}
    settings = split_privacy(config)[0]  # unknown key or wrong type -> ValueError naming it
    # Typed values for the ServerApp's own keys; privacy keys (secagg-*, dp-*) pass through as given.
    config = {key: getattr(settings, key.replace("-", "_"), value) for key, value in config.items()}
    atomic_write_text(run_dir / SCENARIO_FILE, tomli_w.dumps(scenario.raw))
    write_run_info(run_dir, {"run": config, "scenario": scenario.raw})
    return config


def resume_run_config(run_dir: Path, *, rounds: int | None = None,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config that continues the deployed run in ``run_dir`` from its last checkpoint.

    It is the config the run was submitted with (its `config.toml`), with `resume = true`, ``rounds``
    as the new total if given, and ``extra`` keys; the ServerApp refuses changed model settings.
    """
    import tomllib

    from server.server_app import split_privacy
    from simulations.rundir import write_run_info

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Fix: pass --resume a run directory written by "
                                "`fedshop coordinator run`")
    try:
        saved = tomllib.loads(path.read_text(encoding="utf-8"))
        config = dict(saved["run"])
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a run record with a [run] table ({exc}). Fix: pass --resume a run "
                         "directory written by `fedshop coordinator run`") from None
    if str(config.get("run-dir", "")) != str(Path(run_dir).resolve()):
        raise ValueError(f"{path} records run-dir={config.get('run-dir')!r}, not {Path(run_dir).resolve()}. "
                         "Fix: resume the run in the directory it was created in (checkpoints and the shops' "
                         "local parts are tied to it)")
    config.update(extra or {})
    config["resume"] = True
    if rounds:
        config["num-server-rounds"] = int(rounds)
    settings = split_privacy(config)[0]  # unknown key or wrong type -> ValueError naming it
    config = {key: getattr(settings, key.replace("-", "_"), value) for key, value in config.items()}
    write_run_info(run_dir, {**saved, "run": config})
    return config


def submit_run(home: str | Path, run_config: dict[str, object], *, app: str | Path = REPO_ROOT,
               out: TextIO = sys.stdout, timeout: float = 3600.0, run_dir: str | None = None,
               signing_key: str | Path | None = None, sign: bool = True) -> RunOutcome:
    """Sign ``app``'s FAB, submit it with `flwr run --stream`, echo its log to ``out``, return the real status.

    Merchants run only FABs signed by a key in their trusted-entities file: the coordinator's app key
    (``signing_key`` overrides it; ``sign=False`` submits unsigned, which merchants refuse).
    `flwr run --stream` exits 0 even when the run fails, so the status comes from `flwr ls`.
    """
    info = load_coordinator(home)
    if run_config.get("run-dir"):  # before signing: the FAB is built from the checkout the run dir may be in
        from server.node_identity import BINDINGS_FILE

        bindings = {node: entry["shop-index"] for node, entry in registered_merchants(home).items()
                    if entry.get("shop-index") is not None}
        atomic_write_text(Path(str(run_config["run-dir"])) / BINDINGS_FILE, json.dumps(bindings, indent=2))
    if sign:
        key = load_signing_key(signing_key or info.app_key)
        # `flwr run` builds the same bytes (Flower's builder, fixed zip dates) a moment later.
        run_config = {**run_config, SIGNATURE_KEY: sign_fab(build_fab(app), key)}
    command = [flwr_bin("flwr"), "run", str(Path(app).resolve()), CONNECTION, "--stream"]
    if run_config:
        command += ["--run-config", _config_arg(run_config)]
    proc = subprocess.Popen(command, env=info.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=info.home)
    run_id = None
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if run_id is None and (match := _RUN_ID_RE.search(line)):
                run_id = int(match.group(1))
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if run_id is None:
        raise RuntimeError(f"`flwr run` did not start a run (exit code {proc.returncode}); see the output above")
    status = run_status(home, run_id)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)  # the log stream ended before the SuperLink recorded the final status
        status = run_status(home, run_id)
    return RunOutcome(run_id, status, run_dir)
