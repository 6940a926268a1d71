"""OpenMP threads sleep when idle: `OMP_WAIT_POLICY=PASSIVE` unless the user chose a policy.

With the default (active) policy, an OpenMP worker thread spins for a while after every parallel
region, waiting for more work. On a machine where simulated shops outnumber cores (every federated
run on a laptop) those spinning threads burn the CPU the other shops need: the centralised arm of
`benchmarks/federation_overhead.py` took 90.5 CPU s with ACTIVE against 24.4 with PASSIVE (3.7x).
OpenMP reads the variable when its runtime starts, so it must be set before torch is imported in a
process; `import simulations` sets it, and the processes it starts (Ray workers, pool workers)
inherit it. A multi-node Ray cluster's processes do not: export it before `ray start`.
"""

from __future__ import annotations

import os

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def set_passive_wait_policy(environ: dict[str, str] | None = None) -> bool:
    """Set `OMP_WAIT_POLICY=PASSIVE` in ``environ`` (default: this process) unless set; True when it set it."""
    env = os.environ if environ is None else environ
    if env.get(WAIT_POLICY_ENV):
        return False
    env[WAIT_POLICY_ENV] = "PASSIVE"
    return True
