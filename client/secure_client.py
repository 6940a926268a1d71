"""Shop clients for the privacy paths: SecAgg+ (legacy NumPyClient adapter) and central DP (fixed clipping).

* `secure_app`: Flower's SecAgg+ runs only on the legacy path in flwr 1.42, so the shop is wrapped
  as a NumPyClient over the same Flower-free training code (`shared.train`), with
  `secaggplus_mod`. The shop's reply leaves only as a masked integer vector; its arrays record is
  emptied by the mod. Metrics (losses, num-examples, shop-index) still leave in plaintext.
* `dp_app`: the main ClientApp (`client.client_app.app`), which puts Flower's `fixedclipping_mod`
  on its train handler whenever the coordinator sends a clipping norm.
The main ClientApp hands legacy (SecAgg+) messages to `secure_app`; every outgoing message of
`secure_app` passes `audit_mod` (shared/privacy/audit.py allow-list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client import client_app as main_client
from client.local_state import resolve_shop, restore_local_part, save_local_part
from shared.privacy.audit import PROTOCOL_CONFIG_PATTERNS, AllowList, LeakBlocked, audit_payload
from shared.train import evaluate_shop, train_shop

ERROR_CODE_BLOCKED = 6  # flwr ErrorCode.MOD_FAILED_PRECONDITION, as client.leak_guard uses


class ShopNumPyClient(NumPyClient):
    """A shop as a NumPyClient: encoder arrays in `SharedEncoder.state_dict()` order, local part kept home."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def _setup(self, parameters: list[np.ndarray], config: dict[str, Any]):
        torch.set_num_threads(1)
        merged = {**dict(self.context.run_config), **dict(config)}
        shop = resolve_shop(self.context, merged)
        model = shop.model()
        keys = list(model.encoder.state_dict())
        if len(keys) != len(parameters):
            raise ValueError(f"coordinator sent {len(parameters)} arrays, the encoder has {len(keys)}. "
                             "Fix: coordinator and shops must run the same scenario model/features")
        model.load_encoder_state({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, parameters, strict=True)})
        restore_local_part(model, self.context, shop.state_dir)
        return shop, model, merged

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """The shop's initial encoder (only used when the coordinator has none)."""
        shop = resolve_shop(self.context, {**dict(self.context.run_config), **dict(config)})
        return [v.numpy() for v in shop.model().encoder_state().values()]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
        """Train locally; return the encoder arrays, the SecAgg weight and plaintext metrics."""
        shop, model, merged = self._setup(parameters, config)
        server_round = int(merged.get("server-round", 0))
        base = shop.scenario.train
        cfg = replace(base, epochs=int(merged.get("local-epochs", base.epochs)),
                      max_steps=int(merged.get("max-steps", base.max_steps)),
                      seed=main_client.round_seed(int(merged.get("seed", shop.scenario.seed)), server_round,
                                                  shop.index))
        losses = train_shop(model, shop.tensors, cfg)
        save_local_part(model, self.context, shop.state_dir, shop=shop.name, server_round=server_round)
        # SecAgg+ weights each masked vector by num_examples / max-weight before quantising; "uniform"
        # (weight 1) keeps the full quantisation range for the weights themselves.
        weight = 1 if merged.get("secagg-weighting", "uniform") == "uniform" else int(losses["num-examples"])
        metrics = {k: float(v) for k, v in losses.items() if k != "num-examples"}
        metrics["shop-index"] = shop.index
        return [v.numpy() for v in model.encoder_state().values()], weight, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):
        """Per-task metrics of the global encoder with this shop's local part."""
        shop, model, merged = self._setup(parameters, config)
        splits = str(merged.get("eval-split", "val")).split("+")
        metrics: dict[str, Any] = {}
        for split in splits:  # "val+test": both, keys prefixed with their split as the main ClientApp does
            prefix = f"{split}/" if len(splits) > 1 else ""
            results = evaluate_shop(model, shop.tensors, split)
            metrics.update({f"{prefix}{t}.{m}": float(v) for t, vals in results.items() for m, v in vals.items()})
        metrics["shop-index"] = shop.index
        loss = float(results.get("ctr", {}).get("logloss", 0.0))
        return loss, max(1, int(shop.tensors.rows[splits[-1]]["user"].shape[0])), metrics


def _flatten(msg: Message) -> tuple[dict, dict, dict]:
    arrays = {name: dict(rec.items()) for name, rec in msg.content.array_records.items()}
    metrics = {name: dict(rec.items()) for name, rec in msg.content.metric_records.items()}
    configs = {name: dict(rec.items()) for name, rec in msg.content.config_records.items()}
    return arrays, metrics, configs


def audit_mod_for(allow: Callable[[Context], AllowList]) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A mod that checks every outgoing reply against ``allow(context)`` and blocks it if it fails."""

    def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        arrays, metrics, configs = _flatten(reply)
        try:
            audit_payload(arrays={k: v for k, v in arrays.items() if v}, metrics=metrics, configs=configs,
                          allow=allow(context))
        except LeakBlocked as exc:
            return Message(Error(code=ERROR_CODE_BLOCKED, reason=str(exc)), reply_to=msg)
        return reply

    return audit_mod


def _secure_allow(_: Context) -> AllowList:
    # Outermost mod: after secaggplus_mod emptied the arrays record, nothing array-valued may remain.
    # Legacy replies carry train metrics in a ConfigRecord; eval metrics are '<task>.<metric>', which
    # audit_payload accepts only for known tasks and metric names (never any dotted key).
    return AllowList(array_keys=frozenset(), metric_patterns=("num_examples", "loss", "loss-*", "shop-index"),
                     config_patterns=PROTOCOL_CONFIG_PATTERNS)


def make_secure_app(client_fn: Callable[[Context], Any] | None = None) -> ClientApp:
    """The SecAgg+ ClientApp: NumPyClient adapter, `secaggplus_mod`, and the outgoing audit outermost."""

    def default_client_fn(context: Context):
        return ShopNumPyClient(context).to_client()

    return ClientApp(client_fn=client_fn or default_client_fn, mods=[audit_mod_for(_secure_allow), secaggplus_mod])


secure_app = make_secure_app()

# Central DP: the main ClientApp clips on its train handler when the DP strategy sends a clipping norm.
dp_app = main_client.app
