"""Which stages each trainer needs: ``pipeline.yaml``, derived from params.yaml.

DVC's ``foreach`` and ``matrix`` cannot filter: a stage over ``${trainers}`` runs
for every trainer.  A trainer runs only the stages its release formats need, so
dvc.yaml loops over the stage sets of ``pipeline.yaml`` instead (its ``vars``),
one set per group of stages (:data:`STAGE_SETS`), each holding the trainers
that need it with the few values their stages read through ``${item...}``
(:func:`_item`; the rest they read from params.yaml, as DVC params dependencies),
and the push stages' set, one entry per trainer and format (``push@<trainer>-<format>``).

``pipeline.yaml`` is written by ``python -m stages.pipeline`` (``make
pipeline``; every make target that runs the pipeline writes it first), is
committed beside dvc.yaml, and is checked: :func:`check_current` (in every
stage's ``load_params``) fails when params.yaml says otherwise.  Plain ``dvc
repro`` cannot see a trainer that is not in it yet: no existing stage depends on
a new trainer's entry, so the make targets write the file first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from stages.config.params import FORMATS, Params, Trainer
from stages.core.errors import ParamsError

PIPELINE_FILE = "pipeline.yaml"
ROOT_KEY = "builds"  # one top-level key: DVC refuses a var that params.yaml also defines


def checks_lora(trainer: Trainer) -> bool:
    """Whether the trainer's GGUF LoRA is checked: it publishes one (``adapter`` with
    ``gguf_lora``) and a GGUF, whose base GGUF and reference logits the check uses."""
    adapter = trainer.release.get("adapter")
    return adapter is not None and adapter.gguf_lora and "gguf" in trainer.release


# Stage set -> which trainers need it.
STAGE_SETS: dict[str, Callable[[Trainer], bool]] = {
    # merge: the merged model every format but the adapter is made from
    "merge": lambda t: bool({"merged", "merged_4bit", "gguf"} & set(t.release)),
    # convert, convert_base, logits, reference, quantize, evaluate, card
    "gguf": lambda t: "gguf" in t.release,
    # adapter: the run's adapter folder and its GGUF LoRA
    "adapter": lambda t: "adapter" in t.release,
    # merged: the merged weights as published (transformers' from_pretrained)
    "merged": lambda t: "merged" in t.release,
    # merged_4bit: the merged weights quantized to bitsandbytes NF4
    "merged_4bit": lambda t: "merged_4bit" in t.release,
    # lora_check: the GGUF LoRA on the base GGUF against the merged GGUF's logits
    "lora_check": checks_lora,
    # manifest: the trainer's manifest of all its formats (every trainer releases one)
    "manifest": lambda t: bool(t.release),
}
# What adapter@<t> reads of lora_check@<t>, and manifest@<t> of each format folder
# (``released.<format>``).  Where a trainer has no such output (its GGUF LoRA is not
# checked, it does not release that format) the item names its adapter folder instead,
# already a dependency: DVC's deps take no list variable, and a duplicate dependency
# is harmless.  The stages read params to know which it is.
LORA_CHECK = "build/{key}/work/eval/lora.json"
RELEASED = "build/{key}/{fmt}"
# The push stages' set: one entry per trainer and format, ``<trainer>-<format>``.
RELEASES = "releases"
HEADER = """\
# Written by `make pipeline` (python -m stages.pipeline) from params.yaml: do not edit.
# The stages each trainer needs, by its release formats: dvc.yaml loops over these sets
# (DVC's foreach cannot filter a loop over trainers). Every stage checks it is current.
"""


def _item(params: Params, key: str) -> dict:
    trainer = params.trainer(key)
    check = LORA_CHECK.format(key=key) if checks_lora(trainer) else str(trainer.adapter)
    released = {fmt: RELEASED.format(key=key, fmt=fmt) if fmt in trainer.release
                else str(trainer.adapter) for fmt in FORMATS}
    return {"adapter": str(trainer.adapter), "base_model": {"path": str(trainer.base_model.path)},
            "lora_check": check, "released": released}


def stage_sets(params: Params) -> dict[str, dict]:
    """``{set: {trainer: item}}`` for every set of :data:`STAGE_SETS`, plus ``<set>_keys``
    (the trainer names alone, for ``matrix``)."""
    sets: dict[str, dict] = {}
    for name, needs in STAGE_SETS.items():
        sets[name] = {key: _item(params, key) for key, trainer in params.trainers.items()
                      if needs(trainer)}
    keys = {f"{name}_keys": list(items) for name, items in sets.items()}
    releases = {f"{key}-{fmt}": {"trainer": key, "format": fmt}
                for key, trainer in params.trainers.items() for fmt in trainer.releases()}
    return {ROOT_KEY: sets | keys | {RELEASES: releases}}


def render(params: Params) -> str:
    """The text of ``pipeline.yaml`` for ``params``."""
    return HEADER + yaml.safe_dump(stage_sets(params), sort_keys=False, width=100)


def check_current(params_path: Path, params: Params) -> None:
    """Fail when the ``pipeline.yaml`` beside ``params_path`` does not match ``params``
    (no file there: nothing to check, e.g. a params file outside a repository)."""
    path = params_path.parent / PIPELINE_FILE
    if not path.is_file():
        return
    try:
        current = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        current = None
    if current != stage_sets(params):
        raise ParamsError(f"{path} does not match {params_path.name} (a trainer or its release "
                          "formats changed since it was written): run `make pipeline` (or "
                          "`python -m stages.pipeline`), then dvc repro again")
