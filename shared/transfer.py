"""Transfer of the federation's encoder to a shop that did not take part in training.

Four modes, one early-stopping rule for all of them (validation score after every period of at
least ``min_steps`` optimiser steps; stop after ``patience`` periods without improvement; keep the
best weights):

- ``scratch``: no transfer; a fresh model trained on the shop's rows only.
- ``frozen``: the received encoder, frozen; only a new local part trains (feature transfer).
- ``finetune``: ``frozen`` first, then every weight trains at ``finetune_lr_scale`` x the learning
  rate, continuing from the best frozen weights (linear-probe-then-fine-tune, Kumar et al. 2022:
  random heads never push gradients through a good encoder). Early stopping keeps the frozen
  weights when fine-tuning never beats them on validation.
- ``meta``: ``finetune`` from an encoder the federation trained with the Reptile objective
  (`shared.meta`); because the stopping rule compares both stages on validation, the better of
  frozen and fine-tuned is kept (reported in ``Adaptation.chosen``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from shared.features import ShopTensors
from shared.model import ModelConfig, ShopModel, build_model
from shared.train import TrainConfig, evaluate_shop, train_shop

MODES = ("scratch", "frozen", "finetune", "meta")
# Headline metric per task and whether larger is better: the early-stopping score and the report.
PRIMARY_METRIC: dict[str, tuple[str, bool]] = {"ctr": ("auc", True), "cvr": ("ctcvr_auc", True),
                                               "ranking": ("ndcg@10", True), "sales": ("wape", False)}
Results = dict[str, dict[str, float]]


@dataclass
class TransferConfig:
    """How a new shop adapts; identical for every mode so the comparison is fair."""

    max_periods: int = 30  # evaluation periods per stage at most
    patience: int = 3  # periods without a better validation score before a stage stops
    min_steps: int = 8  # optimiser steps per period however few rows the shop has
    finetune_lr_scale: float = 0.3  # learning-rate factor of the fine-tune stage (all weights train)


@dataclass
class Adaptation:
    """The outcome of adapting one shop in one mode."""

    mode: str
    model: ShopModel
    val: Results  # metrics of the kept weights on validation
    test: Results  # ... and on test
    val_score: float  # the early-stopping score of the kept weights
    periods: int  # evaluation periods trained over all stages
    chosen: str  # stage whose weights were kept: "scratch", "frozen" or "finetune"


def validation_score(results: Results) -> float:
    """Mean over tasks of the primary metric, oriented so larger is better (NaN-free tasks only)."""
    values = []
    for task, (metric, larger) in PRIMARY_METRIC.items():
        found = results.get(task, {})
        value = found.get(metric, found.get("auc")) if task == "cvr" else found.get(metric)
        if value is not None and math.isfinite(value):
            values.append(value if larger else -value)
    return sum(values) / len(values) if values else -math.inf


def _fit(model: ShopModel, tensors: ShopTensors, cfg: TrainConfig, tcfg: TransferConfig, *,
         start_score: float | None = None) -> tuple[float, int, bool]:
    """Train with early stopping from the current weights; leaves the best weights seen in ``model``.

    The starting weights compete too (scored here unless ``start_score`` is known). Returns (best
    score, periods trained, whether training improved on the starting weights).
    """
    best_score = validation_score(evaluate_shop(model, tensors, "val")) if start_score is None else start_score
    largest = max(tensors.rows["train"]["user"].shape[0],
                  0 if tensors.sales is None else tensors.sales["train"]["item"].shape[0], 1)
    steps_per_epoch = math.ceil(largest / cfg.batch_size)
    epochs = max(1, math.ceil(tcfg.min_steps / steps_per_epoch))
    best_state, improved, stale, period = copy.deepcopy(model.state_dict()), False, 0, 0
    for period in range(1, tcfg.max_periods + 1):
        train_shop(model, tensors, replace(cfg, epochs=epochs, max_steps=0, seed=cfg.seed * 1009 + period))
        score = validation_score(evaluate_shop(model, tensors, "val"))
        if score > best_score:
            best_score, improved, stale = score, True, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= tcfg.patience:
                break
    model.load_state_dict(best_state)
    return best_score, period, improved


def _finish(mode: str, model: ShopModel, tensors: ShopTensors, score: float, periods: int, chosen: str) -> Adaptation:
    return Adaptation(mode=mode, model=model, val=evaluate_shop(model, tensors, "val"),
                      test=evaluate_shop(model, tensors, "test"), val_score=score, periods=periods, chosen=chosen)


def _start(encoder_state: Mapping[str, torch.Tensor] | None, tensors: ShopTensors, model_cfg: ModelConfig,
           seed: int) -> ShopModel:
    model = build_model(tensors, model_cfg, tensors.cfg, seed=seed)
    if encoder_state is not None:
        try:
            model.load_encoder_state(encoder_state)
        except RuntimeError as exc:
            raise ValueError(f"the encoder does not fit shop {tensors.name}'s model ({str(exc).splitlines()[0]}). "
                             "Fix: use an encoder trained with this scenario's [model] and [features] sizes") from exc
    return model


def adapt_frozen_then_finetune(encoder_state: Mapping[str, torch.Tensor], tensors: ShopTensors, *,
                               model_cfg: ModelConfig, train_cfg: TrainConfig,
                               transfer_cfg: TransferConfig | None = None, seed: int = 0,
                               mode: str = "finetune") -> tuple[Adaptation, Adaptation]:
    """Both transfer stages from one encoder: (the frozen result, the fine-tuned result labelled ``mode``).

    The frozen stage is shared, so a runner that wants both modes pays for it once.
    """
    tcfg = transfer_cfg or TransferConfig()
    model = _start(encoder_state, tensors, model_cfg, seed)
    score, periods, _ = _fit(model, tensors, replace(train_cfg, freeze_encoder=True, seed=seed), tcfg)
    frozen = _finish("frozen", copy.deepcopy(model), tensors, score, periods, "frozen")
    tune_cfg = replace(train_cfg, freeze_encoder=False, lr=train_cfg.lr * tcfg.finetune_lr_scale, seed=seed + 1)
    score, more, improved = _fit(model, tensors, tune_cfg, tcfg, start_score=score)
    tuned = _finish(mode, model, tensors, score, periods + more, "finetune" if improved else "frozen")
    return frozen, tuned


def adapt_shop(encoder_state: Mapping[str, torch.Tensor] | None, tensors: ShopTensors, mode: str, *,
               model_cfg: ModelConfig, train_cfg: TrainConfig, transfer_cfg: TransferConfig | None = None,
               seed: int = 0) -> Adaptation:
    """Adapt a shop that was not in training, in one mode; ``encoder_state`` is ignored for scratch.

    For ``meta`` pass the encoder of a federation trained with ``objective = "meta"``.
    """
    if mode not in MODES:
        raise ValueError(f"transfer mode {mode!r} is unknown. Fix: use one of {list(MODES)}")
    tcfg = transfer_cfg or TransferConfig()
    if mode == "scratch":
        model = _start(None, tensors, model_cfg, seed)
        score, periods, _ = _fit(model, tensors, replace(train_cfg, freeze_encoder=False, seed=seed), tcfg)
        return _finish(mode, model, tensors, score, periods, "scratch")
    if encoder_state is None:
        raise ValueError(f"transfer mode {mode!r} needs the federation's encoder. Fix: pass encoder_state "
                         "(or use mode 'scratch')")
    if mode == "frozen":
        model = _start(encoder_state, tensors, model_cfg, seed)
        score, periods, _ = _fit(model, tensors, replace(train_cfg, freeze_encoder=True, seed=seed), tcfg)
        return _finish(mode, model, tensors, score, periods, "frozen")
    _, tuned = adapt_frozen_then_finetune(encoder_state, tensors, model_cfg=model_cfg, train_cfg=train_cfg,
                                          transfer_cfg=tcfg, seed=seed, mode=mode)
    return tuned
