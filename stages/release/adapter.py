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
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import InputError
from stages.weights.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from stages.weights.merge import TEMPLATE_FILES, TOKENIZER_FILES

PUBLISHED: tuple[str, ...] = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, *TOKENIZER_FILES, *TEMPLATE_FILES)
# Keys of tokenizer_config.json that older transformers filled with the folder the
# tokenizer was loaded from (``name_or_path``): rewritten to the base's Hub id too.
TOKENIZER_PATH_KEYS: tuple[str, ...] = ("name_or_path", "_name_or_path")


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
            config = json.loads(src.read_text(encoding="utf-8"))
            config |= {k: base_id for k in TOKENIZER_PATH_KEYS if k in config}
            (out / name).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
        else:
            shutil.copyfile(src, out / name)
    return AdapterFiles(files=tuple(sorted(chosen)), left_out=left_out)
