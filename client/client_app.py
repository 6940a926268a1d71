"""The shop's Flower ClientApp: receive the encoder, restore the local part, train or evaluate, reply.

Only records move here; training and evaluation live in `shared.train`. Every reply passes the
leak guard (`client.leak_guard`), an app-wide mod. This one ClientApp serves every privacy mode:
* SecAgg+: Flower's legacy messages (the SecAgg+ workflow) go to `client.secure_client.secure_app`,
  whose own audit mod checks its replies;
* central DP: `fixedclipping_mod` clips the encoder update whenever the coordinator sends a norm;
* DP-SGD: with `dpsgd-noise-multiplier > 0` the shop trains with `shared.privacy.dpsgd`, keeps its
  accountant in its local state across rounds and reports its epsilon as `dp-epsilon`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from client.leak_guard import ERROR_CODE_BLOCKED, FAILED_TEXT, LOCAL_PREFIX, leak_guard
from client.local_state import (
    Shop,
    resolve_shop,
    restore_local_part,
    restore_own_encoder,
    rounds_trained,
    save_local_part,
)
from client.timing import timing_mod
from client.wire_mod import wire_mod
from shared.atomic import atomic_write_text
from shared.meta import meta_train_shop
from shared.model import ShopModel
from shared.train import evaluate_shop, train_shop

logger = logging.getLogger(__name__)

# Records that only Flower's legacy message format (the SecAgg+ workflow) uses.
LEGACY_CONFIG_RECORDS = frozenset({"secaggplus_configs"})
LEGACY_ARRAY_RECORDS = frozenset({"fitins.parameters", "evaluateins.parameters"})
CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's DP fixed-clipping strategies put in the ConfigRecord
DPSGD_RECORD = "fedshop.dpsgd-accountant"  # ConfigRecord in context.state: {"state": accountant JSON}
DPSGD_FILE = "dpsgd_accountant.json"


def is_legacy(msg: Message) -> bool:
    """Whether ``msg`` is a legacy (SecAgg+ workflow) message rather than one of the main ServerApp's."""
    if not msg.has_content():
        return False
    return bool(LEGACY_CONFIG_RECORDS & set(msg.content.config_records)
                or LEGACY_ARRAY_RECORDS & set(msg.content.array_records))


def legacy_dispatch(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Front mod: hand legacy (SecAgg+) messages to the SecAgg+ client, everything else to the handlers.

    The SecAgg+ client's replies are masked integer vectors, which the leak guard (built for encoder
    arrays) would block; its own audit mod checks them instead. Exceptions still leave as a generic text.
    """
    if not is_legacy(msg):
        return call_next(msg, context)
    from client.secure_client import secure_app  # secure_client imports this module

    try:
        reply = secure_app(msg, context)
    except Exception:  # the text of any exception may quote private data: log it here, send none
        logger.exception("SecAgg+ handler raised; sending a generic error reply")
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=FAILED_TEXT), reply_to=msg)
    if reply.has_error():
        logger.warning("SecAgg+ handler returned an error (%s); sending a generic error reply", reply.error.reason)
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=FAILED_TEXT), reply_to=msg)
    return reply


def clip_when_dp(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train-handler mod: Flower's `fixedclipping_mod` when the coordinator runs central DP, else nothing."""
    config = next(iter(msg.content.config_records.values()), {}) if msg.has_content() else {}
    if CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[timing_mod, legacy_dispatch, wire_mod, leak_guard])  # wire_mod: docs/federation.md


def _config(msg: Message, context: Context) -> dict[str, Any]:
    """Run config, overridden by what the coordinator sent with this message."""
    sent = next(iter(msg.content.config_records.values()), {})
    return {**dict(context.run_config), **dict(sent)}


def run_key(config: dict[str, Any]) -> str:
    """Which run a local part belongs to: the coordinator's run directory (the same when a run resumes)."""
    return str(config.get("run-dir") or "")


def round_seed(seed: int, server_round: int, shop_index: int) -> int:
    """Seed of one shop's local training in one round, so a resumed run retrains identically."""
    return int(np.random.SeedSequence([seed, server_round, shop_index + 1]).generate_state(1)[0])


def _prepare(msg: Message, context: Context) -> tuple[Shop, ShopModel, dict[str, Any], dict[str, torch.Tensor]]:
    """The shop, its model with the received encoder and its own local part, and the config."""
    torch.set_num_threads(1)  # one core per simulated shop; Ray gives each client num_cpus=1
    config = _config(msg, context)
    shop = resolve_shop(context, config)
    model = shop.model()
    received = dict(next(iter(msg.content.array_records.values())).to_torch_state_dict())
    model.load_encoder_state({k: v for k, v in received.items() if not k.startswith(LOCAL_PREFIX)})
    source = restore_local_part(model, context, shop.state_dir, server_round=int(config.get("server-round", 0)),
                                run=run_key(config), training=msg.metadata.message_type == MessageType.TRAIN)
    logger.debug("shop %s: local part restored from %s", shop.name, source)
    if config.get("share") == "all-shareable":  # FedAvg-all baseline: averaged heads replace local ones
        own = model.local.state_dict()
        shared = {k[len(LOCAL_PREFIX):]: v for k, v in received.items() if k.startswith(LOCAL_PREFIX)}
        fits = {k: v for k, v in shared.items() if k in own and own[k].shape == v.shape}
        model.local.load_state_dict({**own, **fits})
    return shop, model, config, received


def personal_mix(config: dict[str, Any]) -> float:
    """The personal mix's n0 (0 = off). Only fedshop's own objective uses it: the FedAvg-all baseline and
    the Reptile objective define their starting point and reply themselves."""
    if config.get("share") == "all-shareable" or str(config.get("objective", "fedavg")) != "fedavg":
        return 0.0
    return max(0.0, float(config.get("personal-mix", 0.0)))


def mixed_start(received: dict[str, torch.Tensor], own: dict[str, torch.Tensor], n_rows: int,
                n0: float) -> dict[str, torch.Tensor]:
    """Start of a shop's round: (1 - b) x global + b x its own last encoder, with b = n / (n + n0).

    A shop with n training rows keeps the share b of its own encoder: a large shop, whose data alone
    already trains a good encoder, stays near it; a small one (n << n0) takes the federation's.
    The idea is FedALA's (Zhang et al., AAAI 2023) adaptive local aggregation, with a fixed, size-based
    weight instead of a learned one. The reply is the encoder trained from this start, as usual.
    """
    b = n_rows / (n_rows + n0)
    # Rows where own == global stay bit-exact (the float mix can move them by an ulp), so a compressed
    # reply's delta stays row-sparse.
    return {k: torch.where(own[k] == v, v, (1 - b) * v + b * own[k]) if v.is_floating_point() else v
            for k, v in received.items()}


def _inject_fault(config: dict[str, Any], shop: Shop, server_round: int) -> str | None:
    """Test-only faults from `fault-inject = "kind:shop[@round],..."`; kinds: nan, error, sleep."""
    for item in str(config.get("fault-inject") or "").split(","):
        kind, _, target = item.strip().partition(":")
        index, _, at_round = target.partition("@")
        if kind and index and int(index) == shop.index and (not at_round or int(at_round) == server_round):
            if kind == "error":
                raise RuntimeError(f"injected fault in shop {shop.name}")
            if kind == "sleep":
                time.sleep(float(config.get("fault-sleep", 30.0)))
            return kind
    return None


@app.train(mods=[clip_when_dp])
def train(msg: Message, context: Context) -> Message:
    """One round of local training; replies with the encoder (and shareable heads if asked) only."""
    shop, model, config, received = _prepare(msg, context)
    server_round = int(config.get("server-round", 0))
    fault = _inject_fault(config, shop, server_round)
    stage = join_stage(shop, config, server_round, rounds_trained(context))
    if stage == "waiting":  # a late joiner before its join round: nothing to train, nothing to count
        return _reply(model.encoder_state(), {"num-examples": 0.0, "shop-index": shop.index}, msg)
    n0 = personal_mix(config)
    own = restore_own_encoder(model, context) if n0 and stage == "active" else None
    if own is not None:  # the model holds the received global encoder (loaded by _prepare)
        model.load_encoder_state(mixed_start(model.encoder_state(), own,
                                             int(shop.tensors.rows["train"]["user"].shape[0]), n0))
    base = shop.scenario.train
    cfg = replace(base, epochs=int(config.get("local-epochs", base.epochs)),
                  prox_mu=float(config.get("proximal-mu", base.prox_mu)),
                  freeze_encoder=bool(config.get("freeze-encoder", False)) or stage == "warm-up",
                  max_steps=int(config.get("max-steps", base.max_steps)),
                  seed=round_seed(int(config.get("seed", shop.scenario.seed)), server_round, shop.index))
    if float(config.get("dpsgd-noise-multiplier", 0.0)) > 0:
        losses = _train_dpsgd(model, shop, config, context, cfg.seed)
    elif str(config.get("objective", "fedavg")) == "meta":  # Reptile: short inner loop, partial step
        losses = meta_train_shop(model, shop.tensors, cfg, inner_steps=int(config.get("meta-inner-steps", 20)),
                                 outer_step=float(config.get("meta-outer-step", 1.0)))
    else:
        losses = train_shop(model, shop.tensors, cfg, global_encoder=received if cfg.prox_mu > 0 else None)
    save_local_part(model, context, shop.state_dir, shop=shop.name, server_round=server_round,
                    keep_own_encoder=bool(n0), run=run_key(config))
    arrays = model.encoder_state()
    if config.get("share") == "all-shareable":
        local = model.local_state()
        arrays.update({LOCAL_PREFIX + k: local[k] for k in model.shareable_local_keys()})
    if fault == "nan":
        first = next(iter(arrays))
        arrays[first] = torch.full_like(arrays[first], float("nan"))
    metrics = {k: float(v) for k, v in losses.items()}
    metrics["shop-index"] = shop.index
    if stage == "warm-up":  # its encoder is unchanged anyway; weight 0 keeps it out of the aggregate
        metrics["num-examples"] = 0.0
    return _reply(arrays, metrics, msg)


def _train_dpsgd(model: ShopModel, shop: Shop, config: dict[str, Any], context: Context,
                 seed: int) -> dict[str, float]:
    """One round of DP-SGD; the shop's accountant carries on from its local state, so epsilon only grows."""
    from shared.privacy.dpsgd import DPSGDConfig, train_dpsgd_shop  # Opacus: imported only when used

    dp = DPSGDConfig(noise_multiplier=float(config["dpsgd-noise-multiplier"]),
                     max_grad_norm=float(config.get("dpsgd-clipping-norm", 1.0)),
                     unit=str(config.get("dpsgd-unit", "user")),
                     sample_rate=float(config.get("dpsgd-sample-rate", 0.05)),
                     steps_per_round=int(config.get("dpsgd-steps", 0)), lr=float(config.get("dpsgd-lr", 1e-2)),
                     delta=float(config.get("dpsgd-delta", 1e-5)),
                     max_epsilon=float(config.get("dpsgd-max-epsilon", 0.0)) or None, seed=seed % (2**31))
    acc = train_dpsgd_shop(model, shop.tensors, dp, accountant_state=load_accountant(context, shop.state_dir))
    save_accountant(context, shop.state_dir, acc.to_json())
    epsilon = acc.epsilon(dp.delta)
    logger.info("shop %s: DP-SGD epsilon %.4f at delta %g after %d steps", shop.name, epsilon, dp.delta, acc.steps)
    return {"num-examples": float(shop.tensors.rows["train"]["user"].shape[0]), "dp-epsilon": epsilon}


def load_accountant(context: Context, state_dir: Path | None) -> str | None:
    """The shop's saved DP-SGD accountant JSON: from `context.state`, else its state directory, else None."""
    if DPSGD_RECORD in context.state.config_records:
        return str(context.state.config_records[DPSGD_RECORD]["state"])
    path = Path(state_dir) / DPSGD_FILE if state_dir is not None else None
    if path is None or not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:  # never restart accounting silently: that would under-report epsilon
        raise ValueError(f"{path}: DP-SGD accountant state is not valid JSON ({exc}). Fix: restore it from a "
                         "backup; delete it only if you accept restarting this shop's privacy accounting") from None
    return text


def save_accountant(context: Context, state_dir: Path | None, state: str) -> None:
    """Keep the accountant JSON in `context.state` and, when the shop has one, in its state directory."""
    context.state[DPSGD_RECORD] = ConfigRecord({"state": state})
    if state_dir is not None:
        atomic_write_text(Path(state_dir) / DPSGD_FILE, state)


def _reply(arrays: dict[str, torch.Tensor], metrics: dict[str, float], msg: Message) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)


def join_stage(shop: Shop, config: dict[str, Any], server_round: int, trained: int = -1) -> str:
    """'active', 'waiting' (a scenario late joiner before `join-round`) or 'warm-up'.

    A joining shop first trains its local part against the frozen encoder for `warmup-rounds` rounds,
    so its random heads never push gradients into the encoder the others rely on; only then do its
    updates count. Scenario late joiners warm up from their join round. Any other node warms up when
    it arrives mid-run with a fresh local part: ``trained`` (rounds its local part has trained, across
    runs) is below both the warm-up and the rounds it missed. That is how a merchant who starts a
    SuperNode while a deployment runs joins it.
    """
    warmup = int(config.get("warmup-rounds", shop.scenario.federation["warmup_rounds"]))
    if not shop.late_joiner:
        joined_late = 0 <= trained < min(warmup, server_round - 1)
        return "warm-up" if joined_late else "active"
    join = int(config.get("join-round", shop.scenario.federation["join_round"]))
    if join <= 0 or server_round < join:
        return "waiting"
    return "warm-up" if server_round < join + warmup else "active"


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-task metrics of the global encoder with the shop's own local part, as `<task>.<metric>`.

    With the personal mix on, the shop's own encoder (what it serves) replaces the global one.
    """
    shop, model, config, _ = _prepare(msg, context)
    own = restore_own_encoder(model, context) if personal_mix(config) else None
    if own is not None:
        model.load_encoder_state(own)
    requested = str(config.get("eval-split", "val"))
    splits = requested.split("+")
    metrics: dict[str, float] = {}
    for split in splits:
        prefix = f"{split}/" if len(splits) > 1 else ""
        for task, values in evaluate_shop(model, shop.tensors, split).items():
            metrics.update({f"{prefix}{task}.{name}": float(value) for name, value in values.items()})
    split = splits[-1]
    metrics["num-examples"] = float(max(1, shop.tensors.rows[split]["user"].shape[0]))
    metrics["shop-index"] = shop.index
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
