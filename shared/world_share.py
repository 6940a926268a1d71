"""The synthetic world, built once by the driver and read by every simulated shop's process.

Without it each Ray actor (and each process of a multi-node run) regenerates the whole synthetic
world from its settings: seconds of CPU per process, the same result every time. The driver pickles
the world it built into the run directory (`world-<key>.pkl`, written atomically: temp file + rename)
and exports `FEDSHOP_SHARED_WORLD` as JSON `{"path", "key", "sha256"}`; child processes inherit it.

A reader uses the file only when the world key it computed from its own scenario equals the key in
the variable (else it was built for other settings: rebuild, logged) and the file's sha256 equals the
recorded one (else it was changed or damaged after writing: rebuild with a warning). The hash is
checked before the bytes are unpickled, so a tampered file is never loaded. A missing or unreadable
file also means rebuild with a warning. `FEDSHOP_WORLD_CACHE=0` turns sharing off on both sides.

A multi-node Ray run (`--ray-address`) also serves the bytes from a named Ray actor (`serve_over_ray`,
named by the descriptor's "ray_holder"): a worker on a node that cannot see the file's path fetches
them through Ray's object store instead, under the same sha256 check (logged at INFO).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write_bytes
from shared.timing_log import record

SHARED_ENV = "FEDSHOP_SHARED_WORLD"  # JSON {"path", "key", "sha256"[, "ray_holder"]} set by the driver
HOLDER_PREFIX = "fedshop-world-"  # name of the Ray actor that serves the world's bytes to other nodes
CACHE_ENV = "FEDSHOP_WORLD_CACHE"  # "0" turns sharing off
WORLD_FORMAT = 1  # bump when the pickled payload's shape changes

logger = logging.getLogger(__name__)


def sharing_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether world sharing is on (`FEDSHOP_WORLD_CACHE` is not "0")."""
    env = os.environ if environ is None else environ
    return env.get(CACHE_ENV, "1").strip() != "0"


def world_file(run_dir: str | Path, key: str) -> Path:
    """Where the driver writes the world of ``key`` inside ``run_dir``."""
    return Path(run_dir) / f"world-{key[:16]}.pkl"


def write_shared_world(shops: Any, run_dir: str | Path, key: str) -> dict[str, str]:
    """Pickle ``shops`` into ``run_dir`` atomically; returns the descriptor to export in `FEDSHOP_SHARED_WORLD`."""
    blob = pickle.dumps({"format": WORLD_FORMAT, "key": key, "shops": shops}, protocol=pickle.HIGHEST_PROTOCOL)
    path = atomic_write_bytes(world_file(run_dir, key), blob)
    return {"path": str(path.resolve()), "key": key, "sha256": hashlib.sha256(blob).hexdigest()}


def read_shared_world(key: str, environ: dict[str, str] | None = None) -> Any | None:
    """The shops the driver shared for world ``key``, or None (rebuild) when off, absent, stale or tampered."""
    env = os.environ if environ is None else environ
    raw = env.get(SHARED_ENV)
    if not raw or not sharing_enabled(env):
        return None
    try:
        desc = json.loads(raw)
        path, want_key, want_sha = Path(desc["path"]), str(desc["key"]), str(desc["sha256"])
    except (ValueError, KeyError, TypeError):
        logger.warning("%s is not valid JSON with path, key and sha256; building the world here", SHARED_ENV)
        return None
    if want_key != key:
        logger.info("shared world %s is for other settings (key %s, need %s); building the world here",
                    path, want_key[:12], key[:12])
        return None
    try:
        blob = path.read_bytes()
    except OSError as exc:
        blob = _blob_from_ray(desc.get("ray_holder"))
        if blob is None:
            logger.warning("shared world %s cannot be read (%s); building the world here", path, exc)
            return None
        logger.info("shared world %s is not on this node (%s); read it from Ray actor %s",
                    path, exc, desc["ray_holder"])
        source = "ray"
    else:
        source = "file"
    if hashlib.sha256(blob).hexdigest() != want_sha:
        logger.warning("shared world %s does not match its recorded sha256 (changed after it was written); "
                       "not loading it, building the world here", path)
        return None
    payload = pickle.loads(blob)  # noqa: S301 - the bytes are exactly those this run's driver wrote (sha256 above)
    if payload.get("format") != WORLD_FORMAT or payload.get("key") != key:
        logger.warning("shared world %s has another format or key; building the world here", path)
        return None
    record({"where": "shared-world", "source": source, "pid": os.getpid(), "bytes": len(blob)})  # opt-in log
    return payload["shops"]


def _blob_from_ray(holder: str | None) -> bytes | None:
    """The world's bytes from the named Ray actor ``holder``, or None outside a Ray worker or when it fails."""
    if not holder or "ray" not in sys.modules:  # never start Ray here: only a process already in it may ask
        return None
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get(ray.get_actor(holder).blob.remote(), timeout=300)
    except Exception as exc:  # noqa: BLE001 - any Ray failure means: build the world here (logged)
        logger.warning("shared world: Ray actor %s did not answer (%s)", holder, exc)
        return None


def with_ray_holder(descriptor: dict[str, str] | None) -> dict[str, str] | None:
    """``descriptor`` naming the Ray actor that will serve its bytes (`serve_over_ray`); None stays None."""
    if descriptor is None:
        return None
    return {**descriptor, "ray_holder": HOLDER_PREFIX + descriptor["key"][:16]}


def serve_over_ray(descriptor: dict[str, str]) -> Any:
    """Start the named, zero-CPU Ray actor ``descriptor["ray_holder"]`` holding the world file's bytes.

    Call from the driver once Ray runs (`ray.init` joined a cluster) and keep the returned handle for
    the run: Ray ends a (non-detached) actor once its last handle is gone, named or not. Readers still
    check the bytes against the descriptor's sha256.
    """
    import ray

    @ray.remote(num_cpus=0)
    class WorldHolder:
        """Holds one pickled world for workers that cannot read the driver's file."""

        def __init__(self, blob: bytes) -> None:
            self._blob = blob

        def blob(self) -> bytes:
            return self._blob

    holder = WorldHolder.options(name=descriptor["ray_holder"]).remote(Path(descriptor["path"]).read_bytes())
    ray.get(holder.blob.remote())  # ready before any shop asks (and fails here, loudly, if it cannot start)
    return holder


@contextlib.contextmanager
def shared_world_env(descriptor: dict[str, str] | None) -> Iterator[None]:
    """Export ``descriptor`` as `FEDSHOP_SHARED_WORLD` for the block (processes started in it inherit it)."""
    if descriptor is None:
        yield
        return
    before = os.environ.get(SHARED_ENV)
    os.environ[SHARED_ENV] = json.dumps(descriptor)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SHARED_ENV, None)
        else:
            os.environ[SHARED_ENV] = before
