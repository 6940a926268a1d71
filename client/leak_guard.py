"""The leak guard: an app-wide client mod that audits every reply before it leaves the shop.

Allowed out: the encoder arrays the coordinator sent (same keys, shapes and dtypes; with
`share = "all-shareable"` also the shop's vocabulary-independent local arrays under `local.`), one
MetricRecord whose keys are on the allow-list and whose values are finite-or-NaN scalars, one
ConfigRecord at most with allow-listed keys, and error replies carrying only a generic text.
Anything else - an extra array or record, an ID embedding, a user id smuggled in as a metric, an
exception text - is replaced by an error reply whose text names no key and no value. Details go
only to the shop's own log.
"""

from __future__ import annotations

import logging
import math

from flwr.app import ArrayRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.local_state import LOCAL_RECORD
from shared.model import VOCAB_BOUND_LOCAL
from shared.privacy.audit import allowed_metric

LOCAL_PREFIX = "local."  # same wire prefix as server.strategies.LOCAL_PREFIX (client must not import server)
ERROR_CODE_BLOCKED = 6  # flwr ErrorCode.MOD_FAILED_PRECONDITION
BLOCKED_TEXT = "reply blocked by the shop's leak guard"
FAILED_TEXT = "shop failed to process the message"

CONFIG_KEYS: set[str] = set()  # replies carry no ConfigRecord today

logger = logging.getLogger(__name__)


def _shareable_local(context: Context) -> dict[str, tuple[tuple[int, ...], str]]:
    """Wire names -> (shape, dtype) of this shop's local arrays that may be shared (never ID embeddings)."""
    if LOCAL_RECORD not in context.state.array_records:
        return {}
    record = context.state.array_records[LOCAL_RECORD]
    return {LOCAL_PREFIX + k: (tuple(a.shape), a.dtype) for k, a in record.items()
            if not k.startswith(VOCAB_BOUND_LOCAL)}


def _audit_arrays(request: Message, reply_arrays: ArrayRecord, context: Context) -> str | None:
    sent = next(iter(request.content.array_records.values()), None) if request.has_content() else None
    if sent is None:
        return "arrays in a reply to a message that carried none"
    encoder = {k: (tuple(a.shape), a.dtype) for k, a in sent.items() if not k.startswith(LOCAL_PREFIX)}
    config = next(iter(request.content.config_records.values()), {})
    share = str(config.get("share", "encoder"))
    allowed = dict(encoder)
    if share == "all-shareable":
        allowed.update(_shareable_local(context))
    got = {k: (tuple(a.shape), a.dtype) for k, a in reply_arrays.items()}
    if set(encoder) - set(got):
        return f"encoder arrays missing: {sorted(set(encoder) - set(got))[:3]}"
    for key, spec in got.items():
        if key not in allowed:
            return f"array '{key}' is not allowed out"
        if spec != allowed[key]:
            return f"array '{key}' has shape/dtype {spec}, expected {allowed[key]}"
    return None


def audit_reply(request: Message, reply: Message, context: Context) -> str | None:
    """None if ``reply`` may leave the shop, else why not (for the shop's own log only)."""
    content = reply.content
    kind = request.metadata.message_type.split(".")[0]
    arrays, metrics, configs = content.array_records, content.metric_records, content.config_records
    if len(metrics) != 1:
        return f"expected one MetricRecord, found {len(metrics)}"
    if len(configs) > 1 or any(k not in CONFIG_KEYS for c in configs.values() for k in c):
        return "config records are not allowed out"
    if kind == MessageType.TRAIN:
        if len(arrays) != 1:
            return f"expected one ArrayRecord, found {len(arrays)}"
        problem = _audit_arrays(request, next(iter(arrays.values())), context)
        if problem:
            return problem
    elif arrays:
        return f"arrays are not allowed in a {kind} reply"
    for key, value in next(iter(metrics.values())).items():
        if not allowed_metric(key, kind):
            return f"metric '{key}' is not on the allow-list"
        if isinstance(value, list) or not isinstance(value, (int, float)):
            return f"metric '{key}' is not a scalar"
        if isinstance(value, float) and math.isinf(value):
            return f"metric '{key}' is infinite"
    return None


def _error_reply(request: Message, text: str) -> Message:
    return Message(Error(code=ERROR_CODE_BLOCKED, reason=text), reply_to=request)


def leak_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: run the handler, then let its reply out only if it passes `audit_reply`."""
    try:
        reply = call_next(msg, context)
    except Exception:  # the text of any exception may quote private data: log it here, send none
        logger.exception("shop handler raised; sending a generic error reply")
        return _error_reply(msg, FAILED_TEXT)
    if reply.has_error():
        logger.warning("shop handler returned an error (%s); sending a generic error reply", reply.error.reason)
        return _error_reply(msg, FAILED_TEXT)
    problem = audit_reply(msg, reply, context)
    if problem is not None:
        logger.error("leak guard blocked a %s reply: %s", msg.metadata.message_type, problem)
        return _error_reply(msg, BLOCKED_TEXT)
    return reply
