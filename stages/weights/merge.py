"""The streaming LoRA merge engine behind the ``merge`` stage.

Reads a peft adapter folder (with the tokenizer, chat template and generation
config if the trainer saved them) and its 16-bit base; writes the merged model
folder: ``model-0000i-of-0000n.safetensors`` + index, config.json (no
quantization_config; vocab_size, tie_word_embeddings updated), tokenizer, chat
template, generation config.  Atomically.

Memory stays flat: each merge thread holds one chunk of one tensor.  Untouched
tensors are copied in the kernel; merged ones pass through fp32 a few rows at
a time (lora_math.py); every tensor is written at its planned offset, so
the threads (one per core) never wait for each other's order.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from stages.core import atomic
from stages.core.cli import progress_enabled
from stages.core.errors import InputError, ReleaseError
from stages.core.preflight import check_disk_and_ram
from stages.core.preflight import threads as cpu_threads
from stages.weights.layout import model_layout
from stages.weights.lora import (
    CHUNK_ELEMENTS,
    MergePlan,
    OutTensor,
    load_adapter,
    plan_merge,
)
from stages.weights.safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    Reader,
    ShardWriter,
    TensorSpec,
    model_tensors,
    parse_size,
    plan_shards,
)

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"
# Unsloth names its pre-quantized bases `unsloth/<model>-bnb-4bit` or
# `unsloth/<model>-unsloth-bnb-4bit`; `unsloth/<model>` is the 16-bit one.
UNSLOTH_4BIT = re.compile(r"^(?P<id>unsloth/.+?)(?:-unsloth)?-bnb-4bit$")
# The process itself: Python with torch imported measured ~250 MB; rounded up.
PROCESS_RAM = 400 * 2**20
# Merge threads at most (tuned on 2 cores; --threads overrides).
MAX_THREADS = 4


@dataclass(frozen=True)
class MergeResult:
    out: Path
    base: Path
    shards: tuple[str, ...]
    merged: int
    replaced: int
    copied: int
    untied: bool
    vocab_size: int | None
    total_bytes: int
    seconds: float


def sixteen_bit_id(name: str) -> str:
    """``unsloth/X-bnb-4bit`` and ``unsloth/X-unsloth-bnb-4bit`` → ``unsloth/X``."""
    match = UNSLOTH_4BIT.match(name)
    return match["id"] if match else name


def resolve_base(name: str | None) -> Path:
    """The local folder of the adapter's base: a path, or a cached Hub snapshot."""
    if not name:
        raise ReleaseError("the adapter names no base_model_name_or_path; pass --base DIR")
    wanted = sixteen_bit_id(name)
    if Path(wanted).is_dir():
        return Path(wanted)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(wanted, local_files_only=True))
    except (OSError, ValueError):
        mapped = f" (its 16-bit base is `{wanted}`)" if wanted != name else ""
        raise ReleaseError(
            f"the adapter's base `{name}`{mapped} is neither a local folder nor in the Hugging "
            f"Face cache; download `{wanted}` and pass --base DIR, or set the trainer's "
            "`base_model.path` in params.yaml") from None


def read_base_config(base: Path) -> dict:
    """The base's config.json; a quantized base is refused."""
    path = base / "config.json"
    where = "--base or the trainer's `base_model.path` in params.yaml"
    if not base.is_dir():
        raise InputError(f"base model folder {base} does not exist; point {where} at the "
                         "folder of the 16-bit base model")
    if not path.is_file():
        raise InputError(f"base model folder {base} has no config.json (a Hugging Face model "
                         f"folder has one); point {where} at the whole model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); copy the base model's "
                         "config.json again") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object; copy the base model's config.json again")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ReleaseError(
            f"base {base} is quantized ({method}); merging into quantized weights loses the "
            f"adapter's precision. Use the 16-bit base instead (for Unsloth's `<model>-bnb-4bit` "
            "that is `unsloth/<model>`) via --base or the trainer's `base_model.path`")
    return config


def side_files(base: Path, adapter: Path) -> dict[str, Path]:
    """Tokenizer, chat template and generation config: the adapter run's if saved."""
    tokenizer_src = adapter if any((adapter / f).is_file() for f in TOKENIZER_FILES) else base
    template_src = (adapter if any((adapter / f).is_file() for f in TEMPLATE_FILES)
                    else tokenizer_src)
    chosen = {f: tokenizer_src / f for f in TOKENIZER_FILES if (tokenizer_src / f).is_file()}
    # A run's tokenizer saved by transformers 5 is tokenizer.json alone, while llama.cpp's
    # converters for SentencePiece families (Gemma, Llama 2, Phi-3) read tokenizer.model:
    # the base's then. Tokens the run added are in tokenizer.json, which the converter
    # reads too; reference's tokenizer parity proves the two agree.
    if "tokenizer.model" not in chosen and (base / "tokenizer.model").is_file():
        chosen["tokenizer.model"] = base / "tokenizer.model"
    chosen |= {f: template_src / f for f in TEMPLATE_FILES if (template_src / f).is_file()}
    found = [src / GENERATION_CONFIG for src in (adapter, base)
             if (src / GENERATION_CONFIG).is_file()]
    return chosen | ({GENERATION_CONFIG: found[0]} if found else {})


def with_added_tokens(folder: Path) -> None:
    """Give a SentencePiece tokenizer's tokenizer_config.json the ``added_tokens_decoder``
    that transformers 5 no longer writes there (only in tokenizer.json).

    llama.cpp's converter for Gemma (``_create_vocab_sentencepiece``) marks a token
    special from that key alone: without it, ``<start_of_turn>`` becomes a plain piece that
    llama.cpp never parses from a chat prompt (reference's tokenizer parity saw it).
    """
    config_file, tokenizer_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not ((folder / "tokenizer.model").is_file() and config_file.is_file()
            and tokenizer_file.is_file()):
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens") or []
    if config.get("added_tokens_decoder") or not added:
        return
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    config["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in keys if k in t}
                                      for t in added}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")


def merged_config(config: dict, plan: MergePlan) -> dict:
    """config.json of the merged model.

    An untied model says ``tie_word_embeddings: false`` explicitly: left out, it
    means the architecture's default, which is True for GPT-2, Bloom, Falcon, OPT.
    """
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config |= {"vocab_size": plan.vocab_size} if plan.vocab_size is not None else {}
    if not plan.untied:
        return config
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        config["text_config"] = text | {"tie_word_embeddings": False}
    return config | {"tie_word_embeddings": False}


def _preflight(plan: MergePlan, files: dict[str, Path], out: Path, shards: int,
               threads: int) -> None:
    # 1 MiB per shard for its JSON header (a few KB per hundred tensors).
    need_disk = sum(TensorSpec(t.name, t.dtype, t.shape).nbytes for t in plan.tensors) \
        + shards * 2**20 + sum(p.stat().st_size for p in files.values())
    pairs = [t.lora.a.numel + t.lora.b.numel for t in plan.tensors if t.lora is not None]
    # Per thread: one LoRA pair in fp32 (and its transpose), fp32 work + in/out chunks.
    need_ram = PROCESS_RAM + threads * (8 * max(pairs, default=0) + 3 * 4 * CHUNK_ELEMENTS)
    check_disk_and_ram(out, need_disk=need_disk, need_ram=need_ram)


class _Stop(Exception):
    """Another merge thread failed: this one stops at its next chunk."""


def default_threads() -> int:
    """One merge thread per CPU core this process may use, at most MAX_THREADS."""
    return min(MAX_THREADS, cpu_threads())


def work_order(plan: MergePlan, writer: ShardWriter) -> list[OutTensor]:
    """The order tensors are handed to the merge threads.

    Untouched tensors first (kernel copies that need no torch).  Then computed
    ones, largest first so the threads finish together, taking turns between
    shards: a file takes one write at a time, so threads on different shards
    do not wait for each other.
    """
    turns: dict[int, int] = collections.Counter()
    computed = []
    for item in sorted((t for t in plan.tensors if not t.copied), key=lambda t: -t.source.nbytes):
        shard = writer.shard_of(item.name)
        computed.append((turns[shard], shard, item))
        turns[shard] += 1
    computed.sort(key=lambda turn: turn[:2])
    return [t for t in plan.tensors if t.copied] + [item for *_, item in computed]


def write_weights(writer: ShardWriter, reader: Reader, plan: MergePlan, *, threads: int) -> None:
    """Fill the shards with every planned tensor, on ``threads`` threads.

    Each thread takes the next tensor in :func:`work_order` and reads, computes
    and writes it: on two cores one computes while the other is in the kernel
    writing.  This thread imports torch meanwhile (2-4 s), while the first
    tensors, kernel copies, are already being written.
    """
    work = collections.deque(work_order(plan, writer))
    failures: list[BaseException] = []
    math: list[ModuleType] = []
    math_ready = threading.Event()
    bar = tqdm(total=writer.total_size, desc="merge", unit="B", unit_scale=True, leave=False,
               disable=not progress_enabled())
    bar_lock = threading.Lock()

    def advance(nbytes: int) -> None:
        if failures:
            raise _Stop
        with bar_lock:
            bar.update(nbytes)

    def counted(chunks: Iterator[memoryview]) -> Iterator[memoryview]:
        for chunk in chunks:
            yield chunk
            advance(chunk.nbytes)  # after the writer wrote it

    def worker() -> None:
        scratch = None
        try:
            while not failures:
                try:
                    item = work.popleft()
                except IndexError:
                    return
                if item.copied:
                    writer.copy(item.name, item.source, reader)
                    advance(item.source.nbytes)
                    continue
                math_ready.wait()
                if not math:
                    return  # importing torch failed; the main thread reports it
                scratch = scratch or math[0].Scratch()
                writer.write(item.name, counted(math[0].tensor_chunks(item, reader, scratch)))
        except _Stop:
            pass
        except BaseException as exc:
            failures.append(exc)

    pool = [threading.Thread(target=worker, name=f"merge-{i}", daemon=True)
            for i in range(threads)]
    for thread in pool:
        thread.start()
    try:
        with contextlib.ExitStack() as stack:
            try:
                module = importlib.import_module("stages.weights.lora_math")
                stack.enter_context(module.one_thread())
                math.append(module)
            finally:
                math_ready.set()
            for thread in pool:
                thread.join()
    except BaseException as exc:
        failures.append(exc)  # the threads stop at their next chunk
        for thread in pool:
            thread.join()
        raise
    finally:
        bar.close()
    if failures:
        raise failures[0]
    writer.finish()


def run_unsloth(*, base: Path | None, adapter: Path, out: Path) -> None:
    """Unsloth's own merge (GPU only); optional, never the default."""
    base = base or resolve_base(load_adapter(adapter).config.get("base_model_name_or_path"))
    if importlib.util.find_spec("unsloth") is None:
        raise ReleaseError("--backend unsloth needs the optional `unsloth` package (pip install "
                           "'.[unsloth]', CUDA only); the default backend needs neither")
    import torch

    if not torch.cuda.is_available():
        raise ReleaseError("--backend unsloth needs a CUDA GPU and none is visible; use the "
                           "default backend (--backend ours)")
    from peft import PeftModel
    from unsloth import FastLanguageModel  # imported only here: it patches transformers

    model, tokenizer = FastLanguageModel.from_pretrained(str(base), load_in_4bit=False)
    model = PeftModel.from_pretrained(model, str(adapter))
    with atomic.output_dir(out) as tmp:
        model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")


def merge_adapter(*, base: Path | None, adapter: Path, out: Path,
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  threads: int | None = None) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write the model folder ``out``."""
    start = time.monotonic()
    threads = threads or default_threads()
    shard_cap = parse_size(max_shard_size)
    lora = load_adapter(adapter)
    base = base or resolve_base(lora.config.get("base_model_name_or_path"))
    config = read_base_config(base)
    tensors = model_tensors(base)
    plan = plan_merge(tensors, lora, model_layout(base, config, tensors, lora))
    files = side_files(base, adapter)
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    _preflight(plan, files, out, len(plan_shards(specs, shard_cap)), threads)
    # Like save_pretrained and cp, the shards are not fsynced (it would tie the merge to the
    # disk's speed), so neither is the rename (see atomic.output_dir).
    with atomic.output_dir(out, sync=False) as tmp:
        log.info("merging %s into %s: %d LoRA tensors, %d whole tensors", adapter, base,
                 len(lora.modules), len(lora.tensors))
        with Reader() as reader, ShardWriter(tmp, specs, max_shard_size=shard_cap) as writer:
            write_weights(writer, reader, plan, threads=threads)
        (tmp / "config.json").write_text(json.dumps(merged_config(config, plan), indent=2) + "\n")
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        with_added_tokens(tmp)
    merged = sum(t.lora is not None or t.lora_bias is not None for t in plan.tensors)
    copied = sum(t.copied and t.source.path.parent != lora.path for t in plan.tensors)
    result = MergeResult(out=out, base=base, shards=tuple(writer.names), merged=merged,
                         replaced=len(plan.tensors) - merged - copied, copied=copied,
                         untied=plan.untied, vocab_size=plan.vocab_size,
                         total_bytes=writer.total_size, seconds=time.monotonic() - start)
    log.info("wrote %s: %d merged, %d replaced, %d copied tensors, %.2f GB in %.1f s", out,
             merged, result.replaced, copied, result.total_bytes / 1e9, result.seconds)
    return result
