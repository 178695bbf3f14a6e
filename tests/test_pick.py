"""make pick: the newest complete run of a trainer goes into params.yaml.

The run folders are built here, shaped as stages/pick.py reads them: a complete
run is ``final_model/adapter_config.json`` + ``final_model/adapter_model.safetensors``
(a tiny real LoRA) + ``training_lineage.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from stages import pick
from stages.config.params import load_params
from stages.core.errors import ParamsError, ReleaseError
from tests.merge_fixtures import write_adapter

REPO = Path(__file__).resolve().parent.parent


def write_tiny_adapter(final: Path) -> None:
    """A real (if tiny) peft LoRA for one q_proj: adapter_config.json and safetensors weights."""
    gen = torch.Generator().manual_seed(0)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    write_adapter(final, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                          "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                  {f"{module}.lora_A.weight": torch.randn(2, 8, generator=gen),
                   f"{module}.lora_B.weight": torch.randn(8, 2, generator=gen)})


def fake_output_root(root: Path, runs: dict[str, str | None]) -> None:
    """Trainer output root with runs named like timestamps; None = incomplete run."""
    for name, finished in runs.items():
        final = root / name / "final_model"
        final.mkdir(parents=True)
        if finished is None:
            (final / "adapter_config.json").write_text("{}")  # crashed before saving weights
            continue
        write_tiny_adapter(final)
        assert pick.is_complete(root / name)
        (root / name / "training_lineage.json").write_text(json.dumps({"finished": finished}))


@pytest.fixture()
def params_copy(tmp_path: Path) -> Path:
    """params.yaml and pipeline.yaml, as in the repository."""
    path = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    shutil.copy2(REPO / "pipeline.yaml", tmp_path / "pipeline.yaml")
    return path


def test_pick_writes_the_newest_complete_run(params_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "sft_output_cpu"
    fake_output_root(root, {
        "20261101_090000": "2026-11-01T09:30:00+00:00",
        "20261120_090000": "2026-11-20T09:30:00+00:00",
        "20261126_090000": None,  # newest folder, but incomplete
    })
    text = params_copy.read_text().replace("output_root: inputs/runs/sft",
                                           f"output_root: {root}")
    params_copy.write_text(text)
    result = pick.run(params_path=params_copy, trainer_key="sft")
    assert result.changed
    assert result.adapter == root / "20261120_090000" / "final_model"
    data = yaml.safe_load(params_copy.read_text())
    assert data["trainers"]["sft"]["adapter"] == str(result.adapter)
    assert data["trainers"]["kto"] == yaml.safe_load(text)["trainers"]["kto"]
    # one line changed, comments kept
    lines = params_copy.read_text().splitlines()
    assert len(lines) == len(text.splitlines())
    changed = [a for a, b in zip(text.splitlines(), lines, strict=True) if a != b]
    assert len(changed) == 1 and "adapter:" in changed[0]
    assert "# One entry per trainer" in params_copy.read_text()
    # a second pick before `make pipeline` rewrites pipeline.yaml: not refused
    assert pick.run(params_path=params_copy, trainer_key="sft").changed is False
    with pytest.raises(ParamsError, match="make pipeline"):  # what a stage would say
        load_params(params_copy)


def test_pick_without_complete_runs_says_what_a_run_needs(params_copy: Path,
                                                          tmp_path: Path) -> None:
    root = tmp_path / "empty_output"
    (root / "20261126_090000" / "final_model").mkdir(parents=True)
    params_copy.write_text(params_copy.read_text().replace("output_root: inputs/runs/kto",
                                                           f"output_root: {root}"))
    with pytest.raises(ReleaseError, match="no complete run under .*adapter_model.safetensors"):
        pick.run(params_path=params_copy, trainer_key="kto")
