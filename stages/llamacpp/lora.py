"""A peft LoRA adapter -> a GGUF LoRA, with the pinned llama.cpp's converter.

``convert_lora_to_gguf.py`` writes each targeted weight's ``lora_a`` / ``lora_b``
and one ``adapter.lora.alpha``; llama.cpp applies ``alpha / rank`` times
``B·A`` to the weight (src/llama-adapter.cpp), rank read per tensor.  So a GGUF
LoRA holds exactly what peft computes only when every module's scale times
its rank is the same number (:func:`gguf_alpha`): rank_pattern alone is fine,
rsLoRA with one rank is fine (its alpha is rewritten so alpha/rank = peft's
alpha/√r), alpha_pattern or rsLoRA with mixed ranks are not.  What a GGUF LoRA
cannot hold at all (:func:`gguf_lora_problems`): whole replaced tensors
(``modules_to_save``, new vocabulary rows), DoRA's magnitude, LoRA biases.

The converter reads the base model's config (``--base``, never the Hub) and
names the file after the folder it converts: it is given a folder of links
named after the release (:func:`convert_lora`), so nothing of this machine's
folders reaches the GGUF's metadata.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.core import atomic
from stages.core.errors import InputError, ToolError
from stages.core.process import dies_with_parent
from stages.llamacpp.tools import source_dir
from stages.weights.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter

log = logging.getLogger(__name__)

# Output types the converter takes for the LoRA tensors (its --outtype).
OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
# Relative difference of two modules' alpha (scale × rank) still taken as equal:
# alpha/√r in float64 times r, against the same for another module of that rank.
ALPHA_TOLERANCE = 1e-6


@dataclass(frozen=True)
class LoraGguf:
    out: Path
    bytes: int
    alpha: float
    tensors: int  # lora_a + lora_b pairs written (one per targeted weight)


def gguf_alpha(adapter: Adapter) -> float | None:
    """The one ``alpha`` for which llama.cpp's ``alpha / rank`` is every module's peft
    scale, or None when the modules need different ones."""
    alphas = [m.scale * m.a.shape[0] for m in adapter.modules.values()]
    if not alphas:
        return None
    first = alphas[0]
    if all(math.isclose(a, first, rel_tol=ALPHA_TOLERANCE) for a in alphas):
        return first
    return None


def gguf_lora_problems(adapter: Adapter) -> list[str]:
    """What of ``adapter`` a GGUF LoRA cannot hold; empty when it holds all of it."""
    problems = []
    if not adapter.modules:
        problems.append("it has no LoRA modules, only whole tensors")
    if adapter.tensors:
        names = sorted(adapter.tensors)
        shown = ", ".join(f"`{n}`" for n in names[:3]) + (" …" if len(names) > 3 else "")
        problems.append(f"it holds whole tensors ({shown}: modules_to_save, new vocabulary "
                        "rows, or the embedding copies peft saves beside a LoRA on an "
                        "embedding or head), which llama.cpp's LoRA format has no place for")
    if dora := sorted(m.module for m in adapter.modules.values() if m.magnitude is not None):
        problems.append(f"it is a DoRA adapter ({len(dora)} modules with a magnitude vector), "
                        "which llama.cpp applies as a plain LoRA")
    if biased := sorted(m.module for m in adapter.modules.values() if m.bias is not None):
        problems.append(f"{len(biased)} modules have a LoRA bias (lora_bias), which llama.cpp's "
                        "LoRA format has no place for")
    if adapter.modules and gguf_alpha(adapter) is None:
        scales = sorted({f"{m.scale:g}×r{m.a.shape[0]}" for m in adapter.modules.values()})
        problems.append("its modules need different alphas (alpha_pattern, or rsLoRA with "
                        f"several ranks: scale × rank {', '.join(scales[:4])}), and a GGUF "
                        "LoRA holds one")
    return problems


def check_gguf_lora(adapter: Adapter, trainer_key: str) -> float:
    """The GGUF alpha of ``adapter``, or an InputError that says what to release instead."""
    problems = gguf_lora_problems(adapter)
    if problems:
        raise InputError(
            f"the adapter {adapter.path} cannot be released as a GGUF LoRA: "
            + "; ".join(problems) + ". Release it without one "
            f"(trainers.{trainer_key}.release.adapter.gguf_lora: false); the `gguf` format "
            "(the merged model) holds all of it")
    alpha = gguf_alpha(adapter)
    assert alpha is not None  # no problems means one alpha
    return alpha


def _view(adapter: Adapter, config: dict, alpha: float, folder: Path) -> Path:
    """A folder with the adapter's weights (a link) and a config whose ``lora_alpha`` is
    the GGUF alpha, as the converter reads it."""
    folder.mkdir(parents=True)
    os.symlink((adapter.path / ADAPTER_WEIGHTS).resolve(), folder / ADAPTER_WEIGHTS)
    view = {**config, "lora_alpha": alpha, "use_rslora": False, "alpha_pattern": {}}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(view, indent=2))
    return folder


def convert_lora(*, adapter: Adapter, config: dict, base: Path, out: Path, name: str,
                 outtype: str, trainer_key: str, llama_cpp_version: str) -> LoraGguf:
    """Write ``out``, the GGUF LoRA of ``adapter`` (``config``: its public
    adapter_config.json) on the base model whose HF folder is ``base``."""
    if outtype not in OUTTYPES:
        raise InputError(f"GGUF LoRA output type {outtype!r} is not one of {', '.join(OUTTYPES)}")
    alpha = check_gguf_lora(adapter, trainer_key)
    if not (base / "config.json").is_file():
        raise InputError(f"{base} has no config.json; the GGUF LoRA converter reads the base "
                         "model's config (trainers.<t>.base_model.path)")
    script = source_dir(llama_cpp_version) / "convert_lora_to_gguf.py"
    with tempfile.TemporaryDirectory() as tmp_dir, atomic.output_file(out) as tmp:
        view = _view(adapter, config, alpha, Path(tmp_dir) / name)
        cmd = [sys.executable, str(script), str(view), "--base", str(base), "--outfile",
               str(tmp), "--outtype", outtype]
        log.info("converting %s to a GGUF LoRA (%s, alpha %g)", adapter.path, outtype, alpha)
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, **dies_with_parent())
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-12:])
            raise ToolError(f"convert_lora_to_gguf.py failed (exit {result.returncode}) on "
                            f"{adapter.path}:\n{tail}")
    return LoraGguf(out=out, bytes=out.stat().st_size, alpha=alpha,
                    tensors=len(adapter.modules))
