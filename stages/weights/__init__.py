"""weights: Hugging Face safetensors I/O and the LoRA merge, in flat memory.

``safetensors_io`` (header-only reads, one tensor at a time with pread, a shard
writer that plans HF shard names + index and writes each tensor at its offset),
``lora`` (reading a peft/Unsloth adapter and planning the merge: which base
tensor each LoRA pair, whole tensor or bias lands in; no torch), ``lora_math``
(the fp32 arithmetic, a few rows at a time; the only torch import) and
``merge`` (the engine: preflight, threads, side files, the merged folder).
"""
