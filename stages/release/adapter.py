"""The ``adapter`` format: the run's LoRA as peft loads it on the base from the Hub.

What a trainer's ``final_model/`` holds beside the adapter is its own business:
``training_args.bin`` (a pickle holding the run's paths and, with
``push_to_hub``, its token), optimizer and scheduler state, RNG state,
``trainer_state.json``, the trainer's own README.  None of it is published.  The
adapter folder is an allow-list (:data:`PUBLISHED`): the weights, the config,
and the tokenizer and chat template files when the run saved them; everything
else is named in the record as left out.

``adapter_config.json`` is peft's own, with ``base_model_name_or_path`` (the
local folder the run trained from) rewritten to the base's Hub id, so
``PeftModel.from_pretrained(base, repo)`` and the Hub's lineage both find the
base.  The config's other values are kept as they are; the privacy scan of the
folder still stops one that names this machine.

:func:`render_adapter_release` builds ``build/<trainer>/adapter/``: those files,
the same adapter as a GGUF LoRA (``release.adapter.gguf_lora``, the default),
a model card and manifest.json, whole or not at all.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from stages.config.params import Params, Trainer
from stages.config.pipeline import checks_lora
from stages.core import atomic
from stages.core.errors import InputError, ReleaseError
from stages.core.hashing import sha256_file
from stages.llamacpp.lora import LoraGguf, check_gguf_lora, convert_lora
from stages.release.card import finish_format
from stages.release.lineage import LINEAGE_FILE, load_lineage, publish_lineage
from stages.release.manifest import Artifact, artifact
from stages.release.privacy import named_by_hub_id, publish_params
from stages.weights.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from stages.weights.merge import TEMPLATE_FILES, TOKENIZER_FILES

log = logging.getLogger(__name__)

FORMAT = "adapter"
# The GGUF LoRA's tensor type: the converter's default, which every llama.cpp backend
# applies (the adapter's own weights are usually fp32; LoRA factors fit f16's range).
GGUF_LORA_OUTTYPE = "f16"
# peft's peft_type as people write it.
PEFT_NAMES: dict[str, str] = {"LORA": "LoRA"}

PUBLISHED: tuple[str, ...] = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, *TOKENIZER_FILES, *TEMPLATE_FILES)


@dataclass(frozen=True)
class AdapterFiles:
    """What the adapter folder publishes, and what of the run's folder it left out."""

    files: tuple[str, ...]
    left_out: tuple[str, ...]


def public_config(config: dict, base_id: str) -> dict:
    """``adapter_config.json`` as published: the base named by its Hub id."""
    return {**config, "base_model_name_or_path": base_id}


def sources(adapter: Path) -> tuple[dict[str, Path], tuple[str, ...]]:
    """(published name -> file of the run, names of the run's entries left out)."""
    if not (adapter / ADAPTER_WEIGHTS).is_file() or not (adapter / ADAPTER_CONFIG).is_file():
        raise InputError(f"{adapter} is not a peft adapter folder: it needs {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS}; point the trainer's `adapter` in params.yaml at "
                         "the folder the trainer saved (final_model/)")
    chosen = {name: adapter / name for name in PUBLISHED if (adapter / name).is_file()}
    left_out = tuple(sorted(p.name for p in adapter.iterdir() if p.name not in chosen))
    return chosen, left_out


def write_files(*, adapter: Path, base_id: str, out: Path) -> AdapterFiles:
    """Copy the published files of ``adapter`` into the (new, empty) folder ``out``."""
    chosen, left_out = sources(adapter)
    for name, src in chosen.items():
        if name == ADAPTER_CONFIG:
            config = json.loads(src.read_text(encoding="utf-8"))
            (out / name).write_text(json.dumps(public_config(config, base_id), indent=2) + "\n",
                                    encoding="utf-8")
        elif name == "tokenizer_config.json":
            # older transformers named the folder it was loaded from: the Hub id instead
            config = named_by_hub_id(json.loads(src.read_text(encoding="utf-8")), base_id)
            (out / name).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
        else:
            shutil.copyfile(src, out / name)
    return AdapterFiles(files=tuple(sorted(chosen)), left_out=left_out)


@dataclass(frozen=True)
class AdapterRelease:
    out: Path
    artifacts: tuple[Artifact, ...]
    left_out: tuple[str, ...]


def kind_of(name: str) -> str:
    """The manifest's ``kind`` of a published adapter file."""
    if name == ADAPTER_WEIGHTS:
        return "adapter"
    if name == ADAPTER_CONFIG:
        return "config"
    if name.endswith(".gguf"):
        return "gguf_lora"
    return "chat_template" if name in TEMPLATE_FILES else "tokenizer"


def adapter_summary(config: dict) -> dict:
    """What the card says of the adapter's shape, from its adapter_config.json."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    kind = str(config.get("peft_type", "LORA"))
    return {"peft_type": PEFT_NAMES.get(kind, kind), "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, list) else [],
            "use_dora": bool(config.get("use_dora")), "use_rslora": bool(config.get("use_rslora")),
            "modules_to_save": sorted(config.get("modules_to_save") or [])}


def lora_file_name(trainer: Trainer) -> str:
    """The published GGUF LoRA's file name."""
    return f"{trainer.name}-lora-{GGUF_LORA_OUTTYPE}.gguf"


def gguf_lora(*, params: Params, trainer: Trainer, base: Path, folder: Path) -> LoraGguf:
    """Write the trainer's GGUF LoRA into ``folder`` (the same bytes wherever it is made:
    lora_check@<t> checks what adapter@<t> publishes)."""
    config = public_config(read_json(trainer.adapter / ADAPTER_CONFIG), trainer.base_model.id)
    return convert_lora(adapter=load_adapter(trainer.adapter), config=config, base=base,
                        out=folder / lora_file_name(trainer), name=trainer.name,
                        outtype=GGUF_LORA_OUTTYPE, trainer_key=trainer.key,
                        llama_cpp_version=params.llama_cpp_version)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_lora_check(path: Path | None, trainer: Trainer, lora: Path | None) -> dict | None:
    """What lora_check@<t> measured of ``lora`` (the GGUF LoRA just made), or None when
    the trainer's GGUF LoRA is not checked (pipeline.yaml: no GGUF release to compare
    with, or no GGUF LoRA)."""
    if lora is None or not checks_lora(trainer):
        return None
    if path is None or not path.is_file() or path.suffix != ".json":
        raise ReleaseError(f"trainer {trainer.key} releases a GGUF LoRA and a GGUF, so its "
                           f"adapter card needs lora_check@{trainer.key}'s record; pass "
                           "--lora-check build/<trainer>/work/eval/lora.json (dvc repro runs it)")
    record = read_json(path)
    if record.get("lora_sha256") != sha256_file(lora):
        raise ReleaseError(f"{path} measured another GGUF LoRA than the one made now "
                           f"({lora.name}); rerun lora_check@{trainer.key} (dvc repro)")
    return record


def render_adapter_release(*, params: Params, trainer_key: str, base: Path, out: Path,
                           lora_check: Path | None = None) -> AdapterRelease:
    """Build ``out`` (``build/<trainer>/adapter/``) for the trainer's run; ``base`` is the
    base model's folder (the GGUF LoRA converter reads its config.json); ``lora_check``
    the record of lora_check@<t>, when the trainer's GGUF LoRA is checked."""
    trainer = params.trainer(trainer_key)
    if FORMAT not in trainer.release:
        raise ReleaseError(f"trainer {trainer.key} does not release {FORMAT}; nothing to render")
    release = trainer.release[FORMAT]
    source = trainer.run_dir / LINEAGE_FILE
    lineage = publish_lineage(load_lineage(source), source=source)
    published = publish_params(params, trainer.key, FORMAT)
    lora = load_adapter(trainer.adapter)
    if release.gguf_lora:
        check_gguf_lora(lora, trainer.key)  # before any work: the reason and what to do
    with atomic.output_dir(out) as tmp:
        files = write_files(adapter=trainer.adapter, base_id=trainer.base_model.id, out=tmp)
        names = list(files.files)
        config = json.loads((tmp / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        lora_file = None
        if release.gguf_lora:
            lora_file = gguf_lora(params=params, trainer=trainer, base=base, folder=tmp).out.name
            names.append(lora_file)
        checked = load_lora_check(lora_check, trainer, tmp / lora_file if lora_file else None)
        arts = [artifact(tmp.parent, tmp / name, fmt=FORMAT, kind=kind_of(name))
                for name in names]
        arts = finish_format(
            tmp=tmp, out=out, fmt=FORMAT, trainer=trainer, params=params, arts=arts,
            lineage=lineage, published=published, template="README.adapter.md.j2",
            tokenizer_saved=any(n in names for n in TOKENIZER_FILES), lora_file=lora_file,
            adapter=adapter_summary(config), lora_check=checked)
    log.info("wrote %s (%d files; left out of the run's folder: %s)", out, len(arts),
             ", ".join(files.left_out) or "nothing")
    return AdapterRelease(out=out, artifacts=tuple(arts), left_out=files.left_out)
