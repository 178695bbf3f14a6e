"""Run the pipeline, pulling from the DVC remote whatever it already has (``make demo``,
``make push``).

Reads:  dvc.yaml, dvc.lock, the remote (``shared`` in .dvc/config, or your
        ``--local`` override).
Writes: what ``dvc repro`` writes; outputs come from the remote where it has
        them (by dvc.lock's hashes or from the run-cache) and are built here
        otherwise.  An empty or unreachable remote is said in one line, and the
        pipeline is built here.  See :mod:`stages.sharing.build`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.sharing.build import build_all, build_for_push


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.repro", "dvc repro with the remote: pull what it has, build the rest. "
        "With --trainer, only what that trainer's push needs (on a machine whose dvc.lock "
        "describes the build: just the released folders), then the push.", params=False)
    parser.add_argument("targets", nargs="*",
                        help="stages to build, as for dvc repro (default: all), e.g. card@sft")
    parser.add_argument("--trainer", help="build and push only this trainer (push@<trainer>)")

    def body(args) -> None:
        if args.trainer and args.targets:
            raise ReleaseError("pass stages or --trainer, not both")
        if args.trainer:
            build_for_push(Path("."), args.trainer)
        else:
            build_all(Path("."), tuple(args.targets))

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
