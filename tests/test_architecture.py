"""The shape of the package: no import cycle, no upward import, small modules.

Module-level imports only (imports inside functions and under ``TYPE_CHECKING`` are how
a lower layer may name a higher one without depending on it at import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"

APPLICATIONS = ("stagetrain.cli", "stagetrain.compare", "stagetrain.arms", "stagetrain.report",
                "stagetrain.workers", "stagetrain.stats")  # fmt: skip
"""Top-level modules that use the library; nothing in the library imports them."""
LAYERS = {
    "core": (),
    "train": ("stagetrain.train",),
    "models": ("stagetrain.elastic", "stagetrain.recipes"),
    "adapters": ("stagetrain.integrations",),
}
FORBIDDEN = {
    # layer: prefixes it must not import at module level
    "core": ("stagetrain.train", "stagetrain.integrations", "stagetrain.elastic",
             "stagetrain.recipes", *APPLICATIONS),
    "train": ("stagetrain.integrations", "stagetrain.elastic", "stagetrain.recipes", *APPLICATIONS),
    "models": ("stagetrain.train", "stagetrain.integrations", *APPLICATIONS),
    "adapters": APPLICATIONS,
}  # fmt: skip
MAX_LINES = 450
"""'No module over ~400 lines': a module past this has more than one job."""


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def module_imports(path: Path, known: set[str]) -> set[str]:
    """stagetrain modules imported at module level (submodules resolved, not their package)."""
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Try | ast.If | ast.With):
                visit([*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])])
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stagetrain"):
                assert node.module is not None
                subs = {f"{node.module}.{a.name}" for a in node.names} & known
                out.update(subs or {node.module})
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("stagetrain"))

    visit(ast.parse(path.read_text()).body)
    return out & known


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: module_imports(p, set(known)) - {m} for m, p in known.items()}


def layer(module: str) -> str:
    for name, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    # An application may be a package (stagetrain.compare): its modules are applications too.
    is_app = any(module == a or module.startswith(a + ".") for a in APPLICATIONS)
    return "application" if is_app else "core"


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_no_upward_import() -> None:
    packages = {m for m, p in modules().items() if p.name == "__init__.py"}
    bad = []
    for module, imported in graph().items():
        if module in packages:
            continue  # a package's __init__ re-exports its modules
        forbidden = FORBIDDEN.get(layer(module), ())
        for target in imported:
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                bad.append(f"{module} ({layer(module)}) imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_modules_are_small() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    large = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not large, f"modules over {MAX_LINES} lines: {large}"
