"""A 1 GB file in a shop directory is refused, or scanned in bounded memory; never read whole.

Every way shop files are read is covered: `load_shop_dir`, `fedshop validate`, a shop's onboarding in
the ClientApp (`resolve_shop` with a shop-dir, which hashes the files for its tensor cache first) and
the dataset adapters (`read_delimited`). The file is sparse (`truncate(1 << 30)`): created instantly,
no disk written. Memory is measured with tracemalloc in-process, and as the peak RSS of a fresh
process (`ru_maxrss` after the imports vs after the load) where other tests' allocations cannot hide it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from test_bad_shops import huge_sparse_file, write_base
from typer.testing import CliRunner

from client import local_state
from shared.datasets.movielens import read_delimited
from shared.schema import MAX_FILE_MB_ENV, ShopDataError, load_shop_dir
from shared.settings import ShopRoundSettings
from simulations.cli import app

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MAX_TRACED = 32 << 20  # bytes: a whole read of the file would hold 1 GiB (2 GiB as bytes plus text)
MAX_RSS_GROWTH = 128 << 20


def _traced_peak(load: Callable[[], object]) -> tuple[ShopDataError, int]:
    """The ShopDataError ``load`` raises and the peak of Python-traced memory while it ran."""
    tracemalloc.start()
    try:
        with pytest.raises(ShopDataError) as refused:
            load()
        return refused.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def big_shop(tmp_path: Path) -> Path:
    root = write_base(tmp_path / "shop")
    huge_sparse_file(root)
    assert (root / "interactions.csv").stat().st_size == GIB
    return root


def test_a_1gb_file_is_refused_naming_file_size_limit_and_setting(big_shop: Path):
    err, peak = _traced_peak(lambda: load_shop_dir(big_shop))
    assert err.file.endswith("interactions.csv")
    assert "the file is 1,024 MB, above the 512 MB limit" in err.problem
    assert f"{MAX_FILE_MB_ENV}=1025" in err.fix
    assert peak < MAX_TRACED, f"{peak / 2**20:.0f} MB traced"


def test_under_a_raised_cap_the_file_is_scanned_in_chunks_not_read_whole(big_shop: Path, monkeypatch):
    """1 GiB under a 2 GiB cap: the first chunk already shows NUL bytes, so the rest is never read."""
    monkeypatch.setenv(MAX_FILE_MB_ENV, "2048")
    text_rows = (big_shop / "interactions.csv").read_bytes()[:1 << 20].rstrip(b"\0").count(b"\n")
    err, peak = _traced_peak(lambda: load_shop_dir(big_shop))
    assert "NUL bytes" in err.problem and err.row == text_rows + 1  # the zeros start after the real rows
    assert peak < MAX_TRACED, f"{peak / 2**20:.0f} MB traced"


def test_fedshop_validate_refuses_the_1gb_file(big_shop: Path):
    result = CliRunner().invoke(app, ["validate", str(big_shop)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "interactions.csv" in text and "1,024 MB, above the 512 MB limit" in text and MAX_FILE_MB_ENV in text


def test_a_shops_onboarding_in_the_clientapp_refuses_it_in_bounded_memory(big_shop: Path, tmp_path: Path):
    """Deployment path: the tensor cache key hashes the shop's files (streamed), then the loader refuses."""
    local_state.forget_shops()
    context = Context(run_id=1, node_id=1, node_config={"shop-dir": str(big_shop), "state-dir": str(tmp_path / "st")},
                      state=RecordDict(), run_config={})
    settings = ShopRoundSettings.from_message({}, {"scenario": "default"})
    err, peak = _traced_peak(lambda: local_state.resolve_shop(context, settings))
    assert err.file.endswith("interactions.csv") and "above the 512 MB limit" in err.problem
    assert peak < MAX_TRACED, f"{peak / 2**20:.0f} MB traced"


def test_the_dataset_adapters_refuse_a_1gb_file_before_pandas_reads_it(tmp_path: Path):
    ratings = tmp_path / "ratings.csv"
    with open(ratings, "wb") as handle:
        handle.truncate(GIB)
    err, peak = _traced_peak(lambda: read_delimited(ratings, sep=",", header=False, numeric=("rating",)))
    assert "above the 512 MB limit" in err.problem and err.file == str(ratings)
    assert peak < MAX_TRACED


LOAD_AND_MEASURE = """
import json, resource, sys
from shared.schema import ShopDataError, load_shop_dir
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_shop_dir(sys.argv[1])
    problem = None
except ShopDataError as exc:
    problem = exc.problem
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kb": after - before, "problem": problem}))
"""


@pytest.mark.parametrize("cap_mb", [None, "2048"])
def test_peak_rss_of_a_fresh_process_stays_bounded(big_shop: Path, cap_mb: str | None):
    env = {k: v for k, v in os.environ.items() if k != MAX_FILE_MB_ENV}
    env["PYTHONPATH"] = str(REPO)
    if cap_mb:
        env[MAX_FILE_MB_ENV] = cap_mb
    done = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(big_shop)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["problem"] and ("NUL bytes" if cap_mb else "above the 512 MB limit") in measured["problem"]
    assert measured["growth_kb"] * 1024 < MAX_RSS_GROWTH, f"peak RSS grew {measured['growth_kb'] / 1024:.0f} MB"
