"""A shop's DP-SGD round and its privacy accountant, kept across rounds in the shop's local state.

With `dpsgd-noise-multiplier > 0` the shop trains with `shared.privacy.dpsgd` (Opacus) instead of
plain local training; the accountant lives in `context.state` and, when the shop has a state
directory, in `dpsgd_accountant.json` there, so epsilon only grows across rounds and restarts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context

from client.local_state import Shop
from shared.atomic import atomic_write_text
from shared.model import ShopModel
from shared.protocol import DP_EPSILON, NUM_EXAMPLES
from shared.settings import ShopRoundSettings

logger = logging.getLogger(__name__)

DPSGD_RECORD = "fedshop.dpsgd-accountant"  # ConfigRecord in context.state: {"state": accountant JSON}
DPSGD_FILE = "dpsgd_accountant.json"


def train_dpsgd_round(model: ShopModel, shop: Shop, settings: ShopRoundSettings, context: Context,
                      seed: int) -> dict[str, float]:
    """One round of DP-SGD; the shop's accountant carries on from its local state, so epsilon only grows."""
    from shared.privacy.dpsgd import DPSGDConfig, train_dpsgd_shop  # Opacus: imported only when used

    dp = DPSGDConfig(**settings.dpsgd_kwargs(), seed=seed % (2**31))
    acc = train_dpsgd_shop(model, shop.tensors, dp, accountant_state=load_accountant(context, shop.state_dir))
    save_accountant(context, shop.state_dir, acc.to_json())
    epsilon = acc.epsilon(dp.delta)
    logger.info("shop %s: DP-SGD epsilon %.4f at delta %g after %d steps", shop.name, epsilon, dp.delta, acc.steps)
    return {NUM_EXAMPLES: float(shop.tensors.rows["train"]["user"].shape[0]), DP_EPSILON: epsilon}


def load_accountant(context: Context, state_dir: Path | None) -> str | None:
    """The shop's saved DP-SGD accountant JSON: from `context.state`, else its state directory, else None."""
    if DPSGD_RECORD in context.state.config_records:
        return str(context.state.config_records[DPSGD_RECORD]["state"])
    path = Path(state_dir) / DPSGD_FILE if state_dir is not None else None
    if path is None or not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:  # never restart accounting silently: that would under-report epsilon
        raise ValueError(f"{path}: DP-SGD accountant state is not valid JSON ({exc}). Fix: restore it from a "
                         "backup; delete it only if you accept restarting this shop's privacy accounting") from None
    return text


def save_accountant(context: Context, state_dir: Path | None, state: str) -> None:
    """Keep the accountant JSON in `context.state` and, when the shop has one, in its state directory."""
    context.state[DPSGD_RECORD] = ConfigRecord({"state": state})
    if state_dir is not None:
        atomic_write_text(Path(state_dir) / DPSGD_FILE, state)
