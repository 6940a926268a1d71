"""One reader for the seconds-valued environment knobs (poll intervals, windows): parsed, range-checked, named.

Every knob fails the same way: the variable, the value it had, the range and the fix, before anything starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping


def seconds_from_env(name: str, default: float, low: float, high: float, fix: str,
                     environ: Mapping[str, str] | None = None, *, unit: str = "seconds") -> float:
    """``name``'s value in ``unit`` (``default`` when unset or empty); a ValueError naming it unless in [low, high]."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name}={raw!r}: must be a number of {unit} between {low:g} and {high:g}. Fix: {fix}")
    return value
