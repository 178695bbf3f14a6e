"""Print what the pipeline produced, per trainer and format (the end of ``make demo``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stages.config.params import load_params
from stages.core.cli import run_stage, stage_parser
from stages.core.preflight import human_size


def summarize(params_path: Path, build: Path) -> str:
    """One block per trainer: per released format, its files and push receipt."""
    params = load_params(params_path)
    out = []
    for key, trainer in params.trainers.items():
        out.append(f"{key}: {trainer.name}")
        for fmt in trainer.releases():
            manifest = build / key / fmt / "manifest.json"
            if not manifest.is_file():
                out.append(f"  {fmt}: not built yet (dvc repro push@{key}-{fmt})")
                continue
            for entry in json.loads(manifest.read_text())["artifacts"]:
                level = f" [{entry['level']}]" if entry.get("level") else ""
                out.append(f"  {build / key / entry['path']}  {human_size(entry['bytes'])}{level}")
            receipt = build / key / f"push-{fmt}.json"
            if receipt.is_file():
                for done in json.loads(receipt.read_text())["formats"]:
                    out.append(f"  pushed {done['format']} -> {done['target']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.summary", "List each trainer's released files.")
    parser.add_argument("--build", type=Path, default=Path("build"), help="build folder")
    return run_stage(parser, argv, lambda args: print(summarize(args.params, args.build)))


if __name__ == "__main__":
    sys.exit(main())
