"""Shop clients for the privacy paths: SecAgg+ (legacy NumPyClient adapter) and central DP (fixed clipping).

* `secure_app`: Flower's SecAgg+ runs only on the legacy path in flwr 1.42, so the shop is wrapped
  as a NumPyClient over the same shop round as the main handlers (`client.shop_round`), with
  `secaggplus_mod`. The shop's reply leaves only as a masked integer vector; its arrays record is
  emptied by the mod. Metrics (losses, num-examples, shop-index) still leave in plaintext.
Central DP needs no client of its own: the main ClientApp (`client.client_app.app`) puts Flower's
`fixedclipping_mod` on its train handler whenever the coordinator sends a clipping norm.
The main ClientApp hands legacy (SecAgg+) messages to `secure_app`; every outgoing message of
`secure_app` is rebuilt by its outermost `audit_mod` (`clean_legacy_reply`): exactly the records and
keys of the SecAgg+ stage or legacy evaluate reply it answers, protocol byte strings of bounded length,
masked vectors of the encoder's shapes, metrics from the shop's vocabulary (`shared.privacy.audit`),
Flower's success status, metadata derived from the request; anything else leaves as a generic error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.leak_guard import check_reply_metadata, error_reply, shop_vocabulary
from client.local_state import Shop, resolve_shop
from client.message_settings import settings_for, settings_for_config
from client.shop_round import evaluate_round, load_round_start, shop_and_model, train_round
from shared.model import ShopModel
from shared.privacy.audit import LeakBlocked, MetricVocabulary, clean_metrics, clean_scalar, parse_splits
from shared.protocol import (
    BLOCKED_TEXT,
    FAILED_TEXT,
    NUM_EXAMPLES,
    eval_metric_key,
    eval_splits,
)
from shared.settings import ShopRoundSettings

logger = logging.getLogger(__name__)


class ShopNumPyClient(NumPyClient):
    """A shop as a NumPyClient over `client.shop_round`: encoder arrays in `SharedEncoder.state_dict()` order.

    The round is the main path's (`train_round`/`evaluate_round`), so stage, personal mix, objective,
    FedProx pull and DP-SGD behave alike; only the reply differs: the encoder leaves as a masked vector.
    """

    def __init__(self, context: Context) -> None:
        self.context = context

    def _round_start(self, parameters: list[np.ndarray], config: dict[str, Any], *, training: bool
                     ) -> tuple[Shop, ShopModel, ShopRoundSettings, dict[str, torch.Tensor], list[str]]:
        settings = settings_for_config(self.context, config)  # the audit mod parsed this message already
        shop, model = shop_and_model(self.context, settings)
        keys = list(model.encoder.state_dict())
        if len(keys) != len(parameters):
            raise ValueError(f"coordinator sent {len(parameters)} arrays, the encoder has {len(keys)}. "
                             "Fix: coordinator and shops must run the same scenario model/features")
        received = {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, parameters, strict=True)}
        load_round_start(shop, model, self.context, settings, received, training=training)
        return shop, model, settings, received, keys

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """The shop's initial encoder (only used when the coordinator has none)."""
        torch.set_num_threads(1)
        shop = resolve_shop(self.context, settings_for_config(self.context, config))
        return [v.numpy() for v in shop.model().encoder_state().values()]  # a fresh model's, never a cached one's

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
        """Train locally; return the encoder arrays, the SecAgg+ weight and plaintext metrics."""
        shop, model, settings, received, keys = self._round_start(parameters, config, training=True)
        result = train_round(shop, model, settings, self.context, received)
        counted = float(result.metrics[NUM_EXAMPLES])
        # SecAgg+ weights each masked vector by num_examples / max-weight before quantising; "uniform"
        # (weight 1) keeps the full quantisation range for the weights themselves. Weight 0 (a waiting
        # or warming-up shop) leaves the shop out of the mean, as num-examples = 0 does on the main path.
        uniform = settings.secagg_weighting == "uniform"
        weight = (1 if counted > 0 else 0) if uniform else int(counted)
        metrics = {k: v for k, v in result.metrics.items() if k != NUM_EXAMPLES}
        return [result.arrays[k].numpy() for k in keys], weight, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):
        """Per-task metrics of the global encoder (the shop's own with the personal mix) and its local part."""
        shop, model, settings, _, _ = self._round_start(parameters, config, training=False)
        metrics = evaluate_round(shop, model, settings, self.context)
        count = int(metrics.pop(NUM_EXAMPLES))
        splits = eval_splits(settings.eval_split)
        loss = metrics.get(eval_metric_key(splits[-1], "ctr", "logloss", len(splits) > 1), 0.0)
        return float(loss), count, metrics


SECAGG_RECORD = RECORD_KEY_CONFIGS  # Flower's SecAgg+ protocol record (`secaggplus_configs`), both ways
# Longest protocol byte strings a shop sends (measured: public keys 215 B, encrypted key shares 612 B,
# Shamir shares of a mask seed 52 B, of a dropped node's private key 324 B); the bounds leave room for
# other key sizes but not for rows of data.
MAX_PUBLIC_KEY_BYTES = 512
MAX_CIPHERTEXT_BYTES = 2048
MAX_SHARE_BYTES = 512
OK_STATUS = {"code": 0, "message": "Success"}  # what Flower's NumPyClient wrapper reports on success

VocabularyFn = Callable[[Context, ShopRoundSettings], MetricVocabulary]


def _legacy_shape(array: Any) -> tuple[int, ...]:
    """Shape of one legacy parameter (Flower stores legacy arrays as `np.save` bytes without a shape)."""
    return tuple(bytes_to_ndarray(array.data).shape)


@dataclass(frozen=True)
class LegacyRequest:
    """What the audit needs of a legacy request, read before `secaggplus_mod` consumes the message."""

    kind: str
    stage: str | None
    settings: ShopRoundSettings  # run config overridden by fitins/evaluateins.config, parsed
    shapes: tuple[tuple[int, ...], ...]  # of fitins/evaluateins.parameters, in order
    peers: frozenset[int]  # share_keys: nodes whose public keys were sent
    nids: tuple[int, ...]  # unmask: active_nids + dead_nids, in order

    @classmethod
    def read(cls, msg: Message, context: Context) -> LegacyRequest:
        """Snapshot ``msg`` (its SecAgg+ record is popped and its arrays cleared downstream)."""
        content = msg.content
        secagg = dict(content.config_records.get(SECAGG_RECORD, {}))
        res = "fitins" if msg.metadata.message_type == MessageType.TRAIN else "evaluateins"
        params = content.array_records.get(f"{res}.parameters")
        return cls(kind=msg.metadata.message_type, stage=secagg.get("stage") if secagg else None,
                   settings=settings_for(msg, context),
                   shapes=tuple(_legacy_shape(a) for a in params.values()) if params is not None else (),
                   peers=frozenset(int(k) for k in secagg if k.isdigit()),
                   nids=tuple(int(n) for n in [*secagg.get("active_nids", []), *secagg.get("dead_nids", [])]))


def _records(content: RecordDict, arrays: set[str], metrics: set[str], configs: set[str]) -> None:
    if (set(content.array_records) != arrays or set(content.metric_records) != metrics
            or set(content.config_records) != configs):
        raise LeakBlocked("reply records are not exactly the SecAgg+ protocol's records (names included)")


def _exact_keys(record: Any, keys: set[str]) -> dict[str, Any]:
    if set(record) != keys:
        raise LeakBlocked("a protocol record has other keys than the protocol's")
    return dict(record)


def _byte_list(values: object, limit: int, count: int | None = None) -> list[bytes]:
    if not isinstance(values, list) or any(type(b) is not bytes or len(b) > limit for b in values):
        raise LeakBlocked("a protocol value is not a list of short byte strings")
    if count is not None and len(values) != count:
        raise LeakBlocked("a protocol list has the wrong length")
    return list(values)


def _int_list(values: object) -> list[int]:
    if not isinstance(values, list) or any(type(v) is not int for v in values):
        raise LeakBlocked("a protocol value is not a list of node ids")
    return list(values)


def _status(content: RecordDict, res: str) -> ConfigRecord:
    if dict(content.config_records[f"{res}.status"]) != OK_STATUS:
        raise LeakBlocked("a reply status other than Flower's success status")
    return ConfigRecord(dict(OK_STATUS))


def _masked_vectors(values: object, shapes: tuple[tuple[int, ...], ...]) -> list[bytes]:
    """The masked integer vectors re-serialised: Flower's weight factor (1,) then one per encoder array."""
    blobs = _byte_list(values, limit=2**40, count=len(shapes) + 1)
    out = []
    for blob, shape in zip(blobs, ((1,), *shapes), strict=True):
        try:
            arr = bytes_to_ndarray(blob)
        except Exception:  # malformed bytes never leave
            raise LeakBlocked("a masked vector does not parse") from None
        if tuple(arr.shape) != shape or not np.issubdtype(arr.dtype, np.integer):
            raise LeakBlocked("a masked vector has another shape or dtype than the encoder array")
        out.append(ndarray_to_bytes(np.ascontiguousarray(arr)))
    return out


def clean_legacy_reply(req: LegacyRequest, reply: Message, vocabulary: MetricVocabulary) -> RecordDict:
    """The content to send for one legacy (SecAgg+) reply, rebuilt; LeakBlocked (reason for the log) if not allowed."""
    content = reply.content
    if req.kind == MessageType.EVALUATE and req.stage is None:
        _records(content, set(), {"evaluateres.loss", "evaluateres.num_examples"},
                 {"evaluateres.metrics", "evaluateres.status"})
        loss = _exact_keys(content.metric_records["evaluateres.loss"], {"loss"})["loss"]
        n = _exact_keys(content.metric_records["evaluateres.num_examples"], {"num_examples"})["num_examples"]
        allowed = vocabulary.eval_keys(parse_splits(req.settings.eval_split)) - {NUM_EXAMPLES}
        metrics = clean_metrics(dict(content.config_records["evaluateres.metrics"]), allowed, vocabulary.shop_index)
        return RecordDict({"evaluateres.loss": MetricRecord({"loss": clean_scalar("loss", loss)}),
                           "evaluateres.num_examples": MetricRecord({"num_examples": clean_scalar("num_examples", n)}),
                           "evaluateres.metrics": ConfigRecord(metrics),
                           "evaluateres.status": _status(content, "evaluateres")})
    if req.kind != MessageType.TRAIN:
        raise LeakBlocked("no legacy reply of this message type is allowed out")
    if req.stage == "setup":
        _records(content, set(), set(), {SECAGG_RECORD})
        keys = _exact_keys(content.config_records[SECAGG_RECORD], {"pk1", "pk2"})
        pks = _byte_list([keys["pk1"], keys["pk2"]], MAX_PUBLIC_KEY_BYTES)
        return RecordDict({SECAGG_RECORD: ConfigRecord({"pk1": pks[0], "pk2": pks[1]}, False)})
    if req.stage == "share_keys":
        _records(content, set(), set(), {SECAGG_RECORD})
        res = _exact_keys(content.config_records[SECAGG_RECORD], {"dsts", "ctxts"})
        dsts = _int_list(res["dsts"])
        if len(set(dsts)) != len(dsts) or not set(dsts) <= req.peers:
            raise LeakBlocked("key shares addressed to nodes that sent no public key")
        ctxts = _byte_list(res["ctxts"], MAX_CIPHERTEXT_BYTES, count=len(dsts))
        return RecordDict({SECAGG_RECORD: ConfigRecord({"dsts": dsts, "ctxts": ctxts}, False)})
    if req.stage == "collect_masked_vectors":
        _records(content, {"fitres.parameters"}, {"fitres.num_examples"},
                 {"fitres.metrics", "fitres.status", SECAGG_RECORD})
        if len(content.array_records["fitres.parameters"]):
            raise LeakBlocked("plain arrays left in a SecAgg+ reply")
        n = _exact_keys(content.metric_records["fitres.num_examples"], {"num_examples"})["num_examples"]
        allowed = vocabulary.train_keys() - {NUM_EXAMPLES}
        metrics = clean_metrics(dict(content.config_records["fitres.metrics"]), allowed, vocabulary.shop_index)
        masked = _exact_keys(content.config_records[SECAGG_RECORD], {"masked_params"})["masked_params"]
        return RecordDict({"fitres.metrics": ConfigRecord(metrics),
                           "fitres.num_examples": MetricRecord({"num_examples": clean_scalar("num_examples", n)}),
                           "fitres.parameters": ArrayRecord(),
                           "fitres.status": _status(content, "fitres"),
                           SECAGG_RECORD: ConfigRecord({"masked_params": _masked_vectors(masked, req.shapes)}, False)})
    if req.stage == "unmask":
        _records(content, set(), set(), {SECAGG_RECORD})
        res = _exact_keys(content.config_records[SECAGG_RECORD], {"nids", "shares"})
        if tuple(_int_list(res["nids"])) != req.nids:
            raise LeakBlocked("unmasking shares for other nodes than the coordinator asked for")
        shares = _byte_list(res["shares"], MAX_SHARE_BYTES, count=len(req.nids))
        return RecordDict({SECAGG_RECORD: ConfigRecord({"nids": list(req.nids), "shares": shares}, False)})
    raise LeakBlocked("a legacy train message outside the SecAgg+ stages")


def audit_mod_for(vocabulary: VocabularyFn) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A mod that rebuilds every outgoing legacy reply with `clean_legacy_reply`, or sends a generic error."""

    def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        started = time.time()
        try:
            req = LegacyRequest.read(msg, context)
            reply = call_next(msg, context)
        except Exception:  # the text of any exception may quote private data: log it here, send none
            logger.exception("SecAgg+ handler raised; sending a generic error reply")
            return error_reply(msg, FAILED_TEXT)
        if reply.has_error():
            logger.warning("SecAgg+ handler returned an error (code %s: %s); sending a generic error reply",
                           reply.error.code, reply.error.reason)
            return error_reply(msg, FAILED_TEXT)
        try:
            check_reply_metadata(msg, reply, started)
            vocab = vocabulary(context, req.settings) if req.stage in (None, "collect_masked_vectors") else None
            return Message(clean_legacy_reply(req, reply, vocab or MetricVocabulary()), reply_to=msg)
        except LeakBlocked as exc:
            logger.error("SecAgg+ audit blocked a %s reply: %s", msg.metadata.message_type, exc)
        except Exception:  # a check could not even run on what the handler built: block it all the same
            logger.exception("SecAgg+ audit could not check a %s reply; blocked it", msg.metadata.message_type)
        return error_reply(msg, BLOCKED_TEXT)

    return audit_mod


def protocol_vocabulary(_: Context, __: ShopRoundSettings) -> MetricVocabulary:
    """The vocabulary of a custom client without a scenario shop: protocol keys only, no task metrics."""
    return MetricVocabulary()


def make_secure_app(client_fn: Callable[[Context], Any] | None = None,
                    vocabulary: VocabularyFn | None = None) -> ClientApp:
    """The SecAgg+ ClientApp: NumPyClient adapter, `secaggplus_mod`, and the outgoing audit outermost.

    ``vocabulary`` gives the metric keys a shop may send; by default the scenario shop's (its tasks), or
    for a custom ``client_fn`` the protocol keys only.
    """

    def default_client_fn(context: Context):
        return ShopNumPyClient(context).to_client()

    if vocabulary is None:
        vocabulary = protocol_vocabulary if client_fn is not None else shop_vocabulary
    return ClientApp(client_fn=client_fn or default_client_fn, mods=[audit_mod_for(vocabulary), secaggplus_mod])


secure_app = make_secure_app()
