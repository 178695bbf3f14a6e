"""The ``evaluate:`` section of params.yaml: fidelity checks and their thresholds.

Validated frozen dataclasses, like :mod:`stages.params` (which holds them in
``Params.evaluate``).  Every threshold is a number a user can read in the
model card next to the figure it bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import ReleaseError
from stages.config.schema import need, unknown

# llama-perplexity prints its KL statistics only over >= 100 scored tokens
# (tools/perplexity/perplexity.cpp: `if (kld.count < 100) return;`), and it
# scores the second half of each chunk, ctx/2 - 1 tokens.
MIN_SCORED_TOKENS = 100
DEFAULT_KEY = "default"


@dataclass(frozen=True)
class SmokeSettings:
    """One chat turn per level with llama-completion; it must end by EOS/EOT."""

    prompt: str
    max_tokens: int
    repeat_penalty: float

    @classmethod
    def parse(cls, data: Any, where: str) -> SmokeSettings:
        unknown(data, {"prompt", "max_tokens", "repeat_penalty"}, where)
        prompt = need(data, "prompt", where, str)
        max_tokens = need(data, "max_tokens", where, int)
        penalty = float(need(data, "repeat_penalty", where, (int, float)))
        if not prompt.strip():
            raise ReleaseError(f"params: `{where}.prompt` is empty; give the question to ask")
        if max_tokens < 8:
            raise ReleaseError(f"params: `{where}.max_tokens` is {max_tokens}; use at least 8")
        if not 1.0 <= penalty <= 2.0:
            raise ReleaseError(f"params: `{where}.repeat_penalty` is {penalty}; use 1.0 (off) "
                               "to 2.0")
        return cls(prompt=prompt, max_tokens=max_tokens, repeat_penalty=penalty)


@dataclass(frozen=True)
class ConversionSettings:
    """HF (transformers, fp32) vs the bf16/f16 GGUF on the same tokens."""

    chunks: int  # 0 skips the check (a model too big to load whole here)
    max_kld: float

    @property
    def skipped(self) -> bool:
        return self.chunks == 0

    @classmethod
    def parse(cls, data: Any, where: str) -> ConversionSettings:
        unknown(data, {"chunks", "max_kld"}, where)
        chunks = need(data, "chunks", where, int)
        max_kld = float(need(data, "max_kld", where, (int, float)))
        if chunks < 0:
            raise ReleaseError(f"params: `{where}.chunks` is {chunks}; use 0 (skip) or more")
        _positive(max_kld, f"{where}.max_kld")
        return cls(chunks=chunks, max_kld=max_kld)


@dataclass(frozen=True)
class AdapterSettings:
    """The merged model must answer differently from its base."""

    prompts: Path
    min_kld: float
    max_new_tokens: int

    @classmethod
    def parse(cls, data: Any, where: str) -> AdapterSettings:
        unknown(data, {"prompts", "min_kld", "max_new_tokens"}, where)
        min_kld = float(need(data, "min_kld", where, (int, float)))
        max_new_tokens = need(data, "max_new_tokens", where, int)
        _positive(min_kld, f"{where}.min_kld")
        if max_new_tokens < 1:
            raise ReleaseError(f"params: `{where}.max_new_tokens` must be positive")
        return cls(prompts=Path(need(data, "prompts", where, str)), min_kld=min_kld,
                   max_new_tokens=max_new_tokens)


@dataclass(frozen=True)
class EvalSettings:
    """``evaluate:``: the held-out text, chunking, and every check's threshold."""

    text: Path
    ctx: int
    chunks: int
    max_kld: dict[str, float]
    smoke: SmokeSettings
    conversion: ConversionSettings
    adapter: AdapterSettings

    def __post_init__(self) -> None:
        if self.ctx < 16 or self.ctx % 2:
            raise ReleaseError(f"params: `evaluate.ctx` is {self.ctx}; use an even number >= 16")
        if self.chunks * (self.ctx // 2 - 1) < MIN_SCORED_TOKENS:
            raise ReleaseError(
                f"params: `evaluate.chunks` × (`evaluate.ctx`/2 - 1) is "
                f"{self.chunks * (self.ctx // 2 - 1)} scored tokens; llama-perplexity needs "
                f"{MIN_SCORED_TOKENS} for its statistics: raise chunks or ctx")
        if self.conversion.chunks > self.chunks:
            raise ReleaseError(
                f"params: `evaluate.conversion.chunks` is {self.conversion.chunks}, more than "
                f"the {self.chunks} chunks of the reference (`evaluate.chunks`)")

    def max_kld_for(self, level: str) -> float:
        """The mean-KLD bound of ``level`` (its own entry, else ``default``)."""
        if level in self.max_kld:
            return self.max_kld[level]
        if DEFAULT_KEY in self.max_kld:
            return self.max_kld[DEFAULT_KEY]
        raise ReleaseError(f"params: `evaluate.max_kld` has no entry for level {level} and no "
                           f"`{DEFAULT_KEY}`; add `{level}: <max mean KLD>`")

    def check_levels(self, levels: list[str]) -> None:
        """Every threshold names a known level, and every level has one."""
        for key in self.max_kld:
            if key != DEFAULT_KEY and key not in levels:
                raise ReleaseError(
                    f"params: `evaluate.max_kld.{key}` names a level that is not in "
                    f"quantize.levels ({', '.join(levels)})")
        for level in levels:
            self.max_kld_for(level)

    @classmethod
    def parse(cls, data: Any) -> EvalSettings:
        where = "evaluate"
        unknown(data, {"text", "ctx", "chunks", "max_kld", "smoke", "conversion", "adapter"}, where)
        bounds = need(data, "max_kld", where, dict)
        max_kld = {str(k): float(need(bounds, k, f"{where}.max_kld", (int, float)))
                   for k in bounds}
        for key, value in max_kld.items():
            _positive(value, f"{where}.max_kld.{key}")
        return cls(
            text=Path(need(data, "text", where, str)),
            ctx=need(data, "ctx", where, int),
            chunks=need(data, "chunks", where, int),
            max_kld=max_kld,
            smoke=SmokeSettings.parse(need(data, "smoke", where, dict), f"{where}.smoke"),
            conversion=ConversionSettings.parse(need(data, "conversion", where, dict),
                                                f"{where}.conversion"),
            adapter=AdapterSettings.parse(need(data, "adapter", where, dict), f"{where}.adapter"),
        )


def parse_overrides(data: dict, where: str) -> tuple[str | None, str | None]:
    """A trainer's optional ``chat_template`` and ``eos_token`` overrides."""
    found: list[str | None] = []
    for key in ("chat_template", "eos_token"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ReleaseError(
                f"params: `{where}.{key}` is {value!r}; give the {key.replace('_', ' ')} text, "
                "or remove the key to keep the trainer's own")
        found.append(value)
    return found[0], found[1]


def _positive(value: float, where: str) -> None:
    if not value > 0:
        raise ReleaseError(f"params: `{where}` is {value!r}; it must be a positive number")
