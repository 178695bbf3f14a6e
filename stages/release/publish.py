"""What every publisher shares: the release's file list, the plan, the receipt.

A publisher (one module per target kind: ``publish_local``, ``publish_hub``)
plans against what the target holds, applies the plan, and returns a
:class:`FormatReceipt`.  The rules are the same for every kind:

- a file is uploaded when the target lacks it or holds other bytes (compared
  by sha256), skipped when it holds the same;
- a file is deleted only when an earlier release of ours published it (it is
  listed in the target's previous ``manifest.json``) and this release no longer
  has it; anything else in the target (``.gitattributes``, files a person
  added) is never touched;
- ``manifest.json`` goes with the files (last for a folder, in the same commit
  for the Hub), so a target never looks complete before it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import InputError, ReleaseError
from stages.core.preflight import human_size
from stages.release.manifest import check_manifest

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PlannedFile:
    """One file of the release and what the push does with it."""

    name: str
    bytes: int
    action: str  # "upload", "skip" or "delete"


@dataclass(frozen=True)
class PushPlan:
    """What one format's push does: files to upload, skip and delete."""

    files: tuple[PlannedFile, ...]

    def names(self, action: str) -> tuple[str, ...]:
        return tuple(f.name for f in self.files if f.action == action)

    @property
    def upload(self) -> tuple[str, ...]:
        return self.names("upload")

    @property
    def skip(self) -> tuple[str, ...]:
        return self.names("skip")

    @property
    def delete(self) -> tuple[str, ...]:
        return self.names("delete")

    @property
    def bytes_to_send(self) -> int:
        """Bytes of the files to upload (at most what goes over the wire)."""
        return sum(f.bytes for f in self.files if f.action == "upload")


@dataclass(frozen=True)
class FormatReceipt:
    """What one format's push did."""

    format: str
    kind: str
    target: str  # a folder, or a Hub repo id
    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]
    deleted: tuple[str, ...]
    bytes_uploaded: int  # bytes the target did not have and received
    revision: str | None = None
    commit: str | None = None
    url: str | None = None
    tag: str | None = None


@dataclass(frozen=True)
class Release:
    """A built format folder: its files (name -> manifest entry) and manifest bytes."""

    folder: Path
    files: dict[str, dict]
    manifest: bytes

    def size(self, name: str) -> int:
        return len(self.manifest) if name == MANIFEST else int(self.files[name]["bytes"])


def read_release(folder: Path) -> Release:
    """The files a released folder publishes, keyed by name, from its checked manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path} is missing; run `dvc repro` to build the release")
    text = manifest_path.read_text()
    data = check_manifest(text, folder.parent)
    prefix = f"{folder.name}/"
    files = {e["path"][len(prefix):]: e for e in data["artifacts"] if e["path"].startswith(prefix)}
    if not files:
        raise ReleaseError(f"{manifest_path} lists no file of {folder}")
    return Release(folder=folder, files=files, manifest=text.encode())


def published_names(manifest: bytes | None) -> dict[str, str]:
    """name -> sha256 of what an earlier release of ours published (its manifest.json)."""
    if not manifest:
        return {}
    try:
        data = json.loads(manifest)
        return {e["path"].split("/", 1)[-1]: e["sha256"] for e in data["artifacts"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def make_plan(release: Release, *, same: dict[str, bool], present: set[str],
              previous: dict[str, str]) -> PushPlan:
    """The plan from what the target holds: ``same[name]`` for release files it has with
    the same bytes (manifest.json included), ``present`` every file name it has,
    ``previous`` what our earlier release published there."""
    files = [PlannedFile(name, release.size(name), "skip" if same.get(name) else "upload")
             for name in [*sorted(release.files), MANIFEST]]
    gone = sorted((set(previous) & present) - set(release.files) - {MANIFEST})
    files += [PlannedFile(name, 0, "delete") for name in gone]
    return PushPlan(files=tuple(files))


def describe_plan(plan: PushPlan, target: str) -> str:
    """The plan as a person reads it (``make push DRY_RUN=1``)."""
    lines = [f"{target}:"]
    lines += [f"  {f.action:<6} {f.name}" + (f"  {human_size(f.bytes)}" if f.bytes else "")
              for f in plan.files]
    lines.append(f"  {len(plan.upload)} to upload ({human_size(plan.bytes_to_send)}), "
                 f"{len(plan.skip)} unchanged, {len(plan.delete)} to delete")
    return "\n".join(lines)
