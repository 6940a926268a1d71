"""The SuperLink's opt-in request log (benchmarks/superlink_requests.py) and the coordinator's SuperExec poll."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from simulations.deploy.superlink_launcher import RequestLog


def _call(app: RequestLog, scope: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_each_http_request_is_one_timing_line_with_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "timing.jsonl"
    monkeypatch.setenv("FEDSHOP_TIMING_LOG", str(log))

    async def inner(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    app = RequestLog(inner)
    assert _call(app, {"type": "http", "path": "/v1/fleet/pull-object"})[0]["status"] == 200
    _call(app, {"type": "lifespan"})  # not an HTTP request: passed through, not logged
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["where"], e["event"], e["path"]) for e in lines] == [("superlink", "request", "/v1/fleet/pull-object")]
    assert lines[0]["s"] >= 0


def test_a_failing_request_is_logged_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "timing.jsonl"
    monkeypatch.setenv("FEDSHOP_TIMING_LOG", str(log))

    async def broken(scope, receive, send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _call(RequestLog(broken), {"type": "http", "path": "/v1/runtime/acquire-task"})
    assert json.loads(log.read_text())["path"] == "/v1/runtime/acquire-task"


def test_the_coordinators_superexec_polls_at_flowers_1s_and_merchants_at_0_2s(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.deploy.flwr_config import SUPEREXEC_POLL_ENV, coordinator_env, flwr_env

    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    assert coordinator_env(tmp_path)[SUPEREXEC_POLL_ENV] == "1.0"
    assert flwr_env(tmp_path)[SUPEREXEC_POLL_ENV] == "0.2"  # a merchant's SuperExec starts each ClientApp
    assert coordinator_env(tmp_path, {SUPEREXEC_POLL_ENV: "0.3"})[SUPEREXEC_POLL_ENV] == "0.3"
    monkeypatch.setenv(SUPEREXEC_POLL_ENV, "0.5")  # the operator's own value wins
    assert coordinator_env(tmp_path)[SUPEREXEC_POLL_ENV] == "0.5"
