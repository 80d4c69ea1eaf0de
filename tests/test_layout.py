"""The package's layout (#27): few modules at the top, the layers as subpackages, no long modules; and the
module names from before it still import, for one release, as the same module objects."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

import lion_mllm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lion_mllm"
MOVED = lion_mllm._MOVED_MODULES


def test_at_most_twelve_modules_at_the_top() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top


def test_no_module_is_over_700_lines() -> None:
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 700}
    assert not long, long


def test_every_moved_module_names_one_that_exists_and_none_is_left_behind() -> None:
    for old, new in MOVED.items():
        assert importlib.util.find_spec(new).origin.startswith(str(PACKAGE)), new
        assert not (PACKAGE / f"{old.split('.')[1]}.py").exists(), old


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_imports_the_new_module_itself_with_a_warning(old: str, monkeypatch) -> None:
    new = importlib.import_module(MOVED[old])
    monkeypatch.delitem(sys.modules, old, raising=False)  # imported before (another test): import afresh
    with pytest.warns(DeprecationWarning, match=f"{re.escape(old)} is now {re.escape(MOVED[old])}; the old name goes"):
        aliased = importlib.import_module(old)
    assert aliased is new and sys.modules[old] is new
    assert new.__name__ == MOVED[old] and new.__spec__.name == MOVED[old]  # the alias leaves its identity alone


def test_from_an_old_module_import_a_name(monkeypatch) -> None:
    for old in ("lion_mllm.config", "lion_mllm.hub", "lion_mllm.pipeline"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning):
        from lion_mllm.config import LionConfig
        from lion_mllm.hub import resolve_model
        from lion_mllm.pipeline import Lion
    from lion_mllm.checkpoints.hub import resolve_model as new_resolve_model
    from lion_mllm.lion import Lion as NewLion
    from lion_mllm.model.config import LionConfig as NewLionConfig

    assert (LionConfig, resolve_model, Lion) == (NewLionConfig, new_resolve_model, NewLion)


def test_patching_the_old_name_patches_the_new_module(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "lion_mllm.hub", raising=False)
    with pytest.warns(DeprecationWarning):
        import lion_mllm.hub as old_hub
    from lion_mllm.checkpoints import hub

    monkeypatch.setattr(old_hub, "resolve_model", lambda name: f"patched {name}")
    assert hub.resolve_model("x") == "patched x"


def test_the_top_level_names_import_without_a_warning(recwarn) -> None:
    for name in lion_mllm.__all__:
        assert getattr(lion_mllm, name) is not None
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of each lion_mllm import in a file, relative ones resolved from its place."""
    package = path.relative_to(PACKAGE.parent).parent.parts if path.is_relative_to(PACKAGE) else ()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - (node.level - 1)], *([node.module] if node.module else [])])
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_the_project_imports_only_the_new_module_names() -> None:
    files = [path for folder in ("src", "tests", "benchmarks", "examples") for path in (ROOT / folder).rglob("*.py")]
    old_names = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in files if path != Path(__file__).resolve()
                 for line, name in _imported_modules(path)
                 if name in MOVED or any(name.startswith(old + ".") for old in MOVED)]
    assert not old_names, "\n".join(old_names)
    table_of_old_names = {Path(__file__).resolve(), PACKAGE / "__init__.py"}
    mentioned = [f"{path.relative_to(ROOT)}: {match}" for path in files if path not in table_of_old_names
                 for match in re.findall(r"\b(?:" + "|".join(map(re.escape, MOVED)) + r")\b(?!\.py)", path.read_text())]
    assert not mentioned, "old module names in strings or comments:\n" + "\n".join(mentioned)
