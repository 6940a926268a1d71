"""The wire protocol between the coordinator and the shops: record names, metric and config keys, error codes.

Flower-free and dependency-free, so the client (`client/`), the server (`server/`) and the outgoing audit
(`shared.privacy.audit`) name the same things with one spelling. Metric key conventions:
train replies carry `num-examples`, `shop-index`, `loss`, `loss-<task>` and `dp-epsilon`; evaluate
replies carry `num-examples`, `shop-index` and `<task>.<metric>`, prefixed `<split>/` when the request's
`eval-split` names several splits joined by `+` (e.g. `val+test`). A train request with `evaluate-after-train`
(fused evaluation, `serves_own_encoder`) gets a train reply that also holds the evaluate reply's metrics, in
their own MetricRecord `evaluate-metrics`, never mixed with the train metrics.
"""

from __future__ import annotations

# Records of a main-path reply (the only names the leak guard lets out).
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
EVAL_METRICS_RECORD = "evaluate-metrics"  # a fused train reply's evaluation (asked by `evaluate-after-train`)

# Metric keys.
NUM_EXAMPLES = "num-examples"  # a reply's aggregation weight (0 = leave this shop out of the mean)
SHOP_INDEX = "shop-index"  # which federation shop replied (also a SuperNode's node-config key)
LOSS = "loss"
TASK_LOSS_PREFIX = "loss-"  # loss-<task>
DP_EPSILON = "dp-epsilon"  # a shop's DP-SGD epsilon so far
SPLIT_SEPARATOR = "/"  # <split>/<task>.<metric>
SPLIT_JOIN = "+"  # eval-split = "val+test": both splits in one request
SPLITS = ("train", "val", "test")  # a shop's row splits, as named in settings and metric keys

# The validation metric that picks each (shop, task)'s reported round, and whether higher is better. Reports
# (simulations/best_rounds.py) pick by it, and shops skip test passes that could never be picked by it.
SELECTION_METRICS: dict[str, tuple[str, bool]] = {
    "ctr": ("auc", True),
    "cvr": ("auc", True),
    "ranking": ("ndcg@10", True),
    "sales": ("wape", False),
}

# Array names: local-part arrays the FedAvg-all baseline shares travel under this prefix.
LOCAL_PREFIX = "local."

# Config keys the coordinator sends with a message (besides the run settings).
SERVER_ROUND = "server-round"
EVAL_SPLIT = "eval-split"
# True in an evaluate request = test only the tasks whose validation primary metric improved (client/best_val.py)
TEST_ON_IMPROVEMENT = "test-on-improvement"
# True in a train request = also evaluate after training (eval-split, test-on-improvement of the same request)
EVALUATE_AFTER_TRAIN = "evaluate-after-train"
PROXIMAL_MU = "proximal-mu"  # what Flower's FedProx puts in the train ConfigRecord
SECAGG_WEIGHTING = "secagg-weighting"  # uniform | examples: a SecAgg+ shop's weight

# Error replies a shop sends: one code and two fixed texts, never the handler's words.
ERROR_CODE_BLOCKED = 6  # flwr ErrorCode.MOD_FAILED_PRECONDITION
ERROR_CODE_UNDECODABLE = 0  # flwr ErrorCode.UNKNOWN: the coordinator rejected what the shop sent

# Compressed encoder messages (shared/compression.py; server/wire.py and client/wire_mod.py)
WIRE_RECORD = "fedshop.wire"  # ConfigRecord of a compressed request: mode, encoder, base, target
WIRE_FULL, WIRE_PATCH, WIRE_OMITTED = "full", "patch", "omitted"  # how a request carries the encoder
BLOCKED_TEXT = "reply blocked by the shop's leak guard"
FAILED_TEXT = "shop failed to process the message"
UNPACK_TEXT = "shop could not unpack the message"  # client.pack_mod
UNDECODABLE_TEXT = "shop could not decode the compressed encoder"  # client.wire_mod (details: the shop's log)


def task_loss_key(task: str) -> str:
    """The train metric key of one task's loss."""
    return f"{TASK_LOSS_PREFIX}{task}"


def eval_splits(eval_split: str) -> list[str]:
    """The splits one evaluate request names (`val`, or `val+test` for both)."""
    return str(eval_split).split(SPLIT_JOIN)


def eval_metric_key(split: str, task: str, metric: str, several_splits: bool) -> str:
    """The evaluate metric key of one task metric: `<task>.<metric>`, prefixed `<split>/` if several splits."""
    prefix = f"{split}{SPLIT_SEPARATOR}" if several_splits else ""
    return f"{prefix}{task}.{metric}"


def effective_personal_mix(n0: float, share: str, objective: str) -> float:
    """The personal mix's n0 in force (0 = off): only fedshop's own objective uses it, since the FedAvg-all
    baseline and the Reptile objective define their starting point and reply themselves. Shops (to mix)
    and the coordinator (to leave the encoder out of evaluate messages) both decide by this rule."""
    if share == "all-shareable" or objective != "fedavg":
        return 0.0
    return max(0.0, float(n0))


def serves_own_encoder(n0: float, share: str, objective: str) -> bool:
    """Whether a shop evaluates (serves) its own encoder rather than the global one: the personal mix is in force.

    Then its evaluation is of exactly the model state it holds at the end of its train round, so the
    coordinator leaves the encoder out of its evaluate messages and, with `fuse-evaluate`, asks for the
    evaluation in the train message instead (`evaluate-after-train`); a shop fuses only when this holds too.
    """
    return effective_personal_mix(n0, share, objective) > 0
