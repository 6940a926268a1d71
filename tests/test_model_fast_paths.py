"""The model's fast paths compute the functions they replaced, on the same parameters.

Row-sparse mean pools, split field-group means, batched CTR/CVR gates and towers and the skipped numeric
context must leave the state dict (keys, shapes) and the outputs as they were: a golden file written by the
model before them (9b60ed7, and bd3c232 which computes the same) pins both, so old checkpoints and encoder
arrays load strictly and give the same outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shared.features import FeatureConfig, ShopTensors
from shared.model import ITEM_CROSSES, ModelConfig, ShopModel, _bi_interaction, _pool, _sparse_mean, build_model
from shared.train import row_sparse_gradients

GOLDEN = Path(__file__).parent / "data" / "model_outputs_9b60ed7.pt"


def _dense_padded_mean(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The old pooling: gather every slot (B, F, d), zero the padding, divide by the valid count."""
    mask = (idx > 0).unsqueeze(-1).to(table.dtype)
    return (table[idx] * mask).sum(-2) / mask.sum(-2).clamp(min=1)


def _padded_indices(shape: tuple[int, ...], n: int, keep: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, n, shape, generator=gen) * (torch.rand(shape, generator=gen) < keep)
    idx[0] = 0  # a row with no valid index at all (its mean is zero)
    return idx


@pytest.mark.parametrize("keep", [0.04, 0.5, 1.0])
def test_row_sparse_mean_equals_the_dense_padded_mean(keep: float) -> None:
    for shape in [(64, 20), (5, 7, 3)]:
        table = torch.randn(300, 16, requires_grad=True)
        idx = _padded_indices(shape, 300, keep, seed=len(shape))
        got = _sparse_mean(table, idx)
        (g_got,) = torch.autograd.grad(got.square().sum(), table)
        want = _dense_padded_mean(table, idx)
        (g_want,) = torch.autograd.grad(want.square().sum(), table)
        assert got.shape == (*shape[:-1], 16)
        assert torch.allclose(got, want, atol=1e-6) and torch.allclose(g_got, g_want, atol=1e-6)
        assert torch.count_nonzero(got.reshape(-1, 16)[0]) == 0


def test_pool_equals_embedding_bag_mean_with_sparse_gradients() -> None:
    emb = torch.nn.Embedding(300, 16, sparse=True)
    idx = _padded_indices((40, 3), 300, 0.9, seed=1)
    got = _pool(emb, idx)
    got.square().sum().backward()
    sparse_grad = emb.weight.grad.to_dense()
    want = F.embedding_bag(idx, emb.weight, mode="mean", padding_idx=0)
    (g_want,) = torch.autograd.grad(want.square().sum(), emb.weight)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(sparse_grad, g_want, atol=1e-6)


def _model(shop: ShopTensors, cfg: ModelConfig, fcfg: FeatureConfig, tasks: list[str]) -> ShopModel:
    model = build_model(replace(shop, tasks=tasks), cfg, fcfg, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_batched_gates_and_towers_equal_the_per_task_path(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                         tiny_features: FeatureConfig, dropout: float) -> None:
    """Outputs and every parameter gradient as calling each task's gate and tower (dropout: the per-task
    fallback, compared in eval mode)."""
    model = _model(largest_shop, replace(tiny_model_cfg, dropout=dropout), tiny_features, ["ctr", "cvr"])
    model.eval()
    d, cfg = tiny_model_cfg.embed_dim, tiny_model_cfg
    x = torch.randn(33, 5 * d)
    experts = torch.randn(33, cfg.n_experts, cfg.expert_dim)
    params = list(model.local.parameters())
    got = model.local.gated_towers(["ctr", "cvr"], x, experts)
    g_got = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    want = torch.stack([model.local.towers[t](model.local.gate(t, x, experts)).squeeze(-1) for t in ("ctr", "cvr")])
    g_want = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    assert got.shape == (2, 33) and torch.allclose(got, want, atol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))


def _old_impression_logits(model: ShopModel, batch: dict[str, torch.Tensor],
                           item_table: torch.Tensor) -> dict[str, torch.Tensor]:
    """impression_logits as it was before the fast paths (dense pools, slices, zeros context, per-task heads)."""
    enc, loc = model.encoder, model.local
    user_cat, ctx_cat = model.user_cat[batch["user"]], batch["ctx_cat"]
    fields = torch.cat([user_cat, model.item_cat[batch["item"]], ctx_cat], 1)
    mask = (fields > 0).unsqueeze(-1).float()
    e = enc.fields.weight[fields] * mask
    bi = 0.5 * (e.sum(1) ** 2 - (e ** 2).sum(1))
    wide = (enc.wide.weight[fields] * mask).sum(1)
    n_user, n_ctx = user_cat.shape[1], ctx_cat.shape[1]
    side = e[:, :n_user].sum(1) / (user_cat > 0).sum(1, keepdim=True).clamp(min=1)
    hist_vec = F.embedding_bag(batch["hist"], item_table, mode="mean", padding_idx=0)
    u = enc.users(side, loc.user_ids(batch["user"]), hist_vec)
    v = item_table[batch["item"]]
    num_vec = loc.ctx_num(batch["ctx_num"]) if loc.ctx_num is not None else torch.zeros_like(u)
    ctx_mean = e[:, e.shape[1] - n_ctx:].sum(1) / (ctx_cat > 0).sum(1, keepdim=True).clamp(min=1)
    c = enc.ctx_tower(ctx_mean + num_vec)
    x = torch.cat([u, v, c, u * v, bi], -1)
    experts = torch.stack([ex(x) for ex in enc.experts], 1)
    return {t: loc.towers[t](loc.gate(t, x, experts)).squeeze(-1) + wide[:, i] for i, t in enumerate(("ctr", "cvr"))
            if t in loc.towers}


@pytest.mark.parametrize("tasks", [["ctr"], ["ctr", "cvr"], ["cvr"]])
def test_impression_logits_and_gradients_equal_the_old_path(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                           tiny_features: FeatureConfig, tasks: list[str]) -> None:
    model = _model(largest_shop, tiny_model_cfg, tiny_features, tasks)
    model.eval()  # no ID dropout: both paths see the same function
    rows = largest_shop.rows["train"]
    batch = {k: v[:128] for k, v in rows.items()}
    assert (batch["hist"] == 0).any() and (batch["hist"] > 0).any(), "fixture batch should mix padding and history"
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fn in (model.impression_logits, lambda b, t: _old_impression_logits(model, b, t)):
        out = fn(batch, model.all_items())
        loss = sum(v.square().sum() for v in out.values())
        results.append((out, torch.autograd.grad(loss, params, allow_unused=True)))
    (new, g_new), (old, g_old) = results
    assert new.keys() == old.keys() == set(tasks)
    assert all(torch.allclose(new[t], old[t], atol=1e-5) for t in tasks)
    for p, a, b in zip(params, g_new, g_old, strict=True):
        assert (a is None) == (b is None), p.shape
        assert a is None or torch.allclose(a, b, atol=1e-5), p.shape


def test_absent_numeric_context_allocates_no_zeros(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                   tiny_features: FeatureConfig,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shop = replace(largest_shop, n_ctx_num=0, rows={s: {**r, "ctx_num": r["ctx_num"][:, :0]}
                                                    for s, r in largest_shop.rows.items()})
    model = build_model(shop, tiny_model_cfg, tiny_features, seed=0)
    assert model.local.ctx_num is None
    calls = []
    for name in ("zeros", "zeros_like"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k))
    out = model.impression_logits({k: v[:16] for k, v in shop.rows["train"].items()}, model.all_items())
    assert not calls and out["ctr"].shape == (16,)


def test_golden_checkpoint_loads_strictly_and_gives_the_old_outputs(
        tiny_tensors: dict[str, ShopTensors], tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    """A state dict written by 9b60ed7's model: same keys and shapes now, and the same outputs."""
    golden = torch.load(GOLDEN)
    shop = tiny_tensors[golden["shop"]]
    model = build_model(shop, tiny_model_cfg, tiny_features, seed=0)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in golden["state"].items()}
    model.load_state_dict(golden["state"], strict=True)
    enc = {k[len("encoder."):]: v for k, v in golden["state"].items() if k.startswith("encoder.")}
    assert model.encoder_state().keys() == enc.keys()
    model.eval()
    rows = {k: v[:64] for k, v in shop.rows["train"].items()}
    sales = {k: v[:32] for k, v in shop.sales["train"].items()}
    want = golden["outputs"]
    with torch.no_grad():
        items = model.all_items()
        got = {"items": items, **{f"impr_{k}": v for k, v in model.impression_logits(rows, items).items()},
               "ranking": model.ranking_scores(rows["user"], rows["hist"], torch.arange(shop.n_items), items),
               "sales": model.sales_log_rate(sales, items)}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), (k, float((got[k] - want[k]).abs().max()))


def _old_sales_log_rate(model: ShopModel, batch: dict[str, torch.Tensor], item_table: torch.Tensor) -> torch.Tensor:
    """sales_log_rate as it was: the zero user and user-item blocks built into the joint input (B, 5d)."""
    enc, loc = model.encoder, model.local
    v = item_table[batch["item"]]
    s = loc.sales_in(batch["x"])
    bi, wide = enc.crosses(model.item_cat[batch["item"]])
    zero = torch.zeros_like(v)
    x = torch.cat([zero, v, s, zero, bi], -1)
    experts = torch.stack([ex(x) for ex in enc.experts], 1)
    h = loc.gate("sales", x, experts)
    return loc.towers["sales"](torch.cat([h, s], -1)).squeeze(-1) + wide[:, 2]


def test_sales_log_rate_and_gradients_equal_the_zero_block_path(largest_shop: ShopTensors,
                                                                tiny_model_cfg: ModelConfig,
                                                                tiny_features: FeatureConfig) -> None:
    """The sales rows skip the joint input's zero blocks: same outputs and every parameter gradient."""
    model = _model(largest_shop, tiny_model_cfg, tiny_features, ["ctr", "sales"])
    model.eval()
    batch = {k: v[:96] for k, v in largest_shop.sales["train"].items()}
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fn in (model.sales_log_rate, lambda b, t: _old_sales_log_rate(model, b, t)):
        out = fn(batch, model.all_items())
        results.append((out, torch.autograd.grad(out.square().sum(), params, allow_unused=True)))
    (new, g_new), (old, g_old) = results
    assert new.shape == (96,) and torch.allclose(new, old, atol=1e-5)
    assert any(a is not None and a.abs().sum() > 0 for a in g_new)
    for p, a, b in zip(params, g_new, g_old, strict=True):
        assert (a is None) == (b is None), p.shape
        assert a is None or torch.allclose(a, b, atol=1e-5), p.shape


def test_sales_crosses_from_the_catalog_equal_the_row_lookup(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                            tiny_features: FeatureConfig) -> None:
    """The per-item crosses `all_items` carries give the sales rows the values a lookup of their fields gives,
    and every parameter the same gradient (up to summation order), with the row-sparse tables too."""
    model = _model(largest_shop, tiny_model_cfg, tiny_features, ["ctr", "sales"])
    batch = {k: v[:96] for k, v in largest_shop.sales["train"].items()}
    for sparse in (False, True):
        for t in model.row_sparse_tables():
            t.sparse = sparse
        table = model.all_items()
        assert getattr(table, ITEM_CROSSES, None) is not None
        results = []
        for t in (table, table.view_as(table)):  # a view carries no per-item crosses: the row lookup
            out = model.sales_log_rate(batch, t)
            grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), retain_graph=True,
                                        allow_unused=True)
            results.append((out, [g.to_dense() if g is not None and g.is_sparse else g for g in grads]))
        (new, g_new), (old, g_old) = results
        assert torch.equal(new, old)
        assert sum(g is not None for g in g_new) > 10
        for a, b in zip(g_new, g_old, strict=True):
            assert (a is None) == (b is None)
            assert a is None or torch.allclose(a, b, atol=1e-6)
    assert getattr(build_model(replace(largest_shop, tasks=["ctr"]), tiny_model_cfg, tiny_features).all_items(),
                   ITEM_CROSSES, None) is None  # no sales, no crosses computed


def test_bi_interaction_by_products_equals_the_power_form() -> None:
    """Squares as products: bit-identical values and gradient to ``** 2``."""
    e = torch.randn(64, 9, 8, requires_grad=True)
    new = _bi_interaction(e, e.sum(1))
    old = 0.5 * (e.sum(1) ** 2 - (e ** 2).sum(1))
    w = torch.randn_like(old)
    assert torch.equal(new, old)
    assert torch.equal(torch.autograd.grad((new * w).sum(), e)[0], torch.autograd.grad((old * w).sum(), e)[0])


@pytest.mark.parametrize("padded", [False, True])
def test_field_terms_skip_the_mask_only_without_padding(padded: bool, largest_shop: ShopTensors,
                                                        tiny_model_cfg: ModelConfig,
                                                        tiny_features: FeatureConfig) -> None:
    """Crosses, wide terms and group means equal the always-masked computation, with and without padding."""
    enc = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0).encoder
    with torch.no_grad():
        enc.fields.weight[0].normal_()  # a non-zero padding row (e.g. after DP noise): the mask must still hide it
        enc.wide.weight.normal_()
    idx = torch.randint(1, tiny_features.hash_buckets, (32, 6), generator=torch.Generator().manual_seed(1))
    if padded:
        idx[3, 1] = idx[5, 4] = 0
    bi, wide, means = enc.field_terms(idx, (2, 4), pooled=(0, 1))
    mask = (idx > 0).unsqueeze(-1).float()
    e = enc.fields.weight[idx] * mask
    assert torch.equal(bi, 0.5 * (e.sum(1) ** 2 - (e ** 2).sum(1)))
    assert torch.equal(wide, (enc.wide.weight[idx] * mask).sum(1))
    for got, part, m in zip(means, e.split([2, 4], 1), mask.split([2, 4], 1), strict=True):
        assert torch.equal(got, part.sum(1) / m.sum(1).clamp(min=1))
    assert torch.equal(_pool(enc.fields, idx), e.sum(1) / mask.sum(1).clamp(min=1))


def test_sales_rows_touch_only_their_own_wide_rows(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                  tiny_features: FeatureConfig) -> None:
    """With the crosses from the catalog, a sales batch's row-sparse ``wide`` gradient still names only its
    rows' item fields (lazy Adam moves no other row), and ``fields`` only rows the item pool looks up."""
    model = _model(largest_shop, tiny_model_cfg, tiny_features, ["ctr", "sales"])
    batch = {k: v[:40] for k, v in largest_shop.sales["train"].items()}
    with row_sparse_gradients(model.row_sparse_tables()):
        model.sales_log_rate(batch, model.all_items()).sum().backward()
        wide_rows = set(model.encoder.wide.weight.grad._indices()[0].tolist())
        field_rows = set(model.encoder.fields.weight.grad._indices()[0].tolist())
    assert wide_rows == set(model.item_cat[batch["item"]].flatten().tolist())
    assert field_rows == set(model.item_cat.flatten().tolist())


@pytest.mark.parametrize("training", [False, True])
def test_one_user_pass_for_impression_and_ranking_rows_equals_two(largest_shop: ShopTensors,
                                                                  tiny_model_cfg: ModelConfig,
                                                                  tiny_features: FeatureConfig, training: bool) -> None:
    """`impression_logits_and_ranking_users` gives `impression_logits` and `ranking_users` of both row sets (ID
    dropout masks drawn in the same order in training), and every parameter the same gradient up to summation
    order, with the row-sparse tables too."""
    model = _model(largest_shop, tiny_model_cfg, tiny_features, ["ctr", "cvr", "ranking"])
    model.train(training)
    rows = largest_shop.rows["train"]
    batch = {k: v[:128] for k, v in rows.items()}
    pos = rows["clicked"] == 1
    rank_rows = {k: v[pos][:96] for k, v in rows.items()}
    params = list(model.parameters())
    for sparse in (False, True):
        for t in model.row_sparse_tables():
            t.sparse = sparse
        results = []
        for joint in (True, False):
            torch.manual_seed(5)
            table = model.all_items()
            if joint:
                logits, users = model.impression_logits_and_ranking_users(batch, rank_rows, table)
            else:
                logits = model.impression_logits(batch, table)
                users = model.ranking_users(rank_rows["user"], rank_rows["hist"], table)
            loss = sum(v.square().sum() for v in logits.values()) + users.square().sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            results.append((logits, users, [g.to_dense() if g is not None and g.is_sparse else g for g in grads]))
        (l_new, u_new, g_new), (l_old, u_old, g_old) = results
        assert l_new.keys() == l_old.keys() == {"ctr", "cvr"}
        assert all(torch.allclose(l_new[t], l_old[t], atol=1e-6) for t in l_new)
        assert torch.allclose(u_new, u_old, atol=1e-6)
        assert sum(g is not None for g in g_new) > 10
        for a, b in zip(g_new, g_old, strict=True):
            assert (a is None) == (b is None)
            assert a is None or torch.allclose(a, b, atol=1e-6)


def test_one_candidate_a_row_scores_equal_the_einsum(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                     tiny_features: FeatureConfig) -> None:
    """Scores of one candidate per row (training positives) by product and sum: einsum's values and gradients."""
    model = _model(largest_shop, tiny_model_cfg, tiny_features, ["ctr", "ranking"])
    table = model.all_items().detach().requires_grad_()
    users = torch.randn(40, table.shape[1], requires_grad=True)
    items = torch.randint(1, len(table), (40, 1))
    got = model.candidate_scores(users, items, table)
    want = torch.einsum("bd,bcd->bc", users, table[items]) + model.local.item_bias(items).squeeze(-1)
    assert got.shape == (40, 1) and torch.allclose(got, want, atol=1e-6)
    g_got = torch.autograd.grad(got.square().sum(), [users, table])
    g_want = torch.autograd.grad(want.square().sum(), [users, table])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_got, g_want, strict=True))


def test_experts_packed_once_a_step_give_the_same_outputs_and_gradients(
        largest_shop: ShopTensors, tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    """`SharedEncoder.packing_once`: the impression and sales mixtures of a step share one packing of the
    experts' weights, with the same outputs and bit-identical parameter gradients (each element's gradient
    is the same two terms summed), and the packing is built once inside the block, fresh outside it."""
    model = _model(largest_shop, tiny_model_cfg, tiny_features, ["ctr", "cvr", "sales"])
    model.eval()
    rows = {k: v[:200] for k, v in largest_shop.rows["train"].items()}
    sales = {k: v[:150] for k, v in largest_shop.sales["train"].items()}
    params = [p for p in model.parameters() if p.requires_grad]
    packs: list[tuple[torch.Tensor, ...]] = []
    pack = model.encoder._packed_experts
    model.encoder._packed_experts = lambda: packs.append(pack()) or packs[-1]
    results = []
    for once in (False, True):
        packs.clear()
        with model.encoder.packing_once() if once else contextlib.nullcontext():
            table = model.all_items()
            logits = model.impression_logits(rows, table)
            rate = model.sales_log_rate(sales, table)
        loss = logits["ctr"].square().sum() + logits["cvr"].sum() + rate.exp().sum()
        results.append((logits, rate, torch.autograd.grad(loss, params, allow_unused=True)))
        assert len(packs) == 2 and all((a is b) == once for a, b in zip(*packs, strict=True))
    assert model.encoder._packing is None
    (lg0, r0, g0), (lg1, r1, g1) = results
    assert torch.equal(lg0["ctr"], lg1["ctr"]) and torch.equal(lg0["cvr"], lg1["cvr"]) and torch.equal(r0, r1)
    expert = {id(p) for e in model.encoder.experts for p in e.parameters()}
    for p, a, b in zip(params, g0, g1, strict=True):
        assert (a is None) == (b is None), p.shape
        assert a is None or torch.equal(a, b), p.shape
        if id(p) in expert:
            assert a is not None and a.abs().sum() > 0
