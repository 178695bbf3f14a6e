"""What every stage's ``main`` shares: logging, --debug, one error line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from stages.errors import ReleaseError

log = logging.getLogger(__name__)


def add_common(parser: argparse.ArgumentParser) -> None:
    """Add --debug and --quiet to a stage's parser."""
    group = parser.add_argument_group("output")
    group.add_argument("--debug", action="store_true", help="debug logs and full tracebacks")
    group.add_argument("--quiet", action="store_true", help="warnings and errors only")


def run_main(args: argparse.Namespace, body: Callable[[], object]) -> int:
    """Set up logging, call ``body``, turn ReleaseError into ``error: ...``."""
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s"
                        if args.debug else "%(message)s", force=True)
    try:
        body()
    except ReleaseError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was recorded", file=sys.stderr)
        return 130
    return 0


def progress_enabled() -> bool:
    """tqdm bars only when a person watches stderr."""
    return sys.stderr.isatty()


def exit_now(code: int) -> None:
    """Flush what we printed and end the process without interpreter teardown.

    For stages that import torch and are timed end to end (the merge): torch's
    teardown at exit (module GC, static destructors of its libraries) costs
    ~0.9 s on this 2-core machine, as much as merging 1 GB. Call it only from
    ``if __name__ == "__main__"``, once every output is closed and renamed.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(code)
