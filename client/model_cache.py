"""Per-process cache of built shop models, so a process that serves a shop again reuses its model.

A pool worker (and a Ray actor, a long-lived deployment process) serves the same shops round after
round. Building a `ShopModel` costs ~15-20 ms per message, and reading the shop's local part and own
encoder back from its state file (`client.local_state`) another ~5-10 ms. This cache keeps one model
per shop, least recently used first out, within a byte budget and a count.

What a cached model may carry between messages, and why results stay bit-identical to a fresh model:
- the encoder: always overwritten in full by the received one (`load_round_start`, strict load);
- the local part: always overwritten too. When `disk_token` proves the state file is the one this
  process last wrote or read (same path, device, inode, size, mtime_ns and ctime_ns), it is loaded from
  the token's private copy of that file's local part (~0.4 ms) instead of the file (~5-10 ms: unpickling
  the own encoder too). Otherwise `restore_local_part` reads the file (or the context, or starts fresh)
  exactly as for a new model; a fresh start gives a model that was used before a fresh model's local
  part again (`reset_local_if_used`). The model's own tensors are never trusted to still hold a file's
  part: fused Adam, for one, writes parameters without bumping their autograd version counters. The
  run/round rules (`_too_new`, rollback to the previous file) are applied to the token's copy of the
  file's metadata, the same fields the file holds;
- the own encoder (personal mix): the tensors saved into, or read from, the same file, private to the
  token (callers get copies), valid with it;
- torch's global RNG: set at every checkout to the state a fresh build leaves (`build_model` seeds it),
  so anything that draws from it without seeding (DP-SGD's ID dropout) draws the same numbers;
- flags: train mode, `requires_grad` and the embeddings' `sparse` switch are set back to a fresh model's;
  gradients are dropped (training sets them to None before every step anyway).
Optimisers are created per round (`shared.train.train_shop`), so no optimiser state is cached.

`FEDSHOP_MODEL_CACHE=0` turns the cache off (every message builds a fresh model, as before);
`FEDSHOP_MODEL_CACHE_MB` (default 1024) and `FEDSHOP_MODEL_CACHE_MODELS` (default 0 = no limit) bound
one process's cache. A model is counted at its parameters and persistent buffers plus its token's
copies of the local part and own encoder (default world: ~13 MiB a shop; `scale`: ~0.5 MiB;
benchmarks/model_cache_memory.py).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from shared.env_seconds import seconds_from_env
from shared.model import ShopModel


class Shop(Protocol):
    """What the cache needs of `client.local_state.Shop` (not imported: local_state imports this module)."""

    def model(self) -> ShopModel:
        """A freshly built model of the shop."""
        ...

CACHE_ENV = "FEDSHOP_MODEL_CACHE"  # "0" = off
BUDGET_ENV = "FEDSHOP_MODEL_CACHE_MB"  # bytes one process's cache may hold, in MiB
COUNT_ENV = "FEDSHOP_MODEL_CACHE_MODELS"  # models one process's cache may hold (0 = no limit)
DEFAULT_BUDGET_MB = 1024

_serials = itertools.count(1)


def enabled() -> bool:
    """Whether this process caches models (`FEDSHOP_MODEL_CACHE`, on unless "0")."""
    return os.environ.get(CACHE_ENV, "1") != "0"


def _limits() -> tuple[int, int]:
    """(byte budget, model count limit; 0 = none) from the environment, read at each insertion."""
    fix = f"unset it, or e.g. {BUDGET_ENV}=512 / {COUNT_ENV}=100"
    budget = seconds_from_env(BUDGET_ENV, DEFAULT_BUDGET_MB, 0, 2**30, fix, unit="MiB")
    count = seconds_from_env(COUNT_ENV, 0, 0, 2**31, fix, unit="models")
    return int(budget * 2**20), int(count)


def file_identity(path: Path) -> tuple[int, ...] | None:
    """(device, inode, size, mtime_ns, ctime_ns) of ``path``, None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class DiskToken:
    """What the state file at ``path`` holds while its identity is ``identity``: copies private to the cache."""

    path: str
    identity: tuple[int, ...]  # file_identity when this process wrote or read the file
    meta: dict[str, Any]  # the file's payload without its tensors: format, shop, round, run, rounds_trained, parent
    local: dict[str, torch.Tensor]  # the file's local part
    own: dict[str, torch.Tensor] | None  # the file's own encoder
    serial: int = field(default_factory=lambda: next(_serials))


@dataclass
class _Entry:
    shop: Shop
    model: ShopModel
    rng_state: torch.Tensor  # torch's global RNG state right after the build
    pristine: bool  # the local part is the build's: not restored (or trained) since
    flags: dict[str, Any]  # requires_grad per parameter and sparse per embedding of a fresh model
    nbytes: int = 0
    token: DiskToken | None = None


_ENTRIES: OrderedDict[int, _Entry] = OrderedDict()  # id(shop) -> entry, least recently used first
_BY_MODEL: dict[int, _Entry] = {}  # id(model) -> entry


def _nbytes(model: ShopModel, token: DiskToken | None) -> int:
    state = [*model.encoder.state_dict().values(), *model.local.state_dict().values()]
    if token is not None:
        state += [*token.local.values(), *(token.own or {}).values()]
    return sum(t.numel() * t.element_size() for t in state)


def _fresh_flags(model: ShopModel) -> dict[str, Any]:
    return {"grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "sparse": {n: m.sparse for n, m in model.named_modules() if isinstance(m, nn.Embedding)}}


def _reset_flags(entry: _Entry) -> None:
    """A fresh model's mode and switches; gradients dropped (set to None before every training step anyway)."""
    model = entry.model
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(entry.flags["grad"][name])
        param.grad = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            module.sparse = entry.flags["sparse"][name]


def checkout(shop: Shop) -> ShopModel:
    """The shop's model for one message: its cached one, else a freshly built one that is then cached.

    The caller must load the received encoder in full and call `restore_local_part`, which reuses or
    replaces the local part (see the module docstring). With the cache off: `shop.model()`.
    """
    if not enabled():
        return shop.model()
    entry = _ENTRIES.get(id(shop))
    if entry is not None and entry.shop is shop:
        _ENTRIES.move_to_end(id(shop))
        entry.pristine = False  # served before: its local part may be anything
        torch.set_rng_state(entry.rng_state)
        _reset_flags(entry)
        return entry.model
    model = shop.model()
    entry = _Entry(shop, model, torch.get_rng_state(), True, _fresh_flags(model))
    entry.nbytes = _nbytes(model, None)
    _drop(id(shop))
    _ENTRIES[id(shop)] = entry
    _BY_MODEL[id(model)] = entry
    _evict(keep=id(shop))
    return model


def _drop(key: int) -> None:
    entry = _ENTRIES.pop(key, None)
    if entry is not None:
        _BY_MODEL.pop(id(entry.model), None)


def _evict(keep: int) -> None:
    """Drop least recently used models until the cache is within its budget and count (never ``keep``)."""
    budget, count = _limits()
    while len(_ENTRIES) > 1:
        total = sum(e.nbytes for e in _ENTRIES.values())
        if total <= budget and (count <= 0 or len(_ENTRIES) <= count):
            return
        oldest = next(iter(_ENTRIES))
        if oldest == keep:
            return
        _drop(oldest)


def clear() -> None:
    """Forget every cached model (a new run in a long-lived process, a freshly forked worker)."""
    _ENTRIES.clear()
    _BY_MODEL.clear()


def stats() -> dict[str, int]:
    """Models and bytes the cache holds now (for benchmarks and tests)."""
    return {"models": len(_ENTRIES), "bytes": sum(e.nbytes for e in _ENTRIES.values())}


def _entry(model: ShopModel) -> _Entry | None:
    entry = _BY_MODEL.get(id(model))
    return entry if entry is not None and entry.model is model else None


def is_cached(model: ShopModel) -> bool:
    """Whether ``model`` is one this cache handed out (and still holds)."""
    return _entry(model) is not None


def note_file(model: ShopModel, path: Path, identity: tuple[int, ...] | None, meta: Mapping[str, Any],
              local: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor] | None) -> DiskToken | None:
    """Keep, for a cached ``model``, what the file ``path`` holds while its identity is ``identity``.

    Call right after reading the file or writing it: ``meta`` its payload's fields, ``local`` and ``own``
    its local part and own encoder (copied here). None identity: nothing proven, no token. Also drops
    the model's gradients: a model waiting in the cache holds no training leftovers.
    """
    entry = _entry(model)
    if entry is None:
        return None
    entry.token = None
    for param in model.parameters():
        param.grad = None
    if identity is not None:
        def copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in state.items()}

        info = {k: v for k, v in meta.items() if k not in ("local", "own_encoder")}  # no tensors
        entry.token = DiskToken(str(path), identity, info, copy(local), copy(own) if own is not None else None)
    entry.nbytes = _nbytes(model, entry.token)
    return entry.token


def forget_file(model: ShopModel) -> None:
    """``model``'s local part no longer provably equals its state file (loaded from elsewhere, or reset)."""
    entry = _entry(model)
    if entry is not None:
        entry.token = None
        entry.nbytes = _nbytes(model, None)


def disk_token(model: ShopModel, path: Path) -> DiskToken | None:
    """The token of the file at ``path`` if it is still the one this process last wrote or read; else None."""
    entry = _entry(model)
    if entry is None or entry.token is None:
        return None
    token = entry.token
    if token.path == str(path) and token.identity == file_identity(path):
        return token
    forget_file(model)
    return None


def load_token(model: ShopModel, token: DiskToken) -> None:
    """Load the token's copy of its file's local part into ``model`` (what reading the file would load)."""
    model.load_local_state(token.local)
    entry = _entry(model)
    if entry is not None:
        entry.pristine = False


def own_encoder(model: ShopModel, serial: int) -> dict[str, torch.Tensor]:
    """A copy of the own encoder of ``model``'s token ``serial`` (what `restore_local_part` marked in the context)."""
    entry = _entry(model)
    token = entry.token if entry is not None else None
    if token is None or token.serial != serial or token.own is None:
        raise RuntimeError("the context names an own encoder in the model cache that it no longer holds "
                           "(a model used outside checkout/restore_local_part/save_local_part). Fix: report this bug; "
                           "FEDSHOP_MODEL_CACHE=0 works around it")
    return {k: v.clone() for k, v in token.own.items()}


def restored(model: ShopModel) -> None:
    """Note that ``model``'s local part was replaced (loaded or reset): it is no longer the build's."""
    entry = _entry(model)
    if entry is not None:
        entry.pristine = False


def reset_local_if_used(model: ShopModel) -> None:
    """Give a cached model a fresh model's local part, unless it was built for this message and not restored yet.

    The first restore after the build is the only point where the local part is known to be the build's;
    anything later (training, a second restore) may have changed it, so it is rebuilt (rare: a shop's first
    round, or a redone round that started fresh).
    """
    entry = _entry(model)
    if entry is None:
        return  # not from the cache: the caller built it fresh
    if not entry.pristine:
        with torch.random.fork_rng(devices=[]):  # the build seeds torch's RNG; the message's stream must not move
            fresh = entry.shop.model()
        model.load_local_state(fresh.local_state())
    entry.pristine = False
