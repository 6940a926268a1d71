"""SecAgg+ on the legacy workflow path: exact aggregate up to quantisation, no individual update seen, dropouts."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

from client.secure_client import audit_mod_for, make_secure_app
from server.federation_settings import FederationSettings, split_privacy
from server.secagg_settings import SecAggSettings
from server.secure import run_secure_federation
from shared.privacy.audit import MetricVocabulary
from shared.protocol import BLOCKED_TEXT, ERROR_CODE_BLOCKED, FAILED_TEXT
from shared.settings import FederationTable, ScenarioError
from simulations.privacy.in_process_grid import InProcessGrid, nodes

SHAPES = {"emb.weight": (64, 8), "tower.weight": (8, 16), "tower.bias": (8,)}


def _update(shop: int, rnd: int) -> list[np.ndarray]:
    """What shop ``shop`` would send in round ``rnd``: deterministic, different per shop."""
    rng = np.random.default_rng(1000 * rnd + shop)
    return [rng.normal(scale=0.5, size=s).astype(np.float32) for s in SHAPES.values()]


class ToyShop(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.shop = int(context.node_config["partition-id"])

    def fit(self, parameters, config):
        return _update(self.shop, int(config["server-round"])), 1, {"loss": 0.5, "shop-index": self.shop}

    def evaluate(self, parameters, config):
        return 0.0, 1, {"shop-index": self.shop}


def _run(tmp_path: Path, n: int, *, drop=None, rounds: int = 1, secagg: SecAggSettings | None = None):
    grid = InProcessGrid(make_secure_app(lambda ctx: ToyShop(ctx).to_client()), nodes(n), drop=drop)
    settings = FederationSettings(num_server_rounds=rounds, run_dir=str(tmp_path), min_shops=2)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=__import__("flwr.app").app.RecordDict(), run_config={})
    initial = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    run_dir = run_secure_federation(grid, ctx, settings, secagg or SecAggSettings(), initial=initial,
                                    shop_names=[f"s{i}" for i in range(n)])
    return grid, run_dir


def _checkpoint_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    from server.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return ckpt.arrays


def test_aggregate_equals_plain_mean_within_quantisation(tmp_path: Path) -> None:
    n = 5
    settings = SecAggSettings()
    grid, run_dir = _run(tmp_path, n, secagg=settings)
    agg = _checkpoint_arrays(run_dir)
    plain = [np.mean([_update(s, 1)[j] for s in range(n)], axis=0) for j in range(len(SHAPES))]
    err = max(float(np.abs(agg[k] - p).max()) for k, p in zip(SHAPES, plain, strict=True))
    # Stochastic rounding: each shop's value moves by < one quantum, so the mean moves by < one quantum.
    assert 0 < err < settings.quantisation_step()
    assert err < 1e-5


def test_coordinator_never_holds_an_individual_update(tmp_path: Path) -> None:
    n = 4
    grid, _ = _run(tmp_path, n)
    train_replies = [r for r in grid.received if r.message_type == "train" and r.content is not None]
    assert train_replies, "the coordinator received nothing"
    own = {s: np.concatenate([a.ravel() for a in _update(s, 1)]) for s in range(n)}
    for reply in train_replies:
        # No float arrays at all: SecAgg+ empties the arrays record before the reply leaves the shop.
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        masked = reply.content.config_records["secaggplus_configs"].get("masked_params")
        if masked is None:
            continue
        from flwr.common import bytes_to_ndarray
        vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in masked]).astype(np.float64)
        for update in own.values():  # masked integers are uncorrelated with any shop's true update
            # Under independence the sample correlation has sd 1/sqrt(n): allow 5 sd (masks are random per run).
            assert abs(np.corrcoef(vec[: update.size], update)[0, 1]) < 5 / np.sqrt(update.size)


def test_round_survives_a_dropout_above_threshold(tmp_path: Path) -> None:
    n = 5
    # Node 3 answers the key set-up stages, then vanishes before sending its masked vector.
    dropped = 103

    def drop(nid, msg):
        stage = msg.content.config_records.get("secaggplus_configs", {}).get("stage")
        return nid == dropped and stage == "collect_masked_vectors"

    settings = SecAggSettings(num_shares=1.0, reconstruction_threshold=0.6)
    grid, run_dir = _run(tmp_path, n, drop=drop, secagg=settings)
    agg = _checkpoint_arrays(run_dir)
    alive = [s for s in range(n) if s + 101 != dropped]
    plain = [np.mean([_update(s, 1)[j] for s in alive], axis=0) for j in range(len(SHAPES))]
    err = max(float(np.abs(agg[k] - p).max()) for k, p in zip(SHAPES, plain, strict=True))
    assert err < settings.quantisation_step()


def test_secagg_settings_come_from_the_schema_which_rejects_unknown_keys() -> None:
    _, on, settings, _ = split_privacy({"secure-aggregation": True, "secagg-clipping-range": 4, "scenario": "x"})
    assert on and settings.clipping_range == 4.0 and settings.weighting == "uniform"
    assert SecAggSettings() == SecAggSettings.from_settings(FederationTable())  # one set of defaults
    with pytest.raises(ScenarioError, match="secagg-num-shares"):
        split_privacy({"secagg-shares": 3})
    with pytest.raises(ScenarioError, match="secagg-weighting"):
        split_privacy({"secagg-weighting": "examplse"})


# ---- the SecAgg+ audit: every legacy reply is rebuilt from the protocol, smuggling is refused ---------
# Threat: the shop's handler (or anything between it and the wire) hides private data in a legacy reply:
# record names, metadata, ConfigRecord values, metric lists or made-up metric keys, protocol byte strings,
# the status text or the error text. `client.secure_client.audit_mod_for` must turn each into the one
# generic error reply and let the honest replies of every stage through, rebuilt.

LEGACY_TASKS = ("ctr", "ranking")
SMUGGLED = ("4711", "u-", "user", "loss", "auc", "fitres", "pk1", "masked")


class MetricShop(NumPyClient):
    """A toy shop whose replies carry realistic metric keys for the tasks in LEGACY_TASKS."""
    def __init__(self, context: Context) -> None:
        self.shop = int(context.node_config["partition-id"])

    def fit(self, parameters, config):
        return _update(self.shop, 1), 1, {"loss": 0.5, "loss-ctr": 0.4, "loss-ranking": 0.6, "shop-index": self.shop}

    def evaluate(self, parameters, config):
        splits = str(config.get("eval-split", "val")).split("+")
        prefixes = [f"{s}/" for s in splits] if len(splits) > 1 else [""]
        metrics = {f"{p}{k}": v for p in prefixes for k, v in (("ctr.auc", 0.7), ("ranking.hr@10_s99", 0.25))}
        return 0.3, 7, {**metrics, "shop-index": self.shop}


def _vocabulary(context: Context, config: dict) -> MetricVocabulary:
    return MetricVocabulary(tasks=LEGACY_TASKS, sampled_negatives=99,
                            shop_index=int(context.node_config["partition-id"]))


@pytest.fixture(scope="module")
def legacy_exchange(tmp_path_factory) -> dict:
    """Real (request, honest reply) pairs of node 101 for every SecAgg+ stage and the legacy evaluate."""
    pairs: dict = {}

    def record(msg, context, call_next):
        secagg = msg.content.config_records.get("secaggplus_configs")
        stage = secagg.get("stage") if secagg is not None else msg.metadata.message_type
        request = copy.deepcopy(msg)
        reply = call_next(msg, context)
        if msg.metadata.dst_node_id == 101:
            pairs[stage] = (request, copy.deepcopy(reply.content), context)
        return reply

    app = ClientApp(client_fn=lambda ctx: MetricShop(ctx).to_client(), mods=[record, secaggplus_mod])
    grid = InProcessGrid(app, nodes(4))
    settings = FederationSettings(num_server_rounds=1, run_dir=str(tmp_path_factory.mktemp("legacy")), min_shops=2)
    run_secure_federation(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                          settings, SecAggSettings(),
                          initial={k: np.zeros(s, np.float32) for k, s in SHAPES.items()},
                          shop_names=[f"s{i}" for i in range(4)])
    assert set(pairs) == {"setup", "share_keys", "collect_masked_vectors", "unmask", "evaluate"}, set(pairs)
    return pairs


def _audited(legacy_exchange, stage, mutate=None, caplog=None):
    """(request, what the audit sends) when the handler returns the honest reply of ``stage`` tampered by ``mutate``."""
    request, honest, context = legacy_exchange[stage]
    msg = copy.deepcopy(request)

    def handler(m, c):
        reply = Message(copy.deepcopy(honest), reply_to=m)
        return (mutate(reply) or reply) if mutate else reply

    return msg, audit_mod_for(_vocabulary)(msg, context, handler)


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors", "unmask", "evaluate"])
def test_honest_legacy_replies_pass_rebuilt(legacy_exchange, stage) -> None:
    msg, reply = _audited(legacy_exchange, stage)
    _, honest, _ = legacy_exchange[stage]
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    got = reply.content
    assert set(got.config_records) == set(honest.config_records)
    assert set(got.metric_records) == set(honest.metric_records)
    assert set(got.array_records) == set(honest.array_records)
    for name, rec in honest.config_records.items():
        assert dict(got.config_records[name]) == dict(rec)
    for name, rec in honest.metric_records.items():
        assert dict(got.metric_records[name]) == dict(rec)


def _set(record_kind, name, key, value):
    def mutate(reply):
        getattr(reply.content, record_kind)[name][key] = value
    return mutate


def _rename(old, new):
    def mutate(reply):
        reply.content[new] = reply.content[old]
        del reply.content[old]
    return mutate


def _add_record(name, record):
    def mutate(reply):
        reply.content[name] = record
    return mutate


def _meta(field, value):
    def mutate(reply):
        reply.metadata.__dict__[field] = value
    return mutate


def _made_up(keys):
    def mutate(reply):
        for i, k in enumerate(keys):
            reply.content.config_records["fitres.metrics"][k] = float(i)
    return mutate


def _plain_arrays(reply):
    reply.content.array_records["fitres.parameters"]["0"] = Array(np.full(3, 4711.0))


def _extra_masked_vector(reply):
    masked = reply.content.config_records["secaggplus_configs"]["masked_params"]
    reply.content.config_records["secaggplus_configs"]["masked_params"] = [*masked, ndarray_to_bytes(np.full(3, 4711))]


def _float_masked_vector(reply):
    cfg = reply.content.config_records["secaggplus_configs"]
    masked = list(cfg["masked_params"])
    masked[1] = ndarray_to_bytes(bytes_to_ndarray(masked[1]).astype(np.float64) + 0.4711)
    cfg["masked_params"] = masked


def _evaluate_metric(key, value):
    return _set("config_records", "evaluateres.metrics", key, value)


def _config(**values):
    return ConfigRecord(values)


def _metrics(**values):
    return MetricRecord(values)


LEGACY_ROUTES = {
    # record names and extra records
    "collect: metrics record renamed": ("collect_masked_vectors", _rename("fitres.metrics", "u-4711")),
    "collect: extra record named after a user": ("collect_masked_vectors", _add_record("user-4711", _metrics())),
    "collect: extra ConfigRecord with bytes": ("collect_masked_vectors", _add_record("x", _config(b=b"u-4711"))),
    "evaluate: extra ConfigRecord with a list of strings": ("evaluate",
                                                            _add_record("x", _config(ids=["u-4711"] * 500))),
    # metadata
    "collect: group_id": ("collect_masked_vectors", _meta("_group_id", "user-4711")),
    "setup: group_id": ("setup", _meta("_group_id", "user-4711")),
    "evaluate: ttl": ("evaluate", _meta("_ttl", 4711.0)),
    "unmask: an extra metadata field": ("unmask", _meta("_user", "u-4711")),
    # ConfigRecord values of the metrics record
    "collect: bytes under a metric key": ("collect_masked_vectors", _set("config_records", "fitres.metrics", "loss",
                                                                           b"u-4711")),
    "collect: long list of strings": ("collect_masked_vectors", _set("config_records", "fitres.metrics", "loss",
                                                                     ["u-4711"] * 500)),
    "collect: list of floats under loss": ("collect_masked_vectors", _set("config_records", "fitres.metrics", "loss",
                                                                          [0.5, 4711.0])),
    "collect: a string under shop-index": ("collect_masked_vectors", _set("config_records", "fitres.metrics",
                                                                          "shop-index", "u-4711")),
    "collect: another shop's index": ("collect_masked_vectors", _set("config_records", "fitres.metrics", "shop-index",
                                                                     4711)),
    "collect: many made-up per-task losses": ("collect_masked_vectors", _made_up([f"loss-u{i}" for i in range(100)])),
    "collect: a loss of a task the shop lacks": ("collect_masked_vectors", _made_up(["loss-sales"])),
    "collect: user id as a metric key": ("collect_masked_vectors", _made_up(["user-4711"])),
    "collect: num_examples as a list": ("collect_masked_vectors", _set("metric_records", "fitres.num_examples",
                                                                       "num_examples", [4711, 4712])),
    "evaluate: list of floats under a task metric": ("evaluate", _evaluate_metric("ctr.auc", [0.7, 4711.0])),
    "evaluate: made-up ranking cut-off": ("evaluate", _evaluate_metric("ranking.hr@4711_s99", 0.1)),
    "evaluate: a metric of a task the shop lacks": ("evaluate", _evaluate_metric("sales.rmse", 0.1)),
    "evaluate: loss as a list": ("evaluate", _set("metric_records", "evaluateres.loss", "loss", [0.3, 4711.0])),
    # status text
    "collect: status message": ("collect_masked_vectors", _set("config_records", "fitres.status", "message",
                                                               "user u-4711")),
    "evaluate: status code": ("evaluate", _set("config_records", "evaluateres.status", "code", 4711)),
    # protocol values
    "collect: plain arrays left": ("collect_masked_vectors", _plain_arrays),
    "collect: an extra masked vector": ("collect_masked_vectors", _extra_masked_vector),
    "collect: a float masked vector": ("collect_masked_vectors", _float_masked_vector),
    "setup: rows in a public key": ("setup", _set("config_records", "secaggplus_configs", "pk1", b"u-4711," * 600)),
    "setup: an extra protocol key": ("setup", _set("config_records", "secaggplus_configs", "user", "u-4711")),
    "share_keys: a share for an unknown node": ("share_keys", _set("config_records", "secaggplus_configs", "dsts",
                                                                   [4711, 102, 103])),
    "share_keys: rows in a ciphertext": ("share_keys", _set("config_records", "secaggplus_configs", "ctxts",
                                                            [b"u-4711," * 600] * 3)),
    "unmask: shares for other nodes": ("unmask", _set("config_records", "secaggplus_configs", "nids",
                                                      [101, 102, 103, 4711])),
    "unmask: rows in a share": ("unmask", _set("config_records", "secaggplus_configs", "shares",
                                               [b"u-4711," * 100] * 4)),
}


@pytest.mark.parametrize("route", list(LEGACY_ROUTES))
def test_each_smuggling_route_in_a_legacy_reply_is_refused(legacy_exchange, route, caplog) -> None:
    stage, mutate = LEGACY_ROUTES[route]
    with caplog.at_level("ERROR", logger="client.secure_client"):
        msg, reply = _audited(legacy_exchange, stage, mutate)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason == BLOCKED_TEXT and reply.error.code == ERROR_CODE_BLOCKED
    assert not any(s in reply.error.reason for s in SMUGGLED)
    assert reply.metadata.group_id == msg.metadata.group_id
    # a deliberate refusal by a check, not a check that crashed on the tampered reply
    assert any(r.getMessage().startswith("SecAgg+ audit blocked") for r in caplog.records), caplog.text


@pytest.mark.parametrize("stage", ["collect_masked_vectors", "evaluate"])
def test_legacy_error_replies_and_exceptions_leave_only_the_generic_text(legacy_exchange, stage) -> None:
    request, _, context = legacy_exchange[stage]

    def erroring(m, c):
        return Message(Error(code=4711, reason="user u-4711: loss 0.4711"), reply_to=m)

    def crashing(m, c):
        raise RuntimeError("user u-4711 has no history")

    for handler in (erroring, crashing):
        reply = audit_mod_for(_vocabulary)(copy.deepcopy(request), context, handler)
        assert reply.has_error() and reply.error.reason == FAILED_TEXT and reply.error.code == ERROR_CODE_BLOCKED


class SmugglingShop(MetricShop):
    """Shop 0 hides a user id in a string under the allow-listed `loss` key (Flower itself refuses lists here)."""
    def fit(self, parameters, config):
        arrays, weight, metrics = super().fit(parameters, config)
        if self.shop == 0:
            metrics["loss"] = "u-4711"
        return arrays, weight, metrics


def test_a_smuggling_shop_is_refused_end_to_end_and_the_round_survives(tmp_path: Path) -> None:
    n = 5
    grid = InProcessGrid(make_secure_app(lambda ctx: SmugglingShop(ctx).to_client(), vocabulary=_vocabulary), nodes(n))
    settings = FederationSettings(num_server_rounds=1, run_dir=str(tmp_path), min_shops=2)
    run_dir = run_secure_federation(grid, Context(run_id=1, node_id=0, node_config={},
                                                  state=RecordDict(), run_config={}),
                                    settings, SecAggSettings(num_shares=1.0, reconstruction_threshold=0.6),
                                    initial={k: np.zeros(s, np.float32) for k, s in SHAPES.items()},
                                    shop_names=[f"s{i}" for i in range(n)])
    blocked = [r for r in grid.received if r.error is not None]
    assert [(r.node_id, r.error) for r in blocked] == [(101, BLOCKED_TEXT)]
    for r in grid.received:  # the user id reached the coordinator nowhere
        if r.content is not None:
            for rec in r.content.config_records.values():
                assert "u-4711" not in rec.values()
    # the other four shops' masked vectors still aggregate to their plain mean
    agg = _checkpoint_arrays(run_dir)
    plain = [np.mean([_update(s, 1)[j] for s in range(1, n)], axis=0) for j in range(len(SHAPES))]
    assert max(float(np.abs(agg[k] - p).max()) for k, p in zip(SHAPES, plain, strict=True)) < \
        SecAggSettings().quantisation_step()


def test_every_task_set_passes_the_secagg_audit_with_real_shops(tmp_path: Path) -> None:
    """The main ClientApp on the SecAgg+ path, four shops covering the four task sets: no reply is refused."""
    import pandas as pd
    from flower_harness import tiny_scenario, write_scenario

    from client import client_app
    from server.server_app import make_server_app

    scenario = tiny_scenario(**{"data.synthetic.n_shops": 4, "data.synthetic.task_dropout": 0.5, "seed": 6})
    assert len({tuple(s.available_tasks()) for s in scenario.federation_shops()}) == 4
    path = write_scenario(scenario, tmp_path / "scenario.toml")
    grid = InProcessGrid(client_app.app, nodes(4))
    server = make_server_app({"scenario": str(path), "num-server-rounds": 1, "run-dir": str(tmp_path / "run"),
                              "min-shops": 2, "eval-split": "val", "final-split": "val+test",
                              "secure-aggregation": True})
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                         run_config={}))
    assert grid.received and all(r.error is None for r in grid.received), \
        [r.error for r in grid.received if r.error][:3]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics[metrics.split == "train"]["shop"].nunique() == 4
    assert {"cvr", "ranking"} <= set(metrics[metrics.split == "val"]["task"])
