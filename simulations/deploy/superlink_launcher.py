"""`flower-superlink` that answers non-local clients on its Fleet API only: ``python -m ... [--allow IP] -- ARGS``.

flwr 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr supernode register`, ...) and
the Runtime API (SuperExec, ServerApp) on one HTTPS port; `--control-api-address` is deprecated and no longer
splits them, and Control API account authentication needs Flower's enterprise OIDC plugin (without it every
caller is the same anonymous account). So anyone who reaches the port with the CA file could submit runs and
register or unregister SuperNodes. This launcher adds one ASGI middleware in front of Flower's own app,
then starts Flower's entry point unchanged: a request whose TCP peer is not 127.0.0.1/::1 (or an ``--allow``ed
address of this host) may only use ``/v1/fleet/``; everything else gets 403 before Flower sees it. The
coordinator's operator uses `flwr` on the coordinator host, over loopback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from shared.timing_log import record, timing_enabled

PUBLIC_PREFIX = "/v1/fleet/"  # what SuperNodes call; nothing else is served to other hosts
REFUSAL = ("fedshop: this SuperLink serves only its Fleet API to other hosts; Control and Runtime APIs answer "
           "on the coordinator host only (run `flwr`/`fedshop coordinator` there)")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# A connection to a loopback address from this host comes from 127.0.0.1 (or ::1) unless the client
# binds another source on purpose; the tests play an outsider from 127.0.0.2 that way.
LOCAL_PEERS = ("127.0.0.1", "::1")


def is_local_peer(host: str | None, allowed: Iterable[str] = ()) -> bool:
    """Whether a TCP peer address is this host's: 127.0.0.1, ::1, or one of the ``allowed`` addresses."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address) in {*LOCAL_PEERS, *allowed}


class FleetOnlyForRemotePeers:
    """ASGI middleware: non-local peers get 403 for every path outside the Fleet API."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], allowed: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass local and Fleet requests through; answer the rest with 403."""
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(PUBLIC_PREFIX):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        if is_local_peer(client[0] if client else None, self.allowed):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": REFUSAL}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RequestLog:
    """ASGI middleware (only with $FEDSHOP_TIMING_LOG): one timing-log line per HTTP request, path and seconds."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request, then append its path, start and duration to the timing log."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.time()
        try:
            await self.app(scope, receive, send)
        finally:
            record({"where": "superlink", "event": "request", "path": str(scope.get("path", "")), "at": start,
                    "s": round(time.time() - start, 5)})


def install_guard(allowed: tuple[str, ...] = ()) -> None:
    """Put `FleetOnlyForRemotePeers` outermost in the middleware list Flower's SuperLink app is built with."""
    from flwr.superlink import main
    from starlette.middleware import Middleware

    flower_middleware = getattr(main, "_get_middleware", None)
    if flower_middleware is None:
        raise RuntimeError("flwr.superlink.main._get_middleware is gone: this flwr version is not the one fedshop "
                           "was built on. Fix: install flwr==1.42.0")

    def guarded() -> list[Middleware]:
        logged = [Middleware(RequestLog)] if timing_enabled() else []
        return [*logged, Middleware(FleetOnlyForRemotePeers, allowed=allowed), *flower_middleware()]

    main._get_middleware = guarded


def main(argv: list[str] | None = None) -> int:
    """Install the guard, then hand the arguments after ``--`` to Flower's `flower-superlink`."""
    args = list(sys.argv[1:] if argv is None else argv)
    allowed: list[str] = []
    while args and args[0] == "--allow" and len(args) > 1:
        allowed.append(args[1])
        args = args[2:]
    if not args or args[0] != "--":
        print("usage: python -m simulations.deploy.superlink_launcher [--allow IP]... -- FLOWER-SUPERLINK-ARGS",
              file=sys.stderr)
        return 2
    # uvicorn would take the client address from X-Forwarded-For when the env var lists the peer; the
    # guard must see the real TCP peer, so no proxy is trusted.
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    try:
        install_guard(tuple(allowed))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *args[1:]]
    return int(flower_superlink() or 0)


if __name__ == "__main__":
    sys.exit(main())
