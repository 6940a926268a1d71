"""Test harness for the Flower layer: a tiny scenario and an in-process Grid that calls the real ClientApp.

`LocalGrid` delivers each message to `client.client_app.app` (leak guard included) in this process,
one Context per node, so strategy, faults and leak-guard paths run in seconds without Ray. The
end-to-end tests in test_simulation.py use Flower's real simulation engine instead.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client import client_app
from server.server_app import initial_encoder
from shared.compression import encode_delta
from shared.scenario import Scenario, load_scenario
from simulations.local_grid import LocalGridBase, node_configs

TINY = {"data.synthetic.n_shops": 3, "data.synthetic.n_late_joiners": 0, "data.synthetic.max_impressions": 2500,
        "data.synthetic.min_impressions": 800, "data.synthetic.n_small_shops": 1,
        "data.synthetic.eval_impressions": 0, "model.embed_dim": 8,
        "model.expert_dim": 16, "model.tower_dim": 8, "model.n_experts": 2, "features.hash_buckets": 512,
        "features.product_buckets": 512, "federation.warmup_rounds": 0, "federation.min_shops": 2}
# node config of merchants that agreed to test faults (client/merchant_policy.py): tests that inject faults use it
TEST_FAULTS = {"allow-test-faults": True}


def tiny_scenario(**extra: object) -> Scenario:
    """Three small synthetic shops and a small model: a federation round takes about a second."""
    return load_scenario("default", {**TINY, **extra})


def write_scenario(scenario: Scenario, path: Path) -> Path:
    """Write a scenario's resolved dict where shops (and `load_scenario`) can read it."""
    import tomli_w

    path.write_text(tomli_w.dumps(scenario.raw), encoding="utf-8")
    return path


def one_shop(tmp_path: Path) -> tuple[Callable[..., Message], Context]:
    """Messages for the tiny scenario's first shop (encoder share, val+test, personal mix on) and its Context.

    ``message(kind, server_round, **config)`` builds a train or evaluate message as the ServerApp would; the
    ClientApp is registered through a one-node `LocalGrid`, so its handlers can be called directly.
    """
    scenario = tiny_scenario()
    path = write_scenario(scenario, tmp_path / "scenario.toml")

    def message(kind: str, server_round: int, **extra: object) -> Message:
        config = ConfigRecord({"scenario": str(path), "seed": scenario.seed, "server-round": server_round,
                               "share": "encoder", "eval-split": "val+test", "personal-mix": 20000.0,
                               "run-dir": str(tmp_path / "run"), **extra})
        msg = Message(RecordDict({"arrays": initial_encoder(scenario), "config": config}), 1, kind)
        msg.metadata.__dict__["_message_id"] = f"{kind}-{server_round}"
        return msg

    LocalGrid(1, client_app.app)
    return message, Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


class LocalGrid(LocalGridBase):
    """A Grid whose nodes are in-process ClientApp calls; ``silent`` nodes never reply (a timeout)."""

    def __init__(self, n_nodes: int, app: object, silent: Iterable[int] = (),
                 absent_until: dict[int, int] | None = None, node_config: dict | None = None) -> None:
        self._open_run()
        self.app = app
        # ``node_config``: merchant-side keys every node gets (e.g. `TEST_FAULTS`, `cap-local-epochs`)
        configs = {nid: {**cfg, **(node_config or {})} for nid, cfg in node_configs(n_nodes, first=1000).items()}
        self.node_ids = list(configs)
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(), run_config={})
                         for nid, cfg in configs.items()}
        self.silent = {self.node_ids[i] for i in silent}
        # node index -> first server round it answers (a SuperNode that connects mid-run)
        self.absent_until = {self.node_ids[i]: r for i, r in (absent_until or {}).items()}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            config = next(iter(msg.content.config_records.values()), {})
            if int(config.get("server-round", 0)) < self.absent_until.get(node, 0):
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # what Flower's runtime does with an escaping exception
                reply = Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
            out.append(reply)
        self.replies.extend(out)
        return out


def coordinator_home(tmp_path: Path, pid: int) -> Path:
    """A coordinator home whose superlink.json records ``pid`` as its SuperLink (this process: a running one).

    The record names the program that runs under ``pid`` (status checks it: a recycled PID is not the SuperLink).
    """
    import json
    import os
    import sys
    from dataclasses import asdict

    from simulations.deploy.coordinator import Coordinator
    from simulations.deploy.processes import ProcessRecord

    home = tmp_path / "coord"
    home.mkdir()
    info = Coordinator(str(home), "127.0.0.1", 9092, "coord.example.com:9092", "ca", "cert", "key")
    (home / "coordinator.json").write_text(json.dumps(asdict(info)))
    command = [sys.executable]
    if pid == os.getpid() and Path("/proc/self/cmdline").exists():
        command = [Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()]
    (home / "superlink.json").write_text(json.dumps(asdict(ProcessRecord(pid, "flower-superlink", command, "log"))))
    return home


def honest_train_round(strategy, global_arrays: Mapping[str, np.ndarray], n: int,
                       trained: Callable[[int], dict[str, np.ndarray]], mode: str
                       ) -> tuple[list[Message], list[Message]]:
    """The train messages ``strategy`` sends to ``n`` local shops (node IDs 1000..) and each shop i's honest
    reply: ``trained(i)`` dense (mode "none") or as its wire delta; replies sorted so shop i's is at index i."""
    sent = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in global_arrays.items()}),
                                         ConfigRecord(), LocalGrid(n, None)))
    replies = []
    for msg in sent:
        msg.metadata.__dict__["_message_id"] = f"train-{msg.metadata.dst_node_id}"
        i = msg.metadata.dst_node_id - 1000
        arrays = trained(i) if mode == "none" else encode_delta(trained(i), dict(global_arrays))
        replies.append(Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                           "metrics": MetricRecord({"num-examples": 100 + i, "shop-index": i})}),
                               reply_to=msg))
    return sent, sorted(replies, key=lambda m: m.metadata.src_node_id)


def load_benchmark(name: str) -> ModuleType:
    """A benchmarks/ script as a module, imported as the script imports its siblings (benchmarks/ on the path)."""
    bench = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


def claiming_app(claim: object, node_position: int) -> Callable[[Message, Context], Message]:
    """The ClientApp, except that the node at ``node_position`` claims ``claim`` as its shop-index in every reply
    (a hostile merchant speaking for another shop)."""
    from shared.protocol import SHOP_INDEX

    def app(msg: Message, context: Context) -> Message:
        reply = client_app.app(msg, context)
        if context.node_config["partition-id"] == node_position and not reply.has_error():
            for record in reply.content.metric_records.values():
                record[SHOP_INDEX] = claim
        return reply

    return app
