"""Where each message of a deployment round spends its time: a per-message timeline from the timing log.

Every process of a loopback deployment writes to one `FEDSHOP_TIMING_LOG` (`shared.timing_log`): the
ServerApp (`server.polling_grid`: push start/end with the message IDs, each reply, all replies received),
each SuperNode (`simulations.deploy.supernode_launcher`: message received, its objects stored, reply
sending, reply sent), each long-lived ClientApp (`client.long_lived`: task acquired, inputs pulled) and its
handler (`client.timing`: handler start/end with the message ID). A message is followed by its ID from the
ServerApp's push to its reply at the ServerApp; the ClientApp's "acquired"/"inputs pulled" lines are matched
by process and time. Stages (each from the end of the one before; a stage whose mark is missing or earlier
than the previous one counts 0 and the next one takes its time, e.g. a SuperNode that receives a message
while the ServerApp is still pushing the round's objects: that time is the ServerApp's push):

  SA push          ServerApp pushes the round's messages and their objects to the SuperLink
  SL -> SN poll    the message waits at the SuperLink for its SuperNode's next poll (FEDSHOP_ACTIVE_POLL)
  CA acquire       the SuperNode makes a task; the long-lived ClientApp's next AcquireTask (0.1 s polls)
  SN pull objects  the SuperNode pulls the message's objects from the SuperLink and stores them
  CA pull inputs   the ClientApp pulls message, context, run and FAB from its SuperNode (it started
                   while the SuperNode was still pulling: its own back-off after the objects arrived)
  CA mods          ClientApp mods before the handler (unpack, wire checks)
  CA handler       the handler: training or evaluation (the work simulation does too)
  reply to SN      ClientApp pushes the reply and the task output; SuperNode's reply wait (FEDSHOP_REPLY_POLL)
  SN push reply    the SuperNode pushes the reply and its objects to the SuperLink
  SL -> SA         the ServerApp's next reply poll (FEDSHOP_GRID_AFTER_REPLY_POLL), its pull and unpack

Plus, per round phase, "SA aggregate": from the last reply to the ServerApp's next push. A message's phase
is the index of the ServerApp push that carried it; round 1's messages (by the round their replies name, else
the first two phases: train and evaluate, with the first-use imports in the ClientApp's handler) are left out
of the summary.

    .venv/bin/python benchmarks/deployment_timeline.py [--timing-log FILE] [--setup after] [--rounds 4]

Without ``--timing-log`` it runs one loopback deployment of `benchmarks/deployment_latency.py`'s tiny shops
with that setup. Prints a table and writes benchmarks/results/deployment_timeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("SA push", "SL -> SN poll", "CA acquire", "SN pull objects", "CA pull inputs", "CA mods", "CA handler",
          "reply to SN", "SN push reply", "SL -> SA")
AGGREGATE = "SA aggregate"


def read_events(timing_log: Path) -> list[dict[str, Any]]:
    """The timing log's events (one JSON object a line; blank lines skipped)."""
    return [json.loads(line) for line in timing_log.read_text().splitlines() if line.strip()]


def _latest(stamps: list[float], before: float, after: float | None = None) -> float | None:
    found = [t for t in stamps if t <= before and (after is None or t >= after)]
    return max(found) if found else None


def message_timelines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One timeline per message the ClientApp handled: its marks (wall-clock) and stage seconds (see module doc)."""
    server = [e for e in events if e.get("where") == "serverapp"]
    pushes = sorted((e for e in server if e.get("event") == "push"), key=lambda e: e["start"])
    push_of = {mid: (phase, e) for phase, e in enumerate(pushes) for mid in e.get("ids", [])}
    reply_at = {e["reply_to"]: e["at"] for e in server if e.get("event") == "reply" and "reply_to" in e}
    round_of = {e["reply_to"]: str(e.get("round", "")) for e in server if e.get("event") == "reply" and "reply_to" in e}
    node = {(e["event"], mid): e["at"] for e in events if e.get("where") == "supernode" for mid in e["ids"]}
    per_pid: dict[tuple[str, int], list[float]] = {}
    for e in events:
        if e.get("where") == "long_lived":
            per_pid.setdefault((e["event"], e["pid"]), []).append(e["at"])
    timelines = []
    for e in (e for e in events if e.get("where") == "clientapp" and e.get("msg_id") in push_of):
        mid, (phase, push) = e["msg_id"], push_of[e["msg_id"]]
        received = node.get(("received", mid))
        acquired = _latest(per_pid.get(("acquired", e["pid"]), []), e["handler_start"], received or push["start"])
        inputs = _latest(per_pid.get(("inputs pulled", e["pid"]), []), e["handler_start"], acquired)
        marks = [push["start"], push["end"], received, acquired, node.get(("stored", mid)), inputs,
                 e["handler_start"], e["handler_end"], node.get(("sending", mid)), node.get(("sent", mid)),
                 reply_at.get(mid)]
        if marks[-1] is None:  # no reply reached the ServerApp (timed out): no end to attribute to
            continue
        stages, previous = {}, marks[0]
        for name, mark in zip(STAGES, marks[1:], strict=True):
            current = previous if mark is None else max(mark, previous)
            stages[name] = round(current - previous, 4)
            previous = current
        timelines.append({"msg_id": mid, "type": e.get("type"), "phase": phase, "round": round_of.get(mid, ""),
                          "pid": e["pid"],
                          "marks": marks, "stages_s": stages, "total_s": round(marks[-1] - marks[0], 4),
                          "missing": [n for n, m in zip(STAGES, marks[1:], strict=True) if m is None]})
    return timelines


def aggregate_gaps(events: list[dict[str, Any]], skip: int = 2) -> list[float]:
    """Seconds from each "all replies received" at the ServerApp to its next push (its own work).

    The first ``skip`` gaps (round 1's train and evaluate phases: first checkpoint, imports) are left out.
    """
    server = [e for e in events if e.get("where") == "serverapp"]
    pushes = sorted(e["start"] for e in server if e.get("event") == "push")
    gaps = []
    for done in sorted(e["at"] for e in server if e.get("event") == "received"):
        following = [p for p in pushes if p >= done]
        if following:
            gaps.append(round(following[0] - done, 4))
    return gaps[skip:]


def _round_key(value: str) -> tuple[int, str]:
    """Sort key of a message's round (its group_id): numerically when it is a number."""
    return (int(value), "") if value.isdigit() else (1 << 30, value)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(timelines: list[dict[str, Any]], aggregate: list[float], skip_round_one: bool = True) -> dict:
    """Median seconds of each stage per message type and overall, and each stage's share of the total.

    ``aggregate`` (the ServerApp's gaps, `aggregate_gaps`) is summarised as given.
    """
    # Round 1 by its round number when the replies name it (a fused round has one phase, not two), else phases 0-1.
    first = min((t["round"] for t in timelines if t.get("round")), key=_round_key, default="")
    kept = [t for t in timelines if not (skip_round_one and ((t["round"] == first) if t.get("round")
                                                             else t["phase"] < 2))] or timelines
    kinds = sorted({str(t["type"]) for t in kept})
    table: dict[str, dict[str, float | None]] = {}
    for stage in STAGES:
        table[stage] = {kind: _median([t["stages_s"][stage] for t in kept if str(t["type"]) == kind])
                        for kind in kinds}
        table[stage]["all"] = _median([t["stages_s"][stage] for t in kept])
        table[stage]["mean"] = round(statistics.fmean(t["stages_s"][stage] for t in kept), 3) if kept else None
    total_mean = statistics.fmean(t["total_s"] for t in kept) if kept else 0.0
    for stage in STAGES:
        table[stage]["share"] = round(100 * (table[stage]["mean"] or 0.0) / total_mean, 1) if total_mean else None
    table["total"] = {**{kind: _median([t["total_s"] for t in kept if str(t["type"]) == kind]) for kind in kinds},
                      "all": _median([t["total_s"] for t in kept]), "mean": round(total_mean, 3), "share": 100.0}
    table[AGGREGATE] = {"all": _median(aggregate)}
    return {"kinds": kinds, "messages": len(kept), "table": table}


def print_table(summary: dict) -> None:
    """The stage table: median per message type, median and mean over all, share of a message's time."""
    kinds = summary["kinds"]
    print(f"{'stage (s per message)':<18} " + " ".join(f"{k:>9}" for k in kinds) + f" {'all':>9} {'mean':>7} "
          f"{'share %':>7}   ({summary['messages']} messages, round 1 left out)")
    for stage, row in summary["table"].items():
        cells = " ".join(f"{row.get(k) if row.get(k) is not None else '':>9}" for k in kinds)
        mean = row.get("mean")
        share = row.get("share")
        print(f"{stage:<18} {cells} {row['all'] if row['all'] is not None else '':>9} "
              f"{mean if mean is not None else '':>7} {share if share is not None else '':>7}")


def _deployment_latency() -> Any:
    """`benchmarks/deployment_latency.py` as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deployment_latency", ROOT / "benchmarks" / "deployment_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(setup: str, rounds: int) -> Path:
    """Run one loopback deployment of the tiny shops with `deployment_latency`'s ``setup``; its timing log."""
    from simulations.deploy.loopback import tiny_scenario, write_tiny_shops

    dl = _deployment_latency()
    by_label = {label: rest for label, *rest in dl.SETUPS}
    if setup not in by_label:
        raise SystemExit(f"--setup {setup!r}: give one of {', '.join(by_label)}")
    _name, isolation, env = by_label[setup]
    root = Path(tempfile.mkdtemp(prefix="fedshop-timeline-"))
    shops = write_tiny_shops(root)
    scenario = root / "timeline.toml"
    scenario.write_text(tiny_scenario([root / n / "shop" for n in shops], name="timeline-tiny", rounds=rounds,
                                      round_timeout=300.0))
    times, phases, _stages = dl.deployment_rounds(scenario, root, shops, rounds, setup, isolation, env,
                                                  state_db=setup in dl.STATE_DB_SETUPS)
    print(f"{setup}: round times {times}; " + ", ".join(f"{key} {phases.get(key)}" for key in dl.SUPERLINK_KEYS))
    return root / f"fed-{setup}" / "timing.jsonl"


def main() -> None:
    """Read (or make) a timing log, print the stage table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing-log", type=Path, default=None, help="an existing FEDSHOP_TIMING_LOG file")
    parser.add_argument("--setup", default="after", help="deployment_latency.py setup to run (no --timing-log)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deployment_timeline.json")
    args = parser.parse_args()
    load_start = os.getloadavg()
    log = args.timing_log if args.timing_log is not None else run_one(args.setup, args.rounds)
    if not log.is_file():
        parser.error(f"--timing-log {log}: no such file. Fix: give the FEDSHOP_TIMING_LOG file of a deployment run")
    events = read_events(log)
    timelines = message_timelines(events)
    if not timelines:
        parser.error(f"{log}: no message could be followed from push to reply. Fix: the log must come from a "
                     "deployment whose ServerApp, SuperNodes and ClientApps all had FEDSHOP_TIMING_LOG set")
    summary = summarize(timelines, aggregate_gaps(events))
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, on {os.cpu_count()} CPUs; {log}")
    print_table(summary)
    from shared.atomic import atomic_write_text

    result = {"timing_log": str(log), "setup": None if args.timing_log else args.setup, "summary": summary,
              "timelines": timelines, "loadavg_start": list(load_start), "loadavg_end": list(load_end),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
