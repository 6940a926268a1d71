"""Privacy accounting inside a shop: Opacus' RDP accountant, named explicitly and saved across rounds.

Central DP over shops is accounted on the server with Flower's own RDP accountant (server/dp.py);
both report the same `PrivacyReport` fields: (epsilon, delta, unit of privacy, q, z, S, steps).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from opacus.accountants import RDPAccountant

UNITS = ("user", "record", "shop")


@dataclass(frozen=True)
class PrivacyReport:
    """What a run spent: every DP result is reported with all of these fields."""

    epsilon: float
    delta: float
    unit: str               # user | record (DP-SGD in a shop) | shop (central DP over shops)
    sample_rate: float      # q: Poisson sampling rate of units per step (1.0 = no amplification)
    noise_multiplier: float  # z: noise std / clipping norm
    clipping_norm: float    # S
    steps: int              # noisy releases composed (DP-SGD steps or server rounds)
    accountant: str = "rdp"

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain dict for metrics files and reports."""
        return asdict(self)


class ShopAccountant:
    """Opacus RDP accountant whose history survives rounds as a JSON string in the shop's local state."""

    name = "rdp"

    def __init__(self) -> None:
        self._rdp = RDPAccountant()  # named, not Opacus' default (which has changed between releases)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Compose ``steps`` sampled-Gaussian steps with rate ``sample_rate`` and noise ``noise_multiplier``."""
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1 or steps < 1:
            raise ValueError(f"DP-SGD step needs noise_multiplier > 0, 0 < sample_rate <= 1, steps >= 1; got "
                             f"z={noise_multiplier}, q={sample_rate}, steps={steps}")
        history = self._rdp.history
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
        else:
            history.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        """Total composed steps."""
        return sum(n for _, _, n in self._rdp.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        if not self._rdp.history:
            return 0.0
        return float(self._rdp.get_epsilon(delta=delta))

    def to_json(self) -> str:
        """Serialised history (for a ConfigRecord string or a file)."""
        return json.dumps({"accountant": self.name, "history": [list(h) for h in self._rdp.history]})

    @classmethod
    def from_json(cls, text: str | None) -> ShopAccountant:
        """Restore from ``to_json`` output; ``None`` or empty gives a fresh accountant."""
        acc = cls()
        if not text:
            return acc
        state = json.loads(text)
        if state.get("accountant") != cls.name:
            raise ValueError(f"saved accountant state is '{state.get('accountant')}', expected '{cls.name}'; "
                             "delete the shop's privacy state only if you accept restarting its accounting")
        acc._rdp.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
        return acc


def opacus_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps under Opacus' RDP accountant."""
    acc = ShopAccountant()
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return acc.epsilon(delta)


def tpr_bound(fpr: float, *, epsilon: float, delta: float) -> float:
    """Largest TPR any attack can reach at ``fpr`` against an (epsilon, delta)-DP mechanism."""
    return min(1.0, math.exp(epsilon) * fpr + delta)
