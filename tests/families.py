"""Tiny random-weight models of each family our users fine-tune, saved as a user's base
would be (bf16 safetensors, one family sharded, a tokenizer the pinned converter accepts),
and a peft LoRA adapter for each (every linear layer, non-zero ``lora_B``).

The tokenizer is the demo base's (SmolLM2's BPE, vocabulary 49,152): llama.cpp's
converter accepts it for Llama, Mistral, Qwen3 and Gemma 3 (it knows its pre-tokenizer
by hash).  What each family's converter wants instead is in :data:`FAMILIES`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# family: (config class, config arguments beyond SMALL, LoRA target modules)
FAMILIES: dict[str, tuple[str, dict, list[str]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True},
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mistral": ("MistralConfig", {"sliding_window": None},
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True},
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True},
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                "sliding_window": 64},
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                    "sliding_window": 64},
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": ("Phi3Config", {"pad_token_id": 2},
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
SHARDED = "mistral"  # saved in several shards, as big bases are


def build_base(out: Path, family: str, tokenizer: Path, *, seed: int = 0) -> Path:
    """``family``'s tiny model with random weights, bf16, and the tokenizer of ``tokenizer``."""
    import transformers

    config_class, extra, _ = FAMILIES[family]
    vocab = json.loads((tokenizer / "config.json").read_text())["vocab_size"]
    special = {k: v for k, v in json.loads((tokenizer / "config.json").read_text()).items()
               if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = getattr(transformers, config_class)(**{**SMALL, **special, **extra,
                                                    "vocab_size": vocab})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out, max_shard_size="2MB" if family == SHARDED else "1GB")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, out / name)
    return out


def build_adapter(out: Path, base: Path, family: str, *, seed: int = 1) -> Path:
    """A LoRA on every linear layer of ``base`` (r=4), ``lora_B`` random (non-zero), saved by
    peft with the tokenizer, and a training_lineage.json beside it, as a trainer's run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=FAMILIES[family][2]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    final = out / "final_model"
    peft_model.save_pretrained(final)
    AutoTokenizer.from_pretrained(base).save_pretrained(final)
    (out / "training_lineage.json").write_text(json.dumps(
        {"trainer": "sft", "method": "lora", "note": f"tiny random {family} adapter (tests)"}))
    return final
