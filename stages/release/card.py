"""The published GGUF folder of a trainer: files, model card, Modelfile, manifest.

``<name>-<LEVEL>.gguf`` (hard links to the quantize outputs, so no copy; a level
over ``split_max_size`` is published as llama-gguf-split's shards
``<name>-<LEVEL>-00001-of-0000N.gguf``, except Ollama's level, which stays whole),
``README.md`` (Hugging Face model card with YAML front matter the Hub accepts and
a quality table), ``quality.png``, ``Modelfile`` (Ollama) and ``manifest.json``.
Rendered text is parsed back and checked before anything is written; the folder
appears whole or not at all, and only once nothing in it identifies the build
machine or is a secret (:mod:`stages.release.privacy`).
"""


from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from stages.config.hub import HUB_FILE_LIMIT
from stages.config.params import FormatRelease, Params, Trainer
from stages.core import atomic
from stages.core.errors import ReleaseError
from stages.core.preflight import human_size
from stages.llamacpp.gguf_meta import read_chat_info
from stages.llamacpp.split import plan_split, split_gguf
from stages.release.hub_meta import check_front_matter, front_matter, other_formats
from stages.release.lineage import (
    LINEAGE_FILE,
    Lineage,
    card_context,
    load_lineage,
    publish_lineage,
)
from stages.release.manifest import (
    Artifact,
    artifact,
    check_manifest,
    render_manifest,
    tool_versions,
)
from stages.release.privacy import (
    PublishedParams,
    check_release,
    leaves,
    public_path,
    publish_params,
    this_machine,
)
from stages.release.quality import (
    Quality,
    load_quality,
    one_line,
    plot_points,
    render_plot,
    table_cell,
)
from stages.release.templates import environment, render

log = logging.getLogger(__name__)

FORMAT = "gguf"
PLOT = "quality.png"


@dataclass(frozen=True)
class CardResult:
    out: Path
    manifest: Path  # out/manifest.json
    artifacts: tuple[Artifact, ...]


def load_records(quant_dir: Path, levels: list[str]) -> list[dict]:
    """The quantize records of ``levels``, in params order."""
    records = []
    for level in levels:
        path = quant_dir / f"{level}.json"
        if not path.is_file():
            raise ReleaseError(f"no quantize record {path}; run `dvc repro` for level {level}")
        record = json.loads(path.read_text())
        gguf = quant_dir / record["file"]
        if not gguf.is_file() or gguf.stat().st_size != record["bytes"]:
            raise ReleaseError(f"{gguf} is missing or differs from its record {path}; "
                               "rerun its quantize stage")
        records.append(record)
    return records


def ollama_level(release: FormatRelease, records: list[dict]) -> str:
    """The level the Modelfile uses: ``ollama_level``, else the first level."""
    return release.ollama_level or records[0]["level"]


def check_hub_limit(trainer: Trainer, records: list[dict]) -> None:
    """For a Hub target: Ollama's level, which is never split, must fit in one Hub file."""
    release = trainer.release[FORMAT]
    level = ollama_level(release, records)
    size = next(r["bytes"] for r in records if r["level"] == level)
    if release.target.kind != "hub" or size <= HUB_FILE_LIMIT:
        return
    key = f"trainers.{trainer.key}.release.{FORMAT}"
    fits = [f"{r['level']} ({human_size(r['bytes'])})" for r in records
            if r["bytes"] <= HUB_FILE_LIMIT]
    raise ReleaseError(
        f"the {level} GGUF is {human_size(size)}, over the Hub's 50 GB file limit, and it is "
        f"`{key}.ollama_level`: Ollama cannot import a split GGUF, so `{key}.split_max_size` "
        f"does not split it; set `{key}.ollama_level` to a level under 50 GB"
        + (f" ({', '.join(fits)})" if fits else " (add a smaller one to quantize.levels)")
        + ", or publish to a local target")


def place_ggufs(*, tmp: Path, trainer: Trainer, records: list[dict], quant_dir: Path,
                llama_cpp_version: str) -> tuple[list[dict], list[Artifact]]:
    """Each level's GGUF in ``tmp``: a hard link, or the shards llama-gguf-split writes
    there; the card's file rows and the artifacts, in level order."""
    release = trainer.release[FORMAT]
    keep = ollama_level(release, records)
    files, arts = [], []
    for rec in records:
        plan = plan_split(source=quant_dir / rec["file"], prefix=f"{trainer.name}-{rec['level']}",
                          max_bytes=release.split_max_bytes, keep_whole=rec["level"] == keep)
        if plan.split:
            paths = split_gguf(plan, out_dir=tmp, max_bytes=release.split_max_bytes,
                               llama_cpp_version=llama_cpp_version)
        else:
            paths = [tmp / plan.files[0]]
            link_or_copy(plan.source, paths[0])
        for index, path in enumerate(paths, 1):
            art = artifact(tmp.parent, path, fmt=FORMAT, kind="gguf", level=rec["level"],
                           shard=(index, len(paths)) if plan.split else None)
            arts.append(art)
            files.append({"file": path.name, "level": rec["level"], "size": human_size(art.bytes),
                          "sha256": art.sha256, "shard": art.shard, "shards": art.shards})
    for art in arts:
        if release.target.kind == "hub" and art.bytes > HUB_FILE_LIMIT:
            raise ReleaseError(f"{art.path} is {human_size(art.bytes)}, over the Hub's 50 GB file "
                               "limit: it holds a tensor that large, which llama-gguf-split "
                               "cannot divide; publish this trainer to a local target")
    return files, arts


def card_filters() -> None:
    """Add the filters the card templates use to the template environment."""
    environment().filters.update(cell=table_cell, one_line=one_line, public_path=public_path)


def render_front_matter(data: dict) -> str:
    """yaml.safe_dump the front matter and check it reads back the same."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != data:
        raise ReleaseError("model card front matter does not round-trip through YAML")
    return text


def check_card(text: str, expected: dict) -> None:
    """The rendered card starts with front matter equal to ``expected``."""
    if not text.startswith("---\n"):
        raise ReleaseError("rendered model card does not start with YAML front matter")
    head, sep, _body = text[4:].partition("\n---\n")
    if not sep or yaml.safe_load(head) != expected:
        raise ReleaseError("rendered model card front matter does not parse back as written; "
                           "check templates/README.md.j2")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk) or, across file systems, copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def split_notes(files: list[dict]) -> list[dict]:
    """One note per split level: its shard count and first shard."""
    return [{"level": f["level"], "shards": f["shards"], "first": f["file"]}
            for f in files if f["shard"] == 1]


def modelfile_license(trainer: Trainer) -> str:
    """The Modelfile's LICENSE: the Hub id, or a license's name and link."""
    if trainer.license == "other":
        return f"{trainer.license_name} ({trainer.license_link})"
    return trainer.license


def write_release(*, tmp: Path, trainer: Trainer, params: Params, records: list[dict],
                  quant_dir: Path, lineage: Lineage, params_keys: tuple[str, ...],
                  quality: Quality) -> list[Artifact]:
    """Fill ``tmp`` with the GGUFs, README.md, quality.png and Modelfile; return artifacts."""
    card_filters()
    atomic.write_bytes(tmp / PLOT, render_plot(quality, f"{trainer.name}: size vs fidelity"))
    files, arts = place_ggufs(tmp=tmp, trainer=trainer, records=records, quant_dir=quant_dir,
                              llama_cpp_version=params.llama_cpp_version)
    release = trainer.release[FORMAT]
    level = ollama_level(release, records)
    default_file = f"{trainer.name}-{level}.gguf"
    chat = read_chat_info(tmp / default_file)
    ollama_name = trainer.name.lower()
    modelfile = render("Modelfile.j2",
        name=trainer.name, level=level, gguf_file=default_file, ollama_name=ollama_name,
        stops=chat.stop_strings, license=modelfile_license(trainer))
    atomic.write_text(tmp / "Modelfile", modelfile)
    files.append({"file": "Modelfile", "level": None,
                  "size": human_size(len(modelfile.encode())),
                  "sha256": hashlib.sha256(modelfile.encode()).hexdigest(),
                  "shard": None, "shards": None})
    matter = front_matter(trainer, lineage.fields, FORMAT)
    check_front_matter(matter, trainer_key=trainer.key)
    card = render("README.md.j2",
        front_matter=render_front_matter(matter), name=trainer.name,
        base_model=trainer.base_model.id, **card_context(lineage), params_keys=params_keys,
        files=files, splits=split_notes(files), split_max_size=release.split_max_size,
        fallbacks=[fb | {"level": r["level"]} for r in records for fb in r["fallbacks"]],
        default_file=default_file, ollama_name=ollama_name, quality=quality, plot=PLOT,
        overrides={"chat_template": trainer.chat_template, "eos_token": trainer.eos_token},
        others=other_formats(trainer, FORMAT),
        tools=tool_versions(params.llama_cpp_version))
    check_card(card, matter)
    atomic.write_text(tmp / "README.md", card)
    arts.append(artifact(tmp.parent, tmp / "Modelfile", fmt=FORMAT, kind="modelfile"))
    arts.append(artifact(tmp.parent, tmp / "README.md", fmt=FORMAT, kind="card"))
    arts.append(artifact(tmp.parent, tmp / PLOT, fmt=FORMAT, kind="plot"))
    return arts


def render_release(*, params: Params, trainer_key: str, quant_dir: Path, eval_dir: Path,
                   out: Path, plot_data: Path) -> CardResult:
    """Build ``out`` (the published GGUF folder, ``build/<trainer>/gguf``) and
    ``plot_data``."""
    trainer = params.trainer(trainer_key)
    if FORMAT not in trainer.release:
        raise ReleaseError(f"trainer {trainer.key} does not release {FORMAT}; nothing to render")
    records = load_records(quant_dir, list(params.levels))
    check_hub_limit(trainer, records)
    source = trainer.run_dir / LINEAGE_FILE
    lineage = publish_lineage(load_lineage(source), source=source)
    published = publish_params(params, trainer.key, FORMAT)
    quality = load_quality(eval_dir, records, trainer.key)
    root = out.parent
    with atomic.output_dir(out) as tmp:
        arts = write_release(tmp=tmp, trainer=trainer, params=params, records=records,
                             quant_dir=quant_dir, lineage=lineage, params_keys=published.keys,
                             quality=quality)
        _, arts = seal_release(tmp=tmp, out=out, root=root, fmt=FORMAT, trainer=trainer,
                               params=params, arts=arts, lineage=lineage, published=published)
    atomic.write_text(plot_data, json.dumps(plot_points(quality), indent=2) + "\n")
    log.info("wrote %s (%d files)", out, len(arts))
    return CardResult(out=out, manifest=out / "manifest.json", artifacts=tuple(arts))


def finish_format(*, tmp: Path, out: Path, fmt: str, trainer: Trainer, params: Params,
                  arts: list[Artifact], lineage: Lineage, published: PublishedParams,
                  template: str, **context: object) -> list[Artifact]:
    """Write the card of format ``fmt`` (``templates/<template>``) into the staged folder
    ``tmp`` and seal it (:func:`seal_release`); the artifacts with their paths under ``out``.

    The card gets what every format's card shows (front matter, name, base, lineage,
    published params keys, tools, the file table of ``arts``, the Hub repo, the other
    formats) and ``context``, the format's own values."""
    matter = front_matter(trainer, lineage.fields, fmt)
    check_front_matter(matter, trainer_key=trainer.key)
    target = trainer.release[fmt].target
    card_filters()
    card = render(
        template, front_matter=render_front_matter(matter), name=trainer.name,
        base_model=trainer.base_model.id, **card_context(lineage),
        params_keys=published.keys, tools=tool_versions(params.llama_cpp_version),
        files=[{"file": a.path.split("/", 1)[1], "kind": a.kind,
                "size": human_size(a.bytes), "sha256": a.sha256} for a in arts],
        repo=target.repo_id if target.kind == "hub" else None,
        others=other_formats(trainer, fmt), **context)
    check_card(card, matter)
    atomic.write_text(tmp / "README.md", card)
    arts = [*arts, artifact(tmp.parent, tmp / "README.md", fmt=fmt, kind="card")]
    _, arts = seal_release(tmp=tmp, out=out, root=out.parent, fmt=fmt, trainer=trainer,
                           params=params, arts=arts, lineage=lineage, published=published)
    return arts


def seal_release(*, tmp: Path, out: Path, root: Path, fmt: str, trainer: Trainer,
                 params: Params, arts: list[Artifact], lineage: Lineage,
                 published: PublishedParams) -> tuple[str, list[Artifact]]:
    """Finish the staged folder ``tmp`` of format ``fmt`` that becomes ``out`` (in
    ``root`` = ``build/<trainer>/``): write its manifest.json, check it against the
    files, and scan everything for this machine and secrets.  The manifest text, and
    the artifacts with their paths under ``out``."""
    if out.parent.resolve() != root.resolve():
        raise ReleaseError(f"{out} must sit in the trainer's build folder {root}")
    arts = [replace(a, path=f"{out.name}/{a.path.split('/', 1)[1]}") for a in arts]
    text = render_manifest(trainer=trainer.key, name=trainer.name, fmt=fmt, artifacts=arts,
                           lineage=lineage.published, params=published.data,
                           published_keys={"params": list(published.keys),
                                           "lineage": list(lineage.shown)},
                           tools=tool_versions(params.llama_cpp_version))
    staged = {**json.loads(text)}
    staged["artifacts"] = [{**a, "path": a["path"].replace(out.name, tmp.name, 1)}
                           for a in staged["artifacts"]]
    check_manifest(json.dumps(staged), root)
    atomic.write_text(tmp / "manifest.json", text)
    # A name the trainer's params publish on purpose (a Hub namespace that is also the
    # user's login) is not the machine giving itself away.
    allowed = [value for _, value in leaves(published.data) if isinstance(value, str)]
    check_release(tmp, this_machine(allowed=allowed), trainer_key=trainer.key)
    return text, arts
