"""The layers of docs/architecture.md hold in the code: every import inside the package (lazy ones in
functions included) points to the same layer or one below."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lion_mllm"

# Layer of each module or subpackage (the first dotted part below lion_mllm); higher layers may use lower.
LAYERS: dict[str, int] = {
    **dict.fromkeys(("tasks", "errors", "failure_isolation", "config", "boxes", "generation", "images", "resample",
                     "processing", "modeling_lion", "engine", "cpu_inference", "checkpoint_files", "bundle", "official",
                     "ram", "taggers", "downloads", "named_imports"), 0),
    **dict.fromkeys(("pipeline", "hub", "drawing", "model_options", "__init__"), 1),
    "evaluation": 2,
    "train": 3,
    "shapes": 4,
    **dict.fromkeys(("batch", "scale", "server"), 5),
    **dict.fromkeys(("demo", "cli", "__main__"), 6),
}


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


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = _module_parts(path)
        is_package = path.name == "__init__.py"
        parts = parts[:-1] if is_package else parts
        own = _layer(parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported_parts(node, parts, is_package):
                layer = _layer(target)
                if layer is not None and own is not None and layer > own:
                    upward.append(f"{'.'.join(parts) or '__init__'} (layer {own}) imports "
                                  f"{'.'.join(target)} (layer {layer}), line {node.lineno}")
    assert not upward, "imports against the layers of docs/architecture.md:\n" + "\n".join(upward)
