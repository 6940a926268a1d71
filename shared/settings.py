"""One typed schema for every setting of a run: the scenario's tables and Flower's run config.

Pydantic v2 models validate a scenario (``[data]``, ``[features]``, ``[model]``, ``[train]``,
``[federation]``, ``[transfer]``) with ``extra="forbid"`` and field ranges, and the Flower run
config (kebab-case keys) is derived from the same fields, so `flwr run .`, `fedshop simulate`, the
ServerApp and the ClientApp cannot disagree on a key, a default or a range.

Where a key goes (a one-place change):
* a federation/run setting: a field of `FederationTable` below (name, type, default, range, one-line
  description); its run-config key is its name in kebab case (see `RUN_KEY_NAMES` for the three old
  exceptions), and `tests/test_settings.py` then asks for it in pyproject.toml and docs/settings.md;
* a run-only key that is not a scenario setting (paths, labels, test hooks): a field of `RunSettings`;
* a feature/model/train/world key: the field of its dataclass (`FeatureConfig`, `ModelConfig`,
  `TrainConfig`, `WorldConfig`); its range, if it needs one, in `TABLE_RANGES` here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from shared.compression import MODES as COMPRESSION_MODES
from shared.datasets.synthetic import WorldConfig
from shared.features import FeatureConfig
from shared.model import ModelConfig
from shared.protocol import SPLITS
from shared.train import TrainConfig

# Names that the server maps to Flower's strategies (server.strategies.STRATEGIES; a test keeps both equal).
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
              "bulyan")
OBJECTIVES = ("fedavg", "meta")
SHARE_MODES = ("encoder", "all-shareable")
MIX_REPLIES = ("trained", "update")  # what a shop replies under the personal mix (client/shop_round.py, `mix_reply`)
FAULT_KINDS = ("nan", "error", "sleep")  # test-only faults a shop injects (client/shop_round.py)
ENGINES = ("auto", "ray", "pool")  # pool unless Ray is named | Flower's engine | simulations.pool_engine
FLOAT_EXACT_INT = 2**53  # every whole number up to this is exactly a float
# The three run-config keys that are not the kebab-case of their scenario name (kept for old run configs).
RUN_KEY_NAMES = {"rounds": "num-server-rounds", "prox_mu": "proximal-mu", "max_epsilon": "dp-max-epsilon"}


class ScenarioError(ValueError):
    """A scenario file or run config that cannot be used: names the file, the key, the bad value and the fix."""


def run_key(name: str) -> str:
    """The run-config (kebab-case) key of a settings field."""
    return RUN_KEY_NAMES.get(name, name.replace("_", "-"))


def _aliases(name: str) -> AliasChoices:
    """A field is read by its scenario name, its run-config key, or the old snake form of that key."""
    key = run_key(name)
    return AliasChoices(name, key, key.replace("-", "_"))


class _Table(BaseModel):
    """Base of every table: unknown keys, NaN, infinity and wrong types are errors; assignment is validated.

    Strict: a value of another type is refused, never converted ("3" or 3.0 for a whole number, "true"
    for true/false, 1 for a string). The one conversion kept is a whole number for a number field (TOML
    and Flower's run config write `1` for 1.0).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_number_fits_a_float(cls, value: Any, info: ValidationInfo) -> Any:
        """A whole number for a number field must be one a float holds exactly (|n| <= 2^53), not rounded."""
        field = cls.model_fields.get(info.field_name or "")
        if (field is not None and field.annotation is float and isinstance(value, int)
                and not isinstance(value, bool) and abs(value) > FLOAT_EXACT_INT):
            raise PydanticCustomError("whole_number_too_large",
                                      "a whole number beyond 2^53 would be rounded to {rounded}",
                                      {"rounded": repr(float(value))})
        return value


# ----------------------------------------------------------------------------------------- [federation]
class FederationTable(_Table):
    """The scenario's ``[federation]`` table: every setting of a federated run."""

    model_config = ConfigDict(alias_generator=AliasGenerator(validation_alias=_aliases), validate_by_name=True)

    rounds: int = Field(10, ge=1, description="server rounds")
    strategy: Literal[STRATEGIES] = Field("fedavg", description="Flower strategy that aggregates the encoder")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of shops sampled per round")
    min_shops: int = Field(2, ge=1, description="a round needs at least this many usable replies")
    max_short_rounds: int = Field(3, ge=0, description="the run fails after more rounds than this in a row "
                                  "short of min_shops")
    local_epochs: int = Field(1, ge=1, description="local epochs per round"
                              " (a shop refuses more than its node config's cap-local-epochs, default 50)")
    max_steps: int = Field(0, ge=0, description="cap on local optimiser steps per round (0 = none;"
                           " a shop refuses more than its cap-max-steps, default 1e6)")
    personal_mix: float = Field(0.0, ge=0, description="n0 of the personal mix: a shop starts from (1-b) global + "
                                "b own encoder, b = n/(n+n0); 0 = off")
    mix_reply: Literal[MIX_REPLIES] = Field("trained", description="with the personal mix: what a shop replies; "
                                            "trained = the encoder it trained from its mixed start; update = the "
                                            "global plus its training update (trained - start), so the coordinator "
                                            "averages training only, not the pull back to the shop's own encoder")
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal weight (strategy fedprox)")
    server_lr: float = Field(0.0, ge=0, description="FedAdam/FedYogi eta, FedAvgM server lr; 0 = the "
                             "strategy's default")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="FedAvgM server momentum")
    join_round: int = Field(0, ge=0, description="round at which late joiners join (0 = never)")
    warmup_rounds: int = Field(1, ge=0, description="rounds a joining shop trains its local part with the "
                               "encoder frozen before its updates count")
    objective: Literal[OBJECTIVES] = Field("fedavg", description="fedavg | meta (Reptile-style short inner loops)")
    meta_inner_steps: int = Field(20, ge=1, description="inner steps per round with objective = meta"
                                  " (a shop refuses more than its cap-meta-inner-steps, default 100)")
    meta_outer_step: float = Field(1.0, gt=0, description="Reptile outer step applied by each shop to its reply")
    round_timeout: float = Field(600.0, gt=0, description="seconds before a shop's reply counts as missing")
    test_every_round: bool = Field(False, description="every shop computes its test metrics every round; false = "
                                   "only for tasks whose validation primary metric beat the shop's best so far, and "
                                   "in the last round (the rounds reports can pick: same reported numbers)")
    fuse_evaluate: bool = Field(True, description="with the personal mix in force, a shop evaluates its own "
                                "encoder at the end of its train round and the train reply carries the metrics (one "
                                "message per shop per round; the same numbers); false = a separate evaluate message")
    # screens against a malicious shop (server/robust.py, docs/robustness.md); 0 (min-cosine: -1) turns one off
    robust_norm_factor: float = Field(4.0, ge=0, description="update norm above this x the round's median update "
                                      "norm: left out (or clipped); 0 = off, else >= 1")
    robust_norm_action: Literal["leave-out", "clip"] = Field("leave-out", description="leave-out | clip")
    robust_min_cosine: float = Field(-0.1, ge=-1, le=1, description="leave out updates whose cosine with the round's "
                                     "median update is below this; -1 = off")
    robust_examples_cap: float = Field(10.0, ge=0, description="num-examples capped at this x the round's median "
                                       "claim and x the shop's first claim; 0 = off, else >= 1")
    robust_weight_cap: float = Field(4.0, ge=0, description="no shop above this / n of the aggregation weight; "
                                     "0 = off, else >= 1")
    robust_loo_min_cosine: float = Field(-0.08, ge=-1, le=1, description="leave out updates whose cosine with the "
                                         "mean of the other kept updates is below this (>= 5 updates, never a "
                                         "majority); -1 = off")
    robust_loo_turn_margin: float = Field(0.0, ge=0, le=2, description="sudden turn: leave out a shop whose "
                                          "leave-one-out cosine is below robust-loo-min-cosine and this far below "
                                          "its last 2 rounds' mean (raw and vs the consensus), while it stays this "
                                          "far below and below the round's median; 0 = off")
    robust_small_pull: float = Field(0.01, ge=0, le=1, description="small-update exemption from the two direction "
                                     "checks: an update whose weight share x norm is at most this x the round's "
                                     "median update norm is kept (a tiny shop's cosine is noise), while ...")
    robust_small_pull_total: float = Field(0.05, ge=0, le=1, description="... the exempted updates' pulls sum to at "
                                           "most this x the median norm (bounds colluding tiny shops); 0 = off")
    robust_num_malicious: int = Field(1, ge=0, description="krum | multikrum | bulyan: assumed attackers")
    robust_trim_beta: float = Field(0.2, ge=0, lt=0.5, description="fedtrimmedavg: share cut on each side")
    compression: Literal[COMPRESSION_MODES] = Field(
        "none", description="encoder messages: none | fp16 | sparse-fp16 | sparse-int8 (docs/federation.md)")
    engine: Literal[ENGINES] = Field("auto", description="simulation engine: auto (pool, or ray when a Ray "
                                     "cluster is named: --ray-address / RAY_ADDRESS) | ray (Flower's; listens "
                                     "beyond loopback) | pool (forked workers, no listener)")
    workers: int = Field(0, ge=0, description="pool engine: worker processes (0 = one per CPU)")
    secure_aggregation: bool = Field(False, description="Flower's SecAgg+: the coordinator sees only the sum")
    secagg_num_shares: float = Field(1.0, gt=0, description="<= 1: share of shops each key is shared with; "
                                     "> 1: a count")
    secagg_reconstruction_threshold: float = Field(0.6, gt=0, description="<= 1: share of num_shares needed to "
                                                   "unmask; > 1: a count")
    secagg_clipping_range: float = Field(8.0, gt=0, description="encoder values are clipped to +-this before "
                                         "quantisation")
    secagg_quantization_range: int = Field(1 << 22, ge=2, description="quantisation levels of SecAgg+")
    secagg_max_weight: float = Field(1.0, gt=0, description="largest per-shop weight (raise with weighting "
                                     "examples)")
    secagg_weighting: Literal["uniform", "examples"] = Field("uniform", description="uniform | examples")
    secagg_timeout: float = Field(0.0, ge=0, description="seconds per SecAgg+ stage; 0 = the run's round_timeout")
    dp_noise_multiplier: float = Field(0.0, ge=0, description="central DP noise z (> 0 turns it on); unit: a shop")
    dp_clipping_norm: float = Field(1.0, gt=0, description="central DP: bound S on each shop's encoder update")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="central DP delta")
    max_epsilon: float = Field(0.0, ge=0, description="central DP budget: the run stops before exceeding it "
                               "(0 = none)")
    dp_num_shops: int = Field(0, ge=0, description="shops per round for central DP; 0 = every training shop")
    dpsgd_noise_multiplier: float = Field(0.0, ge=0, description="DP-SGD in every shop (> 0 turns it on)")
    dpsgd_clipping_norm: float = Field(1.0, gt=0, description="DP-SGD per-unit gradient bound")
    dpsgd_unit: Literal["user", "record"] = Field("user", description="DP-SGD unit of privacy: user | record")
    dpsgd_sample_rate: float = Field(0.05, gt=0, le=1, description="DP-SGD Poisson sampling rate of units per step")
    dpsgd_steps: int = Field(0, ge=0, description="DP-SGD steps per round; 0 = one expected pass over the units"
                             " (a shop refuses more than its cap-dpsgd-steps, default 1e6)")
    dpsgd_lr: float = Field(0.01, gt=0, description="DP-SGD learning rate")
    dpsgd_delta: float = Field(1e-5, gt=0, lt=1, description="DP-SGD delta")
    dpsgd_max_epsilon: float = Field(0.0, ge=0, description="a shop refuses a round past this (0 = none)")

    @model_validator(mode="after")
    def _combinations(self) -> FederationTable:
        if self.robust_small_pull_total > 0 and not 0 < self.robust_small_pull <= self.robust_small_pull_total:
            raise ValueError(f"robust_small_pull = {self.robust_small_pull} is outside (0, robust_small_pull_total = "
                             f"{self.robust_small_pull_total}]: no update could use the exemption, or one alone could "
                             "use more than the total. Fix: e.g. 0.01, at most robust_small_pull_total (0 turns the "
                             "exemption off)")
        for name in ("robust_norm_factor", "robust_examples_cap", "robust_weight_cap"):
            if 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} is between 0 and 1: it would cap or leave out the "
                                 "median (honest) shop itself. Fix: give a factor >= 1 (e.g. 4), or 0 to turn it off")
        if self.compression != "none" and self.secure_aggregation:
            raise ValueError(f"compression = '{self.compression}' with secure_aggregation = true is refused: SecAgg+ "
                             "masks dense, fixed-size vectors, and a compressed delta is neither. Fix: set "
                             "compression = 'none', or secure_aggregation = false")
        if self.compression != "none" and self.dp_noise_multiplier > 0:
            raise ValueError(f"compression = '{self.compression}' with dp_noise_multiplier > 0 is refused: fp16/int8 "
                             "rounding of a clipped update can exceed dp_clipping_norm, which the noise is calibrated "
                             "to. Fix: set compression = 'none', or dp_noise_multiplier = 0")
        if self.secure_aggregation and self.dp_noise_multiplier > 0:
            raise ValueError("secure_aggregation = true with dp_noise_multiplier > 0 is not supported: the SecAgg+ "
                             "path has no central-DP noise. Fix: choose one, or use dpsgd_* for DP with SecAgg+")
        if self.dp_noise_multiplier > 0 and self.join_round > 0:
            raise ValueError("dp_noise_multiplier > 0 with join_round > 0 is not supported: noise is calibrated "
                             "to all federation shops, but waiting joiners are not averaged. Fix: set "
                             "join_round = 0 under central DP")
        return self


FEDERATION_DEFAULTS: dict[str, Any] = FederationTable().model_dump()


# ----------------------------------------------------------------------------------------- run config
class RunSettings(FederationTable):
    """The Flower run config of a federated run: every federation setting plus the run's own keys."""

    scenario: str = Field("default", min_length=1, description="built-in scenario name or path to a scenario TOML")
    seed: int = Field(-1, ge=-1, description="-1 = the scenario's seed")
    run_dir: str = Field("", description="where metrics, checkpoints and simulated shop state go")
    method: str = Field("fedshop", min_length=1, description="label in metrics.csv")
    share: Literal[SHARE_MODES] = Field("encoder", description="encoder | all-shareable (FedAvg-all baseline)")
    eval_split: str = Field("val+test", description="split(s) evaluated after each round, e.g. val or val+test")
    final_split: str = Field("test", description="split(s) of the last round when eval-split is one split")
    resume: bool = Field(False, description="continue from the newest checkpoint in run-dir")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in run-dir")
    fault_inject: str = Field("", description="test-only: nan:1, error:2, sleep:1@2 (kind:shop-index[@round]); "
                              "shops refuse it unless their node config has allow-test-faults=true")
    fault_sleep: float = Field(30.0, ge=0, description="test-only: seconds of a sleep fault (refused like "
                               "fault-inject)")
    app_signature: str = Field("", description="deployment: the coordinator's FAB signature")

    @field_validator("fault_inject")
    @classmethod
    def _faults(cls, value: str) -> str:
        for item in filter(None, (i.strip() for i in value.split(","))):
            kind, _, target = item.partition(":")
            index, _, at_round = target.partition("@")
            if kind not in FAULT_KINDS or not index.isdigit() or (at_round and not at_round.isdigit()):
                raise ValueError(f"{item!r} is not kind:shop-index[@round] with kind one of {list(FAULT_KINDS)}, "
                                 "e.g. nan:1 or sleep:0@2")
        return value

    def faults(self) -> list[tuple[str, int, int | None]]:
        """The test-only faults of `fault-inject` as (kind, shop index, round or None for every round)."""
        out = []
        for item in filter(None, (i.strip() for i in self.fault_inject.split(","))):
            kind, _, target = item.partition(":")
            index, _, at_round = target.partition("@")
            out.append((kind, int(index), int(at_round) if at_round else None))
        return out

    @field_validator("eval_split", "final_split")
    @classmethod
    def _splits(cls, value: str) -> str:
        bad = [s for s in value.split("+") if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; use one or more of {list(SPLITS)} joined by '+'")
        return value

    # Old attribute names of the server's FederationSettings.
    @property
    def num_server_rounds(self) -> int:
        """`rounds` under its run-config name."""
        return self.rounds

    @property
    def proximal_mu(self) -> float:
        """`prox_mu` under its run-config name."""
        return self.prox_mu

    @property
    def dp_max_epsilon(self) -> float:
        """`max_epsilon` under its run-config name."""
        return self.max_epsilon

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "run config") -> RunSettings:
        """Parse a run config (kebab-case keys); any bad key or value is a `ScenarioError` naming it."""
        return validate(cls, dict(config), where, style="run")

    def to_run_config(self) -> dict[str, Any]:
        """The Flower run config (kebab-case keys, every key) of these settings."""
        return {run_key(name): value for name, value in self.model_dump().items()}

    def dpsgd_kwargs(self) -> dict[str, Any]:
        """The shops' `DPSGDConfig` keyword arguments (without seed)."""
        return {"noise_multiplier": self.dpsgd_noise_multiplier, "max_grad_norm": self.dpsgd_clipping_norm,
                "unit": self.dpsgd_unit, "sample_rate": self.dpsgd_sample_rate, "steps_per_round": self.dpsgd_steps,
                "lr": self.dpsgd_lr, "delta": self.dpsgd_delta, "max_epsilon": self.dpsgd_max_epsilon or None}

    def client_config(self, seed: int) -> dict[str, Any]:
        """What every shop needs each round (the messages' ConfigRecord); DP-SGD keys only when it is on."""
        names = SHOP_KEYS + (DPSGD_KEYS if self.dpsgd_noise_multiplier > 0 else ())
        return {**{run_key(n): getattr(self, n) for n in names}, "seed": seed}


# Keys the coordinator forwards to every shop each round (messages stay small: only what a shop reads).
SHOP_KEYS = ("scenario", "local_epochs", "share", "personal_mix", "mix_reply", "run_dir", "max_steps", "fault_inject",
             "fault_sleep", "join_round", "warmup_rounds", "objective", "meta_inner_steps", "meta_outer_step")
DPSGD_KEYS = tuple(n for n in FederationTable.model_fields if n.startswith("dpsgd_"))


class ShopRoundSettings(RunSettings):
    """What a shop reads from one message: the run config overridden by the coordinator's ConfigRecord.

    Unknown keys are ignored here (Flower's strategies add their own, e.g. ``clipping_norm``); the
    coordinator has already refused unknown run-config keys.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)  # one object per message, read by every mod

    server_round: int = Field(0, ge=0, description="set by Flower's strategies")
    eval_split: str = Field("val", description="a message without eval-split evaluates val (as the leak guard "
                            "assumes)")
    freeze_encoder: bool = Field(False, description="train the local part only")
    test_on_improvement: bool = Field(False, description="set by the coordinator per evaluate message: test only "
                                      "the tasks whose validation primary metric improved (client/best_val.py)")
    evaluate_after_train: bool = Field(False, description="set by the coordinator per train message: also evaluate "
                                       "(eval-split, test-on-improvement of the message) after training and reply the "
                                       "metrics in a second MetricRecord (`federation.fuse_evaluate`)")

    @classmethod
    def from_message(cls, run_config: dict[str, Any], sent: dict[str, Any]) -> ShopRoundSettings:
        """Parse the node's run config updated with the message's config, once per message."""
        return validate(cls, {**dict(run_config), **dict(sent)}, "message config", style="run")



# ------------------------------------------------------------------------ [features] [model] [train] ...
# Ranges of the dataclass-backed tables; keys and defaults live in the dataclasses themselves.
TABLE_RANGES: dict[type, dict[str, Any]] = {
    FeatureConfig: {"hash_buckets": Field(ge=2), "product_buckets": Field(ge=2), "history_len": Field(ge=0),
                    "split": Literal["temporal", "leave-last-out"], "val_fraction": Field(gt=0, lt=1),
                    "test_fraction": Field(gt=0, lt=1), "sampled_negatives": Field(ge=1), "seed": Field(ge=0)},
    ModelConfig: {"embed_dim": Field(ge=1), "n_experts": Field(ge=1), "expert_dim": Field(ge=1),
                  "tower_dim": Field(ge=1), "dropout": Field(ge=0, lt=1), "id_dropout": Field(ge=0, lt=1),
                  "weighting": Literal["fixed", "uncertainty", "gradnorm", "dwa"],
                  "tower_prior": Literal["zero", "base-rate"]},
    TrainConfig: {"epochs": Field(ge=1), "batch_size": Field(ge=1), "lr": Field(gt=0), "weight_decay": Field(ge=0),
                  "prox_mu": Field(ge=0), "max_steps": Field(ge=0), "seed": Field(ge=0)},
    WorldConfig: {"n_shops": Field(ge=1), "seed": Field(ge=0), "n_late_joiners": Field(ge=0),
                  "n_categories": Field(ge=1), "n_top_categories": Field(ge=1), "latent_dim": Field(ge=1),
                  "heterogeneity": Field(gt=0), "overlap": Field(ge=0, le=1), "pool_size": Field(ge=1),
                  "max_impressions": Field(ge=1), "min_impressions": Field(ge=1), "n_small_shops": Field(ge=0),
                  "late_joiner_impressions": Field(ge=1), "days": Field(ge=1), "min_items": Field(ge=1),
                  "impressions_per_user": Field(gt=0), "impressions_per_item": Field(gt=0),
                  "size_exponent": Field(gt=0), "n_brands_per_category": Field(ge=1), "n_regions": Field(ge=1),
                  "base_ctr": Field(gt=0, lt=1), "cart_rate": Field(gt=0, lt=1), "base_cvr": Field(gt=0, lt=1),
                  "promo_rate": Field(ge=0, le=1), "task_dropout": Field(ge=0, lt=1)},
}
NON_NEGATIVE_BY_DEFAULT = (WorldConfig,)  # every other number of these tables is a size, sd or rate: >= 0


def _table_from(cls: type, name: str) -> type[_Table]:
    """A pydantic table with the dataclass's keys and defaults and the ranges of `TABLE_RANGES`."""
    hints = typing.get_type_hints(cls)
    ranges = TABLE_RANGES.get(cls, {})
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rule = ranges.get(f.name)
        if rule is None and cls in NON_NEGATIVE_BY_DEFAULT and hints[f.name] in (int, float):
            rule = Field(ge=0)
        if isinstance(rule, FieldInfo):
            spec[f.name] = (Annotated[hints[f.name], rule], default)
        elif rule is not None:  # a Literal of the allowed words
            spec[f.name] = (rule, default)
        else:
            spec[f.name] = (hints[f.name], default)
    return create_model(name, __base__=_Table, __doc__=f"The scenario's table of {cls.__name__}.", **spec)


FeaturesTable = _table_from(FeatureConfig, "FeaturesTable")
ModelTable = _table_from(ModelConfig, "ModelTable")
_TrainBase = _table_from(TrainConfig, "TrainBase")
SyntheticTable = _table_from(WorldConfig, "SyntheticTable")


class TrainTable(_TrainBase):
    """The scenario's ``[train]`` table (``epochs`` is refused: every runner trains federation.local_epochs)."""

    @model_validator(mode="before")
    @classmethod
    def _no_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "epochs" in data:
            raise ValueError("`epochs` is not read (a federated round, local-only and the oracle all train "
                             "[federation] local_epochs per round). Fix: remove it and set federation.local_epochs "
                             "instead")
        return data


class FeaturesTableChecked(FeaturesTable):  # type: ignore[valid-type,misc]
    """``[features]`` with the split fractions leaving rows for training."""

    @model_validator(mode="after")
    def _fractions(self) -> FeaturesTableChecked:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves no "
                             "training rows. Fix: keep their sum below 1 (default 0.1 + 0.1)")
        return self


class DataTable(_Table):
    """The scenario's ``[data]`` table: where the shops come from."""

    source: Literal["synthetic", "movielens", "amazon", "shop-dirs"] = Field("synthetic", description="where shops "
                                                                              "come from")
    path: str | None = Field(None, description="movielens/amazon files (or $FEDSHOP_MOVIELENS / $FEDSHOP_AMAZON)")
    split_by: Literal["region", "genre"] = Field("region", description="movielens: how users/items become shops")
    negatives_per_positive: int = Field(1, ge=0, description="movielens: sampled non-clicks per rating")
    n_shops: int = Field(1, ge=1, description="amazon: shops to split the ratings into")
    paths: list[str] = Field(default_factory=list, description="shop-dirs: merchant shop directories")
    synthetic: SyntheticTable = Field(default_factory=SyntheticTable)  # type: ignore[valid-type]


class TransferTable(_Table):
    """The scenario's ``[transfer]`` table (`fedshop transfer`)."""

    late_joiners: list[str] | None = Field(None, description="shops held out of training; default: the "
                                           "generator's choice")
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.01, 0.05, 0.10, 0.25, 1.0], min_length=1, description="data fractions; each > 0, "
        "<= 1")
    modes: list[Literal["scratch", "frozen", "finetune", "meta"]] = Field(
        default_factory=lambda: ["scratch", "frozen", "finetune", "meta"],
        description="each one of scratch, frozen, finetune, meta")


class ScenarioSettings(_Table):
    """A whole scenario file."""

    name: str | None = None
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**32)
    data: DataTable = Field(default_factory=DataTable)
    features: FeaturesTableChecked = Field(default_factory=FeaturesTableChecked)  # type: ignore[valid-type]
    model: ModelTable = Field(default_factory=ModelTable)  # type: ignore[valid-type]
    train: TrainTable = Field(default_factory=TrainTable)
    federation: FederationTable = Field(default_factory=FederationTable)
    transfer: TransferTable = Field(default_factory=TransferTable)


# ----------------------------------------------------------------------------------------- errors
def _known_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys that the table at ``loc`` (a path of field names) accepts."""
    current: Any = model
    for part in loc:
        info = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if info is None:
            return []
        current = info.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _table_name(loc: tuple, style: str) -> str:
    if style == "run":
        return "run config"
    return f"[{'.'.join(str(p) for p in loc)}]" if loc else "top level"


def _key_name(loc: tuple, key: str, style: str) -> str:
    return run_key(key) if style == "run" else ".".join([*map(str, loc), key])


def _fix(err: dict[str, Any], dotted: str) -> str:
    """The fix for one pydantic error, in words (no pydantic dump)."""
    kind, ctx = err["type"], err.get("ctx", {})
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        return f"set {dotted} to a value {bounds[kind].format(**ctx)}"
    if kind == "whole_number_too_large":
        return f"set {dotted} to at most 9007199254740992 (2^53), or write it as a decimal such as 1e16"
    if kind == "finite_number":
        return f"set {dotted} to a finite number (not nan or inf)"
    if kind == "literal_error":
        allowed = [a.strip().strip("'\"") for a in str(ctx.get("expected", "")).replace(" or ", ", ").split(",")]
        close = difflib.get_close_matches(str(err.get("input")), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{hint}use one of {allowed}"
    quoted = " (without quotes)" if isinstance(err.get("input"), str) else ""
    if kind.startswith("int_"):
        return f"set {dotted} to a whole number{quoted}, e.g. 3 rather than 3.0 or \"3\""
    if kind.startswith(("float_", "bool_", "string_", "list_")):
        word = {"float": f"a number{quoted}", "bool": f"true or false{quoted}", "string": "a quoted string",
                "list": "a list [...]"}
        return f"set {dotted} to {word[kind.split('_')[0]]}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"make {dotted} a table ([{dotted}] with key = value lines)"
    return "see docs/settings.md for the key's type and range"


def _problem(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def _describe(model: type[BaseModel], err: dict[str, Any], where: str, style: str) -> str:
    """One sentence for one validation error: file, table.key, bad value, fix."""
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    if err["type"] == "value_error" and "Fix:" in str(err.get("msg")):  # our own cross-key checks
        return f"{where}: {_problem(err)}" if style == "run" else f"{where}: {_table_name(loc, style)}: {_problem(err)}"
    if not loc:
        return f"{where}: {_problem(err)}. Fix: {_fix(err, 'the scenario')}"
    *table, key = loc
    table_t = tuple(table)
    if err["type"] == "extra_forbidden":
        known = _known_names(model, table_t)
        names = {**{k: k for k in known}, **({run_key(k): k for k in known} if style == "run" else {})}
        close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.6)  # by either spelling
        if style == "run":
            known, close = [run_key(k) for k in known], [run_key(names[c]) for c in close]
        is_table = isinstance(err.get("input"), dict) and style != "run"
        what = f"table [{'.'.join([*map(str, table_t), str(key)])}]" if is_table else f"key {key!r}"
        hint = (f"did you mean {'[' + close[0] + ']' if is_table else repr(close[0])}? " if close else "")
        table_name = "" if style == "run" else f"{_table_name(table_t, style)}: "
        return f"{where}: {table_name}unknown {what}. Fix: {hint}use one of {sorted(known)}"
    dotted = _key_name(table_t, str(key), style)
    value = err.get("input")
    shown = f" = {value!r}" if not isinstance(value, dict) else ""
    return f"{where}: {dotted}{shown}: {_problem(err)}. Fix: {_fix(err, dotted)}"


def validate(model: type[BaseModel], data: dict[str, Any], where: str, *, style: str = "scenario") -> Any:
    """``model.model_validate(data)``, or a `ScenarioError` whose lines name file, key, value and fix."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(model, e, where, style) for e in exc.errors(include_url=False)]
        raise ScenarioError("\n".join(dict.fromkeys(lines))) from None


def validate_scenario(raw: dict[str, Any], path: Path | None = None) -> ScenarioSettings:
    """Validate a scenario dict (as read from TOML, overrides applied) against the schema."""
    return validate(ScenarioSettings, raw, str(path or "scenario"))


# ----------------------------------------------------------------------------------------- reference
def _range(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sym} {getattr(meta, attr)}")
    args = typing.get_args(info.annotation)
    if typing.get_origin(info.annotation) is Literal:
        parts.append(" \\| ".join(map(str, args)))
    return ", ".join(parts) or {bool: "true \\| false", str: "text"}.get(info.annotation, "any")


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def settings_reference() -> str:
    """Markdown tables of every scenario key and run-config key with default and range (docs/settings.md)."""
    out = ["# Settings reference", "",
           "Generated from `shared/settings.py` by `python -m shared.settings > docs/settings.md`; "
           "`tests/test_settings.py` fails when this file and the schema differ. Bad values are refused when the "
           "scenario loads (docs/bad-input.md, \"Scenario settings\"); types are strict (`3.0` or `\"3\"` for a whole "
           "number and `\"true\"` for true/false are refused; a whole number is a number). `seed` in [features], "
           "[train] and [data.synthetic] defaults to the scenario's top-level `seed` (>= 0); [train] `epochs` is "
           "refused (federation.local_epochs is what every runner trains).", ""]
    tables = [("[features]", FeaturesTableChecked), ("[model]", ModelTable), ("[train]", TrainTable),
              ("[data]", DataTable), ("[data.synthetic]", SyntheticTable), ("[transfer]", TransferTable)]
    for title, model in tables:
        out += [f"## {title}", "", "| key | default | range | what |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            if (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)) or (
                    model is TrainTable and name == "epochs"):  # refused: federation.local_epochs is read
                continue
            default = info.get_default(call_default_factory=True)
            out.append(f"| `{name}` | {_fmt(default)} | {_range(info)} | {_cell(info.description)} |")
        out.append("")
    out += ["## [federation] and the run config", "",
            "Every `[federation]` key is also a Flower run-config key (`[tool.flwr.app.config]`, "
            "`--run-config`), in kebab case.", "",
            "| scenario key | run-config key | default | range | what |", "|---|---|---|---|---|"]
    for name, info in RunSettings.model_fields.items():
        scen = f"`{name}`" if name in FederationTable.model_fields else "(run only)"
        out.append(f"| {scen} | `{run_key(name)}` | {_fmt(info.default)} | {_range(info)} | "
                   f"{_cell(info.description)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
