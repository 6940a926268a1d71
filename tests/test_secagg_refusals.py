"""A merchant's refusal (client/merchant_policy.py) under SecAgg+: refused the same way, reported, in bounded time.

Threat model: the coordinator (run submitter) is hostile or mistaken and controls the run config and every
message; the merchant controls its node config. What must hold under SecAgg+ as on the plain path: the
refusing shop loads, trains and writes nothing and answers with an error naming key, value and fix; the
coordinator's run neither hangs nor crashes: it leaves the shop out with that reason, or fails with it.

Where the refusal happens: `merchant_policy_mod` runs before the SecAgg+ client, on every SecAgg+ stage.
Its settings are the run config overridden by the message's config; on a SuperNode (and in Flower's
simulation) the run config carries the order, so the shop refuses at the first stage (`setup`); an order
sent only in the fit instructions is refused at `collect_masked_vectors` (the stage that trains).

Harness: `InProcessGrid`, which copies each message as transport would. `flower_harness.LocalGrid` hands the
message object itself to the ClientApp, and Flower's set-up stage sends one shared record to every node from
which `secaggplus_mod` pops the stage, so on it every node after the first fails set-up (a harness limit).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flower_harness import tiny_scenario, write_scenario
from flwr.app import Context, RecordDict
from test_privacy_secagg import SHAPES, ToyShop, _checkpoint_arrays, _update

from client import client_app
from client.merchant_policy import REFUSED_PREFIX
from client.secure_client import make_secure_app
from server.federation_settings import FederationSettings
from server.secagg_settings import SecAggSettings
from server.secure import run_secure_federation
from server.server_app import FAILED_FILE, make_server_app
from server.strategies import RunFailed
from simulations.privacy.in_process_grid import InProcessGrid, nodes

# the grid's bound on an exchange sent without a timeout: FederationSettings' default round-timeout
NO_REPLY = "no reply within 600 s (secagg-timeout, else round-timeout)"
BOUND_S = 120  # a refused run ends well within this on two busy cores (measured: about 2 s)


# ---- Flower's SecAgg+ workflow and a shop gone before its key shares went out -----------------------------------

def _toy_run(tmp_path: Path, n: int, drop) -> tuple[InProcessGrid, list, Path]:
    """One SecAgg+ round of ``n`` toy shops on an `InProcessGrid` that drops what ``drop`` says."""
    grid = InProcessGrid(make_secure_app(lambda ctx: ToyShop(ctx).to_client()), nodes(n), drop=drop)
    reports: list = []
    run_dir = run_secure_federation(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                  run_config={}),
                                    FederationSettings(num_server_rounds=1, run_dir=str(tmp_path), min_shops=2),
                                    SecAggSettings(num_shares=1.0, reconstruction_threshold=0.6),
                                    initial={k: np.zeros(s, np.float32) for k, s in SHAPES.items()},
                                    shop_names=[f"s{i}" for i in range(n)],
                                    progress=lambda report, total: reports.append(report))
    return grid, reports, run_dir


def _assert_exact_mean(run_dir: Path, alive: list[int]) -> None:
    """The checkpointed aggregate is the plain mean of the ``alive`` toy shops' updates, within one quantum."""
    plain = [np.mean([_update(s, 1)[j] for s in alive], axis=0) for j in range(len(SHAPES))]
    agg = _checkpoint_arrays(run_dir)
    assert max(float(np.abs(agg[k] - p).max()) for k, p in zip(SHAPES, plain, strict=True)) < \
        SecAggSettings().quantisation_step()


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors"])
def test_a_shop_gone_at_any_stage_before_unmasking_is_left_out_and_the_sum_is_the_others(tmp_path, stage):
    """Flower 1.42 alone halts the round when a shop is gone at setup or share_keys (every other shop fails
    unmasking: KeyError on its node ID); `DropTolerantSecAggPlus` leaves it out and the sum stays exact."""
    n, gone = 5, 103

    def drop(nid, msg):
        return nid == gone and msg.content.config_records.get("secaggplus_configs", {}).get("stage") == stage

    grid, reports, run_dir = _toy_run(tmp_path, n, drop)
    assert all(r.error is None for r in grid.received)  # no shop failed unmasking
    _assert_exact_mean(run_dir, [s for s in range(n) if s + 101 != gone])
    assert reports[0].left_out == {f"node-{gone}": f"SecAgg+ {stage}: {NO_REPLY}"}


def test_a_shop_gone_at_setup_and_another_gone_before_its_masked_vector_leave_the_exact_mean_of_the_rest(tmp_path):
    """The later dropout's pairwise masks are removed only against the shops it masked with (not the one gone at
    setup, whose public keys the coordinator never had: Flower alone would look them up, KeyError)."""
    n, gone = 5, {102: "setup", 104: "collect_masked_vectors"}

    def drop(nid, msg):
        return nid in gone and gone[nid] == msg.content.config_records.get("secaggplus_configs", {}).get("stage")

    grid, reports, run_dir = _toy_run(tmp_path, n, drop)
    _assert_exact_mean(run_dir, [s for s in range(n) if s + 101 not in gone])
    assert reports[0].left_out == {"node-102": f"SecAgg+ setup: {NO_REPLY}",
                                   "node-104": f"SecAgg+ collect_masked_vectors: {NO_REPLY}"}


# ---- the main ClientApp, a merchant refusing: one of three shops, then all of them -------------------------------

def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _federation(tmp_path: Path, node_of: dict[int, dict], order: dict, *, in_run_config: bool, rounds: int = 2):
    """Run a 3-shop SecAgg+ federation of the main ClientApp; ``order`` goes into the run config the shops see
    (as on a SuperNode) or only into the fit/evaluate instructions. Returns (reports, grid, seconds, error)."""
    path = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    configs = nodes(3)
    for i, extra in node_of.items():
        configs[101 + i].update(extra)
    run = {"scenario": str(path), "num-server-rounds": rounds, "run-dir": str(tmp_path / "run"), "min-shops": 2,
           "max-steps": 2, "secure-aggregation": True, **order}
    grid = InProcessGrid(client_app.app, configs, run_config=run if in_run_config else {})
    reports: list = []
    server = make_server_app(run, progress=lambda report, total: reports.append(report))
    started, error = time.monotonic(), None
    try:
        server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    except RunFailed as exc:
        error = exc
    return reports, grid, time.monotonic() - started, error


def _merchant(tmp_path: Path) -> tuple[dict, Path]:
    """A deployed merchant's node config (its own shop dir and state dir, no scenario pinned) and its folder."""
    root = tmp_path / "merchant"
    (root / "shop").mkdir(parents=True)
    (root / "state").mkdir()
    (root / "shop" / "impressions.csv").write_text("private\n")
    return {"shop-dir": str(root / "shop"), "state-dir": str(root / "state"), "shop-index": 1}, root


@pytest.mark.parametrize("in_run_config, stage", [(True, "setup"), (False, "collect_masked_vectors")])
def test_one_deployed_shop_refusing_an_unpinned_scenario_is_left_out_and_secagg_completes(tmp_path, in_run_config,
                                                                                         stage):
    node, root = _merchant(tmp_path)
    before = _files(root)
    reports, grid, seconds, error = _federation(tmp_path, {1: node}, {}, in_run_config=in_run_config)
    assert error is None and seconds < BOUND_S and len(reports) == 2
    for report in reports:
        assert not report.skipped and sorted(report.train) == ["shop_00", "shop_02"]
        why = report.left_out["node-102"]
        assert why.startswith(f"SecAgg+ {stage}: {REFUSED_PREFIX}scenario=")
        assert "is not a built-in scenario" in why and "Fix:" in why and "allow-scenario-path" in why
    answers = [r.error for r in grid.received if r.node_id == 102]
    refusals = [e for e in answers if e is not None]
    assert len(refusals) == 2 * 2 and all(e.startswith(REFUSED_PREFIX) for e in refusals)  # train and evaluate
    # refused at setup: no stage answered; refused at collect: only the key set-up (protocol keys, no shop data)
    assert len(answers) == (4 if in_run_config else 4 + 2 * 2)
    assert all(r.error is None for r in grid.received if r.node_id != 102)
    assert _files(root) == before  # the merchant's shop and state dirs: nothing read into state, nothing written
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(metrics[metrics.split == "train"]["shop"]) == {"shop_00", "shop_02"}


def test_one_shop_refusing_a_sleep_above_its_cap_is_left_out_at_once(tmp_path):
    faults = {"allow-test-faults": True}
    order = {"fault-inject": "sleep:1", "fault-sleep": 30.0}  # shop_01 would sleep 30 s a round; it agreed to 1 s
    reports, grid, seconds, error = _federation(tmp_path, {0: faults, 1: {**faults, "cap-fault-sleep": 1},
                                                           2: faults}, order, in_run_config=True)
    assert error is None and seconds < 20 and len(reports) == 2  # not 2 x 30 s: nothing slept
    for report in reports:
        assert sorted(report.train) == ["shop_00", "shop_02"]
        assert ("SecAgg+ setup: shop refused the order: fault-sleep=30 is above this shop's cap cap-fault-sleep=1. "
                "Fix:") in report.left_out["node-102"]


@pytest.mark.parametrize("in_run_config", [True, False])
def test_every_shop_refusing_fails_the_run_in_bounded_time_with_the_reason(tmp_path, in_run_config):
    """Flower's SecAgg+ alone ends such a run as if it had succeeded (every round halted, no model); it fails."""
    node, root = _merchant(tmp_path)
    before = _files(root)
    order = {"max-steps": 3}
    reports, grid, seconds, error = _federation(tmp_path, {0: {"cap-max-steps": 2}, 1: {**node, "cap-max-steps": 2},
                                                           2: {"cap-max-steps": 2}}, order,
                                                in_run_config=in_run_config, rounds=2)
    assert error is not None and seconds < BOUND_S
    text = str(error)
    assert text.startswith("every round (1-2) was short, none updated the model")
    assert "max-steps=3 is above this shop's cap cap-max-steps=2. Fix: the coordinator lowers max-steps" in text
    assert (tmp_path / "run" / FAILED_FILE).read_text().strip() == text  # what `run_federated` reports
    assert [r.skipped != "" for r in reports] == [True, True]
    assert _files(root) == before
    assert not list((tmp_path / "run").glob("checkpoint*"))


def test_too_many_short_rounds_in_a_row_fail_the_run_before_its_end(tmp_path):
    reports, _, _, error = _federation(tmp_path, {i: {"cap-max-steps": 2} for i in range(3)},
                                       {"max-steps": 3, "max-short-rounds": 1}, in_run_config=True, rounds=5)
    assert error is not None and "round 2:" in str(error) and "more than max-short-rounds=1" in str(error)
    assert len(reports) == 1  # round 1 reported as short, round 2 failed the run


# ---- Flower's simulation engine -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("engine", ["pool", "ray"])
def test_a_simulated_secagg_run_whose_shops_refuse_fails_with_the_reason(tmp_path, engine):
    from simulations.federated import RunFailed as SimulationFailed
    from simulations.federated import run_federated

    started = time.monotonic()
    # the pool engine's shops refuse at setup (the run config carries the order), Ray's at collect_masked_vectors
    with pytest.raises(SimulationFailed, match=r"fault-sleep=3600 is above this shop's cap cap-fault-sleep=60\. Fix:"):
        run_federated(tiny_scenario(), tmp_path / "run", rounds=2, engine=engine,
                      extra_config={"secure-aggregation": True, "fault-inject": "sleep:1", "fault-sleep": 3600.0})
    assert time.monotonic() - started < 300
    assert not list((tmp_path / "run").glob("checkpoint*"))


@pytest.mark.slow
def test_a_silent_shop_under_secagg_is_a_dropout_after_the_round_timeout(tmp_path):
    """With `secagg-timeout` 0 Flower's SecAgg+ stages (and its evaluate step) wait for every reply: one shop that
    never answers would hang the run. `StageErrors` bounds them by `round-timeout`: the silent shop is left out
    with a stage-named reason and the others' round completes. One pool worker per shop: the pool kills a late
    shop's worker, and the SecAgg+ keys of the other shops it holds (in their contexts) go with it."""
    from simulations.federated import run_federated

    reports: list = []
    started = time.monotonic()
    run_federated(tiny_scenario(**{"federation.round_timeout": 15.0}), tmp_path / "run", rounds=1, engine="pool",
                  workers=3,
                  extra_config={"secure-aggregation": True, "fault-inject": "sleep:1", "fault-sleep": 45.0,
                                "min-shops": 2},
                  progress=lambda report, total: reports.append(report))
    (report,) = reports
    assert "no reply within 15 s" in " ".join(report.left_out.values()), report.left_out
    assert sorted(report.train) == ["shop_00", "shop_02"], report
    assert time.monotonic() - started < 240
