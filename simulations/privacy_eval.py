"""Privacy evaluations of a scenario: what leaks, measured by attacks, and what protection costs.

* `LoopbackGrid`: a Flower `Grid` that delivers each message to a ClientApp in this process and
  records everything the coordinator receives. Flower's simulation engine (Ray) is the path for
  real runs; the attacks and the SecAgg+ tests need the coordinator's exact view, dropouts on
  demand, and no per-message process start, which an in-process grid gives.
* membership inference (user level) on a shop's model, with an overfit positive control;
* property inference from individual encoder updates across many small synthetic shops;
* ID leakage: user IDs in outgoing messages, sold products in global-product embedding rows;
* a privacy-utility table and plot over noise multipliers, with and without SecAgg+.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tomli_w
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.task_identity import TaskIdentity

from client.secure_client import make_secure_app
from server.checkpoint import latest_checkpoint
from server.secure import SecAggSettings, run_secure_federation
from server.server_app import FederationSettings, initial_encoder
from shared.atomic import atomic_write_bytes, atomic_write_text
from shared.features import ShopTensors, build_shop_tensors, hash_field
from shared.model import ShopModel, build_model
from shared.privacy.attacks import (
    AttackResult,
    category_features,
    dp_violations,
    evaluate_attack,
    loss_threshold_scores,
    per_user_mean,
    product_leakage,
    reference_model_scores,
    shadow_property_attack,
    user_id_leakage,
)
from shared.privacy.dpsgd import DPSGDConfig, impression_row_loss, privacy_report, train_dpsgd_shop
from shared.scenario import Scenario, load_scenario
from shared.schema import ShopData
from shared.train import evaluate_shop, train_shop

logger = logging.getLogger(__name__)

ERROR_CODE_CLIENT_EXCEPTION = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION

# (node_id, message) -> True to drop the message (the node "goes offline" from then on).
DropRule = Callable[[int, Message], bool]


@dataclass
class Received:
    """One reply as the coordinator got it (deep copy)."""

    node_id: int
    message_type: str
    group_id: str
    content: RecordDict | None
    error: str | None


@dataclass
class LoopbackGrid(Grid):
    """In-process Grid: each node is a ClientApp call with its own persistent Context."""

    app: ClientApp
    node_configs: dict[int, dict]
    run_config: dict = field(default_factory=dict)
    drop: DropRule | None = None
    received: list[Received] = field(default_factory=list)
    seconds_in_clients: float = 0.0

    def __post_init__(self) -> None:
        # Messages take their sender identity from the process; outside a Flower runtime nobody set it.
        for attr, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 0)):
            if getattr(TaskIdentity, attr) is None:
                setattr(TaskIdentity, attr, value)
        self._contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                                       run_config=dict(self.run_config)) for nid, cfg in self.node_configs.items()}
        self._offline: set[int] = set()
        self._replies: dict[str, Message] = {}
        self._run = Run(run_id=1, fab_id="", fab_version="", fab_hash="", override_config=dict(self.run_config),
                        pending_at="", starting_at="", running_at="", finished_at="",
                        status=RunStatus("running", "", ""), flwr_aid="", federation_id="", primary_task_id=None,
                        bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0)

    def set_run(self, run: Run) -> None:
        """Use ``run`` as the current run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The current run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message from the coordinator."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Nodes still online."""
        return [nid for nid in self._contexts if nid not in self._offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now (a copy, as if serialised); keep replies for `pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            nid = msg.metadata.dst_node_id
            if nid in self._offline or (self.drop is not None and self.drop(nid, msg)):
                self._offline.add(nid)
                continue
            sent = Message(copy.deepcopy(msg.content), nid, msg.metadata.message_type,
                           group_id=msg.metadata.group_id)
            sent.metadata.__dict__["_message_id"] = msg.metadata.message_id
            start = time.perf_counter()
            try:
                reply = self.app(sent, self._contexts[nid])
            except Exception as exc:  # a shop's failure becomes an error reply, as in Flower's runtime
                logger.warning("node %d raised %s", nid, exc)
                reply = Message(Error(ERROR_CODE_CLIENT_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=sent)
            self.seconds_in_clients += time.perf_counter() - start
            content = None if reply.has_error() else copy.deepcopy(reply.content)
            self.received.append(Received(nid, msg.metadata.message_type, msg.metadata.group_id, content,
                                          reply.error.reason if reply.has_error() else None))
            out = Message(content, reply_to=msg) if content is not None else Message(reply.error, reply_to=msg)
            self._replies[msg.metadata.message_id] = out
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to the given message IDs (each delivered once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def context_of(self, node_id: int) -> Context:
        """The node's persistent context (its local state lives here between rounds)."""
        return self._contexts[node_id]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and immediately pull: every online node answers synchronously."""
        return list(self.pull_messages(self.push_messages(list(messages))))


def nodes(n: int) -> dict[int, dict]:
    """Node configs for ``n`` simulated shops (node IDs 101.., `partition-id` 0..n-1; ID 1 is the SuperLink's)."""
    return {101 + i: {"partition-id": i} for i in range(n)}



# ============================================================================= evaluation settings
@dataclass
class PrivacyEvalConfig:
    """Sizes of the privacy evaluation; `small()` is what the tests use."""

    n_property_shops: int = 60  # target shops of property inference (>= 50 for the report)
    n_shadow_shops: int = 120  # shadow shops (another synthetic world) the meta-classifier learns from
    property_steps: int = 10  # cap on local steps per shop update (one local epoch of these shops is 3-5 steps)
    mia_users: int = 0  # users of the attacked shop used (0 = all); split into members/non-members/reference
    overfit_epochs: int = 30  # positive control: many epochs, no regularisation
    normal_epochs: int = 1
    reference_models: int = 2  # offline LiRA reference (OUT) models
    dpsgd_noise: float = 1.0  # user-level DP-SGD on the attacked shop
    dpsgd_sample_rate: float = 0.05
    dpsgd_rounds: int = 10  # DP-SGD rounds; each ceil(1/q) steps
    central_noise: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0, 2.0)  # central DP noise multipliers (0 = no DP)
    clipping_norm: float = 1.0
    delta: float = 1e-5
    rounds: int = 10  # federated rounds per privacy-utility point
    utility_steps: int = 50  # cap on local steps per shop and round in the privacy-utility runs
    utility_shops: int = 8  # shops of the default world in the privacy-utility runs
    secagg: bool = True  # also measure the SecAgg+ rows
    seed: int = 0

    @classmethod
    def small(cls) -> PrivacyEvalConfig:
        """A few seconds' worth: for tests and smoke runs."""
        return cls(n_property_shops=30, n_shadow_shops=60, mia_users=150, overfit_epochs=15,
                   reference_models=1, dpsgd_rounds=2, central_noise=(0.0, 1.0), rounds=1, utility_steps=20)


# Small model and hash spaces: privacy evaluations train many models; the attacks need no big ones.
EVAL_OVERRIDES = {"features.hash_buckets": 2048, "features.product_buckets": 4096, "model.embed_dim": 8,
                  "model.expert_dim": 16, "model.tower_dim": 8, "model.n_experts": 2}


def eval_overrides(scenario_name: str) -> dict:
    """The small evaluation model, no personal mix, and for a synthetic world no evaluation top-up.

    The top-up only sharpens utility metrics; the attacks and their documented numbers use the
    world as generated, and it would slow every attack's training and scoring.
    """
    synthetic = load_scenario(scenario_name).data.get("source") == "synthetic"
    # The SecAgg+ client trains from the global encoder alone, so utility rows compare like with like
    # only without the personal mix.
    plain = {**EVAL_OVERRIDES, "federation.personal_mix": 0.0}
    return {**plain, "data.synthetic.eval_impressions": 0} if synthetic else plain


def property_world_overrides(n_shops: int, seed: int | None = None) -> dict:
    """Many small synthetic shops of similar size (the property, not the size, should drive updates)."""
    world = {} if seed is None else {"seed": seed}
    return {**EVAL_OVERRIDES, **world, "data.source": "synthetic", "data.synthetic.n_shops": n_shops,
            "data.synthetic.n_late_joiners": 0, "data.synthetic.n_small_shops": 0,
            "data.synthetic.max_impressions": 3000, "data.synthetic.min_impressions": 1500,
            "data.synthetic.days": 30, "data.synthetic.eval_impressions": 0, "federation.personal_mix": 0.0}


# ============================================================================= helpers over shops
def dominant_category(shop: ShopData) -> str:
    """The top-level category with most impressions in a shop (the property a curious coordinator guesses)."""
    if shop.items is None or "category" not in shop.items:
        return "unknown"
    cats = shop.interactions[["item_id"]].merge(shop.items[["item_id", "category"]], on="item_id", how="left")
    return str(cats["category"].fillna("").str.split(">").str[0].mode().iloc[0])


def write_eval_scenario(name: str, overrides: dict, path: Path) -> Path:
    """Resolve a scenario with overrides and save it as TOML, so Flower clients load the same shops by path."""
    scenario = load_scenario(name, overrides)
    atomic_write_text(path, tomli_w.dumps(scenario.raw))
    return path


def encoder_arrays(model: ShopModel) -> dict[str, np.ndarray]:
    """The encoder as numpy arrays (float64 for exact differences)."""
    return {k: v.numpy().astype(np.float64) for k, v in model.encoder_state().items()}


def shop_updates(scenario: Scenario, shops: list[ShopData], *, steps: int, seed: int, model_seed: int | None = None
                 ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], list[ShopTensors]]:
    """Each shop's individual encoder update after one short local round from the same initial encoder.

    ``model_seed`` fixes that encoder (default: the scenario's seed); shadow shops use the targets'.
    """
    initial: dict[str, np.ndarray] | None = None
    updates, tensors = [], []
    for shop in shops:
        t = build_shop_tensors(shop, scenario.features)
        model = build_model(t, scenario.model, scenario.features,
                            seed=scenario.seed if model_seed is None else model_seed)
        before = encoder_arrays(model)
        initial = initial or before
        train_shop(model, t, replace(scenario.train, epochs=1, max_steps=steps, seed=seed))
        updates.append({k: v - before[k] for k, v in encoder_arrays(model).items()})
        tensors.append(t)
    assert initial is not None, "no shops"
    return initial, updates, tensors


def flat(update: Mapping[str, np.ndarray]) -> np.ndarray:
    """One vector per update (keys in a fixed order)."""
    return np.concatenate([np.asarray(update[k]).ravel() for k in sorted(update)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `flat` for arrays shaped like ``like``."""
    out, pos = {}, 0
    for k in sorted(like):
        n = int(np.prod(like[k].shape))
        out[k] = np.asarray(vector[pos:pos + n], np.float64).reshape(like[k].shape)
        pos += n
    return out


def clip_update(update: Mapping[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """Scale an update to L2 norm <= ``norm`` with Flower's own clipping (what `fixedclipping_mod` runs)."""
    arrays = {k: np.array(v, copy=True) for k, v in update.items()}  # copies: Flower clips in place
    if get_norm(list(arrays.values())) > 0:  # Flower divides by the norm
        clip_inputs_inplace(list(arrays.values()), norm)
    return arrays


def sold_product_rows(tensors: ShopTensors) -> set[int]:
    """Global-product buckets of the items this shop showed in its training rows."""
    items = torch.unique(tensors.rows["train"]["item"])
    keys = tensors.item_key[items]
    return {int(k) for k in keys[keys > 0]}


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


class ReplayShop(NumPyClient):
    """Sends a precomputed update through SecAgg+: the coordinator's view of real updates, without retraining."""

    def __init__(self, context: Context, initial: list[np.ndarray], updates: list[list[np.ndarray]]) -> None:
        self.index = int(context.node_config["partition-id"])
        self.initial, self.updates = initial, updates

    def fit(self, parameters, config):
        return [(a + u).astype(np.float32) for a, u in zip(self.initial, self.updates[self.index], strict=True)], 1, {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def secagg_view(initial: Mapping[str, np.ndarray], updates: list[Mapping[str, np.ndarray]], run_dir: Path,
                secagg: SecAggSettings | None = None) -> tuple[list[np.ndarray], dict[str, np.ndarray], float]:
    """Run one SecAgg+ round over ``updates``: (per-shop vectors the coordinator got, the aggregate, seconds)."""
    keys = sorted(initial)
    init = [np.asarray(initial[k], np.float32) for k in keys]
    ups = [[np.asarray(u[k]) for k in keys] for u in updates]
    app = make_secure_app(lambda ctx: ReplayShop(ctx, init, ups).to_client())
    grid = LoopbackGrid(app, nodes(len(updates)))
    settings = FederationSettings(num_server_rounds=1, run_dir=str(run_dir), min_shops=2, method="secagg-view")
    start = time.perf_counter()
    run_secure_federation(grid, Context(1, 0, {}, RecordDict(), {}), settings, secagg or SecAggSettings(),
                          initial=dict(zip(keys, init, strict=True)), shop_names=[f"shop-{i}" for i in range(len(ups))])
    seconds = time.perf_counter() - start
    views: dict[int, np.ndarray] = {}
    for r in grid.received:
        cfg = r.content.config_records.get("secaggplus_configs") if r.content is not None else None
        if cfg is not None and "masked_params" in cfg:
            # SecAgg+ puts the node's quantised weight factor in front of the parameters (flwr factor_combine).
            view = np.concatenate([bytes_to_ndarray(b).ravel() for b in cfg["masked_params"][1:]])
            if view.size != sum(a.size for a in init):
                raise RuntimeError(f"SecAgg+ masked vector has {view.size} values, the encoder "
                                   f"{sum(a.size for a in init)}: Flower's masked_params layout changed")
            views[r.node_id] = view
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, "SecAgg+ round produced no aggregate"
    return [views[n].astype(np.float64) for n in sorted(views)], ckpt.arrays, seconds


# ============================================================================= property inference + product leakage
SHADOW_SEED_OFFSET = 1000  # the shadow world: same public generator and taxonomy, independently drawn shops


def category_layout(shops: list[ShopData], buckets: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The public taxonomy as an attacker holds it: top names, their buckets, leaf buckets, each leaf's top index."""
    leaves = sorted({c for sh in shops if sh.items is not None for c in sh.items["category"].dropna().astype(str)})
    if not leaves:
        raise ValueError("property inference needs shops with an items table that has a 'category' column")
    tops = sorted({leaf.split(">")[0] for leaf in leaves})
    leaf_top = np.array([tops.index(leaf.split(">")[0]) for leaf in leaves])
    return (tops, hash_field("category_top", np.array(tops, dtype=object), buckets),
            hash_field("category", np.array(leaves, dtype=object), buckets), leaf_top)


def property_and_product_leakage(cfg: PrivacyEvalConfig, run_dir: Path, base: str = "default") -> dict[str, object]:
    """Property inference (shadow meta-classifier) and product-row leakage over many small shops.

    Targets: ``cfg.n_property_shops`` shops of the scenario's world. Shadows: ``cfg.n_shadow_shops``
    shops of an independently drawn world (seed + SHADOW_SEED_OFFSET) that a coordinator can
    simulate from the public generator, taxonomy and hashing; their updates start from the same
    global encoder the coordinator sent the targets. Views: plain, clipped (central DP without
    SecAgg+), a shop's share of the noisy central-DP release, and SecAgg+ masked vectors.
    """
    scenario = load_scenario(base, property_world_overrides(cfg.n_property_shops))
    shops = scenario.training_shops()
    shadow_scenario = load_scenario(base, property_world_overrides(cfg.n_shadow_shops,
                                                                   seed=scenario.seed + SHADOW_SEED_OFFSET))
    shadows = shadow_scenario.training_shops()
    initial, updates, tensors = shop_updates(scenario, shops, steps=cfg.property_steps, seed=cfg.seed)
    _, shadow_updates, _ = shop_updates(shadow_scenario, shadows, steps=cfg.property_steps, seed=cfg.seed + 1,
                                        model_seed=scenario.seed)
    tops, top_rows, leaf_rows, leaf_top = category_layout(shops + shadows, scenario.features.hash_buckets)
    target_y = np.array([tops.index(dominant_category(s)) for s in shops])
    shadow_y = np.array([tops.index(dominant_category(s)) for s in shadows])
    norms = np.array([np.linalg.norm(flat(u)) for u in updates])
    out: dict[str, object] = {
        "n_shops": len(shops), "n_shadow_shops": len(shadows), "property": "dominant top-level category",
        "update_l2_norm": [float(norms.min()), float(np.median(norms)), float(norms.max())],
        "share_clipped": float(np.mean(norms > cfg.clipping_norm)),
        "classes": tops, "target_class_counts": np.bincount(target_y, minlength=len(tops)).tolist(),
        "shadow_world_seed": scenario.seed + SHADOW_SEED_OFFSET}

    def features(views: list[Mapping[str, np.ndarray]]) -> np.ndarray:
        return np.stack([category_features(v["wide.weight"], top_rows, leaf_rows, leaf_top) for v in views])

    def attack(shadow_views: list[Mapping[str, np.ndarray]], target_views: list[Mapping[str, np.ndarray]]
               ) -> dict[str, object]:
        return shadow_property_attack(features(shadow_views), shadow_y, features(target_views), target_y,
                                      seed=cfg.seed).as_dict()

    rng = np.random.default_rng(cfg.seed)

    def release_share(views: list[dict[str, np.ndarray]], z: float) -> list[dict[str, np.ndarray]]:
        # The central-DP release is (sum of clipped updates + N(0, (zS)^2)) / n: against an observer who
        # knows every other shop's update (DP's adversary), a shop's share is its clipped update + N(0, (zS)^2).
        # Only the first-order table enters the features; noise elsewhere is independent and changes nothing.
        return [{"wide.weight": v["wide.weight"] + rng.normal(0.0, z * cfg.clipping_norm, v["wide.weight"].shape)}
                for v in views]

    attacks: dict[str, dict[str, object]] = {"individual update (no protection)": attack(shadow_updates, updates)}
    clipped = [clip_update(u, cfg.clipping_norm) for u in updates]
    shadow_clipped = [clip_update(u, cfg.clipping_norm) for u in shadow_updates]
    # Central DP adds noise to the *aggregate* only: the coordinator still sees each clipped update.
    attacks[f"individual clipped update (central DP, S={cfg.clipping_norm}, no SecAgg+)"] = attack(shadow_clipped,
                                                                                                  clipped)
    for z in sorted({z for z in cfg.central_noise if z > 0}):
        attacks[f"shop's share of the central-DP release, z={z}"] = attack(release_share(shadow_clipped, z),
                                                                          release_share(clipped, z))
    views, aggregate, _ = secagg_view(initial, updates, run_dir / "secagg-view")
    # The attacker's best model (trained on plain shadow updates) applied to what SecAgg+ delivers.
    attacks["SecAgg+ masked vector"] = attack(shadow_updates, [unflatten(v, initial) for v in views])
    out["attacks"] = attacks

    key = "products.weight"
    init = initial[key]
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for noise in sorted({z for z in cfg.central_noise if z > 0} | {1.0}):
        std = noise * cfg.clipping_norm / len(updates)
        noisy = np.mean([c[key] for c in clipped], axis=0) + rng.normal(0, std, init.shape)
        rows.append((f"central DP z={noise}", noisy))
    leak: dict[str, dict[str, float]] = {}
    views_by = {"none (individual update)": None, "SecAgg+ (aggregate only)": aggregate[key] - init,
                **dict(rows)}
    for name, shared_view in views_by.items():
        rec, prec = [], []
        for t, u in zip(tensors, updates, strict=True):
            sold = sold_product_rows(t)
            seen = u[key] if shared_view is None else shared_view
            # SecAgg+ quantisation moves untouched rows by < one quantum: ignore changes below it.
            res = product_leakage(init, init + seen, sold, tol=SecAggSettings().quantisation_step())
            rec.append(res["recall"])
            prec.append(res["precision"])
        leak[name] = {"recall": float(np.mean(rec)), "precision": float(np.mean(prec))}
    out["product_leakage"] = leak
    return out


# ============================================================================= membership inference
def restrict_users(tensors: ShopTensors, users: np.ndarray) -> ShopTensors:
    """The shop's tensors with training rows of ``users`` only (no sales rows: they pool every user)."""
    rows = tensors.rows["train"]
    mask = torch.isin(rows["user"], torch.as_tensor(users))
    return replace(tensors, rows={**tensors.rows, "train": {k: v[mask] for k, v in rows.items()}}, sales=None,
                   tasks=[t for t in tensors.tasks if t != "sales"])


@torch.no_grad()
def user_losses(model: ShopModel, tensors: ShopTensors, users: np.ndarray) -> np.ndarray:
    """Mean training-period loss of each user in ``users`` (members' seen rows, others' unseen rows)."""
    model.eval()
    rows = tensors.rows["train"]
    per_user = per_user_mean(impression_row_loss(model, rows).numpy(), rows["user"].numpy())
    model.train()
    return per_user.reindex(users).to_numpy()


def membership_inference(cfg: PrivacyEvalConfig, scenario: Scenario, shop: ShopData) -> dict[str, object]:
    """User-level MIA on one shop: overfit (positive control), normal training and user-level DP-SGD."""
    tensors = build_shop_tensors(shop, scenario.features)
    users = np.unique(tensors.rows["train"]["user"].numpy())
    rng = np.random.default_rng(cfg.seed)
    users = rng.permutation(users)[: cfg.mia_users or len(users)]
    third = len(users) // 3
    members, nonmembers, population = users[:third], users[third:2 * third], users[2 * third:]
    targets = np.concatenate([members, nonmembers])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    member_t = restrict_users(tensors, members)

    dp = DPSGDConfig(noise_multiplier=cfg.dpsgd_noise, max_grad_norm=cfg.clipping_norm, unit="user",
                     sample_rate=cfg.dpsgd_sample_rate, lr=1e-2, delta=cfg.delta, seed=cfg.seed)

    def fit(mode: str, seed: int, data: ShopTensors) -> tuple[ShopModel, object]:
        """A model trained the way ``mode`` trains, and its DP-SGD accountant (None without DP-SGD)."""
        model = build_model(data, scenario.model, scenario.features, seed=seed)
        if mode == "dpsgd":
            return model, train_dpsgd_shop(model, data, replace(dp, seed=seed), cfg.dpsgd_rounds)
        epochs = cfg.overfit_epochs if mode == "overfit" else cfg.normal_epochs
        train_shop(model, data, replace(scenario.train, epochs=epochs, weight_decay=0.0, seed=seed))
        return model, None

    # LiRA's reference (OUT) models must be trained like the target, so each mode gets its own, on the
    # same reference halves; their seeds differ from the target's (cfg.seed) and follow --seed.
    halves = [restrict_users(tensors, rng.permutation(population)[: max(2, len(population) // 2)])
              for _ in range(cfg.reference_models)]
    results: dict[str, object] = {"shop": shop.name, "members": len(members), "nonmembers": len(nonmembers)}
    for mode in ("overfit", "normal", "dpsgd"):
        ref = np.stack([user_losses(fit(mode, cfg.seed + 1 + k, half)[0], tensors, targets)
                        for k, half in enumerate(halves)])
        model, acc = fit(mode, cfg.seed, member_t)
        if acc is not None:
            results["dpsgd_report"] = privacy_report(acc, dp).as_dict()
        loss = user_losses(model, tensors, targets)
        scores = {"loss-threshold": loss_threshold_scores(loss), "offline-LiRA": reference_model_scores(loss, ref)}
        for name, sc in scores.items():
            results[f"{mode}/{name}"] = evaluate_attack(name, sc, is_member, seed=cfg.seed)
        if mode == "dpsgd":
            eps = results["dpsgd_report"]["epsilon"]
            results["dp_violations"] = sum(len(dp_violations(sc, is_member, epsilon=eps, delta=cfg.delta))
                                           for sc in scores.values())
    return results


# ============================================================================= report
def _fmt_attack(res: AttackResult) -> str:
    return (f"{res.auc:.3f} [{res.auc_ci[0]:.3f}, {res.auc_ci[1]:.3f}] | {res.tpr_at_1pct:.3f} "
            f"[{res.tpr_at_1pct_ci[0]:.3f}, {res.tpr_at_1pct_ci[1]:.3f}] | {res.tpr_at_01pct:.3f}")


def write_report(run_dir: Path, prop: dict[str, object], mia: dict[str, object],
                 ids: dict[str, float] | None = None, utility: list[dict[str, object]] | None = None) -> Path:
    """`privacy.md` (tables) and `privacy.json` (all numbers) in the run directory."""
    lines = ["# Privacy evaluation", "", "## Membership inference (user level)", "",
             f"Shop `{mia['shop']}`: {mia['members']} member users, {mia['nonmembers']} non-member users.", "",
             "| training | attack | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR |", "|---|---|---|---|---|"]
    for key, value in mia.items():
        if isinstance(value, AttackResult):
            mode, attack = key.split("/")
            lines.append(f"| {mode} | {attack} | {_fmt_attack(value)} |")
    rep = mia.get("dpsgd_report", {})
    lines += ["", f"DP-SGD: {rep}. ROC points above e^eps*FPR+delta (must be 0): {mia.get('dp_violations')}.", "",
              "## Property inference from individual encoder updates", "",
              f"Property: {prop['property']} of {prop['n_shops']} target shops (classes {prop['classes']}, "
              f"counts {prop['target_class_counts']}). Meta-classifier (gradient-boosted trees) trained on "
              f"{prop['n_shadow_shops']} shadow shops of an independently drawn world (seed "
              f"{prop['shadow_world_seed']}) from features of the first-order (wide) rows of the public category "
              "buckets. AUC = one-vs-rest macro AUC over categories; pooled = binary 'is category c dominant' "
              "over all (shop, c) pairs; 95% CIs bootstrap over target shops. Update L2 norms (min, median, max): "
              f"{', '.join(f'{v:.3g}' for v in prop['update_l2_norm'])}; share above the clipping norm: "
              f"{prop['share_clipped']:.2f}.", "",
              "| coordinator sees | macro AUC [95% CI] | pooled AUC [95% CI] | top-1 (majority guess) |",
              "|---|---|---|---|"]
    for name, r in prop["attacks"].items():
        lines.append(f"| {name} | {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | "
                     f"{r['pooled_auc']:.3f} [{r['pooled_auc_ci'][0]:.3f}, {r['pooled_auc_ci'][1]:.3f}] | "
                     f"{r['top1']:.2f} ({r['top1_chance']:.2f}) |")
    lines += ["", "## Sold products readable from global-product embedding rows", "",
              "| protection | recall (share of sold products readable) | precision (attributable to the shop) |",
              "|---|---|---|"]
    for name, v in prop["product_leakage"].items():
        lines.append(f"| {name} | {v['recall']:.3f} | {v['precision']:.3f} |")
    if ids is not None:
        lines += ["", "## User IDs in outgoing messages", "",
                  f"Share of {int(ids['user_ids'])} user IDs found in any reply: plain round {ids['plain']:.3f} "
                  f"({int(ids['plain_replies'])} replies), SecAgg+ round {ids['secagg']:.3f} "
                  f"({int(ids['secagg_replies'])} replies, train and evaluate). "
                  + ("Zero, as the design requires; every byte of every reply was scanned."
                     if ids["plain"] == 0 and ids["secagg"] == 0 else "**Not zero: user IDs left a shop (a bug).**")]
    if utility:
        plot_utility(utility, Path(run_dir) / "privacy_utility.png")
        lines += ["", "## Privacy-utility", "",
                  "Mean over shops of the test-split metric; epsilon is shop-level (Flower's RDP accountant, every "
                  "shop in every round, no sampling amplification; inf = no DP). 'local only' trains each shop "
                  "alone for the same number of epochs: nothing leaves it.", "",
                  "| protection | z | epsilon | delta | rounds | metric (test) | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in utility:
            lines.append(f"| {r['protection']} | {r['noise_multiplier']} | {r['epsilon']:.3g} | {r['delta']:g} | "
                         f"{r['rounds']} | {r['metric']} = {r['value']:.4f} | {r.get('seconds', float('nan')):.0f} |")
        lines += ["", "'SecAgg+ and central DP' rows are composed in the evaluation (fedshop's runtime refuses the "
                  "pair): shops clip their updates to S, a real SecAgg+ round averages them, the coordinator adds "
                  "N(0, (zS/n)^2); same z, S, shops and rounds as the central-DP rows, hence the same epsilon. "
                  "'SecAgg+ (composed, clipped)' is that loop with z = 0.",
                  "", "![privacy-utility](privacy_utility.png)"]
    path = atomic_write_text(Path(run_dir) / "privacy.md", "\n".join(lines) + "\n")
    atomic_write_text(Path(run_dir) / "privacy.json", json.dumps(
        {"property": prop, "mia": {k: (v.as_dict() if isinstance(v, AttackResult) else v) for k, v in mia.items()},
         "user_ids": ids, "utility": utility},
        indent=2, default=str))
    return path


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


# ============================================================================= user-ID leakage
def user_id_scan(scenario_path: Path, n_shops: int, run_dir: Path, *, max_steps: int = 2) -> dict[str, float]:
    """Run one plain round (main ClientApp) and one SecAgg+ round over real shops; share of user IDs in replies."""
    from client.client_app import app as main_app
    from client.secure_client import secure_app

    scenario = load_scenario(str(scenario_path))
    shops = scenario.training_shops()[:n_shops]
    ids = [str(u) for s in shops for u in s.interactions["user_id"].unique()]
    run_config = {"scenario": str(scenario_path), "max-steps": max_steps, "run-dir": str(run_dir / "id-scan")}
    out: dict[str, float] = {}

    plain = LoopbackGrid(main_app, nodes(len(shops)), run_config=run_config)
    strategy = FedAvg(min_available_nodes=len(shops), min_train_nodes=len(shops), min_evaluate_nodes=len(shops))
    strategy.start(grid=plain, initial_arrays=initial_encoder(scenario), num_rounds=1,
                   train_config=ConfigRecord(run_config))
    out["plain"] = user_id_leakage([payload_values(r.content) for r in plain.received if r.content], ids)
    out["plain_replies"] = float(sum(r.content is not None for r in plain.received))

    secure = LoopbackGrid(secure_app, nodes(len(shops)), run_config=run_config)
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


# ============================================================================= privacy-utility
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
        grid = LoopbackGrid(main_app, nodes(len(shops)), run_config=base)  # it clips when DP sends a norm
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
        grid = LoopbackGrid(secure_app, nodes(len(shops)), run_config=base)
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
                    grid: LoopbackGrid) -> dict[str, float]:
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
