"""The layout issue 21 set up, kept: modules of a readable size, imports pointing one way, adapters that ask
the core rather than reach into it, and llama.cpp behind bot/engine/ only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(path for folder in ("bot", "adapters") for path in (ROOT / folder).rglob("*.py"))
LONG_MODULE_LINES = 400  # past this, a module says at its top why it is one module
# Besides bot/engine/: the tools' grammar borrows llama-cpp-python's pure-Python JSON schema -> GBNF converter,
# imported only by the embedded engine's tool rounds.
LLAMA_CPP_BORROWERS = {"bot/tools/grammar.py"}
PLATFORM_LIBRARIES = {"discord", "slack_bolt", "slack_sdk"}  # the adapters' own, with aiohttp.web
DATABASE_LIBRARIES = {"sqlite3", "aiosqlite", "asyncpg"}  # bot/store/ alone speaks SQL
REACHING_IN = re.compile(r"\bmanager\.(store|engine|settings|window|sessions)\b")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from aiohttp import web`
    return names


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_a_long_module_says_at_its_top_why_it_is_one(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if text.count("\n") <= LONG_MODULE_LINES:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "Over 400 lines" in docstring, f"{_name(path)} has {text.count(chr(10))} lines and no reason at its top"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_imports_point_one_way_and_each_library_has_one_home(path: Path) -> None:
    imports = _imports(path)
    if _name(path).startswith("bot/") and _name(path) != "bot/app.py":
        assert not {name for name in imports if name.split(".")[0] == "adapters"}, (
            f"{_name(path)}: only bot/app.py (the composition root) imports adapters/"
        )
        platform = {
            name for name in imports if name.split(".")[0] in PLATFORM_LIBRARIES or name.startswith("aiohttp.web")
        }
        assert not platform, f"{_name(path)}: the core imports no platform library ({platform})"
    if not _name(path).startswith("bot/store/"):
        assert not imports & DATABASE_LIBRARIES, f"{_name(path)}: only bot/store/ speaks SQL"
    if not _name(path).startswith("bot/engine/") and _name(path) not in LLAMA_CPP_BORROWERS:
        assert not {name for name in imports if name.split(".")[0] == "llama_cpp"}, (
            f"{_name(path)}: only bot/engine/ loads llama.cpp"
        )


@pytest.mark.parametrize("path", [p for p in MODULES if _name(p).startswith("adapters/")], ids=_name)
def test_adapters_ask_the_manager_and_never_reach_into_it(path: Path) -> None:
    found = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if REACHING_IN.search(line)
    ]
    assert not found, f"{_name(path)} reaches into the manager (ask it a method instead): {found}"
