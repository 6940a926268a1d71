"""One shop round, the same whichever path asked for it: the main train/evaluate handlers or SecAgg+.

Flower's message format differs between the paths (records on the main path, a legacy NumPyClient
under SecAgg+), the round does not: load the received encoder, restore the shop's own local part,
decide the shop's stage (late joiner waiting, warm-up, active), start from the personal mix if on,
train (plain with FedProx's pull when `proximal-mu > 0`, Reptile with `objective = meta`, DP-SGD
with `dpsgd-noise-multiplier > 0`), save the local part, and say what to send. Each path only
converts the result into its own reply. With `evaluate-after-train` in the train request (fused
evaluation, main path only) `evaluate_after_train` then evaluates what the shop now serves, exactly as
the separate evaluate message would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from torch.optim.optimizer import register_optimizer_step_post_hook

from client.best_val import load_record, next_tests, save_record
from client.dpsgd_round import train_dpsgd_round
from client.local_state import (
    Shop,
    resolve_shop,
    restore_local_part,
    restore_own_encoder,
    rounds_trained,
    save_local_part,
)
from client.merchant_log import log_round, note_training
from client.message_settings import parse
from shared.meta import meta_train_shop
from shared.model import ShopModel
from shared.protocol import (
    LOCAL_PREFIX,
    NUM_EXAMPLES,
    SHOP_INDEX,
    effective_personal_mix,
    eval_metric_key,
    eval_splits,
    serves_own_encoder,
)
from shared.settings import ShopRoundSettings
from shared.train import evaluate_shop, train_shop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What a shop's round sends: arrays by wire name and metrics (``num-examples`` 0 = leave it out)."""

    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float]
    stage: str = "active"  # `join_stage`: a "waiting" shop trained nothing and saved nothing
    # `state_versions` of the model right after `save_local_part` wrote it (own encoder included), else None
    saved_versions: StateVersions | None = None


# (optimiser steps in this process, ((storage address, in-place version) of each state tensor))
StateVersions = tuple[int, tuple[tuple[int, int], ...]]


class _OptimiserSteps:
    """Optimiser steps this process has taken since `state_versions` first asked (any optimiser, any model).

    Why: a tensor's version counter misses writes made behind autograd's back, and Adam's fused kernel
    (`shared.lazy_adam.DenseAdam`, ``Adam(fused=True)``) is one: it updates the parameters in place and leaves
    their versions as they were. Every ``torch.optim.Optimizer.step`` runs torch's global post-step hooks
    whatever its kernel, so this count sees each one; no trainer has to remember to report its steps.
    """

    count = 0
    hooked = False

    @classmethod
    def now(cls) -> int:
        """The count so far; the hook is installed at the first call (steps before it cannot follow a save)."""
        if not cls.hooked:
            register_optimizer_step_post_hook(cls._step)
            cls.hooked = True
        return cls.count

    @classmethod
    def _step(cls, *_args: Any) -> None:
        cls.count += 1


def state_versions(model: ShopModel) -> StateVersions:
    """What must stay equal while the model provably holds the state it had: equal = nothing was written since.

    Optimiser steps are counted (`_OptimiserSteps`: fused kernels do not bump versions), any step in this
    process voiding the proof (conservative); every other in-place write through a parameter or buffer
    (``load_state_dict``'s copy, an ``add_``) bumps that tensor's version; a swapped tensor changes its address.
    """
    return _OptimiserSteps.now(), tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values())


def message_settings(run_config: Mapping[str, Any], sent: Mapping[str, Any]) -> ShopRoundSettings:
    """The run config overridden by what the coordinator sent, parsed by the schema (`client.message_settings`).

    Missing keys take the schema's defaults (shared/settings.py); a bad value is a `ScenarioError` naming
    the key and the fix, raised here rather than deep in training. Handlers use `settings_for`, which
    parses once per message.
    """
    return parse(run_config, sent)


def round_seed(seed: int, server_round: int, shop_index: int) -> int:
    """Seed of one shop's local training in one round, so a resumed run retrains identically."""
    return int(np.random.SeedSequence([seed, server_round, shop_index + 1]).generate_state(1)[0])


def shop_and_model(context: Context, settings: ShopRoundSettings) -> tuple[Shop, ShopModel]:
    """The shop this node serves and its model for this message: load the encoder and restore the local part next.

    The model is this process's cached one when it has served the shop before (`client.model_cache`).
    """
    torch.set_num_threads(1)  # Ray gives each simulated client num_cpus=1
    shop = resolve_shop(context, settings)
    return shop, shop.round_model()


class ReceivedEncoderError(ValueError):
    """The coordinator's arrays cannot be loaded: another dtype than the model's, or NaN/Inf values."""


def check_received(received: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse a received global whose tensors are not finite or not in the model's dtype (before any training).

    `load_state_dict` checks names and shapes but casts dtypes silently, and NaN/Inf weights would train into
    NaN heads that the shop then saves as its own local part: refused here, the shop's state stays as it was.
    """
    for key, value in received.items():
        if not isinstance(value, torch.Tensor):
            raise ReceivedEncoderError(f"coordinator's array '{key}' is {type(value).__name__}, not a tensor")
        want = expected.get(key)
        if want is not None and tuple(value.shape) != tuple(want.shape):
            raise ReceivedEncoderError(f"coordinator's encoder array '{key}' has shape {tuple(value.shape)}, the "
                                       f"model's is {tuple(want.shape)}. Fix: coordinator and shop must run the same "
                                       "scenario and fedshop version")
        if want is not None and value.dtype != want.dtype:
            raise ReceivedEncoderError(f"coordinator's encoder array '{key}' is {value.dtype}, the model's is "
                                       f"{want.dtype}. Fix: coordinator and shop must run the same fedshop version")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ReceivedEncoderError(f"coordinator's array '{key}' holds NaN/Inf values; the round is refused and "
                                       "the shop's saved state is unchanged")


def load_round_start(shop: Shop, model: ShopModel, context: Context, settings: ShopRoundSettings,
                     received: Mapping[str, torch.Tensor], *, training: bool) -> None:
    """Load the received encoder and the shop's own local part (plus averaged heads for FedAvg-all)."""
    check_received(received, model.encoder.state_dict())
    model.load_encoder_state({k: v for k, v in received.items() if not k.startswith(LOCAL_PREFIX)})
    source = restore_local_part(model, context, shop.state_dir, server_round=settings.server_round,
                                run=settings.run_dir, training=training)
    logger.debug("shop %s: local part restored from %s", shop.name, source)
    if settings.share == "all-shareable":  # FedAvg-all baseline: averaged heads replace local ones
        own = model.local.state_dict()
        shared = {k[len(LOCAL_PREFIX):]: v for k, v in received.items() if k.startswith(LOCAL_PREFIX)}
        fits = {k: v for k, v in shared.items() if k in own and own[k].shape == v.shape}
        model.local.load_state_dict({**own, **fits})


def personal_mix(settings: ShopRoundSettings) -> float:
    """The personal mix's n0 in force for this message (0 = off; `shared.protocol.effective_personal_mix`)."""
    return effective_personal_mix(settings.personal_mix, settings.share, settings.objective)


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
    # reply's delta stays row-sparse. The mix is built in one buffer per array: the same float ops as
    # `(1 - b) * v + b * own` (the same bits), without two of its four 1.7M-value temporaries.
    out = {}
    for k, v in received.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        mix = torch.mul(v, 1 - b)
        mix.add_(torch.mul(own[k], b))
        out[k] = mix.where(own[k] != v, v)
    return out


def update_reply(trained: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
                 start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder a shop replies with `mix-reply = "update"`: the global plus its training update, trained - start.

    Why: the trained encoder itself carries b x (own - global), the pull back to the shop's own encoder, which for a
    large shop (b near 1) dominates its update and points against the others' by construction (the leave-one-out
    screen then leaves the honest largest shop out; docs/robustness.md, "False positives"). With this reply the
    coordinator sees and averages what the shop's data taught this round, from wherever the shop started; its own
    encoder (what it serves) is unchanged. Rows that training left as they started stay the global's, bit for bit
    (a compressed reply's delta stays row-sparse).
    """
    out = {}
    for k, g in received.items():
        t = trained[k]
        if not g.is_floating_point():
            out[k] = t
            continue
        s = start[k]
        out[k] = torch.where(t != s, g + (t - s), g)
    return out


def join_stage(shop: Shop, settings: ShopRoundSettings, trained: int = -1) -> str:
    """'active', 'waiting' (a scenario late joiner before `join-round`) or 'warm-up'.

    A joining shop first trains its local part against the frozen encoder for `warmup-rounds` rounds,
    so its random heads never push gradients into the encoder the others rely on; only then do its
    updates count. Scenario late joiners warm up from their join round. Any other node warms up when
    it arrives mid-run with a fresh local part: ``trained`` (rounds its local part has trained, across
    runs) is below both the warm-up and the rounds it missed. That is how a merchant who starts a
    SuperNode while a deployment runs joins it.
    """
    server_round, warmup = settings.server_round, settings.warmup_rounds
    if not shop.late_joiner:
        joined_late = 0 <= trained < min(warmup, server_round - 1)
        return "warm-up" if joined_late else "active"
    join = settings.join_round
    if join <= 0 or server_round < join:
        return "waiting"
    return "warm-up" if server_round < join + warmup else "active"


def inject_fault(settings: ShopRoundSettings, shop: Shop) -> str | None:
    """Test-only faults from `fault-inject = "kind:shop[@round],..."` (schema-parsed); kinds: nan, error, sleep."""
    for kind, index, at_round in settings.faults():
        if index == shop.index and at_round in (None, settings.server_round):
            if kind == "error":
                raise RuntimeError(f"injected fault in shop {shop.name}")
            if kind == "sleep":
                time.sleep(settings.fault_sleep)
            return kind
    return None


def reply_arrays(model: ShopModel, settings: ShopRoundSettings) -> dict[str, torch.Tensor]:
    """The arrays a train reply carries: the encoder, plus the shareable local arrays for FedAvg-all."""
    arrays = model.encoder_state()
    if settings.share == "all-shareable":
        local = model.local_state()
        arrays.update({LOCAL_PREFIX + k: local[k] for k in model.shareable_local_keys()})
    return arrays


def train_round(shop: Shop, model: ShopModel, settings: ShopRoundSettings, context: Context,
                received: Mapping[str, torch.Tensor]) -> RoundResult:
    """One round of local training from the state `load_round_start` set up; the same on every path."""
    server_round = settings.server_round
    fault = inject_fault(settings, shop)
    stage = join_stage(shop, settings, rounds_trained(context))
    if stage == "waiting":  # a late joiner before its join round: nothing to train, nothing to count
        return RoundResult(reply_arrays(model, settings), {NUM_EXAMPLES: 0.0, SHOP_INDEX: shop.index}, stage)
    n0 = personal_mix(settings)
    own = restore_own_encoder(model, context) if n0 and stage == "active" else None
    start: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None  # (global, mixed start)
    if own is not None:  # the model holds the received global encoder (loaded by load_round_start)
        received_encoder = model.encoder_state()
        mixed = mixed_start(received_encoder, own, int(shop.tensors.rows["train"]["user"].shape[0]), n0)
        model.load_encoder_state(mixed)
        if settings.mix_reply == "update":
            start = (received_encoder, mixed)
    # seed -1 means the scenario's own seed: resolve_shop then loaded the scenario without a seed override
    seed = settings.seed if settings.seed >= 0 else shop.scenario.seed
    cfg = replace(shop.scenario.train, epochs=settings.local_epochs, prox_mu=settings.prox_mu,
                  freeze_encoder=settings.freeze_encoder or stage == "warm-up", max_steps=settings.max_steps,
                  seed=round_seed(seed, server_round, shop.index))
    if settings.dpsgd_noise_multiplier > 0:
        losses = train_dpsgd_round(model, shop, settings, context, cfg.seed)
    elif settings.objective == "meta":  # Reptile: short inner loop, partial step
        losses = meta_train_shop(model, shop.tensors, cfg, inner_steps=settings.meta_inner_steps,
                                 outer_step=settings.meta_outer_step)
    else:
        losses = train_shop(model, shop.tensors, cfg, global_encoder=dict(received) if cfg.prox_mu > 0 else None)
    save_local_part(model, context, shop.state_dir, shop=shop.name, server_round=server_round,
                    keep_own_encoder=bool(n0), run=settings.run_dir)
    saved = state_versions(model) if n0 else None  # the model now holds its saved local part and own encoder
    note_training(context, server_round, int(shop.tensors.rows["train"]["user"].shape[0]), stage)
    arrays = reply_arrays(model, settings)
    if start is not None:
        arrays.update(update_reply(arrays, *start))
    if fault == "nan":
        first = next(iter(arrays))
        arrays[first] = torch.full_like(arrays[first], float("nan"))
    metrics = {k: float(v) for k, v in losses.items()}
    metrics[SHOP_INDEX] = shop.index
    if stage == "warm-up":  # its encoder is unchanged anyway; weight 0 keeps it out of the aggregate
        metrics[NUM_EXAMPLES] = 0.0
    return RoundResult(arrays, metrics, stage, saved)


def test_after_val(shop: Shop, context: Context, settings: ShopRoundSettings,
                   val: Mapping[str, Mapping[str, float]]) -> set[str]:
    """The tasks whose test metrics this round can be reported (`client.best_val`); notes the round's scores."""
    run, server_round = settings.run_dir, settings.server_round
    wanted, record = next_tests(load_record(context, shop.state_dir, run), server_round, val)
    save_record(context, shop.state_dir, run, record)
    return wanted


def evaluate_round(shop: Shop, model: ShopModel, settings: ShopRoundSettings, context: Context, *,
                   holds_own: bool = False) -> dict[str, float]:
    """Per-task metrics of the received encoder (the shop's own one with the personal mix) and its local part.

    Keys are `<task>.<metric>` (`<split>/`-prefixed for several splits), plus `num-examples` (rows of the
    last split, at least 1) and `shop-index`. With `test-on-improvement` (and val before test in the
    request) only the tasks `test_after_val` names get test keys. ``holds_own``: the model's encoder is
    the shop's own encoder already (`evaluate_after_train`), so it is not loaded again.
    """
    own = restore_own_encoder(model, context) if personal_mix(settings) and not holds_own else None
    if own is not None:
        model.load_encoder_state(own)
    requested = settings.eval_split
    splits = eval_splits(requested)
    metrics: dict[str, float] = {}
    skipped: set[str] = set()  # tasks whose test pass no report can pick this round
    for split in splits:
        tasks = [t for t in shop.tensors.tasks if t not in skipped] if split == "test" and skipped else None
        results = evaluate_shop(model, shop.tensors, split, tasks=tasks)
        if split == "val" and settings.test_on_improvement and "test" in splits:
            skipped = set(results) - test_after_val(shop, context, settings, results)
        for task, values in results.items():
            metrics.update({eval_metric_key(split, task, name, len(splits) > 1): float(value)
                            for name, value in values.items()})
    metrics[NUM_EXAMPLES] = float(max(1, shop.tensors.rows[splits[-1]]["user"].shape[0]))
    metrics[SHOP_INDEX] = shop.index
    log_round(shop.name, context, settings.server_round, metrics, requested, settings.run_dir)
    return metrics


def evaluate_after_train(shop: Shop, model: ShopModel, settings: ShopRoundSettings, context: Context,
                         result: RoundResult) -> dict[str, float] | None:
    """The round's evaluation, computed right after `train_round` (fused), or None to leave it to an evaluate message.

    Only when the train request asked (`evaluate-after-train`), the shop serves its own encoder
    (`shared.protocol.serves_own_encoder`, the coordinator's rule too) and it trained this round (a
    waiting late joiner saved nothing). The evaluate handler would load the local part and own encoder just
    saved (`load_round_start`, then `evaluate_round`); when no tensor of the model was written since
    `save_local_part` (`RoundResult.saved_versions`), the model holds exactly those values and evaluates as it
    is (evaluation sets eval mode itself), else they are restored as the handler would: either way the
    metrics are the same. Safe whatever runs in between: an optimiser step (of any kind) or an in-place write
    after the save changes `state_versions`, and the state is restored. A failure is logged and gives None: the
    train reply goes out without them and the coordinator asks again.
    """
    if not settings.evaluate_after_train or result.stage == "waiting":
        return None
    if not serves_own_encoder(settings.personal_mix, settings.share, settings.objective):
        logger.warning("shop %s: asked to evaluate after training, but it does not serve its own encoder; "
                       "leaving it to the evaluate message", shop.name)
        return None
    try:
        if result.saved_versions is not None and result.saved_versions == state_versions(model):
            return evaluate_round(shop, model, settings, context, holds_own=True)
        restore_local_part(model, context, shop.state_dir, server_round=settings.server_round, run=settings.run_dir,
                           training=False)
        if restore_own_encoder(model, context) is None:  # not what the evaluate message would see: let it ask
            logger.warning("shop %s: no own encoder after training; leaving the evaluation to the evaluate "
                           "message", shop.name)
            return None
        return evaluate_round(shop, model, settings, context)
    except Exception as exc:  # the train reply must still go out: the coordinator's evaluate message asks again
        logger.error("shop %s: evaluation after training failed (%s: %s); the train reply goes without it",
                     shop.name, type(exc).__name__, exc)
        logger.debug("the evaluation's traceback", exc_info=True)
        return None
