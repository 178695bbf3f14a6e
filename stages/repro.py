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

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.sharing.build import build_all, build_for_push
from stages.sharing.dvc import run_dvc


def push_stages(params_path: Path, trainer_key: str, fmt: str | None) -> list[str]:
    """``push@<trainer>-<format>`` of ``fmt``, or of every released format in push order."""
    trainer = load_params(params_path).trainer(trainer_key)
    return [f"push@{trainer.key}-{f}" for f in trainer.releases(fmt)]


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.repro", "dvc repro with the remote: pull what it has, build the rest. "
        "With --trainer, only what that trainer's push needs (on a machine whose dvc.lock "
        "describes the build: just the released folders), then the push.", params=False)
    parser.add_argument("targets", nargs="*",
                        help="stages to build, as for dvc repro (default: all), e.g. card@sft")
    parser.add_argument("--trainer",
                        help="build and push only this trainer (its push@<trainer>-<format>)")
    parser.add_argument("--format", dest="fmt",
                        help="with --trainer: only this format (default: every one it releases)")
    parser.add_argument("--force", action="store_true",
                        help="with --trainer: push again what DVC finds up to date (re-plans "
                        "against the target)")
    parser.add_argument("--status", action="store_true",
                        help="with --trainer: only say whether its build is out of date")

    def body(args) -> None:
        if args.trainer and args.targets:
            raise ReleaseError("pass stages or --trainer, not both")
        if (args.fmt or args.force or args.status) and not args.trainer:
            raise ReleaseError("--format, --force and --status go with --trainer")
        if args.trainer:
            stages = push_stages(Path("params.yaml"), args.trainer, args.fmt)
            if args.status:
                for stage in stages:
                    if run_dvc(Path("."), "status", "--quiet", "--with-deps", stage) != 0:
                        print(f"note: the build of {args.trainer} is out of date (dvc status "
                              f"--with-deps {stage}); the plan is for what is built now")
                return
            build_for_push(Path("."), stages, force=args.force)
        else:
            build_all(Path("."), tuple(args.targets))

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
