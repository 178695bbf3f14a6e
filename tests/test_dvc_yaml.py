"""dvc.yaml: every stage's deps cover the code it runs, and nothing more.

A stage lists its own module, the library folders of ``stages/`` it imports,
and its data. If an import were not under a dep, DVC would not rerun the stage
when that code changes; if a folder were listed that the stage never imports,
editing it would rerun the stage for nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PY = next(v["py"] for v in DVC["vars"] if isinstance(v, dict) and "py" in v)
STAGES = REPO / "stages"
LIBRARIES = sorted(p.name for p in STAGES.iterdir() if (p / "__init__.py").is_file())


def module_file(module: str) -> Path:
    """The file of ``stages.x.y``: ``stages/x/y.py`` or ``stages/x/y/__init__.py``."""
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def direct_imports(module: str) -> set[str]:
    """``stages.*`` modules that ``module`` imports anywhere in its body (deferred ones
    too, and ``importlib.import_module("stages.x")``), with their parent packages."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stages.")}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).startswith("stages."):
            found.add(node.args[0].value)
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 1)}
    return found | parents


def all_imports(module: str) -> set[str]:
    """``module`` and everything it imports from ``stages``, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += direct_imports(name)
    return seen - {"stages"}  # stages/__init__.py: a docstring only


def stage_defs() -> list[tuple[str, dict]]:
    return [(name, stage.get("do", stage)) for name, stage in DVC["stages"].items()]


def stage_module(stage: dict) -> str:
    cmd = " ".join(stage["cmd"].split())
    match = re.match(r"(?:[A-Z_]+=\S* )*\$\{py\}\.([\w.]+)\s", cmd)  # env assignments first
    assert match, f"cmd does not start with ${{py}}.<module>: {cmd}"
    return f"stages.{match.group(1)}"


def code_deps(stage: dict) -> list[str]:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return [d for d in deps if d.startswith("stages/")]


@pytest.mark.parametrize(("name", "stage"), stage_defs(), ids=[n for n, _ in stage_defs()])
def test_every_import_lies_under_a_listed_dep(name: str, stage: dict) -> None:
    module = stage_module(stage)
    deps = [REPO / d for d in code_deps(stage)]
    missing = sorted(str(module_file(m).relative_to(REPO)) for m in all_imports(module)
                     if not any(module_file(m) == d or d in module_file(m).parents for d in deps))
    assert not missing, f"stage {name} runs {module} but no dep of dvc.yaml covers {missing}"


@pytest.mark.parametrize(("name", "stage"), stage_defs(), ids=[n for n, _ in stage_defs()])
def test_code_deps_are_the_module_and_library_folders_it_uses(name: str, stage: dict) -> None:
    module = stage_module(stage)
    own = str(module_file(module).relative_to(REPO))
    used = {f"stages/{m.split('.')[1]}" for m in all_imports(module) if m.count(".") >= 2}
    used -= {str(Path(own).parent)}  # stages/demo/ holds stages, not a library
    deps = code_deps(stage)
    assert deps[:1] == [own], f"stage {name}: the first code dep should be its module {own}"
    assert sorted(deps[1:]) == sorted(used), \
        f"stage {name}: code deps after its module should be the folders it imports: {sorted(used)}"


def test_no_stage_imports_another_stage() -> None:
    runnable = {f"stages.{p.stem}" for p in STAGES.glob("*.py") if p.stem != "__init__"}
    runnable |= {f"stages.demo.{p.stem}" for p in (STAGES / "demo").glob("*.py")
                 if p.stem != "__init__"}
    for module in sorted(runnable):
        others = (all_imports(module) - {module}) & runnable
        assert not others, f"{module} imports the stage(s) {sorted(others)}"


def test_libraries_do_not_import_stages_and_each_has_a_docstring() -> None:
    for lib in LIBRARIES:
        doc = ast.get_docstring(ast.parse((STAGES / lib / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 15, f"stages/{lib}/__init__.py needs a docstring"
        if lib == "demo":
            continue
        for path in (STAGES / lib).glob("*.py"):
            module = f"stages.{lib}.{path.stem}"
            stages = {m for m in direct_imports(module) if m.count(".") == 1
                      and m.split(".")[1] not in LIBRARIES}
            assert not stages, f"library {module} imports the stage(s) {sorted(stages)}"


def test_pipeline_yaml_is_current_and_a_stale_one_stops_every_stage(tmp_path: Path) -> None:
    from stages.config.params import load_params
    from stages.config.pipeline import PIPELINE_FILE, render
    from stages.core.errors import ParamsError

    params = load_params(REPO / "params.yaml", pipeline=False)
    assert (REPO / PIPELINE_FILE).read_text() == render(params), \
        "pipeline.yaml is not what params.yaml gives: run `make pipeline` and commit it"
    # a trainer added to params.yaml without `make pipeline`: no stage runs unaware of it
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["trainers"]["dpo"] = {**data["trainers"]["sft"], "name": "x-dpo"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / PIPELINE_FILE).write_text((REPO / PIPELINE_FILE).read_text())
    with pytest.raises(ParamsError, match=r"does not match params\.yaml.*make pipeline"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / PIPELINE_FILE).write_text(render(load_params(tmp_path / "params.yaml",
                                                             pipeline=False)))
    assert "dpo" in load_params(tmp_path / "params.yaml").trainers


@pytest.mark.parametrize(("formats", "sets"), [
    (["adapter"], {"adapter", "manifest"}),
    (["merged"], {"merge", "merged", "manifest"}),
    (["adapter", "merged"], {"adapter", "merge", "merged", "manifest"}),
    (["merged_4bit"], {"merge", "merged_4bit", "manifest"}),
    (["gguf"], {"merge", "gguf", "manifest"}),
    (["adapter", "gguf"], {"adapter", "merge", "gguf", "lora_check", "manifest"}),
])
def test_a_trainer_is_in_the_stage_sets_its_formats_need(formats: list[str],
                                                        sets: set[str]) -> None:
    """Only what the formats need: no convert, quantize or evaluate (set ``gguf``) without
    a GGUF, no merge for the adapter alone; one push per format, in push order."""
    from stages.config.params import parse_params
    from stages.config.pipeline import ROOT_KEY, stage_sets

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    sft = data["trainers"]["sft"]
    target = {"kind": "local", "path": "published/x"}
    data["trainers"] = {"x": {**sft, "release": {fmt: {"target": target} for fmt in formats}}}
    built = stage_sets(parse_params(data))[ROOT_KEY]
    assert {name for name, items in built.items()
            if isinstance(items, dict) and "x" in items and name != "releases"} == sets
    order = [f for f in ("adapter", "merged", "merged_4bit", "gguf") if f in formats]
    assert list(built["releases"]) == [f"x-{f}" for f in order]


def test_every_trainer_loop_reads_a_stage_set_of_pipeline_yaml() -> None:
    from stages.config.pipeline import RELEASES, STAGE_SETS

    loops = [(name, stage.get("foreach") or stage.get("matrix", {}).get("trainer"))
             for name, stage in DVC["stages"].items()]
    sets = ({f"${{builds.{s}}}" for s in STAGE_SETS} | {f"${{builds.{s}_keys}}" for s in STAGE_SETS}
            | {f"${{builds.{RELEASES}}}"})
    for name, loop in loops:
        if loop is not None and name not in ("train",):
            assert loop in sets, f"stage {name} loops over {loop}, not a set of pipeline.yaml"


@pytest.mark.parametrize(("stage", "fmt"), [("card", "gguf"), ("adapter", "adapter"),
                                           ("merged", "merged"),
                                           ("merged_4bit", "merged_4bit")])
def test_what_a_release_publishes_of_params_is_among_its_stage_params(stage: str,
                                                                      fmt: str) -> None:
    """A published params key that its stage does not declare would go stale in the card
    and manifest: DVC would not rebuild the folder when it changes."""
    from stages.release.privacy import PUBLISHED_PARAMS

    declared = [p.replace("${key}", "{trainer}") for p in DVC["stages"][stage]["do"]["params"]]
    for key in PUBLISHED_PARAMS[fmt]:
        assert any(key == d or key.startswith(f"{d}.") for d in declared), \
            f"{stage}@ publishes `{key}` but does not list it in its DVC params"
