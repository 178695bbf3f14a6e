"""Convert a merged Hugging Face model to one full-precision GGUF (the ``convert`` stage).

Reads:  the merged model folder (safetensors, config, tokenizer, chat template)
        and the trainer's entry in params.yaml (name, base model, license, tags,
        chat_template / eos_token overrides).
Writes: ``--out``, one bf16 (or f16) GGUF that every quantization level is made
        from.  Atomically.

With ``--base``, the trainer's base model instead (the ``convert_base`` stage):
the GGUF the reference stage measures the adapter's effect against, named after
the base, without the trainer's metadata or overrides.

The work is :func:`stages.llamacpp.convert.convert_to_gguf`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.llamacpp.convert import convert_to_gguf


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.convert", "Convert a merged HF model folder to one bf16/f16 GGUF with the pinned "
        "llama.cpp's convert_hf_to_gguf.py; GGUF metadata comes from the trainer's params.")
    parser.add_argument("--model", type=Path, required=True,
                        help="merged HF model folder (with --base: the base model's folder)")
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--base", action="store_true",
                        help="convert the trainer's base model: named after it, no overrides")

    def body(args) -> None:
        params = load_params(args.params)
        convert_to_gguf(model=args.model, out=args.out, trainer=params.trainer(args.trainer),
                        outtype=params.convert_outtype, llama_cpp_version=params.llama_cpp_version,
                        base_only=args.base)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
