"""Model-card metadata the Hugging Face Hub accepts: the rules we apply, and ours built to them.

The rules are the Hub's documented ones (huggingface.co/docs/hub/model-cards,
"Model card metadata"), which its ``validate-yaml`` endpoint enforces on every
commit of a README.md: ``base_model`` a model id, ``base_model_relation`` one of
``adapter``/``merge``/``quantized``/``finetune``, ``license`` an id of the Hub's
list (or ``other`` with ``license_name`` and ``license_link``), ``datasets`` Hub
dataset ids.  The license ids and their check live in :mod:`stages.config.hub`
(every stage validates params).
"""

from __future__ import annotations

from typing import Any

from stages.config.hub import license_problem
from stages.config.params import Trainer
from stages.core.errors import ReleaseError
from stages.release.privacy import file_name, public_path

PIPELINE_TAG = "text-generation"
# base_model_relation by published format.  The Hub docs (huggingface.co/docs/hub/
# model-cards#specifying-a-base-model) call it "the type of relationship from the current
# model to the base model" ("adapter", "merge", "quantized", "finetune"); the Hub infers it
# when absent, and a repo of GGUF files would pass for a plain quantization, so we set it.
RELATIONS: dict[str, str] = {
    "adapter": "adapter",  # a LoRA adapter loaded on top of the base ("For an adapter")
    # The base with the adapter merged in: new weights, "a fine-tune"; the docs' `merge`
    # is "a merge of two or more models" (several base_model entries).
    "merged": "finetune",
    # The merged fine-tune, quantized.  `quantized` is "a quantized version of" the model
    # named in base_model: these are not the base's weights at lower precision, and the
    # Hub would list them among the base's quantizations.  Relative to the base they are
    # a fine-tune; `quantized` of the merged repo when that is published (:func:`lineage_base`).
    "gguf": "finetune",
    "merged_4bit": "finetune",  # the same: NF4 weights of the fine-tune
}
QUANTIZED = "quantized"
LIBRARIES: dict[str, str] = {"adapter": "peft", "merged": "transformers",
                             "merged_4bit": "transformers", "gguf": "gguf"}
FORMAT_TAGS: dict[str, tuple[str, ...]] = {"gguf": ("gguf", "llama.cpp"),
                                           "merged_4bit": ("bitsandbytes", "4-bit")}
# A dataset named by a file (the lineage's `name` is often one) is not a Hub dataset id.
DATA_FILE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow",
                                       ".txt", ".zip", ".gz", ".tar", ".xz", ".zst", ".bz2")


def base_model_relation(fmt: str) -> str:
    """``base_model_relation`` of a repo holding format ``fmt`` of a fine-tune of the base."""
    return RELATIONS[fmt]


def is_model_id(value: Any) -> bool:
    """``owner/name`` as the Hub spells a repo id (huggingface_hub's validate_repo_id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def is_dataset_id(value: Any) -> bool:
    """A Hub dataset id ``owner/name``: not a file name (``sft.jsonl``) or a path."""
    return is_model_id(value) and not value.lower().endswith(DATA_FILE_SUFFIXES)


def lineage_datasets(lineage: dict) -> list[dict]:
    """The lineage's ``dataset`` (a mapping, a name, a list of either, or absent) as
    ``{name, hub_id, examples, sha256}`` entries; ``hub_id`` only when it is a Hub id.
    A dataset named only by its path is named by the file (a path is never published)."""
    raw = lineage.get("dataset")
    items = raw if isinstance(raw, list) else [] if raw is None else [raw]
    found = []
    for item in items:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict):
            continue
        path = entry.get("path")
        name = entry.get("name") or entry.get("hub_id") or (file_name(str(path)) if path else None)
        hub_id = entry.get("hub_id") or entry.get("name")
        if name:
            found.append({"name": str(name), "hub_id": hub_id if is_dataset_id(hub_id) else None,
                          "examples": entry.get("examples"), "sha256": entry.get("sha256")})
    return found


def dataset_ids(lineage: dict) -> list[str]:
    """The Hub dataset ids of the lineage's datasets (``hub_id``, else ``name``), in order."""
    return list(dict.fromkeys(d["hub_id"] for d in lineage_datasets(lineage) if d["hub_id"]))


def lineage_base(trainer: Trainer, fmt: str) -> tuple[str, str]:
    """(``base_model``, ``base_model_relation``) of the card of format ``fmt``: the GGUF
    and NF4 repos are quantizations of the merged repo when the trainer publishes that on the Hub,
    every other repo relates to the original base."""
    merged = trainer.release.get("merged")
    if fmt in ("gguf", "merged_4bit") and merged is not None and merged.target.kind == "hub":
        return merged.target.repo_id, QUANTIZED
    return trainer.base_model.id, base_model_relation(fmt)


def front_matter(trainer: Trainer, lineage: dict, fmt: str) -> dict:
    """The YAML front matter of the model card of format ``fmt``."""
    trainer_tag = lineage.get("trainer")
    base, relation = lineage_base(trainer, fmt)
    data: dict = {
        "base_model": base,
        "base_model_relation": relation,
        "license": trainer.license,
    }
    if trainer.license == "other":
        data |= {"license_name": trainer.license_name, "license_link": trainer.license_link}
    data |= {
        "library_name": LIBRARIES[fmt],
        "pipeline_tag": PIPELINE_TAG,
        "tags": sorted({*trainer.tags, *FORMAT_TAGS.get(fmt, ()),
                        trainer_tag if isinstance(trainer_tag, str) else "lora"}),
    }
    ids = dataset_ids(lineage)
    if ids:
        data["datasets"] = ids
    return data


def metadata_problems(meta: dict) -> list[str]:
    """Where ``meta`` breaks the Hub's rules for the keys we write (empty: none)."""
    problems = []
    if not is_model_id(meta.get("base_model")):
        problems.append(f"`base_model` {meta.get('base_model')!r} is not a Hub model id "
                        "(owner/name); set the trainer's `base_model.id` to the base's Hub id")
    if meta.get("base_model_relation") not in {*RELATIONS.values(), QUANTIZED}:
        problems.append(f"`base_model_relation` {meta.get('base_model_relation')!r} is not one "
                        "of adapter, merge, quantized, finetune")
    found = license_problem(str(meta.get("license")), meta.get("license_name"),
                            meta.get("license_link"))
    if found:
        problems.append(f"`{found[0]}` {found[1]}")
    tags = meta.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        problems.append(f"`tags` must be a list of text (got {tags!r})")
    problems += [f"`datasets` entry {d!r} is not a Hub dataset id (owner/name)"
                 for d in meta.get("datasets", []) if not is_dataset_id(d)]
    return problems


def check_front_matter(meta: dict, *, trainer_key: str) -> None:
    """Raise unless the Hub would take ``meta`` (the card of trainer ``trainer_key``)."""
    problems = metadata_problems(meta)
    if problems:
        raise ReleaseError(f"the model card of trainer {trainer_key} breaks the Hub's metadata "
                           f"rules: {'; '.join(problems)} (trainers.{trainer_key} in params.yaml)")


def other_formats(trainer: Trainer, fmt: str) -> list[dict]:
    """The trainer's other released formats, as a card links them: a Hub repo by its
    URL, a local target by its folder's name (never a path of this machine)."""
    found = []
    for other in trainer.releases():
        if other == fmt:
            continue
        target = trainer.release[other].target
        if target.kind == "hub":
            found.append({"format": other, "name": target.repo_id,
                          "url": f"https://huggingface.co/{target.repo_id}"})
        else:
            found.append({"format": other, "name": public_path(str(target.path)), "url": None})
    return found
