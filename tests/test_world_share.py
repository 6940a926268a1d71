"""The synthetic world is built once and shared: roundtrip, stale key, tampered file, off switch, atomic write."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest

import shared.scenario as scenario_mod
import shared.world_share as world_share
from shared.atomic import TEMP_SUFFIX
from shared.scenario import load_scenario, scenario_from_dict, world_key
from shared.world_share import (
    CACHE_ENV,
    HOLDER_PREFIX,
    SHARED_ENV,
    read_shared_world,
    shared_world_env,
    with_ray_holder,
    world_file,
    write_shared_world,
)

TINY = {"name": "tiny", "seed": 3, "data": {"source": "synthetic", "synthetic": {
    "n_shops": 3, "max_impressions": 1500, "min_impressions": 600, "n_small_shops": 1, "n_late_joiners": 0,
    "days": 20, "eval_impressions": 0}}}


@pytest.fixture
def tiny():
    scenario_mod._load_shops.cache_clear()
    yield scenario_from_dict(TINY)
    scenario_mod._load_shops.cache_clear()


def _env(desc: dict[str, str], **extra: str) -> dict[str, str]:
    return {SHARED_ENV: json.dumps(desc), **extra}


def test_world_key_changes_with_world_settings_only(tiny):
    same = scenario_from_dict(TINY, {"federation.rounds": 7})
    other = scenario_from_dict(TINY, {"data.synthetic.n_shops": 4})
    reseeded = scenario_from_dict(TINY, {"seed": 4})
    assert tiny.world_key == same.world_key
    assert len({tiny.world_key, other.world_key, reseeded.world_key}) == 3


def test_roundtrip_returns_the_drivers_world(tiny, tmp_path):
    shops = ("a", {"b": [1, 2]})
    desc = write_shared_world(shops, tmp_path, "k" * 64)
    assert read_shared_world("k" * 64, _env(desc)) == shops


def test_shop_loading_reads_the_shared_world_instead_of_generating(tiny, tmp_path, monkeypatch):
    desc = tiny.share_world(tmp_path)
    names = [s.name for s in tiny.shops()]
    scenario_mod._load_shops.cache_clear()
    import shared.datasets.synthetic as synthetic

    def boom(*_args, **_kwargs):
        raise AssertionError("the world was generated again")

    monkeypatch.setattr(synthetic, "generate_world", boom)
    with shared_world_env(desc):
        assert [s.name for s in scenario_from_dict(TINY).shops()] == names
    assert SHARED_ENV not in os.environ  # restored after the block


def test_key_mismatch_rebuilds(tmp_path, caplog):
    desc = write_shared_world(("stale",), tmp_path, "a" * 64)
    with caplog.at_level(logging.INFO, logger="shared.world_share"):
        assert read_shared_world("b" * 64, _env(desc)) is None
    assert "other settings" in caplog.text


def test_tampered_file_is_not_loaded_and_warns(tmp_path, caplog):
    desc = write_shared_world(("good",), tmp_path, "a" * 64)
    path = world_file(tmp_path, "a" * 64)
    path.write_bytes(path.read_bytes().replace(b"good", b"evil"))  # still a valid pickle, other content
    with caplog.at_level(logging.WARNING, logger="shared.world_share"):
        assert read_shared_world("a" * 64, _env(desc)) is None
    assert "sha256" in caplog.text


def test_tampered_file_makes_shop_loading_rebuild(tiny, tmp_path, caplog):
    desc = tiny.share_world(tmp_path)
    expected = [(s.name, len(s.interactions)) for s in tiny.shops()]
    scenario_mod._load_shops.cache_clear()
    world_file(tmp_path, tiny.world_key).write_bytes(b"not the world")
    with shared_world_env(desc), caplog.at_level(logging.WARNING, logger="shared.world_share"):
        assert [(s.name, len(s.interactions)) for s in scenario_from_dict(TINY).shops()] == expected
    assert "sha256" in caplog.text


def test_missing_file_rebuilds_with_a_warning(tmp_path, caplog):
    desc = write_shared_world(("x",), tmp_path, "a" * 64)
    world_file(tmp_path, "a" * 64).unlink()
    with caplog.at_level(logging.WARNING, logger="shared.world_share"):
        assert read_shared_world("a" * 64, _env(desc)) is None
    assert "cannot be read" in caplog.text


def test_off_switch_skips_both_sides(tiny, tmp_path, monkeypatch):
    desc = write_shared_world(("x",), tmp_path, "a" * 64)
    assert read_shared_world("a" * 64, _env(desc, **{CACHE_ENV: "0"})) is None
    monkeypatch.setenv(CACHE_ENV, "0")
    assert tiny.share_world(tmp_path / "off") is None
    assert not (tmp_path / "off").exists()


def test_real_data_scenarios_are_not_shared(tmp_path):
    scenario = load_scenario("default", {"data.source": "shop-dirs", "data.paths": [str(tmp_path)]})
    assert scenario.share_world(tmp_path) is None


def test_write_is_atomic_temp_then_rename(tmp_path, monkeypatch):
    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    desc = write_shared_world(("x",), tmp_path, "a" * 64)
    [(src, dst)] = seen
    assert src.endswith(TEMP_SUFFIX) and dst == os.path.basename(desc["path"])
    assert [p.name for p in tmp_path.iterdir()] == [dst]  # no temp file left


def test_key_matches_what_a_worker_derives_from_the_run_dir_copy(tiny, tmp_path):
    import tomli_w

    (tmp_path / "scenario.toml").write_text(tomli_w.dumps(tiny.raw))
    worker = load_scenario(tmp_path / "scenario.toml", {"seed": tiny.seed})
    assert worker.world_key == tiny.world_key == world_key(tiny.data, tiny.seed)


def test_a_node_without_the_file_reads_the_world_from_the_ray_holder(tmp_path, monkeypatch, caplog):
    desc = with_ray_holder(write_shared_world(("x",), tmp_path, "a" * 64))
    blob = world_file(tmp_path, "a" * 64).read_bytes()
    world_file(tmp_path, "a" * 64).unlink()
    asked = []
    monkeypatch.setattr(world_share, "_blob_from_ray", lambda name: asked.append(name) or blob)
    with caplog.at_level(logging.INFO, logger="shared.world_share"):
        assert read_shared_world("a" * 64, _env(desc)) == ("x",)
    assert asked == [HOLDER_PREFIX + "a" * 16] and "read it from Ray actor" in caplog.text


def test_bytes_from_the_ray_holder_are_checked_like_the_file(tmp_path, monkeypatch, caplog):
    desc = with_ray_holder(write_shared_world(("x",), tmp_path, "a" * 64))
    world_file(tmp_path, "a" * 64).unlink()
    monkeypatch.setattr(world_share, "_blob_from_ray", lambda name: b"tampered")
    with caplog.at_level(logging.WARNING, logger="shared.world_share"):
        assert read_shared_world("a" * 64, _env(desc)) is None
    assert "sha256" in caplog.text


def test_outside_ray_a_holder_is_never_asked_and_the_world_is_rebuilt(tmp_path, monkeypatch, caplog):
    desc = with_ray_holder(write_shared_world(("x",), tmp_path, "a" * 64))
    world_file(tmp_path, "a" * 64).unlink()
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # a process that is not a Ray worker
    with caplog.at_level(logging.WARNING, logger="shared.world_share"):
        assert read_shared_world("a" * 64, _env(desc)) is None
    assert "cannot be read" in caplog.text and "ray" not in sys.modules
