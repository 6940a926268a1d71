"""Shared fixtures for the Flower-free core tests: one tiny synthetic world, built once per session."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from shared.datasets.synthetic import World, WorldConfig, generate_world
from shared.features import FeatureConfig, ShopTensors, build_shop_tensors
from shared.model import ModelConfig

# Tests share two slow cores with other jobs; one thread each keeps timings stable and runs deterministic.
torch.set_num_threads(1)

# 3 training shops (4000 .. 1500 impressions) and one late joiner that has IDs only (no side tables).
# A 15% click rate gives the small test splits enough positives for a stable AUC; no task is dropped,
# so the largest shop carries every registered task.
TINY_WORLD = WorldConfig(n_shops=3, seed=0, max_impressions=4000, min_impressions=1500, n_small_shops=1,
                         n_late_joiners=1, late_joiner_impressions=1500, days=30, base_ctr=0.15,
                         task_dropout=0.0)
# 20 sampled ranking negatives: with ~100-item catalogs, 99 would leave heavy users short of candidates,
# and filling them dominates the build time.
TINY_FEATURES = FeatureConfig(hash_buckets=512, product_buckets=1024, history_len=10, sampled_negatives=20)
TINY_MODEL = ModelConfig(embed_dim=8, n_experts=2, expert_dim=16, tower_dim=8, weighting="fixed")


@pytest.fixture(autouse=True)
def _restore_flower_logger() -> Iterator[None]:
    """Undo what an in-process CLI run does to Flower's logger (`configure_logging` stops its propagation and
    adds a filter), so a later test's `caplog` still sees Flower's records whatever ran before it."""
    flwr = logging.getLogger("flwr")
    saved = flwr.propagate, flwr.level, list(flwr.filters)
    yield
    flwr.propagate, flwr.filters[:] = saved[0], saved[2]
    flwr.setLevel(saved[1])


@pytest.fixture(scope="session")
def tiny_world() -> World:
    """The tiny synthetic world (deterministic per seed)."""
    return generate_world(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_features() -> FeatureConfig:
    """Small hash/product bucket counts so encoders stay tiny."""
    return TINY_FEATURES


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    """Small model sizes (embed_dim 8) with fixed loss weights."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_tensors(tiny_world: World, tiny_features: FeatureConfig) -> dict[str, ShopTensors]:
    """Every shop's cached tensors, by shop name (treat as read-only: shared by the whole session)."""
    return {shop.name: build_shop_tensors(shop, tiny_features) for shop in tiny_world.shops}


@pytest.fixture(scope="session")
def largest_shop(tiny_world: World, tiny_tensors: dict[str, ShopTensors]) -> ShopTensors:
    """The largest training shop: it has every task (CTR, CVR, ranking, sales)."""
    return tiny_tensors[tiny_world.training_shops()[0].name]


@pytest.fixture(scope="session")
def id_only_shop(tiny_world: World, tiny_tensors: dict[str, ShopTensors]) -> ShopTensors:
    """The late joiner with IDs only: no items table, no users table, no global product keys."""
    shop = next(s for s in tiny_world.shops if s.items is None and s.users is None)
    return tiny_tensors[shop.name]
