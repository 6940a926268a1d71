"""The merchant's limits on what a coordinator orders (client/merchant_policy.py) and checked shop-index claims
(server/node_identity.py `ShopClaims`): every refusal, directly and through the in-process Flower harness."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flower_harness import TEST_FAULTS, LocalGrid, claiming_app, one_shop, tiny_scenario, write_scenario
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from client import client_app
from client.merchant_policy import (
    ALLOW_TEST_FAULTS_ENV,
    REFUSED_PREFIX,
    WORK_CAPS,
    MerchantRefusal,
    check_order,
    faults_allowed,
    work_caps,
)
from server.node_identity import MAX_SHOP_INDEX, ShopClaims, claimed_shop_index
from server.server_app import FederationSettings, run_federation
from server.strategies import RunFailed
from shared.protocol import SHOP_INDEX
from shared.settings import ShopRoundSettings

NO_ENV: dict[str, str] = {}


def _settings(**sent: object) -> ShopRoundSettings:
    return ShopRoundSettings.from_message({}, dict(sent))


# ---- test faults --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sent", [{"fault-inject": "nan:0"}, {"fault-inject": "sleep:1@2"}, {"fault-sleep": 1e9}])
def test_test_faults_are_refused_without_the_merchants_consent(sent):
    key = next(iter(sent))
    with pytest.raises(MerchantRefusal, match=rf"{key}=.*test-only.*allow-test-faults=true") as err:
        check_order(_settings(**sent), {"partition-id": 0}, NO_ENV)
    assert "coordinator removes" in str(err.value)


@pytest.mark.parametrize("node, env", [({"allow-test-faults": True}, NO_ENV), ({"allow-test-faults": "true"}, NO_ENV),
                                       ({}, {ALLOW_TEST_FAULTS_ENV: "1"})])
def test_test_faults_are_obeyed_when_the_merchant_allows_them(node, env):
    check_order(_settings(**{"fault-inject": "nan:0", "fault-sleep": 5.0}), node, env)
    assert faults_allowed(node, env)


@pytest.mark.parametrize("node, env", [({"allow-test-faults": False}, NO_ENV), ({"allow-test-faults": "no"}, NO_ENV),
                                       ({}, {ALLOW_TEST_FAULTS_ENV: "0"}), ({}, NO_ENV)])
def test_anything_else_does_not_allow_test_faults(node, env):
    assert not faults_allowed(node, env)


def test_default_settings_pass_every_check():
    check_order(_settings(), {}, NO_ENV)  # the coordinator always sends fault-inject "" and fault-sleep 30


# ---- work caps ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WORK_CAPS))
def test_work_above_a_default_cap_is_refused_naming_key_value_cap_and_fix(name):
    key, cap = WORK_CAPS[name]
    setting = name.replace("_", "-")
    check_order(_settings(**{setting: cap}), {}, NO_ENV)  # at the cap: accepted
    with pytest.raises(MerchantRefusal) as err:
        check_order(_settings(**{setting: cap + 1}), {}, NO_ENV)
    text = str(err.value)
    assert f"{setting}={cap + 1}" in text and f"{key}={cap}" in text and f'--node-config "{key}={cap + 1}"' in text


@pytest.mark.parametrize("sent", [{"local-epochs": 10**9}, {"max-steps": 10**15}, {"meta-inner-steps": 10**9},
                                  {"dpsgd-steps": 10**9}])
def test_the_fuzz_audits_orders_are_refused(sent):
    with pytest.raises(MerchantRefusal, match=next(iter(sent))):
        check_order(_settings(**sent), {}, NO_ENV)


def test_a_merchant_raises_or_lowers_a_cap_in_its_node_config():
    check_order(_settings(**{"local-epochs": 80}), {"cap-local-epochs": 100}, NO_ENV)
    check_order(_settings(**{"local-epochs": 80}), {"cap-local-epochs": "100"}, NO_ENV)  # a quoted number
    with pytest.raises(MerchantRefusal, match="cap-local-epochs=1"):
        check_order(_settings(**{"local-epochs": 2}), {"cap-local-epochs": 1}, NO_ENV)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "many", True, None])
def test_a_bad_cap_in_the_node_config_refuses_every_order(bad):
    with pytest.raises(MerchantRefusal, match="node config cap-max-steps is not a whole number >= 1"):
        work_caps({"cap-max-steps": bad})


def test_shipped_scenarios_stay_below_the_default_caps():
    from shared.scenario import load_scenario

    root = Path(__file__).resolve().parents[1] / "simulations" / "scenarios"
    for path in sorted(root.glob("*.toml")):
        federation = load_scenario(str(path)).federation
        for name, (_, cap) in WORK_CAPS.items():
            assert int(federation.get(name, 0)) <= cap, (path.name, name)


# ---- through the ClientApp (mods included): an error reply, nothing runs, state untouched ------------------------

def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("extra, key", [({"fault-inject": "error:0"}, "fault-inject"),
                                        ({"fault-sleep": 1e9}, "fault-sleep"),
                                        ({"local-epochs": 10**9}, "local-epochs"),
                                        ({"max-steps": 10**15}, "max-steps"),
                                        ({"meta-inner-steps": 10**9, "objective": "meta"}, "meta-inner-steps")])
def test_the_client_app_refuses_with_a_clear_reason_and_touches_nothing(tmp_path, extra, key):
    message, context = one_shop(tmp_path)
    assert not client_app.app(message(MessageType.TRAIN, 1, **{"max-steps": 2}), context).has_error()
    before = _files(tmp_path)
    state = dict(context.state.items())
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = client_app.app(message(kind, 2, **extra), context)
        assert reply.has_error(), kind
        assert reply.error.reason.startswith(REFUSED_PREFIX) and f"{key}=" in reply.error.reason
    assert _files(tmp_path) == before and dict(context.state.items()).keys() == state.keys()


def test_the_client_app_obeys_a_fault_when_its_node_config_allows_it(tmp_path):
    message, context = one_shop(tmp_path)
    context.node_config["allow-test-faults"] = True
    reply = client_app.app(message(MessageType.TRAIN, 1, **{"fault-inject": "error:0", "max-steps": 2}), context)
    assert reply.has_error() and not reply.error.reason.startswith(REFUSED_PREFIX)  # the injected error itself


# ---- end to end: a refusing shop is left out with its reason, the run goes on -------------------------------------

def test_a_shop_refusing_an_order_is_left_out_and_the_run_completes(tmp_path):
    scenario_file = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    grid = LocalGrid(3, client_app.app)
    grid.contexts[grid.node_ids[1]].node_config["cap-max-steps"] = 2  # shop_01 agreed to 2 steps a round only
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": 2,
                                               "run-dir": str(tmp_path / "run"), "max-steps": 3,
                                               "fault-inject": ""})
    reports: list = []
    run_federation(grid, settings, lambda report, total: reports.append(report))
    assert len(reports) == 2
    for report in reports:
        assert sorted(report.train) == ["shop_00", "shop_02"]
        (why,) = [v for k, v in report.left_out.items() if "01" in k or k.startswith("node-")]
        assert "max-steps=3 is above this shop's cap cap-max-steps=2" in why


def test_a_fault_ordered_to_a_shop_that_did_not_allow_it_is_refused_with_the_reason_in_the_run(tmp_path):
    scenario_file = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    grid = LocalGrid(3, client_app.app, node_config=TEST_FAULTS)
    del grid.contexts[grid.node_ids[0]].node_config["allow-test-faults"]  # shop_00 never agreed
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": 1,
                                               "run-dir": str(tmp_path / "run"), "max-steps": 2,
                                               "fault-inject": "nan:2", "max-short-rounds": 0})
    # shop_02 obeys its (allowed) NaN fault, shop_00 refuses: one usable update, fewer than min-shops
    with pytest.raises(RunFailed, match=r"error reply: shop refused the order: fault-inject='nan:2' is a test-only "
                                        r"fault knob.*shop_02: update holds NaN"):
        run_federation(grid, settings)


# ---- shop-index claims ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, why", [(2.5, "not a whole number"), (float("nan"), "not a whole number"),
                                        (float("inf"), "not a whole number"), (True, "not a whole number"),
                                        ("1", "not a whole number"), ([1], "not a whole number"),
                                        (-1, "out of range"), (3, "out of range"), (10**12, "out of range")])
def test_bad_shop_index_claims_are_refused(value, why):
    claims = ShopClaims(lambda: 3)
    index, reason = claims.check(7, value)
    assert index is None and why in reason and not claims.node_index


def test_whole_float_claims_are_accepted_and_unknown_shop_counts_have_a_bound():
    assert ShopClaims(lambda: 3).check(7, 2.0) == (2, "")
    assert ShopClaims().check(7, MAX_SHOP_INDEX - 1)[0] == MAX_SHOP_INDEX - 1
    assert ShopClaims(lambda: 0).check(7, MAX_SHOP_INDEX)[0] is None


def test_trust_on_first_use_binds_a_node_and_its_index():
    claims = ShopClaims(lambda: 3)
    assert claims.check(101, 0) == (0, "")
    assert claims.check(101, 0) == (0, "")  # the same node again (a restart keeps its node ID): fine
    index, why = claims.check(102, 0)
    assert index is None and "which node 101 holds" in why  # another node claiming shop 0
    index, why = claims.check(101, 1)
    assert index is None and "is bound to 0" in why  # shop 0's node claiming another shop
    assert claims.check(102, 1) == (1, "") and claims.check(103, 2) == (2, "")  # late joiner: its first claim


def test_registered_bindings_hold_before_any_claim():
    claims = ShopClaims(lambda: 3, {501: 1})
    assert claims.check(777, 1)[0] is None and claims.check(501, 0)[0] is None and claims.check(501, 1) == (1, "")


@pytest.mark.parametrize("value, expected", [(float("nan"), None), (2.5, None), (float("inf"), None), (2.0, 2),
                                             (3, 3)])
def test_the_identity_grid_reads_any_claim_without_raising(value, expected):
    msg = Message(RecordDict({"metrics": MetricRecord({SHOP_INDEX: value})}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    assert claimed_shop_index(msg) == expected


@pytest.mark.parametrize("claim", [0, 2.5, -1, 9])
def test_a_node_claiming_another_shop_or_a_bad_index_is_left_out_and_cannot_write_its_row(tmp_path, caplog, claim):
    caplog.set_level(logging.WARNING)
    scenario_file = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    grid = LocalGrid(3, claiming_app(claim, 2))  # node of shop_02 replies as `claim`
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": 2,
                                               "run-dir": str(tmp_path / "run"), "max-steps": 2})
    reports: list = []
    run_federation(grid, settings, lambda report, total: reports.append(report))
    assert len(reports) == 2
    for report in reports:
        assert sorted(report.train) == ["shop_00", "shop_01"]  # shop_00's row is shop_00's own
        assert "shop_02" not in report.train and "shop_02" not in report.evaluate
        assert any(SHOP_INDEX in why for why in report.left_out.values())
    assert "left out" in caplog.text


def test_merchant_start_writes_the_policy_into_the_node_config(tmp_path):
    from simulations.deploy.merchant import node_config

    text = node_config(tmp_path / "shop", tmp_path / "state", 0, {"cap-local-epochs": 100, "allow-test-faults": True})
    assert text.endswith("shop-index=0 cap-local-epochs=100 allow-test-faults=true")
    with pytest.raises(ValueError, match="not a merchant policy key"):
        node_config(tmp_path / "shop", tmp_path / "state", 0, {"cap-epochs": 3})
    with pytest.raises(ValueError, match="whole number >= 1"):
        node_config(tmp_path / "shop", tmp_path / "state", 0, {"cap-max-steps": 0})


def test_secure_aggregation_rows_use_checked_claims(tmp_path, caplog):
    from types import SimpleNamespace

    from server.secure import SecureFedAvg

    strategy = SecureFedAvg(keys=[], run_dir=tmp_path, method="fedshop", shop_name=lambda i: f"shop_{i:02d}",
                            eval_split=lambda r: "val")
    assert strategy._label(SimpleNamespace(node_id=101), {SHOP_INDEX: 0}) == "shop_00"
    caplog.set_level(logging.WARNING)
    assert strategy._label(SimpleNamespace(node_id=102), {SHOP_INDEX: 0}) == "node-102"  # shop_00 is node 101's
    assert strategy._label(SimpleNamespace(node_id=103), {SHOP_INDEX: 2.5}) == "node-103"
    assert strategy._label(SimpleNamespace(node_id=104), {}) == "node-104"
    assert "shop-index claim refused" in caplog.text
