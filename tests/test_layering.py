"""Import direction (STYLE.md rule 4): methods are pure torch, distributed knows no method names."""

from __future__ import annotations

import ast
from pathlib import Path

from lrx.methods import available_methods
from tests.conftest import REPO


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def offending(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((REPO / "lrx" / folder).rglob("*.py")):
        for name in imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_methods_import_no_distribution_or_trainer():
    banned = ("torch.distributed", "deepspeed", "lrx.distributed", "lrx.trainer", "lrx.runner", "accelerate")
    assert offending("methods", banned) == []


def test_distributed_knows_no_method_names():
    banned = tuple(f"lrx.methods.{m}" for m in available_methods())
    assert offending("distributed", banned) == []


def test_trainer_and_runner_never_branch_on_method_names():
    for module in ("trainer.py", "runner.py", "cli.py", "adapter.py"):
        source = (REPO / "lrx" / module).read_text()
        for name in available_methods():
            assert f'"{name}"' not in source and f"'{name}'" not in source, f"{module} mentions {name!r}"
