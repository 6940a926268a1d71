"""`LocalGridBase`: what fedshop's own Flower `Grid`s share (the worker pool, the in-process grid, the tests' grid).

Outside a Flower runtime nobody gives messages a sender identity or the Grid a `Run`: this sets both,
implements the Grid API's run bookkeeping and `create_message`, and numbers the nodes the one way
all of them do (node i -> ID `first + i`, `partition-id` i; ID 1 is the SuperLink's). Subclasses only
deliver messages (`push_messages`, `pull_messages`, `send_and_receive`, `get_node_ids`).
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 101  # node IDs 101.. (1 is the SuperLink's)


def node_configs(n_nodes: int, first: int = FIRST_NODE_ID) -> dict[int, dict]:
    """Node ID -> node config for ``n_nodes`` shops: `partition-id` indexes `Scenario.federation_shops()`."""
    return {first + i: {"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)}


def set_task_identity() -> None:
    """Messages take their sender's identity from the process; outside a Flower runtime nobody set it."""
    for attr, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 0)):
        if getattr(TaskIdentity, attr) is None:
            setattr(TaskIdentity, attr, value)


def local_run(run_config: dict | None = None) -> Run:
    """Run 1, running, with ``run_config`` as its override config (what a SuperLink would hand the ServerApp)."""
    return Run(run_id=1, fab_id="", fab_version="", fab_hash="", override_config=dict(run_config or {}),
               pending_at="", starting_at="", running_at="", finished_at="",
               status=RunStatus("running", "", ""), flwr_aid="", federation_id="", primary_task_id=None,
               bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0)


class LocalGridBase(Grid):
    """A Grid in this process: call `_open_run` once (in `__init__`/`__post_init__`), then deliver messages."""

    _run: Run

    def _open_run(self, run_config: dict | None = None) -> None:
        """Set the sender identity and this grid's `Run`."""
        set_task_identity()
        self._run = local_run(run_config)

    def set_run(self, run: Run) -> None:
        """Use ``run`` as the current run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The current run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message from the coordinator (Flower's deprecated helper, kept for the Grid API)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
