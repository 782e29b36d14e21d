"""The layers' one-way doors, read from the source: which part of ``dockyard`` imports which.

Each package of ``src/dockyard`` (``api``, ``auth``, ``registry``, ...) is one node, and so is
each top-level module (``app``, ``worker``, ``config``, ...). Every import counts: at module
level, inside a function (loaded lazily) and under ``TYPE_CHECKING`` alike, since each one is a
dependency a reader has to follow. See docs/architecture.md for the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "dockyard"

#: the HTTP layer and what sits beside it at the top: nothing in the model may reach these
HTTP_SIDE = {"api", "auth", "http", "ui"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _imported(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """The dockyard modules ``module`` imports (``from dockyard import x`` names module x)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("dockyard"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("dockyard"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in known else base


def node_of(module: str) -> str:
    """``dockyard.api.blobs`` -> ``api``; ``dockyard.app`` -> ``app``; ``dockyard`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_graph() -> dict[str, set[str]]:
    """node -> the other nodes it imports."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {node_of(m): set() for m in modules}
    for module, path in modules.items():
        for target in _imported(module, path, known):
            source, dest = node_of(module), node_of(target)
            if source != dest:
                graph[source].add(dest)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _importers_of(graph: dict[str, set[str]], targets: set[str], sources: set[str]) -> dict:
    return {s: sorted(graph[s] & targets) for s in sorted(sources) if graph[s] & targets}


def test_the_graph_sees_the_known_imports() -> None:
    """A guard for the guard: the parser finds the imports these checks rely on."""
    graph = import_graph()
    assert {"api", "auth", "registry", "storage", "oci", "cli", "http", "app"} <= set(graph)
    assert {"registry", "auth", "http"} <= graph["api"]
    assert "storage" in graph["registry"]
    assert "api" in graph["app"]
    assert "maintenance" in graph["worker"]  # ``from dockyard import maintenance``
    assert "server" in graph["cli"]  # imported inside a function


def test_no_cycle_between_packages_and_modules() -> None:
    assert cycles(import_graph()) == []


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_auth_is_below_the_api() -> None:
    """The auth middleware hands the handlers an identity; it never reaches up into them."""
    assert "api" not in import_graph()["auth"]


def test_the_model_never_imports_the_http_side() -> None:
    graph = import_graph()
    assert _importers_of(graph, HTTP_SIDE, {"registry", "storage", "oci"}) == {}


def test_storage_never_imports_the_model() -> None:
    assert "registry" not in import_graph()["storage"]


def test_the_ui_is_on_top_and_never_reaches_storage() -> None:
    """The web UI uses the model and the JSON API's functions, never a second way into
    storage; only the application assembles it."""
    graph = import_graph()
    assert "storage" not in graph["ui"]
    assert {"api", "registry"} <= graph["ui"]
    assert sorted(node for node, targets in graph.items() if "ui" in targets) == ["app"]
