"""Publish a trainer's released folders to their targets; write a receipt.

Reads:  ``build/<trainer>/<format>/`` for each format in the trainer's
        ``release`` params, and that folder's ``manifest.json``.
Writes: the target (for now a local folder; the Hub target plugs into
        ``PUBLISHERS``) and ``--receipt`` (``build/<trainer>/push.json``):
        what was uploaded, skipped and deleted, and this repo's git commit.

Idempotent: a file whose target copy already has the manifest's size and
sha256 is skipped; files the target has but the manifest no longer lists
are deleted.  The manifest is published last, so a target never looks
complete before it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from stages import atomic
from stages.cli import add_common, run_main
from stages.errors import ReleaseError
from stages.hashing import CHUNK, sha256_file
from stages.manifest import check_manifest
from stages.params import FormatRelease, load_params

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PushPlan:
    """What one format's push does: files to upload, skip and delete."""

    upload: tuple[str, ...]
    skip: tuple[str, ...]
    delete: tuple[str, ...]


@dataclass(frozen=True)
class FormatReceipt:
    format: str
    target: str
    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]
    deleted: tuple[str, ...]


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


def folder_files(folder: Path) -> dict[str, dict]:
    """The files a released folder publishes, keyed by name, from its manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ReleaseError(f"{manifest_path} is missing; run `dvc repro` to build the release")
    data = check_manifest(manifest_path.read_text(), folder.parent)
    prefix = f"{folder.name}/"
    files = {e["path"][len(prefix):]: e for e in data["artifacts"] if e["path"].startswith(prefix)}
    if not files:
        raise ReleaseError(f"{manifest_path} lists no file of {folder}")
    return files


def _published_hashes(target: Path) -> dict[str, str]:
    """name -> sha256 from the manifest a previous push left in ``target``."""
    path = target / MANIFEST
    try:
        data = json.loads(path.read_text())
        return {e["path"].split("/", 1)[-1]: e["sha256"] for e in data["artifacts"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def plan_local(files: dict[str, dict], target: Path) -> PushPlan:
    """Compare the release with what a local target folder already holds.

    A target file counts as current when its size matches and its sha256 (from
    the target's previous manifest, else hashed now) matches the release.
    """
    upload, skip = [], []
    published = _published_hashes(target)
    for name, entry in sorted(files.items()):
        dest = target / name
        same = dest.is_file() and dest.stat().st_size == entry["bytes"] and (
            published.get(name) or sha256_file(dest)) == entry["sha256"]
        (skip if same else upload).append(name)
    known = set(files) | {MANIFEST}
    delete = sorted(p.name for p in target.iterdir() if p.is_file() and p.name not in known) \
        if target.is_dir() else []
    return PushPlan(upload=tuple(upload), skip=tuple(skip), delete=tuple(delete))


def copy_verified(src: Path, dst: Path, sha256: str) -> None:
    """Copy ``src`` to ``dst``, hashing on the way; fail if the hash differs."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(CHUNK):
            digest.update(block)
            fout.write(block)
    if digest.hexdigest() != sha256:
        raise ReleaseError(f"{src}: sha256 is {digest.hexdigest()}, the manifest says {sha256}; "
                           "the build folder changed after it was made, run `dvc repro`")


def push_local(folder: Path, release: FormatRelease) -> FormatReceipt:
    """Mirror ``folder`` into the local target folder, changed files only."""
    target = release.target.path
    assert target is not None  # validated by Target
    files = folder_files(folder)
    plan = plan_local(files, target)
    target.mkdir(parents=True, exist_ok=True)
    for name in plan.upload:
        with atomic.output_file(target / name) as tmp:
            copy_verified(folder / name, tmp, files[name]["sha256"])
        log.info("published %s", target / name)
    for name in plan.delete:
        (target / name).unlink()
        log.info("deleted stale %s", target / name)
    atomic.write_bytes(target / MANIFEST, (folder / MANIFEST).read_bytes())
    return FormatReceipt(format=release.format, target=str(target), uploaded=plan.upload,
                         skipped=plan.skip, deleted=plan.delete)


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
    body = asdict(result) | {"pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic.write_text(receipt, json.dumps(body, indent=2) + "\n")
    for r in receipts:
        log.info("%s -> %s: %d uploaded, %d unchanged, %d deleted", r.format, r.target,
                 len(r.uploaded), len(r.skipped), len(r.deleted))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.push",
        description="Publish build/<trainer>/<format>/ to each format's target from params "
        "(changed files only) and write a receipt with this repo's git commit.",
    )
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--build", type=Path, required=True, help="build/<trainer> folder")
    parser.add_argument("--receipt", type=Path, required=True, help="receipt JSON to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: %(default)s)")
    add_common(parser)
    args = parser.parse_args(argv)
    return run_main(args, lambda: run(trainer_key=args.trainer, params_path=args.params,
                                      build=args.build, receipt=args.receipt))


if __name__ == "__main__":
    sys.exit(main())
