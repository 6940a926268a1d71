"""The shop parses its message config once, by the schema (shared/settings.py): schema defaults, clear errors."""

from __future__ import annotations

import logging

import pytest
from flower_harness import LocalGrid
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from client.leak_guard import leak_guard
from client.shop_round import message_settings
from shared.protocol import FAILED_TEXT
from shared.settings import RunSettings, ScenarioError, ShopRoundSettings


def test_a_message_missing_optional_keys_gets_the_schema_defaults() -> None:
    settings = message_settings({}, {"server-round": 3})
    defaults = RunSettings()
    assert settings.server_round == 3 and settings.eval_split == "val" and not settings.freeze_encoder
    for name in ("local_epochs", "max_steps", "prox_mu", "warmup_rounds", "join_round", "personal_mix", "share",
                 "objective", "meta_inner_steps", "meta_outer_step", "fault_sleep", "secagg_weighting", "seed",
                 "dpsgd_noise_multiplier", "run_dir", "scenario"):
        assert getattr(settings, name) == getattr(defaults, name), name
    assert settings.dpsgd_kwargs() == defaults.dpsgd_kwargs()  # the shop's DP-SGD config, default included


def test_the_message_overrides_the_run_config_and_unknown_keys_are_ignored() -> None:
    settings = message_settings({"local-epochs": 2, "eval-split": "val+test", "proximal-mu": 0.5},
                                {"local-epochs": 4, "clipping_norm": 1.0})  # Flower's DP strategies add that key
    assert (settings.local_epochs, settings.eval_split, settings.prox_mu) == (4, "val+test", 0.5)


@pytest.mark.parametrize(("sent", "key"), [({"local-epochs": "two"}, "local-epochs"),
                                           ({"dpsgd-unit": "users"}, "dpsgd-unit"),
                                           ({"fault-inject": "nan:first"}, "fault-inject"),
                                           ({"share": "everything"}, "share"),
                                           ({"scenario": ""}, "scenario")])
def test_a_bad_message_value_is_a_scenario_error_naming_the_key(sent, key) -> None:
    with pytest.raises(ScenarioError, match=f"message config: {key}"):
        message_settings({}, sent)


def test_fault_inject_is_parsed_by_the_schema() -> None:
    settings = ShopRoundSettings.from_message({}, {"fault-inject": "nan:1, sleep:0@2,"})
    assert settings.faults() == [("nan", 1, None), ("sleep", 0, 2)]
    with pytest.raises(ScenarioError, match="fault-inject"):
        RunSettings.from_config({"fault-inject": "boom:1"})  # the coordinator refuses it before round 1


def test_the_leak_guard_logs_a_bad_message_config_by_key_without_a_traceback(caplog) -> None:
    LocalGrid(1, client_app.app)  # sets Flower's run identity that a Message needs
    msg = Message(RecordDict({"config": ConfigRecord({"local-epochs": "two"})}), 1, MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    def handler(m: Message, c: Context) -> Message:
        message_settings(c.run_config, m.content["config"])
        raise AssertionError("not reached")

    with caplog.at_level(logging.ERROR):
        reply = leak_guard(msg, context, handler)
    assert reply.has_error() and reply.error.reason == FAILED_TEXT
    record = next(r for r in caplog.records if "message config" in r.getMessage())
    assert "local-epochs = 'two'" in record.getMessage() and record.exc_info is None


def test_the_scenario_keeps_the_schema_values_of_transfer_and_data() -> None:
    from shared.scenario import load_scenario

    sc = load_scenario("default", {"seed": 7})
    assert sc.transfer["late_joiners"] is None and sc.transfer["modes"] == ["scratch", "frozen", "finetune", "meta"]
    assert sc.data["synthetic"]["seed"] == 7  # the scenario's seed flows into the world unless the table sets one
    assert load_scenario("default", {"data.synthetic.seed": 3}).data["synthetic"]["seed"] == 3
    with pytest.raises(ScenarioError, match="transfer.fractions"):
        load_scenario("default", {"transfer.fractions": []})
    with pytest.raises(ScenarioError, match="data.synthetic"):
        load_scenario("default", {"data.synthetic.n_shopz": 3})
