"""Write ``pipeline.yaml``: the stages each trainer needs, from params.yaml.

Reads:  ``--params`` (params.yaml).
Writes: ``pipeline.yaml`` beside it (atomically), which dvc.yaml's loops read;
        with ``--check``, nothing: exit 1 when it is not current.

Run it after adding a trainer or changing its release formats (``make
pipeline``; ``make demo``, ``make push`` and ``make pick`` do it for you).
See :mod:`stages.config.pipeline`.
"""

from __future__ import annotations

import sys

from stages.config.params import load_params
from stages.config.pipeline import PIPELINE_FILE, render
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ParamsError


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.pipeline", "Write pipeline.yaml (the stages each trainer's release formats "
        "need, which dvc.yaml loops over) from params.yaml.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; fail when pipeline.yaml is not current")

    def body(args) -> None:
        # not checked against the pipeline.yaml it writes
        params = load_params(args.params, pipeline=False)
        path = args.params.parent / PIPELINE_FILE
        text = render(params)
        if path.is_file() and path.read_text() == text:
            return
        if args.check:
            raise ParamsError(f"{path} is not current: run `make pipeline`")
        atomic.write_text(path, text)
        print(f"wrote {path}", file=sys.stderr)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
