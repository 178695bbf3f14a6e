"""Quantize the full-precision GGUF of one trainer to one level (the ``quantize`` stage).

Reads:  the bf16/f16 GGUF of a trainer and ``quantize.levels.<LEVEL>`` in
        params.yaml.
Writes: ``--out`` (the quantized GGUF) and, beside it, ``<LEVEL>.json`` (bytes,
        options, llama.cpp's type fallbacks; the card hashes what it publishes).  Atomically.

One DVC stage per trainer × level, so changing one level reruns only it.  The
work is :func:`stages.llamacpp.quantize.quantize_gguf`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.llamacpp.quantize import quantize_gguf


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.quantize", "Quantize a bf16/f16 GGUF to one llama-quantize level (options from "
        "quantize.levels.<LEVEL> in params.yaml); also writes <out minus .gguf>.json.")
    parser.add_argument("--in", dest="source", type=Path, required=True, help="bf16/f16 GGUF")
    parser.add_argument("--level", required=True, help="a key of quantize.levels, e.g. Q4_K_M")
    parser.add_argument("--out", type=Path, required=True, help="quantized GGUF to write")

    def body(args) -> None:
        params = load_params(args.params)
        quantize_gguf(source=args.source, out=args.out, level=params.level(args.level),
                      llama_cpp_version=params.llama_cpp_version)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
