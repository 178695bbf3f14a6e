"""The ``evaluate:`` section of params.yaml: fidelity checks and their thresholds.

Pydantic models on :class:`~stages.config.base.ParamsModel`, held in
``Params.evaluate``.  Every threshold is a number a user can read in the model
card next to the figure it bounds.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, Strict, model_validator

from stages.config.base import (
    Count,
    Index,
    ParamsModel,
    PathText,
    Positive,
    Text,
    describe,
    problem,
)
from stages.core.errors import ParamsError

# llama-perplexity prints its KL statistics only over >= 100 scored tokens
# (tools/perplexity/perplexity.cpp: `if (kld.count < 100) return;`), and it
# scores the second half of each chunk, ctx/2 - 1 tokens.
MIN_SCORED_TOKENS = 100
DEFAULT_KEY = "default"


def _question(prompt: str) -> str:
    if not prompt.strip():
        raise problem("is empty; give the question to ask")
    return prompt


class SmokeSettings(ParamsModel):
    """One chat turn per level with llama-completion; it must end by EOS/EOT."""

    prompt: Annotated[Text, AfterValidator(_question)]
    max_tokens: Annotated[int, Strict(), Field(ge=8)]
    repeat_penalty: Annotated[float, Strict(), Field(ge=1.0, le=2.0)]  # 1.0 is off
    # Trainers whose levels get no smoke turn (random weights never stop): the card says
    # so. Here rather than under trainers.<t>: evaluate's DVC params list evaluate.smoke,
    # and DVC cannot list a key that may be absent.
    skip: tuple[Text, ...] = ()

    def runs_for(self, trainer: str) -> bool:
        """Whether ``trainer``'s levels get the smoke turn."""
        return trainer not in self.skip


class ConversionSettings(ParamsModel):
    """HF (transformers, fp32) vs the bf16/f16 GGUF on the same tokens."""

    chunks: Index  # 0 skips it (one HF forward pass per chunk: time, not memory)
    max_kld: Positive

    @property
    def skipped(self) -> bool:
        """Whether ``chunks`` is 0, which skips the check."""
        return self.chunks == 0


class AdapterSettings(ParamsModel):
    """The adapter's effect, shown in the card: the merged model against its base on
    held-out prompts.  Information, no threshold: that the merge holds the adapter is
    checked tensor by tensor (stages/fidelity/adapter_check.py)."""

    prompts: PathText
    max_new_tokens: Count

    @model_validator(mode="before")
    @classmethod
    def _no_threshold(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_kld" in data:
            raise problem("was removed: the adapter's effect is no longer gated (a fine-tune may "
                          "change the model a little), the merge is checked against the adapter "
                          "tensor by tensor instead; delete the line", at="min_kld",
                          got=data["min_kld"])
        return data


class LoraSettings(ParamsModel):
    """The GGUF LoRA (adapter format) on the base GGUF against the merged GGUF."""

    max_kld: Positive = 0.01  # mean KL divergence above which the GGUF LoRA fails


class EvalSettings(ParamsModel):
    """``evaluate:``: the held-out text, chunking, and every check's threshold."""

    text: PathText
    ctx: Annotated[int, Strict(), Field(ge=16, multiple_of=2)]
    chunks: Annotated[int, Strict()]  # enough of them: checked below, with ctx
    max_kld: dict[Text, Positive]
    smoke: SmokeSettings
    conversion: ConversionSettings
    adapter: AdapterSettings
    lora: LoraSettings = LoraSettings()

    @model_validator(mode="after")
    def _enough_chunks(self) -> EvalSettings:
        scored = self.chunks * (self.ctx // 2 - 1)
        if scored < MIN_SCORED_TOKENS:
            raise problem(f"× (`evaluate.ctx`/2 - 1) is {scored} scored tokens; llama-perplexity "
                          f"needs {MIN_SCORED_TOKENS} for its statistics: raise chunks or ctx",
                          at="chunks", got=self.chunks)
        if self.conversion.chunks > self.chunks:
            raise problem(f"is more than the {self.chunks} chunks of the reference "
                          "(`evaluate.chunks`)", at="conversion.chunks", got=self.conversion.chunks)
        return self

    def max_kld_for(self, level: str) -> float:
        """The mean-KLD bound of ``level`` (its own entry, else ``default``)."""
        if level in self.max_kld:
            return self.max_kld[level]
        if DEFAULT_KEY in self.max_kld:
            return self.max_kld[DEFAULT_KEY]
        raise ParamsError(describe("evaluate.max_kld", f"has no entry for level {level} and no "
                                   f"`{DEFAULT_KEY}`; add `{level}: <max mean KLD>`"))

    def check_levels(self, levels: list[str]) -> None:
        """Every threshold names a known level, and every level has one."""
        for key in self.max_kld:
            if key != DEFAULT_KEY and key not in levels:
                raise ParamsError(describe(
                    f"evaluate.max_kld.{key}", "names a level that is not in quantize.levels "
                    f"({', '.join(levels)})"))
        for level in levels:
            self.max_kld_for(level)
