"""benchmarks/deployment_timeline.py: a message is followed by its ID from the ServerApp's push through the
SuperNode and the long-lived ClientApp to its reply, and each stage gets the time between its marks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("deployment_timeline",
                                               Path(__file__).parents[1] / "benchmarks" / "deployment_timeline.py")
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)


def _round(t0: float, mid: str, rnd: str, pid: int, kind: str = "train", received: float = 0.3) -> list[dict]:
    return [
        {"where": "serverapp", "event": "push", "ids": [mid], "start": t0, "end": t0 + 0.2},
        {"where": "supernode", "event": "received", "ids": [mid], "at": t0 + received},
        {"where": "supernode", "event": "stored", "ids": [mid], "at": t0 + 0.5},
        {"where": "long_lived", "event": "acquired", "pid": pid, "at": t0 + 0.55},
        {"where": "long_lived", "event": "inputs pulled", "pid": pid, "at": t0 + 0.7},
        {"where": "clientapp", "pid": pid, "type": kind, "round": rnd, "msg_id": mid, "handler_start": t0 + 0.72,
         "handler_end": t0 + 1.0},
        {"where": "supernode", "event": "sending", "ids": [mid], "at": t0 + 1.1},
        {"where": "supernode", "event": "sent", "ids": [mid], "at": t0 + 1.3},
        {"where": "serverapp", "event": "reply", "reply_to": mid, "at": t0 + 1.4},
        {"where": "serverapp", "event": "received", "at": t0 + 1.45},
    ]


def test_each_stage_gets_the_time_between_its_marks(tmp_path: Path) -> None:
    events = (_round(90.0, "m0", "1", 7) + _round(100.0, "m1", "1", 7, "evaluate") + _round(110.0, "m2", "2", 7)
              + _round(120.0, "m3", "2", 7, "evaluate"))
    log = tmp_path / "timing.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    timelines = tl.message_timelines(tl.read_events(log))
    assert [(t["msg_id"], t["phase"]) for t in timelines] == [("m0", 0), ("m1", 1), ("m2", 2), ("m3", 3)]
    stages = timelines[2]["stages_s"]
    assert stages == pytest.approx({"SA push": 0.2, "SL -> SN poll": 0.1, "CA acquire": 0.25, "SN pull objects": 0.0,
                                    "CA pull inputs": 0.15, "CA mods": 0.02, "CA handler": 0.28, "reply to SN": 0.1,
                                    "SN push reply": 0.2, "SL -> SA": 0.1})
    assert sum(stages.values()) == pytest.approx(timelines[2]["total_s"]) and timelines[2]["missing"] == []
    assert tl.aggregate_gaps(tl.read_events(log), skip=0) == pytest.approx([8.55, 8.55, 8.55])
    assert tl.aggregate_gaps(tl.read_events(log)) == pytest.approx([8.55])  # round 1's two phases left out
    summary = tl.summarize(timelines, [0.05])
    assert summary["messages"] == 2 and summary["kinds"] == ["evaluate", "train"]  # round 1 left out
    assert summary["table"]["CA handler"]["train"] == pytest.approx(0.28)
    assert summary["table"]["total"]["all"] == pytest.approx(1.4)
    assert sum(row["share"] for name, row in summary["table"].items() if name in tl.STAGES) == pytest.approx(100, 0.01)


def test_a_mark_earlier_than_the_last_or_missing_gives_its_time_to_the_next_stage() -> None:
    early = _round(0.0, "m", "2", 3, received=0.1)  # the SuperNode got the message while the push still ran
    (stages,) = [t["stages_s"] for t in tl.message_timelines(early)]
    assert stages["SA push"] == pytest.approx(0.2) and stages["SL -> SN poll"] == 0
    assert stages["CA acquire"] == pytest.approx(0.35) and stages["SN pull objects"] == 0
    no_node = [e for e in _round(0.0, "m", "2", 3) if e["where"] != "supernode"]  # e.g. Flower's own launcher
    (timeline,) = tl.message_timelines(no_node)
    assert timeline["stages_s"]["SL -> SN poll"] == 0 and timeline["stages_s"]["CA acquire"] == pytest.approx(0.35)
    assert timeline["stages_s"]["SN pull objects"] == 0
    assert "SN pull objects" in timeline["missing"] and timeline["total_s"] == pytest.approx(1.4)
    unanswered = [e for e in _round(0.0, "m", "2", 3) if e.get("event") != "reply"]
    assert tl.message_timelines(unanswered) == []
