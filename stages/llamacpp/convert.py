"""HF model folder -> one full-precision GGUF, with the pinned llama.cpp's converter.

The vendored ``convert_hf_to_gguf.py`` runs in a subprocess from its own tree,
so it uses its own matching gguf-py.  GGUF metadata (general.name, license,
tags, base model) comes from our params through its ``--metadata`` override
file, never from folder names or the machine (:func:`gguf_metadata`).  A
trainer's ``chat_template`` / ``eos_token`` overrides are applied before
conversion: the script reads a folder of links to the merged model whose
tokenizer files carry them (:func:`model_view`).

The trainer's base model is converted the same way (``base_only``): named after
the base, none of the trainer's metadata or overrides; the reference stage
measures the adapter's effect against it.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.config.params import Trainer
from stages.core import atomic
from stages.core.errors import InputError, ReleaseError, ToolError
from stages.core.preflight import check_disk
from stages.core.process import dies_with_parent
from stages.llamacpp.tools import source_dir

log = logging.getLogger(__name__)

# A GGUF is about the size of the safetensors it comes from (same 16-bit
# weights plus a small header); ask for 10% more free disk to be safe.
DISK_MARGIN = 1.10
HUB = "https://huggingface.co"
# general.* keys gguf-py would otherwise derive from the model folder: Metadata.load
# (gguf-py/gguf/metadata.py, apply_metadata_heuristic) takes organization and version
# from config.json's `_name_or_path` when it has at most one "/" (a relative folder such
# as `alice/checkpoint-500` included) and from the folder's name.  A null in the override
# file leaves them unset.  The rest it derives only from the model card, which is ours
# (model_view), or from parameter counts (size_label).
UNSET: tuple[str, ...] = ("general.organization", "general.version")
# Where gguf-py's SpecialVocab reads the chat template and special tokens
# (gguf-py/gguf/vocab.py, _try_load_from_tokenizer_json); tokenizer_config.json
# wins over the other two.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer_config.json", "chat_template.jinja",
                                    "chat_template.json")


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    bytes: int


def gguf_metadata(trainer: Trainer) -> dict:
    """The metadata override that convert_hf_to_gguf.py applies (gguf-py keys): our params
    only, and null for the keys it would derive from folder names (:data:`UNSET`)."""
    org, _, base_name = trainer.base_model.id.rpartition("/")
    base = {"name": base_name, "repo_url": f"{HUB}/{trainer.base_model.id}"}
    if org:
        base["organization"] = org
    return {
        "general.name": trainer.name,
        "general.basename": trainer.name,
        "general.finetune": trainer.key,
        "general.license": trainer.license,
        "general.tags": list(trainer.tags),
        "general.base_models": [base],
        "general.quantized_by": "llm-release",
    } | dict.fromkeys(UNSET)


def base_metadata(trainer: Trainer) -> dict:
    """The metadata override of the trainer's base model's GGUF: its name, nothing of ours."""
    name = trainer.base_model.id.rpartition("/")[2]
    return {"general.name": name, "general.basename": name,
            "general.quantized_by": "llm-release"} | dict.fromkeys(UNSET)


def check_tokenizer(model: Path) -> None:
    """The converter needs the tokenizer's vocabulary: refuse a folder without a readable one."""
    vocab = [model / "tokenizer.json", model / "tokenizer.model", model / "vocab.json"]
    found = [p for p in vocab if p.exists()]
    fix = ("the merge copies the tokenizer from the adapter folder, else from the base: save it "
           "with the adapter (tokenizer.save_pretrained(final_model)) or keep the base's "
           "tokenizer files in its folder, then `dvc repro`")
    if not found:
        raise InputError(f"{model} has no tokenizer (tokenizer.json, tokenizer.model or "
                         f"vocab.json); {fix}")
    config = model / "tokenizer_config.json"
    for path in [*found, *([config] if config.exists() else [])]:
        try:
            data = path.read_bytes()
            if path.suffix == ".json":
                json.loads(data)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not readable ({exc}); {fix}") from None


def model_bytes(model: Path) -> int:
    """Bytes of the weights in a model folder."""
    files = list(model.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model} holds no *.safetensors; is it a merged model folder?")
    return sum(f.stat().st_size for f in files)


def special_tokens(model: Path) -> set[str]:
    """Texts of the added (special) tokens in ``model``'s tokenizer.json, if it has one."""
    path = model / "tokenizer.json"
    if not path.is_file():
        return set()
    return {t.get("content") for t in json.loads(path.read_text()).get("added_tokens", [])}


def override_tokenizer(model: Path, view: Path, trainer: Trainer) -> None:
    """Write the trainer's chat_template / eos_token overrides into ``view``'s tokenizer files."""
    known = special_tokens(model)
    if trainer.eos_token is not None and known and trainer.eos_token not in known:
        raise ReleaseError(
            f"`trainers.{trainer.key}.eos_token` is {trainer.eos_token!r}, which is not a special "
            f"token of {model / 'tokenizer.json'}; pick one of {', '.join(sorted(known)[:8])}")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if trainer.chat_template is not None:
        config["chat_template"] = trainer.chat_template
        (view / "chat_template.jinja").write_text(trainer.chat_template)
    if trainer.eos_token is not None:
        config["eos_token"] = trainer.eos_token
    (view / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    log.info("applied params overrides of trainer %s: %s", trainer.key,
             ", ".join(k for k in ("chat_template", "eos_token") if getattr(trainer, k)))


def model_view(model: Path, view: Path, trainer: Trainer, *, base_only: bool = False) -> Path:
    """``view``: links to every file of ``model`` plus a README.md holding our license,
    and the tokenizer files with the trainer's overrides when params set them.

    gguf-py's ``--metadata`` override has no ``general.license`` key: it takes the
    license only from the model card's front matter (gguf-py/gguf/metadata.py,
    ``use_model_card_metadata("license", ...)``), so the view carries a card
    whose front matter says what params say.  ``base_only``: the base as it is, with an
    empty card (no license or tags of the trainer's) and no overrides.
    """
    overridden = not base_only and (trainer.chat_template is not None
                                    or trainer.eos_token is not None)
    replaced = {"README.md"}
    if overridden:
        replaced.add("tokenizer_config.json")
    if overridden and trainer.chat_template is not None:
        replaced.update(TOKENIZER_FILES)
    view.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        if item.name not in replaced:
            (view / item.name).symlink_to(item.resolve())
    card = yaml.safe_dump({} if base_only else {"license": trainer.license,
                                                "tags": list(trainer.tags),
                                                "base_model": trainer.base_model.id},
                          sort_keys=False)
    (view / "README.md").write_text(f"---\n{card}---\n")
    if overridden:
        override_tokenizer(model, view, trainer)
    return view


def supported_architectures(llama_cpp_version: str) -> frozenset[str] | None:
    """The HF architectures the pinned converter knows (``TEXT_MODEL_MAP`` in its
    conversion/__init__.py); None when that file is not laid out so (other versions)."""
    try:
        path = source_dir(llama_cpp_version) / "conversion" / "__init__.py"
        block = path.read_text().split("TEXT_MODEL_MAP", 1)[1].split("}", 1)[0]
    except (ToolError, OSError, IndexError):  # no tools yet: convert says so itself
        return None
    names = frozenset(re.findall(r'"(\w+)"\s*:', block))
    return names or None


def model_architecture(config: dict) -> str | None:
    """The architecture the converter reads: the text model's, else the first listed."""
    for source in (config.get("text_config") or {}, config):
        archs = source.get("architectures") or []
        if archs:
            return archs[0]
    return None


def check_architecture(model: Path, llama_cpp_version: str) -> None:
    """Before any work: refuse an architecture the pinned converter cannot convert."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{model / 'config.json'} is not readable ({exc})") from None
    arch, known = model_architecture(config), supported_architectures(llama_cpp_version)
    if arch is None or known is None or arch in known:
        return
    family = re.sub(r"(For\w+|Model)$", "", arch)
    near = sorted(k for k in known if k.lower().startswith(family.lower()[:4]))[:6]
    raise InputError(
        f"{model}: architecture {arch} is not one the pinned llama.cpp can convert "
        f"(llama-cpp-python {llama_cpp_version}'s convert_hf_to_gguf.py knows {len(known)}"
        + (f", e.g. {', '.join(near)}" if near else "") + "); a newer `llama_cpp.version` may "
        "support it")


def converter_refusal(stderr: str, model: Path, llama_cpp_version: str) -> str | None:
    """One line for the converter's refusals of a tokenizer it cannot read, else None."""
    arch = None
    try:
        arch = model_architecture(json.loads((model / "config.json").read_text()))
    except (OSError, ValueError):
        pass
    pinned = f"the pinned llama.cpp (llama-cpp-python {llama_cpp_version})"
    if "BPE pre-tokenizer was not recognized" in stderr:
        return (f"{model}: {pinned} does not know this tokenizer: convert_hf_to_gguf.py "
                f"identifies a BPE tokenizer ({arch}) by a hash of its output, and this one's "
                "is not in its list (get_vocab_base_pre); use the tokenizer the base model "
                "was published with, or a newer `llama_cpp.version`")
    if re.search(r"(File not found|Missing):? \S*tokenizer\.model", stderr):
        return (f"{model}: {pinned}'s converter for {arch} reads a SentencePiece "
                "tokenizer.model, which this folder lacks (its tokenizer.json alone is not "
                "enough, and the merge found none in the adapter folder or the base): put the "
                "base model's tokenizer.model (from its Hub repo) in the base folder, then "
                "`dvc repro`")
    return None


def convert_to_gguf(*, model: Path, out: Path, trainer: Trainer, outtype: str,
                    llama_cpp_version: str, base_only: bool = False) -> ConvertResult:
    """Write ``out`` (a GGUF of ``outtype``) from the HF folder ``model``: the trainer's
    merged model, or with ``base_only`` its base model."""
    if not (model / "config.json").is_file():
        what = "the base model's folder (trainers.<t>.base_model.path)" if base_only else \
            "a merged model folder"
        raise InputError(f"{model} has no config.json; is it {what}?")
    check_architecture(model, llama_cpp_version)
    check_tokenizer(model)
    script = source_dir(llama_cpp_version) / "convert_hf_to_gguf.py"
    check_disk(out, int(model_bytes(model) * DISK_MARGIN))
    with tempfile.TemporaryDirectory() as tmp_dir, atomic.output_file(out, sync=False) as tmp:
        meta = Path(tmp_dir) / "metadata.json"
        meta.write_text(json.dumps(base_metadata(trainer) if base_only else
                                   gguf_metadata(trainer), indent=2))
        source = model_view(model, Path(tmp_dir) / "model", trainer, base_only=base_only)
        cmd = [sys.executable, str(script), str(source), "--outfile", str(tmp),
               "--outtype", outtype, "--metadata", str(meta)]
        log.info("converting %s to %s GGUF", model, outtype)
        result = subprocess.run(cmd, capture_output=True, text=True, **dies_with_parent())
        if result.returncode != 0:
            known = converter_refusal(result.stderr, model, llama_cpp_version)
            if known:
                raise InputError(known)
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise ToolError(
                f"convert_hf_to_gguf.py failed (exit {result.returncode}) on {model}:\n{tail}"
            )
        log.debug(result.stderr)
    size = out.stat().st_size
    log.info("wrote %s (%.1f MiB)", out, size / 2**20)
    return ConvertResult(out=out, bytes=size)
