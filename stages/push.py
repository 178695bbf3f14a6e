"""Publish a trainer's released folders to their targets; write a receipt.

Reads:  ``build/<trainer>/<format>/`` for each format in the trainer's
        ``release`` params, and that folder's ``manifest.json``.
Writes: the target (one publisher per target kind in ``stages/release/``) and
        ``--receipt`` (``build/<trainer>/push.json``): what was uploaded,
        skipped and deleted, and this repo's git commit.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from stages.config.params import FormatRelease, load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.release.publish_local import FormatReceipt, push_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    trainer: str
    git_commit: str
    formats: tuple[FormatReceipt, ...] = field(default_factory=tuple)


def git_commit(repo: Path) -> str:
    """HEAD of this repo, with ``-dirty`` when tracked files changed."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        if res.returncode != 0:
            raise ReleaseError(f"git {' '.join(args)} failed in {repo}: {res.stderr.strip()}; "
                               "push records the commit, so run it inside the git checkout")
        return res.stdout.strip()

    head = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head}-dirty" if dirty else head


# One publisher per target kind; the Hub plugs in here.
PUBLISHERS: dict[str, Callable[[Path, FormatRelease], FormatReceipt]] = {"local": push_local}


def run(*, trainer_key: str, params_path: Path, build: Path, receipt: Path,
        repo: Path = Path(".")) -> PushResult:
    """Publish every released format of one trainer, then write the receipt."""
    params = load_params(params_path)
    trainer = params.trainer(trainer_key)
    commit = git_commit(repo)
    receipts = []
    for fmt, release in trainer.release.items():
        folder = build / fmt
        publisher = PUBLISHERS.get(release.target.kind)
        if publisher is None:
            raise ReleaseError(f"target kind {release.target.kind!r} of trainers.{trainer.key}."
                               f"release.{fmt} is not supported yet; use kind: local")
        receipts.append(publisher(folder, release))
    result = PushResult(trainer=trainer.key, git_commit=commit, formats=tuple(receipts))
    body = asdict(result) | {"pushed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic.write_text(receipt, json.dumps(body, indent=2) + "\n")
    for r in receipts:
        log.info("%s -> %s: %d uploaded, %d unchanged, %d deleted", r.format, r.target,
                 len(r.uploaded), len(r.skipped), len(r.deleted))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.push", "Publish build/<trainer>/<format>/ to each format's target from params "
        "(changed files only) and write a receipt with this repo's git commit.",)
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--build", type=Path, required=True, help="build/<trainer> folder")
    parser.add_argument("--receipt", type=Path, required=True, help="receipt JSON to write")
    return run_stage(parser, argv, lambda args: run(
        trainer_key=args.trainer, params_path=args.params, build=args.build,
        receipt=args.receipt))


if __name__ == "__main__":
    sys.exit(main())
