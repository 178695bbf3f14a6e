"""Drop cache objects that the current dvc.lock does not use (``make gc``).

Reads:  dvc.lock (the current release of every trainer, intermediates included).
Writes: removes every other object from the DVC cache (``dvc gc --workspace``)
        and, with ``--cloud``, from the remote too; that is irreversible, so it is
        refused unless dvc.lock describes every stage.  See
        :mod:`stages.sharing.upkeep`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.core.cli import run_stage, stage_parser
from stages.sharing.upkeep import collect_garbage


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.gc", "Keep only what dvc.lock uses (the current release of every trainer) "
        "in the DVC cache, and with --cloud on the remote too (dvc gc --workspace).",
        params=False)
    parser.add_argument("--cloud", action="store_true",
                        help="also delete those objects from the remote (irreversible)")
    return run_stage(parser, argv, lambda args: collect_garbage(Path("."), cloud=args.cloud))


if __name__ == "__main__":
    sys.exit(main())
