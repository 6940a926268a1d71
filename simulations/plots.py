"""PNG plots of a run directory: per-round curves per shop and method, and final per-task bars.

Matplotlib runs on the Agg backend (no display), and every figure is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from shared.atomic import atomic_write_bytes  # noqa: E402
from simulations.best_rounds import PRIMARY  # noqa: E402

METHOD_ORDER = ("local", "central", "fedavg-all", "fedshop")
CHANCE_AUC = 0.5  # a random ranking's AUC: drawn on every AUC plot, and where AUC bars start


def _shop_label(shop: str, small: set[str]) -> str:
    return f"{shop} (small)" if shop in small else shop


def _ordered(methods: list[str]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_rounds(rows: pd.DataFrame, out_dir: Path, *, split: str = "val", small_shops: Sequence[str] = ()
                ) -> list[Path]:
    """One PNG per task: the primary metric on ``split`` by round, a panel per shop, a line per method.

    Non-federated methods log one point per epoch; with one local epoch per round, epoch and round
    are the same compute. Several seeds are averaged. Small shops' panels say so; AUC panels show chance.
    """
    paths = []
    small = set(small_shops)
    for task, (metric, higher) in PRIMARY.items():
        sel = rows[(rows["task"] == task) & (rows["metric"] == metric) & (rows["split"] == split)]
        sel = sel.dropna(subset=["value"])
        if sel.empty:
            continue
        curves = sel.groupby(["shop", "method", "round"], sort=True)["value"].mean()
        shops = sorted(sel["shop"].unique())
        methods = _ordered(list(sel["method"].unique()))
        cols = min(4, len(shops))
        nrows = int(np.ceil(len(shops) / cols))
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows + 0.5), squeeze=False,
                                 sharex=True, layout="constrained")
        for ax, shop in zip(axes.flat, shops, strict=False):
            for method in methods:
                if (shop, method) in curves.index.droplevel("round"):
                    line = curves.loc[(shop, method)]
                    ax.plot(line.index, line.values, marker="o", markersize=3, label=method)
            if metric == "auc":
                ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1, label="chance (0.5)")
            ax.set_title(_shop_label(shop, small), fontsize=9, fontweight="bold" if shop in small else "normal")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(shops):]:
            ax.set_visible(False)
        handles, labels = axes[0][0].get_legend_handles_labels()  # outside the panels: it hid curves
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
        better = "higher" if higher else "lower"
        fig.suptitle(f"{task}: {split} {metric} by round ({better} is better)", fontsize=11)
        fig.supxlabel("round (epoch for local/central)", fontsize=9)
        fig.supylabel(f"{split} {metric}", fontsize=9)
        paths.append(_save(fig, Path(out_dir) / f"rounds_{task}.png"))
    return paths


def plot_final_bars(final: pd.DataFrame, out_dir: Path, *, small_shops: Sequence[str] = ()) -> list[Path]:
    """One PNG per task: test primary metric at each shop's best-validation round, grouped bars per method.

    The last group is the mean over shops; with several seeds, bars are seed means and whiskers one
    standard deviation across seeds. Bars start at 0, AUC bars at chance (0.5), as the axis label says:
    a baseline fitted to the data would make small differences look large.
    """
    paths = []
    small = set(small_shops)
    for task, (metric, higher) in PRIMARY.items():
        sel = final[(final["task"] == task) & (final["metric"] == metric)].dropna(subset=["value"])
        if sel.empty:
            continue
        if "seed" not in sel:
            sel = sel.assign(seed=0)
        per_seed = sel.pivot_table(index=["seed", "shop"], columns="method", values="value", aggfunc="mean")
        methods = _ordered(list(per_seed.columns))
        per_seed = per_seed[methods]
        means_by_seed = per_seed.groupby(level="seed").mean()  # (seeds, methods): mean over shops
        shop_mean = per_seed.groupby(level="shop").mean()
        shop_std = per_seed.groupby(level="shop").std(ddof=0).fillna(0.0)
        mean = pd.concat([shop_mean, means_by_seed.mean().to_frame("mean").T])
        std = pd.concat([shop_std, means_by_seed.std(ddof=0).fillna(0.0).to_frame("mean").T])
        x = np.arange(len(mean.index))
        width = 0.8 / len(methods)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(x) + 2), 3.6))
        bottom = CHANCE_AUC if metric == "auc" else 0.0  # bars grow from the axis start
        for i, method in enumerate(methods):
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, mean[method] - bottom, width, bottom=bottom,
                   yerr=std[method], label=method, capsize=2 if std[method].any() else 0)
        labels = [_shop_label(str(s), small) for s in mean.index[:-1]] + ["mean over shops"]
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        for tick, shop in zip(ax.get_xticklabels(), mean.index, strict=False):
            if shop in small:
                tick.set_fontweight("bold")
        hi = float(np.nanmax((mean + std).values))
        if metric == "auc":  # below chance (a broken model) the axis extends down, so no bar is hidden
            lo = float(np.nanmin((mean - std).values))
            ax.set_ylim(min(CHANCE_AUC, lo - 0.02), max(hi, CHANCE_AUC + 0.05) + 0.05)
            ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
            ax.set_ylabel(f"test {metric} (bars start at chance, 0.5)")
        else:
            ax.set_ylim(0.0, hi * 1.15 if hi > 0 else 1.0)
            ax.set_ylabel(f"test {metric} (bars start at 0)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes: it hid bars
        better = "higher" if higher else "lower"
        ax.set_title(f"{task}: test {metric} at best-validation round ({better} is better)", fontsize=10)
        paths.append(_save(fig, Path(out_dir) / f"final_{task}.png"))
    return paths
