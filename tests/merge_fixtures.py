"""Builders for the merge tests: real peft adapters, pico models, float64 references.

Plain functions (the fixtures that call them live in the test modules), so the
expensive SmolLM2 adapters can be built once per session.  The reference merge
here is written from peft's formulas on whole float64 tensors and shares no
code with stages/lora.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# SmolLM2's vocabulary (49152) plus 8 added tokens.
ADDED_TOKENS = [f"<|extra_{i}|>" for i in range(8)]
NEW_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def load_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (all shards), as stored."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def randomise(model: torch.nn.Module, seed: int, *, std: float = 0.02) -> None:
    """Give every adapter parameter non-trivial values (peft starts B at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand(param.shape, generator=gen))
            elif "modules_to_save" in name or (name.endswith(".bias") and param.requires_grad):
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * std)


def peft_config(kind: str = "Lora", **kwargs):
    """``peft.<kind>Config(**kwargs)``; peft (and transformers, ~6 s) imported only when a
    test builds an adapter, not when pytest collects the modules."""
    import peft

    return getattr(peft, f"{kind}Config")(**kwargs)


def build_peft_adapter(base: Path, out: Path, config, *, seed: int = 0, std: float = 0.02,
                       resize: int | None = None, tokenizer: bool = False) -> Path:
    """A real adapter: peft.get_peft_model on ``base``, randomised (``std``), saved."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    peft_model = get_peft_model(model, config)
    randomise(peft_model, seed, std=std)
    peft_model.save_pretrained(out)
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(base)
        tok.add_tokens(ADDED_TOKENS, special_tokens=True)
        tok.chat_template = NEW_TEMPLATE
        tok.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, *, resize: int | None = None) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload result, as an in-memory state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


# Adapter variants on the pico Llamas (test_merge.py, test_adapter_check.py): which
# pico (tied, untied, bias) and the LoraConfig arguments.
PICO_VARIANTS = {
    "dora": ("untied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            use_dora=True)),
    "patterns": ("untied", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                rank_pattern={r"layers\.1\.mlp\.up_proj": 2, "o_proj": 3},
                                alpha_pattern={"k_proj": 5})),
    "rslora_lm_head": ("untied", dict(r=4, lora_alpha=7, use_rslora=True,
                                      target_modules=["lm_head", "gate_proj"])),
    "lora_bias": ("bias", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                               lora_bias=True)),
    "bias_all": ("bias", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")),
    "embed_lora_tied": ("tied", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "lm_head_lora_tied": ("tied", dict(r=4, lora_alpha=8, target_modules=["lm_head"])),
    "save_embed_tied": ("tied", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                     modules_to_save=["embed_tokens"])),
}


def build_pico(out: Path, *, seed: int = 0, tied: bool = True, hidden: int = 16,
               vocab: int = 64, bias: bool = False, shard: str = "8KB") -> Path:
    """A two-layer Llama with a tiny hidden size, saved bf16 in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                         tie_word_embeddings=tied, attention_bias=bias,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.save_pretrained(out, max_shard_size=shard)
    return out


# Tied families whose embedding is not Llama's: config class, its arguments, the
# input embedding's tensor name.  Tied by their config classes' default.
PICO_FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=64,
                                bos_token_id=1, eos_token_id=2), "transformer.wte.weight"),
    "opt": ("OPTConfig", dict(hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                              num_attention_heads=2, vocab_size=64, word_embed_proj_dim=16,
                              max_position_embeddings=64), "model.decoder.embed_tokens.weight"),
    "bloom": ("BloomConfig", dict(hidden_size=16, n_layer=2, n_head=2, vocab_size=64),
              "transformer.word_embeddings.weight"),
}


def build_pico_family(out: Path, family: str, *, seed: int = 0) -> Path:
    """A two-layer model of ``family`` (PICO_FAMILIES), tied, saved bf16."""
    import transformers

    config_class, kwargs, _ = PICO_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def write_adapter(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A hand-written adapter folder (for key layouts peft no longer writes)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors")
    return out


def _pattern(patterns: dict, module: str, default: float) -> float:
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _normal(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX).replace(".default", "")


def _scale(cfg: dict, module: str) -> float:
    r = _pattern(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _merged_lora(w: torch.Tensor, found: dict, module: str, scale: float,
                 fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """W + s·B@A (DoRA-scaled if a magnitude is saved), and its fp32 error bound."""
    embedding = f"{module}.lora_embedding_A" in found
    a = found[f"{module}.lora_embedding_A" if embedding else f"{module}.lora_A.weight"]
    b = found[f"{module}.lora_embedding_B" if embedding else f"{module}.lora_B.weight"]
    delta, size = scale * (b @ a), scale * (b.abs() @ a.abs())
    if embedding or fan_in_fan_out:
        delta, size = delta.T, size.T
    weight = w + delta
    bound = (a.shape[0] + 4) * 2.0**-24 * (w.abs() + size)
    if f"{module}.lora_magnitude_vector" in found:
        norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
        factor = found[f"{module}.lora_magnitude_vector"].unsqueeze(1) / norm
        weight = factor * weight
        bound = factor.abs() * bound + (weight.shape[1] + 4) * 2.0**-24 * weight.abs()
    return weight, bound


def reference_merge(base: Path, adapter: Path, *, embed: str = EMBED, head: str = LM_HEAD,
                    conv1d: set[str] | None = None) -> tuple[dict, set[str], dict]:
    """The exact merged model in float64 (whole tensors, peft's formulas).

    Also returns the names of the tensors the adapter changes, and for merged
    tensors the worst-case error of computing them in fp32 (Higham's bound
    γ_n·(|W| + s·|B|@|A|), n = r + 4, ×(row length) more for DoRA's norm): an
    fp32 merge may round to the other neighbour only within that distance.

    ``embed`` / ``head``: the input embedding and output head; a base without
    ``head`` is tied, and its merged head is the original embedding unless the
    adapter changes it (peft wraps only the layer it targets).  ``conv1d``: the
    modules stored in×out (GPT-2's Conv1D), which peft transposes whatever the
    saved ``fan_in_fan_out`` says (it transposes no nn.Linear); None: as saved.
    """
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    found = {_normal(k): v.double() for k, v in
             load_file(adapter / "adapter_model.safetensors").items()}
    ref = {k: v.double() for k, v in load_model_tensors(base).items()}
    tied = head not in ref
    if tied:
        ref[head] = ref[embed].clone()
    changed, bounds = set(), {}
    for key, value in found.items():
        if ".original_module." in key or ".lora_" in key:
            continue
        # peft saves a modules_to_save copy under both names; base_layer copies are
        # the (possibly trained, bias="all") base tensors under a LoRA layer
        name = key.replace(".modules_to_save", "").replace(".base_layer", "")
        ref[name] = value
        changed.add(name)
    for key in [k for k in found if k.endswith((".lora_A.weight", ".lora_embedding_A"))]:
        module = key.rsplit(".lora_", 1)[0]
        scale = _scale(cfg, module)
        fan_in_fan_out = cfg.get("fan_in_fan_out", False) if conv1d is None else module in conv1d
        ref[f"{module}.weight"], bounds[f"{module}.weight"] = _merged_lora(
            ref[f"{module}.weight"], found, module, scale, fan_in_fan_out)
        changed.add(f"{module}.weight")
        if f"{module}.lora_B.bias" in found:
            ref[f"{module}.bias"] = ref[f"{module}.bias"] + scale * found[f"{module}.lora_B.bias"]
            changed.add(f"{module}.bias")
    if tied and not {embed, head} & changed:
        del ref[head]
    return ref, changed, bounds


def rounding_error(ours: torch.Tensor, ref: torch.Tensor,
                   bound: torch.Tensor | float = 0.0) -> tuple[float, float]:
    """(excess, mean error) of a bf16 ``ours`` against the exact ``ref``.

    excess: how far ``ours`` strays beyond rounding, in bf16 half-steps; 0 when
    every element is ``ref`` rounded to bf16, or the other neighbour where
    ``ref`` lies within ``bound`` (the fp32 error bound) of the midpoint.
    """
    error = (ours.double() - ref).abs_()
    # half a bf16 step at |ours|: 2^(exponent - 127 - 8), exponent from the bits
    exponent = (ours.view(torch.int16).int() >> 7) & 0xFF
    half_step = torch.exp2((exponent.clamp_min(1) - 135).double())
    excess = ((error - bound) / half_step - 1).clamp_min_(0).max()
    return float(excess), float(error.mean())
