"""Print what the pipeline produced, per trainer (the end of ``make demo``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.card import human_size
from stages.cli import add_common, run_main
from stages.params import load_params


def summarize(params_path: Path, build: Path) -> str:
    """One block per trainer: its published folder, files and push receipt."""
    params = load_params(params_path)
    out = []
    for key, trainer in params.trainers.items():
        manifest = build / key / "manifest.json"
        if not manifest.is_file():
            out.append(f"{key}: not built yet (dvc repro push@{key})")
            continue
        data = json.loads(manifest.read_text())
        out.append(f"{key}: {trainer.name}")
        for entry in data["artifacts"]:
            level = f" [{entry['level']}]" if entry.get("level") else ""
            out.append(f"  {build / key / entry['path']}  {human_size(entry['bytes'])}{level}")
        receipt = build / key / "push.json"
        if receipt.is_file():
            for fmt in json.loads(receipt.read_text())["formats"]:
                out.append(f"  pushed {fmt['format']} -> {fmt['target']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.summary",
                                     description="List each trainer's released files.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: %(default)s)")
    parser.add_argument("--build", type=Path, default=Path("build"), help="build folder")
    add_common(parser)
    args = parser.parse_args(argv)
    return run_main(args, lambda: print(summarize(args.params, args.build)))


if __name__ == "__main__":
    sys.exit(main())
