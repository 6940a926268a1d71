"""report.html: verdict first, every value escaped, and in a real browser (headless Chromium) every plot loads.

Threat model: shop and scenario names come from merchants' files and end up in the page. A name that
is markup must show as text; the page's Content-Security-Policy forbids scripts as a second guard.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from markupsafe import escape

from simulations.best_rounds import PRIMARY
from simulations.compare import summarize
from simulations.html_report import render_html
from simulations.run_report import read_metrics, run_verdict, seeded_final_table, write_run_report

CHROMIUM = Path("/usr/bin/chromium")
EVIL = '<img src=x onerror="document.title=1">'  # a merchant's shop name that is also markup
SHOPS = {"local": {"shop_a": 0.60, EVIL: 0.70, "<script>alert(1)</script>": 0.80},
         "central": {"shop_a": 0.70, EVIL: 0.80, "<script>alert(1)</script>": 0.90},
         "fedshop": {"shop_a": 0.72, EVIL: 0.80, "<script>alert(1)</script>": 0.79}}


def _rows(values: dict, task: str, metric: str) -> list[dict]:
    """Two rounds; validation is best at round 2, where test holds ``values``."""
    sign = 1 if PRIMARY[task][1] else -1
    rows = []
    for method, shops in values.items():
        for shop, v in shops.items():
            for r in (1, 2):
                rows.append({"method": method, "round": r, "shop": shop, "task": task, "split": "val",
                             "metric": metric, "value": sign * (0.9 if r == 2 else 0.6)})
                rows.append({"method": method, "round": r, "shop": shop, "task": task, "split": "test",
                             "metric": metric, "value": v if r == 2 else v - sign * 0.05})
    return rows


@pytest.fixture()
def compare_run(tmp_path: Path) -> Path:
    """A compare-like run directory whose shop names are markup, with its summary, plots and report."""
    run = tmp_path / "run"
    run.mkdir()
    wape = {m: {s: 0.5 - 0.1 * (v - 0.6) for s, v in shops.items()} for m, shops in SHOPS.items()}
    pd.DataFrame(_rows(SHOPS, "ctr", "auc") + _rows(wape, "sales", "wape")).to_csv(run / "metrics.csv", index=False)
    (run / "config.toml").write_text('command = "compare"\nseeds = [0]\n\n[scenario]\nname = "my <b>shops</b>"\n'
                                     "seed = 0\n", encoding="utf-8")
    final = seeded_final_table(read_metrics(run))
    summary = json.loads(json.dumps(summarize(final, small_shops=["shop_a"])))
    write_run_report(run, small_shops=["shop_a"], summary=summary)
    return run


def test_the_report_puts_the_verdict_first_and_escapes_every_merchant_value(compare_run: Path) -> None:
    page = (compare_run / "report.html").read_text(encoding="utf-8")
    body = page[page.index("<body>"):]
    assert body.index('id="verdict"') < body.index("<table>") < body.index("<img")
    assert "<script" not in page.lower() and EVIL not in page and "<b>shops</b>" not in page
    assert str(escape(EVIL)) in page and "my &lt;b&gt;shops&lt;/b&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; (small)" not in page and "shop_a (small)" in page
    assert "default-src 'none'" in page  # no script may run even if a value escaped the template
    verdict = run_verdict(compare_run, summary=json.loads(json.dumps(
        summarize(seeded_final_table(read_metrics(compare_run)), small_shops=["shop_a"]))))
    assert verdict[0].startswith("my <b>shops</b> (3 shops, 2 rounds): CTR AUC local-only 0.700")
    assert "fedshop closes 70% of the local-to-oracle gap on CTR AUC" in verdict[2]
    for line in verdict[:-1]:  # the last line (where the report is) is for the console only
        assert f"<p>{escape(line)}</p>" in page
    assert verdict[-1].startswith(f"report: {compare_run / 'report.html'}")


def test_a_run_without_an_oracle_reports_its_targets_as_not_applicable(tmp_path: Path) -> None:
    run = tmp_path / "own"
    run.mkdir()
    mine = {m: SHOPS[m] for m in ("local", "fedshop")}
    pd.DataFrame(_rows(mine, "ctr", "auc")).to_csv(run / "metrics.csv", index=False)
    summary = summarize(seeded_final_table(read_metrics(run)), small_shops=["shop_a"])
    write_run_report(run, small_shops=["shop_a"], summary=summary)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<td>gap_closed</td><td>&gt;= 0.7</td><td>-</td><td>n/a (no oracle in this run)</td>" in page
    verdict = page.split('id="verdict"')[1].split("</section>")[0]
    assert "gap_closed n/a (no oracle in this run)" in verdict and "gap_closed not met" not in verdict
    assert "max_loss not met" in verdict  # a target the run can measure is still judged
    assert "| gap_closed | >= 0.7 | - | n/a (no oracle in this run) |" in (run / "summary.md").read_text()
    assert "gap closed: n/a (no oracle in this run)" in run_verdict(run, summary=summary)[2]


def test_render_html_refuses_a_context_with_a_missing_key() -> None:
    with pytest.raises(Exception, match="verdict"):
        render_html({"title": "x"})


def _chromium_or_skip() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium package before the tests")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI runs this test")


def _chromium(page: Path, tmp_path: Path, *extra: str) -> str:
    """Chromium's DOM of ``page`` after load (virtual time lets every image load or fail first)."""
    args = [str(_chromium_or_skip()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", *extra,
            page.as_uri()]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


PROBE = """<script>
window.addEventListener("load", () => {
  const seen = [...document.images].map(i => ({src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0}));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script>
"""


def _probe(report: Path, tmp_path: Path) -> list[dict]:
    """Load a copy of the report (same folder, same relative plot paths) that records each image's load.

    The copy's policy differs only by allowing its one inline script; images stay under the page's own rule.
    """
    page = report.read_text(encoding="utf-8")
    policy = "default-src 'none';"
    assert policy in page
    probe = report.with_name("probe.html")
    page = page.replace(policy, policy + " script-src 'unsafe-inline';").replace("</body>", PROBE + "</body>")
    probe.write_text(page, encoding="utf-8")
    dom = _chromium(probe, tmp_path, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_chromium_shows_the_verdict_and_loads_every_plot(compare_run: Path, tmp_path: Path) -> None:
    dom = _chromium(compare_run / "report.html", tmp_path, "--dump-dom")
    verdict = re.search(r'<section id="verdict">(.*?)</section>', dom, re.S)
    assert verdict and "fedshop closes 70% of the local-to-oracle gap" in html.unescape(verdict.group(1))
    assert "<script" not in dom and "onerror" not in re.sub(r"&lt;.*?&gt;", "", dom)  # markup stayed text
    images = _probe(compare_run / "report.html", tmp_path)
    plots = sorted(p.relative_to(compare_run).as_posix() for p in (compare_run / "plots").glob("*.png"))
    assert sorted(i["src"] for i in images) == plots and len(plots) == 4
    assert all(i["loaded"] for i in images), images
    (compare_run / plots[0]).unlink()  # the probe must be able to see a broken image
    broken = {i["src"]: i["loaded"] for i in _probe(compare_run / "report.html", tmp_path)}
    assert broken[plots[0]] is False and all(broken[p] for p in plots[1:])


def test_chromium_screenshot_is_a_drawn_page(compare_run: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    _chromium(compare_run / "report.html", tmp_path, f"--screenshot={shot}", "--window-size=1200,2600")
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert image.size == (1200, 2600) and colours is not None and len(colours) > 200  # text and plots, not blank
    if os.environ.get("FEDSHOP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FEDSHOP_KEEP_SCREENSHOT"])
