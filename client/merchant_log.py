"""The merchant's own log: one line per round in the SuperNode's log (rows trained, own validation metrics).

Without it a merchant's operator sees only Flower's message IDs. The line is written when the round's
evaluation ends (after its training), through a child of Flower's logger: it lands wherever Flower's
console handler writes (the SuperNode's log file under `fedshop merchant start`) and follows
FLWR_LOG_LEVEL, so a simulation (whose workers run at ERROR unless `-v`) stays quiet. One line per round:
a round already logged (a fused evaluation whose train reply was lost, then the coordinator's evaluate
message for the same round) is not logged again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import ConfigRecord, Context

from client.local_state import rounds_trained

logger = logging.getLogger("flwr.fedshop.merchant")
TRAINED_RECORD = "fedshop.last-training"  # ConfigRecord in context.state: {"round", "rows", "stage"}
LOGGED_RECORD = "fedshop.last-logged"  # ConfigRecord in context.state: {"round", "run"} of the last line written
# The metrics a line shows when the shop has them (evaluate_shop reports ~18; the rest stay in metrics.csv).
HEADLINE = ("ctr.auc", "ctr.logloss", "cvr.auc", "cvr.ctcvr_auc", "ranking.hr@10", "ranking.ndcg@10", "sales.wape")


def note_training(context: Context, server_round: int, rows: int, stage: str) -> None:
    """Remember this round's training (``rows``: the shop's training rows), for the round's log line."""
    context.state[TRAINED_RECORD] = ConfigRecord({"round": int(server_round), "rows": int(rows), "stage": stage})


def round_line(shop: str, context: Context, server_round: int, metrics: Mapping[str, float]) -> str:
    """The log line of one round: round, rows trained, `rounds_trained` and the shop's validation metrics."""
    trained = dict(context.state.config_records.get(TRAINED_RECORD, {}))
    if int(trained.get("round", -1)) == server_round:
        rows = f"trained {int(trained['rows']):,} rows"
        if trained.get("stage") == "warm-up":
            rows += " (warm-up: local part only)"
    else:
        rows = "not trained this round"
    # With "val+test" the keys are `val/<task>.<metric>`; with one split they carry no prefix.
    own = {k.removeprefix("val/"): v for k, v in metrics.items()
           if k.startswith("val/") or ("/" not in k and "." in k)}
    shown = {k: own[k] for k in HEADLINE if k in own} or own
    text = " ".join(f"{k}={v:.4f}" for k, v in shown.items()) or "none"
    return (f"fedshop {shop} round {server_round}: {rows}, rounds_trained {rounds_trained(context)}; "
            f"validation {text}")


def log_round(shop: str, context: Context, server_round: int, metrics: Mapping[str, float], split: str,
              run: str = "") -> None:
    """Write the round's line to the merchant's log (INFO on Flower's handler), once per round of ``run``.

    A second evaluation of the same round (the fallback evaluate message after a fused evaluation whose train
    reply was lost) computes the same metrics; its line would only repeat the first, so it is skipped.
    """
    last = dict(context.state.config_records.get(LOGGED_RECORD, {}))
    if int(last.get("round", -1)) == int(server_round) and str(last.get("run", "")) == run:
        return
    if "val" not in split.split("+"):
        metrics = {}  # a test-only evaluation is the coordinator's business, not a validation result
    logger.info(round_line(shop, context, server_round, metrics))
    context.state[LOGGED_RECORD] = ConfigRecord({"round": int(server_round), "run": run})
