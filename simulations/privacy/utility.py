"""Privacy-utility: test metric after federated rounds per central-DP noise level, +/- SecAgg+; table plot."""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.secure import SecAggSettings, run_secure_federation
from server.server_app import FederationSettings, initial_encoder
from shared.atomic import atomic_write_bytes
from shared.features import build_shop_tensors
from shared.model import build_model
from shared.scenario import Scenario, load_scenario
from shared.schema import ShopData
from shared.train import evaluate_shop, train_shop
from simulations.privacy.eval_config import PrivacyEvalConfig
from simulations.privacy.in_process_grid import InProcessGrid, nodes
from simulations.privacy.secagg_view import secagg_view
from simulations.privacy.updates import clip_update, encoder_arrays

UTILITY_METRIC = "ctr.auc"


def privacy_utility(cfg: PrivacyEvalConfig, scenario_path: Path, run_dir: Path) -> list[dict[str, object]]:
    """Test-split task metric after ``cfg.rounds`` federated rounds for each central-DP noise level, +/- SecAgg+.

    Each shop takes at most ``cfg.utility_steps`` local steps per round (the largest default shop has
    ~80 batches per epoch); the first ``cfg.utility_shops`` training shops take part.
    """
    n_shops, max_steps = cfg.utility_shops, cfg.utility_steps
    from client.client_app import app as main_app
    from client.secure_client import secure_app
    from server.dp import CentralDP, CentralDPSettings, wrap
    from server.strategies import ShopStrategy

    scenario = load_scenario(str(scenario_path))
    shops = scenario.training_shops()[:n_shops]
    rows: list[dict[str, object]] = [_local_only_row(cfg, scenario, shops)]
    for z in cfg.central_noise:
        start = time.perf_counter()
        base = {"scenario": str(scenario_path), "max-steps": max_steps, "run-dir": str(run_dir / f"utility-z{z}")}
        grid = InProcessGrid(main_app, nodes(len(shops)), run_config=base)  # it clips when DP sends a norm
        inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=len(shops), min_train_nodes=len(shops))
        dp = wrap(inner, CentralDPSettings(noise_multiplier=z, clipping_norm=cfg.clipping_norm, delta=cfg.delta),
                  num_shops=len(shops))
        # The main app's strategy wrapper: per-shop metrics stay out of aggregation (shops' task sets differ).
        strategy = ShopStrategy(dp, min_shops=2, shop_name=lambda i: shops[i].name if 0 <= i < len(shops) else str(i))
        result = strategy.start(grid=grid, initial_arrays=initial_encoder(scenario), num_rounds=cfg.rounds,
                                train_config=ConfigRecord(base))
        final = _evaluate_shops(scenario, shops, result.arrays, grid)
        eps = dp.report().epsilon if isinstance(dp, CentralDP) else float("inf")
        rows.append({"protection": "plain FedAvg" if z == 0 else "central DP", "noise_multiplier": z, "epsilon": eps,
                     "delta": cfg.delta, "rounds": cfg.rounds, "metric": UTILITY_METRIC,
                     "value": float(final.get(UTILITY_METRIC, float("nan"))), "seconds": time.perf_counter() - start})
    if cfg.secagg:
        start = time.perf_counter()
        base = {"scenario": str(scenario_path), "max-steps": max_steps}
        grid = InProcessGrid(secure_app, nodes(len(shops)), run_config=base)
        settings = FederationSettings(scenario=str(scenario_path), num_server_rounds=cfg.rounds, min_shops=2,
                                      max_steps=max_steps, run_dir=str(run_dir / "utility-secagg"))
        out = run_secure_federation(grid, Context(1, 0, {}, RecordDict(), {}), settings, SecAggSettings(),
                                    shop_names=[s.name for s in shops])
        import pandas as pd  # local: only this path reads a metrics file back

        m = pd.read_csv(out / "metrics.csv")
        task, metric = UTILITY_METRIC.split(".")
        last = m[(m["round"] == cfg.rounds) & (m["split"] == "test") & (m["task"] == task) & (m["metric"] == metric)]
        rows.append({"protection": "SecAgg+", "noise_multiplier": 0.0, "epsilon": float("inf"), "delta": cfg.delta,
                     "rounds": cfg.rounds, "metric": UTILITY_METRIC, "value": float(last["value"].mean()),
                     "seconds": time.perf_counter() - start})
        eps_of = {r["noise_multiplier"]: r["epsilon"] for r in rows if r["protection"] == "central DP"}
        rows += secagg_dp_rows(cfg, scenario, shops, run_dir, eps_of)
    return rows


def secagg_dp_rows(cfg: PrivacyEvalConfig, scenario: Scenario, shops: list[ShopData], run_dir: Path,
                   epsilon_of: Mapping[float, float]) -> list[dict[str, object]]:
    """SecAgg+ with central DP, composed here because the runtime refuses the pair; one row per z in cfg.

    Each round every shop trains from the global encoder (its local part kept in memory, as a shop
    keeps it), clips its update to S (what `fixedclipping_mod` does), and the clipped updates go
    through a real SecAgg+ round (`secagg_view`: masking, quantisation, unmasking, equal weights);
    the coordinator adds N(0, (zS/n)^2) to the unmasked mean. Same z, S, n and rounds as the
    central-DP rows, hence the same epsilon (taken from them).
    """
    n = len(shops)
    tensors = [build_shop_tensors(s, scenario.features) for s in shops]
    rows = []
    for z in cfg.central_noise:
        start = time.perf_counter()
        rng = np.random.default_rng(cfg.seed)
        models = [build_model(t, scenario.model, scenario.features, seed=scenario.seed) for t in tensors]
        glob = encoder_arrays(models[0])
        for r in range(cfg.rounds):
            clipped = []
            for model, t in zip(models, tensors, strict=True):
                model.load_encoder_state({k: torch.as_tensor(v, dtype=torch.float32) for k, v in glob.items()})
                train_shop(model, t, replace(scenario.train, epochs=1, max_steps=cfg.utility_steps, seed=cfg.seed + r))
                clipped.append(clip_update({k: v - glob[k] for k, v in encoder_arrays(model).items()},
                                           cfg.clipping_norm))
            _, mean, _ = secagg_view(glob, clipped, run_dir / f"utility-secagg-dp-z{z}" / f"round-{r + 1}")
            glob = {k: np.asarray(mean[k], np.float64) + rng.normal(0.0, z * cfg.clipping_norm / n, glob[k].shape)
                    for k in glob}
        state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in glob.items()}
        task, metric = UTILITY_METRIC.split(".")
        values = []
        for model, t in zip(models, tensors, strict=True):
            model.load_encoder_state(state)
            values.append(evaluate_shop(model, t, "test").get(task, {}).get(metric, float("nan")))
        rows.append({"protection": "SecAgg+ and central DP" if z > 0 else "SecAgg+ (composed, clipped)",
                     "noise_multiplier": z, "epsilon": float(epsilon_of.get(z, float("inf"))), "delta": cfg.delta,
                     "rounds": cfg.rounds, "metric": UTILITY_METRIC, "value": float(np.nanmean(values)),
                     "seconds": time.perf_counter() - start})
    return rows


def _local_only_row(cfg: PrivacyEvalConfig, scenario: Scenario, shops: list[ShopData]) -> dict[str, object]:
    """Reference: every shop trains alone for as many epochs as rounds (same step cap in total); nothing leaves."""
    start = time.perf_counter()
    values = []
    for shop in shops:
        t = build_shop_tensors(shop, scenario.features)
        model = build_model(t, scenario.model, scenario.features, seed=scenario.seed)
        train_shop(model, t, replace(scenario.train, epochs=cfg.rounds, max_steps=cfg.rounds * cfg.utility_steps,
                                     seed=cfg.seed))
        task, metric = UTILITY_METRIC.split(".")
        values.append(evaluate_shop(model, t, "test").get(task, {}).get(metric, float("nan")))
    return {"protection": "local only (no federation)", "noise_multiplier": 0.0, "epsilon": 0.0, "delta": 0.0,
            "rounds": cfg.rounds, "metric": UTILITY_METRIC, "value": float(np.nanmean(values)),
            "seconds": time.perf_counter() - start}


def _evaluate_shops(scenario: Scenario, shops: list[ShopData], encoder: ArrayRecord,
                    grid: InProcessGrid) -> dict[str, float]:
    """Mean test metric over shops: the final encoder with each shop's own local part (kept in its context)."""
    from client.local_state import restore_local_part

    values: dict[str, list[float]] = {}
    state = {k: torch.as_tensor(v.numpy()) for k, v in encoder.items()}
    for i, shop in enumerate(shops):
        t = build_shop_tensors(shop, scenario.features)
        model = build_model(t, scenario.model, scenario.features, seed=scenario.seed)
        model.load_encoder_state(state)
        if restore_local_part(model, grid.context_of(101 + i), None) == "fresh":
            raise RuntimeError(f"{shop.name} has no trained local part after the run (its training failed; see the "
                               "log above), so its test metric would be that of a random local part")
        for task, metrics in evaluate_shop(model, t, "test").items():
            for name, v in metrics.items():
                values.setdefault(f"{task}.{name}", []).append(float(v))
    return {k: float(np.nanmean(v)) for k, v in values.items()}


def plot_utility(rows: list[dict[str, object]], path: Path) -> Path:
    """Task metric against epsilon (no-DP rows drawn as horizontal lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    dp = [r for r in rows if r["protection"] == "central DP"]
    if dp:
        ax.plot([r["epsilon"] for r in dp], [r["value"] for r in dp], "o-", label="central DP")
        for r in dp:
            ax.annotate(f"z={r['noise_multiplier']}", (r["epsilon"], r["value"]), fontsize=7)
    both = [r for r in rows if r["protection"] == "SecAgg+ and central DP"]
    if both:
        ax.plot([r["epsilon"] for r in both], [r["value"] for r in both], "s--", label="SecAgg+ and central DP")
    flat_rows = [r for r in rows if r["protection"] not in ("central DP", "SecAgg+ and central DP")]
    for r, style in zip(flat_rows, ("--", ":", "-.", (0, (1, 3))), strict=False):
        ax.axhline(float(r["value"]), linestyle=style, color="grey", label=str(r["protection"]))
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (shop level, delta fixed)")
    ax.set_ylabel(str(rows[0]["metric"]) if rows else "")
    ax.legend(fontsize=8)
    ax.set_title("Privacy-utility: test metric against the privacy spent (epsilon)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
