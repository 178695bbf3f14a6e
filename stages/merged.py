"""Assemble a trainer's published merged-weights folder: the base with the adapter merged
in, as ``transformers`` loads it.

Reads:  ``--merged`` (merge@<trainer>'s folder, ``build/<trainer>/work/merged``), the
        trainer's adapter and ``--base`` (the merge is checked against both first), its
        ``training_lineage.json``, its params, ``templates/``.
Writes: ``--out`` = ``build/<trainer>/merged/``, exactly what is published: the
        weights as 16-bit safetensors in ``release.merged.dtype`` (bf16 or f16) with
        their index, ``config.json``, ``generation_config.json``, the tokenizer and chat
        template files, ``README.md`` (model card) and ``manifest.json``.

The merge is verified to be the trainer's adapter applied to its base, tensor by
tensor against peft's own layer math, streamed (its memory does not grow with the
model).  The folder appears whole or not at all, and only once nothing in it
identifies the build machine or is a secret.  See stages/release/merged.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.release.merged import render_merged_release


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.merged", "Assemble build/<trainer>/merged/: the merged model as 16-bit "
        "safetensors that transformers' from_pretrained loads (config, tokenizer, chat "
        "template, generation config), a Hugging Face model card (README.md) and "
        "manifest.json, after checking the merge is the trainer's adapter applied to its base.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--merged", type=Path, required=True,
                        help="merge@<trainer>'s folder (build/<trainer>/work/merged)")
    parser.add_argument("--base", type=Path, required=True,
                        help="the base model's folder (trainers.<t>.base_model.path)")
    parser.add_argument("--out", type=Path, required=True,
                        help="published folder to write (build/<trainer>/merged)")

    def body(args) -> None:
        render_merged_release(params=load_params(args.params), trainer_key=args.trainer,
                              merged=args.merged, base=args.base, out=args.out)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
