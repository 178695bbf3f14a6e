"""Build the pinned llama.cpp tools once into the user cache (``make tools``).

Reads:  ``llama_cpp.version`` in params.yaml (or ``--version``).
Writes: ``${XDG_CACHE_HOME:-~/.cache}/llm-release/llama.cpp-<version>/`` (see
        :mod:`stages.llamacpp.tools`), and prints that folder.
"""

from __future__ import annotations

import sys

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.llamacpp.tools import build, cache_root


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.tools", "Build the pinned llama.cpp tools once into the user cache "
        f"({cache_root()}/llama.cpp-<version>) and print that folder; reused by every clone.")
    parser.add_argument("--version",
                        help="llama-cpp-python version (default: llama_cpp.version in --params)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel build jobs (default: all cores)")

    def body(args) -> None:
        version = args.version or load_params(args.params, pipeline=False).llama_cpp_version
        print(build(version, jobs=args.jobs))

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
