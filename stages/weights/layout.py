"""Which tensors of a base are its input embedding and output head, and are they tied.

A LoRA (or a ``modules_to_save`` copy) on one side of a tied embedding unties
it: the merged model needs an explicit head, and the merge must know both
names.  They differ by family (Llama's ``model.embed_tokens`` and ``lm_head``,
GPT-2's ``transformer.wte``, Bloom's and Falcon's ``transformer.word_embeddings``,
OPT's ``model.decoder.embed_tokens``), and so does the default of
``tie_word_embeddings`` when config.json leaves it out (True for GPT-2, False
for Llama).  So they are read from the model itself: transformers builds the
base's architecture on the meta device (no weights, no memory) and says which
module is the input embedding, which the output head, and which parameters
are one.

That means importing transformers (2-5 s), so it is done only when the adapter
touches a tensor that may be one of them: one with vocabulary rows, one the
base lacks (a tied head), or a resized one.  Otherwise, or when transformers
cannot build the model, Llama's names are assumed, as before; a model without
them whose tie cannot be read is refused rather than guessed at.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import ReleaseError
from stages.weights.lora import EMBED, LM_HEAD, Adapter, Layout, resolve
from stages.weights.safetensors_io import TensorInfo


def vocab_sizes(config: dict) -> set[int]:
    """Every ``vocab_size`` in config.json, nested ones (``text_config``) included."""
    found: set[int] = set()
    for key, value in config.items():
        if key == "vocab_size" and isinstance(value, int):
            found.add(value)
        elif isinstance(value, dict):
            found |= vocab_sizes(value)
    return found


def vocabulary_tensor(base: dict[str, TensorInfo], adapter: Adapter,
                      vocab: set[int]) -> str | None:
    """The first tensor the adapter changes that may be an input embedding or output
    head (described for messages), or None when it changes none."""
    def suspect(name: str, shape: tuple[int, ...] | None) -> str | None:
        found = resolve(name, base)
        if found is None:
            return f"`{name}`, which the base has no tensor for"
        info = base[found]
        if shape is not None and shape != info.shape:
            return f"`{found}` (resized from {info.shape_text()})"
        if not vocab or (len(info.shape) == 2 and info.shape[0] in vocab):
            return f"`{found}` ({info.shape_text()})"
        return None

    changes = [(f"{m.module}.weight", None) for m in adapter.modules.values()]
    changes += [(name, info.shape) for name, info in (*adapter.tensors.items(),
                                                       *adapter.base_layers.items())]
    return next((hit for name, shape in changes if (hit := suspect(name, shape))), None)


def llama_layout(config: dict, tensors: dict[str, TensorInfo]) -> Layout:
    """Llama's names, tied when config.json says so or the shards have no head."""
    if EMBED not in tensors:
        return Layout()
    tied = bool(config.get("tie_word_embeddings")) or LM_HEAD not in tensors
    return Layout(embed=EMBED, head=LM_HEAD, tied=tied)


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers' config warnings (token ids outside a tiny vocabulary, ...) off."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def transformers_layout(base: Path, config: dict, tensors: dict[str, TensorInfo]) -> Layout | str:
    """The layout of the base's own architecture, built on the meta device, or why not."""
    model_type = config.get("model_type")
    if not model_type:
        return f"{base / 'config.json'} names no model_type"
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D
    except ImportError as exc:
        return f"transformers cannot be imported ({exc})"
    try:
        with _quiet(transformers):
            # Never trust_remote_code: a model transformers does not ship is not built.
            hf_config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=False)
            # The class the checkpoint was saved from (its tensor names), unless it has no
            # head (a bare GPT2Model): then the causal LM a trainer would have loaded.
            classes = [getattr(transformers, a, None) for a in hf_config.architectures or []]
            for build in [*(c._from_config for c in classes if hasattr(c, "_from_config")),
                          transformers.AutoModelForCausalLM.from_config]:
                with torch.device("meta"):
                    model = build(hf_config)
                inp, out = model.get_input_embeddings(), model.get_output_embeddings()
                if out is not None:
                    break
    except Exception as exc:  # noqa: BLE001 - any failure only means "not known", never a guess
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return (f"transformers {transformers.__version__} cannot build model_type "
                f"`{model_type}` ({type(exc).__name__}: {first})")
    weight = getattr(inp, "weight", None)
    if weight is None:
        return f"{type(model).__name__} has no input embedding weight"
    module_names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), name)
    tied_to_embedding = [name for name, param in model.named_parameters(remove_duplicate=False)
                         if param is weight]
    prefix = getattr(model, "base_model_prefix", "") or "model"
    embed = f"{module_names[id(inp)]}.weight"
    head = (f"{module_names[id(out)]}.weight"
            if getattr(out, "weight", None) is not None and id(out) in module_names else None)

    def on_disk(name: str) -> str:
        return resolve(name, tensors, prefix) or name

    return Layout(
        embed=on_disk(embed), head=on_disk(head) if head else None,
        tied=head is not None and out.weight is weight,
        shared=tuple(on_disk(n) for n in tied_to_embedding if n not in (embed, head)),
        prefix=prefix, model=type(model).__name__,
        conv1d=frozenset(n for n, m in model.named_modules() if isinstance(m, Conv1D)),
        linear=frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)))


def model_layout(base: Path, config: dict, tensors: dict[str, TensorInfo],
                 adapter: Adapter) -> Layout:
    """The layout the merge plans with (see the module docstring)."""
    touched = vocabulary_tensor(tensors, adapter, vocab_sizes(config))
    if touched is None:
        return llama_layout(config, tensors)  # embedding and head stay as they are
    found = transformers_layout(base, config, tensors)
    if isinstance(found, Layout):
        return found
    if EMBED in tensors:
        return llama_layout(config, tensors)
    if config.get("tie_word_embeddings") is False:
        return Layout(unknown=found)
    raise ReleaseError(
        f"the adapter changes {touched}, which may be the input embedding or the output head "
        f"of {base}, but which tensors those are, and whether they are tied, cannot be told: "
        f"{found}. Merging could silently give the model a wrong output head; merge the "
        "adapter with peft instead")
