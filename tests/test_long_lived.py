"""The long-lived ClientApp process (client/long_lived.py): Flower's interface it relies on, its choice between
serving in-process and a fresh `flwr-clientapp`, and (slow) one PID serving every message of two runs."""

from __future__ import annotations

import hashlib
import io
import json
import types
from pathlib import Path

import pytest

from client import long_lived
from client.long_lived import ACQUIRE_METHOD, FlowerInterfaceError, LongLivedClient, check_flower_interface
from simulations.deploy.app_signing import build_fab
from simulations.deploy.coordinator import REPO_ROOT


def test_installed_flower_offers_what_the_adapter_uses() -> None:
    check_flower_interface()
    from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS

    assert ACQUIRE_METHOD in _SUPEREXEC_AUTH_METHODS  # the method Flower's SuperExec signs, so the SuperNode checks it


def test_a_changed_flower_interface_fails_loudly_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    changed = {**long_lived.FLOWER_INTERFACE,
               "flwr.supernode.runtime.run_clientapp": {"pull_task_input": ("client", "no_such_param"),
                                                        "gone_function": None}}
    monkeypatch.setattr(long_lived, "FLOWER_INTERFACE", changed)
    monkeypatch.setattr(long_lived, "TASK_FIELDS", (*long_lived.TASK_FIELDS, "no_such_field"))
    with pytest.raises(FlowerInterfaceError) as err:
        check_flower_interface()
    text = str(err.value)
    assert "pull_task_input" in text and "no_such_param" in text
    assert "run_clientapp.gone_function: missing" in text and "Task.no_such_field: missing" in text
    assert "--isolation subprocess" in text  # the way out


def test_local_fab_hash_is_the_hash_of_the_fab_the_coordinator_signs() -> None:
    assert long_lived.local_fab_hash(REPO_ROOT) == hashlib.sha256(build_fab(REPO_ROOT)).hexdigest()


def test_local_fab_hash_is_none_where_no_app_can_be_built(tmp_path: Path) -> None:
    assert long_lived.local_fab_hash(tmp_path) is None  # no pyproject.toml: never serve in-process


def _loop(monkeypatch: pytest.MonkeyPatch) -> tuple[LongLivedClient, list[str]]:
    calls: list[str] = []
    loop = LongLivedClient("127.0.0.1:1", _app=object(), _fab_hash="a" * 64)
    monkeypatch.setattr(loop, "_serve_fresh", lambda token: calls.append(f"fresh {token}"))
    monkeypatch.setattr(loop, "_serve_in_process", lambda token: calls.append(f"in-process {token}"))
    monkeypatch.setattr(long_lived, "forget_run_state", lambda: calls.append("forget"))
    return loop, calls


def test_only_this_checkouts_fab_is_served_in_process_and_each_new_run_starts_clean(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop, calls = _loop(monkeypatch)
    task = types.SimpleNamespace
    loop.serve(task(run_id=1, fab_hash="a" * 64), "t1")
    loop.serve(task(run_id=1, fab_hash="a" * 64), "t2")
    loop.serve(task(run_id=2, fab_hash="b" * 64), "t3")  # another signed app: Flower's fresh process
    loop.serve(task(run_id=3, fab_hash="a" * 64), "t4")
    assert calls == ["forget", "in-process t1", "in-process t2", "fresh t3", "forget", "in-process t4"]
    assert (loop.served.in_process, loop.served.fresh_process, loop.served.runs) == (3, 1, [1, 3])


def test_without_a_local_app_every_task_runs_in_a_fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    loop, calls = _loop(monkeypatch)
    loop._app, loop._fab_hash = None, None
    loop.serve(types.SimpleNamespace(run_id=1, fab_hash="a" * 64), "t1")
    assert calls == ["fresh t1"]


def test_forget_run_state_drops_the_cached_shops(monkeypatch: pytest.MonkeyPatch) -> None:
    from client import local_state

    monkeypatch.setitem(local_state._SHOPS, ("k",), object())
    long_lived.forget_run_state()
    assert ("k",) not in local_state._SHOPS


@pytest.mark.slow
def test_one_long_lived_process_serves_every_message_of_two_runs(tmp_path: Path) -> None:
    """Two rounds (train + evaluate each) and then a second run, all from the same PID per merchant."""
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config, submit_run
    from simulations.deploy.loopback import loopback_federation, tiny_scenario, write_tiny_shops
    from simulations.deploy.processes import pid_alive

    shops = write_tiny_shops(tmp_path)[:2]
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(tiny_scenario(rounds=2))
    timing = tmp_path / "timing.jsonl"
    outcomes = []
    with loopback_federation(tmp_path, shops, env={"FEDSHOP_TIMING_LOG": str(timing)}, scenario=scenario) as fed:
        pids = {name: m.clientapp_pid for name, m in fed.merchants.items()}
        assert all(pids.values()) and len(set(pids.values())) == 2
        for label, rounds in (("first", 2), ("second", 1)):
            run_dir = tmp_path / "runs" / label
            run_dir.mkdir(parents=True)
            config = deployment_run_config(load_scenario(str(scenario)), str(scenario), run_dir, rounds=rounds)
            outcomes.append(submit_run(fed.coordinator.home, config, out=io.StringIO(), timeout=600))
        assert all(pid_alive(pid) for pid in pids.values())
        logs = {name: m.log.read_text(errors="replace")  # the SuperNode's log, shared with its ClientApp
                for name, m in fed.merchants.items()}
    assert all(o.ok for o in outcomes), outcomes
    assert not any(pid_alive(pid) for pid in pids.values())  # stopped with the SuperNodes, by PID
    events = [json.loads(line) for line in timing.read_text().splitlines() if line.strip()]
    served = [e for e in events if e["where"] == "clientapp"]
    assert {e["pid"] for e in served} == set(pids.values())  # no other process served a message
    for pid in pids.values():
        mine = sorted((e["msg_created"], e["type"]) for e in served if e["pid"] == pid)
        # both messages of each round (train, evaluate), 2 rounds of run 1 and 1 of run 2, from one PID
        assert [kind for _, kind in mine] == ["train", "evaluate"] * 3, mine
    for name, log in logs.items():
        for outcome in outcomes:  # each run's FAB recognised as this checkout's signed app, state reset per run
            assert f"fedshop: run {outcome.run_id}: FAB" in log and "served in-process" in log, (name, log)
        assert "fresh flwr-clientapp" not in log


def test_merchant_start_refuses_an_unknown_isolation(tmp_path: Path) -> None:
    from simulations.deploy.merchant import start_merchant

    with pytest.raises(ValueError, match="--isolation thread: must be one of process, subprocess"):
        start_merchant(tmp_path, tmp_path, "127.0.0.1:1", ca=None, key=tmp_path / "k", trusted_entities=tmp_path,
                       isolation="thread")


def test_active_polling_retries_quickly_only_while_a_run_is_active() -> None:
    from shared.pull_backoff import PollSchedule
    from simulations.deploy.supernode_launcher import active_polling

    now = [0.0]
    answers: list[int | None] = []
    calls: list[float] = []
    sleeps: list[float] = []

    def pull(**kwargs: object) -> int | None:
        calls.append(now[0])
        return answers.pop(0) if answers else None

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    wrapped = active_polling(pull, PollSchedule(0.02, 0.2), window=60.0, clock=lambda: now[0], sleep=sleep)
    assert wrapped() is None and len(calls) == 1  # no message yet: idle, Flower's 3 s sleep follows
    answers[:] = [7]
    assert wrapped() == 7  # a message: the run is active from now
    calls.clear()
    answers[:] = [None, None, None, 9]
    assert wrapped() == 9 and len(calls) == 4  # found 0.02 + 0.04 + 0.08 s later, not after 3 s
    assert sleeps[-3:] == pytest.approx([0.02, 0.04, 0.08])
    calls.clear()
    sleeps.clear()
    assert wrapped() is None  # nothing for 3 s: back to Flower's loop
    assert sleeps[:5] == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.2])  # reset by message 9, doubling to the cap
    assert set(sleeps[4:]) == {0.2} and 17 <= len(calls) <= 20
    calls.clear()
    sleeps.clear()
    assert wrapped() is None and sleeps[0] == 0.2  # still nothing: stays at the cap
    now[0] += 120.0  # a minute without messages: idle again
    calls.clear()
    assert wrapped() is None and len(calls) == 1


def test_a_fixed_active_poll_is_the_old_behaviour() -> None:
    from shared.pull_backoff import PollSchedule, active_poll_from_env
    from simulations.deploy.supernode_launcher import active_polling

    now, sleeps, answers = [0.0], [], [5, None, None, 6]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    wrapped = active_polling(lambda **_: answers.pop(0) if answers else None,
                             PollSchedule.of(active_poll_from_env({"FEDSHOP_ACTIVE_POLL": "0.2"})), window=60.0,
                             clock=lambda: now[0], sleep=sleep)
    assert wrapped() == 5 and wrapped() == 6 and sleeps == [0.2, 0.2]


def test_the_idle_poll_relaxes_after_a_minute_and_is_fast_again_after_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    assert long_lived.idle_poll_seconds(0.0) == long_lived.IDLE_POLL_SECONDS == 0.1
    assert long_lived.idle_poll_seconds(59.9) == 0.1 and long_lived.idle_poll_seconds(60.0) == 0.5
    assert long_lived.idle_poll_seconds(600.0, relaxed=0.1) == 0.1  # FEDSHOP_CLIENTAPP_IDLE_POLL=0.1: old
    now, sleeps, tasks_at = [0.0], [], {120.0}

    class Client:
        def AcquireTask(self, request: object) -> object:  # noqa: N802 - Flower's method name
            has = any(abs(now[0] - t) < 1e-9 for t in tasks_at)
            return types.SimpleNamespace(HasField=lambda name: has, token="tok" if has else "",
                                         task=types.SimpleNamespace())

        def close(self) -> None:
            pass

    def sleep(seconds: float) -> None:
        sleeps.append((now[0], seconds))
        now[0] = round(now[0] + seconds, 6)

    loop = LongLivedClient("127.0.0.1:1")
    monkeypatch.setattr(loop, "_acquire_client", Client)
    served: list[float] = []
    monkeypatch.setattr(loop, "serve", lambda task, token: (served.append(now[0]), tasks_at.clear()))
    loop.run_forever(stop=lambda: now[0] >= 200.0 or len(sleeps) > 5000, clock=lambda: now[0], sleep=sleep)
    assert served == [120.0]
    waits = dict(sleeps)
    assert waits[0.0] == 0.1 and waits[59.9] == 0.1 and waits[60.0] == 0.5  # relaxed after a minute idle
    assert waits[120.0] == 0.1 and waits[179.9] == 0.1 and waits[180.0] == 0.5  # fast again after the task


@pytest.mark.parametrize("raw", ["0.05", "fast", "10", "nan"])
def test_a_bad_relaxed_idle_poll_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=r"^FEDSHOP_CLIENTAPP_IDLE_POLL=.*between 0.1 and 5.*Fix: unset it"):
        long_lived.relaxed_poll_from_env({"FEDSHOP_CLIENTAPP_IDLE_POLL": raw})
    assert long_lived.relaxed_poll_from_env({}) == 0.5
    assert long_lived.relaxed_poll_from_env({"FEDSHOP_CLIENTAPP_IDLE_POLL": "1"}) == 1.0
