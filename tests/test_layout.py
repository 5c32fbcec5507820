"""The architecture, checked: dependencies point one way (docs/contributing.md, Layout), no import cycles, imports
between our modules at the top of the file, the model files import nothing of ours, files stay small."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llamaforge"
# top to bottom; a module may import only from its own layer or below ("a|b": one layer)
LAYERS = ["cli", "workflows", "publish", "modelcheck", "train", "eval", "data", "runs", "model|tokenizer|config",
          "fsutil|cache|errors"]


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def our_imports(mods: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, at top level) for every import of a llamaforge module."""
    out = []
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            out += [(name, t, node.col_offset == 0) for t in targets if t.split(".")[0] == "llamaforge"]
    return out


def layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(LAYERS) if part in names.split("|")), None)


def test_dependencies_point_one_way_without_cycles():
    mods = modules()
    edges = our_imports(mods)
    inner = [(a, b) for a, b, top in edges if not top]
    assert inner == [], f"imports between our modules belong at the top of the file: {inner}"
    upward = [(a, b) for a, b, _ in edges if layer(a) is not None and layer(b) is not None and layer(b) < layer(a)]
    assert upward == [], f"imports against the layer order {LAYERS}: {upward}"
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)

    def visit(node, path):
        for nxt in graph.get(node, ()):
            assert nxt not in path, f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}"
            visit(nxt, path + [nxt])

    for m in graph:
        visit(m, [m])


def test_model_files_import_nothing_of_ours_and_files_stay_small():
    mods = modules()
    for a, b, _ in our_imports(mods):
        if a.startswith("llamaforge.model.hf"):
            assert b.startswith("llamaforge.model.hf"), f"{a} imports {b}: the model files travel alone"
    for example in (PACKAGE.parents[1] / "examples").rglob("*.py"):  # a user's model, as the contract asks
        imported = [a.name for n in ast.walk(ast.parse(example.read_text())) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(ast.parse(example.read_text())) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.startswith("llamaforge")], f"{example} imports llamaforge: it must stand alone"
    long = {str(p.relative_to(PACKAGE)): n for p in mods.values() if (n := len(p.read_text().splitlines())) >= 400}
    assert long == {}, f"files of 400 lines or more: {long}"
