"""Multi-task loss weighting: learning behaviour on toy problems, state round-trips, partial batches."""

import io
import math

import pytest
import torch
from torch import nn

from shared.weighting import (
    WEIGHTINGS,
    DWAWeighting,
    FixedWeighting,
    GradNormWeighting,
    LossWeighting,
    UncertaintyWeighting,
    make_weighting,
    task_conflict,
)

TASKS = ["ctr", "cvr"]


def _toy_losses(shared: nn.Linear | None = None, seed: int = 0) -> tuple[nn.Linear, dict[str, torch.Tensor]]:
    """A shared linear layer (new unless given) and two task losses that depend on it."""
    torch.manual_seed(seed)
    shared = shared or nn.Linear(4, 3)
    x = torch.randn(16, 4)
    h = shared(x)
    return shared, {"ctr": h[:, 0].pow(2).mean(), "cvr": (h[:, 1] - 1).pow(2).mean()}


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_weighting_combines_full_partial_and_single_task_dicts(name: str) -> None:
    shared, losses = _toy_losses()
    weighting = make_weighting(name, TASKS)
    assert isinstance(weighting, LossWeighting)
    params = list(shared.parameters())
    full = weighting.combine(losses, params)
    assert full.ndim == 0
    full.backward()
    assert shared.weight.grad is not None and shared.weight.grad.abs().sum() > 0
    weighting.after_step()
    # A batch without the cvr task: only ctr contributes, the result matches ctr's own weighting.
    shared.zero_grad()
    _, losses = _toy_losses(shared)
    partial = weighting.combine({"ctr": losses["ctr"]}, params)
    partial.backward()
    w = weighting.weights()
    assert set(w) == set(TASKS)
    if name != "uncertainty":
        assert partial.item() == pytest.approx(w["ctr"] * losses["ctr"].item())
    # A shop with a single task.
    single = make_weighting(name, ["sales"])
    _, losses = _toy_losses(shared)
    single.combine({"sales": losses["cvr"]}, params).backward()
    single.after_step()
    single.end_epoch({"sales": 1.0})
    assert set(single.weights()) == {"sales"}


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_state_dict_round_trip(name: str) -> None:
    shared, losses = _toy_losses()
    weighting = make_weighting(name, TASKS)
    opt = torch.optim.SGD(list(shared.parameters()) + list(weighting.parameters()), lr=0.1)
    for epoch in range(3):
        opt.zero_grad()
        _, losses = _toy_losses(shared, seed=epoch)
        weighting.combine(losses, list(shared.parameters())).backward()
        opt.step()
        weighting.after_step()
        weighting.end_epoch({"ctr": 1.0 / (epoch + 1), "cvr": 1.0})
    buf = io.BytesIO()
    torch.save(weighting.state_dict(), buf)
    buf.seek(0)
    restored = make_weighting(name, TASKS)
    restored.load_state_dict(torch.load(buf))
    assert restored.weights() == pytest.approx(weighting.weights())
    for (k1, v1), (k2, v2) in zip(weighting.state_dict().items(), restored.state_dict().items(), strict=True):
        assert k1 == k2
        assert torch.equal(v1.nan_to_num(-1.0), v2.nan_to_num(-1.0))
    if name != "fixed":
        assert weighting.weights() != pytest.approx(dict.fromkeys(TASKS, 1.0)), "state never moved"


def test_uncertainty_log_variance_moves_to_log_loss() -> None:
    losses = {"ctr": torch.tensor(4.0), "cvr": torch.tensor(0.25)}
    weighting = UncertaintyWeighting(TASKS)
    opt = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        weighting.combine(losses, []).backward()
        opt.step()
    # d/ds (exp(-s) L + s) = 0  ->  s = log L
    assert weighting.log_vars.tolist() == pytest.approx([math.log(4.0), math.log(0.25)], abs=0.02)
    assert weighting.weights() == pytest.approx({"ctr": 0.25, "cvr": 4.0}, rel=0.03)


def test_uncertainty_learns_noise_levels_on_a_toy_regression() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 3)
    y_a = x.sum(1) + 2.0 * torch.randn(512)  # noise variance 4
    y_b = x[:, 0] + 0.5 * torch.randn(512)  # noise variance 0.25
    model = nn.Linear(3, 2)
    weighting = UncertaintyWeighting(["a", "b"])
    opt = torch.optim.Adam(list(model.parameters()) + list(weighting.parameters()), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        out = model(x)
        losses = {"a": (out[:, 0] - y_a).pow(2).mean(), "b": (out[:, 1] - y_b).pow(2).mean()}
        weighting.combine(losses, []).backward()
        opt.step()
    final = [losses["a"].item(), losses["b"].item()]
    assert final == pytest.approx([4.0, 0.25], rel=0.2)
    assert weighting.log_vars.tolist() == pytest.approx([math.log(v) for v in final], abs=0.1)


def _grad_norm_ratio(shared: nn.Module, heads: nn.ModuleDict, weights: dict, x, ys) -> float:
    """||grad(w_a L_a)|| / ||grad(w_b L_b)|| on the shared layer."""
    h = shared(x)
    norms = []
    for task in ("a", "b"):
        loss = weights[task] * ys[task][1] * (heads[task](h).squeeze(1) - ys[task][0]).pow(2).mean()
        grads = torch.autograd.grad(loss, list(shared.parameters()), retain_graph=True)
        norms.append(torch.cat([g.reshape(-1) for g in grads]).norm().item())
    return norms[0] / norms[1]


def test_gradnorm_balances_gradient_norms_of_tasks_with_10x_loss_scales() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    ys = {"a": (x @ torch.randn(6), 1.0), "b": (x @ torch.randn(6), 10.0)}  # (target, loss scale)
    shared = nn.Linear(6, 8)
    heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in ys})
    weighting = GradNormWeighting(["a", "b"], alpha=1.5)
    start = _grad_norm_ratio(shared, heads, weighting.weights(), x, ys)
    model_params = list(shared.parameters()) + list(heads.parameters())
    opt = torch.optim.Adam([*model_params, *weighting.parameters()], lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        h = shared(x)
        losses = {t: s * (heads[t](h).squeeze(1) - y).pow(2).mean() for t, (y, s) in ys.items()}
        weighting.combine(losses, [shared.weight]).backward()
        opt.step()
        weighting.after_step()
    end = _grad_norm_ratio(shared, heads, weighting.weights(), x, ys)
    assert abs(math.log(start)) > math.log(5)  # the 10x scale shows up in the gradients
    assert abs(math.log(end)) < 0.5 * abs(math.log(start))
    w = weighting.weights()
    assert w["a"] > w["b"] > 0
    assert sum(w.values()) == pytest.approx(2.0)


def test_gradnorm_gives_model_grads_of_weighted_sum_and_weights_the_gradnorm_grad() -> None:
    shared, losses = _toy_losses()
    params = list(shared.parameters())
    weighting = GradNormWeighting(TASKS)
    expected_model_grad = torch.autograd.grad(losses["ctr"] + losses["cvr"], shared.weight, retain_graph=True)[0]
    norms = [_norm(losses[t], params) for t in TASKS]
    total = weighting.combine(losses, params)
    assert total.item() == pytest.approx(losses["ctr"].item() + losses["cvr"].item())  # w = 1
    weighting.zero_grad(set_to_none=True)  # a trainer zeroing grads after combine() must not lose them
    total.backward()
    assert torch.allclose(shared.weight.grad, expected_model_grad)
    # First step: r_t = 1, target = mean G, so d/dw_t sum |w_t n_t - Gbar| = sign(n_t - mean n) n_t.
    mean = sum(norms) / 2
    assert weighting.task_weights.grad.tolist() == pytest.approx([math.copysign(n, n - mean) for n in norms])
    # The first losses seen are kept as L(0) and persist in the state dict.
    assert weighting.state_dict()["initial_losses"].tolist() == pytest.approx(
        [losses["ctr"].item(), losses["cvr"].item()]
    )


def _norm(loss: torch.Tensor, params: list) -> float:
    """Norm of loss's gradient over params."""
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads]).norm().item()


def test_gradnorm_after_step_renormalises_to_task_count_and_positive() -> None:
    weighting = GradNormWeighting(["a", "b", "c"])
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([-1.0, 2.0, 6.0]))
    weighting.after_step()
    w = weighting.task_weights.detach()
    assert w.sum().item() == pytest.approx(3.0)
    assert (w > 0).all()


def test_dwa_weights_sum_to_task_count_and_favour_slowest_task() -> None:
    dwa = DWAWeighting(TASKS, temperature=2.0)
    dwa.end_epoch({"ctr": 1.0, "cvr": 1.0})
    assert dwa.weights() == pytest.approx({"ctr": 1.0, "cvr": 1.0})  # not enough history yet
    dwa.end_epoch({"ctr": 0.5, "cvr": 0.9})
    # r = (0.5, 0.9); w = 2 softmax(r / 2)
    e_ctr, e_cvr = math.exp(0.25), math.exp(0.45)
    expected = {"ctr": 2 * e_ctr / (e_ctr + e_cvr), "cvr": 2 * e_cvr / (e_ctr + e_cvr)}
    assert dwa.weights() == pytest.approx(expected)
    assert sum(dwa.weights().values()) == pytest.approx(2.0)
    assert dwa.weights()["cvr"] > dwa.weights()["ctr"]
    losses = {"ctr": torch.tensor(2.0), "cvr": torch.tensor(3.0)}
    assert dwa.combine(losses, []).item() == pytest.approx(2 * expected["ctr"] + 3 * expected["cvr"])


def test_dwa_keeps_history_of_a_task_missing_from_an_epoch() -> None:
    dwa = DWAWeighting(TASKS)
    dwa.end_epoch({"ctr": 1.0, "cvr": 1.0})
    dwa.end_epoch({"ctr": 1.0})  # no cvr data this epoch
    dwa.end_epoch({"cvr": 0.1})  # cvr ratio 0.1 vs ctr ratio 1.0
    w = dwa.weights()
    assert w["ctr"] > w["cvr"]
    assert sum(w.values()) == pytest.approx(2.0)


def test_fixed_weighting_uses_given_weights() -> None:
    fixed = FixedWeighting(TASKS, weights={"cvr": 0.5})
    losses = {"ctr": torch.tensor(2.0), "cvr": torch.tensor(4.0)}
    assert fixed.combine(losses, []).item() == pytest.approx(2.0 + 0.5 * 4.0)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sales'\]"):
        FixedWeighting(TASKS, weights={"sales": 1.0})


def test_task_conflict_cosines() -> None:
    shared, losses = _toy_losses()
    params = list(shared.parameters())
    loss = losses["ctr"]
    same = task_conflict({"ctr": loss, "cvr": 2 * loss}, params)
    assert same == pytest.approx({"ctr|cvr": 1.0})
    opposite = task_conflict({"cvr": -loss, "ctr": loss}, params)
    assert opposite == pytest.approx({"ctr|cvr": -1.0})
    three = task_conflict({"sales": losses["cvr"], "ctr": loss, "cvr": loss}, params)
    assert set(three) == {"ctr|cvr", "ctr|sales", "cvr|sales"}
    assert task_conflict({"ctr": loss}, params) == {}
    (loss + losses["cvr"]).backward()  # graph retained for the trainer's backward
    assert shared.weight.grad is not None


def test_bad_names_and_tasks_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss weighting 'pcgrad'; choose one of: dwa, fixed, gradnorm"):
        make_weighting("pcgrad", TASKS)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sales'\]"):
        make_weighting("fixed", TASKS).combine({"sales": torch.tensor(1.0)}, [])
    with pytest.raises(ValueError, match="'ctr' must be a scalar"):
        make_weighting("uncertainty", TASKS).combine({"ctr": torch.ones(3)}, [])
    with pytest.raises(ValueError, match="unique"):
        make_weighting("dwa", ["ctr", "ctr"])
    with pytest.raises(ValueError, match="losses is empty"):
        make_weighting("gradnorm", TASKS).combine({}, [])
