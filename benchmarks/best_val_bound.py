"""Size and per-message cost of a shop's best-val record after N rounds: every round kept vs `compact` (bounded).

Builds the record N rounds of validation scores leave (``noisy``: a slowly improving trend with noise, as the
tests; ``monotone``: every task strictly better every round, the worst case, where only the round cap bounds it),
then times what one evaluate message does with it (parse the saved JSON, `tasks_to_test`, note the round,
serialise), the two variants alternating in one process. Writes benchmarks/results/best_val_bound.json.

    .venv/bin/python benchmarks/best_val_bound.py [--rounds 100 1000 5000 20000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from client.best_val import Record, compact, note_round, record_text, saved_rounds, tasks_to_test
from shared.atomic import atomic_write_text
from shared.protocol import SELECTION_METRICS

OUT = Path(__file__).parent / "results" / "best_val_bound.json"


def scores(kind: str, rng: random.Random, r: int) -> dict[str, float]:
    """One round's validation primaries per task."""
    out = {}
    for task, (_, higher) in SELECTION_METRICS.items():
        step = 1 - math.exp(-r / 800) + rng.gauss(0, 0.2) if kind == "noisy" else r * 1e-7
        out[task] = round(0.7 + (0.05 if higher else -0.05) * step, 6 if kind == "noisy" else 12)
    return out


def message(text: str, server_round: int, new: dict[str, float], bounded: bool) -> str:
    """What one evaluate message does with the saved record: parse, decide, note, serialise."""
    record = saved_rounds(json.loads(text))  # `load_record` would compact it: the unbounded arm parses as before
    tasks_to_test(record, server_round, new)
    record = note_round(record, server_round, new)
    if bounded:
        record = compact(record)
    return record_text("run", record)


def main() -> None:
    """Print and save bytes and microseconds per message for each N and record kind."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, nargs="+", default=[100, 1000, 5000, 20000])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = []
    for kind in ("noisy", "monotone"):
        for n in args.rounds:
            rng = random.Random(0)
            full: Record = {r: scores(kind, rng, r) for r in range(1, n + 1)}
            kept = {False: full, True: compact(full)}
            texts = {b: record_text("run", kept[b]) for b in (False, True)}
            new = scores(kind, rng, n + 1)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for bounded in (False, True):  # alternate: load changes hit both alike
                    start = time.perf_counter()
                    message(texts[bounded], n + 1, new, bounded)
                    times[bounded].append(time.perf_counter() - start)
            row = {"kind": kind, "rounds": n,
                   "full_rounds_kept": len(full), "full_bytes": len(texts[False]),
                   "full_us": statistics.median(times[False]) * 1e6,
                   "bounded_rounds_kept": len(kept[True]), "bounded_bytes": len(texts[True]),
                   "bounded_us": statistics.median(times[True]) * 1e6}
            rows.append(row)
            print(f"{kind:8s} N={n:6d}  every round: {row['full_rounds_kept']:6d} rounds {row['full_bytes']:9d} B "
                  f"{row['full_us']:10.0f} us   compact: {row['bounded_rounds_kept']:5d} rounds "
                  f"{row['bounded_bytes']:7d} B {row['bounded_us']:8.0f} us")
    atomic_write_text(OUT, json.dumps({"rows": rows, "repeats": args.repeats}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
