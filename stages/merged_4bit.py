"""Assemble a trainer's published NF4 folder: the merged model quantized by bitsandbytes
to 4-bit NormalFloat, as ``*-bnb-4bit`` repos hold it.

Reads:  ``--merged`` (merge@<trainer>'s folder, ``build/<trainer>/work/merged``), the
        trainer's adapter and ``--base`` (the merge is checked against both first), its
        ``training_lineage.json``, its params, ``templates/``.
Writes: ``--out`` = ``build/<trainer>/merged_4bit/``, exactly what is published:
        ``model.safetensors`` (NF4 linear layers, double-quantized block scales, the rest
        bf16), ``config.json`` with its ``quantization_config``, ``generation_config.json``,
        the tokenizer and chat template files, ``README.md`` and ``manifest.json``.

Quantized on the CPU by transformers' bitsandbytes integration; the folder is loaded
back and scores a few tokens before it is published.  Its memory grows with the model
(the whole 4-bit model is held): the stage checks available RAM first.  See
stages/release/merged_4bit.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.release.merged_4bit import render_4bit_release


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.merged_4bit", "Assemble build/<trainer>/merged_4bit/: the merged model as "
        "bitsandbytes NF4 safetensors (what -bnb-4bit repos hold) that transformers loads "
        "as it is, a Hugging Face model card (README.md) and manifest.json, after checking "
        "the merge is the trainer's adapter applied to its base.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--merged", type=Path, required=True,
                        help="merge@<trainer>'s folder (build/<trainer>/work/merged)")
    parser.add_argument("--base", type=Path, required=True,
                        help="the base model's folder (trainers.<t>.base_model.path)")
    parser.add_argument("--out", type=Path, required=True,
                        help="published folder to write (build/<trainer>/merged_4bit)")

    def body(args) -> None:
        render_4bit_release(params=load_params(args.params), trainer_key=args.trainer,
                            merged=args.merged, base=args.base, out=args.out)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
