"""Row-sparse local training: same model outputs and gradients as the dense path, updates confined to
the rows a batch touched (lazy Adam, weight decay and FedProx included), one impression forward per
step, every task set still learning, and the dense embeddings DP-SGD needs restored afterwards."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from shared.features import FeatureConfig, ShopTensors
from shared.lazy_adam import DenseAdam, LazyAdam
from shared.model import ModelConfig, ShopModel, build_model
from shared.tasks import StepCache, heads_for
from shared.train import TrainConfig, row_sparse_gradients, train_shop

STEP = TrainConfig(epochs=1, batch_size=256, lr=0.01, max_steps=1, seed=3)
TASK_SETS = [["ctr"], ["ctr", "cvr"], ["ranking"], ["sales"], ["ctr", "cvr", "ranking", "sales"]]


def _batch_loss(model: ShopModel, tensors: ShopTensors, seed: int = 0) -> torch.Tensor:
    """Sum of the task losses on a fixed batch of each source (fixed negatives), no dropout."""
    rows = tensors.rows["train"]
    batches = {"impressions": {k: v[:512] for k, v in rows.items()},
               "positives": {k: v[rows["clicked"] == 1][:512] for k, v in rows.items()}}
    if tensors.sales is not None:
        batches["sales"] = {k: v[:512] for k, v in tensors.sales["train"].items()}
    cache = StepCache(tensors.catalog, torch.Generator().manual_seed(seed))
    item_table = model.all_items()
    heads = heads_for([t for t in tensors.tasks if t in model.local.tasks])
    return sum(h.loss(model, batches[h.source], item_table, cache) for h in heads)


def _table_params(model: ShopModel) -> dict[str, torch.Tensor]:
    return {name: t.weight for name, t in zip(("fields", "products", "wide"), model.row_sparse_tables(),
                                               strict=True)}


def test_sparse_and_dense_paths_give_the_same_outputs_and_gradients(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    model.eval()  # no ID dropout: both passes see the same function
    results = {}
    for sparse in (False, True):
        model.zero_grad(set_to_none=True)
        with row_sparse_gradients(model.row_sparse_tables() if sparse else []):
            loss = _batch_loss(model, largest_shop)
            loss.backward()
            results[sparse] = (loss.detach(), {k: p.grad for k, p in _table_params(model).items()},
                               model.encoder.experts[0][0].weight.grad.clone())
    (loss_d, grads_d, expert_d), (loss_s, grads_s, expert_s) = results[False], results[True]
    assert torch.equal(loss_d, loss_s)
    assert torch.allclose(expert_d, expert_s, atol=1e-7)
    for name in grads_d:
        assert not grads_d[name].is_sparse and grads_s[name].is_sparse, name
        assert torch.allclose(grads_s[name].to_dense(), grads_d[name], atol=1e-7), name
        # The point of the sparse path: the gradient names only the few rows the batch used.
        assert grads_s[name].coalesce().indices().shape[1] < 0.5 * grads_d[name].shape[0], name


def test_sparse_step_equals_the_dense_step_on_touched_rows_and_leaves_the_rest(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    """One step with weight decay and FedProx from the same start: on the rows the batch touched, lazy Adam
    lands where dense Adam does (same gradient, L2 and proximal pull, same update); every other row keeps
    its value, where dense Adam decays and pulls it. Same loss on the step, same loss after it on a batch."""
    start = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    anchor = {k: v + 0.01 * torch.randn_like(v) for k, v in start.encoder_state().items()}
    cfg = replace(STEP, weight_decay=0.05, prox_mu=2.0)
    before = {k: p.detach().clone() for k, p in _table_params(start).items()}
    after, grads, losses, models = {}, {}, {}, {}
    for sparse in (False, True):
        model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
        names = {id(p): k for k, p in _table_params(model).items()}
        seen: dict[str, torch.Tensor] = {}

        def record(opt, args, kwargs, names=names, seen=seen):  # what each optimiser is handed
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in names and p.grad is not None:
                        seen[names[id(p)]] = p.grad.coalesce() if p.grad.is_sparse else p.grad.clone()

        handle = register_optimizer_step_pre_hook(record)
        try:
            losses[sparse] = train_shop(model, largest_shop, replace(cfg, sparse_embeddings=sparse),
                                        global_encoder=anchor)["loss"]
        finally:
            handle.remove()
        after[sparse] = {k: p.detach().clone() for k, p in _table_params(model).items()}
        grads[sparse], models[sparse] = seen, model
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for name, w0 in before.items():
        sparse_grad, dense_grad = grads[True][name], grads[False][name]
        assert sparse_grad.is_sparse and not dense_grad.is_sparse, name
        rows = torch.zeros(len(w0), dtype=torch.bool)
        rows[sparse_grad.indices()[0]] = True
        assert 0 < rows.sum() < 0.5 * len(w0), name
        # The dense path's gradient holds the proximal pull (it is in its loss); lazy Adam adds it itself.
        pull = cfg.prox_mu * (w0 - anchor[f"{name}.weight"])
        assert torch.allclose(sparse_grad.to_dense()[rows] + pull[rows], dense_grad[rows], atol=1e-6), name
        sparse_w, dense_w = after[True][name], after[False][name]
        assert torch.allclose(sparse_w[rows], dense_w[rows], atol=1e-6), f"{name}: not dense Adam's step there"
        assert not torch.equal(sparse_w[rows], w0[rows]), name
        assert torch.equal(sparse_w[~rows], w0[~rows]), f"{name}: lazy Adam moved untouched rows"
        assert not torch.equal(dense_w[~rows], w0[~rows]), f"{name}: dense Adam should decay/pull every row"
    for m in models.values():
        m.eval()
    with torch.no_grad():
        assert float(_batch_loss(models[True], largest_shop)) == pytest.approx(
            float(_batch_loss(models[False], largest_shop)), rel=1e-3)


@pytest.mark.parametrize("tasks", TASK_SETS, ids=["+".join(t) for t in TASK_SETS])
def test_sparse_training_lowers_the_loss_of_every_task_set(
        tasks: list[str], largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
        tiny_features: FeatureConfig) -> None:
    shop = replace(largest_shop, tasks=tasks)
    model = build_model(shop, tiny_model_cfg, tiny_features, seed=0)
    model.eval()
    with torch.no_grad():
        loss_before = float(_batch_loss(model, shop))
    out = train_shop(model, shop, replace(STEP, max_steps=15))
    model.eval()
    with torch.no_grad():
        loss_after = float(_batch_loss(model, shop))
    assert math.isfinite(out["loss"])
    assert loss_after < loss_before, (tasks, loss_before, loss_after)


def test_one_impression_forward_per_step(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                         tiny_features: FeatureConfig) -> None:
    """CTR and CVR share the step's impression logits (a cache.setdefault(..., forward()) ran it twice); the trainer's
    pass is `training_impressions` (it also builds the step's item table), any other impression pass counts too."""
    shop = replace(largest_shop, tasks=["ctr", "cvr"])
    model = build_model(shop, tiny_model_cfg, tiny_features, seed=0)
    calls = []
    for name in ("impression_logits", "training_impressions"):
        forward = getattr(model, name)

        def counted(*args, _forward=forward, _name=name, **kwargs):
            calls.append(_name)
            return _forward(*args, **kwargs)

        setattr(model, name, counted)  # instance attribute shadows the method
    out = train_shop(model, shop, replace(STEP, max_steps=4))
    assert {"loss-ctr", "loss-cvr"} <= set(out)
    assert calls == ["training_impressions"] * 4


def test_one_user_pass_per_step_with_ranking(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                             tiny_features: FeatureConfig) -> None:
    """The impression rows' user pass also computes the ranking rows' users: one `user_vectors` call a step."""
    shop = replace(largest_shop, tasks=["ctr", "cvr", "ranking"])
    model = build_model(shop, tiny_model_cfg, tiny_features, seed=0)
    calls = []
    forward = model.user_vectors

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return forward(*args, **kwargs)

    model.user_vectors = counted
    out = train_shop(model, shop, replace(STEP, max_steps=3))
    assert {"loss-ctr", "loss-cvr", "loss-ranking"} <= set(out)
    assert len(calls) == 3 and all(n > STEP.batch_size for n in calls)  # both row sets in one call


def test_tables_are_dense_again_after_training_even_on_error(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    """DP-SGD (Opacus) and GradNorm need ordinary dense embeddings: the sparse switch lives in train_shop."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    train_shop(model, largest_shop, replace(STEP, max_steps=2))
    assert not any(t.sparse for t in model.row_sparse_tables())
    assert all(t.weight.grad is None for t in model.row_sparse_tables())
    _batch_loss(model, largest_shop).backward()
    assert all(not t.weight.grad.is_sparse for t in model.row_sparse_tables())

    def broken(*args, **kwargs):
        assert all(t.sparse for t in model.row_sparse_tables())  # inside the step the tables are sparse
        raise RuntimeError("boom")

    model.all_items = broken  # the first forward piece of every step
    with pytest.raises(RuntimeError, match="boom"):
        train_shop(model, largest_shop, STEP)
    assert not any(t.sparse for t in model.row_sparse_tables())
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_encoder_and_dense_path_still_work(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                  tiny_features: FeatureConfig) -> None:
    for cfg in (replace(STEP, max_steps=3, freeze_encoder=True), replace(STEP, max_steps=3, sparse_embeddings=False)):
        model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
        enc = model.encoder_state()
        out = train_shop(model, largest_shop, cfg)
        assert math.isfinite(out["loss"])
        moved = any(not torch.equal(v, enc[k]) for k, v in model.encoder_state().items())
        assert moved != cfg.freeze_encoder, cfg


def test_fedprox_anchor_given_as_float64_arrays(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                tiny_features: FeatureConfig) -> None:
    """A received encoder may arrive as float64 NumPy arrays; the sparse tables' pull must still apply."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    anchor = {k: (v + 0.05).double().numpy() for k, v in model.encoder_state().items()}
    before = model.encoder.products.weight.detach().clone()
    out = train_shop(model, largest_shop, replace(STEP, max_steps=2, prox_mu=1.0), global_encoder=anchor)
    assert math.isfinite(out["loss"])
    assert model.encoder.products.weight.dtype == torch.float32
    assert not torch.equal(model.encoder.products.weight, before)


def test_padding_rows_of_the_field_tables_get_zero_gradient_and_stay_put(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    """The field lookups skip padding_idx (the padding mask zeroes those rows): row 0 of `fields` and
    `wide` still gets an exactly zero gradient in both paths, and sparse training (no decay) leaves it zero."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    fields, wide = model.encoder.fields.weight, model.encoder.wide.weight
    assert bool((largest_shop.rows["train"]["ctx_cat"] == 0).any() or (model.user_cat == 0).any()), \
        "the fixture should have padding fields for this test to mean anything"
    for sparse in (False, True):
        model.zero_grad(set_to_none=True)
        with row_sparse_gradients(model.row_sparse_tables() if sparse else []):
            _batch_loss(model, largest_shop).backward()
            for table in (fields, wide):
                grad = table.grad.to_dense() if sparse else table.grad
                assert torch.count_nonzero(grad[0]) == 0, (sparse, grad[0])
                assert torch.count_nonzero(grad[1:]) > 0
    fields.data[0] = 1.0  # a non-zero padding row (e.g. noise in a received encoder) is not trained either
    train_shop(model, largest_shop, replace(STEP, max_steps=5))
    assert torch.equal(fields[0].detach(), torch.ones_like(fields[0]))
    assert torch.count_nonzero(wide[0]) == 0


def test_dense_adam_is_bit_identical_to_fused_torch_adam() -> None:
    """DenseAdam's updates equal torch.optim.Adam(fused=True)'s bit for bit over several steps, with weight
    decay, two dtypes, and a parameter that misses a step's gradient (it keeps its own step count)."""
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(7, 5, generator=gen), torch.randn(4, generator=gen),
             torch.randn(3, 2, generator=gen).double(), torch.randn(6, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in start] for _ in range(5)]
    runs = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, fused=True),
                 lambda ps: DenseAdam(ps, lr=0.01, weight_decay=0.1)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step, gs in enumerate(grads):
            opt.zero_grad(set_to_none=True)
            for i, (p, g) in enumerate(zip(params, gs, strict=True)):
                if not (i == 3 and step in (1, 2)):  # the last parameter misses two steps
                    p.grad = g.clone()
            opt.step()
        runs.append([p.detach() for p in params])
    for a, b, s in zip(*runs, start, strict=True):
        assert not torch.equal(a, s)
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="sparse"):
        p = torch.nn.Parameter(torch.zeros(4, 2))
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2), check_invariants=True)
        DenseAdam([p]).step()


def test_dense_adam_planned_steps_are_bit_identical_and_replanned_when_the_set_changes() -> None:
    """DenseAdam's planned path (the same parameters with gradients at one step count, reused lists and one
    shared step tensor) equals torch.optim.Adam(fused=True) bit for bit over many steps, through a step where a
    parameter has no gradient (re-planned, its count behind), and after a state reload."""
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(9, 4, generator=gen), torch.randn(4, generator=gen), torch.randn(3, 3, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(8)]
    runs = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.02, weight_decay=0.01, fused=True),
                 lambda ps: DenseAdam(ps, lr=0.02, weight_decay=0.01)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step, gs in enumerate(grads):
            for p in params:
                p.grad = None
            for i, (p, g) in enumerate(zip(params, gs, strict=True)):
                if not (i == 1 and step == 5):
                    p.grad = g.clone()
            opt.step()
            if isinstance(opt, DenseAdam) and step in (1, 4):
                assert opt._plans, step  # the planned path serves the next step
            if step == 6:  # a reload forgets the plans (they hold the replaced states)
                opt.load_state_dict(opt.state_dict())
                assert not getattr(opt, "_plans", {})
        runs.append(([p.detach() for p in params], opt.state_dict()))
    (a_params, a_state), (b_params, b_state) = runs
    for a, b in zip(a_params, b_params, strict=True):
        assert torch.equal(a, b)
    counts = [s["count"] for s in b_state["state"].values()]
    assert counts == [8, 7, 8] and [float(s["step"]) for s in a_state["state"].values()] == counts


def test_training_with_and_without_the_packing_is_bit_identical(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A few all-four training steps with the experts packed once a step and packed per mixture (the code
    before): the same losses and parameters, bit for bit."""
    out = []
    for once in (True, False):
        model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
        if not once:
            monkeypatch.setattr(type(model.encoder), "packing_once", lambda self: contextlib.nullcontext())
        losses = train_shop(model, largest_shop, replace(STEP, max_steps=4))
        out.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (l1, s1), (l2, s2) = out
    assert l1 == l2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("lookups", [40, 3000])
def test_lazy_adam_touched_rows_equal_the_marking_by_advanced_indexing(lookups: int) -> None:
    """`LazyAdam._touched` (int64 marks through index_fill_/index_copy_/index_select, session 21): the same rows
    and bit-identical summed gradient rows as the bool mark and advanced indexing it replaced, on both the
    marking path (many lookups) and the sorting path (few), duplicates and row 0 included."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(1000, 4, generator=gen))
    idx = torch.randint(0, 150, (lookups,), generator=gen)
    values = torch.randn(lookups, 4, generator=gen)
    p.grad = torch.sparse_coo_tensor(idx[None], values, p.shape)
    rows, summed = LazyAdam([p])._touched(p)
    mark = torch.zeros(len(p), dtype=torch.bool)
    mark[idx] = True
    want_rows = mark.nonzero().squeeze(1)
    where = torch.empty(len(p), dtype=torch.long)
    where[want_rows] = torch.arange(len(want_rows))
    want = torch.zeros(len(want_rows), 4).index_add_(0, where[idx], values)
    assert torch.equal(rows, want_rows) and torch.equal(summed, want)
