"""The shop's Flower ClientApp: receive the encoder, restore the local part, train or evaluate, reply.

Only records move here; the round itself (shared with the SecAgg+ path) is `client.shop_round`, training
and evaluation live in `shared.train`. Every reply passes the
leak guard (`client.leak_guard`), an app-wide mod. This one ClientApp serves every privacy mode:
* SecAgg+: Flower's legacy messages (the SecAgg+ workflow) go to `client.secure_client.secure_app`,
  whose own audit mod checks its replies;
* central DP: `fixedclipping_mod` clips the encoder update whenever the coordinator sends a norm;
* DP-SGD: with `dpsgd-noise-multiplier > 0` the shop trains with `shared.privacy.dpsgd`, keeps its
  accountant in its local state across rounds and reports its epsilon as `dp-epsilon`.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from client.leak_guard import error_reply, leak_guard
from client.local_state import Shop
from client.merchant_policy import merchant_policy_mod, reply_shield
from client.message_settings import settings_for
from client.pack_mod import pack_mod
from client.secure_client import SECAGG_RECORD, secure_app
from client.shop_round import evaluate_after_train, evaluate_round, load_round_start, shop_and_model, train_round
from client.timing import timing_mod
from client.wire_mod import wire_mod
from shared.model import ShopModel
from shared.npy_check import npy_header
from shared.protocol import ARRAYS_RECORD, EVAL_METRICS_RECORD, FAILED_TEXT, METRICS_RECORD
from shared.settings import ShopRoundSettings

logger = logging.getLogger(__name__)

# Records that only Flower's legacy message format (the SecAgg+ workflow) uses.
LEGACY_CONFIG_RECORDS = frozenset({SECAGG_RECORD})
LEGACY_ARRAY_RECORDS = frozenset({"fitins.parameters", "evaluateins.parameters"})
CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's DP fixed-clipping strategies put in the ConfigRecord


def is_legacy(msg: Message) -> bool:
    """Whether ``msg`` is a legacy (SecAgg+ workflow) message rather than one of the main ServerApp's."""
    if not msg.has_content():
        return False
    return bool(LEGACY_CONFIG_RECORDS & set(msg.content.config_records)
                or LEGACY_ARRAY_RECORDS & set(msg.content.array_records))


def legacy_dispatch(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Front mod: hand legacy (SecAgg+) messages to the SecAgg+ client, everything else to the handlers.

    The SecAgg+ client's replies are masked integer vectors, which the leak guard (built for encoder
    arrays) would block; its own audit mod checks them instead. Exceptions still leave as a generic text.
    """
    if not is_legacy(msg):
        return call_next(msg, context)
    try:
        reply = secure_app(msg, context)
    except Exception:  # the text of any exception may quote private data: log it here, send none
        logger.exception("SecAgg+ handler raised; sending a generic error reply")
        return error_reply(msg, FAILED_TEXT)
    if reply.has_error():
        logger.warning("SecAgg+ handler returned an error (%s); sending a generic error reply", reply.error.reason)
        return error_reply(msg, FAILED_TEXT)
    return reply


def clip_when_dp(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train-handler mod: Flower's `fixedclipping_mod` when the coordinator runs central DP, else nothing."""
    config = next(iter(msg.content.config_records.values()), {}) if msg.has_content() else {}
    if CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# reply_shield: no exception text and no error reason but the fixed ones leaves the shop (client/merchant_policy.py);
# pack_mod: transport packing (docs/deployment.md, "Latency"); merchant_policy_mod: the merchant's caps on what a
# coordinator may order (client/merchant_policy.py), before the SecAgg+ path too; wire_mod: compression
# (docs/federation.md)
app = ClientApp(mods=[reply_shield, pack_mod, timing_mod, merchant_policy_mod, legacy_dispatch, wire_mod, leak_guard])


def _round_start(msg: Message, context: Context
                 ) -> tuple[Shop, ShopModel, ShopRoundSettings, dict[str, torch.Tensor]]:
    """The shop, its model with the received encoder and its own local part, the settings and what was received."""
    settings = settings_for(msg, context)  # parsed once per message (the leak guard parsed it already)
    shop, model = shop_and_model(context, settings)
    record = next(iter(msg.content.array_records.values()))
    for key, array in record.items():  # each npy header against its bytes before numpy allocates what it declares
        npy_header(key, array)
    received = dict(record.to_torch_state_dict())
    load_round_start(shop, model, context, settings, received,
                     training=msg.metadata.message_type == MessageType.TRAIN)
    return shop, model, settings, received


@app.train(mods=[clip_when_dp])
def train(msg: Message, context: Context) -> Message:
    """One round of local training (`client.shop_round`); replies with the encoder (and shareable heads if asked).

    With `evaluate-after-train` the reply also carries the round's evaluation in `evaluate-metrics` (fused:
    no evaluate message needed), unless it could not be computed.
    """
    shop, model, settings, received = _round_start(msg, context)
    result = train_round(shop, model, settings, context, received)
    # The records copy the arrays now: the evaluation below reloads the model's state.
    content = RecordDict({ARRAYS_RECORD: ArrayRecord(result.arrays), METRICS_RECORD: MetricRecord(result.metrics)})
    evaluation = evaluate_after_train(shop, model, settings, context, result)
    if evaluation is not None:
        content[EVAL_METRICS_RECORD] = MetricRecord(evaluation)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-task metrics of the global encoder with the shop's own local part, as `<task>.<metric>`.

    With the personal mix on, the shop's own encoder (what it serves) replaces the global one.
    """
    shop, model, settings, _ = _round_start(msg, context)
    metrics = evaluate_round(shop, model, settings, context)
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=msg)
