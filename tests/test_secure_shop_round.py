"""The SecAgg+ path runs the plain path's shop round: same update for the same seed, options honoured or refused.

Unit level: the main ClientApp's train handler and the SecAgg+ NumPyClient get the same request on
fresh nodes and must return the same encoder, bit for bit (the masking only happens after). End to
end: a SecAgg+ federation with FedProx and a waiting late joiner lands on the plain run's encoder
within the quantisation bound. Settings SecAgg+ cannot honour are refused by name before round 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flower_harness import LocalGrid, tiny_scenario, write_scenario
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from client.secure_client import ShopNumPyClient
from server.checkpoint import checkpoint_path, load_checkpoint
from server.federation_settings import FederationSettings, split_privacy
from server.secagg_settings import SecAggSettings
from server.secure import run_secure_federation
from server.server_app import initial_encoder, make_server_app
from shared.protocol import DP_EPSILON, NUM_EXAMPLES, SHOP_INDEX
from simulations.privacy.in_process_grid import InProcessGrid, nodes

STEPS = 4  # local steps per round: enough for every option to move the encoder, quick


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    scenario = tiny_scenario(**{"data.synthetic.n_late_joiners": 1, "data.synthetic.late_joiner_impressions": 1500,
                                "federation.join_round": 2})
    path = write_scenario(scenario, tmp_path_factory.mktemp("secure-round") / "scenario.toml")
    names = [s.name for s in scenario.federation_shops()]
    LocalGrid(1, client_app.app)  # sets the sender identity messages take, as in a ServerApp process
    return scenario, path, names.index(scenario.late_joiners[0])


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def _config(world, server_round: int, **extra: object) -> dict:
    scenario, path, _ = world
    return {"scenario": str(path), "seed": scenario.seed, "server-round": server_round, "share": "encoder",
            "max-steps": STEPS, "eval-split": "val", **extra}


def _plain(ctx: Context, config: dict, encoder: ArrayRecord) -> tuple[dict[str, torch.Tensor], dict]:
    msg = Message(RecordDict({"arrays": encoder, "config": ConfigRecord(config)}), 1, MessageType.TRAIN)
    reply = client_app.train(msg, ctx)
    return dict(reply.content["arrays"].to_torch_state_dict()), dict(reply.content["metrics"])


def _secure(ctx: Context, config: dict, encoder: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, dict]:
    keys = list(encoder)
    arrays, weight, metrics = ShopNumPyClient(ctx).fit([a.numpy() for a in encoder.values()], config)
    return {k: torch.from_numpy(a) for k, a in zip(keys, arrays, strict=True)}, weight, metrics


def _rounds(world, path: str, partition: int, rounds: list[dict]) -> tuple:
    """Run ``rounds`` (configs) on one fresh node of ``path`` ('plain' or 'secure'); the last round's result."""
    scenario, _, _ = world
    ctx, out = _context(partition), None
    for config in rounds:  # every round receives the initial encoder (a stand-in for the aggregate)
        out = (_plain if path == "plain" else _secure)(ctx, config, initial_encoder(scenario))
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


OPTIONS = {  # option -> (rounds with it, the same rounds without it)
    "personal-mix": ([{"personal-mix": 1000.0}, {"personal-mix": 1000.0}], [{}, {}]),  # acts from round 2
    "objective=meta": ([{"objective": "meta", "meta-inner-steps": STEPS, "meta-outer-step": 0.5}], [{}]),
    "proximal-mu": ([{"proximal-mu": 50.0}], [{}]),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_secure_update_equals_the_plain_one_and_the_option_changes_it(world, option) -> None:
    with_it, without = ([_config(world, r + 1, **extra) for r, extra in enumerate(rounds)]
                        for rounds in OPTIONS[option])
    plain, plain_metrics = _rounds(world, "plain", 0, with_it)
    secure, weight, secure_metrics = _rounds(world, "secure", 0, with_it)
    assert _same(plain, secure), f"{option}: the SecAgg+ shop trained differently from the plain one"
    assert weight == 1 and plain_metrics[NUM_EXAMPLES] > 0  # uniform SecAgg+ weighting: an active shop counts 1
    assert secure_metrics == {k: v for k, v in plain_metrics.items() if k != NUM_EXAMPLES}
    baseline, _ = _rounds(world, "plain", 0, without)
    assert not _same(plain, baseline), f"{option} had no effect on the update"


def test_secure_examples_weighting_sends_the_plain_num_examples(world) -> None:
    config = _config(world, 1, **{"secagg-weighting": "examples"})
    _, plain_metrics = _rounds(world, "plain", 0, [config])
    _, weight, _ = _rounds(world, "secure", 0, [config])
    assert weight == int(plain_metrics[NUM_EXAMPLES]) > 1


@pytest.mark.parametrize("stage", ["waiting", "warm-up"])
def test_a_shop_that_must_not_count_sends_weight_zero_on_the_secure_path(world, stage) -> None:
    _, _, joiner = world
    if stage == "waiting":  # the scenario's late joiner before its join round
        partition, config = joiner, _config(world, 1, **{"join-round": 3, "warmup-rounds": 1})
    else:  # a node arriving at round 5 with a fresh local part warms up first
        partition, config = 0, _config(world, 5, **{"warmup-rounds": 2})
    plain, plain_metrics = _rounds(world, "plain", partition, [config])
    secure, weight, metrics = _rounds(world, "secure", partition, [config])
    assert plain_metrics[NUM_EXAMPLES] == 0 and weight == 0
    assert _same(plain, secure) and metrics[SHOP_INDEX] == partition


def test_dpsgd_runs_on_the_secure_path_as_on_the_plain_one(world) -> None:
    config = _config(world, 1, **{"dpsgd-noise-multiplier": 1.0, "dpsgd-steps": 2, "dpsgd-sample-rate": 0.1})
    plain, plain_metrics = _rounds(world, "plain", 0, [config])
    secure, _, metrics = _rounds(world, "secure", 0, [config])
    assert metrics[DP_EPSILON] == plain_metrics[DP_EPSILON] > 0
    baseline, _ = _rounds(world, "plain", 0, [_config(world, 1)])
    assert not _same(plain, baseline)
    assert all(torch.isfinite(v).all() for v in secure.values())


def test_secure_evaluate_serves_the_own_encoder_with_the_personal_mix(world) -> None:
    scenario, _, _ = world
    ctx_plain, ctx_secure = _context(0), _context(0)
    train = _config(world, 1, **{"personal-mix": 1000.0})
    _plain(ctx_plain, train, initial_encoder(scenario))
    _secure(ctx_secure, train, initial_encoder(scenario))
    evaluate = _config(world, 1, **{"personal-mix": 1000.0})
    msg = Message(RecordDict({"arrays": initial_encoder(scenario), "config": ConfigRecord(evaluate)}), 1,
                  MessageType.EVALUATE)
    plain = dict(client_app.evaluate(msg, ctx_plain).content["metrics"])
    client = ShopNumPyClient(ctx_secure)
    loss, count, secure = client.evaluate([a.numpy() for a in initial_encoder(scenario).values()], evaluate)
    assert secure == {k: v for k, v in plain.items() if k != NUM_EXAMPLES}
    assert count == plain[NUM_EXAMPLES] and loss == plain["ctr.logloss"]
    _, _, fresh = client.evaluate([a.numpy() for a in initial_encoder(scenario).values()], _config(world, 1))
    assert fresh["ctr.auc"] != secure["ctr.auc"]  # without the mix the global encoder is served


# ---- refused up front, by name, with the fix ---------------------------------------------------------

@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum"])
def test_strategies_the_secure_path_cannot_honour_are_refused_by_name(strategy) -> None:
    with pytest.raises(ValueError, match=rf"strategy='{strategy}'.*secure-aggregation.*Fix: "):
        split_privacy({"secure-aggregation": True, "strategy": strategy})
    split_privacy({"strategy": strategy})  # fine without SecAgg+


@pytest.mark.parametrize(("key", "value", "name"), [("share", "all-shareable", "share='all-shareable'"),
                                                    ("resume", True, "resume = true")])
def test_other_settings_the_secure_path_cannot_honour_are_refused(key, value, name) -> None:
    with pytest.raises(ValueError, match=rf"{name}.*secure-aggregation.*Fix: "):
        split_privacy({"secure-aggregation": True, key: value})


def test_what_the_secure_path_honours_is_accepted() -> None:
    for extra in ({"strategy": "fedprox", "proximal-mu": 0.1}, {"personal-mix": 100.0}, {"objective": "meta"},
                  {"join-round": 2, "warmup-rounds": 1}, {"dpsgd-noise-multiplier": 1.0}):
        settings, on, _, _ = split_privacy({"secure-aggregation": True, **extra})
        assert on and settings.strategy in ("fedavg", "fedprox")


def test_a_direct_secure_run_refuses_before_any_message(tmp_path: Path) -> None:
    grid = InProcessGrid(client_app.app, nodes(3))
    settings = FederationSettings(strategy="fedadam", run_dir=str(tmp_path))
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="strategy='fedadam'"):
        run_secure_federation(grid, ctx, settings, SecAggSettings(), initial={"w": np.zeros(2, np.float32)})
    assert grid.received == []


# ---- end to end: the coordinator forwards what the shops honour -----------------------------------------

def _federation(world, run_dir: Path, **config: object) -> tuple[dict[str, np.ndarray], list]:
    """Round 1 of a federation through the main apps: (the aggregated encoder, the round reports)."""
    scenario, path, _ = world
    grid = InProcessGrid(client_app.app, nodes(len(scenario.federation_shops())))
    reports: list = []
    server = make_server_app({"scenario": str(path), "num-server-rounds": 1, "run-dir": str(run_dir),
                              "min-shops": 2, "eval-split": "val", "final-split": "val", "max-steps": STEPS,
                              "join-round": 2, "warmup-rounds": 1, **config},
                             progress=lambda report, total: reports.append(report))
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return load_checkpoint(checkpoint_path(run_dir, 1)).arrays, reports


def test_secure_fedprox_with_a_waiting_joiner_matches_the_plain_run(world, tmp_path: Path, monkeypatch) -> None:
    # Round 1 of a longer federation: join-round 2 with one round would be refused as a whole run.
    monkeypatch.setattr("server.server_app.check_runnable", lambda settings: None)
    scenario, _, _ = world
    max_weight = 1e4
    prox = {"strategy": "fedprox", "proximal-mu": 50.0}
    plain, reports = _federation(world, tmp_path / "plain", **prox)
    secure, _ = _federation(world, tmp_path / "secure", **prox, **{
        "secure-aggregation": True, "secagg-weighting": "examples", "secagg-max-weight": max_weight})
    no_prox, _ = _federation(world, tmp_path / "no-prox")

    def diff(a, b) -> float:
        return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)

    # Each counted shop scales its vector by its ratio rows / max-weight before quantising: stochastic rounding
    # moves each shop's scaled value by < one quantum (step), so the mean by < n x step / (sum of ratios);
    # the ratio itself is rounded to 1/Q, which moves the mean by < n x step / 2 / (sum of ratios) more
    # (values lie within +-clipping range). The waiting joiner's weight 0 adds nothing.
    assert scenario.late_joiners[0] not in reports[0].train
    rows = [m[NUM_EXAMPLES] for m in reports[0].train.values()]
    assert len(rows) == len(scenario.federation_shops()) - 1 and max(rows) <= max_weight
    bound = 1.5 * len(rows) * SecAggSettings().quantisation_step() / (sum(rows) / max_weight)
    err, prox_effect = diff(secure, plain), diff(no_prox, plain)
    print(f"secure vs plain fedprox: {err:.2e} (bound {bound:.2e}); fedprox vs fedavg: {prox_effect:.2e}")
    assert err < bound  # the joiner's weight 0 kept it out of the mean, and mu reached the shops
    assert prox_effect > 10 * bound


def test_a_secure_round_in_which_no_shop_counts_keeps_the_global_encoder(tmp_path: Path) -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from server.secure import SecureFedAvg

    strategy = SecureFedAvg(keys=["w"], run_dir=tmp_path, method="m", shop_name=lambda i: f"s{i}",
                            eval_split=lambda r: "val")
    unmasked = ndarrays_to_parameters([np.full(2, np.nan, np.float32)])  # what unmasking a zero total gives
    waiting = [(None, FitRes(Status(Code.OK, "Success"), unmasked, 0, {SHOP_INDEX: i})) for i in range(3)]
    params, _ = strategy.aggregate_fit(1, waiting, [])
    assert params is None and not checkpoint_path(tmp_path, 1).exists()
    counted = [(None, FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters([np.ones(2, np.float32)]), 1,
                             {SHOP_INDEX: 0}))]
    params, _ = strategy.aggregate_fit(2, counted + waiting[1:], [])
    assert params is not None and checkpoint_path(tmp_path, 2).exists()
    np.testing.assert_array_equal(load_checkpoint(checkpoint_path(tmp_path, 2)).arrays["w"], np.ones(2))
