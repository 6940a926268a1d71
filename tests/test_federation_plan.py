"""A federation that cannot run is refused wherever a run starts (shared/federation_plan.py), fast.

The depths: the shared check itself, `run_federated` (simulate, compare, the experiment runner), the
ServerApp (`flwr run .` with a run config: `server.server_app.server_settings`) and `fedshop coordinator run`
(min_shops against the merchants registered at the SuperLink, with Flower's node list faked). The CLI's
own refusals (exit 2, one line) are tests/test_bad_settings.py's table.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from flower_harness import coordinator_home, tiny_scenario, write_scenario
from typer.testing import CliRunner

from shared.federation_plan import ShopCount, check_federation_plan
from shared.settings import FederationTable, RunSettings, ScenarioError

# ------------------------------------------------------------------------------------------ the check


@pytest.mark.parametrize("style, names", [("scenario", ("federation.min_shops", "federation.join_round")),
                                          ("run", ("min-shops", "join-round"))])
def test_each_refusal_names_the_field_as_the_user_wrote_it(style, names) -> None:
    min_shops, join_round = names
    shops = ShopCount(first=3, joiners=1)
    with pytest.raises(ScenarioError, match=rf"{min_shops} = 5, but the federation has only 3 shop\(s\).*Fix: set "
                       rf"{min_shops} to at most 3"):
        check_federation_plan(FederationTable(min_shops=5), shops, "here", style=style)
    with pytest.raises(ScenarioError, match=rf"{min_shops} = 4, but only 3 shop\(s\) train from round 1 \(1 late "
                       rf"joiner\(s\) wait for {join_round}\)"):
        check_federation_plan(FederationTable(min_shops=4, join_round=2, rounds=3), shops, "here", style=style)
    with pytest.raises(ScenarioError, match=rf"{join_round} = 5 is after the last round .*Fix: set {join_round} "
                       "between 1 and 3"):
        check_federation_plan(FederationTable(rounds=3, join_round=5), shops, "here", style=style)
    with pytest.raises(ScenarioError, match=r"secure.aggregation = true with 1 shop\(s\): SecAgg\+ needs at least 2"):
        check_federation_plan(FederationTable(min_shops=1, secure_aggregation=True), ShopCount(1, 0), "here",
                              style=style)
    check_federation_plan(FederationTable(min_shops=4, join_round=2, rounds=3), ShopCount(4, 1), "here", style=style)


def test_rounds_override_and_unknown_shops() -> None:
    fed = FederationTable(rounds=10, join_round=5, min_shops=50)
    with pytest.raises(ScenarioError, match="after the last round"):
        check_federation_plan(fed, None, "here", rounds=3)  # --rounds 3 cuts the run before round 5
    check_federation_plan(fed, None, "here")  # shops unknown (a coordinator without the data): min_shops unchecked


def test_a_fraction_below_min_shops_is_not_refused_but_said(caplog) -> None:
    """Flower lifts the sample to min_train_nodes (= min_shops): the run works, fraction_train has no effect."""
    with caplog.at_level(logging.WARNING, logger="shared.federation_plan"):
        check_federation_plan(FederationTable(fraction_train=0.2, min_shops=2), ShopCount(5, 0), "here")
    assert "federation.fraction_train = 0.2 of 5 shop(s) is 1, below federation.min_shops = 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shared.federation_plan"):
        check_federation_plan(FederationTable(fraction_train=0.5, min_shops=2), ShopCount(5, 0), "here")
    assert caplog.text == ""


class _Grid:
    """The one Grid call FedAvg's sampling makes: the connected nodes."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_flowers_fedavg_samples_min_shops_when_the_fraction_rounds_below_it() -> None:
    """The premise of not refusing such a fraction, on the installed flwr: no wait, no short sample."""
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies import build_strategy
    from simulations.local_grid import set_task_identity

    set_task_identity()  # messages need a sender (a ServerApp's run sets it)
    strategy = build_strategy("fedavg", fraction_train=0.2, min_shops=2)
    sent = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid(5)))  # int(5 x 0.2) = 1
    assert len({m.metadata.dst_node_id for m in sent}) == 2
    sent = list(build_strategy("fedavg", fraction_train=0.6, min_shops=2).configure_train(
        1, ArrayRecord(), ConfigRecord(), _Grid(5)))
    assert len(sent) == 3  # above min_shops the fraction rules


# ------------------------------------------------------------------------------------------ run_federated


def test_run_federated_refuses_before_writing_anything(tmp_path: Path) -> None:
    from simulations.federated import run_federated

    run_dir = tmp_path / "run"
    with pytest.raises(ScenarioError, match="federation.min_shops = 5, but the federation has only 3"):
        run_federated(tiny_scenario(**{"federation.min_shops": 5}), run_dir, rounds=1, engine="pool")
    with pytest.raises(ScenarioError, match="federation.join_round = 3 is after the last round"):
        run_federated(tiny_scenario(**{"federation.join_round": 3}), run_dir, rounds=2, engine="pool")
    assert not run_dir.exists()



class _Stop(Exception):
    pass


def _count_checks(monkeypatch) -> list[int | None]:
    """The rounds of every `check_federation_plan` call from now on (the check still runs)."""
    import shared.federation_plan as plan

    calls: list[int | None] = []
    real = plan.check_federation_plan

    def counted(*args, **kwargs):
        calls.append(kwargs.get("rounds"))
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "check_federation_plan", counted)
    return calls


def _stop_after_check(monkeypatch) -> None:
    """run_federated raises `_Stop` right after its (possible) check, before anything is written."""
    import simulations.federated as federated

    def stop(*_args, **_kwargs):
        raise _Stop

    monkeypatch.setattr(federated, "run_config", stop)


def test_run_federated_checks_unless_told_the_caller_did(tmp_path: Path, monkeypatch) -> None:
    # The check remembers nothing (no state on the Scenario): each call checks, a refusal every time.
    from simulations.federated import run_federated

    calls = _count_checks(monkeypatch)
    _stop_after_check(monkeypatch)
    scenario = tiny_scenario()
    for _ in range(2):
        with pytest.raises(_Stop):
            run_federated(scenario, tmp_path / "run", rounds=2, engine="pool")
    assert calls == [2, 2]
    with pytest.raises(_Stop):
        run_federated(scenario, tmp_path / "run", rounds=2, engine="pool", checked=True)
    assert calls == [2, 2]  # the caller said it checked: not again
    scenario.check_federation(3)
    scenario.check_federation(3)
    assert calls == [2, 2, 3, 3]
    bad = tiny_scenario(**{"federation.min_shops": 5})
    for _ in range(2):  # the same message each time
        with pytest.raises(ScenarioError, match="federation.min_shops = 5, but the federation has only 3"):
            bad.check_federation()
    assert len(calls) == 6
    assert not hasattr(scenario, "_checked")


@pytest.mark.parametrize("rounds", [[], ["--rounds", "2"]])
def test_simulate_checks_the_plan_once(tmp_path: Path, monkeypatch, rounds: list[str]) -> None:
    # `fedshop simulate` checks in the CLI (scenario_or_exit) and tells run_federated so: one check per run.
    from simulations.cli import app

    calls = _count_checks(monkeypatch)
    _stop_after_check(monkeypatch)
    path = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    result = CliRunner().invoke(app, ["simulate", str(path), "--engine", "pool", "--run-dir", str(tmp_path / "run"),
                                      *rounds])
    assert isinstance(result.exception, _Stop), result.output  # got past run_federated's (skipped) check
    assert calls == [2 if rounds else None]


def test_simulate_refuses_a_bad_plan_in_the_cli(tmp_path: Path, monkeypatch) -> None:
    from simulations.cli import app

    calls = _count_checks(monkeypatch)
    _stop_after_check(monkeypatch)
    path = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    result = CliRunner().invoke(app, ["simulate", str(path), "--engine", "pool", "--run-dir", str(tmp_path / "run"),
                                      "--set", "federation.min_shops=5"])
    assert result.exit_code == 2 and "federation.min_shops = 5, but the federation has only 3" in result.output
    assert len(calls) == 1 and not (tmp_path / "run").exists()


def test_resume_checks_in_run_federated(tmp_path: Path, monkeypatch) -> None:
    # --resume loads the saved scenario without the check: run_federated checks it then.
    from simulations.cli import app
    from simulations.federated import SCENARIO_FILE

    calls = _count_checks(monkeypatch)
    _stop_after_check(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    write_scenario(tiny_scenario(), run / SCENARIO_FILE)
    result = CliRunner().invoke(app, ["simulate", "--resume", str(run), "--engine", "pool", "--rounds", "2"])
    assert isinstance(result.exception, _Stop), result.output
    assert calls == [2]


def test_compare_checks_each_scenario_once(tmp_path: Path, monkeypatch) -> None:
    from simulations.cli import app

    calls = _count_checks(monkeypatch)
    _stop_after_check(monkeypatch)
    path = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    result = CliRunner().invoke(app, ["compare", str(path), "--methods", "fedshop", "--seeds", "0,1",
                                      "--run-dir", str(tmp_path / "run")])
    assert isinstance(result.exception, _Stop), result.output
    assert calls == [None] * 3  # in the CLI: the scenario, then each seed's; not again in run_federated


# ------------------------------------------------------------------------------------------ the ServerApp


@pytest.fixture(scope="module")
def joiner_scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shops training from round 1 + 1 late joiner, written where a run config can name it."""
    scenario = tiny_scenario(**{"data.synthetic.n_late_joiners": 1, "data.synthetic.late_joiner_impressions": 1500})
    return write_scenario(scenario, tmp_path_factory.mktemp("plan") / "joiner.toml")


def _config(scenario: Path, tmp_path: Path, **keys: object) -> dict:
    return {**RunSettings(scenario=str(scenario), run_dir=str(tmp_path / "run")).to_run_config(), **keys}


def test_the_server_app_refuses_a_run_config_that_cannot_run(joiner_scenario: Path, tmp_path: Path) -> None:
    from server.server_app import server_settings

    with pytest.raises(ScenarioError, match=r"run config: min-shops = 4, but the federation has only 3 shop\(s\)"):
        server_settings(_config(joiner_scenario, tmp_path, **{"min-shops": 4}))
    # the run config's join-round (not the scenario's) decides whether the joiner has a node
    with pytest.raises(ScenarioError, match=r"min-shops = 4, but only 3 shop\(s\) train from round 1"):
        server_settings(_config(joiner_scenario, tmp_path, **{"min-shops": 4, "join-round": 2,
                                                              "num-server-rounds": 3}))
    with pytest.raises(ScenarioError, match="join-round = 4 is after the last round"):
        server_settings(_config(joiner_scenario, tmp_path, **{"join-round": 4, "num-server-rounds": 3}))
    settings, secure, _, _ = server_settings(_config(joiner_scenario, tmp_path, **{"min-shops": 3}))
    assert settings.min_shops == 3 and not secure
    assert not (tmp_path / "run").exists()


def test_the_server_app_main_refuses_before_round_one(joiner_scenario: Path, tmp_path: Path) -> None:
    """Through the ServerApp's own entry (what `flwr run .` calls), with a grid that must not be used."""
    from flwr.app import Context, RecordDict

    from server.server_app import make_server_app

    class Untouchable:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the grid was used ({name}) before the run config was refused")

    app = make_server_app({"min-shops": 9})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=_config(joiner_scenario, tmp_path))
    with pytest.raises(ScenarioError, match="min-shops = 9"):
        app._main(Untouchable(), context)


def test_the_server_app_without_the_shops_checks_what_needs_none(tmp_path: Path) -> None:
    """Deployment: the coordinator cannot read the merchants' shop dirs; join-round is still checked."""
    from server.server_app import server_settings

    scenario = tmp_path / "shops.toml"
    scenario.write_text(f'[data]\nsource = "shop-dirs"\npaths = ["{tmp_path}/nowhere-a", "{tmp_path}/nowhere-b"]\n')
    settings, _, _, _ = server_settings(_config(scenario, tmp_path, **{"min-shops": 5}))
    assert settings.min_shops == 5  # the registered merchants were checked by `fedshop coordinator run`
    with pytest.raises(ScenarioError, match="join-round = 11 is after the last round"):
        server_settings(_config(scenario, tmp_path, **{"join-round": 11}))  # rounds: 10


def test_compression_with_a_privacy_path_is_refused_by_the_run_config_schema_itself(tmp_path: Path) -> None:
    """Why the ServerApp's own compression check was removed: no run config reaches the ServerApp with it."""
    from server.federation_settings import split_privacy

    for extra in ({"secure-aggregation": True}, {"dp-noise-multiplier": 1.0}):
        with pytest.raises(ScenarioError, match="compression = 'fp16' with .* is refused"):
            split_privacy({"compression": "fp16", "run-dir": str(tmp_path), **extra})


# ------------------------------------------------------------------------------------------ coordinator run


def _home(tmp_path: Path, pid: int) -> Path:
    return coordinator_home(tmp_path, pid)


def _nodes(*states: str) -> list[dict]:
    return [{"node-id": str(10 + i), "status": s, "online-at": ""} for i, s in enumerate(states)]


def _fake_flwr(nodes: list[dict], calls: list[tuple]):
    def fake(info: object, *args: str, timeout: float = 60.0) -> dict:
        calls.append(args)
        if args[:2] == ("supernode", "ls"):
            return {"success": True, "nodes": nodes}
        raise AssertionError(args)
    return fake


def test_min_shops_is_checked_against_the_registered_merchants(tmp_path: Path, monkeypatch) -> None:
    from simulations.deploy import coordinator as coordinator_mod

    home = _home(tmp_path, os.getpid())
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr(_nodes("online", "offline", "unregistered"), []))
    with pytest.raises(ValueError) as err:
        coordinator_mod.check_registered_merchants(home, {"min-shops": 3})
    assert str(err.value) == ("min_shops=3 but only 2 merchants are registered: register more with `fedshop "
                              "coordinator register` or lower federation.min_shops")
    coordinator_mod.check_registered_merchants(home, {"min-shops": 2})  # offline still counts: it may come back
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr(_nodes("online"), []))
    with pytest.raises(ValueError, match="secure_aggregation=true but only 1 merchant is registered"):
        coordinator_mod.check_registered_merchants(home, {"min-shops": 1, "secure-aggregation": True})


def test_an_unreachable_superlink_only_warns(tmp_path: Path, monkeypatch) -> None:
    from simulations.deploy import coordinator as coordinator_mod

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    calls: list[tuple] = []
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr([], calls))
    said: list[str] = []
    coordinator_mod.check_registered_merchants(_home(tmp_path, dead.pid), {"min-shops": 3}, warn=said.append)
    assert calls == [] and len(said) == 1 and said[0].startswith("warning: could not list the merchants")

    def no_answer(info: object, *args: str, timeout: float = 60.0) -> dict:
        raise RuntimeError("`flwr supernode ls` failed: connection refused")

    monkeypatch.setattr(coordinator_mod, "_flwr", no_answer)
    (tmp_path / "live").mkdir()
    coordinator_mod.check_registered_merchants(_home(tmp_path / "live", os.getpid()), {"min-shops": 3},
                                               warn=said.append)
    assert "connection refused" in said[1] and "min_shops=3 is not checked" in said[1]


def _cli() -> typer.Typer:
    from simulations.commands import deploy

    app = typer.Typer()
    deploy.register(app)
    return app


def test_coordinator_run_refuses_before_submitting_with_one_line(tmp_path: Path, monkeypatch) -> None:
    from simulations.deploy import coordinator as coordinator_mod

    home = _home(tmp_path, os.getpid())
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr(_nodes("online", "registered"), []))
    submitted: list[dict] = []
    monkeypatch.setattr(coordinator_mod, "submit_run", lambda *a, **k: submitted.append(k) or None)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(_cli(), ["coordinator", "run", "default", "--home", str(home), "--runs-dir",
                                         str(runs), "-c", "min-shops=3"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and submitted == [], result.output
    assert lines == ["Error: min_shops=3 but only 2 merchants are registered: register more with `fedshop "
                     "coordinator register` or lower federation.min_shops"], result.output
    assert not runs.exists() or not any(runs.iterdir())  # the refused run left no run directory


def test_a_deployments_run_config_whose_scenario_lists_no_shops_passes_the_serverapp_check(tmp_path: Path) -> None:
    """The deployed scenario names no shop folders (each merchant brings its own): min-shops is not checked
    against 0 shops there (that refused every deployed run), but join-round still is."""
    from server.server_app import server_settings
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config
    from simulations.deploy.loopback import tiny_scenario

    source = tmp_path / "tiny.toml"
    source.write_text(tiny_scenario())
    config = deployment_run_config(load_scenario(str(source)), str(source), tmp_path / "run", extra={"min-shops": 3})
    settings = server_settings(config)[0]
    assert settings.min_shops == 3
    with pytest.raises(ScenarioError, match="join-round = 9 is after the last round"):
        server_settings({**config, "join-round": 9})


def test_only_a_shop_dirs_scenario_without_paths_is_merchant_held(tmp_path: Path) -> None:
    """The ServerApp skips min-shops only when the merchants hold the shops (a shop-dirs source with no
    paths); a scenario with shops of its own is checked, and one with an unreadable shop folder is not
    taken for merchant-held."""
    from shared.scenario import load_scenario
    from simulations.deploy.loopback import tiny_scenario as deploy_scenario

    held = tmp_path / "held.toml"
    held.write_text(deploy_scenario())
    assert load_scenario(str(held)).merchant_held
    listed = tmp_path / "listed.toml"
    listed.write_text(deploy_scenario([tmp_path / "a-shop-folder"]))
    assert not load_scenario(str(listed)).merchant_held
    assert not load_scenario("default").merchant_held
