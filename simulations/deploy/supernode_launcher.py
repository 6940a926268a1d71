"""`flower-supernode` with a heartbeat interval and signed-app checks: ``python -m ... SECONDS -- SUPERNODE-ARGS``.

flwr 1.42 sends the heartbeat interval in each SuperNode's activation and heartbeat requests, and the
SuperLink accepts any value in [10 s, 1800 s], holding a silent node "online" for two intervals.
`flower-supernode` itself always sends 30 s, so after a crash the SuperLink waits up to 60 s before it
lets the merchant back in and stops waiting for its reply. Flower has no flag for it; this launcher sets
the module constant the SuperNode reads before starting Flower's own entry point, so a merchant can
choose faster crash detection (one small request every few seconds) without patching Flower.

With ``--trusted-entities`` among the SuperNode's arguments, the launcher also hands each new run's
``app-signature`` (run config, written by the coordinator; see `simulations.deploy.app_signing`) to Flower
as the FAB's verification record, which flwr 1.42's SuperLink leaves empty for apps not from Flower Hub.
Flower's own check (`_verify_fab`) then verifies it against the trusted keys and answers an unsigned or
wrongly signed app with an error reply instead of running it; this launcher adds one log line saying why.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from logging import ERROR, INFO
from typing import Any

DEFAULT_INTERVAL = 30.0  # flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL in flwr 1.42
# Every module of the SuperNode process that reads the interval at import time.
_READERS = ("flwr.supercore.heartbeat", "flwr.supernode.fleet_http_connection")


def check_heartbeat_interval(seconds: float) -> None:
    """Raise ValueError, naming the range, when the SuperLink would refuse ``seconds``."""
    from flwr.common import constant

    low, high = constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL
    if not low <= seconds <= high:
        raise ValueError(f"--heartbeat-interval {seconds:g}: the SuperLink accepts {low}-{high} seconds. "
                         f"Fix: pass a value in that range ({DEFAULT_INTERVAL:g} is Flower's default)")


def apply_heartbeat_interval(seconds: float) -> None:
    """Make this process's SuperNode announce and keep ``seconds`` as its heartbeat interval."""
    check_heartbeat_interval(seconds)
    for name in _READERS:
        module = importlib.import_module(name)
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{name} no longer reads HEARTBEAT_DEFAULT_INTERVAL: this flwr version is not "
                               "the one fedshop was built on. Fix: install flwr==1.42.0 or use the default "
                               "--heartbeat-interval")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def _trusted_entities_path(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--trusted-entities" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--trusted-entities="):
            return arg.split("=", 1)[1]
    return None


def signed_fab_getter(get_fab: Callable[[str, int], Any], get_run: Callable[[int], Any],
                      trusted: dict[str, str]) -> Callable[[str, int], Any]:
    """Wrap the SuperNode's ``get_fab`` so the FAB carries the run's signature record for Flower to verify."""
    from flwr.common.logger import log
    from flwr.supernode import start_client_internal

    from simulations.deploy.app_signing import SIGNATURE_KEY, AppSignatureError, verification_record

    def get_signed_fab(fab_hash: str, run_id: int) -> Any:
        fab = get_fab(fab_hash, run_id)
        value = str(get_run(run_id).override_config.get(SIGNATURE_KEY, ""))
        fab.verifications = {"valid_license": "Valid"}  # no signer: Flower's check finds no trusted key
        if not value:
            log(ERROR, "fedshop: refusing run %s: its app (FAB %s) is not signed. This merchant runs only apps "
                "signed by a key in its --trusted-entities file, i.e. submitted with `fedshop coordinator run`",
                run_id, fab_hash[:12])
            return fab
        try:
            fab.verifications = verification_record(value)
        except AppSignatureError as err:
            log(ERROR, "fedshop: refusing run %s: %s", run_id, err)
            return fab
        signer = next(k for k in fab.verifications if k != "valid_license")
        if signer not in trusted:
            log(ERROR, "fedshop: refusing run %s: its app is signed by key %s, which is not in this merchant's "
                "--trusted-entities (%s)", run_id, signer, ", ".join(sorted(trusted)))
        elif not start_client_internal._verify_fab(fab, trusted):
            log(ERROR, "fedshop: refusing run %s: the signature of trusted key %s does not match this FAB "
                "(the app was changed after signing)", run_id, signer)
        else:
            log(INFO, "fedshop: run %s: app FAB %s signed by trusted key %s", run_id, fab_hash[:12], signer)
        return fab

    return get_signed_fab


def install_signature_check(trusted_path: str) -> None:
    """Make this process's SuperNode give Flower each run's FAB signature record before Flower verifies it."""
    from flwr.supernode import start_client_internal

    from simulations.deploy.app_signing import read_trusted

    trusted = read_trusted(trusted_path)
    original = getattr(start_client_internal, "_pull_and_store_message", None)
    if original is None or not hasattr(start_client_internal, "_verify_fab"):
        raise RuntimeError("flwr.supernode.start_client_internal changed: this flwr version is not the one fedshop "
                           "was built on. Fix: install flwr==1.42.0")

    def pull_and_store_message(**kwargs: Any) -> Any:
        kwargs["get_fab"] = signed_fab_getter(kwargs["get_fab"], kwargs["get_run"], trusted)
        return original(**kwargs)

    start_client_internal._pull_and_store_message = pull_and_store_message


def main(argv: list[str] | None = None) -> int:
    """Apply the interval, then hand the remaining arguments to Flower's `flower-supernode`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] != "--":
        print("usage: python -m simulations.deploy.supernode_launcher SECONDS -- FLOWER-SUPERNODE-ARGS",
              file=sys.stderr)
        return 2
    try:
        apply_heartbeat_interval(float(args[0]))
        if (trusted := _trusted_entities_path(args[2:])) is not None:
            install_signature_check(trusted)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
