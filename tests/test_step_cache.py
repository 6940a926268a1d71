"""The task heads' per-step cache (`shared.tasks.StepCache`): who writes and who reads each field, typed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shared.features import FeatureConfig, ShopTensors
from shared.model import ModelConfig, ShopModel, build_model
from shared.tasks import StepCache, TaskHead, heads_for
from shared.train import TrainConfig, measure_task_conflict, train_shop


def _batches(tensors: ShopTensors) -> dict[str, dict[str, torch.Tensor]]:
    rows = tensors.rows["train"]
    return {"impressions": {k: v[:256] for k, v in rows.items()},
            "positives": {k: v[rows["clicked"] == 1][:256] for k, v in rows.items()}}


def _counted(model: ShopModel, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls of the model's user-pass methods from now on (the methods still run)."""
    calls = {"impression_logits": 0, "impression_logits_and_ranking_users": 0, "ranking_users": 0}
    for name in calls:
        real = getattr(model, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(model, name, spy)
    return calls


def _losses(model: ShopModel, tensors: ShopTensors, cache: StepCache) -> dict[str, torch.Tensor]:
    batches = _batches(tensors)
    item_table = model.all_items()
    return {h.name: h.loss(model, batches[h.source], item_table, cache) for h in heads_for(["ctr", "cvr", "ranking"])}


def test_impression_heads_share_one_pass_and_ranking_takes_their_users(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    model.eval()  # no dropout: the shared and the separate passes give the same values
    calls = _counted(model, monkeypatch)
    alone = StepCache(largest_shop.catalog, torch.Generator().manual_seed(1))
    separate = _losses(model, largest_shop, alone)
    assert calls == {"impression_logits": 1, "impression_logits_and_ranking_users": 0, "ranking_users": 1}
    assert alone.impressions is not None and alone.ranking_users is None

    for name in calls:
        calls[name] = 0
    positives = _batches(largest_shop)["positives"]
    both = StepCache(largest_shop.catalog, torch.Generator().manual_seed(1), positives=positives)
    shared = _losses(model, largest_shop, both)
    # CTR wrote the logits and the ranking rows' users in one pass, CVR read the logits, ranking took the users
    assert calls == {"impression_logits": 0, "impression_logits_and_ranking_users": 1, "ranking_users": 0}
    assert both.ranking_users is None  # taken: a second ranking loss on this cache computes its own
    for name, value in separate.items():
        torch.testing.assert_close(shared[name], value, rtol=1e-5, atol=1e-6)


def test_trainer_gives_every_head_a_step_cache_with_its_ranking_rows(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, StepCache]] = []
    for head in heads_for(["ctr", "cvr", "ranking", "sales"]):
        real = type(head).loss

        def spy(self: TaskHead, model, batch, item_table, cache, _real=real):
            seen.append((self.name, cache))
            return _real(self, model, batch, item_table, cache)

        monkeypatch.setattr(type(head), "loss", spy)
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    train_shop(model, largest_shop, TrainConfig(epochs=1, batch_size=256, lr=0.01, max_steps=2, seed=0))
    assert len(seen) == 8 and all(isinstance(c, StepCache) for _, c in seen)
    steps = [seen[:4], seen[4:]]
    for step in steps:
        assert len({id(c) for _, c in step}) == 1  # one cache a step, shared by its heads
        cache = step[0][1]
        assert cache.catalog is largest_shop.catalog and cache.positives is not None  # ranking beside CTR/CVR
        assert cache.impressions is not None and cache.ranking_users is None  # written, then taken
    assert steps[0][0][1] is not steps[1][0][1]  # a fresh cache each step

    seen.clear()
    only_ranking = replace(largest_shop, tasks=["ranking"])
    model = build_model(only_ranking, tiny_model_cfg, tiny_features, seed=0)
    train_shop(model, only_ranking, TrainConfig(epochs=1, batch_size=256, lr=0.01, max_steps=1, seed=0))
    assert [n for n, _ in seen] == ["ranking"] and seen[0][1].positives is None  # no impression head to share with

    seen.clear()
    measure_task_conflict(build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0), largest_shop)
    assert {n for n, _ in seen} == {"ctr", "cvr", "ranking", "sales"}
    assert all(isinstance(c, StepCache) and c.positives is None for _, c in seen)
