"""The shape of src/multitenant in numbers: what the typed-core redesign is judged by.

    python scripts/code_shape.py [--json]

- string-key subscripts: ``x["key"]`` and ``x.get("key")`` with a string literal key, outside
  the modules that parse or write foreign formats on purpose (none excluded: every one counts);
- modules over 500 lines;
- import cycles between modules of the package, lazy (function-level) imports included;
- imports that run back up the layers (LAYERS below: a module may import only its own layer or
  lower ones).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "multitenant"
LONG = 500
# Lower number = lower layer. The first matching prefix wins (longest prefixes listed first).
LAYERS = [
    ("multitenant.schema", 0),
    ("multitenant.config.schema", 0),
    ("multitenant.config.units", 0),
    ("multitenant.workload", 1),
    ("multitenant.models", 1),
    ("multitenant.events", 1),
    ("multitenant.backends", 2),
    ("multitenant.config", 3),
    ("multitenant.analysis", 4),
    ("multitenant.run", 4),
    ("multitenant.telemetry", 4),
    ("multitenant.mps", 4),
    ("multitenant.faults", 4),
    ("multitenant.progress", 4),
    ("multitenant.orchestrator", 4),
    ("multitenant.tenant", 4),
    ("multitenant.cli_args", 5),
    ("multitenant.cli", 5),
    ("multitenant.catalog", 1),
    ("multitenant", 0),
]


def layer(mod: str) -> int:
    for prefix, n in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return n
    return 0


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, mod: str, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            # the longest known module the name refers to
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != mod:
                out.add(n)
    # drop imports guarded by TYPE_CHECKING
    guarded: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module:
                    guarded.add(sub.module)
    return out - guarded


def subscripts(path: Path) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            n += 1
    return n


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    files = sorted((SRC / PKG).rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    subs: dict[str, int] = {}
    long: dict[str, int] = {}
    for p in files:
        mod = module_name(p)
        graph[mod] = imports(p, mod, modules)
        subs[mod] = subscripts(p)
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > LONG:
            long[mod] = n
    # A module importing its own parent package counts (it runs the package's __init__).
    upward = sorted(
        f"{m} -> {d}" for m, ds in graph.items() for d in ds if layer(d) > layer(m)
    )
    cyc = cycles(graph)
    result = {
        "string_key_subscripts": sum(subs.values()),
        "by_module": {m: n for m, n in sorted(subs.items(), key=lambda kv: -kv[1]) if n},
        "modules_over_500_lines": long,
        "upward_imports": upward,
        "import_cycles": cyc,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"string-key subscripts in src/: {result['string_key_subscripts']}")
    for m, n in list(result["by_module"].items())[:15]:
        print(f"  {n:4d}  {m}")
    print(f"modules over {LONG} lines: {len(long)}")
    for m, n in sorted(long.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  {m}")
    print(f"imports up the layers: {len(upward)}")
    for u in upward:
        print(f"  {u}")
    print(f"import cycles (lazy imports included): {len(cyc)}")
    for c in cyc:
        print(f"  {' <-> '.join(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
