"""Screens against a malicious or faulty shop, applied to a round's usable updates before aggregation.

Each update is ``delta = reply - global encoder``. In order:
1. its claimed `num-examples` is capped at ``examples_cap`` x the round's median claim and x the shop's
   first claim (a shop suddenly claiming 1e9 cannot take the average);
2. an update whose norm exceeds ``norm_factor`` x the round's median norm is left out (or, with
   ``norm_action = "clip"``, scaled down to that bound);
3. an update whose direction score, the median over arrays of its cosine with the coordinate-wise median
   of the round's deltas, is below ``min_cosine`` is left out (a sign flip or a negative scaling points
   away from the honest majority);
4. no shop keeps more than ``weight_cap / n`` of the aggregation weight (the excess goes to the others).

Hand-written because Flower 1.42's robust rules (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) replace
the weighted mean instead of screening it, and fedshop's default keeps the weighted mean for honest shops.
Those rules stay selectable by name (`server.strategies.STRATEGIES`) and run after these screens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NORM_ACTIONS = ("leave-out", "clip")


@dataclass
class RobustSettings:
    """The screens' settings (run-config keys `robust-*`); 0 (or -1 for `min_cosine`) turns one off."""

    norm_factor: float = 4.0
    norm_action: str = "leave-out"
    min_cosine: float = -0.1
    examples_cap: float = 10.0
    weight_cap: float = 4.0

    def __post_init__(self) -> None:
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"run config robust-norm-action='{self.norm_action}' is unknown. Fix: use one of "
                             f"{NORM_ACTIONS}")
        if not (self.norm_factor == 0 or self.norm_factor >= 1):
            raise ValueError(f"run config robust-norm-factor={self.norm_factor} would leave out the median shop "
                             "itself. Fix: give a factor >= 1 (e.g. 2), or 0 for no norm bound")
        if not -1 <= self.min_cosine <= 1:
            raise ValueError(f"run config robust-min-cosine={self.min_cosine} is outside [-1, 1]. Fix: e.g. 0 "
                             "(leave out updates pointing away from the median), or -1 for no direction check")
        if not (self.examples_cap == 0 or self.examples_cap >= 1):
            raise ValueError(f"run config robust-examples-cap={self.examples_cap} would cap honest shops below "
                             "their claim. Fix: give a factor >= 1 (e.g. 10), or 0 for no cap")
        if not (self.weight_cap == 0 or self.weight_cap >= 1):
            raise ValueError(f"run config robust-weight-cap={self.weight_cap} is below 1: the shares could not "
                             "sum to 1. Fix: give a multiple of the equal share >= 1 (e.g. 2), or 0 for no cap")

    @classmethod
    def off(cls) -> RobustSettings:
        """No screening at all (plain FedAvg in the benchmark)."""
        return cls(norm_factor=0.0, min_cosine=-1.0, examples_cap=0.0, weight_cap=0.0)


@dataclass
class Screened:
    """What the screens decided for one round: per update, kept or why not, its weight and scale."""

    left_out: dict[int, str] = field(default_factory=dict)  # index -> reason
    claims: list[float] = field(default_factory=list)  # claims after the examples cap
    weights: list[float] = field(default_factory=list)  # aggregation weight of every update (left-out ones too)
    scale: list[float] = field(default_factory=list)  # factor applied to each delta (< 1 when clipped)
    norms: list[float] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)


def cap_claims(claims: list[float], first: list[float | None], factor: float) -> list[float]:
    """Claims capped at ``factor`` x the round's median claim and x each shop's first claim."""
    if factor <= 0 or not claims:
        return list(claims)
    bound = factor * float(np.median(claims))
    return [min(c, bound, factor * f if f else c) for c, f in zip(claims, first, strict=True)]


def cap_shares(weights: list[float], cap: float) -> list[float]:
    """Weights rescaled so that none is above ``cap / n`` of their sum; the excess goes to the rest pro rata."""
    n = len(weights)
    if cap <= 0 or n == 0 or cap >= n:
        return list(weights)
    total = float(sum(weights))
    share = np.asarray(weights, dtype=float) / total
    limit = cap / n
    if not (share > limit + 1e-12).any():  # unchanged, bit for bit: a clean round stays plain FedAvg
        return list(weights)
    capped = np.zeros(n, dtype=bool)
    for _ in range(n):  # water-filling: at most n passes, each fixes at least one more shop at the limit
        over = (share > limit + 1e-12) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - limit * capped.sum()
        rest = share[~capped].sum()
        share[capped] = limit
        if rest > 0:
            share[~capped] *= free / rest
    return [float(s * total) for s in share]


def _direction(delta: np.ndarray, median: np.ndarray, bounds: list[int]) -> float:
    """Median over arrays of the cosine between an update and the median update (arrays of zero norm skipped).

    Per array, not over the whole vector: a large shop's update is dominated by its own embedding rows,
    nearly orthogonal to the others', while the shared dense layers show whether it points with them.
    """
    cos = []
    for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True):
        a, m = delta[lo:hi], median[lo:hi]
        na, nm = float(np.linalg.norm(a)), float(np.linalg.norm(m))
        if na > 0 and nm > 0:
            cos.append(float(a @ m) / (na * nm))
    return float(np.median(cos)) if cos else 1.0


def screen(deltas: list[np.ndarray], claims: list[float], first_claims: list[float | None],
           settings: RobustSettings, bounds: list[int] | None = None) -> Screened:
    """Apply the screens to flat update vectors ``deltas`` with their claimed example counts.

    ``bounds`` are the end offsets of the arrays inside each flat vector (one array if None).
    """
    n = len(deltas)
    capped = cap_claims(claims, first_claims, settings.examples_cap)
    out = Screened(claims=capped, weights=list(capped), scale=[1.0] * n)
    out.norms = [float(np.linalg.norm(d)) for d in deltas]
    kept = list(range(n))
    if settings.norm_factor > 0 and n >= 3:  # with two shops the median is their mean: nothing to compare
        bound = settings.norm_factor * float(np.median(out.norms))
        for i in kept:
            if out.norms[i] > bound:
                if settings.norm_action == "clip":
                    out.scale[i] = bound / out.norms[i]
                else:
                    out.left_out[i] = (f"update norm {out.norms[i]:.3g} above {settings.norm_factor:g} x the round's "
                                       f"median norm {bound / settings.norm_factor:.3g}")
        kept = [i for i in kept if i not in out.left_out]
    if settings.min_cosine > -1 and len(kept) >= 3:
        median = np.median(np.stack([deltas[i] * out.scale[i] for i in kept]), axis=0)
        out.cosines = [_direction(d, median, bounds or [len(d)]) for d in deltas]
        for i in kept:
            if out.cosines[i] < settings.min_cosine:
                out.left_out[i] = (f"update direction against the round's median update (median cosine over "
                                   f"arrays {out.cosines[i]:.3f} < {settings.min_cosine:g})")
        kept = [i for i in kept if i not in out.left_out]
    shares = cap_shares([out.weights[i] for i in kept], settings.weight_cap)
    for i, w in zip(kept, shares, strict=True):
        out.weights[i] = w
    return out
