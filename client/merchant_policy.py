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

A message that breaks one of these gets an error reply whose reason names the key, the value, the limit
and the fix (`merchant_policy_mod`, before any other handler code: nothing is loaded, trained or saved).
The reason holds only setting names and numbers the coordinator sent or the merchant configured, never
shop data, so unlike handler errors (`client.leak_guard`) it is sent as is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.message_settings import settings_for
from shared.protocol import ERROR_CODE_BLOCKED
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
REFUSED_PREFIX = "shop refused the order: "


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


def check_order(settings: ShopRoundSettings, node_config: Mapping[str, Any],
                environ: Mapping[str, str] | None = None) -> None:
    """MerchantRefusal unless the message's settings stay within what this merchant's node config allows."""
    if not faults_allowed(node_config, environ):
        for name in TEST_FAULT_FIELDS:
            value, default = getattr(settings, name), RunSettings.model_fields[name].default
            if value != default:
                raise MerchantRefusal(
                    f"{run_key(name)}={value!r} is a test-only fault knob and this shop does not allow test faults. "
                    f"Fix: the coordinator removes {run_key(name)} from the run config; for a test federation only, "
                    f"the merchant sets --node-config \"{ALLOW_TEST_FAULTS}=true\"")
    caps = work_caps(node_config)
    for name, (key, _) in WORK_CAPS.items():
        value = getattr(settings, name)
        if value > caps[name]:
            raise MerchantRefusal(
                f"{run_key(name)}={value} is above this shop's cap {key}={caps[name]}. Fix: the coordinator lowers "
                f"{run_key(name)}; or the merchant, if it agrees to the work, raises the cap: "
                f"--node-config \"{key}={value}\"")


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
