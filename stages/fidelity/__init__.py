"""fidelity: does every GGUF behave like the model we trained?

``llama_checks`` (llama.cpp side: base logits of the full-precision GGUF, KL
divergence of a level against them, one smoke chat turn) and ``hf_checks``
(transformers side: chat template and special tokens against the GGUF's,
HF-vs-GGUF conversion on the very tokens llama.cpp scored, the adapter's
effect merged vs base, shown in the card) and ``adapter_check`` (the merged
files are the adapter applied to the base, tensor by tensor against peft's
own merge, streamed).  The ``logits``, ``reference`` and ``evaluate`` stages turn their
figures into pass/fail against ``evaluate:`` in params.yaml.
"""
