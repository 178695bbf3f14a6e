"""One full-precision GGUF -> one quantization level, with llama-quantize.

Besides the GGUF, a ``<LEVEL>.json`` record: bytes, the level's options,
and the tensors where llama.cpp fell back to another type (K-quants need rows
that are a multiple of 256; SmolLM2's 576-wide rows are not), which the card
uses to explain a level that measures worse than a smaller one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.config.params import QuantLevel
from stages.core import atomic
from stages.core.errors import InputError, ReleaseError, ToolError
from stages.core.preflight import check_disk, threads
from stages.llamacpp.gguf_meta import open_reader
from stages.llamacpp.tools import run_tool, tool_path

log = logging.getLogger(__name__)

# llama-quantize warns, per tensor whose row size does not fit the level's
# block size (src/llama-quant.cpp, tensor_type_fallback):
#   "warning: blk.0.attn_k.weight  - ncols    576 not divisible by 256
#    (required for type    q4_K) -> falling back to    q5_0"  (one line)
FALLBACK = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) "
    r"\(required for type\s+(\w+)\).*?-> falling back to\s+(\w+)"
)

# llama-quantize's per-tensor line: "[  12/ 272]  blk.0.attn_k.weight - [576, 192, ...]"
TENSOR_PROGRESS = re.compile(r"^\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\]")


@dataclass(frozen=True)
class Fallback:
    wanted: str
    used: str
    block: int
    tensors: int


@dataclass(frozen=True)
class QuantizeResult:
    level: str
    out: Path
    bytes: int
    fallbacks: tuple[Fallback, ...]


def parse_fallbacks(log_text: str) -> tuple[Fallback, ...]:
    """Count llama-quantize's fallbacks by (wanted type, used type)."""
    counts: dict[tuple[str, str, int], int] = {}
    for _name, _cols, block, wanted, used in FALLBACK.findall(log_text):
        key = (wanted, used, int(block))
        counts[key] = counts.get(key, 0) + 1
    return tuple(Fallback(wanted=w, used=u, block=b, tensors=n)
                 for (w, u, b), n in sorted(counts.items()))


def record_path(out: Path) -> Path:
    """The JSON record written beside a quantized GGUF."""
    return out.with_suffix(".json")


def quantize_gguf(*, source: Path, out: Path, level: QuantLevel,
                  llama_cpp_version: str) -> QuantizeResult:
    """Quantize ``source`` to ``level`` into ``out`` and write its record."""
    if not source.is_file():
        raise InputError(f"input GGUF {source} not found; run the convert stage first")
    tool = tool_path("llama-quantize", llama_cpp_version)
    check_disk(out, source.stat().st_size)
    try:
        open_reader(source)  # the header: a damaged file fails here, in one line
    except ReleaseError as exc:
        raise InputError(f"{exc}; rebuild it with its convert stage "
                         "(dvc repro --force convert@<trainer>)") from None
    with atomic.output_file(out, sync=False) as tmp:
        cmd = [str(tool), *level.quantize_args(), str(source), str(tmp), level.name,
               str(threads())]
        log.info("quantizing %s to %s", source.name, level.name)
        result = run_tool(cmd, progress=TENSOR_PROGRESS, desc=level.name)
        if result.returncode != 0:
            raise ToolError(f"llama-quantize failed (exit {result.returncode}) on {source} for "
                            f"{level.name}; if that GGUF is damaged, rebuild it with its convert "
                            f"stage (dvc repro --force convert@<trainer>):\n{result.tail()}")
    fallbacks = parse_fallbacks(result.output)
    for fb in fallbacks:
        log.warning("%s: %d tensors used %s instead of %s (rows not a multiple of %d)",
                    level.name, fb.tensors, fb.used, fb.wanted, fb.block)
    # No sha256 here: the card hashes what it publishes, and this stage costs what
    # llama-quantize costs (make bench-pipeline).
    res = QuantizeResult(level=level.name, out=out, bytes=out.stat().st_size, fallbacks=fallbacks)
    record = {"level": res.level, "file": out.name, "bytes": res.bytes,
              "options": level.model_dump(), "fallbacks": [asdict(f) for f in fallbacks],
              "llama_cpp": llama_cpp_version}
    atomic.write_text(record_path(out), json.dumps(record, indent=2) + "\n", sync=False)
    log.info("wrote %s (%.1f MiB)", out, res.bytes / 2**20)
    return res
