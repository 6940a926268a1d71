"""Coordinator checkpoints: global arrays, round, strategy state, RNG state and each shop's first
`num-examples` claim (the base of its cap, `server.robust`), leave-one-out history, sudden-turn levels and the
node <-> shop-index bindings (`server.node_identity.ShopClaims`), written atomically in one file.

One file per round in `<run-dir>/checkpoints/round-NNNN.pt` (older ones pruned); a run resumes
from the newest readable one and refuses when none is readable. Temp files a killed write left are
removed at the next start (`remove_orphans`). Saved with `torch.save` holding only tensors and plain Python values, so
`torch.load(weights_only=True)` reads it back without executing pickled code.
"""

from __future__ import annotations

import io
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.robust import LooEntry, TurnLevel, split_entry
from shared.atomic import atomic_write_bytes, remove_stale_temps

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^round-(\d{4,})\.pt$")
# Attributes Flower strategies keep between rounds that hold arrays (FedOpt moments, FedAvgM momentum).
# `current_arrays` is re-set from the global arrays at every configure_train, so it is not state.
_TRANSIENT_ATTRS = {"current_arrays"}

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match this run's settings; the message says the fix."""


@dataclass
class Checkpoint:
    """Everything needed to continue a run after round ``server_round``."""

    server_round: int
    arrays: dict[str, np.ndarray]  # the global record sent to shops (encoder, plus shared heads if any)
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # what must not change on resume
    # shop -> its first accepted num-examples claim: without it a resumed run would let a shop claim anew
    first_claims: dict[str, float] = field(default_factory=dict)
    # shop -> its leave-one-out [cosine, round weight] per screened round (`server.robust`), the reputation a
    # resume continues; a bare cosine (checkpoints before 2026-12-06) weighs 1
    loo_history: dict[str, list[LooEntry]] = field(default_factory=dict)
    # shop -> its pre-turn [cosine, consensus] level while out for a sudden turn (`server.robust.judge_loo`);
    # absent in checkpoints written before the check existed: no shop turned
    loo_turns: dict[str, TurnLevel] = field(default_factory=dict)
    # shop-index -> (node ID, its public-key fingerprint or "") bound in the run so far (`ShopClaims.export`): a
    # resumed run holds them from the start; absent in checkpoints written before they were saved: none
    shop_bindings: dict[int, tuple[int, str]] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states (Flower samples shops with Python's `random`)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), np_pos, np_has_gauss,
                      np_cached],
            "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    if "python" in state:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])


LIST_MARK = "#"  # key prefix of a list-valued state (FedAvgM's momentum) stored as a dict


def strategy_state(strategy: object) -> dict[str, dict[str, np.ndarray]]:
    """Array-valued state of a Flower strategy (FedAdam's m_t and v_t, FedAvgM's momentum); empty if none."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, value in vars(strategy).items():
        if name in _TRANSIENT_ATTRS or not value:
            continue
        if isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
            out[name] = {f"{LIST_MARK}{i}": np.array(v, copy=True) for i, v in enumerate(value)}
        elif isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                             for k, v in value.items()):
            out[name] = {k: np.array(v, copy=True) for k, v in value.items()}
    return out


def load_strategy_state(strategy: object, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put array-valued state back on a freshly built strategy of the same kind."""
    for name, arrays in state.items():
        if not hasattr(strategy, name):
            raise CheckpointError(f"checkpoint holds strategy state '{name}' that "
                                  f"{type(strategy).__name__} does not have. Fix: resume with the "
                                  "strategy the run started with")
        if arrays and all(k.startswith(LIST_MARK) for k in arrays):
            ordered = sorted(arrays, key=lambda k: int(k[len(LIST_MARK):]))
            setattr(strategy, name, [np.array(arrays[k], copy=True) for k in ordered])
        else:
            setattr(strategy, name, {k: np.array(v, copy=True) for k, v in arrays.items()})


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """Where round ``server_round``'s checkpoint lives."""
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:04d}.pt"


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, *, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically and prune all but the newest ``keep`` checkpoints."""
    payload = {"format": FORMAT_VERSION, "round": ckpt.server_round, "arrays": _tensors(ckpt.arrays),
               "strategy": {n: _tensors(a) for n, a in ckpt.strategy_state.items()},
               "rng": ckpt.rng, "settings": ckpt.settings,
               "first_claims": {str(k): float(v) for k, v in ckpt.first_claims.items()},
               "loo_history": {str(k): [list(split_entry(x)) for x in v] for k, v in ckpt.loo_history.items()},
               "loo_turns": {str(k): [float(x) for x in v] for k, v in ckpt.loo_turns.items()},
               # node IDs are unsigned 64-bit: kept as text
               "shop_bindings": {str(i): [str(node), str(key)] for i, (node, key) in ckpt.shop_bindings.items()}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = atomic_write_bytes(checkpoint_path(run_dir, ckpt.server_round), buf.getvalue())
    for old in list_checkpoints(run_dir)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}). Fix: delete it to "
                              "resume from the previous round's checkpoint, or start a new run") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a fedshop checkpoint of format {FORMAT_VERSION}. "
                              "Fix: resume only run directories written by this version")
    return Checkpoint(server_round=int(payload["round"]),
                      arrays={k: v.numpy() for k, v in payload["arrays"].items()},
                      strategy_state={n: {k: v.numpy() for k, v in a.items()}
                                      for n, a in payload["strategy"].items()},
                      rng=payload["rng"], settings=payload["settings"],
                      first_claims=_first_claims(path, payload.get("first_claims", {})),
                      loo_history=_loo_history(path, payload.get("loo_history", {})),
                      loo_turns=_loo_turns(path, payload.get("loo_turns", {})),
                      shop_bindings=_shop_bindings(path, payload.get("shop_bindings", {})))


def _first_claims(path: Path, raw: object) -> dict[str, float]:
    """The checkpoint's first claims (absent in checkpoints written before they were saved: none)."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                                            for k, v in raw.items()):
        raise CheckpointError(f"{path}: its first_claims are not a table of shop -> claim. Fix: delete it to "
                              "resume from the previous round's checkpoint, or start a new run")
    return {k: float(v) for k, v in raw.items()}


def _loo_history(path: Path, raw: object) -> dict[str, list[LooEntry]]:
    """The checkpoint's leave-one-out history (absent in checkpoints written before it was saved: none; bare
    cosines, written before rounds were weighted, weigh 1)."""
    def entry_ok(x: object) -> bool:
        return isinstance(x, (int, float)) or (isinstance(x, list) and len(x) == 2
                                               and all(isinstance(y, (int, float)) for y in x))

    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, list) and all(map(entry_ok, v))
                                            for k, v in raw.items()):
        raise CheckpointError(f"{path}: its loo_history is not a table of shop -> list of [cosine, weight]. Fix: "
                              "delete it to resume from the previous round's checkpoint, or start a new run")
    return {k: [list(split_entry(x)) for x in v] for k, v in raw.items()}


def _loo_turns(path: Path, raw: object) -> dict[str, TurnLevel]:
    """The checkpoint's sudden-turn levels (absent in checkpoints written before the check existed: none)."""
    def level_ok(x: object) -> bool:
        return isinstance(x, list) and len(x) == 2 and all(isinstance(y, (int, float)) for y in x)

    if not isinstance(raw, dict) or not all(isinstance(k, str) and level_ok(v) for k, v in raw.items()):
        raise CheckpointError(f"{path}: its loo_turns are not a table of shop -> [cosine, consensus]. Fix: delete it "
                              "to resume from the previous round's checkpoint, or start a new run")
    return {k: [float(y) for y in v] for k, v in raw.items()}


def _shop_bindings(path: Path, raw: object) -> dict[int, tuple[int, str]]:
    """The checkpoint's shop-index bindings (absent in checkpoints written before they were saved: none)."""
    def ok(index: object, value: object) -> bool:
        return (isinstance(index, str) and index.isdigit() and isinstance(value, list) and len(value) == 2
                and isinstance(value[0], str) and value[0].isdigit() and isinstance(value[1], str))

    if not isinstance(raw, dict) or not all(ok(i, v) for i, v in raw.items()):
        raise CheckpointError(f"{path}: its shop_bindings are not a table of shop-index -> [node ID, key "
                              "fingerprint]. Fix: delete it to resume from the previous round's checkpoint, or start "
                              "a new run")
    nodes, keys = [v[0] for v in raw.values()], [v[1] for v in raw.values() if v[1]]
    if len(set(nodes)) != len(nodes) or len(set(keys)) != len(keys):
        raise CheckpointError(f"{path}: its shop_bindings bind one node or key to two shop-indexes. Fix: delete it to "
                              "resume from the previous round's checkpoint, or start a new run")
    return {int(i): (int(v[0]), v[1]) for i, v in raw.items()}


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint of a run; None when it has none.

    A corrupt newest one is skipped with a warning. When every checkpoint is unreadable this raises
    instead of returning None: resuming from round 1 would pair a fresh encoder with local parts the
    shops trained rounds later.
    """
    paths = list_checkpoints(run_dir)
    for path in reversed(paths):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("%s; trying the previous checkpoint", exc)
    if paths:
        raise CheckpointError(f"every checkpoint of {run_dir} is unreadable: {', '.join(p.name for p in paths)} "
                              f"in {paths[0].parent}. Fix: restore one from a backup and resume, or start a new "
                              "run directory (resuming this one from round 1 would mix a fresh encoder with "
                              "local parts trained later)")
    return None


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete temp files a killed coordinator left in the run dir and its checkpoint folder.

    Call when the coordinator starts, before it writes anything: it is the only writer there.
    """
    run_dir = Path(run_dir)
    removed = remove_stale_temps(run_dir) + remove_stale_temps(run_dir / CHECKPOINT_DIR)
    for path in removed:
        logger.warning("removed %s, a temp file left by an interrupted write", path)
    return removed


def check_settings(ckpt: Checkpoint, settings: dict[str, Any]) -> None:
    """Refuse to resume when a setting that shapes the model or the aggregation has changed."""
    for key, value in settings.items():
        if key in ckpt.settings and ckpt.settings[key] != value:
            raise CheckpointError(f"checkpoint of round {ckpt.server_round} was written with {key}="
                                  f"{ckpt.settings[key]!r} but this run has {key}={value!r}. Fix: resume "
                                  "with the run's original settings, or start a new run directory")
