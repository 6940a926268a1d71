"""Scenarios: one TOML file says where shops come from and every setting of a run.

Flower-free so that the coordinator, the shops' clients and the CLI all resolve a scenario the
same way. Built-in names (``default``, ``movielens-region``, ``movielens-genre``) resolve to
``simulations/scenarios/<name>.toml``; anything else is a path.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.features import FeatureConfig
from shared.model import ModelConfig
from shared.schema import ShopData
from shared.settings import FEDERATION_DEFAULTS, FederationTable, ScenarioError, validate_scenario
from shared.train import TrainConfig
from shared.world_share import read_shared_world, sharing_enabled, write_shared_world

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"
DATA_ENV = {"movielens": "FEDSHOP_MOVIELENS", "amazon": "FEDSHOP_AMAZON"}

# Every key, default and range lives in the schema (shared/settings.py); re-exported for old imports.
__all__ = ["FEDERATION_DEFAULTS", "Scenario", "ScenarioError", "load_scenario", "resolve_scenario_path",
           "scenario_from_dict", "world_key"]


def world_key(data: dict, seed: int) -> str:
    """sha256 of the settings that define a scenario's shops ([data] with its resolved seed, and the seed).

    Two scenarios with the same key load the same shops, so a world built for one serves the other.
    """
    text = json.dumps({"data": data, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.replace("-", "_").split(".")
    if not all(parts):
        raise ScenarioError(f"override {key!r} has an empty part. Fix: write table.key=value, e.g. federation.rounds=3")
    node = raw
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ScenarioError(f"override {key!r}: {'.'.join(parts[:i + 1])} is a value, not a table. Fix: set "
                                f"{'.'.join(parts[:i + 1])}=... itself, or a key of a table such as federation.rounds")
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
    federation: dict = field(default_factory=dict)  # the schema's validated tables, every key present
    transfer: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # [data], [data.synthetic] seed resolved as in [features]
    path: Path | None = None  # ``raw`` is the file as written (for copies); read settings from the tables

    def shops(self) -> list[ShopData]:
        """All shops of the scenario (late joiners included), deterministic; cached per process."""
        return list(_load_shops(json.dumps(self.data, sort_keys=True), self.seed))

    @property
    def world_key(self) -> str:
        """Hash of the world-defining settings (`world_key`): equal keys, equal shops."""
        return world_key(self.data, self.seed)

    def share_world(self, run_dir: str | Path) -> dict[str, str] | None:
        """Write this scenario's synthetic world into ``run_dir`` for child processes; None when not shared.

        Only synthetic worlds are shared (they are generated from settings; real data is read from
        files that may differ per machine), and only while `FEDSHOP_WORLD_CACHE` is not "0".
        Returns the `FEDSHOP_SHARED_WORLD` descriptor (`shared.world_share.shared_world_env` exports it).
        """
        if self.data.get("source") != "synthetic" or not sharing_enabled():
            return None
        return write_shared_world(tuple(self.shops()), run_dir, self.world_key)

    @property
    def merchant_held(self) -> bool:
        """True when the merchants hold the shops: a shop-dirs source that lists no paths (a deployment's
        coordinator scenario; each merchant brings its own `merchant start --shop-dir`)."""
        return self.data.get("source") == "shop-dirs" and not self.data.get("paths")

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
        joiners = self.joining_shops() if self.federation["join_round"] > 0 else []
        return self.training_shops() + joiners

    def joining_shops(self) -> list[ShopData]:
        """The late joiners, in scenario order."""
        late = set(self.late_joiners)
        return [s for s in self.shops() if s.name in late]

    def check_federation(self, rounds: int | None = None) -> None:
        """Refuse a federation that cannot run as configured, before anything starts (a `ScenarioError`).

        The schema checks each key alone; this checks them against the shops (`shared.federation_plan`):
        `min_shops` against the shops in the federation and those that train from round 1, `join_round`
        against the rounds, SecAgg+ against the shops. ``rounds`` is the run's round count when it differs
        from `federation.rounds` (`--rounds`). Checks on every call and remembers nothing: a caller that has
        checked (`fedshop simulate`/`compare`) says so to `run_federated` (``checked=True``) instead.
        """
        from shared.federation_plan import ShopCount, check_federation_plan

        counts = ShopCount(first=len(self.training_shops()), joiners=len(self.joining_shops()))
        check_federation_plan(FederationTable(**self.federation), counts, str(self.path or self.name), rounds=rounds)


@functools.lru_cache(maxsize=4)
def _load_shops(data_json: str, seed: int) -> tuple[ShopData, ...]:
    data = json.loads(data_json)  # validated by the schema: every key present, ranges checked
    source = data["source"]
    if source == "synthetic":
        shared = read_shared_world(world_key(data, seed))  # built once by the driver (shared/world_share.py)
        if shared is not None:
            return tuple(shared)
        from shared.datasets.synthetic import WorldConfig, generate_world

        world = generate_world(WorldConfig(**data["synthetic"]))
        late = set(world.late_joiners)
        for shop in world.shops:
            shop.meta["late_joiner"] = shop.name in late
        return tuple(world.shops)
    if source == "movielens":
        from shared.datasets.movielens import load_movielens

        path = _data_path(data, "movielens")
        shops = load_movielens(path, split_by=data["split_by"], seed=seed,
                               negatives_per_positive=data["negatives_per_positive"])
        return tuple(shops)
    if source == "amazon":
        from shared.datasets.amazon import load_amazon_ratings

        path = _data_path(data, "amazon")
        return tuple(load_amazon_ratings(path, seed=seed, n_shops=data["n_shops"]))
    from shared.schema import check_unique_names, load_shop_dir  # source == "shop-dirs" (the schema's last word)

    shops = tuple(load_shop_dir(p) for p in data["paths"])
    check_unique_names(shops)  # one name twice would merge two shops' metrics and state
    return shops


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
        try:
            _set_dotted(raw, key, value)
        except ScenarioError as exc:  # name the scenario the override was meant for
            raise ScenarioError(f"{path or 'scenario'}: {exc}") from None
    try:  # every table, key and range: a ScenarioError naming file, key, value and fix
        settings = validate_scenario(raw, path)
    except ScenarioError as exc:
        if not overrides:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise ScenarioError(f"{exc}\n(with the overrides {given})") from None
    seed = settings.seed
    # The scenario's seed flows into [features] and [train] unless a table sets its own.
    feats = FeatureConfig(**{**settings.features.model_dump(), "seed": raw.get("features", {}).get("seed", seed)})
    model = ModelConfig(**settings.model.model_dump())
    train = TrainConfig(**{**settings.train.model_dump(), "seed": raw.get("train", {}).get("seed", seed)})
    data = settings.data.model_dump()
    if "seed" not in settings.data.synthetic.model_fields_set:  # the world's seed, unless [data.synthetic] sets one
        data["synthetic"]["seed"] = seed
    return Scenario(name=str(raw.get("name", path.stem if path else "scenario")), seed=seed, raw=raw,
                    features=feats, model=model, train=train, federation=settings.federation.model_dump(),
                    transfer=settings.transfer.model_dump(), data=data, path=path)
