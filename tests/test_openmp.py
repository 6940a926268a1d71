"""`OMP_WAIT_POLICY=PASSIVE` is set for federated workers unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

from shared.openmp import WAIT_POLICY_ENV, set_passive_wait_policy


def test_sets_passive_when_unset():
    env: dict[str, str] = {}
    assert set_passive_wait_policy(env) is True
    assert env[WAIT_POLICY_ENV] == "PASSIVE"


def test_keeps_the_users_choice():
    env = {WAIT_POLICY_ENV: "ACTIVE"}
    assert set_passive_wait_policy(env) is False
    assert env[WAIT_POLICY_ENV] == "ACTIVE"


def _policy_after_import(env: dict[str, str]) -> str:
    code = "import os, simulations; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_simulations_sets_it_before_workers_start():
    env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY_ENV}
    assert _policy_after_import(env) == "PASSIVE"
    assert _policy_after_import({**env, WAIT_POLICY_ENV: "active"}) == "active"
