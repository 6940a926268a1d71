"""SecAgg+ on the legacy workflow path: exact aggregate up to quantisation, no individual update seen, dropouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context
from flwr.client import NumPyClient

from client.secure_client import make_secure_app
from server.secure import SecAggSettings, run_secure_federation, split_config
from server.server_app import FederationSettings
from simulations.privacy_eval import LoopbackGrid, nodes

SHAPES = {"emb.weight": (64, 8), "tower.weight": (8, 16), "tower.bias": (8,)}


def _update(shop: int, rnd: int) -> list[np.ndarray]:
    """What shop ``shop`` would send in round ``rnd``: deterministic, different per shop."""
    rng = np.random.default_rng(1000 * rnd + shop)
    return [rng.normal(scale=0.5, size=s).astype(np.float32) for s in SHAPES.values()]


class ToyShop(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.shop = int(context.node_config["partition-id"])

    def fit(self, parameters, config):
        return _update(self.shop, int(config["server-round"])), 1, {"loss": 0.5, "shop-index": self.shop}

    def evaluate(self, parameters, config):
        return 0.0, 1, {"shop-index": self.shop}


def _run(tmp_path: Path, n: int, *, drop=None, rounds: int = 1, secagg: SecAggSettings | None = None):
    grid = LoopbackGrid(make_secure_app(lambda ctx: ToyShop(ctx).to_client()), nodes(n), drop=drop)
    settings = FederationSettings(num_server_rounds=rounds, run_dir=str(tmp_path), min_shops=2)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=__import__("flwr.app").app.RecordDict(), run_config={})
    initial = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    run_dir = run_secure_federation(grid, ctx, settings, secagg or SecAggSettings(), initial=initial,
                                    shop_names=[f"s{i}" for i in range(n)])
    return grid, run_dir


def _checkpoint_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    from server.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return ckpt.arrays


def test_aggregate_equals_plain_mean_within_quantisation(tmp_path: Path) -> None:
    n = 5
    settings = SecAggSettings()
    grid, run_dir = _run(tmp_path, n, secagg=settings)
    agg = _checkpoint_arrays(run_dir)
    plain = [np.mean([_update(s, 1)[j] for s in range(n)], axis=0) for j in range(len(SHAPES))]
    err = max(float(np.abs(agg[k] - p).max()) for k, p in zip(SHAPES, plain, strict=True))
    # Stochastic rounding: each shop's value moves by < one quantum, so the mean moves by < one quantum.
    assert 0 < err < settings.quantisation_step()
    assert err < 1e-5


def test_coordinator_never_holds_an_individual_update(tmp_path: Path) -> None:
    n = 4
    grid, _ = _run(tmp_path, n)
    train_replies = [r for r in grid.received if r.message_type == "train" and r.content is not None]
    assert train_replies, "the coordinator received nothing"
    own = {s: np.concatenate([a.ravel() for a in _update(s, 1)]) for s in range(n)}
    for reply in train_replies:
        # No float arrays at all: SecAgg+ empties the arrays record before the reply leaves the shop.
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        masked = reply.content.config_records["secaggplus_configs"].get("masked_params")
        if masked is None:
            continue
        from flwr.common import bytes_to_ndarray
        vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in masked]).astype(np.float64)
        for update in own.values():  # masked integers are uncorrelated with any shop's true update
            # Under independence the sample correlation has sd 1/sqrt(n): allow 5 sd (masks are random per run).
            assert abs(np.corrcoef(vec[: update.size], update)[0, 1]) < 5 / np.sqrt(update.size)


def test_round_survives_a_dropout_above_threshold(tmp_path: Path) -> None:
    n = 5
    # Node 3 answers the key set-up stages, then vanishes before sending its masked vector.
    dropped = 103

    def drop(nid, msg):
        stage = msg.content.config_records.get("secaggplus_configs", {}).get("stage")
        return nid == dropped and stage == "collect_masked_vectors"

    settings = SecAggSettings(num_shares=1.0, reconstruction_threshold=0.6)
    grid, run_dir = _run(tmp_path, n, drop=drop, secagg=settings)
    agg = _checkpoint_arrays(run_dir)
    alive = [s for s in range(n) if s + 101 != dropped]
    plain = [np.mean([_update(s, 1)[j] for s in alive], axis=0) for j in range(len(SHAPES))]
    err = max(float(np.abs(agg[k] - p).max()) for k, p in zip(SHAPES, plain, strict=True))
    assert err < settings.quantisation_step()


def test_split_config_rejects_unknown_keys() -> None:
    on, settings, rest = split_config({"secure-aggregation": True, "secagg-clipping-range": 4, "scenario": "x"})
    assert on and settings.clipping_range == 4.0 and rest == {"scenario": "x"}
    with pytest.raises(ValueError, match="secagg-num-shares"):
        split_config({"secagg-shares": 3})
