"""Merge a LoRA adapter into its base model, streaming (the ``merge`` stage).

Reads:  ``--adapter`` (a peft adapter folder, with the tokenizer, chat template
        and generation config if the trainer saved them) and ``--base`` (16-bit;
        default: the adapter's ``base_model_name_or_path``).
Writes: ``--out``: ``model-0000i-of-0000n.safetensors`` + index, config.json,
        tokenizer, chat template, generation config.  Atomically.

The engine (flat memory, one thread per core) is :mod:`stages.weights.merge`.
"""

from __future__ import annotations

from pathlib import Path

from stages.core.cli import exit_now, run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.weights.merge import MAX_THREADS, default_threads, merge_adapter, run_unsloth

DESCRIPTION = (
    "Merge a LoRA adapter into its 16-bit base model, one tensor at a time: memory stays "
    "flat whatever the model size, every merged weight is W + scale·B@A computed in fp32 and "
    "rounded once, untouched tensors are copied byte for byte.")
EPILOG = (
    "The base is --base, else the adapter's base_model_name_or_path if it is a local folder or "
    "in the Hugging Face cache (Unsloth's `-bnb-4bit` names are mapped to the 16-bit model).")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("stages.merge", DESCRIPTION, epilog=EPILOG, params=False)
    parser.add_argument("--adapter", type=Path, required=True, help="peft adapter folder")
    parser.add_argument("--base", type=Path, help="16-bit base model folder (see below)")
    parser.add_argument("--out", type=Path, required=True, help="merged model folder to write")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="cap on each safetensors shard, e.g. 1GB, 500MB "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="merge threads; each reads, computes and writes its own tensors "
                        f"(default: the CPU cores available, at most {MAX_THREADS}: "
                        "%(default)s)")
    parser.add_argument("--backend", choices=("ours", "unsloth"), default="ours",
                        help="`unsloth` calls Unsloth's merge (needs unsloth and CUDA)")

    def body(args) -> object:
        if args.backend == "unsloth":
            return run_unsloth(base=args.base, adapter=args.adapter, out=args.out)
        if args.threads < 1:
            raise ReleaseError(f"--threads must be 1 or more, not {args.threads}")
        return merge_adapter(base=args.base, adapter=args.adapter, out=args.out,
                             max_shard_size=args.max_shard_size, threads=args.threads)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    exit_now(main())
