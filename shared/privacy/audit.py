"""Outgoing-message audit: what may leave a shop, fixed by its task set and the protocol.

Flower-free. The exact metric vocabulary (`MetricVocabulary`: `num-examples`, `shop-index`, losses,
`[split/]<task>.<metric>` for the shop's own tasks), the scalar rule (one finite int or float; NaN,
the vocabulary's "undefined", is reset to the canonical NaN so its payload bits carry nothing) and a
hard cap on the number of metrics. `client/leak_guard.py` (main ClientApp) and
`client/secure_client.py` (SecAgg+ legacy replies) build every reply from what passes here. Errors
never repeat a blocked key or value, since either may itself be private (a user ID used as a key).
`AllowList`/`audit_payload` are the older pattern-based check, kept for callers that audit a
flattened payload; the Flower mods no longer use them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np

from shared.protocol import (
    DP_EPSILON,
    LOSS,
    NUM_EXAMPLES,
    SHOP_INDEX,
    SPLIT_SEPARATOR,
    SPLITS,
    eval_splits,
    task_loss_key,
)
from shared.schema import TASKS
from shared.tasks import TOP_K

# Scalars a shop may report besides task metrics: counts, losses, its own privacy spend.
DEFAULT_METRIC_PATTERNS = ("num-examples", "num_examples", "shop-index", "loss", "loss-*", "epsilon", "dp-*",
                           "round-time", "weight")
# Task metrics, named '[val/|test/]<task>.<metric>': the one vocabulary both client audits accept.
METRIC_NAMES = frozenset({"auc", "logloss", "accuracy", "precision", "recall", "f1", "ctcvr_auc", "rmse", "mae",
                          "wape", "poisson_deviance"})
_RANK_METRIC = re.compile(rf"^(hr|ndcg)@{TOP_K}(_s\d{{1,4}})?$|^recall@{TOP_K}$")
# What each task's evaluation reports (shared/tasks.py); ranking adds '_s<n>' for n sampled negatives.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "ctr": ("auc", "logloss", "accuracy", "precision", "recall", "f1"),
    "cvr": ("auc", "logloss", "ctcvr_auc"),
    "ranking": (f"hr@{TOP_K}", f"ndcg@{TOP_K}", f"recall@{TOP_K}"),
    "sales": ("rmse", "mae", "wape", "poisson_deviance"),
}
SAMPLED_RANK_METRICS = (f"hr@{TOP_K}", f"ndcg@{TOP_K}")
TRAIN_PROTOCOL_KEYS = (NUM_EXAMPLES, SHOP_INDEX, LOSS, DP_EPSILON)
EVAL_PROTOCOL_KEYS = (NUM_EXAMPLES, SHOP_INDEX)
INT_KEYS = frozenset({SHOP_INDEX, "num_examples"})  # sent as int; every other metric is sent as float
MAX_METRICS = 64  # hard cap per reply, above the largest vocabulary (2 + 3 splits x 18 task metrics = 56)
CANONICAL_NAN = float("nan")
# Keys Flower's SecAgg+ mod and legacy replies put on the wire: public keys, encrypted key shares,
# masked integer vectors, unmasking shares, the reply status, the DP adaptive-clipping bit.
PROTOCOL_CONFIG_PATTERNS = ("pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares", "code", "message",
                            "norm_bit")


class LeakBlocked(RuntimeError):
    """An outgoing message held something not on the allow-list; it was not sent."""


@dataclass(frozen=True)
class AllowList:
    """What may leave a shop: exact encoder array names and scalar/config key patterns."""

    array_keys: frozenset[str]
    metric_patterns: tuple[str, ...] = DEFAULT_METRIC_PATTERNS
    config_patterns: tuple[str, ...] = PROTOCOL_CONFIG_PATTERNS
    max_string_len: int = 64  # longer strings could smuggle rows; protocol strings are short
    extra_record_names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def for_encoder(cls, encoder_keys: Iterable[str], **kwargs: object) -> AllowList:
        """Allow-list for a shop whose shared part has parameters ``encoder_keys``."""
        return cls(array_keys=frozenset(encoder_keys), **kwargs)  # type: ignore[arg-type]


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def is_task_metric(key: str) -> bool:
    """Whether ``key`` names a metric of a known task, e.g. ``val/ctr.auc`` or ``ranking.hr@10_s99``."""
    split, sep, rest = key.partition(SPLIT_SEPARATOR)
    if sep and split in ("val", "test"):
        key = rest
    task, _, metric = key.partition(".")
    return task in TASKS and (metric in METRIC_NAMES or bool(_RANK_METRIC.match(metric)))


def audit_payload(*, arrays: Mapping[str, Mapping[str, object]], metrics: Mapping[str, Mapping[str, object]],
                  configs: Mapping[str, Mapping[str, object]], allow: AllowList) -> None:
    """Raise LeakBlocked unless every array, metric and config entry is allowed; say where, never what."""
    problems: list[str] = []
    for rec, content in arrays.items():
        bad = [k for k in content if k not in allow.array_keys]
        if bad:
            problems.append(f"array record '{rec}' has {len(bad)} array(s) that are not encoder parameters")
    for rec, content in metrics.items():
        bad = [k for k, v in content.items() if not (_matches(k, allow.metric_patterns) or is_task_metric(k))
               or not isinstance(v, (int, float, list, np.integer, np.floating))]
        if bad:
            problems.append(f"metric record '{rec}' has {len(bad)} entr(y/ies) not on the scalar allow-list")
    for rec, content in configs.items():
        bad = []
        for k, v in content.items():
            if not (_matches(k, allow.config_patterns) or _matches(k, allow.metric_patterns) or is_task_metric(k)):
                bad.append(k)
            elif isinstance(v, str) and len(v) > allow.max_string_len:
                bad.append(k)
        if bad:
            problems.append(f"config record '{rec}' has {len(bad)} entr(y/ies) not on the allow-list")
    if problems:
        raise LeakBlocked("outgoing message blocked by the privacy audit: " + "; ".join(problems)
                          + ". Fix: send only encoder arrays and allow-listed scalars (shared/privacy/audit.py).")


@dataclass(frozen=True)
class MetricVocabulary:
    """The exact metric keys one shop may send, fixed by its task set and the protocol (never by its handler).

    ``shop_index`` (when known) is the only value `shop-index` may take.
    """

    tasks: tuple[str, ...] = ()
    sampled_negatives: int = 99
    shop_index: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASK_METRICS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in the metric vocabulary; known: {sorted(TASK_METRICS)}")

    def task_metrics(self) -> tuple[str, ...]:
        """'<task>.<metric>' for every metric the shop's tasks report."""
        out = [f"{t}.{m}" for t in self.tasks for m in TASK_METRICS[t]]
        if "ranking" in self.tasks:
            out += [f"ranking.{m}_s{self.sampled_negatives}" for m in SAMPLED_RANK_METRICS]
        return tuple(out)

    def train_keys(self) -> frozenset[str]:
        """Keys of a train reply: counts, the shop index, the total and per-task losses, the DP-SGD epsilon."""
        return frozenset(TRAIN_PROTOCOL_KEYS) | {task_loss_key(t) for t in self.tasks}

    def eval_keys(self, splits: tuple[str, ...]) -> frozenset[str]:
        """Keys of an evaluate reply: counts, the shop index, task metrics (split-prefixed when several)."""
        prefixes = [f"{s}{SPLIT_SEPARATOR}" for s in splits] if len(splits) > 1 else [""]
        return frozenset(EVAL_PROTOCOL_KEYS) | {p + k for p in prefixes for k in self.task_metrics()}


def parse_splits(eval_split: object) -> tuple[str, ...]:
    """The splits an evaluate request asks for ('val', 'test', 'val+test', ...); LeakBlocked if malformed."""
    splits = tuple(eval_splits(str(eval_split)))
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise LeakBlocked("the request's eval-split is not a '+'-list of distinct train/val/test")
    return splits


def clean_scalar(key: str, value: object) -> int | float:
    """``value`` as the one type ``key`` is sent as: a single finite int/float (NaN made canonical)."""
    if type(value) not in (int, float):  # not bool, list, str, bytes or a numpy scalar
        raise LeakBlocked("a metric value is not a single int or float")
    if key in INT_KEYS:
        if not (isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())):
            raise LeakBlocked("a count/index metric is not integral")
        return int(value)
    value = float(value)
    if math.isinf(value):
        raise LeakBlocked("a metric value is infinite")
    # A NaN has 51 free payload bits: send the one canonical NaN, which says only "undefined".
    return CANONICAL_NAN if math.isnan(value) else value


def clean_metrics(values: Mapping[str, object], allowed: frozenset[str],
                  shop_index: int | None = None) -> dict[str, int | float]:
    """The metrics to send, key-sorted with canonical types; LeakBlocked (naming nothing) if any is not allowed."""
    if len(values) > MAX_METRICS:
        raise LeakBlocked(f"more than {MAX_METRICS} metrics")
    if any(not isinstance(k, str) or k not in allowed for k in values):
        raise LeakBlocked("a metric key is not in the shop's vocabulary")
    out = {k: clean_scalar(k, values[k]) for k in sorted(values)}
    if shop_index is not None and SHOP_INDEX in out and out[SHOP_INDEX] != shop_index:
        raise LeakBlocked("shop-index is not this shop's index")
    return out
