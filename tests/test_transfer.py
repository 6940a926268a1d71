"""Transfer to late joiners (shared.transfer, shared.meta, simulations.transfer) on a tiny synthetic world."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from shared.features import build_shop_tensors
from shared.meta import meta_train_shop, reptile_direction
from shared.model import build_model
from shared.scenario import ScenarioError, load_scenario, scenario_from_dict
from shared.train import TrainConfig, train_shop
from shared.transfer import TransferConfig, adapt_frozen_then_finetune, adapt_shop, validation_score
from simulations.transfer import (
    TransferError,
    TransferPlan,
    fraction_to_match,
    plan_transfer,
    run_transfer,
    summarize,
)

TINY = {"data.synthetic.n_shops": 2, "data.synthetic.n_late_joiners": 2, "data.synthetic.max_impressions": 1500,
        "data.synthetic.min_impressions": 800, "data.synthetic.n_small_shops": 0,
        "data.synthetic.eval_impressions": 0,
        "data.synthetic.late_joiner_impressions": 1200, "data.synthetic.days": 30, "model.embed_dim": 8,
        "model.expert_dim": 16, "model.tower_dim": 8, "model.n_experts": 2, "features.hash_buckets": 512,
        "features.product_buckets": 512, "train.batch_size": 256, "transfer.fractions": [0.5, 1.0]}
FAST = TransferConfig(max_periods=2, patience=1, min_steps=2)


def fedavg_encoder(scenario, rounds: int = 2) -> dict[str, torch.Tensor]:
    """A stand-in for the federation's encoder: plain in-process FedAvg of the training shops."""
    tensors = [build_shop_tensors(s, scenario.features) for s in scenario.training_shops()]
    models = [build_model(t, scenario.model, scenario.features, seed=scenario.seed) for t in tensors]
    encoder = models[0].encoder_state()
    for rnd in range(rounds):
        states, weights = [], []
        for model, t in zip(models, tensors, strict=True):
            model.load_encoder_state(encoder)
            out = train_shop(model, t, replace(scenario.train, seed=rnd))
            states.append(model.encoder_state())
            weights.append(out["num-examples"])
        total = sum(weights)
        encoder = {k: sum(w / total * s[k] for s, w in zip(states, weights, strict=True)) for k in encoder}
    return encoder


@pytest.fixture(scope="module")
def world():
    scenario = load_scenario("default", TINY)
    late = {s.name: build_shop_tensors(s, scenario.features) for s in scenario.joining_shops()}
    return scenario, late, fedavg_encoder(scenario, rounds=1)


def _kw(scenario):
    return {"model_cfg": scenario.model, "train_cfg": scenario.train, "transfer_cfg": FAST, "seed": 0}


def _equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_keeps_the_encoder_bit_identical_and_trains_the_local_part(world):
    scenario, late, encoder = world
    tensors = late["late_00"]
    fresh = build_model(tensors, scenario.model, scenario.features, seed=0).local_state()
    result = adapt_shop(encoder, tensors, "frozen", **_kw(scenario))
    assert _equal(result.model.encoder_state(), encoder)
    assert not _equal(result.model.local_state(), fresh)
    assert {"ctr", "ranking"} <= set(result.test)
    assert 0 <= result.test["ctr"]["auc"] <= 1


def test_finetune_starts_from_the_encoder_and_changes_it(world):
    scenario, late, encoder = world
    frozen, tuned = adapt_frozen_then_finetune(encoder, late["late_00"], **_kw(scenario))
    assert _equal(frozen.model.encoder_state(), encoder)
    assert tuned.val_score >= frozen.val_score  # the frozen weights compete in the fine-tune stage
    if tuned.chosen == "finetune":
        assert not _equal(tuned.model.encoder_state(), encoder)
    else:
        assert _equal(tuned.model.encoder_state(), encoder)
    forced = adapt_shop(encoder, late["late_00"], "finetune", **{**_kw(scenario),
                                                                 "transfer_cfg": replace(FAST, patience=5)})
    assert forced.periods > frozen.periods


def test_scratch_ignores_the_encoder_and_meta_needs_one(world):
    scenario, late, encoder = world
    a = adapt_shop(None, late["late_00"], "scratch", **_kw(scenario))
    b = adapt_shop(encoder, late["late_00"], "scratch", **_kw(scenario))
    assert _equal(a.model.encoder_state(), b.model.encoder_state())
    assert not _equal(a.model.encoder_state(), encoder)
    with pytest.raises(ValueError, match="needs the federation's encoder"):
        adapt_shop(None, late["late_00"], "meta", **_kw(scenario))
    with pytest.raises(ValueError, match="unknown"):
        adapt_shop(encoder, late["late_00"], "distill", **_kw(scenario))


def test_meta_mode_keeps_the_better_stage_on_validation(world):
    scenario, late, encoder = world
    result = adapt_shop(encoder, late["late_00"], "meta", **_kw(scenario))
    assert result.mode == "meta" and result.chosen in {"frozen", "finetune"}
    assert math.isfinite(result.val_score)
    assert result.val_score == pytest.approx(validation_score(result.val))


def test_id_only_joiner_adapts_in_every_mode(world):
    scenario, late, encoder = world
    tensors = late["late_01"]
    assert scenario.joining_shops()[1].items is None and scenario.joining_shops()[1].users is None
    for mode in ("scratch", "frozen", "finetune"):
        result = adapt_shop(encoder, tensors, mode, **_kw(scenario))
        assert 0 <= result.test["ctr"]["auc"] <= 1, mode


def test_encoder_of_another_model_size_is_refused_with_the_fix(world):
    scenario, late, encoder = world
    wrong = {k: v[..., :4] if v.dim() > 1 else v for k, v in encoder.items()}
    with pytest.raises(ValueError, match="Fix: use an encoder trained with"):
        adapt_shop(wrong, late["late_00"], "frozen", **_kw(scenario))


def test_fractions_are_nested_and_share_validation_and_test(world):
    _, late, _ = world
    full = late["late_00"]
    small, large = full.subsample_train(0.2, seed=3), full.subsample_train(0.6, seed=3)

    def keys(t):
        r = t.rows["train"]
        return set(zip(r["user"].tolist(), r["item"].tolist(), r["ctx_cat"][:, 0].tolist(), strict=True))

    assert 0 < len(keys(small)) < len(keys(large)) < len(keys(full))
    assert keys(small) <= keys(large) <= keys(full)
    for split in ("val", "test"):
        for col in ("user", "item", "clicked", "purchased"):
            assert torch.equal(small.rows[split][col], full.rows[split][col])
            assert torch.equal(large.rows[split][col], full.rows[split][col])


def test_meta_train_shop_gives_a_finite_reptile_update_and_scales_it(world):
    scenario, late, encoder = world
    tensors = late["late_00"]
    cfg = TrainConfig(batch_size=128, lr=3e-3, seed=1)
    model = build_model(tensors, scenario.model, scenario.features, seed=0)
    model.load_encoder_state(encoder)
    out = meta_train_shop(model, tensors, cfg, inner_steps=3)
    step = reptile_direction(encoder, model.encoder_state())
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in step.values()))
    assert math.isfinite(out["loss"]) and out["num-examples"] > 0
    assert math.isfinite(norm) and norm > 0
    half = build_model(tensors, scenario.model, scenario.features, seed=0)
    half.load_encoder_state(encoder)
    meta_train_shop(half, tensors, cfg, inner_steps=3, outer_step=0.5)
    half_step = reptile_direction(encoder, half.encoder_state())
    for k in step:
        torch.testing.assert_close(half_step[k], 0.5 * step[k], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="inner_steps"):
        meta_train_shop(model, tensors, cfg, inner_steps=0)


def test_plan_needs_late_joiners_and_known_modes():
    with pytest.raises(TransferError, match="no late joiners"):
        plan_transfer(load_scenario("default", {**TINY, "data.synthetic.n_late_joiners": 0}))
    with pytest.raises(ScenarioError, match=r"transfer\.modes = 'distill'"):  # refused when the scenario loads
        load_scenario("default", {**TINY, "transfer.modes": ["scratch", "distill"]})
    plan = plan_transfer(load_scenario("default", {**TINY, "transfer.fractions": [0.1], "transfer.modes": ["frozen"]}))
    assert plan.fractions == [0.1, 1.0] and plan.modes == ["scratch", "frozen"]


def test_data_saved_is_the_smallest_fraction_reaching_scratch_at_full_data():
    assert fraction_to_match({0.05: 0.60, 0.25: 0.71, 1.0: 0.75}, 0.70, True) == 0.25
    assert fraction_to_match({0.05: 0.60, 1.0: 0.65}, 0.70, True) is None
    assert fraction_to_match({0.05: 0.9, 0.25: 0.5}, 0.6, False) == 0.25  # WAPE: lower is better
    plan = TransferPlan(shops=["s"], fractions=[0.05, 0.25, 1.0], modes=["scratch", "frozen"], seeds=[0])
    rows = [("scratch", 0.05, 0.60), ("scratch", 0.25, 0.66), ("scratch", 1.0, 0.70),
            ("frozen", 0.05, 0.67), ("frozen", 0.25, 0.72), ("frozen", 1.0, 0.74)]
    frame = pd.DataFrame([{"shop": "s", "mode": m, "fraction": f, "task": "ctr", "metric": "auc", "value": v}
                          for m, f, v in rows])
    summary = summarize(frame, plan)
    assert summary["shops"]["s"]["ctr"]["data_saved"]["frozen"] == pytest.approx(0.75)
    gain = summary["targets"]["ctr_auc_f0.05_vs_scratch_f0.05"]
    assert gain["mean_gain"] == pytest.approx(0.07)
    assert summary["targets"]["ctr_auc_f0.25_vs_scratch_f1"]["mean_gain"] == pytest.approx(0.02)
    diag = {"s": {"item_fields_seen": 0.0, "product_keys_seen": 0.9, "user_fields_seen": 1.0,
                  "test_impressions": 1000, "test_clicks": 30}}
    why = summarize(frame, plan, diagnostics=diag)["targets"]["ctr_auc_f0.25_vs_scratch_f1"]["shops"]["s"]
    assert why["explanation"].startswith("reaches it") and "0% of its item category/brand values" in why["explanation"]


def test_run_transfer_writes_csv_plot_and_summary_from_given_encoders(world, tmp_path):
    scenario, _, encoder = world
    from server.checkpoint import Checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "fed", Checkpoint(3, {k: v.numpy() for k, v in encoder.items()}))
    scenario = scenario_from_dict(scenario.raw, {"transfer.fractions": [1.0]})
    out = run_transfer(scenario, tmp_path / "out", encoder=tmp_path / "fed", meta_encoder=tmp_path / "fed",
                       workers=1, transfer_cfg=TransferConfig(max_periods=1, patience=1, min_steps=1))
    frame = pd.read_csv(out / "transfer.csv")
    assert list(frame.columns) == ["shop", "mode", "fraction", "task", "metric", "value"]
    assert set(frame["shop"]) == {"late_00", "late_01"}
    assert set(frame["mode"]) == {"scratch", "frozen", "finetune", "meta"}
    assert set(frame["fraction"]) == {1.0}
    assert {"ctr", "ranking"} <= set(frame["task"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["shops"]) == {"late_00", "late_01"}
    assert "ctr" in summary["shops"]["late_01"]  # the ID-only joiner is reported
    diag = summary["join_diagnostics"]
    assert diag["late_01"]["item_fields_seen"] is None  # IDs only: nothing for the encoder's field tables
    assert 0 <= diag["late_00"]["item_fields_seen"] <= 1 and diag["late_00"]["test_clicks"] > 0
    assert (out / "transfer.png").stat().st_size > 1000
    assert "Data saved" in (out / "summary.md").read_text()
