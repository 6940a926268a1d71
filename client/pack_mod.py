"""Client mod: unpack a request the coordinator packed (`shared.wire_pack`), pack the reply the same way.

Outermost mod of the ClientApp: everything inside (wire mod, leak guard, handlers) sees the Arrays as
the coordinator built them, and the reply leaves with exactly the records the leak guard and wire mod let
out, only carried in one ConfigRecord. A request that was not packed (simulation, FEDSHOP_PACK_ARRAYS=0 at the
coordinator) gets an unpacked reply, so both sides always agree.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.protocol import ERROR_CODE_BLOCKED, UNPACK_TEXT
from shared.wire_pack import PackError, is_packed, pack, unpack

logger = logging.getLogger(__name__)


def pack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack ``msg`` if packed, call the app, pack its reply when the request was packed."""
    if not (msg.has_content() and is_packed(msg.content)):
        return call_next(msg, context)
    try:
        msg.content = unpack(msg.content)
    except PackError as err:
        logger.warning("fedshop: %s", err)  # details stay in the shop's log
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=UNPACK_TEXT), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply
