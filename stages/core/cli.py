"""The one skeleton every runnable module of ``stages`` shares.

A stage's ``main`` is three lines::

    parser = stage_parser("stages.quantize", "what it does")
    parser.add_argument(...)
    return run_stage(parser, argv, lambda args: run(...))

:func:`stage_parser` adds ``--params`` (when the stage reads params.yaml),
``--debug`` and ``--quiet``; :func:`run_stage` parses, sets up logging, calls
the body, and turns every :class:`ReleaseError` into one ``error: ...`` line
(a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from stages.core.errors import ReleaseError

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")


def stage_parser(module: str, description: str, *, epilog: str | None = None,
                 params: bool = True) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>``: ``--params`` (if asked), ``--debug``, ``--quiet``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     epilog=epilog)
    if params:
        parser.add_argument("--params", type=Path, default=PARAMS,
                            help="params file (default: %(default)s)")
    group = parser.add_argument_group("output")
    group.add_argument("--debug", action="store_true", help="debug logs and full tracebacks")
    group.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return parser


def run_stage(parser: argparse.ArgumentParser, argv: list[str] | None,
              body: Callable[[argparse.Namespace], object]) -> int:
    """Parse ``argv``, set up logging, run ``body(args)``; 0, or 1 after one ``error:`` line."""
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s"
                        if args.debug else "%(message)s", force=True)
    # One line per HTTP request is the HTTP client's debug output, not ours.
    logging.getLogger("httpx2").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        body(args)
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
