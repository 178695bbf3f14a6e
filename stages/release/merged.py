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

from stages.config.params import Params
from stages.core import atomic
from stages.core.errors import InputError, ReleaseError
from stages.core.preflight import check_disk_and_ram, human_size
from stages.fidelity.adapter_check import AdapterCheck, verify_merge
from stages.release.card import card_filters, check_card, render_front_matter, seal_release
from stages.release.hub_meta import check_front_matter, front_matter, other_formats
from stages.release.lineage import LINEAGE_FILE, card_context, load_lineage, publish_lineage
from stages.release.manifest import Artifact, artifact, tool_versions
from stages.release.privacy import publish_params
from stages.release.templates import render
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
# release.merged.dtype -> (safetensors dtype, config.json's `dtype`, torch's name)
DTYPES: dict[str, tuple[str, str]] = {"bf16": ("BF16", "bfloat16"), "f16": ("F16", "float16")}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# Keys that transformers fills with the folder a model or tokenizer was loaded from.
PATH_KEYS: tuple[str, ...] = ("_name_or_path", "name_or_path")
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


def published_spec(info: TensorInfo, dtype: str) -> TensorSpec:
    """A tensor as published: floating point in ``dtype``, anything else as it is."""
    return TensorSpec(info.name, dtype if info.dtype in FLOAT_DTYPES else info.dtype, info.shape)


def _torch_dtype(name: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16}[name]


def cast_chunks(info: TensorInfo, dtype: str, reader: Reader):
    """The bytes of ``info`` cast to ``dtype``, a chunk at a time; fails on a value
    the new dtype cannot hold."""
    import torch

    src, dst = _torch_dtype(info.dtype), _torch_dtype(dtype)
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


def write_weights(merged: Path, out: Path, dtype: str) -> tuple[list[str], int]:
    """Write the merged model's tensors into ``out`` in ``dtype`` (shard names, cast count)."""
    tensors = model_tensors(merged)
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


def public_json(src: Path, dst: Path, *, base_id: str, dtype_name: str | None = None) -> None:
    """Copy a JSON config with the keys that name a local folder set to the base's Hub id
    (and config.json's dtype the published one)."""
    data = json.loads(src.read_text(encoding="utf-8"))
    data |= {k: base_id for k in PATH_KEYS if k in data}
    if dtype_name is not None:
        data["dtype"] = dtype_name
        if "torch_dtype" in data:
            data["torch_dtype"] = dtype_name
    dst.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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


def _preflight(merged: Path, out: Path, dtype: str) -> None:
    tensors = model_tensors(merged)
    need = sum(published_spec(i, dtype).nbytes for i in tensors.values()) + 64 * 2**20
    check_disk_and_ram(out, need_disk=need, need_ram=PROCESS_RAM)


def render_merged_release(*, params: Params, trainer_key: str, merged: Path, base: Path,
                          out: Path) -> MergedRelease:
    """Check ``merged`` (merge@<t>'s folder) against the trainer's adapter on ``base``,
    then build ``out`` (``build/<trainer>/merged/``)."""
    trainer = params.trainer(trainer_key)
    if FORMAT not in trainer.release:
        raise ReleaseError(f"trainer {trainer.key} does not release {FORMAT}; nothing to render")
    if not (merged / CONFIG).is_file():
        raise InputError(f"{merged} holds no merged model ({CONFIG} is missing); run "
                         f"merge@{trainer.key} first (dvc repro)")
    release = trainer.release[FORMAT]
    st_dtype, dtype_name = DTYPES[release.dtype]
    source = trainer.run_dir / LINEAGE_FILE
    lineage = publish_lineage(load_lineage(source), source=source)
    published = publish_params(params, trainer.key, FORMAT)
    check = verify_merge(base=base, adapter=trainer.adapter, merged=merged,
                         fix=f"Merge it again: `dvc repro --force merge@{trainer.key}`.")
    log.info("checked %s: %d tensors, %d with the adapter merged, as peft merges them",
             merged, check.tensors, check.lora_merged)
    _preflight(merged, out, st_dtype)
    with atomic.output_dir(out, sync=False) as tmp:
        shards, cast = write_weights(merged, tmp, st_dtype)
        names = [*shards, INDEX_NAME, CONFIG]
        public_json(merged / CONFIG, tmp / CONFIG, base_id=trainer.base_model.id,
                    dtype_name=dtype_name)
        for name in SIDE_FILES:
            if not (merged / name).is_file():
                continue
            if name.endswith(".json") and name != "tokenizer.json":
                public_json(merged / name, tmp / name, base_id=trainer.base_model.id)
            else:
                shutil.copyfile(merged / name, tmp / name)
            names.append(name)
        arts = [artifact(tmp.parent, tmp / name, fmt=FORMAT, kind=kind_of(name))
                for name in names]
        matter = front_matter(trainer, lineage.fields, FORMAT)
        check_front_matter(matter, trainer_key=trainer.key)
        target = release.target
        card_filters()
        card = render(
            "README.merged.md.j2", front_matter=render_front_matter(matter), name=trainer.name,
            base_model=trainer.base_model.id, **card_context(lineage),
            params_keys=published.keys, tools=tool_versions(params.llama_cpp_version),
            files=[{"file": a.path.split("/", 1)[1], "kind": a.kind,
                    "size": human_size(a.bytes), "sha256": a.sha256} for a in arts],
            repo=target.repo_id if target.kind == "hub" else None, dtype=release.dtype,
            torch_dtype=dtype_name, check=asdict(check), cast=cast,
            chat=any(n in names for n in TEMPLATE_FILES) or _has_template(tmp),
            others=other_formats(trainer, FORMAT))
        check_card(card, matter)
        atomic.write_text(tmp / "README.md", card)
        arts.append(artifact(tmp.parent, tmp / "README.md", fmt=FORMAT, kind="card"))
        _, arts = seal_release(tmp=tmp, out=out, root=out.parent, fmt=FORMAT, trainer=trainer,
                               params=params, arts=arts, lineage=lineage, published=published)
    log.info("wrote %s (%d files, %s, %d tensors cast to %s)", out, len(arts),
             human_size(sum(a.bytes for a in arts)), cast, release.dtype)
    return MergedRelease(out=out, artifacts=tuple(arts), check=check, cast=cast)


def _has_template(folder: Path) -> bool:
    """Whether the tokenizer config carries a chat template (older transformers kept it
    there rather than in chat_template.jinja)."""
    path = folder / "tokenizer_config.json"
    return path.is_file() and bool(json.loads(path.read_text(encoding="utf-8"))
                                   .get("chat_template"))
