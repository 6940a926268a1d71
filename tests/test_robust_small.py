"""The small-update exemption (server/robust.py): honest tiny shops kept, attackers still out, Sybils bounded."""

from __future__ import annotations

import numpy as np
import pytest

from server.federation_settings import FederationSettings
from server.robust import RobustSettings, exempt_small, screen

DIM = 2 * 300
BOUNDS = [300, DIM]
DEFAULT_WORLD_CLAIMS = [81777.0, 34551.0, 20428.0, 13835.0, 10187.0, 8782.0, 7916.0, 7306.0]  # seed 0, #14
OFF = RobustSettings(small_pull_total=0.0)


def _tiny_round(n: int, signal: float, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` tiny shops' updates: a shared step of size ``signal`` plus unit noise each (mostly noise)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=DIM)
    common /= np.linalg.norm(common)
    noise = rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    return [(signal * common + noise[i]).astype(np.float32) for i in range(n)], common


def _claims(n: int, seed: int = 1) -> list[float]:
    return np.random.default_rng(seed).integers(700, 1100, size=n).astype(float).tolist()


def test_honest_tiny_shops_are_all_kept_at_scale():
    deltas, _ = _tiny_round(1000, signal=0.01)
    claims = _claims(1000)
    old = screen(deltas, claims, [None] * 1000, OFF, BOUNDS)
    assert len(old.left_out) > 10  # the absolute threshold alone leaves out many honest tiny shops
    new = screen(deltas, claims, [None] * 1000, RobustSettings(), BOUNDS)
    assert new.left_out == {}
    assert set(new.exempt) >= set(old.left_out)
    assert new.small_pull_used <= RobustSettings().small_pull_total
    assert all("small update kept" in why for why in new.exempt.values())


def test_on_the_default_worlds_shares_no_shop_is_small_so_the_screens_are_unchanged():
    rng = np.random.default_rng(3)
    common = rng.normal(size=DIM)
    for attack in ("none", "flip0", "flip7", "x-10_7"):
        deltas = [(common * (1 + i % 3) + 0.5 * rng.normal(size=DIM)).astype(np.float32) * (2.3 if i == 0 else 1)
                  for i in range(8)]
        if attack == "flip0":
            deltas[0] = -deltas[0]
        elif attack == "flip7":
            deltas[7] = -deltas[7]
        elif attack == "x-10_7":
            deltas[7] = -10 * deltas[7]
        new = screen(deltas, DEFAULT_WORLD_CLAIMS, [None] * 8, RobustSettings(), BOUNDS)
        old = screen(deltas, DEFAULT_WORLD_CLAIMS, [None] * 8, OFF, BOUNDS)
        assert new.left_out == old.left_out and not new.exempt
        assert min(new.pulls.values()) > RobustSettings().small_pull  # even the 4% shop pulls more than 0.01
        if attack != "none":
            assert int(attack[-1]) in new.left_out


def _near_zero(n: int, seed: int) -> list[np.ndarray]:
    """Honest tiny shops that barely trained: updates of ~3% of the median norm, in no particular direction."""
    rng = np.random.default_rng(seed)
    return [(0.03 * rng.normal(size=DIM) / np.sqrt(DIM)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("n_sybils", [50, 300])
def test_a_sybil_group_of_tiny_flipped_shops_is_bounded_and_near_zero_honest_updates_stay_in(n_sybils):
    """Colluding tiny shops sign-flipping (5% or 30% of 1,000) with a clear common step, beside 30 honest near-zero
    updates: the exempted updates' pulls stay within robust-small-pull-total, so at most that many Sybils get in,
    and the honest near-zero updates (smallest pulls) are kept first."""
    n = 1000
    deltas, _ = _tiny_round(n - 30, signal=1.0, seed=4)
    deltas = deltas + _near_zero(30, seed=5)
    for i in range(n_sybils):
        deltas[i] = -deltas[i]
    settings = RobustSettings()
    out = screen(deltas, _claims(n), [None] * n, settings, BOUNDS)
    old = screen(deltas, _claims(n), [None] * n, OFF, BOUNDS)
    assert set(range(n_sybils)) <= set(old.left_out)  # the absolute threshold alone leaves out every flip here
    sybils_in = [i for i in range(n_sybils) if i not in out.left_out]
    assert out.small_pull_used <= settings.small_pull_total + 1e-9
    assert not set(out.exempt) & set(out.left_out)  # an update is either kept by the exemption or left out
    assert sum(out.pulls[i] for i in sybils_in) <= settings.small_pull_total + 1e-9
    assert len(sybils_in) <= settings.small_pull_total / min(out.pulls[i] for i in range(n_sybils)) + 1e-9
    assert not set(range(n - 30, n)) & set(out.left_out)  # honest near-zero updates: all kept
    # what the kept Sybils can do: move the weighted mean by at most 2 x their pulls x the median norm
    kept_new = [i for i in range(n) if i not in out.left_out]
    kept_old = [i for i in range(n) if i not in out.left_out and i not in sybils_in]
    mean = lambda kept: sum(out.weights[i] * deltas[i] for i in kept) / sum(out.weights[i] for i in kept)  # noqa: E731
    shift = float(np.linalg.norm(mean(kept_new) - mean(kept_old)))
    assert shift <= 2 * settings.small_pull_total * float(np.median(out.norms)) * 1.05


def test_exempt_small_takes_the_smallest_pulls_first_up_to_the_total():
    settings = RobustSettings(small_pull=0.01, small_pull_total=0.02)
    pulls = {0: 0.009, 1: 0.002, 2: 0.02, 3: 0.008, 4: 0.006}
    small, used = exempt_small([0, 1, 2, 3, 4], pulls, settings, 0.0)
    assert small == [1, 4, 3] and used == pytest.approx(0.016)  # 0.009 more would pass 0.02; 0.02 is not small
    small, used = exempt_small([0], pulls, settings, 0.015)
    assert small == [] and used == 0.015  # what the other check already used counts
    assert exempt_small([1], pulls, OFF, 0.0) == ([], 0.0)


def test_the_settings_reach_the_screen_and_bad_values_are_refused():
    s = FederationSettings.from_config({}).robust_settings()
    assert (s.small_pull, s.small_pull_total) == (0.01, 0.05)
    s = FederationSettings.from_config({"robust-small-pull-total": 0.0}).robust_settings()
    assert s.small_pull_total == 0.0
    assert RobustSettings.off().small_pull_total == 0.0
    for bad in ({"small_pull_total": 1.5}, {"small_pull_total": -0.1}, {"small_pull": 0.06},
                {"small_pull": 0.0}):
        with pytest.raises(ValueError, match=r"robust-small-pull.*Fix"):
            RobustSettings(**bad)
    for key, value in (("robust-small-pull-total", 2.0), ("robust-small-pull", 0.5)):
        with pytest.raises(ValueError, match="robust.small.pull"):
            FederationSettings.from_config({key: value})
