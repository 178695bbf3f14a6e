"""Validate params.yaml, and that a trainer exists (``make push`` runs it first).

Reads:  ``--params`` (params.yaml).
Writes: nothing; one ``ok`` line on stderr, or one ``error:`` line naming the key.
"""

from __future__ import annotations

import sys

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("stages.params", "Validate params.yaml; with --trainer, also check "
                          "that the trainer exists.")
    parser.add_argument("--trainer", help="trainer key that must exist")

    def body(args) -> None:
        params = load_params(args.params)
        if args.trainer:
            params.trainer(args.trainer)
        print(f"{args.params}: ok ({len(params.trainers)} trainers, "
              f"levels {' '.join(params.levels)})", file=sys.stderr)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
