"""`run_privacy_eval`: every privacy attack on a scenario, the privacy-utility rows, and the report."""

from __future__ import annotations

from pathlib import Path

from shared.scenario import load_scenario
from simulations.privacy.eval_config import (
    PrivacyEvalConfig,
    eval_overrides,
    property_world_overrides,
    write_eval_scenario,
)
from simulations.privacy.id_leakage import user_id_scan
from simulations.privacy.membership import membership_inference
from simulations.privacy.property_leakage import property_and_product_leakage
from simulations.privacy.report import write_report
from simulations.privacy.utility import privacy_utility


def run_privacy_eval(scenario_name: str, run_dir: Path, cfg: PrivacyEvalConfig | None = None) -> Path:
    """Every attack on ``scenario_name``; writes privacy.md (+ json, plot) into ``run_dir``.

    MIA runs on the training shop whose user count is closest to 300: enough users for
    meaningful CIs, small enough to overfit and to train with per-user DP-SGD in minutes.
    """
    cfg = cfg or PrivacyEvalConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(scenario_name, eval_overrides(scenario_name))
    shops = scenario.training_shops()
    shop = min(shops, key=lambda sh: abs(sh.interactions["user_id"].nunique() - 300))
    mia = membership_inference(cfg, scenario, shop)
    prop = property_and_product_leakage(cfg, run_dir)
    world = write_eval_scenario("default", property_world_overrides(4), run_dir / "id-scan-scenario.toml")
    ids = user_id_scan(world, 3, run_dir)
    # The scenario's own shops (small model): utility is that of the scenario being evaluated.
    utility_world = write_eval_scenario(scenario_name, eval_overrides(scenario_name), run_dir / "utility-scenario.toml")
    utility = privacy_utility(cfg, utility_world, run_dir)
    return write_report(run_dir, prop, mia, ids, utility)
