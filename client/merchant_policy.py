"""The merchant's own limits on what a coordinator may order: test faults and the size of a round's work.

Everything a shop reads from a message (and from the run config, which the coordinator also writes) is
the coordinator's word. What the merchant agreed to lives in its SuperNode's node config
(``--node-config``), which only the merchant sets:

* ``allow-test-faults`` (default false): test-only fault knobs (`fault-inject`, `fault-sleep`) are obeyed
  only when it is true. Simulations, where one person runs the coordinator and every shop, may set
  `FEDSHOP_ALLOW_TEST_FAULTS=1` in the shops' environment instead (Flower's Ray engine gives simulated
  nodes a fixed node config); `simulations.federated.run_federated` sets it for runs that inject faults.
* ``cap-local-epochs`` (50), ``cap-max-steps`` (1,000,000), ``cap-meta-inner-steps`` (100),
  ``cap-dpsgd-steps`` (1,000,000): the largest value of each work setting the shop accepts. The
  defaults are far above every shipped scenario and benchmark (largest: local_epochs 3, max_steps 15,
  meta_inner_steps 20, dpsgd_steps 3).
* ``cap-fault-sleep`` (60 s): the longest `fault-sleep` a shop that allows test faults obeys.

A deployed shop (node config with ``shop-dir``) also refuses what the coordinator could use to reach the
merchant's files (docs/robustness.md, "What a coordinator may order"; docs/deployment.md, "Node config"):

* ``scenario``: only a built-in scenario name (it ships inside the signed app) or exactly the file the
  merchant pinned with ``allow-scenario-path`` (an absolute path, compared as text: the coordinator's value
  is never looked up on disk first, so a refusal says nothing about which files exist);
* no ``state-dir`` in the node config: refused, because the shop would otherwise write under the
  coordinator's `run-dir` (simulations, with ``partition-id``, keep writing there).

Every shop, simulated or deployed, refuses an `eval-split` that names a split twice (`val+val+...` would
evaluate it once per repeat), DP-SGD whose expected passes over the units (steps x `dpsgd-sample-rate`,
steps = ceil(1 / rate) when `dpsgd-steps` is 0) exceed `cap-local-epochs` or whose derived steps exceed
`cap-dpsgd-steps`, and any text setting longer than `MAX_TEXT` characters.

A message that breaks one of these gets an error reply whose reason names the key, the value, the limit
and the fix (`merchant_policy_mod`, before any other handler code: nothing is loaded, trained or saved).
The reason holds only setting names and numbers the coordinator sent or the merchant configured, never
shop data nor a path the merchant configured, so unlike handler errors (`client.leak_guard`) it is sent as
is; `reply_shield`, the app's outermost mod, makes sure no other text leaves in an error reply.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.message_settings import settings_for
from shared.protocol import BLOCKED_TEXT, ERROR_CODE_BLOCKED, FAILED_TEXT, UNDECODABLE_TEXT, UNPACK_TEXT, eval_splits
from shared.scenario import SCENARIO_DIR
from shared.settings import RunSettings, ScenarioError, ShopRoundSettings, run_key

logger = logging.getLogger(__name__)

ALLOW_TEST_FAULTS = "allow-test-faults"  # node-config key: obey the test-only fault knobs
ALLOW_TEST_FAULTS_ENV = "FEDSHOP_ALLOW_TEST_FAULTS"  # the same for simulated shops (value "1")
# ordered work setting (ShopRoundSettings field) -> (node-config key of its cap, default cap)
WORK_CAPS: dict[str, tuple[str, int]] = {
    "local_epochs": ("cap-local-epochs", 50),
    "max_steps": ("cap-max-steps", 1_000_000),
    "meta_inner_steps": ("cap-meta-inner-steps", 100),
    "dpsgd_steps": ("cap-dpsgd-steps", 1_000_000),
}
TEST_FAULT_FIELDS = ("fault_inject", "fault_sleep")  # every test-only knob of the settings schema
CAP_FAULT_SLEEP = "cap-fault-sleep"  # node-config key: the longest sleep fault obeyed (seconds)
DEFAULT_CAP_FAULT_SLEEP = 60.0  # the coordinator's default fault-sleep is 30 s
ALLOW_SCENARIO_PATH = "allow-scenario-path"  # node-config key: the one scenario file a deployed shop may load
STATE_DIR, SHOP_DIR = "state-dir", "shop-dir"
MAX_TEXT = 4096  # characters of any text setting (PATH_MAX on Linux): longer is refused
BUILTIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # no dot, no slash: never a path
REFUSED_PREFIX = "shop refused the order: "
# Error reasons that may leave the shop (`reply_shield`): fixed texts, or a refusal (names and numbers only)
FIXED_REASONS = frozenset({FAILED_TEXT, BLOCKED_TEXT, UNPACK_TEXT, UNDECODABLE_TEXT})


class MerchantRefusal(ValueError):
    """An order the merchant's node config does not allow; the text names the key, the limit and the fix."""


def _truthy(value: Any) -> bool:
    """A node-config switch: true, "true", 1 or "1" (Flower parses `allow-test-faults=true` as a bool)."""
    return value is True or (type(value) is int and value == 1) or str(value).strip().lower() in ("true", "1")


def faults_allowed(node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> bool:
    """Whether this shop obeys test-only faults: its node config's `allow-test-faults`, or the simulation's env."""
    env = os.environ if environ is None else environ
    return _truthy(node_config.get(ALLOW_TEST_FAULTS, False)) or env.get(ALLOW_TEST_FAULTS_ENV, "") == "1"


def work_caps(node_config: Mapping[str, Any]) -> dict[str, int]:
    """Each work setting's cap: the node config's `cap-*` key or the default; a bad cap is a MerchantRefusal."""
    caps = {}
    for name, (key, default) in WORK_CAPS.items():
        value = node_config.get(key, default)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if type(value) is float and value.is_integer():
            value = int(value)
        if type(value) is not int or value < 1:
            raise MerchantRefusal(f"this shop's node config {key} is not a whole number >= 1. Fix (merchant): set "
                                  f"--node-config \"{key}=N\" with N >= 1, or remove it (default {default})")
        caps[name] = value
    return caps


def fault_sleep_cap(node_config: Mapping[str, Any]) -> float:
    """The longest sleep fault this shop obeys: `cap-fault-sleep` (seconds > 0) or 60; bad: a MerchantRefusal."""
    value = node_config.get(CAP_FAULT_SLEEP, DEFAULT_CAP_FAULT_SLEEP)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise MerchantRefusal(f"this shop's node config {CAP_FAULT_SLEEP} is not a number of seconds > 0. Fix "
                              f"(merchant): set --node-config \"{CAP_FAULT_SLEEP}=S\" with S > 0, or remove it "
                              f"(default {DEFAULT_CAP_FAULT_SLEEP:g})")
    return float(value)


def deployed(node_config: Mapping[str, Any]) -> bool:
    """Whether this node is a merchant's deployed SuperNode (`shop-dir`), not a simulated shop (`partition-id`)."""
    return bool(node_config.get(SHOP_DIR))


def builtin_scenario(name: str) -> Path | None:
    """The shipped TOML of built-in scenario ``name`` (inside the signed app), or None if it is not one.

    Decided on the name's characters first (no dot, no slash), so no coordinator text is ever a path here.
    """
    if not BUILTIN_NAME.fullmatch(name):
        return None
    path = SCENARIO_DIR / f"{name}.toml"
    return path if path.is_file() else None


def _pinned_scenario(node_config: Mapping[str, Any]) -> str | None:
    """The node config's `allow-scenario-path` (an absolute path), None if unset; bad: a MerchantRefusal."""
    value = node_config.get(ALLOW_SCENARIO_PATH)
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not os.path.isabs(value) or len(value) > MAX_TEXT:
        raise MerchantRefusal(f"this shop's node config {ALLOW_SCENARIO_PATH} is not an absolute file path. Fix "
                              f"(merchant): set --node-config \"{ALLOW_SCENARIO_PATH}='/abs/scenario.toml'\" "
                              "(`fedshop merchant start --allow-scenario-path FILE`), or remove it")
    return value


def scenario_source(scenario: str, node_config: Mapping[str, Any]) -> str | Path:
    """What ``scenario`` (the coordinator's `scenario`) lets this node load; a MerchantRefusal if nothing.

    Simulation (no `shop-dir`): the reference itself, a built-in name or any path, as before. Deployment:
    the built-in's shipped file, or the merchant's `allow-scenario-path` when the text is exactly it.
    """
    if not deployed(node_config):
        return scenario
    builtin = builtin_scenario(scenario)
    if builtin is not None:
        return builtin
    pinned = _pinned_scenario(node_config)
    if pinned is not None and os.path.isabs(scenario) and os.path.normpath(scenario) == os.path.normpath(pinned):
        return Path(pinned)  # compared as text: nothing on disk is looked at for the coordinator's value
    names = sorted(f.stem for f in SCENARIO_DIR.glob("*.toml"))
    pin = ("this shop pins another file in its node config" if pinned is not None
           else "this shop pins no scenario file")
    raise MerchantRefusal(
        f"scenario={scenario!r} is not a built-in scenario and {pin} ({ALLOW_SCENARIO_PATH}); a deployed shop "
        f"loads no other file. Fix: the coordinator uses a built-in scenario ({names}); or the merchant, if it "
        f"agrees to that file, sets --node-config \"{ALLOW_SCENARIO_PATH}='<the absolute path>'\" "
        "(`fedshop merchant start --allow-scenario-path FILE`)")


def check_node(node_config: Mapping[str, Any]) -> None:
    """MerchantRefusal when a deployed node's config lets the coordinator choose where the shop writes."""
    if deployed(node_config) and not node_config.get(STATE_DIR):
        raise MerchantRefusal(
            f"this shop's node config has {SHOP_DIR} but no {STATE_DIR}: its local part would be written under "
            f"the coordinator's run-dir. Fix (merchant): set --node-config \"{STATE_DIR}='/path/of/your/own'\" "
            "(`fedshop merchant start --state-dir` always does)")


def _expected_dpsgd_work(settings: ShopRoundSettings) -> tuple[int, float]:
    """(steps, expected passes over the units) of one DP-SGD round (`DPSGDConfig.steps`)."""
    rate = settings.dpsgd_sample_rate  # > 0 (schema)
    if settings.dpsgd_steps:
        return settings.dpsgd_steps, settings.dpsgd_steps * rate
    per_pass = 1.0 / rate
    steps = math.ceil(per_pass) if math.isfinite(per_pass) else 2**63  # a subnormal rate: 1/rate overflows
    return steps, steps * rate


_TEXT_FIELDS = tuple(name for name, info in ShopRoundSettings.model_fields.items() if info.annotation is str)


def check_order(settings: ShopRoundSettings, node_config: Mapping[str, Any],
                environ: Mapping[str, str] | None = None) -> None:
    """MerchantRefusal unless the message's settings stay within what this merchant's node config allows."""
    check_node(node_config)
    for name in _TEXT_FIELDS:
        value = getattr(settings, name)
        if len(value) > MAX_TEXT:
            raise MerchantRefusal(f"{run_key(name)} is {len(value)} characters long, above this shop's limit of "
                                  f"{MAX_TEXT}. Fix: the coordinator sends a shorter {run_key(name)}")
    scenario_source(settings.scenario, node_config)
    if not faults_allowed(node_config, environ):
        for name in TEST_FAULT_FIELDS:
            value, default = getattr(settings, name), RunSettings.model_fields[name].default
            if value != default:
                raise MerchantRefusal(
                    f"{run_key(name)}={value!r} is a test-only fault knob and this shop does not allow test faults. "
                    f"Fix: the coordinator removes {run_key(name)} from the run config; for a test federation only, "
                    f"the merchant sets --node-config \"{ALLOW_TEST_FAULTS}=true\"")
    else:
        cap = fault_sleep_cap(node_config)
        if settings.fault_sleep > cap:
            raise MerchantRefusal(
                f"fault-sleep={settings.fault_sleep:g} is above this shop's cap {CAP_FAULT_SLEEP}={cap:g}. Fix: the "
                f"coordinator lowers fault-sleep; or the merchant, if it agrees to the wait, raises the cap: "
                f"--node-config \"{CAP_FAULT_SLEEP}={settings.fault_sleep:g}\"")
    caps = work_caps(node_config)
    for name, (key, _) in WORK_CAPS.items():
        value = getattr(settings, name)
        if value > caps[name]:
            raise MerchantRefusal(
                f"{run_key(name)}={value} is above this shop's cap {key}={caps[name]}. Fix: the coordinator lowers "
                f"{run_key(name)}; or the merchant, if it agrees to the work, raises the cap: "
                f"--node-config \"{key}={value}\"")
    splits = eval_splits(settings.eval_split)
    if len(set(splits)) != len(splits):
        raise MerchantRefusal(f"eval-split={settings.eval_split!r} names a split more than once (each repeat would "
                              "be evaluated again). Fix: the coordinator names each split once, e.g. val+test")
    if settings.dpsgd_noise_multiplier > 0:
        steps, passes = _expected_dpsgd_work(settings)
        if steps > caps["dpsgd_steps"]:
            raise MerchantRefusal(
                f"dpsgd-steps=0 with dpsgd-sample-rate={settings.dpsgd_sample_rate:g} means {steps} steps, above "
                f"this shop's cap cap-dpsgd-steps={caps['dpsgd_steps']}. Fix: the coordinator raises "
                "dpsgd-sample-rate or sets dpsgd-steps; or the merchant raises the cap: "
                f"--node-config \"cap-dpsgd-steps={steps}\"")
        if passes > caps["local_epochs"]:
            raise MerchantRefusal(
                f"dpsgd-steps={steps} x dpsgd-sample-rate={settings.dpsgd_sample_rate:g} is {passes:g} expected passes "
                f"over the shop's units, above this shop's cap cap-local-epochs={caps['local_epochs']}. Fix: the "
                "coordinator lowers dpsgd-steps or dpsgd-sample-rate; or the merchant, if it agrees to the work, "
                f"raises the cap: --node-config \"cap-local-epochs={math.ceil(passes)}\"")


def refusal_reply(request: Message, refusal: MerchantRefusal) -> Message:
    """The error reply to a refused order: the fixed code and the refusal's text (names and numbers only)."""
    return Message(Error(code=ERROR_CODE_BLOCKED, reason=f"{REFUSED_PREFIX}{refusal}"), reply_to=request)


def merchant_policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: refuse a train/evaluate order the merchant's node config does not allow, before anything runs.

    A message whose settings do not parse goes on unchanged: the leak guard refuses it with its own log line.
    """
    if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE) or msg.has_error():
        return call_next(msg, context)
    try:
        settings = settings_for(msg, context)
    except ScenarioError:
        return call_next(msg, context)
    try:
        check_order(settings, dict(context.node_config))
    except MerchantRefusal as refusal:
        logger.error("%s%s", REFUSED_PREFIX, refusal)
        return refusal_reply(msg, refusal)
    return call_next(msg, context)


def allowed_reason(reason: str) -> bool:
    """Whether an error reply's reason may leave the shop: a fixed text, a merchant refusal or a decoding error."""
    return (reason in FIXED_REASONS or reason.startswith(REFUSED_PREFIX)
            or reason.startswith(f"{UNDECODABLE_TEXT}: "))  # client.wire_mod: a CompressionError's own words


def reply_shield(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost client mod: no exception and no error text but the fixed ones leaves the shop.

    Flower (and `client.long_lived`) would send an escaped exception as `<class ...>:<'text'>`, and the text
    of an exception raised on the shop (a file it could not read, a shop-data error) may name host paths or
    quote file contents. Any such reply becomes the generic `FAILED_TEXT` reply; the reason goes to the log.
    """
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # its text stays in the merchant's log
        logger.error("fedshop: the ClientApp raised %s: %s; sending a generic error reply", type(exc).__name__, exc)
        logger.debug("the ClientApp's traceback", exc_info=True)
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=FAILED_TEXT), reply_to=msg)
    if reply.has_error() and not allowed_reason(str(reply.error.reason)):
        logger.warning("fedshop: an error reply's reason is not one the shop sends (%s); sending a generic one",
                       reply.error.reason)
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=FAILED_TEXT), reply_to=msg)
    return reply
