"""What `fedshop merchant status` and `fedshop coordinator status` report, read from files and Flower's CLI.

A merchant's status comes from its state dir alone (no network besides one short TCP probe): the
record `merchant start` wrote, the SuperNode's PID record, and the header of the saved local part.
The coordinator's comes from its home folder and, while its SuperLink runs, from `flwr supernode ls`
and `flwr ls` (Flower's Control API over loopback): Flower shows node IDs and states, fedshop's
`merchants.json` adds the `--name`, shop-index and key fingerprint given at registration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simulations.deploy.processes import read_record, recorded_running


def _json_file(path: Path) -> dict | None:
    """A JSON object from ``path``; None when the file is absent; ValueError naming it when unreadable."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: unreadable ({err}). Fix: restore it, or delete it (it is rewritten by the next "
                         "start)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object. Fix: delete it (it is rewritten by the next start)")
    return data


def _process(record_path: Path) -> dict[str, Any]:
    """{"running": bool, "pid": int | None} from a PID record written by `start_process`."""
    if not record_path.exists():
        return {"running": False, "pid": None}
    record = read_record(record_path)
    return {"running": recorded_running(record), "pid": record.pid}


def local_part_header(state_dir: Path) -> dict[str, Any] | None:
    """Round, run and `rounds_trained` of the saved local part (None when there is none or it is unreadable)."""
    import torch  # noqa: PLC0415 - heavy; only the status command needs it here

    from client.local_state import STATE_FILE  # noqa: PLC0415

    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        return {"file": str(path), "error": f"unreadable ({type(exc).__name__}); the next round starts fresh"}
    if not isinstance(payload, dict):
        return {"file": str(path), "error": "not a fedshop local-part file; the next round starts fresh"}
    return {"file": str(path), "shop": payload.get("shop"), "round": payload.get("round"),
            "run": payload.get("run") or "", "rounds_trained": payload.get("rounds_trained"),
            "saved-at": _mtime(path)}


def _mtime(path: Path) -> str:
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).isoformat(timespec="seconds")


def latest_node_id(log: Path) -> int | None:
    """The node ID of the SuperNode's last activation in its log (None without one)."""
    import re

    try:
        found = re.findall(r"SuperNode ID: (\d+)", log.read_text(errors="replace"))
    except OSError:
        return None
    return int(found[-1]) if found else None


def merchant_status(state_dir: str | Path, *, probe: bool = True) -> dict[str, Any]:
    """This merchant: shop, key fingerprint, coordinator (and whether it answers), SuperNode, local part."""
    from simulations.deploy.merchant import MERCHANT_FILE, CoordinatorUnreachable, probe_coordinator, supernode_dir

    state_dir = Path(state_dir).resolve()
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir}: no such state dir. Fix: pass the --state-dir given to "
                                "`fedshop merchant start`")
    own = supernode_dir(state_dir)
    started = _json_file(own / MERCHANT_FILE) or {}
    local = local_part_header(state_dir)
    status: dict[str, Any] = {
        "state-dir": str(state_dir),
        "shop": started.get("shop") or (local or {}).get("shop")
        or (Path(started["shop-dir"]).name if started.get("shop-dir") else None),
        "shop-dir": started.get("shop-dir"), "shop-index": started.get("shop-index"),
        "key": started.get("key"), "key-fingerprint": started.get("key-fingerprint"),
        "coordinator": started.get("superlink"),
        # the SuperNode logs its ID at every activation: after a rejoin (coordinator restart) the last one holds
        "node-id": latest_node_id(Path(started.get("log") or own / "supernode.log")) or started.get("node-id"),
        "started-at": started.get("started-at"), "log": started.get("log") or str(own / "supernode.log"),
        "supernode": _process(own / "supernode.json"), "local-part": local,
    }
    if probe and status["coordinator"]:
        try:
            probe_coordinator(status["coordinator"], timeout=2.0, consequence="")
            status["coordinator-reachable"] = True
        except (CoordinatorUnreachable, ValueError) as err:
            status["coordinator-reachable"] = False
            status["coordinator-problem"] = str(err)
    return status


def coordinator_status(home: str | Path) -> dict[str, Any]:
    """The coordinator: SuperLink process, registered merchants with their node state, and the runs."""
    from simulations.deploy.coordinator import list_merchants, list_runs, load_coordinator, registered_merchants

    home = Path(home).resolve()
    info = load_coordinator(home)  # raises naming `coordinator start` when there is none
    superlink = _process(home / "superlink.json")
    registered = registered_merchants(home)
    status: dict[str, Any] = {"home": str(home), "address": info.address, "superlink": superlink,
                              "log": str(home / "superlink.log"), "merchants": [], "runs": None}
    nodes: dict[str, dict] = {}
    if superlink["running"]:
        nodes = {str(node["node-id"]): node for node in list_merchants(home)}
        status["runs"] = [{"run-id": run.get("run-id"), "status": run.get("status"),
                           "pending-at": run.get("pending-at"), "finished-at": run.get("finished-at"),
                           "elapsed": run.get("elapsed")} for run in list_runs(home)]
    for node_id in sorted(set(registered) | set(nodes), key=int):
        entry, node = registered.get(node_id, {}), nodes.get(node_id)
        status["merchants"].append({
            "node-id": node_id, "name": entry.get("name") or "", "shop-index": entry.get("shop-index"),
            "key-fingerprint": entry.get("key-fingerprint"),
            # Flower's node states: registered (never connected), online, offline, unregistered
            "state": node.get("status") if node else ("unknown (SuperLink not running)" if not superlink["running"]
                                                      else "not known to the SuperLink"),
            "online-at": node.get("online-at") if node else None,
        })
    return status
