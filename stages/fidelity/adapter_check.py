"""Do the merged files hold this adapter applied to this base?  Tensor by tensor, streamed.

For every tensor of the merged model, what the adapter prescribes for it:

- a LoRA target: the base weight (or the adapter's own copy of it) with the
  adapter applied, recomputed by peft's own layer code: a ``peft.tuners.lora``
  ``Linear`` or ``Embedding`` wrapped around an ``nn.Linear``, transformers'
  ``Conv1D`` or an ``nn.Embedding`` that holds a few rows of the weight, merged
  with its ``merge()`` in float64 (B·A with its scale, rsLoRA, rank and alpha
  patterns, DoRA's renormalisation, ``fan_in_fan_out``, the LoRA bias).  The
  merged tensor must be that exact value rounded to the merged dtype: the
  nearest value or its neighbour, one rounding step, widened only by the error
  bound of an fp32 computation where the base and the delta cancel;
- a ``modules_to_save`` copy, new vocabulary rows (a resized embedding or
  head), a trained bias (``bias="all"``): the adapter's tensor, byte for byte
  (or its cast, where the adapter saved another dtype than the base's);
- every other tensor: the base's bytes.  A tied head that the adapter unties
  (a LoRA or copy of one side: peft wraps only the layer it targets) is the
  base's embedding, and config.json must say the model is untied.

Which tensors the adapter touches comes from its parsed files
(:func:`stages.weights.lora.load_adapter`) and the base's layout (input
embedding, output head, tie, Conv1D; :func:`stages.weights.layout.model_layout`);
the arithmetic is peft's, never the merge's own (stages/weights/lora_math.py),
so a bug in it cannot hide here.  Memory stays flat: a few row chunks of one
tensor at a time, never a model.  An adapter whose every LoRA delta is zero
(``lora_B`` as peft initialises it) is refused before a tensor of the base or
the merged model is read.

How much the fine-tune changes the model's answers is not checked here: the
reference stage measures it for the card, as information.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stages.core.errors import CheckFailed, ReleaseError
from stages.weights.layout import model_layout
from stages.weights.lora import (
    Adapter,
    Layout,
    LoraModule,
    load_adapter,
    resolve,
    tied_sources,
)
from stages.weights.safetensors_io import (
    DTYPE_SIZES,
    Reader,
    TensorInfo,
    model_tensors,
)

log = logging.getLogger(__name__)

# Elements per chunk of a LoRA target: peft's layer holds this many float64
# values a few times over (weight, delta, result): ~10 MB, whatever the model.
CHUNK_ELEMENTS = 2**18
# Bytes per block when comparing tensors byte for byte.
COPY_BLOCK = 4 * 2**20
# fp32's unit roundoff: a merge computed in fp32 may err by (r + 4)·u·(|W| + s·|B|·|A|)
# (Higham's γ_n for an inner product of r terms plus the add), where values cancel.
FP32_ROUNDOFF = 2.0**-24
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


@dataclass(frozen=True)
class AdapterCheck:
    """What :func:`verify_merge` found: every tensor checked, none off."""

    tensors: int  # tensors of the merged model, every one checked
    lora_merged: int  # with a LoRA applied (weights, and LoRA biases)
    replaced: int  # the adapter's own tensor (modules_to_save, resized vocabulary, bias="all")
    copied: int  # the base's bytes
    untied: bool  # the head untied from the input embedding, as the adapter's model has it
    dtype: str  # dtype(s) of the LoRA-merged tensors
    merged_elements: int  # elements of the LoRA-merged tensors
    # Of those, how many are not the exact value rounded to the merged dtype but its
    # neighbour (one rounding step off: an fp32 merge near a midpoint), and how many are
    # further, within the error bound of an fp32 merge (where base and delta cancel).
    not_nearest: int
    fp32_bound: int
    worst_steps: int  # the most rounding steps any merged value is off the nearest
    worst_tensor: str | None  # where that is (None: every value is the nearest)
    seconds: float


@dataclass(frozen=True)
class _Want:
    """One tensor of the merged model and what it must hold."""

    name: str
    dtype: str  # the merged dtype: the base tensor's
    shape: tuple[int, ...]
    source: TensorInfo  # the bytes it is made of, or the weight a LoRA applies to
    how: str  # "base" | "adapter" | "lora" | "lora_bias"
    module: LoraModule | None = None


@dataclass
class _Figures:
    elements: int = 0
    not_nearest: int = 0
    beyond_step: int = 0
    worst: int = 0
    worst_tensor: str | None = None
    dtypes: set[str] = field(default_factory=set)


def torch_dtype(name: str):
    """torch's dtype for a safetensors float dtype name (``BF16``)."""
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
            "F64": torch.float64}[name]


# --- what the adapter prescribes ---------------------------------------------------


def _read_config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"cannot read {path} ({exc}); is {folder} the {what}?") from None
    if not isinstance(config, dict):
        raise ReleaseError(f"{path} is not a JSON object; is {folder} the {what}?")
    return config


def _prescribed(base: dict[str, TensorInfo], adapter: Adapter,
                layout: Layout) -> tuple[list[_Want], bool]:
    """Every tensor of the merged model, as the adapter's model computes with it.

    What the adapter's model starts from: the base's tensors, a resized
    original (``original_module``, peft's untrained copy of a resized layer),
    then the adapter's own whole tensors; its LoRAs apply to that.  A tied head
    is the embedding's weight until the adapter changes one side of the tie.
    """
    embed, head = layout.embed, layout.head
    tied, start = tied_sources(base, layout)
    dtypes = {name: info.dtype for name, info in start.items()}
    how: dict[str, tuple[str, TensorInfo, LoraModule | None]] = {}
    for param, info in adapter.base_layers.items():
        name = resolve(param, start, layout.prefix)
        if name is not None and info.shape != start[name].shape:
            start[name] = info
            how[name] = ("adapter", info, None)
    if tied and start[head] is base[embed]:
        start[head] = start[embed]
    for param, info in adapter.tensors.items():
        name = resolve(param, start, layout.prefix)
        if name is None:
            raise ReleaseError(f"the adapter carries `{info.name}`, which is no tensor of the "
                               "base model; is the base model right?")
        start[name] = info
        how[name] = ("adapter", info, None)
    for module in adapter.modules.values():
        weight = resolve(f"{module.module}.weight", start, layout.prefix)
        if weight is None:
            raise ReleaseError(f"the adapter targets `{module.module}`, which has no weight in "
                               "the base model; is the base model right?")
        how[weight] = ("lora", start[weight], module)
        if module.bias is not None:
            bias = resolve(f"{module.module}.bias", start, layout.prefix)
            if bias is None:
                raise ReleaseError(f"the adapter has a LoRA bias for `{module.module}`, whose "
                                   "base layer has no bias; is the base model right?")
            how[bias] = ("lora_bias", start[bias], module)
    untied = tied and bool({embed, head} & how.keys())
    names = sorted(base) + ([head] if untied and head not in base else [])
    wants = []
    for name in names:
        kind, source, module = how.get(name, ("base", start[name], None))
        shape = source.shape if kind == "adapter" else start[name].shape
        wants.append(_Want(name, dtypes[name], shape, source, kind, module))
    return wants, untied


# --- an untrained adapter -----------------------------------------------------------


def _all_zero(reader: Reader, info: TensorInfo) -> bool:
    import torch

    raw = reader.read(info)
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).count_nonzero().item() == 0


def check_trained(adapter: Adapter, reader: Reader) -> None:
    """Refuse an adapter none of whose LoRAs changes anything: every delta B·A zero
    (``lora_B`` all zeros, as peft initialises it; ``lora_embedding_A`` for an
    embedding), no DoRA magnitude, no LoRA bias."""
    if not adapter.modules:
        return
    for module in adapter.modules.values():
        for info in (module.a, module.b, module.magnitude, module.bias):
            if info is not None and info.dtype not in FLOAT_DTYPES:
                raise ReleaseError(f"adapter tensor `{info.name}` has dtype {info.dtype}; "
                                   "expected floats")
        zero_delta = _all_zero(reader, module.b) or _all_zero(reader, module.a)
        zero_bias = module.bias is None or _all_zero(reader, module.bias)
        if not zero_delta or module.magnitude is not None or not zero_bias:
            return
    raise CheckFailed(
        f"the adapter is untrained: every lora_B of its {len(adapter.modules)} LoRA modules is "
        "zero (the value peft starts from; for an embedding, lora_embedding_A), so merged it "
        f"changes nothing. Is `adapter` the right run ({adapter.path}), its final model and "
        "not one saved before training?")


# --- peft's merge of a few rows -----------------------------------------------------


@dataclass(frozen=True)
class _Lora:
    """One LoRA module as peft builds it, its tensors in float64."""

    module: LoraModule
    kind: str  # "linear" | "conv1d" (stored in×out) | "embedding"
    r: int
    alpha: float
    configs: tuple  # peft LoraConfig as the adapter's, and the same without DoRA
    a: object
    b: object
    magnitude: object | None = None
    bias: object | None = None


def _pattern(patterns: dict | None, module: str, default):
    """peft's own lookup of ``rank_pattern`` / ``alpha_pattern`` for ``module``."""
    from peft.utils.other import get_pattern_key

    patterns = patterns or {}
    return patterns.get(get_pattern_key(list(patterns), module), default)


def _load_float64(reader: Reader, info: TensorInfo):
    import torch

    raw = reader.read(info)
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).reshape(info.shape).double()


def _lora(module: LoraModule, config: dict, layout: Layout, reader: Reader) -> _Lora:
    """The peft layer settings of ``module``: its kind (as the base's architecture
    has it), rank and alpha (peft's pattern lookup), rsLoRA, DoRA, LoRA bias."""
    from peft import LoraConfig

    if module.embedding:
        kind = "embedding"
    else:  # peft transposes by the layer's type (Conv1D), else as the config says
        kind = layout.module_kind(module.module) or (
            "conv1d" if config.get("fan_in_fan_out") else "linear")
    for flag, part, what in (("use_dora", module.magnitude, "a DoRA magnitude"),
                             ("lora_bias", module.bias, "a LoRA bias")):
        if bool(config.get(flag)) != (part is not None):
            raise ReleaseError(
                f"adapter module `{module.module}` {'has' if part is not None else 'lacks'} "
                f"{what} but its adapter_config.json says `{flag}: {config.get(flag)}`; the "
                "adapter files do not belong together")
    if module.magnitude is not None and kind != "linear":
        raise ReleaseError(f"DoRA on `{module.module}` ({kind}) cannot be checked here; merge "
                           "and check that adapter with peft")
    r = _pattern(config.get("rank_pattern"), module.module, config.get("r", 8))
    alpha = _pattern(config.get("alpha_pattern"), module.module, config.get("lora_alpha", 8))
    if r != module.a.shape[0]:
        raise ReleaseError(f"adapter_config.json gives `{module.module}` rank {r}, its lora_A "
                           f"has {module.a.shape[0]} rows; the adapter files do not belong "
                           "together")
    configs = tuple(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                               use_rslora=bool(config.get("use_rslora")), use_dora=dora,
                               lora_bias=module.bias is not None,
                               fan_in_fan_out=kind == "conv1d")
                    for dora in (module.magnitude is not None, False))
    magnitude, bias = (None if info is None else _load_float64(reader, info)
                       for info in (module.magnitude, module.bias))
    return _Lora(module=module, kind=kind, r=r, alpha=alpha, configs=configs,
                 a=_load_float64(reader, module.a), b=_load_float64(reader, module.b),
                 magnitude=magnitude, bias=bias)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _param(tensor):
    import torch

    return torch.nn.Parameter(tensor, requires_grad=False)


def peft_rows(lora: _Lora, weight, lo: int, *, base_bias=None, dora: bool = True):
    """peft's merge of rows ``lo:lo+len(weight)`` of a LoRA target, in float64.

    ``weight``: those rows of the tensor the LoRA applies to (out×in for
    nn.Linear, in×out for Conv1D, vocabulary×dim for an embedding);
    ``base_bias``: the layer's whole bias, or None.  A peft layer is built
    around a layer holding just those rows and ``merge()``d.  Returns the
    merged rows and the merged bias (its rows for nn.Linear, whole for Conv1D).
    ``dora=False`` leaves DoRA's renormalisation out (for the error bound).
    """
    import torch
    from peft.tuners.lora import layer as peft_layer
    from transformers.pytorch_utils import Conv1D

    n, cols = weight.shape
    hi = lo + n
    with torch.device("meta"):
        if lora.kind == "embedding":
            base = torch.nn.Embedding(n, cols)
        elif lora.kind == "conv1d":
            base = Conv1D(cols, n)  # nf (out) = cols, nx (in) = n: the rows are in-features
        else:
            base = torch.nn.Linear(cols, n, bias=base_bias is not None)
    base.weight = _param(weight)  # merged in place
    if base_bias is not None:
        base.bias = _param((base_bias if lora.kind == "conv1d" else base_bias[lo:hi]).clone())
    elif lora.kind == "conv1d":
        base.bias = None
    config = lora.configs[0 if dora else 1]
    with _quiet():
        cls = peft_layer.Embedding if lora.kind == "embedding" else peft_layer.Linear
        wrapped = cls(base, "default", config=config, r=lora.r, lora_alpha=lora.alpha)
    if lora.kind == "embedding":
        wrapped.lora_embedding_A["default"] = _param(lora.a[:, lo:hi])
        wrapped.lora_embedding_B["default"] = _param(lora.b)
    else:
        conv1d = lora.kind == "conv1d"
        wrapped.lora_A["default"].weight = _param(lora.a[:, lo:hi] if conv1d else lora.a)
        wrapped.lora_B["default"].weight = _param(lora.b if conv1d else lora.b[lo:hi])
        if lora.bias is not None:
            wrapped.lora_B["default"].bias = _param(lora.bias if conv1d else lora.bias[lo:hi])
        if config.use_dora:
            wrapped.lora_magnitude_vector["default"].weight = _param(lora.magnitude[lo:hi])
    with torch.no_grad(), _quiet():
        wrapped.merge()
    return base.weight.detach(), (base.bias.detach() if base_bias is not None else None)


def _fp32_bound(lora: _Lora, weight, lo: int, exact):
    """How far a merge computed in fp32 may stray from the exact value where values
    cancel (Higham): (r + 4)·u·(|W| + s·|B|·|A|), through DoRA's factor, plus
    (row length + 4)·u·|W'| for DoRA's row norm."""
    import torch

    absolute = _Lora(module=lora.module, kind=lora.kind, r=lora.r, alpha=lora.alpha,
                     configs=lora.configs, a=lora.a.abs(), b=lora.b.abs())
    size, _ = peft_rows(absolute, weight.abs(), lo, dora=False)
    bound = (lora.r + 4) * FP32_ROUNDOFF * size
    if lora.magnitude is None:
        return bound
    plain, _ = peft_rows(lora, weight, lo, dora=False)
    factor = lora.magnitude[lo:lo + len(weight)].unsqueeze(1) / torch.linalg.vector_norm(
        plain, dim=1, keepdim=True)
    return factor.abs() * bound + (weight.shape[1] + 4) * FP32_ROUNDOFF * exact.abs()


# --- comparing ----------------------------------------------------------------------


def _steps(values, torch_dtype):
    """One rounding step of ``torch_dtype`` at each of ``values`` (float64, >= 0): the
    spacing of its representable numbers there, subnormals included."""
    import torch

    info = torch.finfo(torch_dtype)
    least = round(math.log2(info.tiny))
    _, exponent = torch.frexp(values)
    exponent = torch.where(values != 0, exponent - 1, least).clamp_min(least)
    return torch.ldexp(torch.full_like(values, info.eps), exponent)


def _where(shape: tuple[int, ...], flat: int) -> str:
    """``[i, j]``: the index of element ``flat`` of a tensor of ``shape``."""
    index = []
    for dim in reversed(shape):
        index.append(flat % dim)
        flat //= dim
    return "[" + ", ".join(str(i) for i in reversed(index)) + "]"


def _ordinals(values):
    """Each float as an integer that counts representable values: neighbours differ by
    one, +0 and -0 are both 0 (sign-magnitude bits laid out on a line)."""
    import torch

    bits = 8 * values.element_size()
    raw = values.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]).long()
    magnitude = raw & (2 ** (bits - 1) - 1)
    return torch.where(raw < 0, -magnitude, magnitude)


def _compare(want: _Want, got, exact, lo: int, figures: _Figures, bound, fix: str) -> None:
    """Rows ``lo:`` of the merged tensor (``got``, merged dtype) against the exact float64
    ``exact``: the nearest value or its neighbour (one rounding step), or further by no more
    than ``bound()`` (the error of an fp32 merge where values cancel)."""
    import torch

    nearest = exact.to(got.dtype)
    differ = (got != nearest).flatten()  # NaN differs
    figures.elements += got.numel()
    figures.dtypes.add(want.dtype)
    if not differ.any():
        return
    where = differ.nonzero().squeeze(1)
    value, cast, exact = got.flatten()[where], nearest.flatten()[where], exact.flatten()[where]
    error = (value.double() - exact).abs()
    steps = (_ordinals(value) - _ordinals(cast)).abs()
    # torch casts float64 through float32, which can round a value at a midpoint the wrong
    # way: a merged value as close to the exact one as the cast is the nearest too
    steps[error <= (cast.double() - exact).abs()] = 0
    beyond = steps > 1
    if beyond.any():
        allowed = _steps(torch.maximum(value.double().abs(), exact.abs()), got.dtype)
        off = beyond & ~(error <= allowed + bound().flatten()[where])
        if off.any():
            first = int(off.nonzero()[0])
            at = _where(want.shape, lo * math.prod(want.shape[1:]) + int(where[first]))
            if not torch.isfinite(exact[first]):
                raise CheckFailed(f"peft's merge of the adapter gives {float(exact[first])} "
                                  f"for `{want.name}` at {at}: the adapter is broken (its "
                                  "training diverged?)")
            step = float(_steps(exact[first:first + 1].abs(), got.dtype)[0])
            raise CheckFailed(
                f"merged tensor `{want.name}` is not this adapter applied to this base: at {at} "
                f"it holds {float(value[first]):.8g}, peft's merge of the adapter gives "
                f"{float(exact[first]):.8g}, {float(error[first]) / step:.3g} rounding steps of "
                f"{want.dtype} away ({int(off.sum())} of the {got.numel()} values checked with "
                f"it off). Merged files from another adapter or base? {fix}")
    figures.not_nearest += int(((steps > 0) & ~beyond).sum())
    figures.beyond_step += int(beyond.sum())
    worst = int(steps.max())
    if worst > figures.worst:
        figures.worst, figures.worst_tensor = worst, want.name


def _rows(reader: Reader, info: TensorInfo, lo: int, n: int):
    """Rows ``lo:lo+n`` of a tensor (elements, for a 1-D one), in its own dtype."""
    import torch

    row_bytes = info.nbytes // info.shape[0]
    raw = torch.empty(n * row_bytes, dtype=torch.uint8)
    reader.read_into(info, memoryview(raw.numpy()), lo * row_bytes)
    return raw.view(torch_dtype(info.dtype)).reshape(n, *info.shape[1:])


def _check_lora(want: _Want, got: TensorInfo, lora: _Lora, reader: Reader, base_bias,
                figures: _Figures, fix: str):
    """A LoRA target, a chunk of rows at a time; returns peft's merged bias (or None)."""
    import torch

    a, b = lora.a.shape, lora.b.shape
    fits = (b[0], a[1]) if lora.kind == "linear" else (a[1], b[0])
    if want.shape != fits or want.source.dtype not in FLOAT_DTYPES:
        raise ReleaseError(
            f"adapter module `{lora.module.module}` (lora_A {'×'.join(map(str, a))}, lora_B "
            f"{'×'.join(map(str, b))}, {lora.kind}) needs `{want.name}` of the base to be "
            f"{'×'.join(map(str, fits))} floats, it is {want.source.dtype} "
            f"{want.source.shape_text()}; is the base model right?")
    rows, cols = want.shape
    step = max(1, CHUNK_ELEMENTS // cols)
    biases = []
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        try:
            exact, bias = peft_rows(lora, _rows(reader, want.source, lo, n).double(), lo,
                                    base_bias=base_bias)
        except RuntimeError as exc:  # a magnitude or bias of another size
            raise ReleaseError(f"adapter module `{lora.module.module}` does not fit `{want.name}` "
                               f"of the base ({exc}); is the base model right?") from None
        biases.append(bias)

        def bound(lo=lo, n=n, exact=exact):
            return _fp32_bound(lora, _rows(reader, want.source, lo, n).double(), lo, exact)

        _compare(want, _rows(reader, got, lo, n), exact, lo, figures, bound, fix)
    if base_bias is None:
        return None
    return biases[0] if lora.kind == "conv1d" else torch.cat(biases)


def _check_lora_bias(want: _Want, got: TensorInfo, exact, reader: Reader, figures: _Figures,
                     fix: str) -> None:
    """A LoRA bias (``lora_bias=True``): peft merged it with its layer's weight."""
    base_bias = _load_float64(reader, want.source)

    def bound():
        return 4 * FP32_ROUNDOFF * (base_bias.abs() + (exact - base_bias).abs())

    _compare(want, _rows(reader, got, 0, got.shape[0]), exact, 0, figures, bound, fix)


def _same_bytes(want: _Want, got: TensorInfo, reader: Reader, fix: str) -> None:
    """Byte for byte the source's, or (saved in another dtype) its cast to the merged dtype."""
    import torch

    source = want.source
    cast = source.dtype != want.dtype
    if cast and (source.dtype not in FLOAT_DTYPES or want.dtype not in FLOAT_DTYPES):
        raise ReleaseError(f"`{want.name}`: cannot compare {source.dtype} with {want.dtype}")
    size_in, size_out = DTYPE_SIZES[source.dtype], DTYPE_SIZES[want.dtype]
    per_block = max(1, COPY_BLOCK // max(size_in, size_out))
    for start in range(0, source.numel, per_block):
        n = min(per_block, source.numel - start)
        expected = torch.empty(n * size_in, dtype=torch.uint8)
        merged = torch.empty(n * size_out, dtype=torch.uint8)
        reader.read_into(source, memoryview(expected.numpy()), start * size_in)
        reader.read_into(got, memoryview(merged.numpy()), start * size_out)
        if cast:
            expected = expected.view(torch_dtype(source.dtype)).to(
                torch_dtype(want.dtype)).view(torch.uint8)
        if torch.equal(expected, merged):
            continue
        differ = (expected.view(-1, size_out) != merged.view(-1, size_out)).any(1)
        first = int(differ.nonzero()[0])
        values = ""
        if want.dtype in FLOAT_DTYPES:
            dtype = torch_dtype(want.dtype)
            values = (f": {float(merged.view(dtype)[first]):.8g} instead of "
                      f"{float(expected.view(dtype)[first]):.8g}")
        whose, why = (("the adapter's own", "the adapter saved it whole: modules_to_save, "
                       "resized vocabulary or a trained bias") if want.how == "adapter" else
                      ("the base's", "the adapter leaves it alone"))
        raise CheckFailed(
            f"merged tensor `{want.name}` should be {whose}, byte for byte ({why}), but "
            f"{int(differ.sum())} values of a block of {n} differ, the first at "
            f"{_where(want.shape, start + first)}{values}. Merged files from another adapter "
            f"or base? {fix}")


# --- the check ----------------------------------------------------------------------


def _check_headers(wants: list[_Want], found: dict[str, TensorInfo], merged: Path,
                   fix: str) -> None:
    names = {w.name for w in wants}
    missing = [w.name for w in wants if w.name not in found]
    extra = sorted(found.keys() - names)
    if missing:
        raise CheckFailed(f"the merged files in {merged} lack tensor `{missing[0]}` "
                          f"({len(missing)} missing), which the base and adapter give the merged "
                          f"model. {fix}")
    if extra:
        raise CheckFailed(f"the merged files in {merged} hold tensor `{extra[0]}` "
                          f"({len(extra)} such), which neither the base nor the adapter "
                          f"explains. Merged files from another base? {fix}")
    for want in wants:
        got = found[want.name]
        if (got.dtype, got.shape) != (want.dtype, want.shape):
            raise CheckFailed(
                f"merged tensor `{want.name}` is {got.dtype} {got.shape_text()}, the base and "
                f"adapter make it {want.dtype} {'×'.join(map(str, want.shape))}. {fix}")


def _check_config(merged: Path, base_tensors: dict[str, TensorInfo], wants: list[_Want],
                  layout: Layout, untied: bool, fix: str) -> None:
    """config.json must describe these weights: untied when they are, the new vocabulary."""
    config = _read_config(merged, "merged model")
    tie = config.get("tie_word_embeddings")
    if untied and tie is not False:
        raise CheckFailed(f"{merged / 'config.json'} leaves `tie_word_embeddings` "
                          f"{'unset' if tie is None else tie}, but the adapter changed one side "
                          f"of the base's tied embedding: loaded, the head would be the merged "
                          f"embedding. {fix}")
    sizes = {w.shape[0] for w in wants if w.name in (layout.embed, layout.head)}
    before = {base_tensors[n].shape[0] for n in (layout.embed, layout.head) if n in base_tensors}
    if len(sizes) == 1 and sizes != before and config.get("vocab_size") not in sizes:
        raise CheckFailed(f"{merged / 'config.json'} says vocab_size {config.get('vocab_size')}, "
                          f"the merged embedding has {sizes.pop()} rows. {fix}")


def verify_merge(*, base: Path, adapter: Path, merged: Path,
                 fix: str = "Merge the adapter again.") -> AdapterCheck:
    """Check every tensor of ``merged`` against ``adapter`` applied to ``base``.

    Raises :class:`CheckFailed` naming the first tensor (and element) that is
    not what the adapter prescribes, or when the adapter is untrained; ``fix``
    ends those messages (what to rerun).
    """
    start = time.monotonic()
    lora = load_adapter(adapter)
    from stages.weights.lora_math import one_thread  # imports torch: only when checking

    with Reader() as reader, one_thread():
        check_trained(lora, reader)
        base_tensors = model_tensors(base)
        layout = model_layout(base, _read_config(base, "base model"), base_tensors, lora)
        wants, untied = _prescribed(base_tensors, lora, layout)
        found = model_tensors(merged)
        _check_headers(wants, found, merged, fix)
        _check_config(merged, base_tensors, wants, layout, untied, fix)
        biases = {w.module.module: w for w in wants if w.how == "lora_bias"}
        figures, merged_biases = _Figures(), {}
        for want in (w for w in wants if w.how == "lora"):  # first: they give the LoRA biases
            bias = biases.get(want.module.module)
            merged_biases[want.module.module] = _check_lora(  # one module in memory at a time
                want, found[want.name], _lora(want.module, lora.config, layout, reader), reader,
                _load_float64(reader, bias.source) if bias else None, figures, fix)
        for want in (w for w in wants if w.how != "lora"):
            if want.how == "lora_bias":
                _check_lora_bias(want, found[want.name], merged_biases[want.module.module],
                                 reader, figures, fix)
            else:
                _same_bytes(want, found[want.name], reader, fix)
    counts = collections.Counter("lora" if w.how.startswith("lora") else w.how for w in wants)
    result = AdapterCheck(
        tensors=len(wants), lora_merged=counts["lora"], replaced=counts["adapter"],
        copied=counts["base"], untied=untied, dtype="/".join(sorted(figures.dtypes)),
        merged_elements=figures.elements, not_nearest=figures.not_nearest,
        worst_steps=figures.worst, fp32_bound=figures.beyond_step,
        worst_tensor=figures.worst_tensor,
        seconds=round(time.monotonic() - start, 2))
    log.info("adapter merge: ok, %d tensors (%d LoRA-merged, %d the adapter's, %d the "
             "base's); of %d merged values %d one rounding step off the nearest to peft's "
             "merge, %d further within fp32's error bound; %.1f s", result.tensors,
             result.lora_merged, result.replaced, result.copied, result.merged_elements,
             result.not_nearest, result.fp32_bound, result.seconds)
    return result
