"""Screens against a malicious or faulty shop, applied to a round's usable updates before aggregation.

Each update is ``delta = reply - global encoder``. In order:
1. its claimed `num-examples` is capped at ``examples_cap`` x the round's median claim and x the shop's
   first claim (a shop suddenly claiming 1e9 cannot take the average);
2. an update whose norm exceeds ``norm_factor`` x the round's median norm is left out (or, with
   ``norm_action = "clip"``, scaled down to that bound);
3. an update whose direction score, the median over arrays of its cosine with the coordinate-wise median
   of the round's deltas, is below ``min_cosine`` is left out (a sign flip or a negative scaling points
   away from the honest majority);
4. leave-one-out reputation: an update whose cosine with the mean of the *other* kept updates, averaged over
   the shop's rounds so far and this one, each round weighted by its consensus (the median of the round's
   leave-one-out cosines: high early, when shops agree and a flip stands out; ~0 near the fixed point) (its
   reputation; in its first round, this round's cosine), is below
   ``loo_min_cosine`` is left out (with >= 5 kept updates, never more than (n - 1) // 2 of them, the lowest
   first); unlike the round's median in 3., the others' mean cannot be dragged by the update being scored;
   sudden turn (``loo_turn_margin``): a shop whose cosine this round is below ``loo_min_cosine`` and at least the
   margin below the mean of its last 2 recorded rounds, both raw and relative to the rounds' consensus, is left
   out too (an averaged reputation lets a shop that turns after many honest rounds in), and stays out while its
   cosine stays that far below its pre-turn level and below the round's median (`turns`, kept per shop by the
   caller; same majority guard);
5. no shop keeps more than ``weight_cap / n`` of the aggregation weight (the excess goes to the others).

Small-update exemption (``small_pull``, ``small_pull_total``): an update that 3. or 4. would leave out is kept when its
worst-case pull on the weighted mean, its share of the weight x its norm / the round's median norm, is at most
``small_pull``, smallest pulls first, while the exempted updates' pulls sum to at most ``small_pull_total``: a tiny
shop's honest update is often near zero or mostly noise, so its cosine says little, and the total bounds a group of
colluding tiny shops.

Hand-written because Flower 1.42's robust rules (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) replace
the weighted mean instead of screening it, and fedshop's default keeps the weighted mean for honest shops.
Those rules stay selectable by name (`server.strategies.STRATEGIES`) and run after these screens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

NORM_ACTIONS = ("leave-out", "clip")
# The leave-one-out reputation's rules (`RobustSettings.loo_rule`). Deliberately not a setting (no run-config key,
# no `--set`): "consensus" is the measured choice; "mean" (the rule until 2026-12-06) and "agreement" (the first
# weighted candidate) are kept only so tests and comparisons can run the rules they were measured against
# (docs/robustness.md: the plain mean left out 28/720 honest shop-rounds in 30-round clean runs, consensus 0/720;
# the agreement weight barely varies, so it is nearly the plain mean). A key would also need a guard on --resume:
# a checkpoint's history weights belong to the rule that recorded them.
LOO_RULES = ("consensus", "agreement", "mean")
LOO_MIN_UPDATES = 5  # the leave-one-out check needs this many kept updates
TURN_WINDOW = 2  # a sudden turn is measured against the mean of the shop's last this-many recorded rounds
TurnLevel = list[float]  # a turned shop's pre-turn level: [mean cosine, mean consensus] of its last rounds


@dataclass
class RobustSettings:
    """The screens' settings (run-config keys `robust-*`); 0 (or -1 for the two cosines) turns one off."""

    norm_factor: float = 4.0
    norm_action: str = "leave-out"
    min_cosine: float = -0.1
    examples_cap: float = 10.0
    weight_cap: float = 4.0
    loo_min_cosine: float = -0.08
    # reputation: the rounds' cosines weighted by the round's consensus (default), by its agreement, or a plain mean;
    # code-only, for tests and comparisons (`LOO_RULES`: why it is no run-config key)
    loo_rule: str = "consensus"
    loo_turn_margin: float = 0.0  # sudden turn (opt-in; e.g. 0.1): this far below its last rounds' level
    small_pull: float = 0.01  # exemption from 3./4.: pull (share x norm / median norm) at most this per update
    small_pull_total: float = 0.05  # ... while the exempted pulls sum to at most this (0: no exemption)

    def __post_init__(self) -> None:
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"run config robust-norm-action='{self.norm_action}' is unknown. Fix: use one of "
                             f"{NORM_ACTIONS}")
        if not (self.norm_factor == 0 or self.norm_factor >= 1):
            raise ValueError(f"run config robust-norm-factor={self.norm_factor} would leave out the median shop "
                             "itself. Fix: give a factor >= 1 (e.g. 2), or 0 for no norm bound")
        if self.loo_rule not in LOO_RULES:
            raise ValueError(f"leave-one-out rule '{self.loo_rule}' is unknown. Fix: use one of {LOO_RULES}")
        if not -1 <= self.min_cosine <= 1:
            raise ValueError(f"run config robust-min-cosine={self.min_cosine} is outside [-1, 1]. Fix: e.g. 0 "
                             "(leave out updates pointing away from the median), or -1 for no direction check")
        if not -1 <= self.loo_min_cosine <= 1:
            raise ValueError(f"run config robust-loo-min-cosine={self.loo_min_cosine} is outside [-1, 1]. Fix: e.g. "
                             "-0.08 (leave out updates pointing away from the others' mean), or -1 for no "
                             "leave-one-out check")
        if not 0 <= self.loo_turn_margin <= 2:
            raise ValueError(f"run config robust-loo-turn-margin={self.loo_turn_margin} is outside [0, 2] (a cosine "
                             "can fall by at most 2). Fix: e.g. 0.1 (leave out a shop whose leave-one-out cosine "
                             "suddenly drops that far below its last rounds), or 0 for no sudden-turn check")
        if not 0 <= self.small_pull_total <= 1:
            raise ValueError(f"run config robust-small-pull-total={self.small_pull_total} is outside [0, 1] (1: the "
                             "exempted updates together could move the mean by a whole median update). Fix: e.g. 0.05, "
                             "or 0 for no small-update exemption")
        total = self.small_pull_total
        if not 0 <= self.small_pull <= 1 or (total > 0 and not 0 < self.small_pull <= total):
            raise ValueError(f"run config robust-small-pull={self.small_pull} is outside (0, robust-small-pull-total="
                             f"{self.small_pull_total}]: no update could use the exemption, or one alone could use "
                             "more than the total. Fix: e.g. 0.01, at most robust-small-pull-total (that one = 0 turns "
                             "the exemption off)")
        if not (self.examples_cap == 0 or self.examples_cap >= 1):
            raise ValueError(f"run config robust-examples-cap={self.examples_cap} would cap honest shops below "
                             "their claim. Fix: give a factor >= 1 (e.g. 10), or 0 for no cap")
        if not (self.weight_cap == 0 or self.weight_cap >= 1):
            raise ValueError(f"run config robust-weight-cap={self.weight_cap} is below 1: the shares could not "
                             "sum to 1. Fix: give a multiple of the equal share >= 1 (e.g. 2), or 0 for no cap")

    @classmethod
    def off(cls) -> RobustSettings:
        """No screening at all (plain FedAvg in the benchmark)."""
        return cls(norm_factor=0.0, min_cosine=-1.0, examples_cap=0.0, weight_cap=0.0, loo_min_cosine=-1.0,
                   loo_turn_margin=0.0, small_pull=0.0, small_pull_total=0.0)


@dataclass
class Screened:
    """What the screens decided for one round: per update, kept or why not, its weight and scale."""

    left_out: dict[int, str] = field(default_factory=dict)  # index -> reason
    claims: list[float] = field(default_factory=list)  # claims after the examples cap
    weights: list[float] = field(default_factory=list)  # aggregation weight of every update (left-out ones too)
    scale: list[float] = field(default_factory=list)  # factor applied to each delta (< 1 when clipped)
    norms: list[float] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    loo: dict[int, float] = field(default_factory=dict)  # index -> cosine with the other kept updates' mean
    agreement: float = 0.0  # the round's agreement (`agreement`), computed only under that rule
    consensus: float = 0.0  # the round's consensus (`consensus`)
    round_weight: float = 1.0  # the weight of this round's cosines in a reputation, per `RobustSettings.loo_rule`
    # index -> its sudden-turn level after this round (None: not turned); every update with a leave-one-out cosine
    turns: dict[int, TurnLevel | None] = field(default_factory=dict)
    exempt: dict[int, str] = field(default_factory=dict)  # index -> why a direction check's left-out was kept
    pulls: dict[int, float] = field(default_factory=dict)  # index -> worst-case pull (`pulls`; norm-kept updates)
    small_pull_used: float = 0.0  # the exempted updates' summed pull


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


NETWORK_MAX = 32  # up to this many updates the median runs a sorting network (191 compare-exchanges at 32)


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` items: compare-exchange pairs (lo, hi) that leave any input sorted."""
    size = 1 << max(0, n - 1).bit_length()
    pairs, p = [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def median_update(deltas: list[np.ndarray]) -> np.ndarray:
    """The coordinate-wise median of flat updates: the values of ``np.median(np.stack(deltas), axis=0)``.

    Up to `NETWORK_MAX` finite updates, a sorting network of elementwise minimum/maximum over whole vectors
    puts the middle value(s) in place (np.median's partition works coordinate by coordinate: about 10x the
    CPU, 0.4 s per round for the default world's 8 shops and 1.7M-value encoder); their mean is then taken
    as np.median takes it. Otherwise np.median, one row per coordinate.
    """
    n = len(deltas)
    if n == 0 or n > NETWORK_MAX or not all(np.isfinite(d).all() for d in deltas):
        return np.median(np.stack(deltas, axis=1), axis=1)
    cols = [np.array(d, copy=True) for d in deltas]
    spare = np.empty_like(cols[0])
    for lo, hi in sorting_network(n):
        np.minimum(cols[lo], cols[hi], out=spare)
        np.maximum(cols[lo], cols[hi], out=cols[hi])
        cols[lo], spare = spare, cols[lo]
    # np.median's own last step on the middle value(s): their mean over axis 0 (it also turns -0.0 into 0.0)
    return np.mean(np.stack(cols[(n - 1) // 2:n // 2 + 1]), axis=0)


def _scaled(delta: np.ndarray, scale: float) -> np.ndarray:
    """``delta x scale``; ``delta`` itself when the scale is 1 (the same values, without a copy of the update)."""
    return delta if scale == 1.0 else delta * scale


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors, 0 when either is zero."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def leave_one_out(deltas: list[np.ndarray], kept: list[int]) -> dict[int, float]:
    """Per update, its whole-vector cosine with the mean of the *kept* updates other than itself.

    The update cannot pull that mean towards itself (as it pulls the round's median), so a sign flip scores the
    negative of its honest score. Whole vector, not per array: against the others' mean the largest shop's
    honest per-array score fell below 0 by round 2, its whole-vector score stayed >= 0.04 (docs/robustness.md).
    """
    # The kept updates summed in order, in float64 (what np.sum over their stack does, without the stack's copy);
    # two float64 buffers are reused for every update, so no round allocates (and page-faults) 2 per update.
    total = deltas[kept[0]].astype(np.float64)
    for i in kept[1:]:
        np.add(total, deltas[i], out=total)
    others, wide = np.empty_like(total), np.empty_like(total)
    out = {}
    for i, d in enumerate(deltas):
        if i in kept:
            np.divide(np.subtract(total, d, out=others), len(kept) - 1, out=others)
        else:
            np.divide(total, len(kept), out=others)
        np.copyto(wide, d)
        out[i] = _cosine(wide, others)
    return out


# One screened round of a shop: [cosine, round weight] (what a run records), or a bare cosine weighing 1 (checkpoints
# from before rounds were weighted, converted on reading; and a shorthand in tests). `split_entry` reads either.
LooEntry = float | list[float]


def agreement(deltas: list[np.ndarray], kept: list[int]) -> float:
    """How much the kept updates agree: the norm of their mean over their mean norm, in [0, 1] (0 if all zero).

    High early in training, when every shop moves the encoder the same way; near FedAvg's fixed point the weighted
    updates cancel, so it falls towards 0 and a round's leave-one-out cosines say little about who is malicious.
    """
    stack = [deltas[i].astype(np.float64) for i in kept]
    mean_norm = float(np.mean([np.linalg.norm(d) for d in stack]))
    return float(np.linalg.norm(np.mean(stack, axis=0)) / mean_norm) if mean_norm > 0 else 0.0


def consensus(loo: dict[int, float], kept: list[int]) -> float:
    """How clearly the round tells shops apart: the median of the kept updates' leave-one-out cosines, at least 0.

    Early in training the honest shops score 0.2-0.4 against each other and a flip scores as far below; near the
    fixed point the median falls to ~0.05 and the largest shop's honest update points against the others by
    construction (FedAvg's weighted updates sum to ~0), so such a round should weigh little. A median: one
    attacker cannot move it much.
    """
    return max(0.0, float(np.median([loo[i] for i in kept]))) if kept else 0.0


def split_entry(entry: LooEntry) -> tuple[float, float]:
    """(cosine, weight) of a history entry; a bare cosine (checkpoints before 2026-12-06) weighs 1."""
    if isinstance(entry, (int, float)):
        return float(entry), 1.0
    return float(entry[0]), float(entry[1])


def reputation(history: list[LooEntry], current: float, weight: float = 1.0, rule: str = "consensus") -> float:
    """A shop's leave-one-out score for this round, from its earlier rounds' entries and this round's cosine.

    ``consensus`` (default) and ``agreement``: the mean of its cosines weighted by each round's recorded weight
    (`consensus` or `agreement` of that round), this one included; ``mean``: the plain mean (the rule until
    2026-12-06; weights ignored). Why weighted: near the fixed point the largest shop's honest update points
    against the others' mean by construction (their weighted sum is ~0), so its plain mean drifts below the bound
    in long runs, while the early, high-consensus rounds separate honest from flipped widely (docs/robustness.md).
    In its first round every rule gives this round's cosine; with all weights 0, the plain mean.
    """
    pairs = [*(split_entry(e) for e in history), (float(current), float(weight))]
    if rule == "mean":
        return float(np.mean([c for c, _ in pairs]))
    total = sum(w for _, w in pairs)
    if total <= 0:
        return float(np.mean([c for c, _ in pairs]))
    return float(sum(c * w for c, w in pairs) / total)


@dataclass
class LooVerdict:
    """The leave-one-out check's decision for one round (`judge_loo`)."""

    left_out: dict[int, str] = field(default_factory=dict)  # index -> reason
    turns: dict[int, TurnLevel | None] = field(default_factory=dict)  # index -> turn level after this round
    scores: dict[int, float] = field(default_factory=dict)  # index -> reputation
    consensus: float = 0.0
    round_weight: float = 1.0


def turn_level(history: list[LooEntry], rule: str = "consensus") -> TurnLevel | None:
    """[mean cosine, mean consensus] of a shop's last `TURN_WINDOW` recorded rounds (None without any).

    The consensus is the entries' round weight under the ``consensus`` rule; under another rule it is not
    recorded, so 0 (the relative test is then the raw one).
    """
    last = [split_entry(e) for e in history[-TURN_WINDOW:]]
    if not last:
        return None
    return [float(np.mean([c for c, _ in last])), float(np.mean([w for _, w in last])) if rule == "consensus" else 0.0]


def turn_drop(cosine: float, consensus_now: float, level: TurnLevel) -> tuple[float, float]:
    """How far this round's cosine is below a level: (raw, relative to the consensus of the rounds concerned).

    Relative, a round where every shop's cosine drops (the consensus with them) is no drop.
    """
    return level[0] - cosine, (level[0] - level[1]) - (cosine - consensus_now)


def judge_loo(loo: dict[int, float], kept: list[int], history: list[list[LooEntry]],
              turns: list[TurnLevel | None], settings: RobustSettings, agreement_now: float = 0.0) -> LooVerdict:
    """Which kept updates the leave-one-out check leaves out, from this round's cosines ``loo`` alone.

    Two reasons: a reputation (`reputation`) below ``loo_min_cosine``; a sudden turn (``loo_turn_margin`` > 0):
    this round's cosine below ``loo_min_cosine`` and at least the margin below the shop's `turn_level`, raw and
    relative to the consensus, or, once turned, still that far below its pre-turn level (raw) and below the round's
    median cosine. Never more than (n - 1) // 2 of the n kept updates: the lowest reputations first, then the lowest
    turned cosines. The turn levels (``LooVerdict.turns``) are tracked for every update in ``loo``, also those an
    earlier screen left out: a shop caught turning by the direction check keeps its honest pre-turn level, instead of
    one that averages its flipped round. Separate from `screen` so that recorded cosines can be replayed through the
    same decision (benchmarks/late_turn_replay.py).
    """
    out = LooVerdict(consensus=consensus(loo, kept))
    out.round_weight = {"consensus": out.consensus, "agreement": agreement_now}.get(settings.loo_rule, 1.0)
    out.scores = {i: reputation(history[i], loo[i], out.round_weight, settings.loo_rule) for i in kept}
    what = "mean" if settings.loo_rule == "mean" else f"{settings.loo_rule}-weighted mean"
    room = (len(kept) - 1) // 2  # majority guard: never a majority
    below = sorted((c, i) for i, c in out.scores.items() if c < settings.loo_min_cosine)
    for _, i in below[:room]:
        out.left_out[i] = (f"update direction against the other shops' mean update (leave-one-out cosine "
                           f"{loo[i]:.3f}, {what} over its rounds {out.scores[i]:.3f}; "
                           f"the {what} is < {settings.loo_min_cosine:g})")
    margin = settings.loo_turn_margin
    if margin <= 0:
        return out
    # this round's median, not floored at 0 as the consensus weight is: a round where every cosine falls below 0
    median = float(np.median([loo[i] for i in kept]))
    now = median if settings.loo_rule == "consensus" else 0.0
    turned: list[tuple[float, int, str]] = []
    for i in sorted(loo):  # updates an earlier screen left out too: a turn caught there must not become the level
        level, fresh = turns[i], False
        if level is None and loo[i] < settings.loo_min_cosine:
            level, fresh = turn_level(history[i], settings.loo_rule), True
        raw, rel = turn_drop(loo[i], now, level) if level is not None else (0.0, 0.0)
        # a turn: that far below, raw and relative; once turned, out while that far below (raw) and below the
        # round's median: an honest returner late in training cannot regain its early level (every cosine falls)
        turned_now = raw >= margin and (rel >= margin if fresh else loo[i] < median)
        if level is None or not turned_now:
            out.turns[i] = None  # not turned, or back within the margin of its pre-turn level: rejoins
            continue
        out.turns[i] = level
        if i not in kept:
            continue
        state = (f"< {settings.loo_min_cosine:g} and" if fresh else "still")
        turned.append((loo[i], i, f"sudden turn: leave-one-out cosine {loo[i]:.3f} {state} {raw:.3f} below its "
                       f"pre-turn level {level[0]:.3f} (mean of its last {TURN_WINDOW} rounds; {rel:.3f} below "
                       f"relative to the rounds' consensus); out while >= robust-loo-turn-margin={margin:g} below "
                       "it and below the round's median (0 turns this check off)"))
    room -= len(out.left_out)
    for _, i, reason in sorted(turned):
        if i not in out.left_out and room > 0:
            out.left_out[i] = reason
            room -= 1
    return out


def pulls(weights: list[float], norms: list[float], scale: list[float], kept: list[int], median_norm: float,
          weight_cap: float) -> dict[int, float]:
    """Per kept update, its worst-case pull on the weighted mean: its (capped) weight share x its norm / median norm.

    Replacing that update by any other of at most its norm moves the kept updates' weighted mean by at most twice
    this many median norms (leaving other updates out raises every share by the weight left out).
    """
    if not kept or median_norm <= 0:
        return {i: 0.0 for i in kept}
    shares = cap_shares([weights[i] for i in kept], weight_cap)
    total = sum(shares)
    return {i: (w / total if total > 0 else 0.0) * norms[i] * scale[i] / median_norm
            for i, w in zip(kept, shares, strict=True)}


def exempt_small(flagged: list[int], pull: dict[int, float], settings: RobustSettings,
                 used: float) -> tuple[list[int], float]:
    """Of the updates a direction check flagged, those kept as small; returns them and the new ``used``.

    Kept: pull <= ``small_pull``, smallest pull first, while ``used`` plus their pulls stays <= ``small_pull_total``.
    Why: a tiny shop's honest update is often near zero (1,000-shop world: the flagged ones' norms are ~3% of the
    median) or mostly noise, so its cosine is noise too, and alone it cannot move the mean; the total bounds what
    many colluding tiny shops (Sybils) can do together, whatever their number, and smallest-first keeps the
    near-zero honest updates in before any Sybil of ordinary norm.
    """
    out: list[int] = []
    if settings.small_pull_total <= 0:
        return out, used
    for p, i in sorted((pull.get(i, float("inf")), i) for i in flagged):
        if p > settings.small_pull or used + p > settings.small_pull_total + 1e-12:
            break
        out.append(i)
        used += p
    return out, used


def _exempt_reason(check: str, pull: float, used: float, settings: RobustSettings) -> str:
    """Why an update a direction check flagged was kept anyway."""
    return (f"small update kept despite the {check} (pull {pull:.4f} of a median update <= robust-small-pull="
            f"{settings.small_pull:g}; exempted pulls so far {used:.4f} <= robust-small-pull-total="
            f"{settings.small_pull_total:g})")


DOMINANT_SHARE = 0.3  # above this share of the round's weight, leave-one-out may flag an honest shop


def dominant_hint(i: int, kept: list[int], weights: list[float]) -> str:
    """For a leave-one-out reason: a note when update ``i`` holds over `DOMINANT_SHARE` of the round's weight, else "".

    Near FedAvg's fixed point such a shop's honest update points against the others' mean, so the check can leave
    out an honest shop (docs/robustness.md, "False positives"); the operator should know which case this may be.
    """
    total = sum(weights[j] for j in kept)
    share = weights[i] / total if total > 0 else 0.0
    if share <= DOMINANT_SHARE:
        return ""
    return (f"; this shop holds {share:.0%} of the round's weight, and an honest shop that large can point against "
            "the others' mean (docs/robustness.md, 'False positives'; robust-loo-min-cosine = -1 turns the check off)")


def screen(deltas: list[np.ndarray], claims: list[float], first_claims: list[float | None],
           settings: RobustSettings, bounds: list[int] | None = None,
           loo_history: list[list[LooEntry]] | None = None,
           turns: list[TurnLevel | None] | None = None) -> Screened:
    """Apply the screens to flat update vectors ``deltas`` with their claimed example counts.

    ``bounds`` are the end offsets of the arrays inside each flat vector (one array if None); ``loo_history``
    each update's shop's earlier leave-one-out entries (none if None), ``turns`` each one's sudden-turn level (None:
    not turned). ``Screened.loo`` holds this round's cosine of every update, left out or not, and
    ``Screened.round_weight`` the round's weight, for the caller to append ``[cosine, round_weight]`` to that
    history; ``Screened.turns`` the new turn levels to keep.
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
    if settings.small_pull_total > 0 and kept:
        out.pulls = pulls(out.weights, out.norms, out.scale, kept, float(np.median(out.norms)), settings.weight_cap)
    if settings.min_cosine > -1 and len(kept) >= 3:
        median = median_update([_scaled(deltas[i], out.scale[i]) for i in kept])
        out.cosines = [_direction(d, median, bounds or [len(d)]) for d in deltas]
        flagged = [i for i in kept if out.cosines[i] < settings.min_cosine]
        small, out.small_pull_used = exempt_small(flagged, out.pulls, settings, out.small_pull_used)
        for i in flagged:
            if i in small:
                out.exempt[i] = _exempt_reason(f"direction check (median cosine over arrays {out.cosines[i]:.3f} < "
                                               f"{settings.min_cosine:g})", out.pulls[i], out.small_pull_used, settings)
            else:
                out.left_out[i] = (f"update direction against the round's median update (median cosine over "
                                   f"arrays {out.cosines[i]:.3f} < {settings.min_cosine:g})")
        kept = [i for i in kept if i not in out.left_out]
    if settings.loo_min_cosine > -1 and len(kept) >= LOO_MIN_UPDATES:
        scaled = [_scaled(d, s) for d, s in zip(deltas, out.scale, strict=True)]
        out.loo = leave_one_out(scaled, kept)
        out.agreement = agreement(scaled, kept) if settings.loo_rule == "agreement" else 0.0  # only when it decides
        verdict = judge_loo(out.loo, kept, loo_history or [[] for _ in deltas], turns or [None for _ in deltas],
                            settings, out.agreement)
        out.consensus, out.round_weight, out.turns = verdict.consensus, verdict.round_weight, verdict.turns
        small, out.small_pull_used = exempt_small(list(verdict.left_out), out.pulls, settings, out.small_pull_used)
        for i, reason in verdict.left_out.items():
            if i in small:
                out.exempt[i] = _exempt_reason(f"leave-one-out check ({reason})", out.pulls[i], out.small_pull_used,
                                               settings)
            else:
                out.left_out[i] = reason + dominant_hint(i, kept, out.weights)
        kept = [i for i in kept if i not in out.left_out]
        # kept by the exemption at 3., then left out at 4. (budget spent): left out (its pull stays counted)
        out.exempt = {i: why for i, why in out.exempt.items() if i not in out.left_out}
    shares = cap_shares([out.weights[i] for i in kept], settings.weight_cap)
    for i, w in zip(kept, shares, strict=True):
        out.weights[i] = w
    return out
