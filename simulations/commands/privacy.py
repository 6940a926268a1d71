"""`fedshop privacy SCENARIO`: membership, property and ID-leakage attacks, written to the run's privacy.md."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `privacy` command to the root app."""

    @app.command("privacy")
    def privacy(
        scenario: str = typer.Argument("default", help="Scenario name or path to a scenario TOML."),
        runs: Path = typer.Option(Path("runs"), help="Folder that receives the run directory."),
        small: bool = typer.Option(False, help="Tiny settings (seconds): for smoke runs."),
        property_shops: int = typer.Option(0, min=0, help="Target shops of property inference (0 = default 60)."),
        shadow_shops: int = typer.Option(0, min=0, help="Shadow shops of the property meta-classifier (0: 120)."),
        rounds: int = typer.Option(0, min=0, help="Federated rounds per privacy-utility row (0 = default 10)."),
        steps: int = typer.Option(0, min=0, help="Cap on local steps per shop and round, privacy-utility (0: 50)."),
        dpsgd_noise: float = typer.Option(0.0, min=0.0, help="Noise multiplier of user-level DP-SGD (0: 1.0)."),
        seed: int = typer.Option(0, min=0, help="Seed of user splits, training and bootstraps."),
    ) -> None:
        """Attack a scenario's shops and report what leaks, with and without SecAgg+ and DP."""
        from simulations.options import scenario_or_exit

        scenario_or_exit(scenario, load_shops=False)  # a bad scenario: its error, before any run directory
        from simulations.exits import failures_as_messages
        from simulations.privacy.eval_config import PrivacyEvalConfig
        from simulations.privacy.run import run_privacy_eval
        from simulations.rundir import new_run_dir, write_run_info

        cfg = PrivacyEvalConfig.small() if small else PrivacyEvalConfig()
        cfg = replace(cfg, seed=seed, n_property_shops=property_shops or cfg.n_property_shops,
                      n_shadow_shops=shadow_shops or cfg.n_shadow_shops, rounds=rounds or cfg.rounds,
                      utility_steps=steps or cfg.utility_steps, dpsgd_noise=dpsgd_noise or cfg.dpsgd_noise)
        run_dir = new_run_dir(runs, f"privacy-{Path(scenario).stem}")
        write_run_info(run_dir, {"command": "privacy", "scenario": scenario, "eval": cfg.__dict__})
        with failures_as_messages(partial=run_dir):  # a failed federation or attack: a message and exit 1
            report = run_privacy_eval(scenario, run_dir, cfg)
        typer.echo(report.read_text(encoding="utf-8"))
        typer.echo(f"written: {report}")
