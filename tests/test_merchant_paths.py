"""What a hostile coordinator cannot make a deployed shop read, write, do or say (client/merchant_policy.py).

The run config (`scenario`, `run-dir`, `fault-sleep`, `eval-split`, DP-SGD keys, ...) is the coordinator's word
and is not covered by the app's signature. Each refusal is tested directly and end to end through the ClientApp
(every mod): an error reply naming the key, the value, the limit and the node-config fix, and nothing loaded,
trained or written. Error replies carry only fixed texts or refusals (`reply_shield`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flower_harness import LocalGrid
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from client import client_app, local_state
from client.merchant_policy import (
    ALLOW_SCENARIO_PATH,
    CAP_FAULT_SLEEP,
    DEFAULT_CAP_FAULT_SLEEP,
    MAX_TEXT,
    REFUSED_PREFIX,
    MerchantRefusal,
    builtin_scenario,
    check_node,
    check_order,
    reply_shield,
    scenario_source,
)
from server.server_app import initial_encoder
from shared.protocol import ERROR_CODE_BLOCKED, FAILED_TEXT, UNDECODABLE_TEXT, WIRE_RECORD
from shared.scenario import SCENARIO_DIR, load_scenario
from shared.settings import ShopRoundSettings
from simulations.deploy.loopback import tiny_scenario, write_tiny_shops

NO_ENV: dict[str, str] = {}
SECRET = "merchant-secret-4f1c"  # text of a merchant's private file: it must never leave in a reply


def _settings(**sent: object) -> ShopRoundSettings:
    return ShopRoundSettings.from_message({}, dict(sent))


def _deployed(tmp_path: Path, **extra: object) -> dict:
    return {"shop-dir": str(tmp_path / "shop"), "state-dir": str(tmp_path / "state"), **extra}


# ---- scenario: built-in names, or exactly the merchant's pinned file ----------------------------------------------

def test_a_simulated_shop_resolves_any_scenario_as_before(tmp_path):
    assert scenario_source("/any/where.toml", {"partition-id": 0}) == "/any/where.toml"
    assert scenario_source("default", {"partition-id": 0}) == "default"


@pytest.mark.parametrize("name", ["default", "shops", "scale", "movielens-region"])
def test_a_deployed_shop_loads_a_builtin_name_from_the_app_itself(tmp_path, name):
    assert scenario_source(name, _deployed(tmp_path)) == SCENARIO_DIR / f"{name}.toml"


@pytest.mark.parametrize("ref", ["/etc/passwd", "/etc/hostname", "shops.toml", "./default", "../scenarios/default",
                                 "simulations/scenarios/default.toml", "default/", "", "nope", "x" * 300])
def test_a_deployed_shop_refuses_any_other_scenario_naming_key_value_and_fix(tmp_path, ref):
    with pytest.raises(MerchantRefusal) as err:
        scenario_source(ref, _deployed(tmp_path))
    text = str(err.value)
    assert f"scenario={ref!r}" in text and "pins no scenario file" in text
    assert f'--node-config "{ALLOW_SCENARIO_PATH}=' in text and "--allow-scenario-path FILE" in text
    assert "shops" in text  # the built-in names the coordinator may use


def test_the_refusal_does_not_tell_which_files_exist(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text(f'name = "{SECRET}"\n')
    texts = [str(_refusal(scenario_source, p, _deployed(tmp_path))).replace(p, "P")
             for p in (str(real), str(tmp_path / "missing.toml"))]
    assert texts[0] == texts[1] and SECRET not in texts[0]


def _refusal(fn, *args) -> MerchantRefusal:
    with pytest.raises(MerchantRefusal) as err:
        fn(*args)
    return err.value


def test_the_pinned_file_is_the_one_other_scenario_and_its_path_is_never_echoed(tmp_path):
    pinned = str(tmp_path / "mine" / "tiny.toml")
    node = _deployed(tmp_path, **{ALLOW_SCENARIO_PATH: pinned})
    assert scenario_source(pinned, node) == Path(pinned)
    assert scenario_source(str(tmp_path / "mine" / "." / "tiny.toml"), node) == Path(pinned)  # same text, normalised
    assert scenario_source("shops", node) == SCENARIO_DIR / "shops.toml"  # built-ins stay allowed
    text = str(_refusal(scenario_source, "/etc/passwd", node))
    assert "pins another file" in text and pinned not in text and "mine" not in text


@pytest.mark.parametrize("bad", ["relative/tiny.toml", 3, True])
def test_a_bad_pin_refuses_every_non_builtin_scenario(tmp_path, bad):
    node = _deployed(tmp_path, **{ALLOW_SCENARIO_PATH: bad})
    assert "is not an absolute file path" in str(_refusal(scenario_source, "/x/tiny.toml", node))


def test_builtin_names_are_never_paths():
    assert builtin_scenario("default") == SCENARIO_DIR / "default.toml"
    for ref in ("../default", "default.toml", "/default", "de/fault", ".default", "default\n"):
        assert builtin_scenario(ref) is None


# ---- state dir, fault sleep, eval-split, DP-SGD work, text lengths -----------------------------------------------

def test_a_deployed_node_without_a_state_dir_is_refused(tmp_path):
    text = str(_refusal(check_node, {"shop-dir": str(tmp_path)}))
    assert "no state-dir" in text and "run-dir" in text and "--node-config \"state-dir=" in text
    check_node({"partition-id": 0})  # simulation: the run dir holds shop state, as before
    check_node(_deployed(tmp_path))


def test_fault_sleep_is_capped_when_test_faults_are_allowed():
    allowed = {"allow-test-faults": True}
    check_order(_settings(**{"fault-sleep": DEFAULT_CAP_FAULT_SLEEP}), allowed, NO_ENV)
    text = str(_refusal(check_order, _settings(**{"fault-sleep": 1e9}), allowed, NO_ENV))
    assert "fault-sleep=1e+09 is above this shop's cap cap-fault-sleep=60" in text
    assert f'--node-config "{CAP_FAULT_SLEEP}=1e+09"' in text
    check_order(_settings(**{"fault-sleep": 500.0}), {**allowed, CAP_FAULT_SLEEP: 600}, NO_ENV)
    assert "cap-fault-sleep=5" in str(_refusal(check_order, _settings(**{"fault-sleep": 30.0}),
                                                {**allowed, CAP_FAULT_SLEEP: "5"}, NO_ENV))


@pytest.mark.parametrize("bad", [0, -1, "soon", float("inf"), None])
def test_a_bad_fault_sleep_cap_refuses_every_order(bad):
    text = str(_refusal(check_order, _settings(), {"allow-test-faults": True, CAP_FAULT_SLEEP: bad}, NO_ENV))
    assert "cap-fault-sleep is not a number of seconds > 0" in text


@pytest.mark.parametrize("split", ["val+val", "val+test+val", "+".join(["test"] * 500)])
def test_an_eval_split_naming_a_split_twice_is_refused(split):
    text = str(_refusal(check_order, _settings(**{"eval-split": split}), {}, NO_ENV))
    assert text.startswith("eval-split=") and "more than once" in text


def test_dpsgd_work_derived_from_the_sample_rate_is_capped():
    dp = {"dpsgd-noise-multiplier": 1.0}
    check_order(_settings(**dp), {}, NO_ENV)  # defaults: 20 steps x 0.05 = one pass
    text = str(_refusal(check_order, _settings(**dp, **{"dpsgd-sample-rate": 1e-9}), {}, NO_ENV))
    assert "means 1000000000 steps, above this shop's cap cap-dpsgd-steps=1000000" in text
    assert "steps" in str(_refusal(check_order, _settings(**dp, **{"dpsgd-sample-rate": 5e-324}), {}, NO_ENV))
    text = str(_refusal(check_order, _settings(**dp, **{"dpsgd-sample-rate": 1.0, "dpsgd-steps": 1000}), {}, NO_ENV))
    assert "1000 expected passes" in text and "cap-local-epochs=50" in text
    check_order(_settings(**{"dpsgd-sample-rate": 1e-9}), {}, NO_ENV)  # DP-SGD off: the rate is not read


def test_shipped_scenarios_stay_within_the_dpsgd_work_caps():
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        federation = load_scenario(str(path)).federation
        sent = {k.replace("_", "-"): v for k, v in federation.items() if k.startswith("dpsgd_")}
        check_order(_settings(**{**sent, "dpsgd-noise-multiplier": 1.0}), {}, NO_ENV)


@pytest.mark.parametrize("key", ["run-dir", "scenario", "method", "app-signature"])
def test_text_settings_longer_than_the_limit_are_refused(key):
    text = str(_refusal(check_order, _settings(**{key: "a" * (MAX_TEXT + 1)}), {"partition-id": 0}, NO_ENV))
    assert f"{key} is {MAX_TEXT + 1} characters long" in text


# ---- end to end through the ClientApp: a deployed merchant ----------------------------------------------------------

@pytest.fixture(scope="module")
def merchant(tmp_path_factory):
    """A deployed merchant's folders: its shop, its pinned scenario, and a private file beside them."""
    root = tmp_path_factory.mktemp("merchant")
    shop = write_tiny_shops(root / "shops")[0]
    pinned = root / "tiny.toml"
    pinned.write_text(tiny_scenario())
    secret = root / "secret.toml"
    secret.write_text(f'name = "{SECRET}"\n[model]\nembed_dim = "{SECRET}"\n')
    return {"root": root, "shop": root / "shops" / shop / "shop", "pinned": pinned, "secret": secret}


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} \
        if root.exists() else {}


def _deployed_shop(merchant: dict, tmp_path: Path, **node: object):
    """(message factory, Context) of a deployed merchant: shop-dir, its own state-dir, the scenario pinned."""
    local_state.forget_shops()
    config = {"shop-dir": str(merchant["shop"]), "state-dir": str(tmp_path / "state"),
              ALLOW_SCENARIO_PATH: str(merchant["pinned"]), "shop-index": 0, **node}
    config = {k: v for k, v in config.items() if v is not None}
    encoder = initial_encoder(load_scenario(str(merchant["pinned"])))

    def message(kind: str, server_round: int, **extra: object) -> Message:
        sent = {"scenario": str(merchant["pinned"]), "server-round": server_round, "run-dir": str(tmp_path / "run"),
                "max-steps": 2, **extra}
        msg = Message(RecordDict({"arrays": encoder, "config": ConfigRecord(sent)}), 1, kind)
        msg.metadata.__dict__["_message_id"] = f"{kind}-{server_round}-{time.monotonic_ns()}"
        return msg

    LocalGrid(1, client_app.app)
    return message, Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


def test_the_pinned_scenario_trains_and_writes_only_in_the_state_dir(merchant, tmp_path):
    message, context = _deployed_shop(merchant, tmp_path)
    reply = client_app.app(message(MessageType.TRAIN, 1), context)
    assert not reply.has_error(), reply.error
    assert (tmp_path / "state" / "local_part.pt").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("order, key, value", [
    ({"scenario": "/etc/passwd"}, "scenario", "'/etc/passwd'"),
    ({"scenario": "SECRET"}, "scenario", None),  # the merchant's own private file, not the pinned one
    ({"eval-split": "val+val+val"}, "eval-split", "'val+val+val'"),
    ({"run-dir": "/tmp/" + "r" * MAX_TEXT}, "run-dir", None),
    ({"dpsgd-noise-multiplier": 1.0, "dpsgd-sample-rate": 1e-9}, "dpsgd-steps", None),
])
def test_a_deployed_shop_refuses_the_order_and_touches_nothing(merchant, tmp_path, order, key, value):
    order = {k: str(merchant["secret"]) if v == "SECRET" else v for k, v in order.items()}
    message, context = _deployed_shop(merchant, tmp_path)
    before = _files(tmp_path)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = client_app.app(message(kind, 1, **order), context)
        assert reply.has_error() and reply.error.reason.startswith(REFUSED_PREFIX), reply.error
        assert f"{key}=" in reply.error.reason or f"{key} is" in reply.error.reason
        assert value is None or value in reply.error.reason
        assert SECRET not in reply.error.reason and str(merchant["pinned"]) not in reply.error.reason
    assert _files(tmp_path) == before == {}  # no state dir, no tensor cache, no run dir
    assert not local_state._SHOPS  # nothing was even loaded


def test_a_deployed_shop_without_a_state_dir_refuses_and_writes_nothing_under_the_run_dir(merchant, tmp_path):
    message, context = _deployed_shop(merchant, tmp_path, **{"state-dir": None})
    reply = client_app.app(message(MessageType.TRAIN, 1), context)
    assert reply.error.reason.startswith(REFUSED_PREFIX) and "no state-dir" in reply.error.reason
    assert _files(tmp_path) == {} and not local_state._SHOPS


def test_a_sleep_fault_above_the_cap_is_refused_at_once(merchant, tmp_path):
    message, context = _deployed_shop(merchant, tmp_path, **{"allow-test-faults": True})
    started = time.monotonic()
    reply = client_app.app(message(MessageType.TRAIN, 1, **{"fault-inject": "sleep:0", "fault-sleep": 3600.0}),
                           context)
    assert time.monotonic() - started < 5
    assert "fault-sleep=3600 is above this shop's cap cap-fault-sleep=60" in reply.error.reason
    assert _files(tmp_path) == {}


def test_a_deployed_shop_never_builds_a_builtin_scenarios_world(merchant, tmp_path, monkeypatch):
    import shared.scenario

    def refuse(*_args):
        raise AssertionError("a deployed shop built the scenario's shops")

    monkeypatch.setattr(shared.scenario, "_load_shops", refuse)
    local_state.forget_shops()
    context = Context(run_id=1, node_id=1, node_config={"shop-dir": str(merchant["shop"]),
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    for seed in (0, 1):  # any seed: no synthetic world is generated for it
        shop = local_state.resolve_shop(context, _settings(scenario="default", seed=seed))
        assert not shop.late_joiner


def test_a_long_lived_process_keeps_the_shops_of_a_few_runs_only(merchant, tmp_path):
    local_state.forget_shops()
    context = Context(run_id=1, node_id=1, node_config={"shop-dir": str(merchant["shop"]),
                                                        "state-dir": str(tmp_path / "state"),
                                                        ALLOW_SCENARIO_PATH: str(merchant["pinned"])},
                      state=RecordDict(), run_config={})
    for i in range(10):  # a coordinator naming another run-dir in every message
        local_state.resolve_shop(context, _settings(scenario=str(merchant["pinned"]), **{"run-dir": f"/r/{i}"}))
    assert len(local_state._SHOPS) == local_state.MAX_RUNS_KEPT


# ---- error text: nothing but fixed reasons and refusals leaves the shop ---------------------------------------------

def test_a_scenario_error_quoting_a_file_is_not_sent(merchant, tmp_path):
    """Simulation mode still loads paths: their errors (which quote the file) stay in the shop's log."""
    local_state.forget_shops()
    LocalGrid(1, client_app.app)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    encoder = initial_encoder(load_scenario(str(merchant["pinned"])))
    sent = {"scenario": str(merchant["secret"]), "server-round": 1, "run-dir": str(tmp_path / "run")}
    plain = Message(RecordDict({"arrays": encoder, "config": ConfigRecord(sent)}), 1, MessageType.TRAIN)
    reply = client_app.app(plain, context)
    assert reply.error.reason == FAILED_TEXT
    wired = Message(RecordDict({"arrays": encoder, "config": ConfigRecord(sent),
                                WIRE_RECORD: ConfigRecord({"encoder": "patch", "base": "b", "target": "t"})}),
                    1, MessageType.TRAIN)
    reply = client_app.app(wired, context)  # the patch needs the initial encoder: the scenario is loaded
    assert reply.error.reason == UNDECODABLE_TEXT  # it was "<text>: <the exception>", quoting the file
    assert not (tmp_path / "run").exists()


def test_an_exception_escaping_the_inner_mods_is_sent_as_the_fixed_text(monkeypatch, tmp_path):
    import client.pack_mod

    def boom(_content):
        raise OSError(f"[Errno 13] Permission denied: '/home/merchant/{SECRET}'")

    monkeypatch.setattr(client.pack_mod, "is_packed", boom)
    LocalGrid(1, client_app.app)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 1, MessageType.TRAIN)
    reply = client_app.app(msg, context)
    assert reply.error.code == ERROR_CODE_BLOCKED and reply.error.reason == FAILED_TEXT


def test_reply_shield_replaces_any_error_reason_it_does_not_know():
    def inner_error(msg, context, call_next):
        return Message(Error(code=7, reason=f"could not read /home/merchant/{SECRET}"), reply_to=msg)

    def inner_refusal(msg, context, call_next):
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=f"{REFUSED_PREFIX}max-steps=9 is above ..."),
                       reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for mod, expected in ((inner_error, FAILED_TEXT), (inner_refusal, f"{REFUSED_PREFIX}max-steps=9 is above ...")):
        app = ClientApp(mods=[reply_shield, mod])

        @app.train()
        def train(msg, ctx):  # never reached
            raise AssertionError

        msg = Message(RecordDict(), 1, MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = "m"
        assert app(msg, context).error.reason == expected


# ---- the merchant's CLI writes the new keys -------------------------------------------------------------------------

def test_merchant_start_writes_the_pin_and_the_sleep_cap(tmp_path):
    from simulations.deploy.merchant import node_config

    pinned = tmp_path / "tiny.toml"
    pinned.write_text(tiny_scenario())
    text = node_config(tmp_path / "shop", tmp_path / "state", 0, {ALLOW_SCENARIO_PATH: str(pinned),
                                                                  CAP_FAULT_SLEEP: 5})
    assert text.endswith(f"{ALLOW_SCENARIO_PATH}='{pinned}' {CAP_FAULT_SLEEP}=5")
    for bad in ("relative.toml", str(tmp_path / "missing.toml")):
        with pytest.raises(ValueError, match="--allow-scenario-path"):
            node_config(tmp_path / "shop", tmp_path / "state", 0, {ALLOW_SCENARIO_PATH: bad})


def test_merchant_start_checks_the_pinned_scenario_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nembed_dim = 'x'\n")
    for path in (tmp_path / "missing.toml", bad):
        result = CliRunner().invoke(app, ["merchant", "start", "--shop-dir", str(tmp_path / "shop"), "--state-dir",
                                          str(tmp_path / "state"), "--superlink", "127.0.0.1:9", "--ca", "ca.crt",
                                          "--key", "k.key", "--trusted-entities", "t.yaml",
                                          "--allow-scenario-path", str(path)])
        assert result.exit_code == 1 and "--allow-scenario-path" in result.output, result.output
        assert not (tmp_path / "state").exists()
