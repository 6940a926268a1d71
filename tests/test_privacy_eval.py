"""The privacy evaluation on real (small) synthetic shops: property inference, product rows, user IDs, report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from simulations.privacy_eval import (
    PrivacyEvalConfig,
    property_and_product_leakage,
    property_world_overrides,
    user_id_scan,
    write_eval_scenario,
)


@pytest.fixture(autouse=True, scope="module")
def _quiet_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)
    torch.set_num_threads(before)


def test_property_inference_and_product_rows_in_a_small_world(tmp_path: Path) -> None:
    out = property_and_product_leakage(PrivacyEvalConfig.small(), tmp_path)
    assert out["n_shops"] == 20
    auc_plain, _ = out["auc_plain"]
    auc_secagg, _ = out["auc_secagg"]
    assert auc_plain > 0.55  # individual updates tell the coordinator something about a shop's catalogue
    assert auc_secagg < auc_plain  # masked vectors do not
    leak = out["product_leakage"]
    individual, union = leak["none (individual update)"], leak["SecAgg+ (aggregate only)"]
    dp = leak["central DP z=1.0"]
    assert individual["precision"] > 0.8 and individual["recall"] > 0.2  # its rows are readable and its own
    assert union["precision"] < 0.2  # only the union: rows are no longer attributable to the shop
    assert dp["precision"] < 0.05  # noise moves every row


def test_no_user_id_leaves_a_shop_plain_or_secagg(tmp_path: Path) -> None:
    scenario = write_eval_scenario("default", property_world_overrides(4), tmp_path / "eval.toml")
    ids = user_id_scan(scenario, 3, tmp_path)
    assert ids["user_ids"] > 100
    assert ids["plain_replies"] == 3 and ids["secagg_replies"] >= 12  # 4 SecAgg+ stages x 3 shops (+ evaluate)
    assert ids["plain"] == 0.0 and ids["secagg"] == 0.0


def test_privacy_command_registers() -> None:
    import typer
    from typer.testing import CliRunner

    from simulations.commands import privacy

    app = typer.Typer()
    privacy.register(app)

    @app.command("noop")
    def noop() -> None:
        """Second command so Typer keeps sub-command names."""

    result = CliRunner().invoke(app, ["privacy", "--help"])
    assert result.exit_code == 0 and "SCENARIO" in result.output.upper() and "--small" in result.output
