"""The trainer's fused step (session 20, #15): one field/wide lookup a step (`ShopModel.training_impressions`) and
the experts, CTR/CVR gates and towers held in packed leaves while training (`ShopModel.packed_parameters`).

Both are rearrangements of the same computation: the same forward values, gradients summed in another order,
packed parameters updated by the same elementwise Adam. So training with them matches training without them up to
float rounding (FedProx and GradNorm included), and the state dict (names, shapes, separate storage) is unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from shared.features import FeatureConfig, ShopTensors
from shared.model import ModelConfig, ShopModel, build_model
from shared.tasks import StepCache, heads_for
from shared.train import TrainConfig, shared_layer_params, train_shop

STEPS = TrainConfig(epochs=1, batch_size=256, lr=0.01, max_steps=6, seed=2)


def _batches(tensors: ShopTensors) -> dict[str, dict[str, torch.Tensor]]:
    rows = tensors.rows["train"]
    out = {"impressions": {k: v[:200] for k, v in rows.items()},
           "positives": {k: v[rows["clicked"] == 1][:100] for k, v in rows.items()}}
    assert tensors.sales is not None
    out["sales"] = {k: v[:150] for k, v in tensors.sales["train"].items()}
    return out


def test_training_impressions_equal_the_separate_passes(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    """Logits, ranking users, item table and the sales rows' wide terms from the one-lookup pass equal those of
    `all_items`, `impression_logits_and_ranking_users` and the sales rows' own wide lookup."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    model.eval()  # no ID dropout: both ways compute the same function
    b = _batches(largest_shop)
    fused = model.training_impressions(b["impressions"], b["positives"], b["sales"])
    table = model.all_items()
    logits, users = model.impression_logits_and_ranking_users(b["impressions"], b["positives"], table)
    wide = model.encoder.wide_terms(model.item_cat.index_select(0, b["sales"]["item"]))
    assert torch.equal(fused.item_table, table) and torch.equal(fused.ranking_users, users)
    assert fused.logits.keys() == logits.keys() and all(torch.equal(fused.logits[t], logits[t]) for t in logits)
    assert fused.sales_wide is not None and torch.equal(fused.sales_wide, wide)
    without_rows = model.training_impressions(b["impressions"], None)
    assert without_rows.ranking_users is None and without_rows.sales_wide is None


def test_one_row_sparse_gradient_a_table_a_step(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's step looks the field and the wide table up once each (the catalog's, impression, ranking and
    sales rows' indices together), so autograd never merges two row-sparse gradients of one table."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    lookups: list[int] = []
    real = torch.nn.functional.embedding

    def counted(idx, weight, *args, **kwargs):
        if weight is model.encoder.fields.weight or weight is model.encoder.wide.weight:
            lookups.append(id(weight))
        return real(idx, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "embedding", counted)
    train_shop(model, largest_shop, replace(STEPS, max_steps=3))
    assert sorted(lookups) == sorted([id(model.encoder.fields.weight), id(model.encoder.wide.weight)] * 3)


@pytest.mark.parametrize("setting", ["default", "fedprox", "gradnorm", "frozen"])
def test_packed_training_matches_unpacked_training(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig,
        monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    """A few all-four steps with the packed leaves and with the parameters read one by one (the code before): the
    same losses and parameters up to float rounding (a packed tensor crosses Adam's vector/scalar boundary
    elsewhere), FedProx's pull and GradNorm's shared layers included; names, shapes and storage unchanged."""
    cfg = replace(tiny_model_cfg, weighting="gradnorm") if setting == "gradnorm" else tiny_model_cfg
    train = replace(STEPS, prox_mu=0.1 if setting == "fedprox" else 0.0, freeze_encoder=setting == "frozen")
    out = []
    for packed in (True, False):
        model = build_model(largest_shop, cfg, tiny_features, seed=0)
        start = {k: v.clone() for k, v in model.encoder_state().items()}
        if setting == "fedprox":  # a received encoder unlike the local one, so the pull is not zero
            with torch.no_grad():
                for p in model.encoder.parameters():
                    p.add_(0.01)
        if not packed:
            monkeypatch.setattr(ShopModel, "packed_parameters",
                                lambda self, encoder=True: contextlib.nullcontext([]))
        losses = train_shop(model, largest_shop, train, global_encoder=start if setting == "fedprox" else None)
        monkeypatch.undo()
        out.append((losses, model.state_dict()))
    (l1, s1), (l2, s2) = out
    assert l1.keys() == l2.keys() and all(l1[k] == pytest.approx(l2[k], rel=1e-5, abs=1e-7) for k in l1)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].shape == s2[k].shape, k
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-6, msg=k)
        # Each parameter has its own storage again (a checkpoint or a wire message holds just its values).
        assert s1[k].untyped_storage().nbytes() == s1[k].numel() * s1[k].element_size(), k


def test_packed_parameters_alias_the_leaves_and_are_restored(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    """Inside the block an update of a leaf is an update of the parameters it holds (and GradNorm's shared layers
    are the experts' last-layer leaves); outside, the parameters hold the updated values in their own storage."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    first = model.encoder.experts[1][0].weight
    before = first.detach().clone()
    with model.packed_parameters() as packs:
        assert len(packs) == 4 + 6  # experts (4 groups), CTR/CVR gates and towers (6 groups)
        assert [p.shape for p in shared_layer_params(model, packs)] == [
            packs[2].leaf.shape, packs[3].leaf.shape]
        with torch.no_grad():
            packs[0].leaf.add_(1.0)
        assert torch.equal(first, before + 1.0)
        item_table = model.all_items()
        losses = [h.loss(model, _batches(largest_shop)[h.source], item_table,
                         StepCache(largest_shop.catalog, torch.Generator().manual_seed(0)))
                  for h in heads_for(["ctr", "cvr", "sales"])]
        sum(losses).backward()
        assert first.grad is None and packs[0].leaf.grad is not None
    assert torch.equal(first, before + 1.0)
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()
    assert model.encoder._train_packs is None and model.local._train_packs is None
