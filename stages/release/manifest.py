"""The release manifest: every artifact with its size and hash (paths relative to
``build/<trainer>/``), the published lineage and params with the list of their
keys, and the tool versions.  One per released format (``build/<trainer>/<format>/
manifest.json``, published with it; ``format`` says which), and the trainer's
(``build/<trainer>/manifest.json``, :func:`combine_manifests`): every format's
artifacts, ``format`` null and ``formats`` listing them.

Rendered from ``templates/manifest.json.j2`` (every value through ``tojson``),
then parsed back and checked before it is written: every listed file must
exist under the trainer's build folder with the listed size and sha256.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from stages.core.errors import ReleaseError
from stages.core.hashing import sha256_file
from stages.llamacpp import tools as llamacpp
from stages.release.templates import render

log = logging.getLogger(__name__)

SCHEMA = "llm-release/manifest/v1"
# Python packages whose versions every manifest records.
PACKAGES: tuple[str, ...] = ("transformers", "peft", "torch", "dvc", "gguf", "huggingface-hub",
                             "safetensors", "trl")


@dataclass(frozen=True)
class Artifact:
    """One published file, with its path relative to ``build/<trainer>/``; a shard of a
    split GGUF also has its place, ``shard`` (1-based) of ``shards``."""

    path: str
    bytes: int
    sha256: str
    format: str
    kind: str
    level: str | None = None
    shard: int | None = None
    shards: int | None = None


def artifact(root: Path, path: Path, *, fmt: str, kind: str, level: str | None = None,
             sha256: str | None = None, shard: tuple[int, int] | None = None) -> Artifact:
    """Describe ``path`` (inside ``root``); hash it unless ``sha256`` is known.  ``shard``:
    (index, count) of a GGUF shard."""
    index, count = shard or (None, None)
    return Artifact(path=path.relative_to(root).as_posix(), bytes=path.stat().st_size,
                    sha256=sha256 or sha256_file(path), format=fmt, kind=kind, level=level,
                    shard=index, shards=count)


def tool_versions(llama_cpp_version: str) -> dict[str, str]:
    """Versions of llama.cpp and the Python packages that made the artifacts."""
    versions = {"llama.cpp": llamacpp.describe(llama_cpp_version)}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def render_manifest(*, trainer: str, name: str, fmt: str, artifacts: list[Artifact],
                    lineage: dict, params: dict, published_keys: dict[str, list[str]],
                    tools: dict[str, str]) -> str:
    """Render the manifest JSON text of one released format ``fmt`` from its template.
    ``lineage`` and ``params`` are
    what :mod:`stages.release.lineage` and :mod:`stages.release.privacy` publish of them,
    ``published_keys`` says which keys those are."""
    return render("manifest.json.j2", schema=SCHEMA, trainer=trainer, name=name, format=fmt,
                  formats=None, artifacts=[asdict(a) for a in artifacts], lineage=lineage,
                  params=params, published_keys=published_keys, tools=tools)


# What every format's manifest of one trainer must agree on (they come from one run; a
# difference means one folder is stale).  Each publishes its own params keys: the
# trainer's manifest holds all of them.
SHARED_KEYS: tuple[str, ...] = ("trainer", "name", "lineage")


def merge_trees(trees: list[dict]) -> dict:
    """The union of nested mappings (the params each format publishes, all from one
    params.yaml); a key two of them give different values fails."""
    merged: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_trees([merged[key], value])
            elif key in merged and merged[key] != value:
                raise ReleaseError(f"the formats' manifests publish different values of "
                                   f"`{key}`: one folder is stale; run `dvc repro`")
            else:
                merged[key] = value
    return merged


def combine_manifests(*, build: Path, formats: list[str]) -> str:
    """The trainer's manifest from the manifests of its released ``formats`` (each
    checked against its files): every artifact, in push order, and every params key one
    of them publishes.  Tool versions are the first format's (each format's own
    manifest keeps its own)."""
    parts = []
    for fmt in formats:
        path = build / fmt / "manifest.json"
        if not path.is_file():
            raise ReleaseError(f"{path} is missing; run `dvc repro` to build the {fmt} release")
        parts.append(check_manifest(path.read_text(), build))
    first = parts[0]
    for fmt, data in zip(formats[1:], parts[1:], strict=True):
        differ = [key for key in SHARED_KEYS if data[key] != first[key]]
        if differ:
            raise ReleaseError(f"{build / fmt / 'manifest.json'} and {formats[0]}'s differ in "
                               f"{', '.join(differ)}: one folder is stale; run `dvc repro`")
    artifacts = [{"shard": None, "shards": None, **a} for d in parts for a in d["artifacts"]]
    text = render("manifest.json.j2", schema=SCHEMA, trainer=first["trainer"],
                  name=first["name"], format=None, formats=formats, artifacts=artifacts,
                  lineage=first["lineage"], params=merge_trees([d["params"] for d in parts]),
                  published_keys={
                      "params": list(dict.fromkeys(k for d in parts
                                                   for k in d["published_keys"]["params"])),
                      "lineage": first["published_keys"]["lineage"]},
                  tools=first["tools"])
    check_manifest(text, build)
    return text


def check_manifest(text: str, root: Path) -> dict:
    """Parse rendered manifest text and verify it against the files in ``root``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"rendered manifest is not valid JSON: {exc}") from None
    for key in ("schema", "trainer", "format", "artifacts", "lineage", "params",
                "published_keys", "tools"):
        if key not in data:
            raise ReleaseError(f"rendered manifest lacks `{key}`; check templates/manifest.json.j2")
    for entry in data["artifacts"]:
        path = root / entry["path"]
        if not path.is_file():
            raise ReleaseError(f"manifest lists {entry['path']}, which is not in {root}")
        if path.stat().st_size != entry["bytes"]:
            raise ReleaseError(f"manifest says {entry['path']} has {entry['bytes']} bytes; "
                               f"the file has {path.stat().st_size}")
    return data


def verify_hashes(data: dict, root: Path) -> None:
    """Re-hash every listed file (slow for big files: tests and push use it)."""
    for entry in data["artifacts"]:
        actual = sha256_file(root / entry["path"])
        if actual != entry["sha256"]:
            raise ReleaseError(f"{entry['path']}: sha256 is {actual}, manifest says "
                               f"{entry['sha256']}; rebuild with `dvc repro`")
