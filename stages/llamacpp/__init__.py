"""llamacpp: the pinned llama.cpp, its tools and its file format.

``tools`` (build once per version into the user cache, locate and run the
tools with their output captured), ``convert`` (HF folder -> bf16/f16 GGUF with
the vendored ``convert_hf_to_gguf.py``), ``quantize`` (one level with
llama-quantize, and its record), ``split`` (a GGUF in shards with
llama-gguf-split, named as llama.cpp loads them), ``lora`` (a peft LoRA -> a GGUF
LoRA with the vendored ``convert_lora_to_gguf.py``, and what of an adapter it cannot
hold) and ``gguf_meta`` (what a GGUF says about its chat template, special tokens and
bits per weight).
"""
