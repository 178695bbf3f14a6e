"""dvc.yaml lists, for every stage, each module its command imports.

Otherwise DVC would not rerun a stage when code it runs changes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def local_imports(module: str) -> set[str]:
    """Every ``stages.*`` module that ``module`` imports, transitively: at top level, or
    deferred through ``importlib.import_module`` (as the merge imports its torch part)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((REPO / (name.replace(".", "/") + ".py")).read_text())
        for node in tree.body:  # module-level imports: what `python -m` always loads
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                todo += [f"stages.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                todo.append(node.module)
        for node in ast.walk(tree):  # deferred ones: importlib.import_module("stages.x")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                    and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).startswith("stages."):
                todo.append(node.args[0].value)
    return seen


def stage_defs() -> list[tuple[str, dict]]:
    out = []
    for name, stage in DVC["stages"].items():
        body = stage.get("do", stage)
        out.append((name, body))
    return out


@pytest.mark.parametrize(("name", "stage"), stage_defs(), ids=[n for n, _ in stage_defs()])
def test_stage_deps_list_every_imported_module(name: str, stage: dict) -> None:
    module = re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1)
    needed = {m.replace(".", "/") + ".py" for m in local_imports(module)}
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
    missing = sorted(needed - deps - {"stages/__init__.py"})
    assert not missing, f"stage {name} runs {module} but dvc.yaml deps lack {missing}"
