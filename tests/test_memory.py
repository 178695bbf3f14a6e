"""Every stage holds bounded memory: its largest process stays under the bound the README
states for it (Memory and disk per stage), +10%, on the demo's model.

Each stage command runs as dvc.yaml gives it, on the built demo's inputs, writing into a
temporary folder, under a wrapper that prints the peak RSS of the largest process it
started (``RUSAGE_CHILDREN``: the stage or a tool it ran).  A stage that loaded a whole
model where it should stream, or a tool that held more than its mapped GGUF, fails here.
``reference`` has its own test (tests/test_evaluate.py: streamed within its bound with no
resident budget).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from stages.fidelity.llama_checks import tool_memory
from stages.weights.safetensors_io import model_tensors
from tests.pipeline import run

MB = 2**20
# What a stage's Python holds before any model: the interpreter with torch, transformers
# or gguf-py imported (measured on the demo: 0.3-0.5 GB).
LIBRARIES = 600 * MB
# The merge's working set: one chunk of a tensor per thread (stages/weights/merge.py).
MERGE_WORKING_SET = 256 * MB
# convert_hf_to_gguf.py in lazy mode: a tensor at a time, read bf16 and written out, a
# few copies of the largest (fp32 while converted).
CONVERT_TENSOR_TIMES = 4
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def largest_tensor_fp32(folder: Path) -> int:
    return max(t.numel for t in model_tensors(folder).values()) * 4


def work(repo: Path) -> Path:
    return repo / "build/sft/work"


def ctx(repo: Path) -> int:
    return yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["ctx"]


# stage: (arguments after `python -m`, its bound from the repo's inputs)
STAGES: dict[str, tuple[Callable[[Path, Path], list[str]], Callable[[Path], int]]] = {
    "merge": (lambda r, t: ["stages.merge", "--base", "inputs/base/SmolLM2-135M-Instruct",
                            "--adapter", "inputs/runs/sft/demo/final_model",
                            "--out", str(t / "merged")],
              lambda r: LIBRARIES + MERGE_WORKING_SET),
    "convert": (lambda r, t: ["stages.convert", "--trainer", "sft", "--model",
                              "build/sft/work/merged", "--out", str(t / "full.gguf")],
                lambda r: LIBRARIES + CONVERT_TENSOR_TIMES * largest_tensor_fp32(
                    work(r) / "merged")),
    "convert_base": (lambda r, t: ["stages.convert", "--base", "--trainer", "sft", "--model",
                                   "inputs/base/SmolLM2-135M-Instruct",
                                   "--out", str(t / "base.gguf")],
                     lambda r: LIBRARIES + CONVERT_TENSOR_TIMES * largest_tensor_fp32(
                         r / "inputs/base/SmolLM2-135M-Instruct")),
    "quantize": (lambda r, t: ["stages.quantize", "--level", "Q4_K_M", "--in",
                               "build/sft/work/full.gguf", "--out", str(t / "Q4_K_M.gguf")],
                 lambda r: tool_memory(work(r) / "full.gguf", ctx=0)),
    "logits": (lambda r, t: ["stages.logits", "--gguf", "build/sft/work/full.gguf",
                             "--out", str(t / "reference.kld")],
               lambda r: tool_memory(work(r) / "full.gguf", ctx=ctx(r))),
    "evaluate": (lambda r, t: ["stages.evaluate", "--trainer", "sft", "--level", "Q4_K_M",
                               "--gguf", "build/sft/work/quant/Q4_K_M.gguf",
                               "--logits", "build/sft/work/reference.kld",
                               "--out", str(t / "eval/Q4_K_M.json")],
                 lambda r: max(LIBRARIES,
                               tool_memory(work(r) / "quant/Q4_K_M.gguf",
                                           ctx=max(ctx(r), 512)))),  # the smoke turn: 512
    "card": (lambda r, t: ["stages.card", "--trainer", "sft", "--quant-dir",
                           "build/sft/work/quant", "--eval-dir", "build/sft/work/eval",
                           "--out", str(t / "gguf"), "--plot-data", str(t / "quality.json")],
             lambda r: LIBRARIES),
    # the adapter check's row chunks and a 16 MB cast chunk: the libraries' bound (a whole
    # 135M model in memory, 270 MB more, goes over it)
    "merged": (lambda r, t: ["stages.merged", "--trainer", "sft", "--merged",
                             "build/sft/work/merged", "--base", "inputs/base/SmolLM2-135M-Instruct",
                             "--out", str(t / "merged")],
               lambda r: LIBRARIES),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_peak_memory_stays_under_its_bound(stage: str, built_repo: Path,
                                                 tmp_path: Path) -> None:
    args, bound = STAGES[stage]
    python = str(built_repo / ".venv/bin/python")
    res = run([python, "-c", PEAK, python, "-m", *args(built_repo, tmp_path)], cwd=built_repo)
    peak, limit = int(res.stdout.split()[-1]), bound(built_repo) * 1.1
    print(f"{stage}: peak {peak / MB:.0f} MB, bound {limit / MB:.0f} MB (+10%)")
    assert peak < limit, f"{stage} peaked at {peak / MB:.0f} MB, over its bound {limit / MB:.0f} MB"
