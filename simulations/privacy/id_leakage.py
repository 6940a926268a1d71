"""User IDs in outgoing messages: every byte of every reply in a plain and a SecAgg+ round, scanned."""

from __future__ import annotations

import itertools
from pathlib import Path

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.secure import SecAggSettings, run_secure_federation
from server.server_app import FederationSettings, initial_encoder
from shared.privacy.attacks import user_id_leakage
from shared.scenario import load_scenario
from simulations.privacy.in_process_grid import InProcessGrid, nodes


def payload_values(content: RecordDict) -> dict[str, object]:
    """Every key and value of a message, flattened, for ID scanning (arrays as raw bytes)."""
    out: dict[str, object] = {}
    for name, rec in content.array_records.items():
        for k, a in rec.items():
            out[f"{name}/{k}"] = a.numpy()
    for name, rec in itertools.chain(content.metric_records.items(), content.config_records.items()):
        for k, v in rec.items():
            out[f"{name}/{k}"] = b"".join(v) if isinstance(v, list) and v and isinstance(v[0], bytes) else v
    return out


def user_id_scan(scenario_path: Path, n_shops: int, run_dir: Path, *, max_steps: int = 2) -> dict[str, float]:
    """Run one plain round (main ClientApp) and one SecAgg+ round over real shops; share of user IDs in replies."""
    from client.client_app import app as main_app
    from client.secure_client import secure_app

    scenario = load_scenario(str(scenario_path))
    shops = scenario.training_shops()[:n_shops]
    ids = [str(u) for s in shops for u in s.interactions["user_id"].unique()]
    run_config = {"scenario": str(scenario_path), "max-steps": max_steps, "run-dir": str(run_dir / "id-scan")}
    out: dict[str, float] = {}

    plain = InProcessGrid(main_app, nodes(len(shops)), run_config=run_config)
    strategy = FedAvg(min_available_nodes=len(shops), min_train_nodes=len(shops), min_evaluate_nodes=len(shops))
    strategy.start(grid=plain, initial_arrays=initial_encoder(scenario), num_rounds=1,
                   train_config=ConfigRecord(run_config))
    out["plain"] = user_id_leakage([payload_values(r.content) for r in plain.received if r.content], ids)
    out["plain_replies"] = float(sum(r.content is not None for r in plain.received))

    secure = InProcessGrid(secure_app, nodes(len(shops)), run_config=run_config)
    settings = FederationSettings(scenario=str(scenario_path), num_server_rounds=1, run_dir=str(run_dir / "id-scan"),
                                  min_shops=2, max_steps=max_steps)
    run_secure_federation(secure, Context(1, 0, {}, RecordDict(), {}), settings, SecAggSettings(),
                          shop_names=[s.name for s in shops])
    out["secagg"] = user_id_leakage([payload_values(r.content) for r in secure.received if r.content], ids)
    out["secagg_replies"] = float(sum(r.content is not None for r in secure.received))
    failed = [r for r in plain.received + secure.received if r.content is None]
    if failed:  # an error reply carries nothing to scan, so a zero share would prove nothing
        raise RuntimeError(f"{len(failed)} shop replies in the user-ID scan were errors ({failed[0].error}); "
                           "fix the shop failure (see the log above) and rerun")
    out["user_ids"] = float(len(ids))
    return out
