"""`flower-supernode` with a chosen node-heartbeat interval: ``python -m ... SECONDS -- SUPERNODE-ARGS``.

flwr 1.42 sends the heartbeat interval in each SuperNode's activation and heartbeat requests, and the
SuperLink accepts any value in [10 s, 1800 s], holding a silent node "online" for two intervals.
`flower-supernode` itself always sends 30 s, so after a crash the SuperLink waits up to 60 s before it
lets the merchant back in and stops waiting for its reply. Flower has no flag for it; this launcher sets
the module constant the SuperNode reads before starting Flower's own entry point, so a merchant can
choose faster crash detection (one small request every few seconds) without patching Flower.
"""

from __future__ import annotations

import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    """Apply the interval, then hand the remaining arguments to Flower's `flower-supernode`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] != "--":
        print("usage: python -m simulations.deploy.supernode_launcher SECONDS -- FLOWER-SUPERNODE-ARGS",
              file=sys.stderr)
        return 2
    try:
        apply_heartbeat_interval(float(args[0]))
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
