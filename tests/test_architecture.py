"""The layers of docs/architecture.md hold in the code: every import inside the package (lazy ones in
functions included, and the names in the plug-in tables of `named_imports.py`) points to the same layer
or one below, except the plug-in arrows docs/architecture.md lists; and no modules import each other."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lion_mllm"

# Layer of each module or subpackage (the first dotted part below lion_mllm: a subpackage is held to its
# layer as a whole); higher layers may use lower.
LAYERS: dict[str, int] = {
    **dict.fromkeys(("model", "checkpoints", "engine", "ram", "errors", "failure_isolation", "named_imports",
                     "devices"), 0),
    **dict.fromkeys(("lion", "drawing", "model_options", "__init__"), 1),
    "evaluation": 2,
    "train": 3,
    "shapes": 4,
    **dict.fromkeys(("run", "scale", "server"), 5),
    **dict.fromkeys(("demo", "cli", "__main__"), 6),
}

# The upward arrows a plug-in table may make (docs/architecture.md): (the reading module or package, the
# named part).
PLUG_IN_ARROWS = {("model.taggers", "shapes"), ("train", "shapes")}
TABLES_MODULE = PACKAGE / "named_imports.py"


def _module_parts(path: Path) -> tuple[str, ...]:
    return path.relative_to(PACKAGE).with_suffix("").parts


def _imported_parts(node: ast.ImportFrom | ast.Import, parts: tuple[str, ...], is_package: bool) -> list[tuple[str, ...]]:
    """The lion_mllm module paths an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [tuple(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "lion_mllm"]
    if node.level == 0:
        if not (node.module or "").startswith("lion_mllm"):
            return []
        base = tuple(node.module.split(".")[1:])
    else:
        package = parts if is_package else parts[:-1]
        base = package[: len(package) - (node.level - 1)] + tuple((node.module or "").split(".") if node.module else ())
    if node.module is None or base == ():  # `from . import x` / `from .. import x`: x may be a module
        return [base + (a.name,) for a in node.names]
    return [base]


def _layer(parts: tuple[str, ...]) -> int | None:
    return LAYERS.get(parts[0] if parts else "__init__")


def test_every_module_has_a_layer() -> None:
    missing = sorted({_module_parts(p)[0] for p in PACKAGE.rglob("*.py")} - set(LAYERS))
    assert not missing, f"modules with no layer in LAYERS (and docs/architecture.md): {missing}"


def _plug_in_tables() -> dict[str, list[str]]:
    """The tables of named_imports.py: name -> its "lion_mllm.module:attribute" entries."""
    tables = {}
    for node in ast.parse(TABLES_MODULE.read_text()).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Dict) and isinstance(node.target, ast.Name):
            tables[node.target.id] = [value.value for value in node.value.values]
    return tables


def _tables_read(node: ast.ImportFrom, parts: tuple[str, ...], is_package: bool) -> list[str]:
    """The plug-in tables an import statement takes from named_imports."""
    if ("named_imports",) not in _imported_parts(node, parts, is_package):
        return []
    return [alias.name for alias in node.names if alias.name in _plug_in_tables()]


def _along_a_plug_in_arrow(reader: tuple[str, ...], target: tuple[str, ...]) -> bool:
    dotted = ".".join(reader) or "__init__"
    return any((dotted == source or dotted.startswith(source + ".")) and target[0] == named
               for source, named in PLUG_IN_ARROWS)


def test_imports_point_down() -> None:
    """A table's entries count as imports by the modules that read it: upward ones are allowed there only,
    and only along PLUG_IN_ARROWS."""
    upward = []
    tables = _plug_in_tables()
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = _module_parts(path)
        is_package = path.name == "__init__.py"
        parts = parts[:-1] if is_package else parts
        own = _layer(parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            named = [(target, "") for target in _imported_parts(node, parts, is_package)]
            if isinstance(node, ast.ImportFrom):
                named += [(tuple(entry.split(":")[0].split(".")[1:]), f" through named_imports.{table}")
                          for table in _tables_read(node, parts, is_package) for entry in tables[table]]
            for target, through in named:
                layer = _layer(target)
                if layer is None or own is None or layer <= own:
                    continue
                if through and _along_a_plug_in_arrow(parts, target):
                    continue
                upward.append(f"{'.'.join(parts) or '__init__'} (layer {own}) imports "
                              f"{'.'.join(target)} (layer {layer}){through}, line {node.lineno}")
    assert not upward, "imports against the layers of docs/architecture.md:\n" + "\n".join(upward)


def test_plug_in_tables_are_read_name_what_exists_and_are_the_only_named_imports() -> None:
    """Every table is read by some module (its layer is theirs) and names an attribute that exists; no
    other module holds a "lion_mllm...:attribute" string, where the layer test would not see it."""
    tables = _plug_in_tables()
    assert set(tables) >= {"TAGGER_KINDS", "MODEL_BUILDERS", "STREAMS", "OBJECTIVES", "VALIDATORS"}
    read: set[str] = set()
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = _module_parts(path)
        is_package = path.name == "__init__.py"
        parts = parts[:-1] if is_package else parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                read.update(_tables_read(node, parts, is_package))
            if (path != TABLES_MODULE and isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"lion_mllm(\.\w+)*:\w+", node.value)):
                hidden.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value}")
    assert read == set(tables), f"tables no module reads: {sorted(set(tables) - read)}"
    assert not hidden, "plug-in names outside named_imports.py:\n" + "\n".join(hidden)
    for table, entries in tables.items():
        for entry in entries:
            module, attribute = entry.split(":")
            assert hasattr(importlib.import_module(module), attribute), f"named_imports.{table}: {entry}"


def _module_name(path: Path) -> str:
    parts = ("lion_mllm", *_module_parts(path))
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run (module level or in a function), not those under `if TYPE_CHECKING:`."""
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for statement in node.body for inner in ast.walk(statement)}
    return [node for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from package import name` counts as the module
    `package.name` where there is one, else the package)."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in paths)
                continue
            base = node.module or ""
            if node.level:
                above = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(above + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                if target in paths and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    assert [ast.unparse(node) for node in _runtime_imports(tree)] == ["from typing import TYPE_CHECKING", "import y"]


def test_no_import_cycles() -> None:
    """No two modules of the package import each other, directly or around a loop, counting imports in
    functions (which run later but still tie the two modules together). A plug-in table's names are not
    counted: they point from a lower layer to a higher one that may well import the lower."""
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)
