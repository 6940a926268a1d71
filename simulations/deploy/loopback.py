"""A whole federation on one machine's loopback (coordinator + N merchants), for tests and benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from simulations.deploy.certs import CertPaths, write_certs
from simulations.deploy.coordinator import Coordinator, register_merchant, start_coordinator, stop_coordinator
from simulations.deploy.merchant import Merchant, start_merchant, stop_merchant, supernode_dir


@dataclass
class LoopbackFederation:
    """Handles to a running loopback federation; shop ``name`` lives in ``root/name/{shop,state}``."""

    root: Path
    coordinator: Coordinator
    certs: CertPaths
    env: dict[str, str] | None = None
    merchants: dict[str, Merchant] = field(default_factory=dict)

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
                                  shop_index=shop_index, env=self.env, validate=validate, timeout=30,
                                  retry_for=retry_for)
        self.merchants[name] = merchant
        return merchant

    def stop_all(self) -> None:
        """Stop every SuperNode started under ``root`` and the coordinator, by recorded PID."""
        for name in self.certs.merchant_keys:
            if (supernode_dir(self.state_dir(name)) / "supernode.json").exists():
                stop_merchant(self.state_dir(name))
        stop_coordinator(self.coordinator.home)


@contextlib.contextmanager
def loopback_federation(root: str | Path, shops: list[str], *, extra_keys: tuple[str, ...] = (),
                        env: dict[str, str] | None = None, validate: bool = True) -> Iterator[LoopbackFederation]:
    """Certificates, a TLS SuperLink, and one registered, started SuperNode per shop in ``shops``.

    Shop folders ``root/<shop>/shop`` must exist. ``extra_keys`` get key pairs but are neither registered
    nor started. Everything is stopped by PID on exit, also after errors.
    """
    root = Path(root)
    certs = write_certs(root / "certs", list(shops) + list(extra_keys), force=True)
    coordinator = start_coordinator(root / "coordinator", root / "certs", env=env)
    fed = LoopbackFederation(root, coordinator, certs, env)
    try:
        for name in shops:
            register_merchant(coordinator.home, certs.merchant_keys[name][1], name=name)
            fed.start(name, validate=validate)
        yield fed
    finally:
        fed.stop_all()
