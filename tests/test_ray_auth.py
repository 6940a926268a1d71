"""Ray's ports in a simulation answer only callers holding the run's token (simulations/ray_auth.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.federated import backend_config
from simulations.ray_auth import AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH, require_ray_token

REPO = Path(__file__).resolve().parents[1]

# Starts Ray the way run_federated does, then calls the GCS and a raylet over plain gRPC as an outsider
# (no token) and the RuntimeEnv agent over HTTP; prints what each answered as JSON.
PROBE = r"""
import json, os, sys, urllib.request, urllib.error
import grpc
from simulations.federated import backend_config
from simulations.ray_auth import require_ray_token
if os.environ.get("PROBE_MODE") == "fedshop":
    require_ray_token()
import ray
import psutil  # Ray's own copy (ray/thirdparty_files), on the path once ray is imported
ray.init(**backend_config(1)["init_args"])
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, node_manager_pb2, node_manager_pb2_grpc
listening = {}
for proc in psutil.Process().children(recursive=True):
    try:
        for conn in proc.net_connections("tcp"):
            if conn.status == "LISTEN":
                listening.setdefault(proc.name(), []).append([conn.laddr.ip, conn.laddr.port])
    except psutil.Error:
        pass
outsider_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
def grpc_answer(port, call):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            call(channel)
            return "answered"
        except grpc.RpcError as err:
            return err.code().name
gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
raylet_port = ray.nodes()[0]["NodeManagerPort"]
out = {
    "listening": listening,
    "gcs": grpc_answer(gcs_port, lambda ch: gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch).GetAllNodeInfo(
        gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)),
    "raylet": grpc_answer(raylet_port, lambda ch: node_manager_pb2_grpc.NodeManagerServiceStub(ch).GetNodeStats(
        node_manager_pb2.GetNodeStatsRequest(), timeout=10)),
}
for name, addrs in listening.items():
    if "RuntimeEnvAgent" in name:
        ip, port = addrs[0]
        try:
            urllib.request.urlopen(f"http://{ip}:{port}/", timeout=10)
            out["agent"] = "answered"
        except urllib.error.HTTPError as err:
            out["agent"] = err.code
ray.shutdown()
print("PROBE " + json.dumps(out))
"""


def test_require_ray_token_makes_a_fresh_secret() -> None:
    env: dict[str, str] = {}
    assert require_ray_token(env) == "token"
    token = env[AUTH_TOKEN]
    assert len(token) == 64 and int(token, 16) >= 0
    other: dict[str, str] = {}
    require_ray_token(other)
    assert other[AUTH_TOKEN] != token  # one secret per run, never a constant


def test_require_ray_token_keeps_the_users_choice() -> None:
    own = {AUTH_TOKEN_PATH: "/etc/ray/token"}
    require_ray_token(own)
    assert own == {AUTH_TOKEN_PATH: "/etc/ray/token", AUTH_MODE: "token"}  # their cluster's token, not ours
    disabled = {AUTH_MODE: "disabled"}
    assert require_ray_token(disabled) == "disabled" and AUTH_TOKEN not in disabled


def test_backend_config_does_not_pretend_to_bind_loopback() -> None:
    # Ray rewrites 127.0.0.1 to the machine's address; a loopback setting here would only mislead.
    assert "_node_ip_address" not in backend_config(2)["init_args"]


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PROBE_MODE=mode, PYTHONPATH=str(REPO), RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240,
                         cwd=REPO, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"probe failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return json.loads(lines[-1][len("PROBE "):])


@pytest.mark.slow
def test_outsiders_get_no_answer_from_a_simulations_ray() -> None:
    guarded = _probe("fedshop")
    # Ray still listens on every interface (stated in docs/federation.md) ...
    assert any(ip in ("::", "0.0.0.0") for addrs in guarded["listening"].values() for ip, _ in addrs)
    # ... but its services refuse a caller without the token.
    assert guarded["gcs"] == "UNAUTHENTICATED"
    assert guarded["raylet"] == "UNAUTHENTICATED"
    assert guarded.get("agent", 401) == 401
    # Positive control: Ray as it was before (no token), the same calls are answered.
    open_ray = _probe("plain")
    assert open_ray["gcs"] == "answered" and open_ray["raylet"] == "answered"
