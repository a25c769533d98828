"""The type stub `banditd/_core.pyi` names exactly what the compiled module offers."""

from __future__ import annotations

import ast
from pathlib import Path

import banditd
from banditd import _core

STUB = Path(banditd.__file__).parent / "_core.pyi"


def _stub_names() -> tuple[set[str], set[str]]:
    tree = ast.parse(STUB.read_text())
    module = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    bandit = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Bandit")
    methods = {n.name for n in bandit.body if isinstance(n, ast.FunctionDef)} - {"__init__"}
    return module, methods


def test_the_stub_matches_the_compiled_module() -> None:
    module, methods = _stub_names()
    assert module == {n for n in dir(_core) if not n.startswith("_")}
    assert methods == {n for n in dir(_core.Bandit) if not n.startswith("_")}
