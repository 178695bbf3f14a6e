"""Publish a released folder to a local folder (``target: {kind: local, path: ...}``).

Plan, apply, receipt, with the rules of :mod:`stages.release.publish`.  A target
file counts as current when its size matches and its sha256 (from the target's
previous manifest, else hashed now) matches the release.  Every file is copied
to a temp file, hashed on the way, and renamed into place; the manifest last.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from stages.config.params import FormatRelease
from stages.core import atomic
from stages.core.errors import ReleaseError
from stages.core.hashing import CHUNK, sha256_file
from stages.release.publish import (
    MANIFEST,
    FormatReceipt,
    PushPlan,
    Release,
    make_plan,
    published_names,
    read_release,
)

log = logging.getLogger(__name__)


def plan_local(release: Release, target: Path) -> PushPlan:
    """Compare the release with what the folder ``target`` already holds."""
    old = target / MANIFEST
    previous = published_names(old.read_bytes() if old.is_file() else None)
    present = {p.name for p in target.iterdir() if p.is_file()} if target.is_dir() else set()
    same = {}
    for name, entry in release.files.items():
        dest = target / name
        same[name] = dest.is_file() and dest.stat().st_size == entry["bytes"] and (
            previous.get(name) or sha256_file(dest)) == entry["sha256"]
    same[MANIFEST] = old.is_file() and old.read_bytes() == release.manifest
    return make_plan(release, same=same, present=present, previous=previous)


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


def push_local(folder: Path, release: FormatRelease, *, message: str,
               dry_run: bool = False) -> tuple[PushPlan, FormatReceipt | None]:
    """Mirror ``folder`` into the local target folder, changed files only."""
    target = release.target.path
    if target is None:
        raise ReleaseError(f"release.{release.format}.target has no path")
    built = read_release(folder)
    plan = plan_local(built, target)
    if dry_run:
        return plan, None
    target.mkdir(parents=True, exist_ok=True)
    sent = 0
    for name in plan.upload:
        if name == MANIFEST:
            continue
        with atomic.output_file(target / name) as tmp:
            copy_verified(folder / name, tmp, built.files[name]["sha256"])
        sent += built.size(name)
        log.info("published %s", target / name)
    for name in plan.delete:
        (target / name).unlink(missing_ok=True)
        log.info("deleted %s (an earlier release had it, this one does not)", target / name)
    if MANIFEST in plan.upload:
        atomic.write_bytes(target / MANIFEST, built.manifest)
        sent += len(built.manifest)
    log.debug("%s", message)
    return plan, FormatReceipt(format=release.format, kind="local", target=str(target),
                               uploaded=plan.upload, skipped=plan.skip, deleted=plan.delete,
                               bytes_uploaded=sent)
