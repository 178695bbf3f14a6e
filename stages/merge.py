"""Merge a LoRA adapter into its base model, streaming (the ``merge`` stage).

Reads:  ``--adapter`` (a peft adapter folder, with the tokenizer, chat template
        and generation config if the trainer saved them) and ``--base`` (16-bit;
        default: the trainer's ``base_model.path``, else the adapter's base).
Writes: ``--out``: ``model-0000i-of-0000n.safetensors`` + index, config.json (no
        quantization_config; vocab_size, tie_word_embeddings updated), tokenizer,
        chat template, generation config.  Atomically.

Memory stays flat: each merge thread holds one chunk of one tensor.  Untouched
tensors are copied in the kernel; merged ones pass through fp32 a few rows at
a time (stages/lora_math.py); every tensor is written at its planned offset, so
the threads (one per core) never wait for each other's order.
"""

from __future__ import annotations

import argparse
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

import psutil
from tqdm import tqdm

from stages import atomic, llamacpp
from stages.cli import add_common, exit_now, progress_enabled, run_main
from stages.errors import ReleaseError
from stages.lora import (CHUNK_ELEMENTS, EMBED, LM_HEAD, MergePlan, OutTensor, load_adapter,
                         plan_merge)
from stages.params import load_params
from stages.safetensors_io import (DEFAULT_MAX_SHARD_SIZE, Reader, ShardWriter, TensorSpec,
                                   model_tensors, parse_size, plan_shards)

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
    if not path.is_file():
        raise ReleaseError(f"base model folder {base} has no config.json; is --base right?")
    config = json.loads(path.read_text())
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
    template_src = adapter if any((adapter / f).is_file() for f in TEMPLATE_FILES) else tokenizer_src
    chosen = {f: tokenizer_src / f for f in TOKENIZER_FILES if (tokenizer_src / f).is_file()}
    chosen |= {f: template_src / f for f in TEMPLATE_FILES if (template_src / f).is_file()}
    found = [src / GENERATION_CONFIG for src in (adapter, base) if (src / GENERATION_CONFIG).is_file()]
    return chosen | ({GENERATION_CONFIG: found[0]} if found else {})


def merged_config(config: dict, plan: MergePlan) -> dict:
    """config.json of the merged model."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config |= {"vocab_size": plan.vocab_size} if plan.vocab_size is not None else {}
    return config | ({"tie_word_embeddings": False} if plan.untied else {})


def check_resources(*, need_disk: int, free_disk: int, need_ram: int, free_ram: int,
                    out: Path) -> None:
    """Refuse to start a merge that cannot finish."""
    if need_disk > free_disk:
        raise ReleaseError(f"not enough disk for {out}: the merged model needs {need_disk / 1e9:.2f}"
                           f" GB, {free_disk / 1e9:.2f} GB are free; free space or use another --out")
    if need_ram > free_ram:
        raise ReleaseError(f"not enough memory: the merge needs {need_ram / 1e9:.2f} GB (largest "
                           f"LoRA pair + buffers), {free_ram / 1e9:.2f} GB are available")


def _preflight(plan: MergePlan, files: dict[str, Path], out: Path, shards: int,
               threads: int) -> None:
    existing = next(p for p in [out.resolve(), *out.resolve().parents] if p.exists())
    # 1 MiB per shard for its JSON header (a few KB per hundred tensors).
    need_disk = sum(TensorSpec(t.name, t.dtype, t.shape).nbytes for t in plan.tensors) \
        + shards * 2**20 + sum(p.stat().st_size for p in files.values())
    pairs = [t.lora.a.numel + t.lora.b.numel for t in plan.tensors if t.lora is not None]
    # Per thread: one LoRA pair in fp32 (and its transpose), fp32 work + in/out chunks.
    need_ram = PROCESS_RAM + threads * (8 * max(pairs, default=0) + 3 * 4 * CHUNK_ELEMENTS)
    check_resources(need_disk=need_disk, free_disk=shutil.disk_usage(existing).free,
                    need_ram=need_ram, free_ram=psutil.virtual_memory().available, out=out)


class _Stop(Exception):
    """Another merge thread failed: this one stops at its next chunk."""


def default_threads() -> int:
    """One merge thread per CPU core this process may use, at most MAX_THREADS."""
    return min(MAX_THREADS, llamacpp.threads())


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
                module = importlib.import_module("stages.lora_math")
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


def run(*, base: Path | None, adapter: Path, out: Path,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, threads: int | None = None) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write the model folder ``out``."""
    start = time.monotonic()
    threads = threads or default_threads()
    shard_cap = parse_size(max_shard_size)
    lora = load_adapter(adapter)
    base = base or resolve_base(lora.config.get("base_model_name_or_path"))
    config = read_base_config(base)
    tensors = model_tensors(base)
    tied = bool(config.get("tie_word_embeddings")) or (LM_HEAD not in tensors and EMBED in tensors)
    plan = plan_merge(tensors, lora, tied=tied)
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
    merged = sum(t.lora is not None or t.lora_bias is not None for t in plan.tensors)
    copied = sum(t.copied and t.source.path.parent != lora.path for t in plan.tensors)
    result = MergeResult(out=out, base=base, shards=tuple(writer.names), merged=merged,
                         replaced=len(plan.tensors) - merged - copied, copied=copied,
                         untied=plan.untied, vocab_size=plan.vocab_size,
                         total_bytes=writer.total_size, seconds=time.monotonic() - start)
    log.info("wrote %s: %d merged, %d replaced, %d copied tensors, %.2f GB in %.1f s", out,
             merged, result.replaced, copied, result.total_bytes / 1e9, result.seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.merge", description=(
        "Merge a LoRA adapter into its 16-bit base model, one tensor at a time: memory stays "
        "flat whatever the model size, every merged weight is W + scale·B@A computed in fp32 and "
        "rounded once, untouched tensors are copied byte for byte."), epilog=(
        "The base is, in order: --base; the trainer's base_model.path in params.yaml "
        "(--trainer); the adapter's base_model_name_or_path if it is a local folder or in the "
        "Hugging Face cache (Unsloth's `-bnb-4bit` names are mapped to the 16-bit model)."))
    parser.add_argument("--adapter", type=Path, help="peft adapter folder (or see --trainer)")
    parser.add_argument("--base", type=Path, help="16-bit base model folder (see below)")
    parser.add_argument("--out", type=Path, required=True, help="merged model folder to write")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="cap on each safetensors shard, e.g. 1GB, 500MB (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="merge threads; each reads, computes and writes its own tensors "
                        "(default: the CPU cores available, at most %d: %%(default)s)" % MAX_THREADS)
    parser.add_argument("--backend", choices=("ours", "unsloth"), default="ours",
                        help="`unsloth` calls Unsloth's merge (needs unsloth and CUDA)")
    parser.add_argument("--trainer", help="trainer key in --params: default adapter and base")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    add_common(parser)
    args = parser.parse_args(argv)

    def body() -> object:
        adapter, base = args.adapter, args.base
        if args.trainer:
            trainer = load_params(args.params).trainer(args.trainer)
            adapter = adapter or trainer.adapter
            base = base or trainer.base_model.path
        if adapter is None:
            raise ReleaseError("pass --adapter DIR (or --trainer KEY to take it from params.yaml)")
        if args.backend == "unsloth":
            return run_unsloth(base=base, adapter=adapter, out=args.out)
        if args.threads < 1:
            raise ReleaseError(f"--threads must be 1 or more, not {args.threads}")
        return run(base=base, adapter=adapter, out=args.out, max_shard_size=args.max_shard_size,
                   threads=args.threads)

    return run_main(args, body)


if __name__ == "__main__":
    exit_now(main())
