"""Ray's own token authentication for the simulation engine's local cluster.

Ray 2.55 cannot be bound to loopback on Linux: `ray.init(_node_ip_address="127.0.0.1")` is turned into
the machine's reachable address (`services.resolve_ip_for_localhost`), and the GCS server, raylets and
workers listen on every interface. What Ray does offer is token authentication (`RAY_AUTH_MODE=token`):
every one of its gRPC services then refuses a caller without the cluster's token. fedshop turns it on
with a fresh random token per process before Ray starts, so a simulation's ports are still open on all
interfaces but answer only processes that inherited the token (Ray's own workers).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import MutableMapping

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"


def require_ray_token(environ: MutableMapping[str, str] | None = None) -> str:
    """Turn on Ray token authentication in ``environ`` (default: this process) unless the user chose a mode.

    A token the user already set (`RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`, e.g. to join their own
    cluster) is kept; otherwise a random 256-bit token is made. Returns the mode in force. Setting
    `RAY_AUTH_MODE=disabled` explicitly is respected (and leaves the ports unauthenticated).
    """
    env = os.environ if environ is None else environ
    mode = env.setdefault(AUTH_MODE, "token")
    if mode == "token" and not env.get(AUTH_TOKEN) and not env.get(AUTH_TOKEN_PATH):
        env[AUTH_TOKEN] = secrets.token_hex(32)
    return mode
