"""Tiny random-weight models of each family our users fine-tune, saved as a user's base
would be (bf16 safetensors, one family sharded, a tokenizer the pinned converter accepts),
and a peft LoRA adapter for each (every linear layer, non-zero ``lora_B``).

The tokenizer is the demo base's (SmolLM2's BPE, vocabulary 49,152) where llama.cpp's
converter accepts it: Llama, Mistral, Qwen3 and Gemma 3 (it knows its pre-tokenizer by
hash).  Gemma 2's and Phi-3's converters read a SentencePiece ``tokenizer.model``: one is
trained here on the evaluation text (:func:`build_sp_tokenizer`, their families' special
tokens and chat templates), with the ``tokenizer.json`` transformers reads made from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "chat_template.jinja", "generation_config.json")
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
    "phi3": ("Phi3Config", {}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
SHARDED = "mistral"  # saved in several shards, as big bases are
# Families whose converter reads a SentencePiece tokenizer.model: its style (SP_STYLES).
SENTENCEPIECE = {"gemma2": "gemma", "phi3": "llama"}


# SentencePiece styles: ids of the special pieces, whether a space is put before the
# text (Llama 2's tokenizer, which Phi-3 keeps) or not (Gemma), the chat pieces, the
# end of a turn (the GGUF's EOS) and the family's chat template.
SP_STYLES = {
    "gemma": {"ids": {"pad": ("<pad>", 0), "eos": ("<eos>", 1), "bos": ("<bos>", 2),
                      "unk": ("<unk>", 3)},
              "dummy_prefix": False, "chat": ["<start_of_turn>", "<end_of_turn>"],
              "eos": "<end_of_turn>",
              "template": "{{ bos_token }}{% for m in messages %}{% set role = 'model' if "
                          "m['role'] == 'assistant' else m['role'] %}<start_of_turn>{{ role }}\n"
                          "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                          "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"},
    "llama": {"ids": {"unk": ("<unk>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2)},
              "dummy_prefix": True,
              "chat": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
              "eos": "<|end|>",
              # llama.cpp gives these RSTRIP for a model named phi3 (llama-vocab.cpp), as
              # Phi-3's tokenizer.json does; it also needs <|endoftext|> in the vocabulary.
              "rstrip": ["</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
              "template": "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
                          "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '<|assistant|>\n' }}{% endif %}"},
}


def build_sp_tokenizer(out: Path, style: str, text: Path, *, vocab: int = 640) -> Path:
    """A SentencePiece BPE model trained on ``text`` (byte fallback, no normalisation) in
    ``style`` (:data:`SP_STYLES`), and the same tokenizer for transformers: a
    ``tokenizer.json`` whose merges are the SentencePiece pieces ranked by id (how
    transformers converts Llama's and Gemma's).  A folder ``build_base`` takes."""
    import sentencepiece as spm
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
    )

    spec = SP_STYLES[style]
    out.mkdir(parents=True, exist_ok=True)
    ids = {f"{k}_id": i for k, (_, i) in spec["ids"].items()}
    pieces = {f"{k}_piece": p for k, (p, _) in spec["ids"].items()}
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "tokenizer"), vocab_size=vocab,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0,
        add_dummy_prefix=spec["dummy_prefix"], user_defined_symbols=spec["chat"],
        minloglevel=2, **ids, **pieces, **({} if "pad_id" in ids else {"pad_id": -1}))
    (out / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    plain = [(p, i) for p, i in vocab_ids.items() if not (sp.is_control(i) or sp.is_unknown(i)
             or sp.is_byte(i) or p in spec["chat"])]
    merges = sorted((i, p[:k], p[k:]) for p, i in plain for k in range(1, len(p))
                    if p[:k] in vocab_ids and p[k:] in vocab_ids)
    tok = Tokenizer(models.BPE(vocab=vocab_ids, merges=[(a, b) for _, a, b in merges],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["dummy_prefix"]:  # before each piece of text, after special tokens too
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(steps)
    bos = spec["ids"]["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
    special = [p for p, _ in spec["ids"].values()] + spec["chat"]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False,
                                       rstrip=p in spec.get("rstrip", ())) for p in special])
    tok.save(str(out / "tokenizer.json"))
    eos = spec["eos"]
    # As transformers saves them (and the converter marks them CONTROL from here).
    decoder = {str(vocab_ids[p]): {"content": p, "special": True, "normalized": False,
                                   "lstrip": False, "rstrip": p in spec.get("rstrip", ()),
                                   "single_word": False} for p in special}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder,
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
        "add_eos_token": False, "bos_token": bos[0], "eos_token": eos, "unk_token": "<unk>",
        **({"pad_token": spec["ids"]["pad"][0]} if "pad" in spec["ids"] else {})}, indent=2))
    (out / "chat_template.jinja").write_text(spec["template"])
    special_ids = {"bos_token_id": bos[1], "eos_token_id": vocab_ids[eos],
                   "pad_token_id": spec["ids"].get("pad", spec["ids"]["unk"])[1]}
    (out / "generation_config.json").write_text(json.dumps(special_ids))
    (out / "config.json").write_text(json.dumps({"vocab_size": sp.get_piece_size(),
                                                 **special_ids}))
    return out


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
