"""A Flower Grid that hands every call to another Grid; subclasses override only what they change.

Flower has no Grid wrapper of its own (its strategies wrap strategies, not grids), so the few
delegating methods live here once for every fedshop Grid wrapper (`server.polling_grid`,
`server.node_identity`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class DelegatingGrid(Grid):
    """Delegates Flower's whole Grid API (and any other attribute, e.g. the HttpGrid's node) to ``inner``."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run: Any) -> None:
        """Flower's Grid API, delegated."""
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        """Flower's Grid API, delegated."""
        return self._inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Flower's Grid API, delegated."""
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Flower's Grid API, delegated."""
        return self._inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Flower's Grid API, delegated."""
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's Grid API, delegated."""
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower's Grid API, delegated."""
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's Grid API, delegated."""
        return self._inner.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        """Anything else comes from the wrapped Grid."""
        if name == "_inner":  # not set yet (e.g. during unpickling): never recurse
            raise AttributeError(name)
        return getattr(self._inner, name)
