"""Publish a released folder to a local folder: the same plan -> apply -> receipt
shape as every publisher.

Idempotent: a file whose target copy already has the manifest's size and
sha256 is skipped; files the target has but the manifest no longer lists are
deleted.  The manifest is published last, so a target never looks complete
before it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from stages.config.params import FormatRelease
from stages.core import atomic
from stages.core.errors import InputError, ReleaseError
from stages.core.hashing import CHUNK, sha256_file
from stages.release.manifest import check_manifest

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


def folder_files(folder: Path) -> dict[str, dict]:
    """The files a released folder publishes, keyed by name, from its manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path} is missing; run `dvc repro` to build the release")
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
