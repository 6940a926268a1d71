"""Scenarios: one TOML file says where shops come from and every setting of a run.

Flower-free so that the coordinator, the shops' clients and the CLI all resolve a scenario the
same way. Built-in names (``default``, ``movielens-region``, ``movielens-genre``) resolve to
``simulations/scenarios/<name>.toml``; anything else is a path.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.features import FeatureConfig
from shared.model import ModelConfig
from shared.schema import ShopData
from shared.train import TrainConfig

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"
DATA_ENV = {"movielens": "FEDSHOP_MOVIELENS", "amazon": "FEDSHOP_AMAZON"}

FEDERATION_DEFAULTS: dict[str, Any] = {
    "rounds": 10,  # server rounds
    "strategy": "fedavg",  # fedavg | fedavgm | fedprox | fedadam | fedyogi | fedmedian | fedtrimmedavg | krum
    "fraction_train": 1.0,  # share of shops sampled per round
    "min_shops": 2,  # a round needs at least this many replies
    "local_epochs": 1,  # local epochs per round
    "personal_mix": 0.0,  # n0: a shop starts each round from (1-b) global + b own encoder, b = n/(n+n0),
    # and serves its own encoder (docs/federation.md); 0 = off (plain FedAvg start, global encoder served)
    "prox_mu": 0.0,  # FedProx proximal weight (strategy fedprox)
    "server_lr": 0.0,  # FedAdam/FedYogi eta, FedAvgM server lr; 0 = its default (0.1, 0.1, 1.0)
    "server_momentum": 0.0,  # FedAvgM server momentum
    "join_round": 0,  # round at which late joiners join a running federation (0 = never)
    "warmup_rounds": 1,  # rounds a joining shop trains its local part with the encoder frozen
    "objective": "fedavg",  # fedavg | meta (Reptile-style: short inner loops, see docs)
    "meta_inner_steps": 20,  # inner steps per round with objective = meta
    "meta_outer_step": 1.0,  # Reptile outer step size applied by each shop to its reply
    "round_timeout": 600.0,  # seconds before a shop's reply counts as missing
    "compression": "none",  # none | fp16 | sparse-fp16 | sparse-int8: encoder messages (docs/federation.md)
    # privacy (docs/privacy.md): SecAgg+, central DP over shops, DP-SGD inside each shop
    "secure_aggregation": False,  # Flower's SecAgg+: the coordinator sees only the sum of the encoders
    "secagg_num_shares": 1.0,  # <= 1: share of shops each key is shared with; > 1: a count
    "secagg_clipping_range": 8.0,  # encoder values are clipped to +-this before quantisation
    "secagg_weighting": "uniform",  # uniform | examples (then raise secagg_max_weight to the largest shop)
    "secagg_max_weight": 1.0,
    "dp_noise_multiplier": 0.0,  # central DP noise z (> 0 turns it on); unit of privacy: a shop
    "dp_clipping_norm": 1.0,  # S: bound on each shop's encoder update
    "dp_delta": 1e-5,
    "max_epsilon": 0.0,  # central DP budget: the run stops before exceeding it (0 = none)
    "dpsgd_noise_multiplier": 0.0,  # DP-SGD in every shop (> 0 turns it on); unit: dpsgd_unit
    "dpsgd_clipping_norm": 1.0,
    "dpsgd_unit": "user",  # user | record
    "dpsgd_sample_rate": 0.05,
    "dpsgd_steps": 0,  # steps per round; 0 = one expected pass over the units
    "dpsgd_max_epsilon": 0.0,  # a shop refuses a round past this (0 = none)
}


class ScenarioError(ValueError):
    """A scenario file that cannot be used: names the file, the key and the fix."""


def _dataclass_from(cls: type, table: dict, where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {unknown}. Fix: use one of {sorted(known)}")
    return cls(**table)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.replace("-", "_").split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


@dataclass
class Scenario:
    """A resolved scenario: data source, feature/model/train settings, federation and transfer."""

    name: str
    seed: int
    raw: dict
    features: FeatureConfig
    model: ModelConfig
    train: TrainConfig
    federation: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def data(self) -> dict:
        """The ``[data]`` table."""
        return self.raw.get("data", {})

    def shops(self) -> list[ShopData]:
        """All shops of the scenario (late joiners included), deterministic; cached per process."""
        return list(_load_shops(json.dumps(self.data, sort_keys=True), self.seed))

    @property
    def late_joiners(self) -> list[str]:
        """Shops held out of federated training (they join later: transfer)."""
        names = self.transfer.get("late_joiners")
        if names is not None:
            return list(names)
        return [s.name for s in self.shops() if s.meta.get("late_joiner")]

    def training_shops(self) -> list[ShopData]:
        """The shops that take part in federated training from round 1."""
        late = set(self.late_joiners)
        return [s for s in self.shops() if s.name not in late]

    def federation_shops(self) -> list[ShopData]:
        """Shops that get a node in a federated run: training shops, then late joiners if ``join_round`` > 0.

        A node's ``partition-id`` indexes this list, so training shops keep their index either way.
        """
        joiners = self.joining_shops() if int(self.federation.get("join_round", 0)) > 0 else []
        return self.training_shops() + joiners

    def joining_shops(self) -> list[ShopData]:
        """The late joiners, in scenario order."""
        late = set(self.late_joiners)
        return [s for s in self.shops() if s.name in late]


@functools.lru_cache(maxsize=4)
def _load_shops(data_json: str, seed: int) -> tuple[ShopData, ...]:
    data = json.loads(data_json)
    source = data.get("source", "synthetic")
    if source == "synthetic":
        from shared.datasets.synthetic import WorldConfig, generate_world

        table = {"seed": seed, **data.get("synthetic", {})}
        world = generate_world(_dataclass_from(WorldConfig, table, "[data.synthetic]"))
        late = set(world.late_joiners)
        for shop in world.shops:
            shop.meta["late_joiner"] = shop.name in late
        return tuple(world.shops)
    if source == "movielens":
        from shared.datasets.movielens import load_movielens

        path = _data_path(data, "movielens")
        shops = load_movielens(path, split_by=data.get("split_by", "region"), seed=seed,
                               negatives_per_positive=int(data.get("negatives_per_positive", 1)))
        return tuple(shops)
    if source == "amazon":
        from shared.datasets.amazon import load_amazon_ratings

        path = _data_path(data, "amazon")
        return tuple(load_amazon_ratings(path, seed=seed, n_shops=int(data.get("n_shops", 1))))
    if source == "shop-dirs":
        from shared.schema import check_unique_names, load_shop_dir

        shops = tuple(load_shop_dir(p) for p in data.get("paths", []))
        check_unique_names(shops)  # one name twice would merge two shops' metrics and state
        return shops
    raise ScenarioError(f"[data] source = {source!r} is unknown. Fix: use synthetic, movielens, amazon or shop-dirs")


def _data_path(data: dict, source: str) -> Path:
    env = DATA_ENV[source]
    path = os.environ.get(env) or data.get("path")
    if not path:
        raise ScenarioError(f"[data] needs a path to the {source} files. Fix: set `path` in the scenario or "
                            f"export {env}=/path/to/data")
    p = Path(path)
    if not p.is_absolute():
        p = (SCENARIO_DIR.parent.parent / p).resolve()
    if not p.exists():
        raise ScenarioError(f"{source} data not found at {p}. Fix: point `path` in the scenario or {env} at a copy")
    return p


def resolve_scenario_path(name_or_path: str | Path) -> Path:
    """The TOML file for a built-in scenario name or a path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise ScenarioError(f"scenario file {p} does not exist")
        return p
    builtin = SCENARIO_DIR / f"{name_or_path}.toml"
    if not builtin.exists():
        names = sorted(f.stem for f in SCENARIO_DIR.glob("*.toml"))
        raise ScenarioError(f"no scenario named {name_or_path!r}. Fix: use one of {names} or a path to a .toml")
    return builtin


def load_scenario(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read a scenario and apply dotted overrides such as ``{"federation.rounds": 3}``."""
    path = resolve_scenario_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc}). Fix the syntax at that line") from exc
    return scenario_from_dict(raw, overrides, path=path)


def scenario_from_dict(raw: dict, overrides: dict[str, Any] | None = None, *, path: Path | None = None) -> Scenario:
    """Resolve a scenario dict (as read from TOML) into typed settings."""
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    where = str(path or "scenario")
    seed = int(raw.get("seed", 0))
    feats = _dataclass_from(FeatureConfig, {"seed": seed, **raw.get("features", {})}, f"{where} [features]")
    model = _dataclass_from(ModelConfig, raw.get("model", {}), f"{where} [model]")
    if "epochs" in raw.get("train", {}):
        raise ScenarioError(f"{where} [train]: `epochs` is not read (a federated round, local-only and the oracle "
                            "all train [federation] local_epochs per round). Fix: remove it and set "
                            "federation.local_epochs instead")
    train = _dataclass_from(TrainConfig, {"seed": seed, **raw.get("train", {})}, f"{where} [train]")
    fed_table = raw.get("federation", {})
    unknown = sorted(set(fed_table) - set(FEDERATION_DEFAULTS))
    if unknown:
        raise ScenarioError(f"{where} [federation]: unknown key(s) {unknown}. Fix: use {sorted(FEDERATION_DEFAULTS)}")
    federation = {**FEDERATION_DEFAULTS, **fed_table}
    if float(federation["personal_mix"]) < 0:
        raise ScenarioError(f"{where} [federation]: personal_mix = {federation['personal_mix']} is negative. Fix: "
                            "give n0 >= 0 in training rows (0 turns the personal mix off; default.toml uses 20000)")
    return Scenario(name=str(raw.get("name", path.stem if path else "scenario")), seed=seed, raw=raw,
                    features=feats, model=model, train=train, federation=federation,
                    transfer=dict(raw.get("transfer", {})), path=path)
