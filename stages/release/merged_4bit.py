"""The ``merged_4bit`` format: the merged model as bitsandbytes NF4 safetensors.

What ``*-bnb-4bit`` repos on the Hub hold: every linear layer of the decoder
quantized to 4-bit NormalFloat (blocks of 64, double quantization of the block
scales, bf16 compute), everything else (embeddings, norms, the head) in bf16,
and a ``quantization_config`` in config.json so ``from_pretrained(repo)`` needs
no option.  It is made by transformers' own bitsandbytes integration on the
CPU (bitsandbytes' CPU library, in the lock), from the merged folder that
merge@<trainer> wrote; the merge is checked against the adapter first, as for
the ``merged`` format.

Memory is not bounded by design here: transformers holds the whole 4-bit model
while it quantizes and saves (about 0.6 byte per parameter, plus the bf16
embedding and ~0.8 GB of libraries); the stage checks that much is available
before it loads anything.  After saving, the folder is loaded back and scores
a few tokens, so a release that does not load is never published.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.config.params import Params
from stages.core import atomic
from stages.core.errors import ReleaseError
from stages.core.preflight import check_disk_and_ram, human_size
from stages.fidelity.adapter_check import AdapterCheck
from stages.release.card import finish_format
from stages.release.hub_meta import QUANTIZED, lineage_base
from stages.release.manifest import Artifact, artifact
from stages.release.merged import (
    CONFIG,
    checked_merge,
    copy_side_files,
    has_chat_template,
    kind_of,
    write_json,
)
from stages.weights.safetensors_io import model_tensors

log = logging.getLogger(__name__)

FORMAT = "merged_4bit"
# What Unsloth's and most `-bnb-4bit` repos use.
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True
COMPUTE_DTYPE = "bfloat16"
# Libraries (torch, transformers, bitsandbytes) and the loader's working set.
PROCESS_RAM = 1200 * 2**20
# Bytes held per byte of bf16 weights: 4-bit linears (0.25) with their block scales,
# and the bf16 tensors transformers keeps as they are (embeddings, norms).
HELD_PER_BYTE = 0.6


@dataclass(frozen=True)
class Quantized:
    """What the NF4 release holds."""

    linear_4bit: int  # linear layers stored as NF4
    kept: list[str]  # tensors kept in 16 bits (a few names)
    kept_count: int
    bytes: int  # of the weights file(s)


@dataclass(frozen=True)
class Merged4bitRelease:
    out: Path
    artifacts: tuple[Artifact, ...]
    check: AdapterCheck
    quantized: Quantized


def _quiet_load(path: Path, **kwargs):
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)
    finally:
        transformers.logging.set_verbosity(level)


def quantize(merged: Path, out: Path) -> None:
    """Load ``merged`` quantized to NF4 and save it into ``out`` (weights and config)."""
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE,
                                bnb_4bit_use_double_quant=DOUBLE_QUANT,
                                bnb_4bit_compute_dtype=getattr(torch, COMPUTE_DTYPE))
    try:
        model = _quiet_load(merged, quantization_config=config, dtype=torch.bfloat16)
    except (RuntimeError, ImportError, ValueError) as exc:
        raise ReleaseError(f"bitsandbytes could not quantize {merged} on this CPU: {exc}; "
                           "publish the GGUF Q4 levels or the adapter instead") from None
    model.save_pretrained(out, safe_serialization=True)
    del model


def describe(out: Path) -> Quantized:
    """Count what the saved folder holds (from the safetensors headers alone)."""
    tensors = model_tensors(out)
    states = [n for n in tensors if n.endswith(f".weight.quant_state.bitsandbytes__{QUANT_TYPE}")]
    layers = {s.split(".quant_state")[0] for s in states}  # `<module>.weight`
    kept = sorted(n for n, info in tensors.items() if info.dtype in ("BF16", "F16", "F32")
                  and n not in layers and not any(n.startswith(f"{w}.") for w in layers))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    if not states:
        raise ReleaseError(f"{out}: no NF4 layer was written; bitsandbytes quantized nothing")
    return Quantized(linear_4bit=len(states), kept=kept[:4], kept_count=len(kept), bytes=size)


def check_loads(out: Path) -> None:
    """Load the saved folder as a user would and score a few tokens: finite logits."""
    import torch

    model = _quiet_load(out)
    if getattr(model.config, "quantization_config", None) is None:
        raise ReleaseError(f"{out} loads without its quantization_config")
    ids = torch.tensor([[model.config.bos_token_id or 0, 1, 2, 3]])
    with torch.no_grad():
        logits = model(ids).logits
    if not bool(torch.isfinite(logits).all()):
        raise ReleaseError(f"{out}: the NF4 model gives non-finite logits; publish the GGUF "
                           "Q4 levels instead")


def render_4bit_release(*, params: Params, trainer_key: str, merged: Path, base: Path,
                        out: Path) -> Merged4bitRelease:
    """Check ``merged`` (merge@<t>'s folder) against the trainer's adapter on ``base``,
    then build ``out`` (``build/<trainer>/merged_4bit/``)."""
    inputs = checked_merge(params=params, trainer_key=trainer_key, fmt=FORMAT, merged=merged,
                           base=base)
    trainer = inputs.trainer
    weights = sum(i.nbytes for i in model_tensors(merged).values())
    check_disk_and_ram(out, need_disk=int(weights * HELD_PER_BYTE) + 64 * 2**20,
                       need_ram=PROCESS_RAM + int(weights * HELD_PER_BYTE))
    with atomic.output_dir(out, sync=False) as tmp:
        log.info("quantizing %s to bitsandbytes %s (double quant, %s compute)", merged,
                 QUANT_TYPE.upper(), COMPUTE_DTYPE)
        quantize(merged, tmp)
        write_json(tmp / CONFIG, tmp / CONFIG, base_id=trainer.base_model.id)
        copy_side_files(merged, tmp, base_id=trainer.base_model.id)
        for path in tmp.iterdir():
            path.chmod(0o644)  # save_pretrained may leave files private
        check_loads(tmp)
        quantized = describe(tmp)
        arts = [artifact(tmp.parent, tmp / name, fmt=FORMAT, kind=kind_of(name))
                for name in sorted(p.name for p in tmp.iterdir())]
        base_model, relation = lineage_base(trainer, FORMAT)
        arts = finish_format(
            tmp=tmp, out=out, fmt=FORMAT, trainer=trainer, params=params, arts=arts,
            lineage=inputs.lineage, published=inputs.published,
            template="README.merged_4bit.md.j2",
            quantized_from=base_model if relation == QUANTIZED else None,
            check=asdict(inputs.check),
            quant={"type": QUANT_TYPE.upper(), "double_quant": DOUBLE_QUANT,
                   "compute_dtype": COMPUTE_DTYPE, **asdict(quantized)},
            chat=has_chat_template(tmp))
    log.info("wrote %s (%d files, %s; %d NF4 linear layers)", out, len(arts),
             human_size(sum(a.bytes for a in arts)), quantized.linear_4bit)
    return Merged4bitRelease(out=out, artifacts=tuple(arts), check=inputs.check,
                             quantized=quantized)
