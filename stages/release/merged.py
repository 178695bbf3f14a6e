"""The ``merged`` format: the base with the adapter merged in, as transformers loads it.

``build/<trainer>/merged/`` holds the merged weights as 16-bit safetensors
(``release.merged.dtype``: ``bf16``, the default, or ``f16``), sharded the
Hugging Face way (5 GB per shard, ``model.safetensors.index.json``), with
``config.json`` (its ``dtype`` the published one), ``generation_config.json``,
the tokenizer and chat template files, a model card and manifest.json:
``AutoModelForCausalLM.from_pretrained(repo)`` needs nothing else.

Before anything is written, the merge it publishes (``build/<trainer>/work/merged``)
is checked to be this adapter applied to this base, tensor by tensor
(:func:`stages.fidelity.adapter_check.verify_merge`, streamed: its memory does not
grow with the model), so a trainer that releases only this format gets the same
check as one whose GGUFs pass through ``reference``.  The weights are then copied
in the kernel where their dtype is already the published one, and cast a chunk at
a time otherwise; a value that ``f16`` cannot hold (beyond ±65504) is an error
naming the tensor, never an ``inf`` in the release.

Nothing of the merge folder is published but an allow-list (:data:`SIDE_FILES`);
config and tokenizer keys that name the folder a model was loaded from
(``_name_or_path``) are rewritten to the base's Hub id.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.config.params import FormatRelease, Params, Trainer
from stages.core import atomic
from stages.core.errors import InputError, ReleaseError
from stages.core.preflight import check_disk_and_ram, human_size
from stages.fidelity.adapter_check import FLOAT_DTYPES, AdapterCheck, torch_dtype, verify_merge
from stages.release.card import finish_format
from stages.release.lineage import LINEAGE_FILE, Lineage, load_lineage, publish_lineage
from stages.release.manifest import Artifact, artifact
from stages.release.privacy import PublishedParams, named_by_hub_id, publish_params
from stages.weights.merge import GENERATION_CONFIG, TEMPLATE_FILES, TOKENIZER_FILES
from stages.weights.safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    Reader,
    ShardWriter,
    TensorInfo,
    TensorSpec,
    model_tensors,
)

log = logging.getLogger(__name__)

FORMAT = "merged"
CONFIG = "config.json"
SIDE_FILES: tuple[str, ...] = (GENERATION_CONFIG, *TOKENIZER_FILES, *TEMPLATE_FILES)
# release.merged.dtype -> (safetensors dtype, config.json's `dtype`)
DTYPES: dict[str, tuple[str, str]] = {"bf16": ("BF16", "bfloat16"), "f16": ("F16", "float16")}
# Elements cast per step: 16 MB of fp32 at most in flight, whatever the model.
CAST_ELEMENTS = 2**22
# The process with torch imported, and a cast chunk in three dtypes.
PROCESS_RAM = 600 * 2**20


@dataclass(frozen=True)
class MergedRelease:
    out: Path
    artifacts: tuple[Artifact, ...]
    check: AdapterCheck
    cast: int  # tensors cast to the published dtype (the rest copied byte for byte)


@dataclass(frozen=True)
class CheckedMerge:
    """A trainer's merge, checked against its adapter, and what its release publishes."""

    trainer: Trainer
    release: FormatRelease
    lineage: Lineage
    published: PublishedParams
    check: AdapterCheck


def checked_merge(*, params: Params, trainer_key: str, fmt: str, merged: Path,
                  base: Path) -> CheckedMerge:
    """The release inputs of format ``fmt`` (``merged`` or ``merged_4bit``), once
    ``merged`` (merge@<t>'s folder) is proven to be the trainer's adapter on ``base``."""
    trainer = params.trainer(trainer_key)
    if fmt not in trainer.release:
        raise ReleaseError(f"trainer {trainer.key} does not release {fmt}; nothing to render")
    if not (merged / CONFIG).is_file():
        raise InputError(f"{merged} holds no merged model ({CONFIG} is missing); run "
                         f"merge@{trainer.key} first (dvc repro)")
    source = trainer.run_dir / LINEAGE_FILE
    lineage = publish_lineage(load_lineage(source), source=source)
    published = publish_params(params, trainer.key, fmt)
    check = verify_merge(base=base, adapter=trainer.adapter, merged=merged,
                         fix=f"Merge it again: `dvc repro --force merge@{trainer.key}`.")
    log.info("checked %s: %d tensors, %d with the adapter merged, as peft merges them",
             merged, check.tensors, check.lora_merged)
    return CheckedMerge(trainer=trainer, release=trainer.release[fmt], lineage=lineage,
                        published=published, check=check)


def published_spec(info: TensorInfo, dtype: str) -> TensorSpec:
    """A tensor as published: floating point in ``dtype``, anything else as it is."""
    return TensorSpec(info.name, dtype if info.dtype in FLOAT_DTYPES else info.dtype, info.shape)


def cast_chunks(info: TensorInfo, dtype: str, reader: Reader):
    """The bytes of ``info`` cast to ``dtype``, a chunk at a time; fails on a value
    the new dtype cannot hold."""
    import torch

    src, dst = torch_dtype(info.dtype), torch_dtype(dtype)
    size = torch.empty((), dtype=src).element_size()
    buf = bytearray(min(info.numel, CAST_ELEMENTS) * size)
    done = 0
    while done < info.numel:
        count = min(CAST_ELEMENTS, info.numel - done)
        view = memoryview(buf)[: count * size]
        reader.read_into(info, view, start=done * size)
        values = torch.frombuffer(view, dtype=src)
        out = values.to(dst)
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(values).all()):
            peak = values.abs().max().item()
            raise ReleaseError(
                f"`{info.name}` holds values {dtype} cannot represent (largest magnitude "
                f"{peak:.6g}; {dtype} holds up to {torch.finfo(dst).max:.6g}); publish it as "
                "bf16: `release.merged.dtype: bf16`")
        yield out.view(torch.uint8).numpy()
        done += count


def write_weights(tensors: dict[str, TensorInfo], out: Path, dtype: str) -> tuple[list[str], int]:
    """Write ``tensors`` into ``out`` in ``dtype`` (shard names, how many were cast)."""
    specs = [published_spec(info, dtype) for info in tensors.values()]
    with Reader() as reader, ShardWriter(out, specs, max_shard_size=DEFAULT_MAX_SHARD_SIZE) \
            as writer:
        cast = 0
        for spec in specs:
            info = tensors[spec.name]
            if spec.dtype == info.dtype:
                writer.copy(spec.name, info, reader)
            else:
                writer.write(spec.name, cast_chunks(info, spec.dtype, reader))
                cast += 1
        writer.finish()
    return list(writer.names), cast


def write_json(src: Path, dst: Path, *, base_id: str, **values: object) -> None:
    """Copy a JSON config, the folder it was loaded from named by ``base_id`` and
    ``values`` set."""
    data = named_by_hub_id(json.loads(src.read_text(encoding="utf-8")), base_id) | values
    dst.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_side_files(merged: Path, out: Path, *, base_id: str) -> list[str]:
    """Copy the generation config, tokenizer and chat template files of ``merged`` that
    ``out`` does not hold yet (:data:`SIDE_FILES`); their names."""
    names = []
    for name in SIDE_FILES:
        if not (merged / name).is_file() or (out / name).exists():
            continue
        if name.endswith(".json") and name != "tokenizer.json":
            write_json(merged / name, out / name, base_id=base_id)
        else:
            shutil.copyfile(merged / name, out / name)
        names.append(name)
    return names


def has_chat_template(folder: Path) -> bool:
    """Whether the released folder carries a chat template: a template file, or the
    tokenizer config's (where older transformers kept it)."""
    if any((folder / name).is_file() for name in TEMPLATE_FILES):
        return True
    path = folder / "tokenizer_config.json"
    return path.is_file() and bool(json.loads(path.read_text(encoding="utf-8"))
                                   .get("chat_template"))


def kind_of(name: str) -> str:
    """The manifest's ``kind`` of a published merged file."""
    if name.endswith(".safetensors"):
        return "weights"
    if name == INDEX_NAME:
        return "weights_index"
    if name == CONFIG:
        return "config"
    if name == GENERATION_CONFIG:
        return "generation_config"
    return "chat_template" if name in TEMPLATE_FILES else "tokenizer"


def render_merged_release(*, params: Params, trainer_key: str, merged: Path, base: Path,
                          out: Path) -> MergedRelease:
    """Check ``merged`` (merge@<t>'s folder) against the trainer's adapter on ``base``,
    then build ``out`` (``build/<trainer>/merged/``)."""
    inputs = checked_merge(params=params, trainer_key=trainer_key, fmt=FORMAT, merged=merged,
                           base=base)
    trainer, dtype = inputs.trainer, inputs.release.dtype
    st_dtype, dtype_name = DTYPES[dtype]
    tensors = model_tensors(merged)
    need = sum(published_spec(info, st_dtype).nbytes for info in tensors.values())
    check_disk_and_ram(out, need_disk=need + 64 * 2**20, need_ram=PROCESS_RAM)
    config = json.loads((merged / CONFIG).read_text(encoding="utf-8"))
    dtype_keys = {key: dtype_name for key in ("dtype", "torch_dtype")
                  if key == "dtype" or key in config}
    with atomic.output_dir(out, sync=False) as tmp:
        shards, cast = write_weights(tensors, tmp, st_dtype)
        write_json(merged / CONFIG, tmp / CONFIG, base_id=trainer.base_model.id, **dtype_keys)
        names = [*shards, INDEX_NAME, CONFIG,
                 *copy_side_files(merged, tmp, base_id=trainer.base_model.id)]
        arts = [artifact(tmp.parent, tmp / name, fmt=FORMAT, kind=kind_of(name))
                for name in names]
        arts = finish_format(
            tmp=tmp, out=out, fmt=FORMAT, trainer=trainer, params=params, arts=arts,
            lineage=inputs.lineage, published=inputs.published,
            template="README.merged.md.j2", dtype=dtype, torch_dtype=dtype_name,
            check=asdict(inputs.check), cast=cast, chat=has_chat_template(tmp))
    log.info("wrote %s (%d files, %s, %d tensors cast to %s)", out, len(arts),
             human_size(sum(a.bytes for a in arts)), cast, dtype)
    return MergedRelease(out=out, artifacts=tuple(arts), check=inputs.check, cast=cast)
