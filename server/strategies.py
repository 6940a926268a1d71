"""Strategies over the shared encoder: Flower's own, chosen by name, behind a wrapper that screens replies.

`ShopStrategy` wraps any Flower strategy the way Flower's DP wrappers do. Before the inner strategy
sees a round's replies it leaves out shops that failed, timed out or sent non-finite or misshapen
arrays (logged, never aggregated). A round with fewer than `min-shops` usable updates is skipped: the
global model is kept, the reason logged, and the run goes on (a restarting merchant rejoins at the next
round); only more than `max-short-rounds` such rounds in a row stop the run. It reduces
every reply to the encoder arrays and `num-examples`, so Flower's aggregation never meets the
shop-specific metric keys (shops run different task sets). It reports each round's per-shop metrics
to a callback (metric log, checkpoint, progress) and offsets round numbers when a run resumes.

With `fuse_evaluate` (the coordinator's `federation.fuse_evaluate` when shops serve their own encoder,
`shared.protocol.serves_own_encoder`) each train message also carries the round's evaluate config and
asks the shop to evaluate after training (`evaluate-after-train`); the evaluation rides in the train
reply's `evaluate-metrics` record, taken out before any screen or the inner strategy sees the reply.
The evaluate phase then sends messages only to shops whose fused evaluation is missing (an error or
timeout, a waiting late joiner, a shop not sampled for training, a failed evaluation), often none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.bulyan import Bulyan

from server.decoded_array import DecodedArray, array_record
from server.metrics_log import mean_by_key
from server.node_identity import ShopClaims
from server.robust import LooEntry, RobustSettings, TurnLevel, screen
from server.wire import Wire
from shared.atomic import atomic_write_text
from shared.npy_check import checked_numpy
from shared.privacy.audit import MAX_METRICS
from shared.protocol import (
    EVAL_METRICS_RECORD,
    EVAL_SPLIT,
    EVALUATE_AFTER_TRAIN,
    LOCAL_PREFIX,
    NUM_EXAMPLES,
    SHOP_INDEX,
)

STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedprox": FedProx, "fedadam": FedAdam,
                                       "fedyogi": FedYogi, "fedmedian": FedMedian,
                                       "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum,
                                       "bulyan": Bulyan}
BYZANTINE_RULES = ("krum", "multikrum", "bulyan")  # take `num_malicious_nodes`

logger = logging.getLogger(__name__)
MAX_REPLY_METRICS = MAX_METRICS  # per MetricRecord of a reply: the shops' leak guard sends at most this many
MAX_METRIC_NAME = 100  # characters; the longest metric name a shop sends is about 30


class RunFailed(RuntimeError):
    """A federation that cannot produce a model: too many rounds in a row, or every round, skipped."""


FAILED_FILE = "failed.txt"  # why a run failed (no usable round), for the caller (`server.server_app.failure_reason`)


@contextmanager
def failure_recorded(run_dir: Path) -> Iterator[None]:
    """Within the block a `RunFailed` leaves its reason in ``run_dir``'s `FAILED_FILE` (plain and SecAgg+ runs
    alike; Flower may swallow or wrap the ServerApp's exception, the file still says); an older one is removed."""
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    try:
        yield
    except RunFailed as exc:
        logger.error("run failed: %s", exc)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / FAILED_FILE, f"{exc}\n")
        raise


SERVER_LR_DEFAULTS = {"fedadam": 0.1, "fedyogi": 0.1, "fedavgm": 1.0}  # server_lr <= 0 means these
SERVER_LR_KWARG = {"fedadam": "eta", "fedyogi": "eta", "fedavgm": "server_learning_rate"}


def build_strategy(name: str, *, fraction_train: float = 1.0, min_shops: int = 2,
                   proximal_mu: float = 0.0, server_lr: float = 0.0,
                   server_momentum: float = 0.0, num_malicious: int = 1, trim_beta: float = 0.2) -> FedAvg:
    """One of Flower's strategies by name, sampling at least ``min_shops`` shops each round.

    ``server_lr`` is FedAdam/FedYogi's ``eta`` or FedAvgM's server learning rate; 0 picks the
    strategy's own default (`SERVER_LR_DEFAULTS`), so choosing FedAvgM alone never inherits FedAdam's
    0.1. ``server_momentum`` is FedAvgM's. ``num_malicious`` is Krum/MultiKrum/Bulyan's assumed number of
    attackers, ``trim_beta`` FedTrimmedAvg's cut per side. MultiKrum selects all usable replies but
    ``num_malicious``, set each round by `ShopStrategy`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy '{name}' is unknown. Fix: use one of {sorted(STRATEGIES)}")
    kwargs: dict[str, Any] = {"fraction_train": fraction_train, "fraction_evaluate": 1.0,
                              "min_train_nodes": min_shops, "min_evaluate_nodes": min_shops,
                              "min_available_nodes": min_shops}
    if name == "fedprox":
        kwargs["proximal_mu"] = proximal_mu
    if name == "fedavgm":
        kwargs["server_momentum"] = server_momentum
    if name in SERVER_LR_KWARG:
        kwargs[SERVER_LR_KWARG[name]] = server_lr if server_lr > 0 else SERVER_LR_DEFAULTS[name]
    if name in BYZANTINE_RULES:
        kwargs["num_malicious_nodes"] = num_malicious
    if name == "multikrum":
        kwargs["num_nodes_to_select"] = 0  # ShopStrategy sets n - num_malicious each round
    if name == "fedtrimmedavg":
        kwargs["beta"] = trim_beta
    return STRATEGIES[name](**kwargs)


def split_arrays(arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """Global record -> (encoder record, shared local arrays by wire name)."""
    encoder = array_record({k: v for k, v in arrays.items() if not k.startswith(LOCAL_PREFIX)})
    local = {k: v.numpy() for k, v in arrays.items() if k.startswith(LOCAL_PREFIX)}
    return encoder, local


@dataclass
class RoundReport:
    """What one round produced: the new global arrays and every shop's metrics."""

    server_round: int
    arrays: ArrayRecord
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # shop -> training metrics
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)  # shop -> '<task>.<metric>'
    left_out: dict[str, str] = field(default_factory=dict)  # shop -> why it was left out
    exempt: dict[str, str] = field(default_factory=dict)  # shop -> why a direction check's left-out was kept (small)
    eval_split: str = "val"
    skipped: str = ""  # why the round was skipped (fewer than min-shops usable updates); "" if it was not
    wire_bytes: dict[str, int] = field(default_factory=dict)  # array payload bytes down/up (server.wire.Wire)


RoundConfig = Callable[[int, str], dict[str, Any]]  # (round, "train" | "evaluate") -> extra config


class ShopStrategy(Strategy):
    """A Flower strategy restricted to usable replies, with per-shop reporting and round offsets."""

    def __init__(self, inner: FedAvg, *, min_shops: int, shop_name: Callable[[int], str],
                 on_round_end: Callable[[RoundReport], None] | None = None,
                 round_config: RoundConfig | None = None, round_offset: int = 0,
                 max_short_rounds: int = 3, robust: RobustSettings | None = None,
                 wire: Wire | None = None, first_claims: dict[str, float] | None = None,
                 loo_history: dict[str, list[LooEntry]] | None = None,
                 loo_turns: dict[str, TurnLevel] | None = None, fuse_evaluate: bool = False,
                 claims: ShopClaims | None = None) -> None:
        self.inner = inner
        # node <-> shop-index of this run: checked claims, trust on first use (`server.node_identity.ShopClaims`)
        self.claims = claims or ShopClaims()
        self.fuse_evaluate = fuse_evaluate  # train messages ask for the evaluation too (module docstring)
        self._fused: dict[int, str] = {}  # this round: node -> shop whose evaluation came with its train reply
        self.robust = robust or RobustSettings()
        self.wire = wire or Wire()  # message compression; "none" only counts bytes
        # shop -> its first accepted num-examples claim; checkpointed (`first_claims`), restored on resume
        self._first_claim: dict[str, float] = dict(first_claims or {})
        # shop -> [leave-one-out cosine, round weight] of every screened round (its reputation); checkpointed
        self._loo_history: dict[str, list[LooEntry]] = {k: list(v) for k, v in (loo_history or {}).items()}
        # shop -> its pre-turn level while it is out for a sudden turn (`server.robust.judge_loo`); checkpointed
        self._loo_turns: dict[str, TurnLevel] = {k: list(v) for k, v in (loo_turns or {}).items()}
        self._auto_select = isinstance(inner, MultiKrum) and inner.num_nodes_to_select <= 0
        self.aggregated_rounds = 0  # rounds whose update reached the global model
        self.last_skip = ""  # why the last skipped round was skipped
        self.min_shops = min_shops
        self.max_short_rounds = max_short_rounds
        self._short_rounds = 0  # consecutive rounds skipped for want of min-shops usable updates
        self._global = ArrayRecord()  # the round's global arrays, kept when the round is skipped
        self._sent: list[Message] = []  # this phase's instructions: error replies are matched to them
        self.shop_name = shop_name
        self.on_round_end = on_round_end
        self.round_config = round_config or (lambda _r, _kind: {})
        self.round_offset = round_offset
        self.key = inner.arrayrecord_key
        # node -> its shop's name, for its error replies; bound nodes (registered, or restored on resume) from the start
        self._node_shop: dict[int, str] = {node: shop_name(index) for index, (node, _) in self.claims.export().items()}
        self._report: RoundReport | None = None
        self._global_local: dict[str, np.ndarray] = {}
        self._sampled: set[int] = set()
        self._expected: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # the round's encoder: name -> shape, dtype

    @property
    def first_claims(self) -> dict[str, float]:
        """Each shop's first accepted num-examples claim (a copy), the base of its cap: a checkpoint keeps it."""
        return dict(self._first_claim)

    @property
    def loo_history(self) -> dict[str, list[LooEntry]]:
        """Each shop's leave-one-out [cosine, round weight] entries so far (a copy), oldest first: a checkpoint keeps
        them."""
        return {k: list(v) for k, v in self._loo_history.items()}

    @property
    def loo_turns(self) -> dict[str, TurnLevel]:
        """Shops out for a sudden turn, each with its pre-turn [cosine, consensus] level (a copy): a checkpoint keeps
        them, so a resumed run keeps a turned shop out."""
        return {k: list(v) for k, v in self._loo_turns.items()}

    def summary(self) -> None:
        """Log the inner strategy's settings and the fault bound."""
        logger.info("ShopStrategy over %s: min-shops %d, max-short-rounds %d, resuming after round %d, screens %s",
                    type(self.inner).__name__, self.min_shops, self.max_short_rounds, self.round_offset, self.robust)
        self.inner.summary()

    # ---- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Let the inner strategy sample shops for the encoder; add shared local arrays if any."""
        rnd = server_round + self.round_offset
        encoder, local = split_arrays(arrays)
        self._global_local = local
        self._global = arrays
        self._expected = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in encoder.items()}
        cfg = ConfigRecord({**dict(config), **self.round_config(rnd, "train")})
        if self.fuse_evaluate:  # the evaluate message's settings, in the one ConfigRecord (fixedclipping_mod wants one)
            cfg = ConfigRecord({**dict(cfg), **self.round_config(rnd, "evaluate"), EVALUATE_AFTER_TRAIN: True})
        self._fused = {}
        messages = list(self.inner.configure_train(rnd, encoder, cfg, grid))
        online = self.claims.observe(grid)  # the online nodes and keys (after sampling waited for min-shops)
        self.wire.forget_offline(online)
        self._forget_anonymous(online)
        self._sampled = {m.metadata.dst_node_id for m in messages}
        for msg in messages:
            record = msg.content[self.key]
            for k, v in local.items():
                record[k] = Array(v)
        messages = self.wire.prepare(messages, self.key, "train")
        self._sent = messages  # the Grid sets their message IDs when it pushes them
        return messages

    def _readdress(self, replies: list[Message]) -> list[Message]:
        """Error replies the SuperLink wrote for a node (e.g. "node unavailable") as if the node sent them.

        The SuperLink signs them with its own node ID; matched to the instruction by `reply_to_message_id`,
        they are labelled with the node's shop and keep their true reason instead of reading as a timeout.
        """
        sent = {m.metadata.message_id: m for m in self._sent}
        out = []
        for msg in replies:
            ins = sent.get(msg.metadata.reply_to_message_id)
            if ins is not None and msg.has_error() and msg.metadata.src_node_id != ins.metadata.dst_node_id:
                msg = Message(msg.error, reply_to=ins)
            out.append(msg)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the usable replies' encoders with the inner strategy; average shared local arrays."""
        rnd = server_round + self.round_offset
        replies = self.wire.receive(self._readdress(list(replies)), self._sent, "train")  # deltas -> dense
        self._report = RoundReport(server_round=rnd, arrays=ArrayRecord())
        self._take_evaluations(replies, self._report)
        usable = [m for m in replies if self._usable(m, self._report)]
        self.wire.trained = {m.metadata.src_node_id for m in usable}
        for node in sorted(self._sampled - {m.metadata.src_node_id for m in replies}):
            shop = self._node_shop.get(node, f"node-{node}")
            self._report.left_out[shop] = "no reply within the round timeout"
            logger.warning("round %d: left out shop %s: no reply within the round timeout", rnd, shop)
        # A fixed order makes the float sums, and so a resumed run, independent of reply arrival.
        usable.sort(key=lambda m: (self._shop_of(m.metadata.src_node_id), m.metadata.src_node_id))
        shared: list[tuple[float, dict[str, np.ndarray]]] = []
        dtypes: dict[str, np.dtype] = {}
        screened = self._screen(rnd, usable)
        usable = [msg for msg, _ in screened]
        for msg, weight in screened:
            metrics = dict(next(iter(msg.content.metric_records.values())))
            shop = self._shop_of(msg.metadata.src_node_id)  # its claim was checked by `_usable`
            self._report.train[shop] = {k: float(v) for k, v in metrics.items() if k != SHOP_INDEX}
            encoder, local = split_arrays(next(iter(msg.content.array_records.values())))
            dtypes = dtypes or {k: a.numpy().dtype for k, a in encoder.items()}
            shared.append((weight, local))
            reduced = {NUM_EXAMPLES: weight}
            msg.content = RecordDict({self.key: encoder, "metrics": MetricRecord(reduced)})
        if len(usable) < self.min_shops:
            return self._skip(rnd, len(usable))
        self._short_rounds = 0
        if self._auto_select:  # MultiKrum averages all but the assumed attackers of this round's replies
            self.inner.num_nodes_to_select = max(1, len(usable) - self.inner.num_malicious_nodes)
        arrays, metrics = self.inner.aggregate_train(rnd, usable)
        if arrays is None and isinstance(self.inner, Bulyan):  # too few replies for 4f + 3: Flower skips
            return self._skip(rnd, len(usable), why=f"Bulyan needs at least 4 x num-malicious + 3 = "
                              f"{4 * self.inner.num_malicious_nodes + 3} usable updates")
        self.aggregated_rounds += 1
        if arrays is None:
            raise RuntimeError(f"round {rnd}: {type(self.inner).__name__} produced no aggregate")
        # Keep the model's dtype: FedAdam/FedYogi compute in float64, and shops reply in their own dtype.
        dense = {k: np.asarray(a.numpy(), dtype=dtypes.get(k)) for k, a in arrays.items()}
        if type(self.inner) in (FedAvg, FedProx):  # exact means: untouched rows stay bit-identical (wire.py)
            dense = self.wire.keep_untouched_rows(dense)
        dense.update(_mean_per_key(shared, self._global_local))
        merged = ArrayRecord({k: Array(v) for k, v in dense.items()})
        self._report.arrays = merged
        return merged, metrics

    def _take_evaluations(self, replies: list[Message], report: RoundReport) -> None:
        """Move fused evaluations out of the train replies into the round's report (`evaluate-metrics`).

        Every reply loses the record, so screens and the inner strategy see train replies as without fusion;
        a shop whose train update is left out keeps its evaluation, as a separate evaluate message would give.
        """
        for msg in replies:
            if msg.has_error() or EVAL_METRICS_RECORD not in msg.content.metric_records:
                continue
            metrics = dict(msg.content.metric_records[EVAL_METRICS_RECORD])
            msg.content = RecordDict({k: r for k, r in msg.content.items() if k != EVAL_METRICS_RECORD})
            if not self.fuse_evaluate or SHOP_INDEX not in metrics or not_scalar_metrics(metrics):
                continue  # unasked, nameless or malformed: the evaluate phase asks this shop instead
            index, why = self._claim(msg, metrics)
            if why:
                logger.warning("round %d: evaluation of node %s left out: %s", report.server_round,
                               msg.metadata.src_node_id, why)
                continue
            shop = self._shop_of(msg.metadata.src_node_id, index)
            report.evaluate[shop] = evaluation_row(metrics)
            self._fused[msg.metadata.src_node_id] = shop

    def _skip(self, rnd: int, n_usable: int, why: str = "") -> tuple[None, None]:
        """Skip a round short of min-shops (the global model stays), or stop the run after too many in a row."""
        assert self._report is not None
        self._short_rounds += 1
        left_out = "; ".join(f"{shop}: {why}" for shop, why in sorted(self._report.left_out.items())) or "none"
        need = why or f"fewer than min-shops={self.min_shops}"
        reason = f"only {n_usable} shop(s) sent a usable update, {need} (left out: {left_out})"
        self.last_skip = f"round {rnd}: {reason}"
        if self._short_rounds > self.max_short_rounds:
            raise RunFailed(f"round {rnd}: {reason}; {self._short_rounds} short rounds in a row, more than "
                               f"max-short-rounds={self.max_short_rounds}. Fix: check the left-out shops' logs and "
                               "restart them, then `--resume` the run; or lower min-shops")
        logger.warning("round %d skipped, global model kept (%d of at most %d short rounds in a row): %s", rnd,
                       self._short_rounds, self.max_short_rounds, reason)
        self._report.skipped = reason
        self._report.arrays = self._global
        return None, None

    def _screen(self, rnd: int, usable: list[Message]) -> list[tuple[Message, float]]:
        """Usable replies that pass `server.robust`'s screens, each with its (capped) aggregation weight.

        Clipped updates have their encoder arrays replaced by ``global + scale x delta``.
        """
        if not usable:
            return []
        global_encoder, _ = split_arrays(self._global)
        base = {k: a.numpy() for k, a in global_encoder.items()}
        keys = [k for k in sorted(base) if np.issubdtype(base[k].dtype, np.floating)]
        flat_base = np.concatenate([base[k].ravel() for k in keys]).astype(np.float32) if keys else np.zeros(0)
        shops, deltas, claims = [], [], []
        for msg in usable:
            shops.append(self._shop_of(msg.metadata.src_node_id))  # its claim was checked by `_usable`
            arrays = next(iter(msg.content.array_records.values()))
            flat = np.concatenate([arrays[k].numpy().ravel() for k in keys]) if keys else np.zeros(0)
            flat = flat.astype(np.float32, copy=False)  # the concatenation is a fresh array: subtract in place
            deltas.append(np.subtract(flat, flat_base, out=flat) if keys else flat - flat_base)
            claims.append(float(next(iter(msg.content.metric_records.values()))[NUM_EXAMPLES]))
        bounds = np.cumsum([base[k].size for k in keys]).tolist()
        result = screen(deltas, claims, [self._first_claim.get(s) for s in shops], self.robust, bounds,
                        [self._loo_history.get(s, []) for s in shops], [self._loo_turns.get(s) for s in shops])
        out = []
        for i, msg in enumerate(usable):
            self._first_claim.setdefault(shops[i], result.claims[i])
            if i in result.loo:
                self._loo_history.setdefault(shops[i], []).append([round(result.loo[i], 6),
                                                                  round(result.round_weight, 6)])
            if i in result.turns:
                level = result.turns[i]
                if level is None:
                    self._loo_turns.pop(shops[i], None)
                else:
                    self._loo_turns[shops[i]] = [round(x, 6) for x in level]
            logger.debug("round %d: shop %s update norm %.4g, cosine to median %s, leave-one-out %s, weight %.4g", rnd,
                         shops[i], result.norms[i], f"{result.cosines[i]:.3f}" if result.cosines else "n/a",
                         f"{result.loo[i]:.3f}" if i in result.loo else "n/a", result.weights[i])
            if i in result.exempt:
                assert self._report is not None
                self._report.exempt[shops[i]] = result.exempt[i]
                logger.debug("round %d: shop %s: %s", rnd, shops[i], result.exempt[i])
            if i in result.left_out:
                assert self._report is not None
                self._report.left_out[shops[i]] = result.left_out[i]
                logger.warning("round %d: left out shop %s: %s", rnd, shops[i], result.left_out[i])
                continue
            if result.scale[i] < 1.0:
                arrays = next(iter(msg.content.array_records.values()))
                for k in keys:
                    a = arrays[k].numpy()
                    arrays[k] = DecodedArray((base[k] + result.scale[i] * (a - base[k])).astype(a.dtype))
                logger.warning("round %d: clipped shop %s's update to %.3g of its norm", rnd, shops[i],
                               result.scale[i])
            out.append((msg, result.weights[i]))
        if result.exempt:
            logger.info("round %d: %d small update(s) kept despite a direction check (summed pull %.3f of a median "
                        "update, budget robust-small-pull-total=%g)", rnd, len(result.exempt), result.small_pull_used,
                        self.robust.small_pull_total)
        return out

    def _usable(self, msg: Message, report: RoundReport) -> bool:
        """True if a training reply may be aggregated; otherwise note why it was left out."""
        shop = self._node_shop.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")
        if msg.has_error():
            report.left_out[shop] = f"error reply: {msg.error.reason}"
        elif len(msg.content.array_records) != 1 or len(msg.content.metric_records) != 1:
            report.left_out[shop] = "reply must hold one ArrayRecord and one MetricRecord"
        else:
            metrics = next(iter(msg.content.metric_records.values()))
            index, why = self._claim(msg, dict(metrics))
            if why:
                report.left_out[shop] = why
                logger.warning("round %d: left out %s: %s", report.server_round, shop, why)
                return False
            shop = self._shop_of(msg.metadata.src_node_id, index)
            weight = metrics.get(NUM_EXAMPLES)
            arrays = next(iter(msg.content.array_records.values()))
            if weight == 0:  # a late joiner still waiting or warming up: it reports, but does not count
                report.left_out[shop] = "not aggregated yet (joining shop: waiting or warm-up)"
                return False
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                report.left_out[shop] = f"'{NUM_EXAMPLES}' missing or not a positive number"
            elif why := not_scalar_metrics(dict(metrics)):
                report.left_out[shop] = why
            elif isinstance(decoded := self._decode(arrays), str):
                report.left_out[shop] = decoded
            elif not all(np.isfinite(a).all() for a in decoded.values()):
                report.left_out[shop] = "update holds NaN/Inf values"
            else:  # every later reader (screens, the Flower strategy) gets these ndarrays, not a new parse
                for key, value in decoded.items():
                    if not isinstance(arrays[key], DecodedArray):
                        arrays[key] = DecodedArray(value, arrays[key])
                return True
        logger.warning("round %d: left out shop %s: %s", report.server_round, shop, report.left_out[shop])
        return False

    def _decode(self, arrays: ArrayRecord) -> dict[str, np.ndarray] | str:
        """A reply's arrays, each decoded once; or why they cannot be aggregated (undecodable, not numeric,
        wrong names, shapes or dtypes: a reply in another dtype would change the global model's dtype)."""
        encoder = {k for k in arrays if not k.startswith(LOCAL_PREFIX)}
        if self._expected and encoder != set(self._expected):
            diff = sorted(encoder ^ set(self._expected))[:3]
            return f"encoder arrays differ from the global encoder's (e.g. {diff})"
        out: dict[str, np.ndarray] = {}
        for key, array in arrays.items():
            try:
                value = checked_numpy(key, array)  # header checked first: a declared size allocates nothing
            except Exception as exc:  # noqa: BLE001 - any garbage in the bytes is the sender's fault
                return f"array '{key}' cannot be decoded ({type(exc).__name__})"
            if value.dtype.kind not in "fiub" or tuple(value.shape) != tuple(array.shape):
                return f"array '{key}' is not a numeric array of its stated shape {tuple(array.shape)}"
            want = self._expected.get(key) or self._local_spec(key)
            if want is not None and tuple(value.shape) != want[0]:
                return f"array '{key}' has shape {tuple(value.shape)}, the global encoder's is {want[0]}"
            if want is not None and value.dtype != want[1]:
                return f"array '{key}' has dtype {value.dtype}, the global encoder's is {want[1]}"
            out[key] = value
        return out

    def _local_spec(self, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """(shape, dtype) of a shared local array the round's global holds (None for a key it does not hold)."""
        a = self._global_local.get(key)
        return None if a is None else (tuple(a.shape), a.dtype)

    def _forget_anonymous(self, online: set[int]) -> None:
        """Drop the examples cap base, leave-one-out history and turn level kept under ``node-<id>`` (a reply that
        names no shop) for nodes no longer online: with rotating node IDs they would grow without bound, and each
        checkpoint with them. Such a node that comes back starts as a new shop; fedshop's ClientApp always names
        its shop."""
        named = set(self._node_shop.values()) | {self.shop_name(i) for i in self.claims.export()}
        for table in (self._first_claim, self._loo_history, self._loo_turns):
            for name in [k for k in table if k not in named]:
                node = anonymous_node(name)
                if node is not None and node not in online:
                    del table[name]

    def _claim(self, msg: Message, metrics: dict[str, Any]) -> tuple[int | None, str]:
        """The reply's `shop-index` checked once by `ShopClaims`: (index, "") when accepted, (None, why) when
        refused, (None, "") when the reply names none."""
        if SHOP_INDEX not in metrics:
            return None, ""
        return self.claims.check(msg.metadata.src_node_id, metrics[SHOP_INDEX])

    def _shop_of(self, node: int, index: int | None = None) -> str:
        """Shop name of ``node``: that of its accepted claim ``index`` (kept per node for its error replies), else
        the one it had, else ``node-<id>``."""
        if index is not None:
            self._node_shop[node] = self.shop_name(index)
        return self._node_shop.get(node, f"node-{node}")

    # ---- evaluation -------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the new global arrays to every shop for per-task evaluation."""
        rnd = server_round + self.round_offset
        cfg = ConfigRecord({**dict(config), **self.round_config(rnd, "evaluate")})
        self.claims.observe(grid)
        if self._report is not None:
            self._report.eval_split = str(cfg.get(EVAL_SPLIT, "val"))
        # The inner strategy still samples (the same RNG draws as without fusion); fused shops are not asked again.
        messages = [m for m in self.inner.configure_evaluate(rnd, arrays, cfg, grid)
                    if m.metadata.dst_node_id not in self._fused]
        if self._fused:
            logger.info("round %d: %d shop(s) evaluated with their train reply; %d evaluate message(s) for the rest",
                        rnd, len(self._fused), len(messages))
        self._sent = self.wire.prepare(messages, self.key, "evaluate")
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect every shop's metrics, average them per key, and close the round."""
        rnd = server_round + self.round_offset
        report = self._report or RoundReport(server_round=rnd, arrays=ArrayRecord())
        for msg in self.wire.receive(self._readdress(list(replies)), self._sent, "evaluate"):
            metrics = {} if msg.has_error() else dict(next(iter(msg.content.metric_records.values()), {}))
            index: int | None = None
            if msg.has_error():
                reason = msg.error.reason or f"error reply (code {msg.error.code})"
            elif len(msg.content.metric_records) != 1:
                reason = "malformed evaluation reply"
            else:
                reason = not_scalar_metrics(metrics)
                if not reason:
                    index, reason = self._claim(msg, metrics)
            if reason:
                shop = self._node_shop.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")
                logger.warning("round %d: no evaluation from shop %s: %s", rnd, shop, reason)
                continue
            shop = self._shop_of(msg.metadata.src_node_id, index)
            report.evaluate[shop] = evaluation_row(metrics)
        # Error replies carry no shop-index: name shops first seen in this round's evaluation.
        for node, shop in self._node_shop.items():
            if f"node-{node}" in report.left_out:
                report.left_out[shop] = report.left_out.pop(f"node-{node}")
        report.evaluate = dict(sorted(report.evaluate.items()))  # rows in shop order, whatever the arrival order
        report.wire_bytes = self.wire.take_bytes()
        if self.on_round_end is not None:
            self.on_round_end(report)
        self._report = None
        means = mean_by_key(report.evaluate)
        return MetricRecord(means) if means else None


def anonymous_node(name: str) -> int | None:
    """The node ID of a ``node-<id>`` shop name (what a reply without a `shop-index` is reported as), else None."""
    prefix, _, rest = name.partition("-")
    return int(rest) if prefix == "node" and rest.isdigit() else None


def not_scalar_metrics(metrics: dict[str, Any]) -> str:
    """Why a reply's metrics cannot be reported, or "": more than a shop's leak guard sends, a name longer than any
    metric's (each would be a row of metrics.csv every round), or a value that is not a number (a MetricRecord may
    hold lists; ours are numbers)."""
    if len(metrics) > MAX_REPLY_METRICS:
        return (f"{len(metrics)} metrics in one record, more than {MAX_REPLY_METRICS} (what a shop's leak guard "
                "sends at most)")
    long = next((k for k in metrics if len(k) > MAX_METRIC_NAME), None)
    if long is not None:
        return f"metric name '{long[:40]}...' is longer than {MAX_METRIC_NAME} characters"
    bad = next((k for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)), None)
    return "" if bad is None else f"metric '{bad}' is a {type(metrics[bad]).__name__}, not a number"


def evaluation_row(metrics: dict[str, Any]) -> dict[str, float]:
    """A shop's evaluation as the round report keeps it: its metrics without the reply's weight and shop-index."""
    return {k: float(v) for k, v in metrics.items() if k not in (SHOP_INDEX, NUM_EXAMPLES)}


def _mean_per_key(updates: list[tuple[float, dict[str, np.ndarray]]],
                  previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weighted mean of each shared local array over the shops that hold it.

    Hand-written because Flower's aggregation needs identical keys in every reply, while shops
    with different task sets share different heads. Arrays no shop sent keep their previous value.
    """
    out = dict(previous)
    keys = sorted({k for _, local in updates for k in local})
    for key in keys:
        held = [(w, local[key]) for w, local in updates if key in local]
        if len({a.shape for _, a in held}) > 1:  # e.g. loss weights of shops with different task counts
            out.pop(key, None)
            continue
        total = sum(w for w, _ in held)
        out[key] = sum(w / total * a for w, a in held).astype(held[0][1].dtype)
    return out
