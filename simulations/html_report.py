"""`report.html`: a run's one-page report (verdict, tables, plots), rendered with Jinja2.

Every value passes through Jinja2's HTML autoescaping: shop, item and scenario names come from
merchants' files, so a name such as ``<script>`` must show as text, never run. The page also carries a
Content-Security-Policy that allows no script at all, a second guard should a value ever escape
unescaped. Plots are linked by relative path (``plots/*.png``), so the run directory can be moved or
zipped as one unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from shared.atomic import atomic_write_text

TEMPLATE = "report.html.j2"


def _environment() -> Environment:
    # autoescape=True for every template (not by file extension): the template is .j2 and must still escape.
    return Environment(loader=PackageLoader("simulations", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render_html(context: dict[str, Any]) -> str:
    """The page for ``context`` (`summary.html_context`); a missing key is an error, not a blank."""
    return _environment().get_template(TEMPLATE).render(**context)


def write_html_report(path: Path, context: dict[str, Any]) -> Path:
    """Render and write the page atomically (a reader never sees half a report)."""
    return atomic_write_text(Path(path), render_html(context))
