"""Upload every output and the run-cache to the DVC remote (``make share``).

Reads:  dvc.lock and the DVC cache.
Writes: the remote (``shared`` in .dvc/config, or your ``--local`` override):
        ``dvc push --run-cache``.  Fails with one ``error:`` line when the
        remote is unreachable.  See :mod:`stages.sharing.upkeep`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.core.cli import run_stage, stage_parser
from stages.sharing.upkeep import share


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.share", "Upload the outputs dvc.lock records and the run-cache to the DVC "
        "remote (dvc push --run-cache), so no other machine builds them again.", params=False)
    parser.add_argument("targets", nargs="*",
                        help="stages or outputs to upload (default: all); the run-cache "
                             "is uploaded whole")
    return run_stage(parser, argv, lambda args: share(Path("."), tuple(args.targets)))


if __name__ == "__main__":
    sys.exit(main())
