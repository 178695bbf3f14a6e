"""Assemble a trainer's published GGUF folder: files, model card, Modelfile,
manifest.

Reads:  ``--quant-dir`` (each level's GGUF and its ``<LEVEL>.json`` record from
        the quantize stage), ``--eval-dir`` (the fidelity figures of the
        reference and evaluate stages), the run's ``training_lineage.json``,
        the trainer's params, and ``templates/``.
Writes: ``--out`` = ``build/<trainer>/gguf/``, exactly what is published:
        ``<name>-<LEVEL>.gguf`` (hard links to the quantize outputs, so no
        copy; a level over ``release.gguf.split_max_size`` as llama-gguf-split's
        shards ``<name>-<LEVEL>-00001-of-0000N.gguf``, never the Ollama level),
        ``README.md`` (Hugging Face model card, metadata as the Hub takes it),
        ``quality.png`` (file size vs KL divergence), ``Modelfile`` (Ollama),
        ``manifest.json``;
        and ``--plot-data`` (the DVC plot of size vs KL divergence).

Rendered text is parsed back and checked before anything is written; the
folder appears whole or not at all.  Of params and the lineage only listed keys
are published (stages/release/privacy.py, stages/release/lineage.py); a secret in
one of them, or a path, user or host name of this machine anywhere in the
folder (GGUF metadata included), stops the stage before the folder appears.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.release.card import render_release


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.card", "Assemble build/<trainer>/gguf/: the GGUFs named <name>-<LEVEL>.gguf "
        "(split into llama.cpp shards when over split_max_size), a Hugging Face model card "
        "(README.md), an Ollama Modelfile and manifest.json.",)
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--quant-dir", type=Path, required=True,
                        help="folder with <LEVEL>.gguf and <LEVEL>.json from the quantize stages")
    parser.add_argument("--eval-dir", type=Path, required=True,
                        help="folder with reference.json and <LEVEL>.details.json")
    parser.add_argument("--out", type=Path, required=True, help="published folder to write")
    parser.add_argument("--plot-data", type=Path, required=True,
                        help="JSON rows of size vs KL divergence to write (a DVC plot)")

    def body(args) -> None:
        render_release(params=load_params(args.params), trainer_key=args.trainer,
                       quant_dir=args.quant_dir, eval_dir=args.eval_dir, out=args.out,
                       plot_data=args.plot_data)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
