"""What a shop keeps at home: its cached tensors and its private local part between rounds.

Which shop a node is: `partition-id` in node_config (simulation: an index into the scenario's
training shops) or `shop-dir` (deployment: the merchant's data directory). Tensors are built once
per process and reused every round. The local part (ID embeddings, task gates/towers, loss
weights) never leaves the shop. Within one run it lives in `context.state` as a named ArrayRecord;
when the shop has a state directory (its own disk: `state-dir` in deployment,
`<run-dir>/shop-state/<shop>/` in simulation) it is also saved there atomically after every round,
so it survives SuperNode restarts, interrupted runs and later runs. A corrupt or incompatible
state file is reported and replaced by a fresh local part, never fatal. The file also counts the
training rounds its local part has been through (`rounds_trained`, across runs), so an operator can
tell a carried-over local part from one that started afresh.

Resume safety: the file records the run (`run-dir`) and server round it belongs to, and the copy it
was trained from is kept as `local_part.prev.pt`. A round-r message of the same run never uses a
local part saved at round r or later (a shop can save round r and be killed before the coordinator
checkpoints round r): it rolls back to the previous copy, or refuses with `LocalPartMismatch` when
no copy matches. Temp files a killed writer left behind are removed when the shop's process starts.

In deployment every Flower message runs in a fresh process, so a merchant's tensors are also kept on
its own disk (`<state-dir>/cache/tensors-<key>.pt`, keyed by a hash of the shop's files, the feature
config and the tensor code): a message loads them instead of parsing and tensorising the shop. The
key itself is recomputed only when a shop file's name, size or mtime changes (`cache/key-index.json`).
`FEDSHOP_TENSOR_CACHE=0` turns this off; a corrupt cache file is reported and rebuilt.

A process that serves a shop again reuses its model (`Shop.round_model`, `client.model_cache`): the
local part and own encoder are then read from the state file only when the cache cannot prove it holds
what the file holds (a token of the file this process last wrote or read). A process whose contexts
drop the on-disk records after each message (the pool engine: `contexts_drop_disk_records`) also keeps
the saved local part and own encoder out of ``context.state``: the file and the cached model hold them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from client import model_cache
from client.merchant_policy import check_node, deployed, scenario_source
from shared.atomic import atomic_keep_copy, atomic_write, atomic_write_bytes, remove_stale_temps
from shared.features import FeatureConfig, ShopTensors, build_shop_tensors
from shared.model import ShopModel, build_model
from shared.scenario import Scenario, load_scenario
from shared.schema import ShopData, check_shop_name, load_shop_dir
from shared.settings import ShopRoundSettings

LOCAL_RECORD = "fedshop.local-part"  # name of the ArrayRecord in context.state
OWN_ENCODER_RECORD = "fedshop.own-encoder"  # the shop's encoder after its last local training (personal mix)
LINEAGE_RECORD = "fedshop.local-lineage"  # ConfigRecord in context.state: {ROUNDS_TRAINED: n}
ROUNDS_TRAINED = "rounds-trained"
STATE_FILE = "local_part.pt"
PREVIOUS_FILE = "local_part.prev.pt"  # the copy the current file was trained from (resume rollback)
# Keys of the lineage ConfigRecord besides ROUNDS_TRAINED: round and run of the local part now in the context.
SAVED_ROUND, SAVED_RUN = "saved-round", "saved-run"
# Lineage key: the own encoder of this message is the one of model-cache token N (not in the context).
OWN_IN_CACHE = "own-in-model-cache"
FORMAT_VERSION = 1
CACHE_DIR = "cache"  # below the state dir: tensors of the shop, rebuilt when its files change
CACHE_FORMAT = 1
CACHE_ENV = "FEDSHOP_TENSOR_CACHE"  # "0" turns the on-disk tensor cache off
KEY_INDEX = "key-index.json"  # in the cache dir: the last cache key and the file stats it was computed for
RACY_SECONDS = 2  # files modified more recently than this are hashed every time (mtime resolution)

logger = logging.getLogger(__name__)


@dataclass
class Shop:
    """One shop as its node sees it: name, index in the federation, scenario, tensors, state folder."""

    name: str
    index: int  # -1 when the operator gave none (deployment)
    scenario: Scenario
    tensors: ShopTensors
    state_dir: Path | None
    late_joiner: bool = False  # joins a running federation at the scenario's join_round

    def model(self) -> ShopModel:
        """A fresh model; its encoder is overwritten by the coordinator's, its local part by saved state."""
        return build_model(self.tensors, self.scenario.model, self.scenario.features, seed=self.scenario.seed)

    def round_model(self) -> ShopModel:
        """The model one message works on: this process's cached one (`client.model_cache`) or a fresh one.

        Load the received encoder in full and call `restore_local_part` before using it: only they make a
        cached model equal to a fresh model with the same state loaded.
        """
        return model_cache.checkout(self)


_SHOPS: dict[tuple, Shop] = {}  # per process: tensors are built once and reused every round


def kept_shops() -> list[Shop]:
    """The shops this process keeps (`resolve_shop`'s cache, at most `MAX_RUNS_KEPT` runs' worth)."""
    return list(_SHOPS.values())


def forget_shops() -> None:
    """Drop the per-process shops and their cached models, so a long-lived process reloads them for a new run."""
    _SHOPS.clear()
    model_cache.clear()


_DISK_ONLY = [False]  # set by `contexts_drop_disk_records`


def contexts_drop_disk_records(on: bool = True) -> None:
    """Declare that this process's contexts lose the on-disk records after every message (the pool's workers).

    Then `save_local_part` keeps a cached model's local part and own encoder only in the file and the
    model cache, not also as ArrayRecords in ``context.state`` that would be dropped unread.
    """
    _DISK_ONLY[0] = on


# Runs (scenario, seed, run-dir) whose shops a process keeps: a coordinator that varies seed or run-dir per message
# cannot grow a long-lived ClientApp's memory; a pool worker keeps every shop it serves in one run.
MAX_RUNS_KEPT = 4


def _late_joiners(scenario: Scenario, deployed: bool) -> set[str]:
    """Names of the scenario's late joiners; a deployed shop never builds or reads the scenario's own shops.

    Without a `[transfer] late_joiners` list the names come from the scenario's shops: in deployment only
    when they are merchant-held folders (`shop-dirs`, which a built-in scenario lists none of), never a
    synthetic world or a data set the coordinator's choice of scenario and seed would make the shop build.
    """
    if deployed and scenario.transfer.get("late_joiners") is None and scenario.data.get("source") != "shop-dirs":
        return set()
    return set(scenario.late_joiners)


def resolve_shop(context: Context, settings: ShopRoundSettings) -> Shop:
    """The shop this node serves, from node_config (`partition-id` or `shop-dir`) and the run's scenario.

    A deployed node (`shop-dir`) loads only what its merchant agreed to (`client.merchant_policy`): a built-in
    scenario or its pinned `allow-scenario-path`, and writes only below its own `state-dir`.
    """
    node = dict(context.node_config)
    scenario_ref, run_dir, seed = settings.scenario, settings.run_dir, settings.seed
    key = (scenario_ref, seed, node.get("partition-id"), node.get("shop-dir"), node.get("state-dir"), run_dir)
    if key in _SHOPS:
        _SHOPS[key] = _SHOPS.pop(key)  # most recently used last
        return _SHOPS[key]
    check_node(node)  # the merchant policy mod refused such a message already: this holds on every path
    source_ref = scenario_source(scenario_ref, node)
    scenario = load_scenario(source_ref, {"seed": seed} if seed >= 0 else None)  # -1: the scenario's own seed
    source: Path | ShopData
    if node.get("shop-dir"):
        source, index = Path(str(node["shop-dir"])), int(node.get("shop-index", -1))
    elif "partition-id" in node:
        index = int(node["partition-id"])
        shops = scenario.federation_shops()
        if not 0 <= index < len(shops):
            raise ValueError(f"node_config partition-id={index} but scenario '{scenario.name}' has "
                             f"{len(shops)} federation shops. Fix: run with num-supernodes={len(shops)}")
        source = shops[index]
    else:
        raise ValueError("node_config names no shop. Fix: pass --node-config \"shop-dir='/path/to/shop'\" "
                         "(deployment) or run under the simulation engine (partition-id)")
    state_dir = Path(str(node["state-dir"])) if node.get("state-dir") else None
    if isinstance(source, Path) and state_dir is not None and os.environ.get(CACHE_ENV, "1") != "0":
        tensors = cached_shop_tensors(source, state_dir, scenario.features)
    else:
        data = load_shop_dir(source) if isinstance(source, Path) else source
        tensors = build_shop_tensors(data, scenario.features)
    if state_dir is None and run_dir and not deployed(node):  # simulation: the run's folder holds shop state
        state_dir = Path(run_dir) / "shop-state" / check_shop_name(tensors.name, "shop name")  # no path escape
    if state_dir is not None:  # once per process: what a killed writer left half-written
        for folder in (state_dir, state_dir / CACHE_DIR):
            for path in remove_stale_temps(folder):
                logger.warning("removed %s, a temp file left by an interrupted write", path)
    shop = Shop(tensors.name, index, scenario, tensors, state_dir,
                late_joiner=tensors.name in _late_joiners(scenario, deployed(node)))
    _SHOPS[key] = shop
    runs = list(dict.fromkeys((k[0], k[1], k[5]) for k in _SHOPS))  # least recently used first
    for old in runs[:-MAX_RUNS_KEPT]:
        for k in [k for k in _SHOPS if (k[0], k[1], k[5]) == old]:
            del _SHOPS[k]
    return shop


def _code_and_config_digest(features: FeatureConfig) -> Any:
    """A sha256 over the cache format, the feature config and the source of the code that builds tensors."""
    import shared.features
    import shared.schema

    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "features": dataclasses.asdict(features)},
                                       sort_keys=True).encode())
    for module in (shared.schema, shared.features):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest


def _shop_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _stat_fingerprint(shop_dir: Path, features: FeatureConfig) -> tuple[str, bool]:
    """Hash of the shop files' names, sizes and mtimes, the feature config and the tensor code.

    Also says whether every file is older than ``RACY_SECONDS``: a file written within the mtime
    clock's resolution of the fingerprint could change again without changing its stat.
    """
    root = Path(shop_dir).resolve()
    digest = _code_and_config_digest(features)
    settled, now = True, time.time_ns()
    for path in _shop_files(root):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        settled = settled and now - stat.st_mtime_ns > RACY_SECONDS * 1_000_000_000
    return digest.hexdigest(), settled


def indexed_tensor_cache_key(shop_dir: Path, state_dir: Path, features: FeatureConfig) -> str:
    """`tensor_cache_key`, read from ``<state_dir>/cache/key-index.json`` while no shop file changed stat.

    Hashing every byte of the shop on every message (each one a fresh process in deployment) costs about
    0.8 s per GB on the 2-core test machine; like git's index, a file whose name, size and mtime are
    unchanged is taken as unchanged.
    Files written in the last ``RACY_SECONDS`` are not trusted to that rule, so the index is not saved.
    """
    index = Path(state_dir) / CACHE_DIR / KEY_INDEX
    fingerprint, settled = _stat_fingerprint(shop_dir, features)
    try:
        saved = json.loads(index.read_text())
        if saved.get("fingerprint") == fingerprint and isinstance(saved.get("key"), str):
            return saved["key"]
    except (OSError, ValueError, AttributeError):
        pass  # absent, unreadable or foreign: recompute
    key = tensor_cache_key(shop_dir, features)
    if settled:
        atomic_write_bytes(index, json.dumps({"fingerprint": fingerprint, "key": key}).encode())
    return key


def tensor_cache_key(shop_dir: Path, features: FeatureConfig) -> str:
    """Hash of the shop's files (names and contents), the feature config and the code that builds tensors.

    The code is hashed from the source of `shared.schema` and `shared.features` rather than taken from
    the package version, so an edited feature pipeline never reuses tensors built by the old one.
    """
    digest = _code_and_config_digest(features)
    root = Path(shop_dir).resolve()
    for path in _shop_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:32]


_CACHED_FIELDS = [f.name for f in dataclasses.fields(ShopTensors) if f.name not in ("source", "cfg")]


def cached_shop_tensors(shop_dir: Path, state_dir: Path, features: FeatureConfig) -> ShopTensors:
    """The shop's tensors from ``<state_dir>/cache`` when its files are unchanged, else built and cached.

    Saves each fresh ClientApp process the parsing, validation and tensorising of the shop. The cached
    tensors carry no raw rows (``source`` is None). A corrupt file logs a warning and is rebuilt.
    """
    path = Path(state_dir) / CACHE_DIR / f"tensors-{indexed_tensor_cache_key(shop_dir, state_dir, features)}.pt"
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {payload.get('format')!r}")
            return ShopTensors(**{name: payload[name] for name in _CACHED_FIELDS}, source=None, cfg=features)
        except Exception as exc:  # truncated or foreign file: torch and our checks raise many types
            logger.warning("tensor cache %s is unreadable (%s); rebuilding it from %s", path,
                           type(exc).__name__, shop_dir)
    tensors = build_shop_tensors(load_shop_dir(shop_dir), features)
    buf = io.BytesIO()
    torch.save({"format": CACHE_FORMAT, **{name: getattr(tensors, name) for name in _CACHED_FIELDS}}, buf)
    for old in path.parent.glob("tensors-*.pt") if path.parent.exists() else []:
        if old != path:
            old.unlink(missing_ok=True)  # an older version of the shop or of fedshop
    atomic_write_bytes(path, buf.getvalue())
    return tensors


def _compatible(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """None if ``state`` fits ``expected`` (a module's state dict), else what differs (keys or shapes)."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            return f"'{key}' has shape {tuple(state[key].shape)}, the model needs {tuple(value.shape)}"
    return None


class LocalPartMismatch(RuntimeError):
    """No saved local part matches the round the coordinator resumes from; the message says the fix."""


def _read_payload(path: Path, *, fallback: str = "starting a fresh local part") -> dict | None:
    """The payload saved at ``path``; None (with a warning) when absent, corrupt or foreign."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        logger.warning("%s is unreadable (%s); %s. Fix: delete the file if this repeats", path,
                       type(exc).__name__, fallback)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        logger.warning("%s is not a fedshop local-part file of format %d; %s", path, FORMAT_VERSION, fallback)
        return None
    return payload


def rounds_trained(context: Context) -> int:
    """Training rounds the local part now in ``context`` has been through (0 for a fresh one)."""
    if LINEAGE_RECORD not in context.state.config_records:
        return 0
    return int(context.state.config_records[LINEAGE_RECORD].get(ROUNDS_TRAINED, 0))


def write_state_file(state_dir: Path, model: ShopModel, *, shop: str, server_round: int,
                     trained: int = 0, own_encoder: dict[str, torch.Tensor] | None = None, run: str = "",
                     parent: str = "fresh", on_written: Callable[[os.stat_result], None] | None = None) -> Path:
    """Save the model's local part (and how many rounds it has trained) to ``state_dir`` atomically.

    ``own_encoder`` (the shop's post-training encoder, kept when the personal mix is on) goes into
    the same file, so the two can never come from different rounds. ``run`` and ``server_round`` say
    which run and round the part belongs to; ``parent`` is "file" when the part it was trained from
    is `PREVIOUS_FILE`, "fresh" when it started from a fresh one. ``on_written`` gets the temp file's
    stat once its bytes are written (before the fsync and rename; the model cache's file token).
    """
    payload = {"format": FORMAT_VERSION, "shop": shop, "round": server_round, "rounds_trained": trained,
               "run": run, "parent": parent, "local": model.local_state()}
    if own_encoder is not None:
        payload["own_encoder"] = own_encoder

    def write(fh: io.BufferedWriter) -> None:
        torch.save(payload, fh)  # straight into the temp file: no 7 MB in-memory copy first
        fh.flush()
        if on_written is not None:
            on_written(os.fstat(fh.fileno()))

    return atomic_write(Path(state_dir) / STATE_FILE, write)


def _landed(path: Path, written: list[os.stat_result]) -> tuple[int, ...] | None:
    """The identity of ``path`` if it is still the file whose temp stat ``written`` holds (same inode, size, mtime)."""
    now = model_cache.file_identity(path)
    if not written or now is None:
        return None
    st = written[-1]
    return now if now[:4] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) else None


# How the next save treats the files (lineage key KEEP): the loaded part is STATE_FILE, so it becomes
# PREVIOUS_FILE ("rotate"); it is PREVIOUS_FILE already ("previous"); or it was fresh ("none").
KEEP, ROTATE, PREVIOUS, NONE = "keep", "rotate", "previous", "none"


@dataclass
class _Candidate:
    source: str  # context | disk | disk-previous
    state: dict[str, torch.Tensor]
    trained: int
    saved_round: int
    run: str
    keep: str
    payload: dict | None = None  # the file's payload (its own encoder comes with it)
    identity: tuple[int, ...] | None = None  # `STATE_FILE`'s identity before it was read (source "disk")
    token: model_cache.DiskToken | None = None  # the cached model already holds this file's part


def _too_new(saved_run: str, saved_round: int, run: str, newest: int | None) -> bool:
    """Whether a part was saved in this run at a round the coordinator is about to redo."""
    return newest is not None and bool(run) and saved_run == run and saved_round > newest


def _from_file(payload: dict, source: str, keep: str) -> _Candidate:
    return _Candidate(source, dict(payload["local"]), int(payload.get("rounds_trained", 0)),
                      int(payload.get("round", 0)), str(payload.get("run", "")), keep, payload)


def _describe(payload: dict | None, path: Path) -> str:
    if payload is None:
        return f"{path} is missing or unreadable"
    return f"{path} holds round {payload.get('round')} of this run"


def _disk_candidate(state_dir: Path, run: str, newest: int | None) -> _Candidate | None:
    """The state-dir part a round may use: the current file, else the copy it was trained from.

    Raises `LocalPartMismatch` when both belong to rounds of this run that the coordinator redoes.
    """
    current_path, previous_path = Path(state_dir) / STATE_FILE, Path(state_dir) / PREVIOUS_FILE
    if not current_path.exists():  # killed between keeping the previous copy and writing the new one
        previous = _read_payload(previous_path)
        if previous is None or _too_new(str(previous.get("run", "")), int(previous.get("round", 0)), run, newest):
            return None
        return _from_file(previous, "disk-previous", PREVIOUS)
    identity = model_cache.file_identity(current_path)  # before the read: a change during it shows later
    current = _read_payload(current_path)
    if current is None:
        return None
    if not _too_new(str(current.get("run", "")), int(current.get("round", 0)), run, newest):
        found = _from_file(current, "disk", ROTATE)
        found.identity = identity
        return found
    if current.get("parent") != "file":  # its round started from a fresh part: so does the redone round
        logger.warning("%s was saved in round %s, after the round the coordinator resumes from; this shop "
                       "restarts that round from a fresh local part, as it did then", current_path,
                       current.get("round"))
        return None
    previous = _read_payload(previous_path, fallback="cannot roll back to it")
    if previous is not None and not _too_new(str(previous.get("run", "")), int(previous.get("round", 0)), run,
                                             newest):
        logger.warning("%s was saved in round %s, after the round the coordinator resumes from; rolling back "
                       "to %s (round %s)", current_path, current.get("round"), previous_path, previous.get("round"))
        return _from_file(previous, "disk-previous", PREVIOUS)
    raise LocalPartMismatch(
        f"{_describe(current, current_path)} and {_describe(previous, previous_path)}, but the coordinator "
        f"resumes this run needing a local part of round {newest} or earlier: no saved copy matches its "
        "checkpoint (only one previous round is kept). Fix: resume from the run's newest checkpoint, or "
        f"delete {current_path} and {previous_path} to restart this shop's local part fresh")


def restore_local_part(model: ShopModel, context: Context, state_dir: Path | None, *, server_round: int = 0,
                       run: str = "", training: bool = True) -> str:
    """Load the shop's saved local part into ``model``; returns where it came from.

    Sources: "context", "disk" (`STATE_FILE`), "disk-previous" (`PREVIOUS_FILE`, a rollback) or "fresh".
    With ``server_round`` > 0 and a ``run`` key (the run directory), a part this run saved at round
    ``server_round`` or later (training) or after it (evaluation) is never used: the coordinator
    resumed from an earlier checkpoint, so the shop rolls back with it.
    """
    newest = None if server_round <= 0 else (server_round - 1 if training else server_round)

    def candidates() -> Iterator[_Candidate]:
        # The disk file is read only when the context holds no usable local part (a fresh process).
        if LOCAL_RECORD in context.state.array_records:
            lineage = dict(context.state.config_records.get(LINEAGE_RECORD, {}))
            saved_round, saved_run = int(lineage.get(SAVED_ROUND, 0)), str(lineage.get(SAVED_RUN, ""))
            if not _too_new(saved_run, saved_round, run, newest):
                yield _Candidate("context", dict(context.state.array_records[LOCAL_RECORD].to_torch_state_dict()),
                                 rounds_trained(context), saved_round, saved_run, str(lineage.get(KEEP, ROTATE)))
        if state_dir is not None:
            # A cached model that provably holds the current file's part needs no read: the same rules
            # (`_disk_candidate`: the current file, unless this run saved it at a round being redone) on
            # the file's metadata, kept with the token.
            token = model_cache.disk_token(model, Path(state_dir) / STATE_FILE)
            if token is not None and not _too_new(str(token.meta.get("run", "")), int(token.meta.get("round", 0)),
                                                  run, newest):
                yield _Candidate("disk", {}, int(token.meta.get("rounds_trained", 0)), int(token.meta.get("round", 0)),
                                 str(token.meta.get("run", "")), ROTATE, token=token)
                return
            found = _disk_candidate(Path(state_dir), run, newest)
            if found is not None:
                yield found

    for cand in candidates():
        lineage = {ROUNDS_TRAINED: cand.trained, SAVED_ROUND: cand.saved_round, SAVED_RUN: cand.run, KEEP: cand.keep}
        if cand.token is not None:  # the file is the one the cache copied: load the copy instead of reading it
            model_cache.load_token(model, cand.token)
            if cand.token.own is not None:
                lineage[OWN_IN_CACHE] = cand.token.serial
            context.state.pop(OWN_ENCODER_RECORD, None)
            context.state[LINEAGE_RECORD] = ConfigRecord(lineage)
            return cand.source
        problem = _compatible(model.local.state_dict(), cand.state)
        if problem is None:
            model.load_local_state(cand.state)
            model_cache.restored(model)
            own = cand.payload.get("own_encoder") if cand.payload is not None else None
            token = None
            if cand.identity is not None:  # read from `STATE_FILE`: the cache keeps what it held
                token = model_cache.note_file(model, Path(str(state_dir)) / STATE_FILE, cand.identity, cand.payload,
                                              cand.state, own)
            else:
                model_cache.forget_file(model)
            if own is not None and token is not None:  # kept by the cache: no ArrayRecord round trip
                lineage[OWN_IN_CACHE] = token.serial
                context.state.pop(OWN_ENCODER_RECORD, None)
            elif own is not None:  # same file, same round
                context.state[OWN_ENCODER_RECORD] = ArrayRecord(dict(own))
            elif cand.payload is not None:
                context.state.pop(OWN_ENCODER_RECORD, None)
            context.state[LINEAGE_RECORD] = ConfigRecord(lineage)
            return cand.source
        where = (Path(state_dir) / (PREVIOUS_FILE if cand.source == "disk-previous" else STATE_FILE)
                 if cand.payload is not None else f"context.state['{LOCAL_RECORD}']")
        logger.warning("saved local part in %s does not fit this shop's model: %s; starting a fresh local "
                       "part. Fix: delete it if the shop's data or model settings changed on purpose",
                       where, problem)
    model_cache.reset_local_if_used(model)  # a cached model's local part may hold a trained one
    context.state[LINEAGE_RECORD] = ConfigRecord({ROUNDS_TRAINED: 0, KEEP: NONE})
    context.state.pop(OWN_ENCODER_RECORD, None)
    return "fresh"


def save_local_part(model: ShopModel, context: Context, state_dir: Path | None, *, shop: str,
                    server_round: int, keep_own_encoder: bool = False, run: str = "") -> None:
    """Keep the local part in ``context.state`` and, when the shop has one, in its state directory.

    Call after one round of training on a local part loaded by `restore_local_part`: its lineage
    count goes up by one. With ``keep_own_encoder`` the model's encoder is kept beside it (the
    personal mix starts the next round from it and evaluates with it); it never leaves the shop.
    The part it was trained from is kept as `PREVIOUS_FILE`, so a resumed run can roll back to it.
    """
    lineage = dict(context.state.config_records.get(LINEAGE_RECORD, {}))
    keep = str(lineage.get(KEEP, NONE))
    trained = rounds_trained(context) + 1
    own = model.encoder_state() if keep_own_encoder else None
    if own is None and OWN_IN_CACHE in lineage:  # as before: a restored own encoder stays in the context
        context.state[OWN_ENCODER_RECORD] = ArrayRecord(model_cache.own_encoder(model, int(lineage[OWN_IN_CACHE])))
    # The pool drops these records after the message; the file and the cached model hold them.
    disk_only = _DISK_ONLY[0] and state_dir is not None and model_cache.is_cached(model)
    if disk_only:
        context.state.pop(LOCAL_RECORD, None)
    else:
        context.state[LOCAL_RECORD] = ArrayRecord(model.local_state())
        if own is not None:
            context.state[OWN_ENCODER_RECORD] = ArrayRecord(own)
    saved = {ROUNDS_TRAINED: trained, SAVED_ROUND: server_round, SAVED_RUN: run, KEEP: ROTATE}
    context.state[LINEAGE_RECORD] = ConfigRecord(saved)
    if state_dir is None:
        return
    if keep == ROTATE:  # the part trained from is the current file: keep it as the previous copy
        try:  # a copy, not a rename: a kill before the new file lands leaves the current one in place
            atomic_keep_copy(Path(state_dir) / STATE_FILE, Path(state_dir) / PREVIOUS_FILE)
        except FileNotFoundError:
            pass
    written: list[os.stat_result] = []
    parent = "fresh" if keep == NONE else "file"
    path = write_state_file(state_dir, model, shop=shop, server_round=server_round, trained=trained, own_encoder=own,
                            run=run, parent=parent, on_written=written.append)
    meta = {"format": FORMAT_VERSION, "shop": shop, "round": server_round, "rounds_trained": trained, "run": run,
            "parent": parent}
    token = model_cache.note_file(model, Path(state_dir) / STATE_FILE, _landed(Path(path), written), meta,
                                  model.local.state_dict(), own)
    if disk_only and own is not None:
        if token is not None:
            context.state.pop(OWN_ENCODER_RECORD, None)
            context.state[LINEAGE_RECORD] = ConfigRecord({**saved, OWN_IN_CACHE: token.serial})
        else:  # the file changed under us: nothing proven, keep the own encoder in the context after all
            context.state[OWN_ENCODER_RECORD] = ArrayRecord(own)


def restore_own_encoder(model: ShopModel, context: Context) -> dict[str, torch.Tensor] | None:
    """The shop's encoder after its last local training (personal mix), or None when it has none that fits.

    Call after `restore_local_part`, which brings a saved one from the state file into ``context`` (or,
    for a cached model, names the model cache's copy in the lineage record).
    """
    if OWN_ENCODER_RECORD in context.state.array_records:
        state = dict(context.state.array_records[OWN_ENCODER_RECORD].to_torch_state_dict())
    elif OWN_IN_CACHE in context.state.config_records.get(LINEAGE_RECORD, {}):
        serial = int(context.state.config_records[LINEAGE_RECORD][OWN_IN_CACHE])
        state = model_cache.own_encoder(model, serial)
    else:
        return None
    problem = _compatible(model.encoder.state_dict(), state)
    if problem is None:
        return state
    logger.warning("saved own encoder does not fit this shop's model (%s); the round starts from the global "
                   "encoder alone", problem)
    return None
