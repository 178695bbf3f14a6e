"""The published GGUF folder of a trainer: files, model card, Modelfile, manifest.

``<name>-<LEVEL>.gguf`` (hard links to the quantize outputs, so no copy),
``README.md`` (Hugging Face model card with YAML front matter and a quality
table), ``quality.png``, ``Modelfile`` (Ollama) and ``manifest.json``.  Rendered
text is parsed back and checked before anything is written; the folder appears
whole or not at all.
"""


from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.config.params import Params, Trainer
from stages.core import atomic
from stages.core.errors import InputError, ReleaseError
from stages.core.preflight import human_size
from stages.llamacpp.gguf_meta import read_chat_info
from stages.release.manifest import (
    Artifact,
    artifact,
    check_manifest,
    render_manifest,
    tool_versions,
)
from stages.release.quality import (
    Quality,
    load_quality,
    one_line,
    plot_points,
    render_plot,
    table_cell,
)
from stages.release.templates import environment

log = logging.getLogger(__name__)

FORMAT = "gguf"
LIBRARY = "gguf"  # what the Hub calls a repo of GGUF files (library_name)
PLOT = "quality.png"


@dataclass(frozen=True)
class CardResult:
    out: Path
    manifest: Path
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


def load_lineage(path: Path) -> dict:
    """training_lineage.json of the run (trainer, dataset, hyperparameters...)."""
    if not path.is_file():
        raise InputError(f"no training lineage at {path}; trainers write "
                           "training_lineage.json beside final_model/")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None


def front_matter(trainer: Trainer, lineage: dict) -> dict:
    """YAML front matter of the Hub model card."""
    data: dict = {
        "base_model": trainer.base_model.id,
        # The GGUFs are the base fine-tuned (adapter merged), then quantized.
        "base_model_relation": "finetune",
        "license": trainer.license,
        "library_name": LIBRARY,
        "pipeline_tag": "text-generation",
        "tags": sorted({*trainer.tags, "gguf", "llama.cpp", lineage.get("trainer", "lora")}),
    }
    dataset = lineage.get("dataset") or {}
    if dataset.get("name"):
        data["datasets"] = [dataset.get("hub_id") or dataset["name"]]
    return data


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


def published_params(params: Params, trainer: Trainer) -> dict:
    """The params that shaped these artifacts, for the manifest."""
    return {"trainer": params.raw["trainers"][trainer.key], "quantize": params.raw["quantize"],
            "convert": {"outtype": params.convert_outtype}, "evaluate": params.raw["evaluate"],
            "llama_cpp": {"version": params.llama_cpp_version}}


def write_release(*, tmp: Path, trainer: Trainer, params: Params, records: list[dict],
                  quant_dir: Path, lineage: dict, quality: Quality) -> list[Artifact]:
    """Fill ``tmp`` with GGUF links, README.md, quality.png and Modelfile; return artifacts."""
    env = environment()
    env.filters.update(cell=table_cell, one_line=one_line)
    atomic.write_bytes(tmp / PLOT, render_plot(quality, f"{trainer.name}: size vs fidelity"))
    files, arts = [], []
    for rec in records:
        name = f"{trainer.name}-{rec['level']}.gguf"
        link_or_copy(quant_dir / rec["file"], tmp / name)
        files.append({"file": name, "level": rec["level"], "size": human_size(rec["bytes"]),
                      "sha256": rec["sha256"]})
        arts.append(artifact(tmp.parent, tmp / name, fmt=FORMAT, kind="gguf",
                             level=rec["level"], sha256=rec["sha256"]))
    release = trainer.release[FORMAT]
    level = release.ollama_level or records[0]["level"]
    default_file = f"{trainer.name}-{level}.gguf"
    chat = read_chat_info(tmp / default_file)
    ollama_name = trainer.name.lower()
    modelfile = env.get_template("Modelfile.j2").render(
        name=trainer.name, level=level, gguf_file=default_file, ollama_name=ollama_name,
        stops=chat.stop_strings, license=trainer.license)
    atomic.write_text(tmp / "Modelfile", modelfile)
    files.append({"file": "Modelfile", "level": None,
                  "size": human_size(len(modelfile.encode())),
                  "sha256": hashlib.sha256(modelfile.encode()).hexdigest()})
    matter = front_matter(trainer, lineage)
    card = env.get_template("README.md.j2").render(
        front_matter=render_front_matter(matter), name=trainer.name,
        base_model=trainer.base_model.id, lineage=lineage, files=files,
        fallbacks=[fb | {"level": r["level"]} for r in records for fb in r["fallbacks"]],
        default_file=default_file, ollama_name=ollama_name, quality=quality, plot=PLOT,
        overrides={"chat_template": trainer.chat_template, "eos_token": trainer.eos_token},
        tools=tool_versions(params.llama_cpp_version))
    check_card(card, matter)
    atomic.write_text(tmp / "README.md", card)
    arts.append(artifact(tmp.parent, tmp / "Modelfile", fmt=FORMAT, kind="modelfile"))
    arts.append(artifact(tmp.parent, tmp / "README.md", fmt=FORMAT, kind="card"))
    arts.append(artifact(tmp.parent, tmp / PLOT, fmt=FORMAT, kind="plot"))
    return arts


def render_release(*, params: Params, trainer_key: str, quant_dir: Path, eval_dir: Path,
                   out: Path, manifest: Path, plot_data: Path) -> CardResult:
    """Build ``out`` (the published GGUF folder), ``manifest`` and ``plot_data``."""
    trainer = params.trainer(trainer_key)
    if FORMAT not in trainer.release:
        raise ReleaseError(f"trainer {trainer.key} does not release {FORMAT}; nothing to render")
    records = load_records(quant_dir, list(params.levels))
    lineage = load_lineage(trainer.run_dir / "training_lineage.json")
    quality = load_quality(eval_dir, records, trainer.key)
    root = manifest.parent
    if out.parent.resolve() != root.resolve():
        raise ReleaseError(f"--out {out} must sit in the manifest's folder {root}")
    with atomic.output_dir(out) as tmp:
        arts = write_release(tmp=tmp, trainer=trainer, params=params, records=records,
                             quant_dir=quant_dir, lineage=lineage, quality=quality)
        arts = [Artifact(**{**a.__dict__, "path": f"{out.name}/{a.path.split('/', 1)[1]}"})
                for a in arts]
        text = render_manifest(trainer=trainer.key, name=trainer.name, artifacts=arts,
                               lineage=lineage, params=published_params(params, trainer),
                               tools=tool_versions(params.llama_cpp_version))
        staged = {**json.loads(text)}
        staged["artifacts"] = [{**a, "path": a["path"].replace(out.name, tmp.name, 1)}
                               for a in staged["artifacts"]]
        check_manifest(json.dumps(staged), root)
        atomic.write_text(tmp / "manifest.json", text)
    atomic.write_text(manifest, text)
    atomic.write_text(plot_data, json.dumps(plot_points(quality), indent=2) + "\n")
    log.info("wrote %s (%d files) and %s", out, len(arts), manifest)
    return CardResult(out=out, manifest=manifest, artifacts=tuple(arts))
