"""Splitting a GGUF into shards with the pinned ``llama-gguf-split``.

llama.cpp loads a split model from its first shard and finds the others beside
it by name: ``<prefix>-00001-of-00003.gguf`` (``llama_split_path`` in
``src/llama.cpp``: ``"%s-%05d-of-%05d.gguf"``).  Splitting is tensor-level: each
shard holds whole tensors and the first also the metadata.  The plan here
predicts the tool's shards (how many, their names) from the tensor sizes, so
the names are known before the tool runs and checked after it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ReleaseError, ToolError
from stages.core.preflight import check_disk
from stages.llamacpp.gguf_meta import open_reader
from stages.llamacpp.tools import run_tool, tool_path

log = logging.getLogger(__name__)

# Shard file names, as llama_split_path() writes them (src/llama.cpp, llama-cpp-python 0.3.36).
SHARD_NAME = "{prefix}-{index:05d}-of-{count:05d}.gguf"
# gguf-split.cpp pads each tensor to GGUF_DEFAULT_ALIGNMENT (ggml/include/gguf.h) when it
# sums a shard's size; the metadata is not counted.
ALIGNMENT = 32
# gguf-split.cpp's split_str_to_n_bytes: "M" is 1000*1000 bytes, "G" 1000*1000*1000.
MEGABYTE = 1000**2


@dataclass(frozen=True)
class SplitPlan:
    """One GGUF as published: whole (one file) or in shards."""

    source: Path
    prefix: str  # ``<name>-<LEVEL>``
    files: tuple[str, ...]  # ``<prefix>.gguf``, or the shard names in order

    @property
    def split(self) -> bool:
        """Whether the GGUF is published in shards."""
        return len(self.files) > 1


def shard_names(prefix: str, count: int) -> tuple[str, ...]:
    """llama.cpp's names of the ``count`` shards of ``<prefix>``."""
    return tuple(SHARD_NAME.format(prefix=prefix, index=i, count=count)
                 for i in range(1, count + 1))


def count_shards(tensor_bytes: Sequence[int], max_bytes: int) -> int:
    """How many shards ``llama-gguf-split --split-max-size`` makes, as gguf-split.cpp counts.

    Its ``split_strategy``: tensors in file order, each padded to 32 bytes; a new shard
    starts when the next tensor would take the current one over ``max_bytes`` (a tensor
    bigger than that gets a shard of its own).  The check runs for the first tensor too,
    and the tool refuses the tensor-less first shard that leaves ("one of splits have 0
    tensors"): so do we, before running it.
    """
    padded = [-(-size // ALIGNMENT) * ALIGNMENT for size in tensor_bytes]
    if padded and padded[0] > max_bytes:
        raise ReleaseError(f"llama-gguf-split cannot split at {max_bytes} bytes: the first "
                           f"tensor alone is {padded[0]} bytes and it refuses a first shard "
                           "without tensors; raise `split_max_size`")
    shards, current = 1, 0
    for size in padded:
        if current + size > max_bytes:
            shards, current = shards + 1, size
        else:
            current += size
    return shards


def plan_files(*, prefix: str, file_bytes: int, tensor_bytes: Sequence[int], max_bytes: int,
               keep_whole: bool = False) -> tuple[str, ...]:
    """The files one GGUF is published as: split when it is over ``max_bytes``.

    ``keep_whole`` (Ollama's level: it cannot import split GGUFs) keeps it one file; so
    does a file whose tensors fit in one shard (only its metadata takes it over).
    """
    whole = (f"{prefix}.gguf",)
    if keep_whole or file_bytes <= max_bytes:
        return whole
    count = count_shards(tensor_bytes, max_bytes)
    return whole if count == 1 else shard_names(prefix, count)


def tensor_sizes(path: Path) -> list[int]:
    """Bytes of each tensor of a GGUF, in file order (only the header is read)."""
    return [int(t.n_bytes) for t in open_reader(path).tensors]


def plan_split(*, source: Path, prefix: str, max_bytes: int,
               keep_whole: bool = False) -> SplitPlan:
    """Plan how ``source`` is published (its tensors are read only when it is too big)."""
    size = source.stat().st_size
    big = size > max_bytes and not keep_whole
    files = plan_files(prefix=prefix, file_bytes=size, max_bytes=max_bytes,
                       tensor_bytes=tensor_sizes(source) if big else (), keep_whole=keep_whole)
    return SplitPlan(source=source, prefix=prefix, files=files)


def split_size_arg(max_bytes: int) -> str:
    """``--split-max-size`` for ``max_bytes`` (a whole number of megabytes)."""
    if max_bytes <= 0 or max_bytes % MEGABYTE:
        raise ValueError(f"split size {max_bytes} is not a positive whole number of megabytes")
    return f"{max_bytes // 1000**3}G" if max_bytes % 1000**3 == 0 else f"{max_bytes // MEGABYTE}M"


def split_gguf(plan: SplitPlan, *, out_dir: Path, max_bytes: int,
               llama_cpp_version: str) -> list[Path]:
    """Write the shards of ``plan`` into ``out_dir`` with llama-gguf-split; return them.

    ``out_dir`` is the caller's temp folder, so a failed split leaves nothing behind
    once the caller discards it.  The shards the tool wrote must be the planned ones.
    """
    if not plan.split:
        raise ValueError(f"{plan.source} is planned whole; there is nothing to split")
    tool = tool_path("llama-gguf-split", llama_cpp_version)
    check_disk(out_dir / plan.files[0], plan.source.stat().st_size)  # a copy, tensor by tensor
    cmd = [str(tool), "--split", "--split-max-size", split_size_arg(max_bytes),
           str(plan.source), str(out_dir / plan.prefix)]
    log.info("splitting %s into %d shards", plan.source.name, len(plan.files))
    res = run_tool(cmd)
    if res.returncode != 0:
        raise ToolError(f"llama-gguf-split failed on {plan.source} (exit {res.returncode}):\n"
                        f"{res.tail(12)}")
    written = sorted(p.name for p in out_dir.glob(f"{plan.prefix}-*-of-*.gguf"))
    if written != sorted(plan.files):
        raise ToolError(f"llama-gguf-split wrote {written or 'no shards'} for {plan.source}, "
                        f"expected {list(plan.files)}; is the llama.cpp build "
                        f"{llama_cpp_version} the one this pipeline pins?")
    return [out_dir / name for name in plan.files]
