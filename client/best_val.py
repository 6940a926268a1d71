"""A shop's record of its validation scores, so it computes test metrics only in rounds a report can pick.

Reports take, per shop and task, the test metric at the first round with the best validation primary
metric (`shared.protocol.SELECTION_METRICS`, `simulations.best_rounds.final_table`). That round is always
one where the task's validation score beat every earlier round's, so a test pass in any other round is
never read. With `test-on-improvement` in an evaluate request (the coordinator sends it unless
`test_every_round = true`, and never in the last round), a shop evaluates validation first and then test
only for the tasks whose validation primary metric is new best, missing or NaN (the report falls back to
the last tested round there, so those keep their test every round).

The record holds each round's validation primary per task, keyed by run and round, in `context.state`
and, when the shop has one, in its state directory (`best_val.json`), so it survives a new process and
a resumed run. Round r compares only with rounds before r of the same run: a redone round (resume)
overwrites its own entry and never competes with it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context

from client.model_cache import file_identity
from shared.atomic import atomic_write_text
from shared.protocol import SELECTION_METRICS

logger = logging.getLogger(__name__)

BEST_VAL_RECORD = "fedshop.best-val"  # ConfigRecord in context.state: {"json": the record}
BEST_VAL_FILE = "best_val.json"

Record = dict[int, dict[str, float]]  # round -> task -> validation primary metric


def _parse(text: str, run: str) -> Record:
    """The rounds of ``text`` (a saved record) that belong to ``run``; empty if it is another run's or unreadable."""
    try:
        saved = json.loads(text)
        if saved.get("run") != run:
            return {}
        return {int(r): {str(t): float(v) for t, v in tasks.items()} for r, tasks in saved["rounds"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def load_record(context: Context, state_dir: Path | None, run: str) -> Record:
    """The shop's record for ``run``: from ``context.state``, else from its state directory, else empty."""
    if BEST_VAL_RECORD in context.state.config_records:
        return _parse(str(context.state.config_records[BEST_VAL_RECORD].get("json", "")), run)
    path = Path(state_dir) / BEST_VAL_FILE if state_dir is not None else None
    if path is not None and path.exists():
        try:
            return _parse(path.read_text(), run)
        except OSError as exc:
            logger.warning("%s is unreadable (%s); this shop tests every task this round", path, exc)
    return {}


_WRITTEN: dict[str, tuple[tuple[int, ...] | None, str]] = {}  # path -> (its identity after our write, text)


def save_record(context: Context, state_dir: Path | None, run: str, record: Record) -> None:
    """Keep ``record`` in ``context.state`` and, when the shop has one, in its state directory (atomically).

    The file is written only when its text changes (this process wrote that very text and the file is
    untouched since), and without an fsync: it is a cache of work, not a result. A kill -9 still leaves
    the old or the new file (the rename is atomic); an OS crash may leave an older record or an empty
    file, read as no record. Either way the record has fewer rounds, so `tasks_to_test` compares with
    fewer earlier scores and tests every task it would have tested (and maybe more): reported numbers,
    taken at each task's best validation round, do not change. The local part, whose loss would lose a
    finished round, is still written with an fsync (`client.local_state.write_state_file`).
    """
    text = json.dumps({"run": run, "rounds": {str(r): record[r] for r in sorted(record)}}, sort_keys=True)
    context.state[BEST_VAL_RECORD] = ConfigRecord({"json": text})
    if state_dir is None:
        return
    path = Path(state_dir) / BEST_VAL_FILE
    last = _WRITTEN.get(str(path))
    if last is not None and last[1] == text and last[0] is not None and last[0] == file_identity(path):
        return
    atomic_write_text(path, text, fsync=False)
    _WRITTEN[str(path)] = (file_identity(path), text)


def primaries(val: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per task of ``val`` (task -> metric -> value), its selection metric's value (NaN when it has none)."""
    return {task: float(metrics.get(SELECTION_METRICS[task][0], math.nan)) if task in SELECTION_METRICS
            else math.nan for task, metrics in val.items()}


def tasks_to_test(record: Record, server_round: int, scores: Mapping[str, float]) -> set[str]:
    """The tasks whose round-``server_round`` score ``scores[task]`` a report could pick: new best, NaN or unknown.

    "New best" is strictly better than every non-NaN score of the same task in earlier rounds of the
    record (none yet counts as better); a tie is not, since reports pick the first of equal rounds.
    """
    out = set()
    for task, score in scores.items():
        known = task in SELECTION_METRICS
        higher = SELECTION_METRICS[task][1] if known else True
        earlier = [v[task] for r, v in record.items() if r < server_round and task in v and not math.isnan(v[task])]
        if not known or math.isnan(score) or not earlier:
            out.add(task)
        elif (score > max(earlier)) if higher else (score < min(earlier)):
            out.add(task)
    return out


def note_round(record: Record, server_round: int, scores: Mapping[str, float]) -> Record:
    """``record`` with round ``server_round``'s scores and without later rounds (a resumed run redoes those)."""
    kept = {r: v for r, v in record.items() if r < server_round}
    kept[server_round] = {t: float(s) for t, s in scores.items() if not math.isnan(s)}
    return kept


def next_tests(record: Record, server_round: int, val: Mapping[str, Mapping[str, float]]) -> tuple[set[str], Record]:
    """From round ``server_round``'s validation metrics: the tasks to test (`tasks_to_test`) and the updated record."""
    scores = primaries(val)
    return tasks_to_test(record, server_round, scores), note_round(record, server_round, scores)
