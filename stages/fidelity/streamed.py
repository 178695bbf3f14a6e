"""A transformers causal LM whose weights stay in their safetensors files.

The fidelity checks run the merged model (and, for the adapter's effect, its
base) in fp32 on CPU.  Loaded whole that is 4 bytes per parameter per model:
12 GB for the two models of a 1.1B, 70 GB at 8B.  Here the model is built on
the meta device (no weights), and each module's own parameters are read from
the safetensors files, in fp32, just before the module runs; after it ran they
are dropped again, unless the model's resident budget
(``$LLM_RELEASE_HF_RESIDENT_MB``, 1024 by default) still has room, in which
case they stay for the next pass.  Peak memory is the budget plus one module's
weights in fp32 plus activations, whatever the model size.  A model that fits
in the budget (the 135M demo: 0.54 GB) is read once and runs as fast as one
loaded whole.  A vocabulary-sized weight bigger than 256 MB in fp32 (Llama 3's
head is 2.1 GB) is never held whole, resident or not: the input embedding reads
the rows of the tokens it is given, and the output head computes the logits
64 MB of rows at a time (each logit is the same dot product, which BLAS may sum
in another order: equal to a whole-matrix matmul up to fp32 rounding).

The values are the same as ``from_pretrained(..., dtype=float32)``'s: each
tensor is the checkpoint's, converted to fp32, and the same modules run in the
same order.  A model this cannot stream (a parameter with no tensor in the
files, a module that reads another's weights) is loaded whole instead, with a
warning saying how much memory that takes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.weights.safetensors_io import Reader, TensorInfo, model_tensors

log = logging.getLogger(__name__)

# Per model: the fp32 weights kept between passes (MiB).  Two models (merged and base)
# run side by side in the adapter-effect check.  It changes speed, never a figure, so it
# is an environment setting and not a DVC param: more on a big machine, 0 to stream all.
RESIDENT_ENV = "LLM_RELEASE_HF_RESIDENT_MB"
RESIDENT_MB = 1024


# A vocabulary-sized weight above this (fp32 bytes) is never held whole: the input
# embedding reads only the rows of the tokens it is given, the output head computes the
# logits a block of rows at a time (Llama 3's 128k × 4096 head is 2.1 GB in fp32).
VOCAB_WHOLE_MAX = 256 << 20
HEAD_BLOCK_BYTES = 64 << 20


def resident_bytes() -> int:
    """The budget: ``$LLM_RELEASE_HF_RESIDENT_MB`` or 1024 MiB."""
    from stages.core.errors import ReleaseError

    text = os.environ.get(RESIDENT_ENV, str(RESIDENT_MB))
    if not text.strip().isdigit():
        raise ReleaseError(f"{RESIDENT_ENV}={text!r} is not a whole number of MiB; "
                           f"unset it (default {RESIDENT_MB}) or write e.g. 2048")
    return int(text) << 20


class _Streamer:
    """Forward hooks that give each module its weights for the time it runs."""

    def __init__(self, sources: Sources,
                 resident_bytes: int, reader: Reader) -> None:
        self.sources = sources  # id(module) -> [(parameter name, its tensor in the files)]
        self.budget, self.resident = resident_bytes, 0
        self.kept: set[int] = set()
        self.kept_tensors: dict[str, object] = {}  # a tied tensor kept once, for each module
        self.reader = reader
        self.meta: dict[int, dict[str, object]] = {}  # the meta parameters to put back
        self.bytes_read = 0

    def _tensor(self, info: TensorInfo):
        """The tensor in fp32, read with pread (no mmap: file pages would count as ours)."""
        import torch

        from stages.weights.lora_math import TORCH_DTYPES

        if info.dtype not in TORCH_DTYPES:
            raise ValueError(f"`{info.name}` is {info.dtype}, not a float type")
        raw = self.reader.read(info)
        self.bytes_read += info.nbytes
        return torch.frombuffer(raw, dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape).float()

    def rows(self, info: TensorInfo, ids):
        """Rows ``ids`` (sorted, unique) of a 2-D tensor, in fp32."""
        import torch

        from stages.weights.lora_math import TORCH_DTYPES

        dtype, width = TORCH_DTYPES[info.dtype], info.shape[1]
        row_bytes = width * dtype.itemsize
        out = torch.empty((len(ids), width), dtype=dtype)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        for i, row in enumerate(ids.tolist()):
            self.reader.read_into(info, view[i * row_bytes:(i + 1) * row_bytes], row * row_bytes)
        self.bytes_read += len(ids) * row_bytes
        return out.float()

    def embed_rows(self, module, args):
        """Forward pre-hook of a big input embedding: the rows of the tokens given, and the
        tokens renumbered into them."""
        import torch

        (ids, *rest) = args
        unique, local = torch.unique(ids, sorted=True, return_inverse=True)
        (pname, info), = self.sources[id(module)]
        self.meta[id(module)] = {pname: module._parameters[pname]}
        module._parameters[pname] = torch.nn.Parameter(self.rows(info, unique),
                                                       requires_grad=False)
        return (local, *rest)

    def drop(self, module, args, output) -> None:
        module._parameters.update(self.meta.pop(id(module)))

    def head_forward(self, module, info: TensorInfo, bias: TensorInfo | None):
        """A big output head's forward: the logits a block of vocabulary rows at a time."""
        import torch

        rows = max(1, HEAD_BLOCK_BYTES // (info.shape[1] * 4))
        b = self._tensor(bias) if bias is not None else None

        def forward(x):
            parts = []
            for lo in range(0, info.shape[0], rows):
                ids = torch.arange(lo, min(lo + rows, info.shape[0]))
                parts.append(torch.nn.functional.linear(
                    x, self.rows(info, ids), None if b is None else b[lo:lo + rows]))
            return torch.cat(parts, dim=-1)

        return forward

    def before(self, module, args) -> None:
        import torch

        key = id(module)
        if key in self.kept:
            return
        self.meta[key] = {}
        for pname, info in self.sources[key]:
            meta = module._parameters[pname]
            if tuple(info.shape) != tuple(meta.shape):
                raise ValueError(f"`{info.name}` is {info.shape} in the files, the model "
                                 f"wants {tuple(meta.shape)}")
            self.meta[key][pname] = meta
            kept = self.kept_tensors.get(info.name)
            module._parameters[pname] = kept if kept is not None else torch.nn.Parameter(
                self._tensor(info), requires_grad=False)

    def after(self, module, args, output) -> None:
        key = id(module)
        if key in self.kept:
            return
        new = [(p, info) for p, info in self.sources[key] if info.name not in self.kept_tensors]
        size = sum(module._parameters[p].numel() * 4 for p, _ in new)
        if self.resident + size <= self.budget:
            self.kept.add(key)
            self.resident += size
            self.kept_tensors.update((info.name, module._parameters[p]) for p, info in new)
        else:
            module._parameters.update(self.meta[key])
        self.meta.pop(key, None)


Sources = dict[int, list[tuple[str, TensorInfo]]]  # id(module) -> [(parameter, its tensor)]


def _sources(model, tensors: dict[str, TensorInfo]) -> Sources | str:
    """Per module, where each of its own parameters is in the files; or what is missing."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    found: Sources = {}
    for mname, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            # a tied parameter is saved under one of its names
            on_disk = next((n for n in [full, *names[id(param)]] if n in tensors), None)
            if on_disk is None:
                return f"parameter `{full}` has no tensor in the files"
            found.setdefault(id(module), []).append((pname, tensors[on_disk]))
    return found


def _on_cpu_in_fp32(model) -> None:
    """``model.device`` / ``model.dtype`` read the first parameter, a meta one here; generate()
    and the attention masks must see the CPU and fp32 the weights arrive in."""
    import torch

    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {
        "device": property(lambda self: torch.device("cpu")),
        "dtype": property(lambda self: torch.float32)})


def _whole(folder: Path, why: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from stages.core.cli import progress_enabled

    if not progress_enabled():
        hf_logging.disable_progress_bar()

    size = sum(t.numel for t in model_tensors(folder).values()) * 4
    log.warning("%s cannot be streamed (%s): loading it whole, %.1f GB in fp32",
                folder, why, size / 1e9)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@contextmanager
def streamed_model(folder: Path, *, budget: int | None = None) -> Iterator[object]:
    """The causal LM in ``folder`` (fp32, eval mode), its weights read as its modules run;
    ``budget`` bytes of them stay between passes (default :func:`resident_bytes`)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_config leaves a tied head its own parameter; loading ties it
    model.eval()
    sources = _sources(model, model_tensors(folder))
    if isinstance(sources, str):
        yield _whole(folder, sources)
        return
    with Reader() as reader:
        streamer = _Streamer(sources,
                             resident_bytes() if budget is None else budget, reader)
        hooks, embed, head = [], model.get_input_embeddings(), model.get_output_embeddings()
        for module in model.modules():
            if id(module) not in sources:
                continue
            big = sum(info.numel for _, info in sources[id(module)]) * 4 > VOCAB_WHOLE_MAX
            if big and module is embed and isinstance(module, torch.nn.Embedding) and \
                    len(sources[id(module)]) == 1:
                hooks.append(module.register_forward_pre_hook(streamer.embed_rows))
                hooks.append(module.register_forward_hook(streamer.drop))
            elif big and module is head and isinstance(module, torch.nn.Linear):
                params = dict(sources[id(module)])
                module.forward = streamer.head_forward(module, params["weight"],
                                                       params.get("bias"))
            else:
                hooks.append(module.register_forward_pre_hook(streamer.before))
                hooks.append(module.register_forward_hook(streamer.after))
        _on_cpu_in_fp32(model)
        try:
            with torch.no_grad():
                model(torch.tensor([[0, 0]]))  # a module that reads another's weights fails here
        except (NotImplementedError, RuntimeError, ValueError, TypeError) as exc:
            for hook in hooks:
                hook.remove()
            yield _whole(folder, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            return
        try:
            yield model
        finally:
            for hook in hooks:
                hook.remove()
            head.__dict__.pop("forward", None)
            log.debug("%s: %.1f GB read, %.1f GB kept resident", folder,
                      streamer.bytes_read / 1e9, streamer.resident / 1e9)
