"""Assemble a trainer's published adapter folder: the run's LoRA as peft loads it,
the same adapter as a GGUF LoRA, a model card and manifest.

Reads:  the trainer's ``adapter`` folder (the run's ``final_model/``) and its
        ``training_lineage.json``, ``--base`` (the base model's folder: the GGUF
        LoRA converter reads its config.json), ``--lora-check`` (lora_check@<trainer>'s
        figures, when the trainer releases ``gguf`` too), the trainer's params,
        ``templates/``.
Writes: ``--out`` = ``build/<trainer>/adapter/``, exactly what is published:
        ``adapter_model.safetensors``, ``adapter_config.json`` (the base named by
        its Hub id), the tokenizer and chat template files when the run saved them,
        ``<name>-lora-f16.gguf`` (``release.adapter.gguf_lora``, the default; for
        llama.cpp's ``--lora``), ``README.md`` (model card) and ``manifest.json``.

Nothing else of the run's folder is published (``training_args.bin``, optimizer
state, the trainer's README: see stages/release/adapter.py).  No merge, convert
or quantize stage is needed for this format.  The folder appears whole or not
at all, and only once nothing in it identifies the build machine or is a secret.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.release.adapter import render_adapter_release


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.adapter", "Assemble build/<trainer>/adapter/: the run's LoRA adapter as peft "
        "loads it (its config naming the base by Hub id), the same adapter as a GGUF LoRA for "
        "llama.cpp's --lora, a Hugging Face model card (README.md) and manifest.json.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--base", type=Path, required=True,
                        help="the base model's folder (trainers.<t>.base_model.path)")
    parser.add_argument("--out", type=Path, required=True,
                        help="published folder to write (build/<trainer>/adapter)")
    parser.add_argument("--lora-check", type=Path,
                        help="lora_check@<trainer>'s record, shown in the card (read only when "
                        "the trainer releases gguf too; dvc.yaml passes the adapter folder "
                        "otherwise)")

    def body(args) -> None:
        render_adapter_release(params=load_params(args.params), trainer_key=args.trainer,
                               base=args.base, out=args.out, lora_check=args.lora_check)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
