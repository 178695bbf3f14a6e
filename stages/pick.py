"""Point a trainer's ``adapter`` in params.yaml at its newest complete run.

Trainers write runs as ``<output_root>/<timestamp>/final_model``.  A run is
complete when ``final_model/`` has ``adapter_config.json`` and adapter weights
(``adapter_model.safetensors``).  The newest is the one whose
``training_lineage.json`` says it finished last (else its newest weights file).

The edit touches one line of params.yaml, so comments and layout stay and the
change is easy to review (``git diff params.yaml``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import yaml

from stages.config.params import load_params, parse_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class PickResult:
    trainer: str
    adapter: Path
    changed: bool


def is_complete(run: Path) -> bool:
    """A run folder whose final_model holds an adapter config and weights."""
    final = run / "final_model"
    return (final / "adapter_config.json").is_file() and (final / WEIGHTS).is_file()


def finished_at(run: Path) -> str:
    """Sort key: the lineage's finish time, else the weights' mtime (ISO)."""
    from datetime import datetime

    lineage = run / "training_lineage.json"
    try:
        return str(json.loads(lineage.read_text())["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        mtime = (run / "final_model" / WEIGHTS).stat().st_mtime
        return datetime.fromtimestamp(mtime, UTC).isoformat(timespec="seconds")


def newest_run(output_root: Path) -> Path:
    """The newest complete run under ``output_root``."""
    if not output_root.is_dir():
        raise ReleaseError(f"output root {output_root} does not exist")
    runs = [p for p in output_root.iterdir() if p.is_dir() and is_complete(p)]
    if not runs:
        raise ReleaseError(f"no complete run under {output_root} (a run needs "
                           f"final_model/adapter_config.json and final_model/{WEIGHTS})")
    return max(runs, key=lambda p: (finished_at(p), p.name))


def set_adapter(text: str, trainer: str, adapter: str) -> str:
    """params.yaml text with ``trainers.<trainer>.adapter`` set to ``adapter``."""
    lines = text.splitlines(keepends=True)
    section = trainer_block = None
    for i, line in enumerate(lines):
        if re.match(r"^trainers:\s*(#.*)?$", line):
            section = i
        elif section is not None and re.match(rf"^  {re.escape(trainer)}:\s*(#.*)?$", line):
            trainer_block = i
        elif trainer_block is not None:
            if re.match(r"^\S", line) or re.match(r"^  \S", line):
                break
            m = re.match(r"^(    adapter:\s*)(\S+)(.*)$", line.rstrip("\n"))
            if m:
                lines[i] = f"{m.group(1)}{json.dumps(adapter)}{m.group(3)}\n"
                return "".join(lines)
    raise ReleaseError(f"could not find `trainers.{trainer}.adapter:` on its own line in "
                       "params.yaml; set it by hand")


def run(*, params_path: Path, trainer_key: str) -> PickResult:
    """Rewrite params.yaml so the trainer uses its newest complete run."""
    # not checked against pipeline.yaml: `make pick` rewrites that after this edit
    params = load_params(params_path, pipeline=False)
    trainer = params.trainer(trainer_key)
    if trainer.output_root is None:
        raise ReleaseError(f"`trainers.{trainer_key}.output_root` is not set; add the folder "
                           "where this trainer writes <timestamp>/final_model")
    adapter = newest_run(trainer.output_root) / "final_model"
    if adapter == trainer.adapter:
        log.info("trainers.%s.adapter already is %s", trainer_key, adapter)
        return PickResult(trainer=trainer_key, adapter=adapter, changed=False)
    text = set_adapter(params_path.read_text(), trainer_key, adapter.as_posix())
    if parse_params(yaml.safe_load(text)).trainer(trainer_key).adapter != adapter:
        raise ReleaseError("edited params.yaml does not read back as intended; set it by hand")
    atomic.write_text(params_path, text)
    log.info("trainers.%s.adapter: %s -> %s", trainer_key, trainer.adapter, adapter)
    return PickResult(trainer=trainer_key, adapter=adapter, changed=True)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.pick", "Set trainers.<TRAINER>.adapter in params.yaml to the newest complete run "
        "under trainers.<TRAINER>.output_root (an explicit, reviewable one-line edit).",)
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    return run_stage(parser, argv, lambda args: print(
        run(params_path=args.params, trainer_key=args.trainer).adapter))


if __name__ == "__main__":
    sys.exit(main())
