"""The leak guard: an app-wide client mod that rebuilds every reply from what may leave the shop.

A reply to `train` is exactly the encoder the coordinator sent (same keys, order, shapes, dtypes;
with `share = "all-shareable"` also the model's vocabulary-independent local arrays under `local.`)
in an ArrayRecord named `arrays`, plus a MetricRecord named `metrics`; a reply to `evaluate` is the
MetricRecord only. A train request with `evaluate-after-train` (fused evaluation) may also get a
MetricRecord `evaluate-metrics` holding exactly what an evaluate reply may hold (the request's
eval-split keys): nothing an evaluate message would not let out. Metric keys come from the shop's
vocabulary (`shared.privacy.audit`: its tasks and the protocol), each value one finite int/float, at
most `MAX_METRICS`. No ConfigRecord, no other record, no other message type. The metadata must be
what `Message(..., reply_to=request)` makes.

The guard does not forward the handler's reply: it builds a fresh one from the checked values
(arrays re-serialised from their parsed contents, metrics key-sorted with canonical types, metadata
derived from the request), so bytes the checks do not look at never leave. A reply that fails a
check, a handler error and a handler exception all become one generic error reply (fixed code and
text); the reason goes only to the shop's own log.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from client.local_state import Shop, kept_shops, resolve_shop
from client.message_settings import settings_for
from shared.privacy.audit import LeakBlocked, MetricVocabulary, clean_metrics, parse_splits
from shared.protocol import (
    ARRAYS_RECORD,
    BLOCKED_TEXT,
    ERROR_CODE_BLOCKED,
    EVAL_METRICS_RECORD,
    FAILED_TEXT,
    LOCAL_PREFIX,
    METRICS_RECORD,
)
from shared.settings import ScenarioError, ShopRoundSettings

NUMPY_STYPE = "numpy.ndarray"
TTL_TOLERANCE = 1e-6  # seconds: a reply's ttl is the request's remaining time at the reply's created_at
CLOCK_SLACK = 1e-3  # seconds: Flower stamps created_at from datetime (microseconds), the guard from time.time()

logger = logging.getLogger(__name__)

Spec = tuple[tuple[int, ...], str]
_SHAREABLE: dict[int, tuple[Shop, dict[str, Spec]]] = {}  # id(shop) -> (shop, wire name -> spec), per process


def request_settings(msg: Message, context: Context) -> ShopRoundSettings:
    """Run config overridden by the request's ConfigRecords: the message's frozen settings (`settings_for`).

    `leak_guard` asks for them before the handler runs, so they are parsed from the request as it arrived
    and no handler can change what the reply is checked against.
    """
    return settings_for(msg, context)


def shop_vocabulary(context: Context, settings: ShopRoundSettings) -> MetricVocabulary:
    """The metric vocabulary of the shop this node serves: its tasks, its ranking negatives, its index."""
    shop = resolve_shop(context, settings)  # cached per process: the handler resolved it already
    return MetricVocabulary(tasks=tuple(shop.tensors.tasks),
                            sampled_negatives=int(shop.scenario.features.sampled_negatives), shop_index=shop.index)


def _shareable_local(context: Context, settings: ShopRoundSettings) -> dict[str, Spec]:
    """Wire names -> (shape, dtype) of the local arrays the FedAvg-all baseline shares (never ID embeddings).

    Taken from a fresh model of the shop (not from the handler's state), so a handler cannot widen it.
    """
    shop = resolve_shop(context, settings)
    if id(shop) not in _SHAREABLE:
        kept = {id(s) for s in kept_shops()}  # bounded as the process's shops are: forget the ones it dropped
        for key in [k for k in _SHAREABLE if k not in kept]:
            del _SHAREABLE[key]
        model = shop.model()
        local = model.local.state_dict()
        _SHAREABLE[id(shop)] = (shop, {LOCAL_PREFIX + k: (tuple(local[k].shape), str(local[k].numpy().dtype))
                                       for k in model.shareable_local_keys()})
    return _SHAREABLE[id(shop)][1]


def check_reply_metadata(request: Message, reply: Message, started: float) -> None:
    """LeakBlocked unless ``reply``'s metadata is what `Message(..., reply_to=request)` gives after ``started``."""
    expected = Message(RecordDict(), reply_to=request).metadata.__dict__
    got = reply.metadata.__dict__
    if set(got) != set(expected):
        raise LeakBlocked("reply metadata has other fields than Flower's reply metadata")
    for key, value in expected.items():
        if key not in ("_created_at", "_ttl") and got[key] != value:
            raise LeakBlocked(f"reply metadata field '{key.lstrip('_')}' differs from the request's reply metadata")
    created, ttl = got["_created_at"], got["_ttl"]
    if type(created) is not float or not started - CLOCK_SLACK <= created <= time.time() + CLOCK_SLACK:
        raise LeakBlocked("reply metadata created_at is outside the handler's run")
    remaining = request.metadata.created_at + request.metadata.ttl - created
    if type(ttl) is not float or abs(ttl - remaining) > TTL_TOLERANCE:
        raise LeakBlocked("reply metadata ttl is not the request's remaining time")


def _clean_array(array: Array, spec: Spec) -> Array:
    """The array re-serialised from its parsed contents, if its shape, dtype and storage type match ``spec``."""
    if not isinstance(array, Array) or array.stype != NUMPY_STYPE or (tuple(array.shape), array.dtype) != spec:
        raise LeakBlocked("an array's shape, dtype or storage type differs from the allowed one")
    try:
        parsed = array.numpy()
    except Exception:  # malformed bytes: whatever they are, they do not leave
        raise LeakBlocked("an array's bytes do not parse") from None
    if (tuple(parsed.shape), str(parsed.dtype)) != spec:
        raise LeakBlocked("an array's bytes hold another shape or dtype than its header says")
    return Array(np.ascontiguousarray(parsed))


def _clean_arrays(request: Message, reply_arrays: ArrayRecord, context: Context,
                  settings: ShopRoundSettings) -> ArrayRecord:
    """The encoder arrays (and baseline-shareable local arrays), in the request's order, re-serialised."""
    sent = list(request.content.array_records.values())
    if len(sent) != 1:
        raise LeakBlocked("a train request without exactly one array record")
    allowed = {k: (tuple(a.shape), a.dtype) for k, a in sent[0].items() if not k.startswith(LOCAL_PREFIX)}
    if settings.share == "all-shareable":
        allowed.update(_shareable_local(context, settings))
    if set(reply_arrays) != set(allowed):
        raise LeakBlocked("reply arrays are not exactly the encoder (and shareable local) arrays")
    return ArrayRecord({k: _clean_array(reply_arrays[k], spec) for k, spec in allowed.items()})


def clean_reply(request: Message, reply: Message, context: Context, started: float) -> Message:
    """The reply to send, rebuilt from the handler's ``reply``; LeakBlocked (reason for the log) if not allowed."""
    kind = request.metadata.message_type
    if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        raise LeakBlocked("replies to this message type are not allowed out")
    check_reply_metadata(request, reply, started)
    content = reply.content
    if content.config_records:
        raise LeakBlocked("config records are not allowed out")
    settings = request_settings(request, context)
    array_names = {ARRAYS_RECORD} if kind == MessageType.TRAIN else set()
    fused = (kind == MessageType.TRAIN and settings.evaluate_after_train
             and EVAL_METRICS_RECORD in content.metric_records)
    metric_names = {METRICS_RECORD, EVAL_METRICS_RECORD} if fused else {METRICS_RECORD}
    if set(content.array_records) != array_names or set(content.metric_records) != metric_names:
        raise LeakBlocked("reply records are not exactly the protocol's records (names included)")
    vocabulary = shop_vocabulary(context, settings)
    eval_keys = vocabulary.eval_keys(parse_splits(settings.eval_split)) if fused or kind == MessageType.EVALUATE \
        else frozenset()
    allowed = vocabulary.train_keys() if kind == MessageType.TRAIN else eval_keys
    metrics = clean_metrics(dict(content.metric_records[METRICS_RECORD]), allowed, vocabulary.shop_index)
    out = RecordDict()
    if kind == MessageType.TRAIN:
        out[ARRAYS_RECORD] = _clean_arrays(request, content.array_records[ARRAYS_RECORD], context, settings)
    out[METRICS_RECORD] = MetricRecord(metrics)
    if fused:  # what an evaluate reply to this request's eval-split may hold, checked the same way
        out[EVAL_METRICS_RECORD] = MetricRecord(clean_metrics(dict(content.metric_records[EVAL_METRICS_RECORD]),
                                                              eval_keys, vocabulary.shop_index))
    return Message(out, reply_to=request)


def error_reply(request: Message, text: str) -> Message:
    """A fresh error reply with the fixed code and a fixed ``text`` (never the handler's words)."""
    return Message(Error(code=ERROR_CODE_BLOCKED, reason=text), reply_to=request)


def leak_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: run the handler, then send a reply rebuilt by `clean_reply`, or a generic error."""
    started = time.time()
    try:
        if msg.metadata.message_type in (MessageType.TRAIN, MessageType.EVALUATE):
            request_settings(msg, context)  # parsed (and frozen) before any handler code runs
        reply = call_next(msg, context)
    except ScenarioError as exc:  # a bad message config: the key and the fix, no traceback (logged, never sent)
        logger.error("shop refused the message config: %s", exc)
        return error_reply(msg, FAILED_TEXT)
    except Exception as exc:  # the text of any exception may quote private data: log it here, send none
        # One line where a user watches a simulation (no traceback on their terminal); the traceback at DEBUG.
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        logger.error("shop handler raised %s%s: %s; sending a generic error reply", type(exc).__name__,
                     f" at {Path(where.filename).name}:{where.lineno}" if where else "", exc)
        logger.debug("the shop handler's traceback", exc_info=True)
        return error_reply(msg, FAILED_TEXT)
    if reply.has_error():
        logger.warning("shop handler returned an error (code %s: %s); sending a generic error reply",
                       reply.error.code, reply.error.reason)
        return error_reply(msg, FAILED_TEXT)
    try:
        return clean_reply(msg, reply, context, started)
    except LeakBlocked as exc:
        logger.error("leak guard blocked a %s reply: %s", msg.metadata.message_type, exc)
    except Exception:  # a check could not even run on what the handler built: block it all the same
        logger.exception("leak guard could not check a %s reply; blocked it", msg.metadata.message_type)
    return error_reply(msg, BLOCKED_TEXT)

