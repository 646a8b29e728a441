"""The chatapp package imports as a tree: no module-level import cycle, and no import hidden
inside a function to dodge one (the apps.py hook that registers system checks aside)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "chatapp"
ALLOWED_DEFERRED = {("apps", "checks")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute chatapp-relative names an ImportFrom refers to (module and module.name)."""
    parts = module.split(".") if module else []
    package = parts if is_package else parts[:-1]
    if node.level:
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    elif node.module and node.module.startswith("chatapp"):
        base, node_module = [], node.module.removeprefix("chatapp").lstrip(".")
        return [node_module] + [f"{node_module}.{a.name}".strip(".") for a in node.names]
    else:
        return []
    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    return [target] + [f"{target}.{a.name}".strip(".") for a in node.names]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    deferred = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            targets = [
                t
                for t in _resolve(name, path.name == "__init__.py", node)
                if t and t in modules and t != name
            ]
            if id(node) in top_level:
                graph[name].update(targets)
            elif targets:
                deferred.extend((name, t) for t in targets)
    return graph, deferred


def test_chatapp_has_no_import_cycle():
    graph, _ = _graph()
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in done:
            return
        if node in visiting:
            cycles.append(trail[trail.index(node) :] + [node])
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, f"import cycles: {cycles}"


def test_no_imports_deferred_into_functions():
    _, deferred = _graph()
    deferred = [d for d in deferred if d not in ALLOWED_DEFERRED]
    assert not deferred, f"imports inside functions (a cycle being dodged?): {deferred}"
