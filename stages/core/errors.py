"""The one exception hierarchy for expected failures.

Every message says what failed, the value seen, and what to do about it.  The
stage skeleton (:func:`stages.core.cli.run_stage`) turns any of them into a
single ``error: ...`` line and a non-zero exit; a traceback is shown only with
``--debug``.  Anything else escaping a stage is a bug of ours.
"""


class ReleaseError(Exception):
    """An expected failure: bad params, bad inputs, a tool that failed."""


class ParamsError(ReleaseError):
    """params.yaml is not what the pipeline needs (the message names the dotted key)."""


class InputError(ReleaseError):
    """An input file (base model, adapter, tokenizer, lineage, GGUF) is missing or unusable."""


class ToolError(ReleaseError):
    """A llama.cpp tool is missing, could not be built, or failed."""


class CheckFailed(ReleaseError):
    """A fidelity check did not hold: the artifact must not be released."""
