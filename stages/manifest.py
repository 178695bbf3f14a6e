"""Write a trainer's manifest: every file of every format it releases.

Reads:  ``build/<trainer>/<format>/manifest.json`` of each format in the
        trainer's ``release`` params (adapter@, merged@, merged_4bit@, card@<trainer>), each
        checked against its files.
Writes: ``--out`` = ``build/<trainer>/manifest.json``: the artifacts of all of
        them (each with its ``format``), ``formats`` in push order, and the
        published lineage, params and tool versions they share.  It is not
        published (each format's folder holds its own); it says in one file what
        one trainer's release is.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.release.manifest import combine_manifests

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.manifest", "Write build/<trainer>/manifest.json: every file of every format "
        "the trainer releases (adapter, merged, merged_4bit, gguf), from each format "
        "folder's manifest.json.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--build", type=Path, required=True, help="build/<trainer> folder")
    parser.add_argument("--out", type=Path, required=True, help="manifest JSON to write")

    def body(args) -> None:
        trainer = load_params(args.params).trainer(args.trainer)
        text = combine_manifests(build=args.build, formats=trainer.releases())
        atomic.write_text(args.out, text)
        log.info("wrote %s (%s)", args.out, ", ".join(trainer.releases()))

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
