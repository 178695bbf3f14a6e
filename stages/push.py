"""Publish a trainer's released folders to their targets; write a receipt.

Reads:  ``build/<trainer>/<format>/`` for ``--format`` (dvc.yaml: one push stage
        per trainer and format, ``push@<trainer>-<format>``), or for each format
        the trainer releases, in push order (adapter, merged, merged_4bit, gguf), and that folder's
        ``manifest.json``.
Writes: the target (a local folder, or a Hugging Face Hub repo: one publisher
        per target kind in ``stages/release/``) and ``--receipt``
        (``build/<trainer>/push-<format>.json``): per format what was uploaded,
        skipped and deleted, the bytes sent, the commit; and this repo's git commit.

``--preflight`` only checks that every target can be written (params, token,
Hub permissions), in seconds, before ``make push`` builds anything;
``--dry-run`` prints the plan and writes nothing.  The Hub publisher needs
``HF_HUB_OFFLINE`` unset, which dvc.yaml and the Makefile do for this stage only.
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

from stages.config.params import FormatRelease, Trainer, load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.release.hub_client import find_token, preflight
from stages.release.publish import FormatReceipt, PushPlan, describe_plan, read_release
from stages.release.publish_hub import commit_message, push_hub
from stages.release.publish_local import push_local

log = logging.getLogger(__name__)

Publisher = Callable[..., tuple[PushPlan, FormatReceipt | None]]
# One publisher per target kind (stages/release/publish_<kind>.py).
PUBLISHERS: dict[str, Publisher] = {"local": push_local, "hub": push_hub}


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


def target_text(release: FormatRelease) -> str:
    target = release.target
    where = target.path if target.kind == "local" else target.repo_id
    return f"{release.format} -> {target.kind} {where}"


def check_targets(trainer: Trainer, fmt: str | None = None) -> list[str]:
    """Preflight of the targets of ``trainer`` (``fmt``'s, or all); one line per target
    that is ready."""
    lines = []
    for release in (trainer.release[f] for f in trainer.releases(fmt)):
        if release.target.kind == "hub":
            who = preflight(release.target, token=find_token())
            lines.append(f"{target_text(release)}: ok (token of {who.user}, {who.role})")
        else:
            lines.append(f"{target_text(release)}: ok")
    return lines


def run(*, trainer_key: str, params_path: Path, build: Path, receipt: Path | None,
        fmt: str | None = None, repo: Path = Path("."), dry_run: bool = False) -> PushResult:
    """Publish ``fmt`` (default: every released format, in push order) of one trainer,
    then write the receipt."""
    params = load_params(params_path)
    trainer = params.trainer(trainer_key)
    commit = git_commit(repo)
    receipts = []
    for name in trainer.releases(fmt):
        release = trainer.release[name]
        folder = build / name
        message = commit_message(trainer.name, read_release(folder), commit)
        plan, done = PUBLISHERS[release.target.kind](folder, release, message=message,
                                                     dry_run=dry_run)
        if dry_run:
            print(describe_plan(plan, target_text(release)))
        if done is not None:
            receipts.append(done)
            log.info("%s: %d uploaded (%d bytes), %d unchanged, %d deleted",
                     target_text(release), len(done.uploaded), done.bytes_uploaded,
                     len(done.skipped), len(done.deleted))
    result = PushResult(trainer=trainer.key, git_commit=commit, formats=tuple(receipts))
    if receipt is not None and not dry_run:
        body = asdict(result) | {"pushed_at": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic.write_text(receipt, json.dumps(body, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.push", "Publish build/<trainer>/<format>/ to each format's target from params "
        "(changed files only; the Hub in one commit) and write a receipt with this repo's git "
        "commit.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--format", dest="fmt",
                        help="the released format to push (default: every one the trainer "
                        "releases, in the order adapter, merged, merged_4bit, gguf)")
    parser.add_argument("--build", type=Path, help="build/<trainer> folder")
    parser.add_argument("--receipt", type=Path, help="receipt JSON to write")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--preflight", action="store_true",
                      help="only check that every target can be written (token, permissions)")
    mode.add_argument("--dry-run", action="store_true",
                      help="print what would be uploaded, skipped and deleted; change nothing")

    def body(args) -> None:
        if args.preflight:
            for line in check_targets(load_params(args.params).trainer(args.trainer), args.fmt):
                print(line, file=sys.stderr)
            return
        if args.build is None or (args.receipt is None and not args.dry_run):
            raise ReleaseError("pass --build (and --receipt unless --dry-run)")
        run(trainer_key=args.trainer, params_path=args.params, build=args.build,
            receipt=args.receipt, fmt=args.fmt, dry_run=args.dry_run)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
