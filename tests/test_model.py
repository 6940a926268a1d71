"""The encoder/local split of ShopModel: what may leave a shop, and that it is the same in every shop."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shared.features import FeatureConfig, ShopTensors
from shared.model import ModelConfig, ShopModel, build_model


def _tensor_ids(module: torch.nn.Module) -> set[int]:
    """Storage pointers of every parameter and buffer of a module."""
    return {t.data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}


def test_encoder_state_holds_nothing_local(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                           tiny_features: FeatureConfig) -> None:
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    # By identity: no encoder tensor is (or shares storage with) a local parameter.
    local_ptrs = _tensor_ids(model.local)
    encoder_live = {**dict(model.encoder.named_parameters()), **dict(model.encoder.named_buffers())}
    assert not {t.data_ptr() for t in encoder_live.values() if t.numel()} & local_ptrs
    local_params = set(map(id, model.local.parameters()))
    assert not local_params & set(map(id, model.encoder.parameters()))
    # Every trainable parameter is in exactly one half: the split is the whole model.
    assert local_params | set(map(id, model.encoder.parameters())) == set(map(id, model.parameters()))
    # The local part holds the user and local item ID embeddings and every task head.
    assert model.local.user_ids.weight.shape[0] == largest_shop.n_users
    assert model.local.item_ids.weight.shape[0] == largest_shop.n_items
    assert model.local.tasks == largest_shop.tasks
    # By shape: nothing the shop sends is sized by its user or item vocabulary.
    state = model.encoder_state()
    assert state, "encoder_state() is empty"
    vocab_sizes = {largest_shop.n_users, largest_shop.n_items}
    for key, tensor in state.items():
        assert tensor.dim() == 0 or tensor.shape[0] not in vocab_sizes, f"{key} {tuple(tensor.shape)}"
    # The copy sent away is detached from the live weights.
    assert not {t.data_ptr() for t in state.values() if t.numel()} & _tensor_ids(model)
    assert all(not t.requires_grad for t in state.values())


def test_encoder_keys_and_shapes_identical_across_shops(tiny_tensors: dict[str, ShopTensors],
                                                        id_only_shop: ShopTensors, largest_shop: ShopTensors,
                                                        tiny_model_cfg: ModelConfig,
                                                        tiny_features: FeatureConfig) -> None:
    ranking_only = replace(largest_shop, tasks=["ranking"])
    shops = [*tiny_tensors.values(), ranking_only]
    assert len({t.n_users for t in shops}) >= 3, "fixture shops should differ in vocabulary size"
    assert id_only_shop in shops
    models = [build_model(t, tiny_model_cfg, tiny_features, seed=0) for t in shops]
    reference = {k: tuple(v.shape) for k, v in models[0].encoder_state().items()}
    for t, m in zip(shops, models, strict=True):
        assert {k: tuple(v.shape) for k, v in m.encoder_state().items()} == reference, t.name
    # The local parts do differ: their shapes follow each shop's vocabulary and tasks.
    local_shapes = [{k: tuple(v.shape) for k, v in m.local_state().items()} for m in models]
    assert all(local_shapes[i] != local_shapes[0] for i in range(1, len(shops)))


def test_load_encoder_state_round_trip_between_shops(largest_shop: ShopTensors, id_only_shop: ShopTensors,
                                                     tiny_model_cfg: ModelConfig,
                                                     tiny_features: FeatureConfig) -> None:
    sender = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=1)
    receiver = build_model(id_only_shop, tiny_model_cfg, tiny_features, seed=2)
    sent = sender.encoder_state()
    local_before = receiver.local_state()
    assert any(not torch.equal(sent[k], v) for k, v in receiver.encoder_state().items())
    receiver.load_encoder_state({k: v.numpy() for k, v in sent.items()})  # arrive as NumPy over Flower
    got = receiver.encoder_state()
    assert got.keys() == sent.keys() and all(torch.equal(got[k], sent[k]) for k in sent)
    after = receiver.local_state()
    assert all(torch.equal(after[k], local_before[k]) for k in local_before), "loading touched the local part"


def test_load_encoder_state_is_strict(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                      tiny_features: FeatureConfig) -> None:
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    state = model.encoder_state()
    missing = dict(list(state.items())[1:])
    for bad in (missing, {**state, "local.user_ids.weight": torch.zeros(3, 8)}):
        try:
            model.load_encoder_state(bad)
        except RuntimeError:
            continue
        raise AssertionError("load_encoder_state accepted a state with wrong keys")


def test_local_state_round_trip(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                tiny_features: FeatureConfig) -> None:
    a = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    b = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=5)
    b.load_local_state(a.local_state())
    assert all(torch.equal(v, a.local_state()[k]) for k, v in b.local_state().items())
    # Vocabulary-bound keys are never in the list FedAvg-all may average.
    shareable = set(a.shareable_local_keys())
    vocab_sizes = {largest_shop.n_users, largest_shop.n_items}
    for key, value in a.local_state().items():
        if value.dim() and value.shape[0] in vocab_sizes:
            assert key not in shareable, key


def test_encoder_init_depends_only_on_seed(largest_shop: ShopTensors, id_only_shop: ShopTensors,
                                           tiny_model_cfg: ModelConfig, tiny_features: FeatureConfig) -> None:
    def encoder(t: ShopTensors, seed: int, cfg: ModelConfig = tiny_model_cfg) -> dict[str, torch.Tensor]:
        return build_model(t, cfg, tiny_features, seed=seed).encoder_state()

    a = encoder(largest_shop, 3)
    torch.manual_seed(12345)  # global RNG state before the call must not matter
    b = encoder(id_only_shop, 3, replace(tiny_model_cfg, tower_dim=4, weighting="uncertainty"))
    c = encoder(largest_shop, 4)
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different shop -> different encoder"
    assert any(not torch.equal(a[k], c[k]) for k in a), "different seeds gave the same encoder"


def test_forward_shapes(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                        tiny_features: FeatureConfig) -> None:
    model: ShopModel = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    rows = {k: v[:7] for k, v in largest_shop.rows["train"].items()}
    items = model.all_items()
    assert items.shape == (largest_shop.n_items, tiny_model_cfg.embed_dim)
    logits = model.impression_logits(rows, items)
    assert set(logits) == {"ctr", "cvr"} and all(v.shape == (7,) for v in logits.values())
    scores = model.ranking_scores(rows["user"], rows["hist"], torch.arange(5), items)
    assert scores.shape == (7, 5)
    sales = {k: v[:4] for k, v in largest_shop.sales["train"].items()}
    assert model.sales_log_rate(sales, items).shape == (4,)


def test_build_with_both_states_equals_build_then_load(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                       tiny_features: FeatureConfig) -> None:
    """A received encoder and a saved local part give the same model without random initialisation,
    and training it never writes into the caller's arrays (the received encoder doubles as FedProx's anchor)."""
    donor = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=5)
    encoder = {k: v.double().numpy() for k, v in donor.encoder_state().items()}  # as a reply might hold it
    local = donor.local_state()
    reference = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    reference.load_encoder_state(encoder)
    reference.load_local_state(local)
    built = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0, encoder_state=encoder, local_state=local)
    ref_state, got = reference.state_dict(), built.state_dict()
    assert ref_state.keys() == got.keys()
    assert all(torch.equal(ref_state[k], got[k]) and ref_state[k].dtype == got[k].dtype for k in ref_state)
    assert all(p.requires_grad and not p.is_meta for p in built.parameters())
    kept_encoder = {k: v.copy() for k, v in encoder.items()}
    kept_local = {k: v.clone() for k, v in local.items()}
    with torch.no_grad():
        for p in built.parameters():
            p.add_(1.0)
    assert all((encoder[k] == kept_encoder[k]).all() for k in kept_encoder), "encoder arrays shared with the model"
    assert all(torch.equal(local[k], kept_local[k]) for k in kept_local), "local tensors shared with the model"


def test_build_with_one_state_keeps_the_fresh_local_init(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                          tiny_features: FeatureConfig) -> None:
    """With only the encoder given, the local part is what a fresh build for the seed has (first round)."""
    fresh = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=3)
    encoder = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=9).encoder_state()
    built = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=3, encoder_state=encoder)
    assert all(torch.equal(v, fresh.local_state()[k]) for k, v in built.local_state().items())
    assert all(torch.equal(v, encoder[k]) for k, v in built.encoder_state().items())


def test_build_with_states_is_strict(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                     tiny_features: FeatureConfig) -> None:
    donor = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    encoder, local = donor.encoder_state(), donor.local_state()
    encoder.pop("wide.weight")
    with pytest.raises(RuntimeError, match="wide.weight"):
        build_model(largest_shop, tiny_model_cfg, tiny_features, encoder_state=encoder, local_state=local)


@pytest.mark.parametrize("sales_cols", [False, True])
def test_mixture_relu_on_the_expert_view_is_bit_identical(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                          tiny_features: FeatureConfig, sales_cols: bool) -> None:
    """`mixture` applies the ReLU to the (K, B, E_in) view of the first layers' output (session 21, a copy fewer in
    the backward): bit-identical outputs and input/parameter gradients to the ReLU before the reshape."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    enc, d = model.encoder, tiny_model_cfg.embed_dim
    cols = torch.cat([torch.arange(d, 3 * d), torch.arange(4 * d, 5 * d)]) if sales_cols else None
    x0 = torch.randn(37, 3 * d if sales_cols else 5 * d, generator=torch.Generator().manual_seed(4))
    g = torch.randn(37, tiny_model_cfg.n_experts, tiny_model_cfg.expert_dim, generator=torch.Generator().manual_seed(5))

    def relu_first(x: torch.Tensor) -> torch.Tensor:  # the formulation before session 21
        w1, b1, b2, w2 = enc._packed_experts()
        w1 = w1 if cols is None else w1.index_select(1, cols)
        h = torch.nn.functional.relu(torch.nn.functional.linear(x, w1, b1))
        h = h.reshape(-1, len(enc.experts), enc.experts[0][-1].in_features).transpose(0, 1)
        return torch.baddbmm(b2, h, w2).transpose(0, 1)

    out = []
    for f in (lambda x: enc.mixture(x, cols), relu_first):
        model.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = f(x)
        y.backward(g)
        out.append((y.detach(), x.grad, [p.grad.clone() for p in enc.experts.parameters()]))
    (y_new, gx_new, gp_new), (y_old, gx_old, gp_old) = out
    assert torch.equal(y_new, y_old) and torch.equal(gx_new, gx_old)
    assert all(torch.equal(a, b) for a, b in zip(gp_new, gp_old, strict=True))


def test_fused_mixture_equals_calling_each_expert(largest_shop: ShopTensors, tiny_model_cfg: ModelConfig,
                                                  tiny_features: FeatureConfig) -> None:
    """`mixture` runs the experts as two fused products: same outputs and parameter gradients as each expert."""
    model = build_model(largest_shop, tiny_model_cfg, tiny_features, seed=0)
    x = torch.randn(37, 5 * tiny_model_cfg.embed_dim)
    fused = model.encoder.mixture(x)
    fused.square().sum().backward()
    grads = [p.grad.clone() for p in model.encoder.experts.parameters()]
    model.zero_grad(set_to_none=True)
    each = torch.stack([e(x) for e in model.encoder.experts], 1)
    each.square().sum().backward()
    assert fused.shape == (37, tiny_model_cfg.n_experts, tiny_model_cfg.expert_dim)
    assert torch.allclose(fused, each, atol=1e-5)
    for g, p in zip(grads, model.encoder.experts.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-4)
