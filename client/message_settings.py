"""A shop's round settings, parsed once per message: one frozen `ShopRoundSettings` for every reader.

Each message used to be parsed by every piece that needed a setting: the wire mod, the handler, the
leak guard after the handler, and under SecAgg+ the audit mod and the NumPyClient (2-3 parses per
message). `settings_for(msg, context)` parses the node's run config overridden by the message's
ConfigRecords on its first call for a message and hands the same frozen object to every later caller
for that message. The leak guard calls it before the handler runs, so what it checks the reply
against is fixed before any handler code runs (and frozen: no handler can change it).

The cache holds the last message only (a weak reference: an old message is never kept alive), per
thread (a `ContextVar`): Flower hands a node one message at a time.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from shared.protocol import WIRE_RECORD
from shared.settings import ShopRoundSettings

# Config records that are protocol, not settings: compression's wire record and SecAgg+'s stage record.
NOT_SETTINGS = frozenset({WIRE_RECORD, RECORD_KEY_CONFIGS})


@dataclass(frozen=True)
class _Parsed:
    """The settings of one message, with what they were parsed from."""

    msg: Any  # weakref.ref to the Message, or None when parsed from a bare config (legacy NumPyClient)
    run_config: dict[str, Any]
    sent: dict[str, Any]
    settings: ShopRoundSettings


_LAST: ContextVar[_Parsed | None] = ContextVar("fedshop_message_settings", default=None)


def parse(run_config: Mapping[str, Any], sent: Mapping[str, Any]) -> ShopRoundSettings:
    """The one parse: the run config overridden by what the coordinator sent (a `ScenarioError` if bad)."""
    return ShopRoundSettings.from_message(dict(run_config), dict(sent))


def sent_config(msg: Message) -> dict[str, Any]:
    """What the coordinator sent as settings: every ConfigRecord of ``msg`` but the protocol records, merged."""
    if not msg.has_content():
        return {}
    out: dict[str, Any] = {}
    for name, record in msg.content.config_records.items():
        if name not in NOT_SETTINGS:
            out.update(dict(record))
    return out


def settings_for(msg: Message, context: Context) -> ShopRoundSettings:
    """The frozen settings of ``msg``: parsed on the first call for this message, the same object after."""
    return _cached(context, msg=msg)


def settings_for_config(context: Context, config: Mapping[str, Any]) -> ShopRoundSettings:
    """The settings of the message being handled when only its config is at hand (the legacy NumPyClient).

    The last message's settings if they were parsed from this very run config and config, else a parse.
    """
    return _cached(context, config=config)


def _cached(context: Context, *, msg: Message | None = None, config: Mapping[str, Any] | None = None
            ) -> ShopRoundSettings:
    """The one cache: the last parse if it is of ``msg`` (by identity) or of this run config and ``config``.

    A miss parses and keeps the result for the next caller, with a weak reference to ``msg`` if given.
    """
    last = _LAST.get()
    if msg is not None and last is not None and last.msg is not None and last.msg() is msg:
        return last.settings
    run_config = dict(context.run_config)
    sent = sent_config(msg) if msg is not None else dict(config or {})
    if msg is None and last is not None and last.sent == sent and last.run_config == run_config:
        return last.settings
    settings = parse(run_config, sent)
    _LAST.set(_Parsed(_weak(msg), run_config, sent, settings))
    return settings


def _weak(msg: Message | None) -> Any:
    """A weak reference to ``msg`` (None without one, or when it is not weakly referenceable: cache by content)."""
    if msg is None:
        return None
    try:
        return weakref.ref(msg)
    except TypeError:
        return None
