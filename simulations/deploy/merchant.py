"""A merchant host: validate the shop's data, then run an authenticated `flower-supernode` over TLS.

Files of the SuperNode itself go to ``<state-dir>/supernode/`` (PID record, log, FLWR_HOME); the
ClientApp keeps the shop's local part directly in ``<state-dir>`` (``local_part.pt``).

The SuperNode's node_config tells the ClientApp which shop it serves: ``shop-dir``, ``state-dir``
and, when the operator gives one, ``shop-index`` (the coordinator labels this merchant's rows in
metrics.csv by it; without it the rows say ``node-<SuperNode ID>``); and what the merchant agreed to
(`client.merchant_policy`): ``cap-*`` keys, ``allow-test-faults``, ``allow-scenario-path``.

The SuperNode runs only apps signed by a key in the merchant's trusted-entities file (the coordinator's
``trusted-entities.yaml``): Flower's ``--trusted-entities`` check, fed by `supernode_launcher`.

Isolation ``process`` (the default): the SuperNode starts no ClientApp itself; one long-lived
`client.long_lived` process serves all its messages (imports torch once), acquiring tasks with a
SuperExec secret only it and the SuperNode know. ``subprocess``: Flower's default, a fresh
`flwr-clientapp` per message. Both processes are recorded and stopped by PID.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.atomic import atomic_write_bytes, atomic_write_text
from simulations.deploy.app_signing import read_trusted
from simulations.deploy.certs import key_fingerprint
from simulations.deploy.flwr_config import flwr_env
from simulations.deploy.processes import (
    ProcessStartError,
    free_port,
    read_record,
    recorded_running,
    start_process,
    stop_recorded,
    wait_ready,
)
from simulations.deploy.supernode_launcher import DEFAULT_INTERVAL, check_heartbeat_interval

_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")
_REFUSED = "Failed to activate SuperNode"
_RETRY_PAUSES = (2.0, 3.0, 5.0)  # then 5 s: each retry starts a fresh flower-supernode (~1.5 CPU-s)
ISOLATIONS = ("process", "subprocess")  # long-lived ClientApp process (default) or Flower's process per message
_CLIENT_READY = "long-lived ClientApp ready"
MERCHANT_FILE = "merchant.json"  # in supernode/: what `merchant status` reports (written once the node is in)
PROBE_TIMEOUT = 3.0  # seconds for the TCP probe of the coordinator before anything starts


class CoordinatorUnreachable(RuntimeError):
    """Nothing accepts TCP connections at the coordinator address; the message names it and the fix."""


@dataclass
class Merchant:
    """A started SuperNode."""

    pid: int
    node_id: int
    port: int
    state_dir: Path
    log: Path
    clientapp_pid: int | None = None  # the long-lived ClientApp process (isolation "process")


def supernode_dir(state_dir: str | Path) -> Path:
    """Folder for the SuperNode's own files inside the merchant's state dir."""
    return Path(state_dir).resolve() / "supernode"


def validate_shop(shop_dir: str | Path) -> str:
    """Load and validate the shop directory (raises ShopDataError naming file, row, column, fix); its name."""
    from shared.schema import load_shop_dir  # imports pandas; only needed here

    return load_shop_dir(shop_dir).name


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a ``HOST:PORT`` or ``[IPv6]:PORT`` address; ValueError naming the fix otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--superlink {address!r}: expected HOST:PORT, e.g. coord.example.com:9092. Fix: pass "
                         "the address `fedshop coordinator start` printed")
    return host, int(port)


def probe_coordinator(address: str, timeout: float = PROBE_TIMEOUT, consequence: str = "; nothing started") -> None:
    """Raise CoordinatorUnreachable within ``timeout`` seconds unless ``address`` accepts TCP connections.

    Flower's SuperNode would otherwise retry silently for minutes; a refused or timed-out connect
    here names the address tried and what to check.
    """
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        why = "connection refused"
    except OSError as err:  # DNS failure, no route, ...
        why = err.strerror or str(err)
    raise CoordinatorUnreachable(
        f"cannot reach the coordinator at {host}:{port} ({why}){consequence}. Fix: check the address and "
        f"port (`fedshop coordinator start` prints them), that the coordinator is running there "
        f"(`fedshop coordinator status` on its host), and that no firewall blocks TCP port {port} from this host")


def node_config(shop_dir: Path, state_dir: Path, shop_index: int | None = None,
                policy: dict[str, int | bool | str] | None = None) -> str:
    """The ``--node-config`` text the ClientApp reads (client.local_state.resolve_shop, client.merchant_policy).

    ``policy``: the merchant's limits on what the coordinator may order, e.g. ``{"cap-local-epochs": 100}``
    or ``{"allow-test-faults": True}`` (test federations only), ``{"cap-fault-sleep": 5}``, or
    ``{"allow-scenario-path": "/abs/scenario.toml"}`` (the one scenario file, besides the built-in ones, that
    the coordinator may have this shop load).
    """
    from client.merchant_policy import ALLOW_SCENARIO_PATH, ALLOW_TEST_FAULTS, CAP_FAULT_SLEEP, WORK_CAPS

    known = {ALLOW_TEST_FAULTS, CAP_FAULT_SLEEP, ALLOW_SCENARIO_PATH} | {key for key, _ in WORK_CAPS.values()}
    for path in (shop_dir, state_dir):
        if "'" in str(path):
            raise ValueError(f"{path}: a quote in the path cannot pass through --node-config. Fix: rename the folder")
    text = f"shop-dir='{shop_dir}' state-dir='{state_dir}'"
    if shop_index is not None:
        if shop_index < 0:
            raise ValueError(f"--shop-index {shop_index}: must be 0 or more. Fix: number merchants 0, 1, 2, ...")
        text += f" shop-index={int(shop_index)}"
    for key, value in (policy or {}).items():
        if key not in known:
            raise ValueError(f"{key}: not a merchant policy key. Fix: use one of {sorted(known)}")
        if key == ALLOW_TEST_FAULTS:
            text += f" {key}={'true' if value is True else 'false'}"
        elif key == ALLOW_SCENARIO_PATH:
            path = Path(str(value))
            if not path.is_absolute() or not path.is_file() or "'" in str(path):
                raise ValueError(f"--allow-scenario-path {value}: not an absolute path to an existing file without "
                                 "quotes. Fix: pass the scenario TOML's absolute path")
            text += f" {key}='{path}'"
        elif type(value) is not int or value < 1:
            raise ValueError(f"{key}={value!r}: a cap must be a whole number >= 1")
        else:
            text += f" {key}={value}"
    return text


def _activated_node_id(log: Path) -> int | None:
    try:
        match = _NODE_ID_RE.search(log.read_text(errors="replace"))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def start_merchant(shop_dir: str | Path, state_dir: str | Path, superlink: str, *, ca: str | Path | None,
                   key: str | Path, trusted_entities: str | Path, port: int | None = None,
                   shop_index: int | None = None,
                   isolation: str = "process", env: dict[str, str] | None = None, validate: bool = True,
                   timeout: float = 60.0, retry_for: float = 0.0,
                   heartbeat_interval: float = DEFAULT_INTERVAL, shop_name: str | None = None,
                   policy: dict[str, int | bool | str] | None = None) -> Merchant:
    """Validate ``shop_dir``, start the SuperNode and wait until the SuperLink has accepted it.

    ``shop_name`` (the validated shop's name, for `merchant status`) is taken from the validation, or
    given by a caller that validated the shop itself (``validate=False``).

    Raises ShopDataError before anything starts when the data is bad, and ProcessStartError (with the
    SuperNode's log) when the SuperLink refuses it: unregistered key, untrusted certificate. After a
    crash the SuperLink keeps the node "online" until two missed heartbeats (2 x ``heartbeat_interval``,
    Flower's default 30 s) and refuses to activate it again meanwhile; ``retry_for`` seconds of retries
    cover that window. A shorter interval (down to 10 s) lets a crashed merchant back in sooner.
    ``isolation`` "process" serves every message from one long-lived ClientApp process; "subprocess"
    is Flower's default (a fresh process per message).
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"--isolation {isolation}: must be one of {', '.join(ISOLATIONS)}")
    if heartbeat_interval != DEFAULT_INTERVAL:
        check_heartbeat_interval(heartbeat_interval)  # before anything starts
    read_trusted(trusted_entities)  # a missing or malformed file fails here, naming the fix
    if validate:  # bad data is reported before the network is tried
        shop_name = validate_shop(shop_dir)
        validate = False
    probe_coordinator(superlink)
    deadline = time.monotonic() + retry_for
    attempt = 0
    while True:
        try:
            return _start_once(shop_dir, state_dir, superlink, ca=ca, key=key, trusted_entities=trusted_entities,
                               port=port, shop_index=shop_index,
                               isolation=isolation, env=env, validate=validate, timeout=timeout,
                               heartbeat_interval=heartbeat_interval, shop_name=shop_name, policy=policy)
        except ProcessStartError as err:
            if _REFUSED not in str(err):
                raise
            pause = _RETRY_PAUSES[min(attempt, len(_RETRY_PAUSES) - 1)]
            attempt += 1
            if time.monotonic() + pause > deadline:
                raise ProcessStartError(f"{err}\nThe SuperLink refused this SuperNode: its key is not registered "
                                        "(fix: `fedshop coordinator register KEY.pub`), or it still counts a "
                                        "crashed earlier instance as online for two heartbeat intervals "
                                        f"(fix: retry after {2 * heartbeat_interval:g} s, or pass --retry-for "
                                        f"{3 * heartbeat_interval:g})") from None
            validate = False  # validated on the first attempt
            time.sleep(pause)


def _start_once(shop_dir: str | Path, state_dir: str | Path, superlink: str, *, ca: str | Path | None,
                key: str | Path, trusted_entities: str | Path, port: int | None, shop_index: int | None, isolation: str,
                env: dict[str, str] | None, validate: bool, timeout: float,
                heartbeat_interval: float, shop_name: str | None = None,
                policy: dict[str, int | bool | str] | None = None) -> Merchant:
    """One attempt of `start_merchant`."""
    shop_dir, state_dir = Path(shop_dir).resolve(), Path(state_dir).resolve()
    if validate:
        shop_name = validate_shop(shop_dir)
    key = Path(key).resolve()
    if not key.is_file():
        raise FileNotFoundError(f"{key}: no such SuperNode private key. Fix: pass the merchant's .key from "
                                "`fedshop certs`")
    if ca is not None and not Path(ca).is_file():
        raise FileNotFoundError(f"{ca}: no such CA certificate. Fix: copy ca.crt from the coordinator")
    own = supernode_dir(state_dir)
    own.mkdir(parents=True, exist_ok=True)
    record, log = own / "supernode.json", own / "supernode.log"
    if record.exists() and recorded_running(running := read_record(record)):
        raise RuntimeError(f"a SuperNode for {state_dir} already runs (PID {running.pid}). Fix: "
                           f"`fedshop merchant stop --state-dir {state_dir}` first")
    if (own / "clientapp.json").exists():  # left by a crashed SuperNode (it exits with its parent anyway)
        stop_recorded(own / "clientapp.json")
    port = port or free_port()
    # Flower's own entry point, started by the launcher so that it checks app signatures (and beats at
    # the chosen interval).
    launcher = [sys.executable, "-m", "simulations.deploy.supernode_launcher", f"{heartbeat_interval:g}", "--"]
    command = [*launcher, "--superlink", superlink, "--auth-supernode-private-key", str(key),
               "--trusted-entities", str(Path(trusted_entities).resolve()),
               "--node-config", node_config(shop_dir, state_dir, shop_index, policy), "--port", str(port),
               "--isolation", isolation]
    if isolation == "process":
        # Only holders of this secret may acquire the SuperNode's tasks (Flower's SuperExec auth, offered
        # in process isolation only): other local users cannot take a message meant for the ClientApp.
        secret = atomic_write_bytes(own / "superexec.secret", secrets.token_bytes(32), mode=0o600)
        command += ["--superexec-auth-secret-file", str(secret)]
    if ca is not None:
        command += ["--root-certificates", str(Path(ca).resolve())]
    log.unlink(missing_ok=True)  # the node ID is read from this run's log only
    proc = start_process("flower-supernode", command, log_path=log, record_path=record,
                         env=flwr_env(own / "flwr", env))
    try:
        wait_ready(proc, lambda: _activated_node_id(log) is not None, timeout=timeout, log_path=log,
                   what=f"flower-supernode for {shop_dir.name}")
    except ProcessStartError:
        stop_recorded(record)
        raise
    clientapp_pid = None
    if isolation == "process":
        try:
            clientapp_pid = _start_clientapp(own, proc.pid, port, env, timeout)
        except ProcessStartError:
            stop_recorded(record)
            raise
    merchant = Merchant(proc.pid, int(_activated_node_id(log) or 0), port, state_dir, log, clientapp_pid)
    write_merchant_record(merchant, shop_dir=shop_dir, superlink=superlink, key=key, shop_index=shop_index,
                          shop_name=shop_name)
    return merchant


def _start_clientapp(own: Path, supernode_pid: int, port: int, env: dict[str, str] | None, timeout: float) -> int:
    """Start the long-lived ClientApp process for the SuperNode on ``port`` and wait until it imported the app."""
    # Same log as the SuperNode's (appended to), as with Flower's per-message processes: the ClientApp's
    # warnings (e.g. an unreadable local part) land where the operator already looks.
    record, log = own / "clientapp.json", own / "supernode.log"
    command = [sys.executable, "-m", "client.long_lived", "--runtime-api-address", f"127.0.0.1:{port}",
               "--parent-pid", str(supernode_pid), "--superexec-auth-secret-file", str(own / "superexec.secret")]
    proc = start_process("fedshop-clientapp", command, log_path=log, record_path=record,
                         env=flwr_env(own / "flwr", env))
    try:
        wait_ready(proc, lambda: _CLIENT_READY in _read(log), timeout=max(timeout, 60.0), log_path=log,
                   what="the long-lived ClientApp process")
    except ProcessStartError:
        stop_recorded(record)
        raise
    return proc.pid


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def write_merchant_record(merchant: Merchant, *, shop_dir: Path, superlink: str, key: Path,
                          shop_index: int | None, shop_name: str | None = None) -> Path:
    """Record what this SuperNode was started with (`merchant status` reads it; it outlives `stop`)."""
    record = {"shop": shop_name, "shop-dir": str(shop_dir), "state-dir": str(merchant.state_dir),
              "superlink": superlink, "key": str(key), "key-fingerprint": key_fingerprint(key),
              "shop-index": shop_index, "node-id": merchant.node_id, "pid": merchant.pid,
              "clientapp-pid": merchant.clientapp_pid, "log": str(merchant.log),
              "started-at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return atomic_write_text(supernode_dir(merchant.state_dir) / MERCHANT_FILE, json.dumps(record, indent=2))


def stop_merchant(state_dir: str | Path, timeout: float = 10.0) -> bool:
    """Stop the SuperNode started for ``state_dir`` and its long-lived ClientApp by recorded PID.

    False when the SuperNode was not running.
    """
    own = supernode_dir(state_dir)
    if (own / "clientapp.json").exists():
        stop_recorded(own / "clientapp.json", timeout=timeout)
    return stop_recorded(own / "supernode.json", timeout=timeout)
