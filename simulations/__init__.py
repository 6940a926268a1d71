"""Simulation, comparison and deployment drivers (the `fedshop` CLI)."""

from shared.openmp import set_passive_wait_policy

set_passive_wait_policy()  # before torch is imported: idle OpenMP threads sleep instead of spinning
