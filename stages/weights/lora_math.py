"""The merge's arithmetic: merged tensors produced a chunk of rows at a time.

The math follows peft 0.21 (tuners/lora/layer.py, ``Linear.get_delta_weight``;
tuners/lora/variants.py, ``DoraLinearVariant``):

    W' = W + s·(B@A)            s = alpha/r, or alpha/√r with use_rslora
    W' = W + s·(B@A)ᵀ           embeddings and fan_in_fan_out layers
    W' = m/‖W + s·B@A‖ · (W + s·B@A)   DoRA, the norm taken over each row

accumulated in fp32 (``addmm_``) and rounded once to the base dtype.  This is
the only module of the merge that imports torch (~2-4 s), so stages/merge.py
imports it while the untouched tensors are already being copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from stages.core.errors import ReleaseError
from stages.weights.lora import CHUNK_ELEMENTS, OutTensor
from stages.weights.safetensors_io import Reader, TensorInfo

# stages.lora.FLOAT_DTYPES as torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {"BF16": torch.bfloat16, "F16": torch.float16,
                                        "F32": torch.float32, "F64": torch.float64}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Each torch op on the thread that calls it: the merge runs its own threads, and
    torch's OpenMP workers stall ~20x when other threads or processes compete."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Scratch:
    """One thread's reusable buffers, so every chunk touches the same memory pages."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements backed by buffer ``key`` (grown as needed)."""
        need = numel * dtype.itemsize
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < need:
            buf = self._bufs[key] = torch.empty(need, dtype=torch.uint8)
        return buf[:need].view(dtype)


def load_float(reader: Reader, info: TensorInfo) -> torch.Tensor:
    """A small tensor (LoRA A/B, magnitude, bias) as fp32."""
    raw = reader.read(info)
    return torch.frombuffer(raw, dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape).float().clone()


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy())


def _lora_chunks(item: OutTensor, reader: Reader, scratch: Scratch) -> Iterator[memoryview]:
    module = item.lora
    a, b = load_float(reader, module.a), load_float(reader, module.b)
    left, right = (a.t().contiguous(), b.t().contiguous()) if module.transposed else (b, a)
    magnitude = load_float(reader, module.magnitude) if module.magnitude is not None else None
    rows, cols = item.shape
    step = max(1, CHUNK_ELEMENTS // cols)
    src_dtype, out_dtype = TORCH_DTYPES[item.source.dtype], TORCH_DTYPES[item.dtype]
    row_bytes = cols * src_dtype.itemsize
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        raw = scratch.get("in", n * row_bytes, torch.uint8)
        reader.read_into(item.source, _bytes(raw), lo * row_bytes)
        work = scratch.get("work", n * cols, torch.float32).view(n, cols)
        work.copy_(raw.view(src_dtype).view(n, cols))
        work.addmm_(left[lo:lo + n], right, alpha=module.scale)
        if magnitude is not None:
            norm = torch.linalg.vector_norm(work, dim=1)
            work.mul_((magnitude[lo:lo + n] / norm).unsqueeze(1))
        out = scratch.get("out", n * cols, out_dtype)
        out.view(n, cols).copy_(work)
        yield _bytes(out)


def _cast_chunks(item: OutTensor, reader: Reader, scratch: Scratch) -> Iterator[memoryview]:
    src_dtype, out_dtype = TORCH_DTYPES[item.source.dtype], TORCH_DTYPES[item.dtype]
    total = item.source.numel
    for lo in range(0, total, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, total - lo)
        raw = scratch.get("in", n * src_dtype.itemsize, torch.uint8)
        reader.read_into(item.source, _bytes(raw), lo * src_dtype.itemsize)
        out = scratch.get("out", n, out_dtype)
        out.copy_(raw.view(src_dtype))
        yield _bytes(out)


def tensor_chunks(item: OutTensor, reader: Reader, scratch: Scratch) -> Iterator[memoryview]:
    """The bytes of a merged, biased or re-typed tensor, chunk by chunk.

    Each chunk lives in ``scratch`` and is overwritten by the next: the caller
    writes it out before asking for more.
    """
    if item.lora is not None:
        return _lora_chunks(item, reader, scratch)
    if item.lora_bias is not None:
        module = item.lora_bias
        merged = load_float(reader, item.source) + module.scale * load_float(reader, module.bias)
        return iter([_bytes(merged.to(TORCH_DTYPES[item.dtype]))])
    if item.source.dtype not in TORCH_DTYPES or item.dtype not in TORCH_DTYPES:
        raise ReleaseError(f"`{item.name}`: cannot convert {item.source.dtype} to {item.dtype}")
    return _cast_chunks(item, reader, scratch)
