"""Lazy Adam for row-sparse embedding gradients: Adam's own fused kernel, run on the touched rows only.

Why not `torch.optim.SparseAdam`: per table and step it coalesces the gradient (a sort of every lookup,
tens of thousands per batch here) and runs about ten sparse-tensor ops, which on CPU cost about as much
as the dense Adam pass it avoids. Here the touched rows are found in linear time (a mark per table row,
no sort; a sort of the lookups when they are few against the table's rows), the lookups' gradients are
summed into those rows with one ``index_add_``, and the update is Adam's fused kernel (what
`torch.optim.adam.adam(fused=True)` runs) on the gathered rows, written back with ``index_copy_``.

Semantics: a touched row gets exactly dense Adam's update for that row (same moments, same bias
correction and eps placement, coupled weight decay); an untouched row, and its moments, stay as they are
(dense Adam would keep moving it by its momentum and decay it). The step count is per table, as in Adam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn


def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """What `torch.optim.Optimizer.step` does with its optional closure: re-evaluate the loss with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class LazyAdam(torch.optim.Optimizer):
    """Adam over row-sparse gradients (sparse COO, rows on dim 0) that reads and writes touched rows only.

    ``anchors`` (parameter -> tensor of its shape) with ``prox_mu`` adds FedProx's pull
    ``prox_mu * (w - anchor)`` to the gradient of the touched rows, as ``weight_decay`` adds ``wd * w``.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, prox_mu: float = 0.0,
                 anchors: Mapping[nn.Parameter, torch.Tensor] | None = None) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or prox_mu < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LazyAdam: need lr > 0, eps > 0, weight_decay >= 0, prox_mu >= 0 and betas in [0, 1); "
                             f"got lr={lr}, eps={eps}, weight_decay={weight_decay}, prox_mu={prox_mu}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.prox_mu = prox_mu
        self.anchors = dict(anchors or {})

    def _touched(self, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct rows the gradient names (ascending) and their summed gradient rows."""
        g = p.grad
        if g.is_sparse:
            idx, values = g._indices()[0], g._values()  # uncoalesced: one entry per lookup
        else:  # a dense gradient (e.g. a table read outside its module): every row with a non-zero entry
            idx = g.reshape(len(g), -1).ne(0).any(1).nonzero().squeeze(1)
            values = g[idx]
        if not g.is_sparse:
            return idx, values
        if len(idx) * 8 < len(p):  # few lookups in a large table: sorting them beats marking every row
            rows, pos = torch.unique(idx, sorted=True, return_inverse=True)
        else:  # one int64 mark per row, then the same tensor maps a touched row to its position among them
            # (index_fill_, index_copy_ and index_select: the plain kernels, not advanced indexing's)
            where = torch.zeros(len(p), dtype=torch.long).index_fill_(0, idx, 1)
            rows = where.nonzero().view(-1)
            pos = where.index_copy_(0, rows, torch.arange(len(rows))).index_select(0, idx)
        return rows, torch.zeros((len(rows), *p.shape[1:]), dtype=values.dtype).index_add_(0, pos, values)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer's signature)
        """One lazy Adam step on every parameter that has a gradient."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # The touched rows of every table of the group, updated by one fused call per dtype (the kernel
            # takes lists; each tensor keeps its own table's step count).
            todo: dict[torch.dtype, list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    # Adam's two moments side by side (moments[0] = exp_avg, moments[1] = exp_avg_sq): one
                    # gather and one scatter of the touched rows serve both.
                    state["moments"] = torch.zeros((2, *p.shape), dtype=p.dtype)
                rows, grad = self._touched(p)
                if not len(rows):
                    continue
                w = p.index_select(0, rows)
                if p in self.anchors and self.prox_mu:
                    grad = grad + self.prox_mu * (w - self.anchors[p].index_select(0, rows))
                state["step"] += 1  # what torch.optim.adam.adam(fused=True) does, minus its grouping and checks
                todo.setdefault(p.dtype, []).append((p, rows, w, grad, state["moments"].index_select(1, rows),
                                                     state["step"]))
            for items in todo.values():
                torch._fused_adam_([t[2] for t in items], [t[3] for t in items], [t[4][0] for t in items],
                                   [t[4][1] for t in items], [], [t[5] for t in items], amsgrad=False,
                                   lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                   eps=group["eps"], maximize=False)
                for p, rows, w, _, moments, _ in items:
                    p.index_copy_(0, rows, w)
                    self.state[p]["moments"].index_copy_(1, rows, moments)
        return loss


class DenseAdam(torch.optim.Optimizer):
    """``torch.optim.Adam(fused=True)`` on dense gradients: the same kernel on the same state, less overhead.

    Adam keeps a scalar step tensor per parameter and increments them with ``_foreach_add_``, which on CPU
    costs ~9 us a tensor (~0.5 ms a step over this model's ~50 dense parameters, more than the update
    itself); here each parameter's step count is a Python int and the parameters at the same count share
    one scalar tensor built for the call. The updates are bit-identical to Adam's (tests). Parameters
    without a gradient are skipped and keep their count, as in Adam. While the same parameters have gradients
    at one count (a training round's usual step), a cached plan (their per-dtype lists and states) replaces the
    per-parameter pass.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"DenseAdam: need lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1); "
                             f"got lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        # Per parameter group: the ids of the parameters the last step updated, their states and their
        # per-dtype lists, reused while the same parameters have gradients at one shared step count.
        self._plans: dict[int, tuple[list[int], list[dict], list[tuple[list[torch.Tensor], ...]]]] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """`torch.optim.Optimizer.load_state_dict`, forgetting the step plans (they hold the old states)."""
        self._plans.clear()
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer's signature)
        """One Adam step on every parameter that has a (dense) gradient."""
        loss = _closure_loss(closure)
        for gi, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            plan = self._plans.get(gi)
            if plan is None or plan[0] != [id(p) for p in with_grad] or not _same_count(plan[1]):
                self._plans.pop(gi, None)
                self._step_each(group, with_grad)
                states = [self.state[p] for p in with_grad]
                if states and _same_count(states):  # the next step can take the planned path
                    self._plans[gi] = ([id(p) for p in with_grad], states, _by_dtype(with_grad, states))
                continue
            _, states, by_dtype = plan
            count = states[0]["count"] + 1
            for state in states:
                state["count"] = count
            step = torch.tensor(float(count), dtype=torch.float32)  # float32, as Adam's fused step tensors
            beta1, beta2 = group["betas"]
            for params, exp_avgs, exp_avg_sqs in by_dtype:
                torch._fused_adam_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], [step] * len(params),
                                   amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return loss

    def _step_each(self, group: dict, with_grad: list[nn.Parameter]) -> None:
        """The step parameter by parameter: states created on first use, one step tensor per distinct count."""
        beta1, beta2 = group["betas"]
        by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], ...]] = {}
        counts: dict[int, torch.Tensor] = {}
        for p in with_grad:
            if p.grad.is_sparse:
                raise RuntimeError("DenseAdam does not take sparse gradients; use LazyAdam")
            state = self.state[p]
            if not state:
                state["count"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["count"] += 1
            step = counts.get(state["count"])
            if step is None:  # float32, as Adam's fused step tensors
                step = counts[state["count"]] = torch.tensor(float(state["count"]), dtype=torch.float32)
            lists = by_dtype.setdefault(p.dtype, ([], [], [], [], []))
            for lst, t in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], step), strict=True):
                lst.append(t)
        for params, grads, exp_avgs, exp_avg_sqs, steps in by_dtype.values():
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                               beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                               maximize=False)


def _same_count(states: list[dict]) -> bool:
    """Whether the parameters' step counts are all equal (then one step tensor serves them all)."""
    return all(s["count"] == states[0]["count"] for s in states)


def _by_dtype(params: list[nn.Parameter], states: list[dict]) -> list[tuple[list[torch.Tensor], ...]]:
    """(parameters, exp_avgs, exp_avg_sqs) lists per dtype, in the parameters' order (what a fused call takes)."""
    out: dict[torch.dtype, tuple[list[torch.Tensor], ...]] = {}
    for p, state in zip(params, states, strict=True):
        for lst, t in zip(out.setdefault(p.dtype, ([], [], [])), (p, state["exp_avg"], state["exp_avg_sq"]),
                          strict=True):
            lst.append(t)
    return list(out.values())
