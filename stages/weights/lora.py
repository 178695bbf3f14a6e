"""A peft LoRA adapter: read it and plan its merge into a base.

Reads an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
as peft, Unsloth and TRL save it, plans every output tensor of the merged
model from the base's shard headers, and says, per tensor, what the merge
does: copy it, replace it, or merge a LoRA into it.  No torch here: a plan's
errors show before torch is imported (2-4 s), and the merge imports it while
it copies the untouched tensors.  The arithmetic is in stages/lora_math.py;
which tensors are the input embedding and output head, and whether they are
tied, is a :class:`Layout` (read from the model itself by stages/weights/layout.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from stages.core.errors import ReleaseError
from stages.weights.safetensors_io import TensorInfo, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel wraps the base as ``base_model.model``; its saved keys carry that prefix.
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                      r"lora_magnitude_vector)(?:\.default)?(?:\.(?P<param>weight|bias))?$")
WHOLE_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save(?:\.default)?\.(?P<param>[^.]+)$")
# The untrained original beside a modules_to_save copy; needed only when resized.
ORIGINAL_KEY = re.compile(r"^(?P<module>.+)\.original_module\.(?P<param>[^.]+)$")
# LoRA options whose adapters have no plain merged form here.
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA", "use_qalora": "QALoRA", "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets", "megatron_config": "Megatron layers",
    "trainable_token_indices": "trainable tokens",
}
# Initialisations that change the base weights themselves (peft docs, "LoRA init").
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")
# Safetensors dtypes the merge computes with (stages/lora_math.py maps them to torch).
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
# Rows per chunk hold about this many elements (2 MiB of fp32 work): large
# enough that per-call overhead vanishes, small enough to stay in cache.  Read,
# merge and write of an 8192x3072 bf16 tensor, best of 12: 45 ms at 2**19,
# 57 ms at 2**20, 69 ms at 2**18 (AMD EPYC, bench/ 3B shapes).
CHUNK_ELEMENTS = 2**19
# Llama's names: the layout assumed when transformers cannot build the model
# (stages/weights/layout.py) or the adapter leaves embedding and head alone.
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-targeted layer: its A, B (and DoRA magnitude, bias) tensors."""

    module: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    transposed: bool
    bias: TensorInfo | None = None
    magnitude: TensorInfo | None = None
    embedding: bool = False

    def expected_shape(self) -> tuple[int, int]:
        """The base weight shape that B@A (or its transpose) fits."""
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transposed else (out, inp)


@dataclass(frozen=True)
class Layout:
    """The base's input embedding and output head: their tensor names, and their tie.

    ``embed`` / ``head``: tensor names as the base's shards spell them (a tied
    head missing from the shards keeps the model's own name, e.g. ``lm_head.weight``).
    ``tied``: the head computes with the embedding's weight (transformers ties them
    on load).  ``shared``: further tensors tied to the embedding (T5's encoder and
    decoder copies).  ``prefix``: the base model's attribute (``model``,
    ``transformer``), which checkpoints saved from the bare base model leave off.
    ``conv1d`` / ``linear``: modules whose weights are stored in×out (GPT-2's
    Conv1D) or out×in (nn.Linear); peft transposes by the layer's type whatever
    the saved ``fan_in_fan_out``.  ``model``: where this came from, for messages;
    ``unknown``: why it is a guess (transformers could not build the model).
    """

    embed: str | None = None
    head: str | None = None
    tied: bool = False
    shared: tuple[str, ...] = ()
    prefix: str = "model"
    conv1d: frozenset[str] = frozenset()
    linear: frozenset[str] = frozenset()
    model: str = "the base model"
    unknown: str | None = None

    def module_kind(self, module: str) -> str | None:
        """``conv1d``, ``linear`` or None (not known) for an adapter's module name."""
        for name in _candidates(module, self.prefix):
            if name in self.conv1d:
                return "conv1d"
            if name in self.linear:
                return "linear"
        return None


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter folder, read and checked (tensor bytes stay on disk)."""

    path: Path
    config: dict
    modules: dict[str, LoraModule]
    tensors: dict[str, TensorInfo]
    base_layers: dict[str, TensorInfo]


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the merged model and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo
    lora: LoraModule | None = None
    lora_bias: LoraModule | None = None

    @property
    def copied(self) -> bool:
        """True when the bytes are the source's, unchanged."""
        return self.lora is None and self.lora_bias is None and self.source.dtype == self.dtype


@dataclass(frozen=True)
class MergePlan:
    """The merged model: its tensors in order, and what changed in its config."""

    tensors: list[OutTensor]
    untied: bool
    vocab_size: int | None


def read_config(folder: Path) -> dict:
    """``adapter_config.json``, refused unless it is a LoRA we can merge."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ReleaseError(f"{folder} is not a peft adapter folder: {ADAPTER_CONFIG} is missing; "
                           "point --adapter or the trainer's `adapter` in params.yaml at the "
                           "folder the trainer saved (final_model/), or run `make pick "
                           "TRAINER=<trainer>`")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"{path} is not valid JSON ({exc}): the run was cut short or the file "
                           "was damaged; copy it again, or pick a complete run (`make pick`)"
                           ) from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ReleaseError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
                           "(including DoRA and rsLoRA) can be merged into the base weights")
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise ReleaseError(f"{path}: `{key}` is set ({what}); merging that LoRA variant "
                               "is not supported, merge it with peft instead")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise ReleaseError(
            f"{path}: init_lora_weights is {init!r}, which changes the base weights; save the "
            "adapter with peft's `path_initial_model_for_weight_conversion` to get a plain LoRA")
    return config


def normalise_key(key: str) -> str:
    """Drop the PeftModel prefix; ``.default`` is dropped by the key patterns."""
    return key.removeprefix(PEFT_PREFIX)


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's ``get_pattern_key``: the first pattern matching the end of ``module``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def module_scale(config: dict, module: str, rank: int) -> float:
    """alpha/r (or alpha/√r with use_rslora), honouring rank_pattern / alpha_pattern."""
    r = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if r != rank:
        raise ReleaseError(f"adapter config gives `{module}` rank {r}, but its lora_A has "
                           f"{rank} rows; the adapter files do not belong together")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _lora_module(config: dict, module: str, parts: dict[str, TensorInfo]) -> LoraModule:
    embedding = "lora_embedding_A" in parts
    a = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    b = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a is None or b is None or len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        found = ", ".join(f"{k} {v.shape_text()}" for k, v in sorted(parts.items()))
        raise ReleaseError(f"adapter module `{module}` needs a lora_A (r×in) and lora_B (out×r) "
                           f"of the same rank; found {found}")
    for info in (a, b):
        if info.dtype not in FLOAT_DTYPES:
            raise ReleaseError(
                f"adapter tensor `{info.name}` has dtype {info.dtype}; expected floats")
    magnitude = parts.get("lora_magnitude_vector") or parts.get("lora_magnitude_vector.weight")
    return LoraModule(module=module, a=a, b=b, scale=module_scale(config, module, a.shape[0]),
                      transposed=embedding or bool(config.get("fan_in_fan_out")),
                      bias=parts.get("lora_B.bias"), magnitude=magnitude, embedding=embedding)


def load_adapter(folder: Path) -> Adapter:
    """Read and check an adapter folder; tensor data stays on disk."""
    config = read_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").exists()
        raise ReleaseError(f"{folder}: {ADAPTER_WEIGHTS} is missing" + (
            " (only adapter_model.bin, a PyTorch pickle, which we do not load); re-save the "
            "adapter with save_pretrained(..., safe_serialization=True)" if pickled else
            "; the run was cut short or not copied whole: copy it again, or pick a complete run "
            "(`make pick TRAINER=<trainer>`)"))
    found, _ = read_header(weights)
    parts: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    base_layers: dict[str, TensorInfo] = {}
    for key, info in found.items():
        name = normalise_key(key)
        if ".token_adapter." in name:
            raise ReleaseError(f"adapter tensor `{key}` belongs to trainable tokens, which "
                               "this merge does not support")
        if match := LORA_KEY.match(name):
            part = match["part"] + (f".{match['param']}" if match["param"] else "")
            parts.setdefault(match["module"], {})[part] = info
        elif match := WHOLE_KEY.match(name):
            tensors[f"{match['module']}.{match['param']}"] = info
        elif match := ORIGINAL_KEY.match(name):
            base_layers.setdefault(f"{match['module']}.{match['param']}", info)
        else:  # whole tensors: saved embeddings, biases (bias="all"), base_layer copies
            tensors.setdefault(name.replace(".base_layer.", "."), info)
    modules = {m: _lora_module(config, m, p) for m, p in parts.items()}
    if not modules and not tensors:
        raise ReleaseError(f"{weights} holds no LoRA or replacement tensors")
    return Adapter(path=folder, config=config, modules=modules, tensors=tensors,
                   base_layers=base_layers)


def _candidates(name: str, prefix: str = "model") -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for p in dict.fromkeys(("model", prefix))
                               for c in (name, f"{p}.{name}", name.removeprefix(f"{p}."))))


def resolve(name: str, names: dict[str, TensorInfo], prefix: str = "model") -> str | None:
    """The base tensor an adapter name means, with or without the base model's prefix
    (``model.``; GPT-2's ``transformer.``, which checkpoints of the bare model leave off)."""
    return next((c for c in _candidates(name, prefix) if c in names), None)


def _missing(what: str, layout: Layout) -> str:
    """An error for a tensor the base lacks: a wrong base, or a layout we could not read."""
    if layout.unknown:
        return (f"{what}, and which of its tensors are the input embedding and the output head "
                f"(a tied head has no tensor of its own) cannot be told: {layout.unknown}")
    return f"{what}; is the base model right?"


def _fits(name: str, new: TensorInfo, base: TensorInfo, layout: Layout) -> None:
    """A whole tensor replaces a base one: same shape, or more vocabulary rows."""
    more_rows = len(new.shape) == 2 and new.shape[1:] == base.shape[1:]
    if new.shape == base.shape or (more_rows and name in (layout.embed, layout.head)):
        return
    what = (f"adapter tensor `{new.name}` is {new.shape_text()} but base tensor `{name}` is "
            f"{base.shape_text()}")
    raise ReleaseError(_missing(what, layout) if more_rows else f"{what}; is the base model right?")


def _laid_out(module: LoraModule, layout: Layout) -> LoraModule:
    """The module transposed as peft computes it: by its layer's type where the model
    says (Conv1D: yes, nn.Linear: no), else by the saved ``fan_in_fan_out``."""
    kind = None if module.embedding else layout.module_kind(module.module)
    return module if kind is None else replace(module, transposed=kind == "conv1d")


def _lora_target(module: LoraModule, sources: dict[str, TensorInfo], layout: Layout) -> str:
    weight = resolve(f"{module.module}.weight", sources, layout.prefix)
    want = "×".join(map(str, module.expected_shape()))
    if weight is None:
        raise ReleaseError(_missing(f"adapter targets `{module.module}` but the base has no "
                                    f"tensor `{module.module}.weight` (adapter expects {want})",
                                    layout))
    base = sources[weight]
    if base.shape != module.expected_shape():
        raise ReleaseError(
            f"adapter tensors `{module.a.name}` ({module.a.shape_text()}) and `{module.b.name}` "
            f"({module.b.shape_text()}) need base tensor `{weight}` to be {want}, but it is "
            f"{base.shape_text()}; is the base model right?")
    if base.dtype not in FLOAT_DTYPES:
        raise ReleaseError(f"base tensor `{weight}` has dtype {base.dtype}; a quantized base "
                           "cannot be merged into, use the 16-bit base")
    if module.magnitude is not None and (module.transposed
                                         or module.magnitude.shape != base.shape[:1]):
        raise ReleaseError(f"DoRA on `{module.module}` (magnitude {module.magnitude.shape_text()}, "
                           f"transposed={module.transposed}) is not supported; merge it with peft")
    return weight


def tied_sources(base: dict[str, TensorInfo],
                 layout: Layout) -> tuple[bool, dict[str, TensorInfo]]:
    """Whether the base's head is tied to its embedding, and its tensors by name, a tied
    head that the shards leave out standing for the embedding it computes with."""
    tied = layout.tied and layout.embed in base and layout.head is not None
    sources = dict(base)
    if tied and layout.head not in base:
        sources[layout.head] = base[layout.embed]
    return tied, sources


def plan_merge(base: dict[str, TensorInfo], adapter: Adapter, layout: Layout) -> MergePlan:
    """Every output tensor, checked against the base before anything is written.

    A tied base (``layout.tied``) computes its output head with the input
    embedding's weight.  The tie is kept when the adapter changes neither;
    otherwise both are written (the untouched side copied from the base), as the
    adapter's model computed them: peft wraps only the layer it targets, so a
    LoRA or ``modules_to_save`` copy of the embedding leaves the head on the
    original weight, and one of the head leaves the embedding on it.
    """
    embed, head = layout.embed, layout.head
    tied, sources = tied_sources(base, layout)
    dtypes = {name: info.dtype for name, info in sources.items()}
    changed: dict[str, OutTensor] = {}
    for param, info in adapter.base_layers.items():
        name = resolve(param, sources, layout.prefix)
        if name is not None and info.shape != sources[name].shape:
            _fits(name, info, sources[name], layout)
            sources[name] = info
            changed[name] = OutTensor(name, dtypes[name], info.shape, info)
    if tied and sources[head] is base[embed]:
        sources[head] = sources[embed]  # a tied head shares the resized embedding
    for param, info in adapter.tensors.items():
        name = resolve(param, sources, layout.prefix)
        if name is None:
            raise ReleaseError(_missing(f"adapter carries tensor `{info.name}` "
                                        f"({info.shape_text()}) but the base has no tensor "
                                        f"`{param}`", layout))
        _fits(name, info, sources[name], layout)
        sources[name] = info  # a LoRA on this layer applies to the adapter's copy
        changed[name] = OutTensor(name, dtypes[name], info.shape, info)
    for module in adapter.modules.values():
        module = _laid_out(module, layout)
        weight = _lora_target(module, sources, layout)
        changed[weight] = OutTensor(weight, dtypes[weight], sources[weight].shape,
                                    sources[weight], lora=module)
        if module.bias is not None:
            bias = _bias_out(module, sources, dtypes, layout)
            changed[bias.name] = bias
    _check_shared(layout, changed, tied=tied)
    untied = tied and bool({embed, head} & changed.keys())
    names = sorted(base) + ([head] if untied and head not in base else [])
    tensors = [changed.get(n) or OutTensor(n, dtypes[n], sources[n].shape, sources[n])
               for n in names]
    return MergePlan(tensors=tensors, untied=untied, vocab_size=_vocab(tensors, base, layout))


def _check_shared(layout: Layout, changed: dict[str, OutTensor], *, tied: bool) -> None:
    """Refuse to change a weight tied to more than an output head: untying those takes
    more than ``tie_word_embeddings`` (T5's encoder and decoder share the embedding)."""
    group = {layout.embed, *layout.shared} | ({layout.head} if tied else set())
    hit = sorted(group & changed.keys())
    if layout.shared and hit:
        others = ", ".join(f"`{n}`" for n in sorted(group - {layout.embed}))
        raise ReleaseError(
            f"the adapter changes `{hit[0]}`, but in {layout.model} the input embedding "
            f"`{layout.embed}` is one weight with {others}; merging into an embedding tied to "
            "more than the output head is not supported, merge the adapter with peft instead")


def _bias_out(module: LoraModule, sources: dict[str, TensorInfo],
              dtypes: dict[str, str], layout: Layout) -> OutTensor:
    name = resolve(f"{module.module}.bias", sources, layout.prefix)
    if name is None:
        raise ReleaseError(f"adapter has a LoRA bias for `{module.module}` (lora_bias=True) but "
                           "the base layer has no bias, so it cannot be merged")
    src = sources[name]
    if src.shape != module.bias.shape:
        raise ReleaseError(f"adapter tensor `{module.bias.name}` is {module.bias.shape_text()} but "
                           f"base tensor `{name}` is {src.shape_text()}; is the base model right?")
    return OutTensor(name, dtypes[name], src.shape, src, lora_bias=module)


def _vocab(tensors: list[OutTensor], base: dict[str, TensorInfo], layout: Layout) -> int | None:
    rows = {t.name: t.shape[0] for t in tensors if t.name in (layout.embed, layout.head)}
    if len(set(rows.values())) > 1:
        raise ReleaseError(f"merged vocabulary sizes disagree: {rows}; the adapter resized only "
                           "one of the input embedding and the output head")
    before = {base[n].shape[0] for n in rows if n in base}
    new = next(iter(rows.values()), None)
    return new if new is not None and new not in before else None
