"""Measure one quantized GGUF against its trainer's full-precision reference.

Reads:  ``--gguf`` (one level's GGUF), ``--logits`` (the base log-probs that
        logits@<trainer> saved from the bf16/f16 GGUF) and the ``evaluate:``
        settings in params.yaml.
Writes: ``--out`` (``<LEVEL>.json``, DVC metrics: size, bits per weight, mean
        and 99th-percentile KL divergence, PPL(Q)/PPL(base), same top token %,
        smoke pass) and, beside it, ``<LEVEL>.details.json`` (every figure, the
        smoke reply, the thresholds).

Two checks, each failing the stage with the figures when it does not hold:
the mean KL divergence stays under ``evaluate.max_kld`` of the level, and one
greedy chat turn with the chat template embedded in the GGUF stops on an
EOS/end-of-turn token before ``evaluate.smoke.max_tokens``, with a reply that
is not empty.

One DVC stage per trainer × level, so changing one level re-evaluates only it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.config.params import Params, load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.fidelity.llama_checks import KldStats, SmokeRun, kl_divergence, smoke_chat
from stages.llamacpp import tools as llamacpp
from stages.llamacpp.gguf_meta import bits_per_weight, chat_info, open_reader

log = logging.getLogger(__name__)

MIB = 2**20


@dataclass(frozen=True)
class EvalResult:
    level: str
    out: Path
    details: Path
    metrics: dict
    kld: KldStats
    smoke: SmokeRun | None  # None: evaluate.smoke.skip names the trainer


def details_path(out: Path) -> Path:
    """``<LEVEL>.details.json`` beside the metrics file ``<LEVEL>.json``."""
    return out.with_suffix(".details.json")


def metrics(*, size: int, bpw: float, kld: KldStats, smoke: SmokeRun | None) -> dict:
    """The DVC metrics of one level: the columns of `dvc metrics show`."""
    return {"size_mib": round(size / MIB, 2), "bpw": round(bpw, 3),
            "kld_mean": round(kld.kld_mean, 6), "kld_p99": round(kld.kld_p99, 6),
            "ppl_ratio": round(kld.ppl_ratio, 6), "top1_pct": round(kld.top1_pct, 3),
            "smoke_pass": smoke.stopped if smoke else None}


def token_text(reader, token_id: int | None) -> str | None:
    """A token's text as llama.cpp prints it (byte-level BPE and SentencePiece spaces)."""
    tokens = reader.get("tokenizer.ggml.tokens") or []
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id].replace("\u0120", " ").replace("\u2581", " ")


def check_level(*, level: str, kld: KldStats, max_kld: float, smoke: SmokeRun | None,
                bos_id: int | None, eos_text: str | None = None) -> None:
    """Fail with the figures when ``level`` is beyond its threshold or does not stop."""
    if kld.kld_mean > max_kld:
        raise ReleaseError(
            f"{level}: mean KL divergence from the full-precision GGUF is {kld.kld_mean:.5f}, "
            f"above evaluate.max_kld for {level} ({max_kld}); 99th percentile {kld.kld_p99:.4f}, "
            f"same top token {kld.top1_pct:.2f}%, PPL ratio {kld.ppl_ratio:.4f}. Use a larger "
            "level (or level options), or raise the threshold if this quality is acceptable.")
    if smoke is None:  # no smoke turn, so no reply and no prompt tokens to check
        return
    if not smoke.stopped:
        raise ReleaseError(
            f"{level}: the smoke reply did not stop: {smoke.tokens} tokens without EOS or "
            f"end-of-turn (evaluate.smoke.max_tokens = {smoke.max_tokens}); it began "
            f"{smoke.text[:120]!r}. Check the chat template and EOS (reference stage) and the "
            "fine-tune itself.")
    # llama-completion echoes an end-of-generation token that is not a control token: a
    # reply that is only the EOS's text ended at once too
    if not smoke.text.strip() or (eos_text and smoke.text.strip() == eos_text.strip()):
        raise ReleaseError(
            f"{level}: the smoke reply is empty: the model ended its turn at once "
            f"({smoke.tokens} token{'s' if smoke.tokens != 1 else ''}, an end-of-generation "
            "token first). Check EOS and the end-of-turn tokens (reference stage: chat template "
            "and special tokens) and the fine-tune itself.")
    if bos_id is not None and list(smoke.prompt_ids[:2]) == [bos_id, bos_id]:
        raise ReleaseError(f"{level}: llama-completion fed two BOS tokens ({bos_id}) before the "
                           "prompt; the chat template writes BOS and the GGUF adds it too.")


def run(*, params: Params, level: str, gguf: Path, logits: Path, out: Path,
        trainer: str | None = None) -> EvalResult:
    """Measure ``gguf`` (level ``level``) against ``logits``; write ``out`` and details.

    The smoke turn is not run for a trainer that ``evaluate.smoke.skip`` names."""
    ev = params.evaluate
    if trainer is not None:
        params.trainer(trainer)  # a known one, or the list
    max_kld = ev.max_kld_for(params.level(level).name)
    for path, stage in ((gguf, "quantize"), (logits, "logits")):
        if not path.is_file():
            raise ReleaseError(f"{path} not found; run its {stage} stage first")
    start = time.monotonic()
    kld = kl_divergence(tool=llamacpp.tool_path("llama-perplexity", params.llama_cpp_version),
                        gguf=gguf, base=logits, ctx=ev.ctx)
    log.info("%s: KLD mean %.5f, p99 %.4f, PPL ratio %.4f, same top %.2f%%", level,
             kld.kld_mean, kld.kld_p99, kld.ppl_ratio, kld.top1_pct)
    smoke = None
    if trainer is None or ev.smoke.runs_for(trainer):
        smoke = smoke_chat(tool=llamacpp.tool_path("llama-completion", params.llama_cpp_version),
                           gguf=gguf, prompt=ev.smoke.prompt, max_tokens=ev.smoke.max_tokens,
                           repeat_penalty=ev.smoke.repeat_penalty)
        log.info("%s: smoke reply (%d tokens, %s): %s", level, smoke.tokens,
                 "stopped" if smoke.stopped else "hit the limit", smoke.text)
    else:
        log.info("%s: no smoke turn (evaluate.smoke.skip names trainer %s)", level, trainer)
    reader = open_reader(gguf)
    info = chat_info(reader)
    check_level(level=level, kld=kld, max_kld=max_kld, smoke=smoke, bos_id=info.bos_id,
                eos_text=token_text(reader, info.eos_id))
    size = gguf.stat().st_size
    values = metrics(size=size, bpw=bits_per_weight(reader, gguf), kld=kld, smoke=smoke)
    details = {"level": level, "file": gguf.name, "bytes": size, **values,
               "kld": asdict(kld), "max_kld": max_kld,
               "smoke": {"prompt": ev.smoke.prompt, "reply": smoke.text, "tokens": smoke.tokens,
                         "max_tokens": smoke.max_tokens, "stopped": smoke.stopped,
                         "repeat_penalty": ev.smoke.repeat_penalty} if smoke else
                        {"skipped": "evaluate.smoke.skip"},
               "seconds": round(time.monotonic() - start, 1)}
    atomic.write_text(details_path(out), json.dumps(details, indent=2, ensure_ascii=False) + "\n")
    atomic.write_text(out, json.dumps(values, indent=2) + "\n")
    log.info("wrote %s in %.0f s", out, details["seconds"])
    return EvalResult(level=level, out=out, details=details_path(out), metrics=values, kld=kld,
                      smoke=smoke)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.evaluate", "Measure one level's GGUF against its trainer's reference: "
        "KL divergence, PPL ratio, same top token (llama-perplexity) and a smoke chat turn "
        "(llama-completion).")
    parser.add_argument("--level", required=True, help="a key of quantize.levels, e.g. Q4_K_M")
    parser.add_argument("--gguf", type=Path, required=True, help="the level's GGUF")
    parser.add_argument("--logits", type=Path, required=True,
                        help="base-logits file written by the logits stage")
    parser.add_argument("--out", type=Path, required=True,
                        help="<LEVEL>.json metrics file to write (details go beside it)")
    parser.add_argument("--trainer", help="trainer key in params.yaml: no smoke turn when "
                        "evaluate.smoke.skip names it (default: run it)")

    def body(args) -> None:
        run(params=load_params(args.params), level=args.level, gguf=args.gguf,
            logits=args.logits, out=args.out, trainer=args.trainer)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
