"""training_lineage.json of any shape: what a release shows of it, and nothing more.

A run's lineage is whatever its trainer wrote: the demo's (stages/demo/train.py),
the seeds' trainers, TRL, Unsloth or axolotl each use their own keys, some
nested, some missing.  :func:`publish_lineage` takes the known keys
(:data:`FIELDS`, under any of the names trainers give them), reduces each to
what a reader needs, and drops the rest:

- a text or number field (trainer, library, steps, loss, times) is kept when it
  is text or a number and not a local path;
- ``base_model`` is a name or Hub id (from a mapping: its ``id``/``name``), never
  a path;
- ``dataset`` (a mapping, a name, or a list of either) becomes ``name``,
  ``hub_id``, ``examples`` and ``sha256``: a path only lends its file name;
- ``hyperparameters`` (flat or nested) keeps its scalar settings and lists of
  them, without path settings (``output_dir``, ``*_path``...) or path values.

A missing key is simply absent; a file that is not a JSON object is one error.
The secret and path rules are :mod:`stages.release.privacy`'s.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import InputError
from stages.release.hub_meta import is_dataset_id
from stages.release.privacy import (
    check_secrets,
    file_name,
    is_local_path,
    is_published,
    leaves,
    secret_kind,
    secret_name,
)

log = logging.getLogger(__name__)

LINEAGE_FILE = "training_lineage.json"
# The fields a card shows -> the keys trainers write them under, the first present wins.
# The demo and the seeds' trainers write the first name of each; the others are TRL's
# (trainer_state.json: global_step, epoch; TrainingArguments: num_train_epochs), PEFT's
# (adapter_config.json: base_model_name_or_path) and axolotl's (base_model, datasets).
FIELDS: dict[str, tuple[str, ...]] = {
    "trainer": ("trainer", "method", "training_method"),
    "trainer_library": ("trainer_library", "library", "framework"),
    "base_model": ("base_model", "base_model_name_or_path", "model_name_or_path"),
    "dataset": ("dataset", "datasets"),
    "hyperparameters": ("hyperparameters", "hparams", "training_args"),
    "steps": ("steps", "global_step"),
    "epochs": ("epochs", "epoch", "num_train_epochs"),
    "final_loss": ("final_loss", "train_loss"),
    "started": ("started", "started_at", "start_time"),
    "finished": ("finished", "finished_at", "end_time"),
}
# The card's row of each field (hyperparameters have their own table).
LABELS: dict[str, str] = {
    "trainer": "Trainer", "trainer_library": "Library", "base_model": "Base model",
    "dataset": "Dataset", "steps": "Steps", "epochs": "Epochs", "final_loss": "Final loss",
    "started": "Started", "finished": "Finished",
}
# Where a dataset mapping keeps each published part, in order of preference.
DATASET_KEYS: dict[str, tuple[str, ...]] = {
    "name": ("name", "hub_id", "repo_id", "path"),
    "hub_id": ("hub_id", "repo_id", "name"),
    "examples": ("examples", "num_examples", "num_rows"),
    "sha256": ("sha256",),
}
# A setting whose name ends in one of these words holds a path (output_dir, logging_dir,
# data_path, deepspeed_config_file): machine layout, not a hyperparameter.
PATH_WORDS = re.compile(r"(?:^|_)(?:dir|dirs|directory|path|paths|file|files|folder|root)$",
                        re.IGNORECASE)


@dataclass(frozen=True)
class Lineage:
    """The published part of a run's lineage."""

    published: dict[str, Any]  # the file's key -> reduced value, in FIELDS order (manifest)
    fields: dict[str, Any]  # every field of FIELDS -> reduced value, None when absent (card)
    shown: tuple[str, ...]  # the file's keys in ``published``
    dropped: tuple[str, ...]  # dotted paths of the file that are not published


def load_lineage(path: Path) -> dict:
    """training_lineage.json of the run: a JSON object, whatever its keys."""
    if not path.is_file():
        raise InputError(f"no training lineage at {path}; trainers write "
                         f"{LINEAGE_FILE} beside final_model/")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); fix or rewrite the file the "
                         "trainer wrote (a JSON object; `{}` publishes no lineage)") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}; fix its permissions") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__} ({json.dumps(data)[:40]}), "
                         "not an object; a lineage is an object such as "
                         '{"trainer": "dpo", "base_model": "...", "dataset": {...}}')
    return data


def _plain(value: Any) -> bool:
    """A number, or text that is not a local path."""
    return isinstance(value, (int, float)) or (isinstance(value, str) and not is_local_path(value))


def _finite(value: Any) -> Any:
    # A diverged run's loss is NaN, which JSON cannot hold: show it as text.
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _scalar(value: Any, key: str) -> tuple[Any, set[str]]:
    return (_finite(value), {key}) if _plain(value) else (None, set())


def _base_model(value: Any, key: str) -> tuple[Any, set[str]]:
    if isinstance(value, dict):  # {"id": "org/name", "path": "/models/..."}
        part = next((k for k in ("id", "hub_id", "repo_id", "name")
                     if isinstance(value.get(k), str) and _plain(value[k])), None)
        return (value[part], {f"{key}.{part}"}) if part else (None, set())
    return (value, {key}) if isinstance(value, str) and _plain(value) else (None, set())


def _dataset_part(part: str, source: str, value: Any) -> Any:
    """``value`` (of the dataset's key ``source``) as its ``part``, or None when it cannot be."""
    if part == "examples":
        return value if type(value) is int and value >= 0 else None
    if not isinstance(value, str) or not value.strip():
        return None
    if part == "name":  # a path, even a relative one, lends only its file name
        return file_name(value) if source == "path" or is_local_path(value) else value
    if part == "hub_id":
        return value if is_dataset_id(value) else None
    return value  # sha256


def _dataset_entry(item: Any, key: str) -> tuple[dict | None, set[str]]:
    """``{name, hub_id, examples, sha256}`` of one dataset: a name, or a mapping."""
    if isinstance(item, str):
        item, inside = {"name": item}, False
    elif isinstance(item, dict):
        inside = True
    else:
        return None, set()
    entry: dict[str, Any] = {}
    used: set[str] = set()
    for part, sources in DATASET_KEYS.items():
        for source in sources:
            value = _dataset_part(part, source, item.get(source))
            if value is not None:
                entry[part] = value
                used.add(f"{key}.{source}" if inside else key)
                break
    return (entry, used) if "name" in entry else (None, set())


def _dataset(value: Any, key: str) -> tuple[Any, set[str]]:
    if not isinstance(value, list):
        return _dataset_entry(value, key)
    entries, used = [], set()
    for index, item in enumerate(value):
        entry, parts = _dataset_entry(item, f"{key}.{index}")
        if entry is not None:
            entries.append(entry)
            used |= parts
    return (entries, used) if entries else (None, set())


def _setting(item: Any) -> bool:
    """A value a hyperparameter table can show: a scalar, or a list of scalars."""
    if isinstance(item, list):
        return all(_setting(x) and not isinstance(x, list) for x in item)
    return item is None or _plain(item)


def _settings(value: Any, key: str) -> tuple[Any, set[str]]:
    """A mapping of settings, flat or nested, without path settings and path values; a
    key named like a secret is kept only when it holds one (so that it stops the card)."""
    if not isinstance(value, dict):
        return None, set()
    kept: dict[str, Any] = {}
    used: set[str] = set()
    for name, item in value.items():
        path = f"{key}.{name}"
        if PATH_WORDS.search(name) or (secret_name(name) and secret_kind(path, item) is None):
            continue  # output_dir, data_path; hub_token: null or "<HUB_TOKEN>"
        if isinstance(item, dict):
            item, parts = _settings(item, path)
            if item:
                kept[name], used = item, used | parts
        elif _setting(item):
            kept[name] = [_finite(x) for x in item] if isinstance(item, list) else _finite(item)
            used.add(path)
    return (kept, used) if kept else (None, set())


REDUCERS: dict[str, Callable[[Any, str], tuple[Any, set[str]]]] = {
    "base_model": _base_model, "dataset": _dataset, "hyperparameters": _settings,
}


def publish_lineage(raw: dict, *, source: Path) -> Lineage:
    """The known fields of ``raw`` (training_lineage.json at ``source``), reduced; a secret
    in a published value is an :class:`InputError` naming the key and the file."""
    published: dict[str, Any] = {}
    fields: dict[str, Any] = dict.fromkeys(FIELDS)
    used: set[str] = set()
    for field, keys in FIELDS.items():
        for key in keys:
            if key not in raw:
                continue
            value, parts = REDUCERS.get(field, _scalar)(raw[key], key)
            if value is not None:
                published[key], fields[field] = value, value
                used |= parts
                break
    check_secrets(raw, frozenset(used), source=str(source), error=InputError)
    dropped = tuple(path for path, _ in leaves(raw) if not is_published(path, frozenset(used)))
    if dropped:
        log.info("%s: not published (not a key the card shows, a path, or empty): %s",
                 source, ", ".join(dropped))
    return Lineage(published=published, fields=fields, shown=tuple(published),
                   dropped=dropped)


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return " ".join(text.split()).replace("|", "\\|")


def _dataset_cell(entries: list[dict]) -> str:
    shown = []
    for d in entries:
        name = _cell(d["name"])
        text = f"[{name}](https://huggingface.co/datasets/{d['hub_id']})" if d.get("hub_id") \
            else name
        size = d.get("examples")
        extra = f"{size if size is not None else '?'} examples"
        if d.get("sha256"):
            extra += f", sha256 `{_cell(d['sha256'][:16])}…`"
        shown.append(f"{text} ({extra})")
    return "; ".join(shown)


def card_rows(lineage: Lineage) -> list[tuple[str, str]]:
    """The card's lineage table: (label, Markdown cell) of each field present, in order."""
    rows = []
    for field, label in LABELS.items():
        value = lineage.fields[field]
        if value is None:
            continue
        if field == "dataset":
            text = _dataset_cell(value if isinstance(value, list) else [value])
        elif field == "base_model":
            text = f"`{_cell(value)}`"
        elif field == "final_loss" and isinstance(value, float):
            text = f"{value:.4f}"
        else:
            text = _cell(value)
        rows.append((label, text))
    return rows


def hyperparameter_rows(lineage: Lineage) -> list[tuple[str, str]]:
    """The card's hyperparameter table: (dotted name, cell), sorted by name."""
    settings = lineage.fields["hyperparameters"] or {}
    flat = [(path, _cell(value)) for path, value in _flatten(settings)]
    return sorted(flat, key=lambda row: row[0].lower())


def _flatten(settings: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for name, value in settings.items():
        path = f"{prefix}{name}"
        rows += _flatten(value, f"{path}.") if isinstance(value, dict) else [(path, value)]
    return rows


def card_context(lineage: Lineage) -> dict[str, Any]:
    """What templates/README.md.j2 shows of the lineage (every key present: the template
    environment is strict, so a missing field is None here, never undefined there)."""
    return {"trained_with": trained_with(lineage), "lineage_file": LINEAGE_FILE,
            "lineage_keys": lineage.shown, "lineage_fields": tuple(FIELDS),
            "lineage_rows": card_rows(lineage), "hyperparameters": hyperparameter_rows(lineage)}


def trained_with(lineage: Lineage) -> str | None:
    """"SFT (trl)": the method and library, for the card's first sentence."""
    method, library = lineage.fields["trainer"], lineage.fields["trainer_library"]
    if method is None:
        return None
    return f"{str(method).upper()}" + (f" ({library})" if library is not None else "")
