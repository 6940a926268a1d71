"""shared.pull_backoff: the object-pull back-offs of SuperNode, ServerApp grid and long-lived ClientApp, and the
SuperNode's reply wait: values, env parsing, refusal of bad values, binding into flwr, and flwr's interface."""

from __future__ import annotations

import time
from types import ModuleType

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

from shared import pull_backoff as pb
from shared.pull_backoff import CLIENTAPP, GRID, SUPERNODE, TARGETS, Backoff


@pytest.fixture
def restore_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test binds into flwr's modules is put back afterwards."""
    import importlib

    for target in TARGETS:
        module = importlib.import_module(target.module)
        monkeypatch.setattr(module, target.attr, getattr(module, target.attr))
    module = importlib.import_module(pb.REPLY_MODULE)
    monkeypatch.setattr(module, "time", module.time)


def test_installed_flower_offers_what_the_adapter_binds_into() -> None:
    pb.check_flower_interface()


def test_defaults_are_the_documented_values() -> None:
    assert pb.backoff_from_env(SUPERNODE, {}) == Backoff(0.02, 0.25)
    assert pb.backoff_from_env(GRID, {}) == Backoff(0.02, 0.25)
    assert pb.backoff_from_env(CLIENTAPP, {}) == Backoff(0.01, 0.05)
    assert pb.reply_poll_from_env({}) == 0.01
    assert [t.env for t in TARGETS] == ["FEDSHOP_PULL_BACKOFF", "FEDSHOP_GRID_PULL_BACKOFF",
                                        "FEDSHOP_CLIENTAPP_PULL_BACKOFF"]


@pytest.mark.parametrize(("raw", "target", "expected"), [
    ("0.05", SUPERNODE, Backoff(0.05, 0.25)),
    (" 0.05,0.5 ", GRID, Backoff(0.05, 0.5)),
    ("0.1", CLIENTAPP, Backoff(0.1, 0.1)),  # a start above the default cap lifts the cap to it
    ("1", CLIENTAPP, Backoff(1.0, 10.0)),  # "1" = Flower's own
    ("1,10", SUPERNODE, Backoff(1.0, 10.0)),
    ("", GRID, Backoff(0.02, 0.25)),
])
def test_env_values_are_parsed(raw: str, target: pb.Target, expected: Backoff) -> None:
    assert pb.backoff_from_env(target, {target.env: raw}) == expected
    assert expected.is_flowers == (expected == Backoff(1.0, 10.0))


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "nan", "inf", "0.5,0.1", "0.1,0.2,0.3", "100", "0.1,"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_bad_backoff_names_the_variable_and_the_fix(raw: str, target: pb.Target) -> None:
    with pytest.raises(ValueError, match=rf"^{target.env}=.*Fix: unset it") as err:
        pb.backoff_from_env(target, {target.env: raw})
    assert repr(raw) in str(err.value)


@pytest.mark.parametrize("raw", ["0", "1", "soon", "-0.01", "nan"])
def test_a_bad_reply_poll_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=r"^FEDSHOP_REPLY_POLL=.*between 0.001 and 0.5.*Fix"):
        pb.reply_poll_from_env({pb.REPLY_POLL_ENV: raw})


def test_give_up_times_follow_from_flowers_500_tries() -> None:
    assert pb.give_up_seconds(Backoff(1.0, 10.0)) == pytest.approx(1 + 2 + 4 + 8 + 10 * 495)  # ~83 min
    assert pb.give_up_seconds(SUPERNODE.default) == pytest.approx(0.02 + 0.04 + 0.08 + 0.16 + 0.25 * 495)  # ~2 min
    assert pb.give_up_seconds(CLIENTAPP.default) == pytest.approx(0.01 + 0.02 + 0.04 + 0.05 * 496)  # ~25 s


@pytest.mark.usefixtures("restore_flower")
@pytest.mark.parametrize("target", TARGETS)
def test_the_backoff_is_bound_into_flowers_function_and_one_leaves_it(target: pb.Target) -> None:
    import importlib

    module = importlib.import_module(target.module)
    original = getattr(module, target.attr)
    assert pb.apply_from_env(target, {target.env: "0.03,0.3"}) == Backoff(0.03, 0.3)
    pb.apply_from_env(target, {})  # twice: rebinds Flower's function, not the partial
    bound = getattr(module, target.attr)
    assert bound.func is original and bound.keywords == {"initial_backoff": target.default.initial,
                                                         "backoff_cap": target.default.cap}
    pb.apply_from_env(target, {target.env: "1"})
    assert getattr(module, target.attr) is original


@pytest.mark.usefixtures("restore_flower")
def test_the_supernodes_bound_pull_retries_after_the_short_backoff_and_gives_up_on_time() -> None:
    from flwr.supernode import start_client_internal

    pb.apply_from_env(SUPERNODE, {})
    tries: list[float] = []

    def pull_once_missing(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ObjectUnavailableError(object_id)  # not pushed yet: retried after the back-off
        return b"content"

    assert start_client_internal.pull_objects(["abc"], pull_object_fn=pull_once_missing) == {"abc": b"content"}
    assert len(tries) == 2 and tries[1] - tries[0] < 0.5  # Flower's first back-off is 0.8-1.2 s

    def never_there(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    start = time.monotonic()
    with pytest.raises(ObjectPullError):
        start_client_internal.pull_objects(["abc"], pull_object_fn=never_there, max_tries_per_object=8)
    expected = pb.give_up_seconds(SUPERNODE.default, tries=8)  # 0.02+0.04+0.08+0.16+0.25*3 = 1.05 s
    assert 0.8 * expected <= time.monotonic() - start <= 1.2 * expected + 1.0


@pytest.mark.usefixtures("restore_flower")
def test_the_supernodes_reply_wait_polls_every_reply_poll_seconds() -> None:
    from flwr.supernode import start_client_internal

    class Stop(Exception):
        pass

    checks: list[float] = []

    class NoReplyYet:  # Flower's _push_messages asks the NodeState for replies until there is one
        def get_messages_legacy(self, **kwargs: object) -> list:
            checks.append(time.monotonic())
            if len(checks) == 4:
                raise Stop
            return []

    assert pb.apply_reply_poll({}) == 0.01
    pb.apply_reply_poll({})  # idempotent
    with pytest.raises(Stop):  # Flower's own function, with its 3 sleeps between the 4 checks
        start_client_internal._push_messages(state=NoReplyYet(), object_store=None, send=None, push_object=None)
    assert checks[-1] - checks[0] < 0.5  # Flower's three 0.5 s sleeps would take 1.5 s
    start = time.monotonic()
    start_client_internal.time.sleep(0.05)  # any other sleep (e.g. the idle 3 s) is left as it is
    assert time.monotonic() - start >= 0.045
    pb.apply_reply_poll({pb.REPLY_POLL_ENV: "0.5"})
    assert start_client_internal.time is time  # Flower's own


def test_a_changed_flower_interface_fails_loudly_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore import constant
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(http_grid, "pull_objects", lambda object_ids, pull_object_fn: {})
    monkeypatch.setattr(constant, "PULL_BACKOFF_CAP", 30)
    monkeypatch.setattr(start_client_internal, "_push_messages", lambda state: None)
    monkeypatch.setattr(start_client_internal, "time", None)
    with pytest.raises(pb.FlowerInterfaceError) as err:
        pb.check_flower_interface()
    text = str(err.value)
    assert "http_grid.pull_objects(object_ids, pull_object_fn): no initial_backoff/backoff_cap" in text
    assert "PULL_BACKOFF_CAP: 30, not 10" in text
    assert "_push_messages: no longer waits in time.sleep(0.5) steps" in text
    assert "start_client_internal.time: not the time module" in text
    assert "FEDSHOP_GRID_PULL_BACKOFF=1" in text and "FEDSHOP_REPLY_POLL=0.5" in text  # the way out
    with pytest.raises(pb.FlowerInterfaceError):
        pb.apply_from_env(GRID, {})
    pb.apply_from_env(GRID, {GRID.env: "1"})  # Flower's own back-off needs nothing from flwr's internals


def test_the_launcher_refuses_a_bad_value_before_starting_flower(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.deploy import supernode_launcher

    monkeypatch.setenv("FEDSHOP_PULL_BACKOFF", "fast")
    assert supernode_launcher.main(["30", "--", "--insecure"]) == 2
    assert "error: FEDSHOP_PULL_BACKOFF='fast': not a number of seconds" in capsys.readouterr().err
    monkeypatch.setenv("FEDSHOP_PULL_BACKOFF", "1")
    monkeypatch.setenv("FEDSHOP_REPLY_POLL", "2")
    assert supernode_launcher.main(["30", "--", "--insecure"]) == 2
    assert "error: FEDSHOP_REPLY_POLL='2'" in capsys.readouterr().err


def test_flowers_own_environment_names_every_knob() -> None:
    assert pb.FLOWERS_OWN == {"FEDSHOP_PULL_BACKOFF": "1", "FEDSHOP_GRID_PULL_BACKOFF": "1",
                              "FEDSHOP_CLIENTAPP_PULL_BACKOFF": "1", "FEDSHOP_REPLY_POLL": "0.5"}
    assert isinstance(time, ModuleType)


def test_the_flower_interface_is_checked_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binding every target and the reply poll runs the (import- and inspect-heavy) check once, not per call."""
    calls: list[int] = []
    real = pb.check_flower_interface
    monkeypatch.setattr(pb, "check_flower_interface", lambda: calls.append(1) or real())
    pb._check_flower_interface_once.cache_clear()
    try:
        for target in pb.TARGETS:
            pb.apply_from_env(target, {})
            pb.apply_from_env(target, {target.env: "0.03,0.3"})
        pb.apply_reply_poll({})
        assert len(calls) == 1
    finally:
        pb._check_flower_interface_once.cache_clear()
        for target in pb.TARGETS:
            pb.apply_from_env(target, {target.env: "1"})  # Flower's own again for the tests that follow
        pb.apply_reply_poll({pb.REPLY_POLL_ENV: "0.5"})


def test_a_poll_schedule_doubles_to_its_cap_and_restarts_after_an_arrival() -> None:
    schedule = pb.PollSchedule(0.02, 0.2)
    assert schedule.wait() == 0.2  # nothing has arrived yet: relaxed
    schedule.arrived()
    assert [schedule.wait() for _ in range(6)] == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.2, 0.2])
    schedule.arrived()
    assert schedule.wait() == 0.02
    assert [pb.PollSchedule(0.1, 0.1).wait() for _ in range(2)] == [0.1, 0.1]
    with pytest.raises(ValueError, match="0 < first <= cap"):
        pb.PollSchedule(0.5, 0.2)


@pytest.mark.parametrize(("raw", "expected"), [
    ("", Backoff(0.02, 0.2)), ("0.05,0.5", Backoff(0.05, 0.5)), (" 0.2 ", Backoff(0.2, 0.2)),  # one value: fixed
    ("0.005,3", Backoff(0.005, 3.0)),
])
def test_the_active_poll_is_parsed(raw: str, expected: Backoff) -> None:
    assert pb.active_poll_from_env({pb.ACTIVE_POLL_ENV: raw}) == expected
    assert pb.PollSchedule.of(expected).cap == expected.cap


@pytest.mark.parametrize("raw", ["soon", "0", "0.001", "4", "0.2,0.1", "0.02,0.2,1", "nan", "0.02,"])
def test_a_bad_active_poll_names_the_variable_and_the_fix(raw: str) -> None:
    with pytest.raises(ValueError, match=r"^FEDSHOP_ACTIVE_POLL=.*Fix: unset it \(fedshop's 0.02,0.2") as err:
        pb.active_poll_from_env({pb.ACTIVE_POLL_ENV: raw})
    assert repr(raw) in str(err.value)


def test_the_launcher_refuses_a_bad_active_poll_before_starting_flower(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.deploy import supernode_launcher

    monkeypatch.setenv(pb.ACTIVE_POLL_ENV, "0.5,0.1")
    monkeypatch.setattr(supernode_launcher, "install_signature_check", lambda path: None)
    monkeypatch.setattr(pb, "apply_reply_poll", lambda: 0.01)
    monkeypatch.setattr(pb, "apply_from_env", lambda target: target.default)
    assert supernode_launcher.main(["30", "--", "--insecure"]) == 2
    assert "error: FEDSHOP_ACTIVE_POLL='0.5,0.1': out of range" in capsys.readouterr().err


@pytest.mark.parametrize("raw", ["x", "nan", "inf", "-1", "61"])
def test_every_seconds_knob_fails_the_same_way_naming_the_variable_and_the_fix(raw: str) -> None:
    """One reader (shared/env_seconds.py) for the poll knobs: the variable, its value, the range, the fix."""
    from shared.env_seconds import seconds_from_env

    assert seconds_from_env("FEDSHOP_X", 0.5, 0.01, 60.0, "unset it", {}) == 0.5
    assert seconds_from_env("FEDSHOP_X", 0.5, 0.01, 60.0, "unset it", {"FEDSHOP_X": " 2 "}) == 2.0
    with pytest.raises(ValueError, match=rf"^FEDSHOP_X='{raw}': must be a number of seconds between 0.01 and 60\. "
                                         r"Fix: unset it$"):
        seconds_from_env("FEDSHOP_X", 0.5, 0.01, 60.0, "unset it", {"FEDSHOP_X": raw})
