"""The release pipeline's code.

A module directly in ``stages/`` is something you run, ``python -m
stages.<name> --help``: the DVC stages (merge, convert, quantize, logits, reference,
evaluate, card, push) and the commands behind make targets (params, pick,
summary, tools).  Each is a thin CLI: argv -> params -> one library call.
Stages never import each other.

The libraries are the folders: ``core`` (errors, stage skeleton, atomic
writes, hashing, preflight), ``config`` (params.yaml schema), ``weights``
(safetensors I/O, LoRA merge), ``llamacpp`` (tools, convert, quantize, GGUF
metadata), ``fidelity`` (checks), ``release`` (card, manifest, publishers).
``demo/`` holds the stages that build the demo's inputs.
"""
