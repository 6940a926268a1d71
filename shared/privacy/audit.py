"""Outgoing-message audit: only encoder arrays and allow-listed scalars may leave a shop.

Flower-free: a message is given as record name -> {key: value}. The client side wraps this in a
Flower mod (client/secure_client.py `audit_mod`). Errors never repeat a blocked key or value,
since either may itself be private (a user ID used as a key, say).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np

from shared.schema import TASKS

# Scalars a shop may report besides task metrics: counts, losses, its own privacy spend.
DEFAULT_METRIC_PATTERNS = ("num-examples", "num_examples", "shop-index", "loss", "loss-*", "epsilon", "dp-*",
                           "round-time", "weight")
# Task metrics, named '[val/|test/]<task>.<metric>': the one vocabulary both client audits accept.
METRIC_NAMES = frozenset({"auc", "logloss", "accuracy", "precision", "recall", "f1", "ctcvr_auc", "rmse", "mae",
                          "wape", "poisson_deviance"})
_RANK_METRIC = re.compile(r"^(hr|ndcg|recall|precision|mrr)@\d{1,3}(_s\d{1,4})?$")
TRAIN_METRICS = frozenset({"num-examples", "shop-index", "loss", "dp-epsilon"} | {f"loss-{t}" for t in TASKS})
EVAL_METRICS = frozenset({"num-examples", "shop-index"})
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
    split, sep, rest = key.partition("/")
    if sep and split in ("val", "test"):
        key = rest
    task, _, metric = key.partition(".")
    return task in TASKS and (metric in METRIC_NAMES or bool(_RANK_METRIC.match(metric)))


def allowed_metric(key: str, message_type: str) -> bool:
    """Whether a metric key may leave the shop in a reply to a ``train`` or ``evaluate`` message."""
    if message_type == "train":
        return key in TRAIN_METRICS
    return key in EVAL_METRICS or is_task_metric(key)


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
