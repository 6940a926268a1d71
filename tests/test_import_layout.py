"""No import circles between fedshop's modules, and every client/server/shared module imports on its own.

A circle used to be dodged with function-level imports (client_app <-> secure_client, server_app <->
secure); the static check counts imports at any level, so such a dodge fails here too.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "shared", "simulations")
ALONE = ("client", "server", "shared")  # imported one by one in a fresh interpreter (simulations pulls in more)


@functools.cache
def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere in its file (module level, functions, TYPE_CHECKING)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else resolve(node.module))
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph(project_modules())
    assert graph["client.client_app"] >= {"client.secure_client", "client.shop_round"}  # the checker sees edges
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}. Fix: move what both need into its own "
                             "module (settings, pure helpers, shared.protocol)") from None


def test_a_circle_would_be_caught(tmp_path: Path) -> None:
    graph = import_graph(project_modules())
    graph["client.secure_client"].add("client.client_app")  # what the old SecAgg+ client did
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError:
        return
    raise AssertionError("a client_app <-> secure_client circle went unnoticed")


def test_each_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = [m for m in project_modules() if m.split(".")[0] in ALONE]
    # One interpreter; before each import every project module is forgotten, so each starts alone
    # (third-party packages stay loaded, which keeps this fast).
    code = (
        "import importlib, sys\n"
        f"prefixes = {tuple(p + '.' for p in PACKAGES)!r}\n"
        f"packages = {PACKAGES!r}\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith(prefixes) or m in packages]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert len(names) > 20
