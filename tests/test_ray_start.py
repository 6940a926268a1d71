"""fedshop's own `ray.init` arguments: no job runtime env locally, the shops' variables carried to a cluster."""

from __future__ import annotations

import logging

from simulations.ray_start import forwarded_env, ray_init_args

DRIVER_ENV = {"FEDSHOP_SHARED_WORLD": '{"path": "/r/world.pkl"}', "FEDSHOP_TIMING_LOG": "/tmp/t.jsonl",
              "OMP_WAIT_POLICY": "PASSIVE", "FLWR_LOG_LEVEL": "ERROR", "RAY_AUTH_TOKEN": "secret",
              "HOME": "/root", "PYTHONPATH": "/extra"}


def test_forwarded_env_carries_what_shops_read_and_nothing_else():
    env = forwarded_env(DRIVER_ENV)
    assert {k for k in env if k != "PYTHONPATH"} == {"FEDSHOP_SHARED_WORLD", "FEDSHOP_TIMING_LOG",
                                                      "OMP_WAIT_POLICY", "FLWR_LOG_LEVEL"}
    assert env["PYTHONPATH"].endswith("/extra")  # the driver's import path, as Flower's own init passes it
    assert "RAY_AUTH_TOKEN" not in env and "HOME" not in env  # the token stays out of the job's metadata


def test_a_local_ray_gets_no_job_runtime_env():
    args = ray_init_args({"num_cpus": 2}, DRIVER_ENV)
    assert args == {"num_cpus": 2, "include_dashboard": False, "logging_level": logging.WARNING}


def test_rays_own_info_lines_stay_off_a_quiet_console_but_show_with_verbose():
    assert ray_init_args({}, DRIVER_ENV)["logging_level"] == logging.WARNING  # FLWR_LOG_LEVEL=ERROR: no -v
    assert "logging_level" not in ray_init_args({}, {**DRIVER_ENV, "FLWR_LOG_LEVEL": "INFO"})


def test_a_cluster_gets_the_shops_variables_as_the_jobs_runtime_env():
    args = ray_init_args({"address": "127.0.0.1:6379", "include_dashboard": False}, DRIVER_ENV)
    assert args["address"] == "127.0.0.1:6379" and "num_cpus" not in args
    assert args["runtime_env"] == {"env_vars": forwarded_env(DRIVER_ENV)}
    assert args["runtime_env"]["env_vars"]["FEDSHOP_SHARED_WORLD"] == DRIVER_ENV["FEDSHOP_SHARED_WORLD"]
