"""A whole federation on one machine's loopback (coordinator + N merchants), for tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from simulations.deploy.certs import CertPaths, write_certs
from simulations.deploy.coordinator import Coordinator, register_merchant, start_coordinator, stop_coordinator
from simulations.deploy.merchant import Merchant, start_merchant, stop_merchant, supernode_dir

_TINY_SCENARIO = """\
name = "{name}"
seed = 0
[data]  # in a deployment the coordinator holds no shop data: each SuperNode reads its own shop-dir
source = "shop-dirs"
paths = {paths}
[transfer]
late_joiners = []  # so a merchant's ClientApp never loads the other shops' directories
[features]
hash_buckets = 512
product_buckets = 512
history_len = 5
[model]
embed_dim = 8
expert_dim = 16
tower_dim = 8
n_experts = 2
[train]
batch_size = 256
[federation]
rounds = {rounds}
min_shops = 2
round_timeout = {round_timeout}  # only a message pulled by a node that then died waits this long
"""


def tiny_scenario(paths: Iterable[str | Path] = (), *, name: str = "deploy-tiny", rounds: int = 3,
                  round_timeout: float = 120.0) -> str:
    """TOML of the tiny scenario the loopback e2e test and the latency benchmark share.

    ``paths`` lists the shop folders (needed by a simulation of it; a deployment leaves it empty).
    """
    return _TINY_SCENARIO.format(name=name, paths=json.dumps([str(p) for p in paths]), rounds=int(rounds),
                                 round_timeout=float(round_timeout))


def write_tiny_shops(root: str | Path, copies: Iterable[str] = ()) -> list[str]:
    """Three tiny synthetic shops as merchant folders ``root/<shop>/shop``; returns their names.

    Each name in ``copies`` gets a copy of the first shop (for merchants that are refused anyway).
    """
    import shutil

    from shared.datasets.synthetic import WorldConfig, generate_world, write_world

    root = Path(root)
    world = generate_world(WorldConfig(n_shops=3, n_late_joiners=0, max_impressions=2500, min_impressions=800,
                                       n_small_shops=1))
    write_world(world, root / "world")
    shops = [s.name for s in world.shops]
    for name in shops:
        (root / name).mkdir(parents=True)
        (root / "world" / name).rename(root / name / "shop")
    for name in copies:
        shutil.copytree(root / shops[0] / "shop", root / name / "shop")
    return shops


@dataclass
class LoopbackFederation:
    """Handles to a running loopback federation; shop ``name`` lives in ``root/name/{shop,state}``."""

    root: Path
    coordinator: Coordinator
    certs: CertPaths
    env: dict[str, str] | None = None
    merchants: dict[str, Merchant] = field(default_factory=dict)
    heartbeat_interval: float = 10.0  # Flower's minimum: a killed merchant is let back in within 20 s
    isolation: str = "process"  # merchant start's default (long-lived ClientApp); "subprocess" = Flower's
    scenario: Path | None = None  # the scenario file every merchant pins (`merchant start --allow-scenario-path`)

    def shop_dir(self, name: str) -> Path:
        """The merchant's data folder."""
        return self.root / name / "shop"

    def state_dir(self, name: str) -> Path:
        """The merchant's state folder (local part, SuperNode files)."""
        return self.root / name / "state"

    def start(self, name: str, *, key: str | None = None, ca: bool = True, validate: bool = True,
              retry_for: float = 0.0, shop_index: int | None = None) -> Merchant:
        """Start (or restart) merchant ``name``'s SuperNode, using ``key``'s key pair (default: its own).

        ``shop_index`` defaults to the merchant's position among ``certs`` names, so metrics say shop-<i>.
        """
        if shop_index is None:
            shop_index = list(self.certs.merchant_keys).index(name)
        merchant = start_merchant(self.shop_dir(name), self.state_dir(name), self.coordinator.address,
                                  ca=self.certs.ca_cert if ca else None, key=self.certs.merchant_keys[key or name][0],
                                  trusted_entities=self.certs.trusted_entities,
                                  shop_index=shop_index, env=self.env, validate=validate, timeout=30,
                                  retry_for=retry_for, heartbeat_interval=self.heartbeat_interval,
                                  isolation=self.isolation,
                                  policy={"allow-scenario-path": str(self.scenario)} if self.scenario else None)
        self.merchants[name] = merchant
        return merchant

    def stop_all(self) -> None:
        """Stop every SuperNode started under ``root`` and the coordinator, by recorded PID."""
        for name in self.certs.merchant_keys:
            if (supernode_dir(self.state_dir(name)) / "supernode.json").exists():
                stop_merchant(self.state_dir(name))
        stop_coordinator(self.coordinator.home)


def fresh_federation_root(root: str | Path, label: str, shops: Iterable[str]) -> tuple[Path, Path]:
    """(``root/label``, its run dir): fresh state folders for ``shops``, data linked from ``root/<shop>/shop``.

    Several loopback runs of the same shops (benchmarks, A/B tests) each get their own state this way.
    """
    fed_root = Path(root) / label
    if fed_root.exists():
        raise RuntimeError(f"{fed_root} exists already: give each run its own label")
    for name in shops:
        (fed_root / name).mkdir(parents=True)
        (fed_root / name / "shop").symlink_to(Path(root) / name / "shop")
    run_dir = fed_root / "run"
    run_dir.mkdir()
    return fed_root, run_dir


@contextlib.contextmanager
def loopback_federation(root: str | Path, shops: list[str], *, extra_keys: tuple[str, ...] = (),
                        env: dict[str, str] | None = None, validate: bool = True,
                        heartbeat_interval: float = 10.0, isolation: str = "process",
                        state_db: bool = False, scenario: str | Path | None = None) -> Iterator[LoopbackFederation]:
    """Certificates, a TLS SuperLink, and one registered, started SuperNode per shop in ``shops``.

    ``scenario``: a scenario file every merchant agrees to load (a deployed shop loads built-in scenarios
    and this one only: `client.merchant_policy`); runs must name it by its resolved absolute path, as
    `fedshop coordinator run` and `merchant start --allow-scenario-path` do.
    ``state_db`` keeps the SuperLink's state in SQLite (`coordinator start --state-db`) instead of memory.
    Shop folders ``root/<shop>/shop`` must exist. ``extra_keys`` get key pairs but are neither registered
    nor started. Everything is stopped by PID on exit, also after errors.
    """
    root = Path(root)
    certs = write_certs(root / "certs", list(shops) + list(extra_keys), force=True)
    coordinator = start_coordinator(root / "coordinator", root / "certs", env=env, state_db=state_db)
    fed = LoopbackFederation(root, coordinator, certs, env, heartbeat_interval=heartbeat_interval,
                             isolation=isolation, scenario=Path(scenario).resolve() if scenario else None)
    try:
        for name in shops:
            register_merchant(coordinator.home, certs.merchant_keys[name][1], name=name,
                              shop_index=list(certs.merchant_keys).index(name))
        with ThreadPoolExecutor(max_workers=len(shops) or 1) as pool:  # SuperNodes start side by side
            for future in [pool.submit(fed.start, name, validate=validate) for name in shops]:
                future.result()
        fed.merchants = {name: fed.merchants[name] for name in shops}  # in the order given
        yield fed
    finally:
        fed.stop_all()
