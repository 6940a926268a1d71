"""Outgoing-message audit: only encoder arrays and allow-listed scalars may leave a shop.

Flower-free: a message is given as record name -> {key: value}. The client side wraps this in a
Flower mod (client/secure_client.py `audit_mod`). Errors never repeat a blocked key or value,
since either may itself be private (a user ID used as a key, say).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np

# Scalars a shop may report: counts, losses, task metrics, its own privacy spend.
DEFAULT_METRIC_PATTERNS = ("num-examples", "loss", "loss-*", "*-auc", "*-logloss", "*@*", "*-rmse", "*-mae",
                           "*-wape", "epsilon", "dp-*", "round-time", "weight")
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


def audit_payload(*, arrays: Mapping[str, Mapping[str, object]], metrics: Mapping[str, Mapping[str, object]],
                  configs: Mapping[str, Mapping[str, object]], allow: AllowList) -> None:
    """Raise LeakBlocked unless every array, metric and config entry is allowed; say where, never what."""
    problems: list[str] = []
    for rec, content in arrays.items():
        bad = [k for k in content if k not in allow.array_keys]
        if bad:
            problems.append(f"array record '{rec}' has {len(bad)} array(s) that are not encoder parameters")
    for rec, content in metrics.items():
        bad = [k for k, v in content.items() if not _matches(k, allow.metric_patterns)
               or not isinstance(v, (int, float, list, np.integer, np.floating))]
        if bad:
            problems.append(f"metric record '{rec}' has {len(bad)} entr(y/ies) not on the scalar allow-list")
    for rec, content in configs.items():
        bad = []
        for k, v in content.items():
            if not _matches(k, allow.config_patterns) and not _matches(k, allow.metric_patterns):
                bad.append(k)
            elif isinstance(v, str) and len(v) > allow.max_string_len:
                bad.append(k)
        if bad:
            problems.append(f"config record '{rec}' has {len(bad)} entr(y/ies) not on the allow-list")
    if problems:
        raise LeakBlocked("outgoing message blocked by the privacy audit: " + "; ".join(problems)
                          + ". Fix: send only encoder arrays and allow-listed scalars (shared/privacy/audit.py).")
