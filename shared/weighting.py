"""Multi-task loss weighting (fixed, uncertainty, GradNorm, DWA) and task-conflict measurement.

Every weighting is an nn.Module whose state (learnable weights, loss history) lives in parameters
and buffers, so it is saved with the shop's private LocalPart and never leaves the shop.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

MIN_GRADNORM_WEIGHT = 1e-3  # GradNorm weights stay strictly positive after each step


class LossWeighting(nn.Module, ABC):
    """Combines a dict of per-task scalar losses into the one scalar the trainer back-propagates."""

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("loss weighting needs at least one task name")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {tasks}")
        self.tasks: tuple[str, ...] = tuple(tasks)
        self._index = {t: i for i, t in enumerate(self.tasks)}

    def _present(self, losses: Mapping[str, Tensor]) -> tuple[list[int], Tensor]:
        """Indices of the tasks present in this batch and their losses stacked as a (P,) tensor."""
        if not losses:
            raise ValueError("losses is empty; pass at least one task's loss")
        unknown = [t for t in losses if t not in self._index]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in losses; this weighting knows {list(self.tasks)}")
        idx, values = [], []
        for task in self.tasks:
            if task in losses:
                loss = losses[task]
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss for task {task!r} must be a scalar tensor; reduce it with .mean()")
                idx.append(self._index[task])
                values.append(loss.reshape(()))
        return idx, torch.stack(values)

    def _pick(self, t: Tensor, idx: list[int]) -> Tensor:
        """``t[idx]``, or ``t`` itself when every task is present in order (the usual step): the same values and
        gradient without an index op, its backward's zero-filled scatter and a list-to-tensor conversion."""
        return t if len(idx) == len(self.tasks) else t[idx]

    @abstractmethod
    def combine(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> Tensor:
        """Scalar to call .backward() on; tasks missing from the batch are simply left out."""

    def after_step(self) -> None:
        """Hook run after the optimizer step (GradNorm renormalises its weights here)."""

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """Hook run with each task's mean loss at the end of an epoch (DWA uses the loss ratios)."""

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """Current effective weight of every task, for logging."""


class FixedWeighting(LossWeighting):
    """Constant weights (default 1.0 each): the plain sum of task losses."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None):
        super().__init__(tasks)
        given = dict(weights or {})
        unknown = sorted(set(given) - set(self.tasks))
        if unknown:
            raise ValueError(f"weights given for unknown task(s) {unknown}; tasks are {list(self.tasks)}")
        values = [float(given.get(t, 1.0)) for t in self.tasks]
        if any(v < 0 for v in values):
            raise ValueError(f"task weights must be >= 0, got {dict(zip(self.tasks, values, strict=True))}")
        self.register_buffer("task_weights", torch.tensor(values))

    def combine(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> Tensor:
        """Weighted sum of the present tasks' losses."""
        idx, values = self._present(losses)
        return (self._pick(self.task_weights, idx).to(values) * values).sum()

    def weights(self) -> dict[str, float]:
        """The fixed weights."""
        return dict(zip(self.tasks, self.task_weights.tolist(), strict=True))


class UncertaintyWeighting(LossWeighting):
    """Kendall, Gal & Cipolla 2018: sum_t exp(-s_t) L_t + s_t with learnable log variances s_t."""

    def __init__(self, tasks: Sequence[str]):
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))  # s_t; optimum is s_t = log L_t

    def combine(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> Tensor:
        """Precision-weighted losses plus the log-variance regulariser, over the present tasks."""
        idx, values = self._present(losses)
        s = self._pick(self.log_vars, idx).to(values)
        return (torch.exp(-s) * values + s).sum()

    def weights(self) -> dict[str, float]:
        """exp(-s_t), the factor each task loss is multiplied by."""
        return dict(zip(self.tasks, torch.exp(-self.log_vars.detach()).tolist(), strict=True))


def _flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """Gradient of loss w.r.t. params as one flat vector (zeros for params the loss does not touch)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


class GradNormWeighting(LossWeighting):
    """Chen et al. 2018 GradNorm: learnable w_t pulled so each task's gradient norm on the shared
    parameters tracks the mean norm scaled by its relative inverse training rate to the power alpha."""

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5):
        super().__init__(tasks)
        if alpha < 0:
            raise ValueError(f"GradNorm alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))  # w_t, renormalised to sum T
        # L_t(0): first loss seen per task (NaN until seen); a buffer so it persists across rounds.
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), float("nan")))

    def combine(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> Tensor:
        """sum_t w_t L_t; on backward the model treats w as constant and w gets only the GradNorm-loss grad."""
        idx, values = self._present(losses)
        with torch.no_grad():
            unseen = torch.isnan(self.initial_losses[idx])
            self.initial_losses[torch.tensor(idx)[unseen]] = values.detach()[unseen].to(self.initial_losses)
        w = self.task_weights[idx]
        total = (w.detach().to(values) * values).sum()
        params = [p for p in shared_params if p.requires_grad]
        if not (self.training and values.requires_grad and params and len(idx) > 1):
            return total
        # ||grad(w_t L_t)|| = w_t ||grad L_t|| since w_t is a positive scalar outside L_t's graph,
        # so G_t stays differentiable in w_t without a second-order graph through the model.
        norms = torch.stack([_flat_grad(values[j], params).norm() for j in range(len(idx))])
        g = w * norms.to(w)  # (P,) G_t
        init = self.initial_losses[idx].to(w)
        loss_ratio = torch.where(init > 0, values.detach().to(w) / init, torch.ones_like(init))
        inverse_rate = loss_ratio.clamp(min=0) / loss_ratio.clamp(min=0).mean().clamp(min=1e-12)  # r_t
        target = (g.mean() * inverse_rate**self.alpha).detach()
        gradnorm_loss = (g - target).abs().sum()
        # Adding (x - x.detach()) leaves the value unchanged and sends d gradnorm_loss/dw into w.grad on the
        # trainer's backward, rather than writing w.grad here, which an optimizer.zero_grad() called between
        # combine() and backward() would silently wipe.
        return total + (gradnorm_loss - gradnorm_loss.detach()).to(total)

    def after_step(self) -> None:
        """Keep weights positive and rescale them to sum to the number of tasks."""
        with torch.no_grad():
            self.task_weights.clamp_(min=MIN_GRADNORM_WEIGHT)
            self.task_weights.mul_(len(self.tasks) / self.task_weights.sum())

    def weights(self) -> dict[str, float]:
        """The learned w_t."""
        return dict(zip(self.tasks, self.task_weights.detach().tolist(), strict=True))


class DWAWeighting(LossWeighting):
    """Liu, Johns & Davison 2019 Dynamic Weight Average: w_t = T softmax(r_t / temperature) where
    r_t = L_t(epoch-1) / L_t(epoch-2); equal weights until a task has two epochs of history."""

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"DWA temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        n = len(self.tasks)
        self.register_buffer("last_losses", torch.full((n,), float("nan")))
        self.register_buffer("previous_losses", torch.full((n,), float("nan")))
        self.register_buffer("task_weights", torch.ones(n))

    def combine(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> Tensor:
        """Weighted sum of the present tasks' losses with this epoch's DWA weights."""
        idx, values = self._present(losses)
        return (self._pick(self.task_weights, idx).to(values) * values).sum()

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """Record this epoch's mean losses and recompute the weights for the next epoch."""
        unknown = sorted(set(epoch_losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in epoch_losses; tasks are {list(self.tasks)}")
        for task, value in epoch_losses.items():
            i = self._index[task]
            self.previous_losses[i] = self.last_losses[i]
            self.last_losses[i] = float(value)
        ratio = self.last_losses / self.previous_losses
        # A ratio of non-positive or missing losses means nothing; such tasks count as unchanged (r = 1).
        usable = torch.isfinite(ratio) & (self.previous_losses > 0) & (self.last_losses >= 0)
        ratio = torch.where(usable, ratio, torch.ones_like(ratio))
        self.task_weights.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))

    def weights(self) -> dict[str, float]:
        """The DWA weights in use this epoch."""
        return dict(zip(self.tasks, self.task_weights.tolist(), strict=True))


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "dwa": DWAWeighting,
    "fixed": FixedWeighting,
    "gradnorm": GradNormWeighting,
    "uncertainty": UncertaintyWeighting,
}


def make_weighting(name: str, tasks: Sequence[str], **kwargs: object) -> LossWeighting:
    """Build a loss weighting by its config name (TrainConfig.weighting)."""
    try:
        cls = WEIGHTINGS[name]
    except KeyError:
        raise ValueError(f"unknown loss weighting {name!r}; choose one of: {', '.join(WEIGHTINGS)}") from None
    return cls(tasks, **kwargs)


def task_conflict(losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> dict[str, float]:
    """Cosine similarity of each pair of task gradients on the shared parameters ("a|b", names sorted).

    +1 means the tasks pull the shared parameters the same way, -1 opposite; NaN if a gradient is zero.
    The graph is retained, so the trainer can still call backward afterwards.
    """
    params = [p for p in shared_params if p.requires_grad]
    if not params:
        raise ValueError("task_conflict needs shared parameters that require grad")
    grads = {task: _flat_grad(loss, params) for task, loss in losses.items()}
    out: dict[str, float] = {}
    for a, b in itertools.combinations(sorted(grads), 2):
        na, nb = grads[a].norm(), grads[b].norm()
        if na == 0 or nb == 0:
            out[f"{a}|{b}"] = float("nan")
        else:
            out[f"{a}|{b}"] = float(grads[a] @ grads[b] / (na * nb))
    return out
