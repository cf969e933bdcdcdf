"""The package-level import graph of bp_ray: which subpackage imports which (imports inside functions included),
the cycles among them, and the longest functions; what issue 25 measures the architecture by.

    python benchmarks/import_graph.py [--root bp_ray] [--top 8]
"""

from __future__ import annotations

import argparse
import ast
import itertools
from collections import defaultdict
from pathlib import Path


def package_of(module: str) -> str:
    """bp_ray.train.ppo -> train; bp_ray.cli -> cli (a top-level module is its own node)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def edges(root: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        source = package_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                if name.startswith(root.name + ".") and package_of(name) != source:
                    graph[source].add(package_of(name))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of packages that reach each other."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {node: reach(node) for node in graph}
    return [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in reachable[a] and a in reachable[b]]


def longest_functions(root: Path, top: int) -> list[tuple[int, str]]:
    rows = [(node.end_lineno - node.lineno + 1, f"{path.relative_to(root.parent)}:{node.name}")
            for path in root.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "bp_ray"))
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    root = Path(args.root)
    graph = edges(root)
    for source in sorted(graph):
        print(f"{source:>10} -> {', '.join(sorted(graph[source]))}")
    found = cycles(graph)
    print(f"{len(found)} package pairs that import each other: {', '.join(f'{a}<->{b}' for a, b in found)}")
    print("longest functions:")
    for lines, name in longest_functions(root, args.top):
        print(f"  {lines:4d} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
