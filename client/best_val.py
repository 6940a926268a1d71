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

Bounded (`compact`, applied to every record a shop keeps or reads): the server round is the coordinator's
choice, so the record must not grow with rounds. It keeps, per task, only the rounds whose score beat every
earlier round's (what a later round compares with is the best of the earlier rounds, and the first round
holding that best is one of these, so dropping the others changes no decision), and at most
`MAX_ROUNDS` rounds, newest first, plus each task's latest kept round (its best so far). So a run going
forward decides exactly as with every round kept; only a redo deeper than the newest `MAX_ROUNDS` kept rounds
compares with fewer earlier rounds and tests more tasks, never fewer. A saved record above `MAX_FILE_BYTES`
or one that does not parse is ignored with a warning naming the file (the shop tests every task that round,
and the file is rewritten at the round's end).
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

MAX_ROUNDS = 1000  # rounds a record keeps at most (plus each task's latest); see `compact`
# A compact record's JSON is at most (MAX_ROUNDS + tasks) rounds x (20-digit key + 4 tasks x ~35 bytes), < 0.2 MiB;
# a saved file above this is not one fedshop wrote, and is ignored unread.
MAX_FILE_BYTES = 1 << 20
_FALLBACK = "this shop tests every task this round, and the file is rewritten at the round's end"


def _better(task: str, score: float, best: float) -> bool:
    """Whether ``score`` beats ``best`` on ``task``'s selection metric (strictly: reports pick the first of ties)."""
    return score > best if SELECTION_METRICS[task][1] else score < best


def compact(record: Record, max_rounds: int | None = None) -> Record:
    """``record`` bounded: per task only the rounds that beat every earlier round, then at most ``max_rounds`` rounds.

    Same decisions as ``record`` (`tasks_to_test`) for every round: the best of rounds < r is held by the first
    round reaching it, which beat every round before it, so it is kept; NaN, unknown tasks (always tested) and
    rounds left empty are dropped. When more than ``max_rounds`` rounds remain, the oldest go, except each task's
    latest kept round (its best so far): later rounds decide exactly as before; a redo at a round older than the
    kept ones compares with fewer rounds, so it tests more tasks, never fewer. ``max_rounds``: `MAX_ROUNDS`.
    """
    max_rounds = MAX_ROUNDS if max_rounds is None else max(1, max_rounds)
    best: dict[str, float] = {}
    out: Record = {}
    for r in sorted(record):
        for task, score in record[r].items():
            if task not in SELECTION_METRICS or math.isnan(score):
                continue
            if task not in best or _better(task, score, best[task]):
                best[task] = score
                out.setdefault(r, {})[task] = score
    if len(out) <= max_rounds:
        return out
    rounds = sorted(out)
    capped = {r: dict(out[r]) for r in rounds[-max_rounds:]}
    latest = {task: r for r in rounds for task in out[r]}
    for task, r in latest.items():
        capped.setdefault(r, {})[task] = out[r][task]
    logger.debug("best-val record capped at %d rounds: rounds %d..%d kept only as tasks' latest", max_rounds,
                 rounds[0], rounds[-max_rounds - 1])
    return {r: capped[r] for r in sorted(capped)}


def saved_rounds(saved: dict) -> Record:
    """The rounds of a saved record (`record_text`'s JSON, loaded), as they are: not compacted."""
    return {int(r): {str(t): float(v) for t, v in tasks.items()} for r, tasks in saved["rounds"].items()}


def record_text(run: str, record: Record) -> str:
    """The JSON a shop keeps for ``run``'s ``record`` (in `context.state` and `best_val.json`)."""
    return json.dumps({"run": run, "rounds": {str(r): record[r] for r in sorted(record)}}, sort_keys=True)


def _parse(text: str, run: str, source: str) -> Record:
    """The rounds of ``text`` (a saved record from ``source``) that belong to ``run``, compacted.

    Empty if it is another run's (silently: a new run), or, with a warning naming ``source``, if it is corrupt.
    """
    try:
        saved = json.loads(text)
        if saved.get("run") != run:
            return {}
        return compact(saved_rounds(saved))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.warning("%s is not a best-val record (%s: %s); %s. Fix: none needed; delete it if this repeats",
                       source, type(exc).__name__, str(exc)[:100], _FALLBACK)
        return {}


def load_record(context: Context, state_dir: Path | None, run: str) -> Record:
    """The shop's record for ``run``: from ``context.state``, else from its state directory, else empty."""
    if BEST_VAL_RECORD in context.state.config_records:
        return _parse(str(context.state.config_records[BEST_VAL_RECORD].get("json", "")), run,
                      f"the shop's context.state record {BEST_VAL_RECORD!r}")
    path = Path(state_dir) / BEST_VAL_FILE if state_dir is not None else None
    if path is not None and path.exists():
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            logger.warning("%s is unreadable (%s); %s", path, exc, _FALLBACK)
            return {}
        if len(data) > MAX_FILE_BYTES:
            logger.warning("%s is over %d bytes, more than a best-val record can hold (%d rounds); ignored unread: "
                           "%s. Fix: none needed; delete it if this repeats", path, MAX_FILE_BYTES, MAX_ROUNDS,
                           _FALLBACK)
            return {}
        return _parse(data.decode("utf-8", errors="replace"), run, str(path))
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
    text = record_text(run, record)
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
    """From round ``server_round``'s validation metrics: the tasks to test (`tasks_to_test`) and the updated record.

    The record is `compact`: it stays bounded whatever round numbers the coordinator sends.
    """
    scores = primaries(val)
    return tasks_to_test(record, server_round, scores), compact(note_round(record, server_round, scores))
