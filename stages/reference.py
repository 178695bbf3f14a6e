"""Check one trainer's merge and full-precision GGUF before any level is released.

Reads:  ``--gguf`` (the trainer's bf16/f16 GGUF), ``--base-gguf`` (its base
        model's), ``--merged`` (its merged HF model), ``--logits`` (the GGUF's
        base log-probs, from logits@<trainer>, and their record beside them),
        the trainer's adapter and base model, and the ``evaluate:`` settings in
        params.yaml (adapter prompts, thresholds).
Writes: ``--out`` (reference.json) with the figures of four checks and the
        GGUF's perplexity:

- chat template and special tokens: the GGUF's template equals the trainer's
  (params overrides applied), an assistant turn ends on a token that stops
  generation, EOS ids match, BOS is not doubled (in llama.cpp's own
  tokenization of the rendered prompt);
- tokenizer parity: llama.cpp (``llama-tokenize``) and the trainer's tokenizer
  give the same ids on the evaluation text and on a conversation rendered by
  the chat template, BOS/EOS included (a wrongly converted tokenizer fails
  here, at the first differing token);
- adapter merge: the merged files are the adapter applied to the base, tensor
  by tensor against peft's own merge (stages/fidelity/adapter_check.py), so a
  merge of an untrained adapter, of another adapter or into another base fails;
- conversion: the merged HF model (transformers, fp32) scores the tokens the
  GGUF scored in the logits file, and the two agree (KL divergence), unless
  ``evaluate.conversion.chunks`` is 0.

The adapter's effect compares greedy answers of the merged GGUF and the base's
(``--base-gguf``, from convert_base@<trainer>), and the HF models score the
merged answers.  The HF models (merged, and base) are never loaded whole:
their weights are read from disk as each module runs, within a resident budget
per model (stages/fidelity/streamed.py), so this stage's memory does not grow
with the model.

Any check that fails stops the stage, so the card and push of the trainer are
not built from a broken merge or conversion.  The adapter's effect (KL
divergence of the merged model from its base on held-out prompts, answers
that differ) is measured for the card, as information: a fine-tune may change
the model a little.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.config.params import Params, Trainer, load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.fidelity.adapter_check import AdapterCheck, verify_merge
from stages.fidelity.hf_checks import (
    AdapterResult,
    ChatCheck,
    ConversionResult,
    TokenizerParity,
    adapter_effect,
    check_chat,
    check_tokenizer_parity,
    conversion_check,
    load_prompts,
    load_tokenizer,
    parity_texts,
    render_prompts,
)
from stages.fidelity.llama_checks import (
    greedy_answers,
    llama_token_ids,
    logits_record_path,
    read_base_logits,
)
from stages.fidelity.streamed import streamed_model
from stages.llamacpp import tools as llamacpp
from stages.llamacpp.gguf_meta import chat_info, open_reader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceResult:
    out: Path
    ppl: float
    chat: ChatCheck
    tokenizer: TokenizerParity
    merge: AdapterCheck
    adapter: AdapterResult
    conversion: ConversionResult | None


def fix_hint(trainer: Trainer) -> str:
    """What to do when the chat template or special tokens are wrong."""
    return (f"Fix the trainer's tokenizer files, or set `trainers.{trainer.key}.chat_template` / "
            f"`eos_token` in params.yaml (applied before conversion), then `dvc repro`.")


def check_conversion(result: ConversionResult, *, max_kld: float, gguf: Path) -> None:
    """HF and GGUF must predict the same distributions on the same tokens."""
    if result.kld_mean > max_kld:
        raise ReleaseError(
            f"conversion check: {gguf} disagrees with the merged HF model: mean KL divergence "
            f"{result.kld_mean:.5f} over {result.tokens} tokens (max {result.kld_max:.3f}), above "
            f"evaluate.conversion.max_kld = {max_kld}; same top token {result.top1_pct:.1f}%, "
            f"PPL HF {result.ppl_hf:.3f} vs GGUF {result.ppl_gguf:.3f}. Check convert_hf_to_gguf "
            "warnings for this architecture.")


def reference_record(res: ReferenceResult, *, params: Params, trainer: Trainer,
                     gguf: Path) -> dict:
    """What reference.json holds (and the model card shows)."""
    ev = params.evaluate
    overrides = {"chat_template": trainer.chat_template is not None,
                 "eos_token": trainer.eos_token}
    conversion = ({"skipped": True, "reason": "evaluate.conversion.chunks is 0"}
                  if res.conversion is None else {"skipped": False, **asdict(res.conversion)})
    return {
        "trainer": trainer.key,
        "gguf": gguf.name,
        "outtype": params.convert_outtype,
        "text": ev.text.as_posix(), "ctx": ev.ctx, "chunks": ev.chunks,
        "ppl": res.ppl,
        "chat": {**asdict(res.chat), "overrides": overrides},
        "tokenizer": asdict(res.tokenizer),
        "adapter_merge": asdict(res.merge),
        # information for the card, no threshold: a fine-tune may change the model a little
        "adapter": {**asdict(res.adapter), "prompts_file": ev.adapter.prompts.as_posix()},
        "conversion": {**conversion, "max_kld": ev.conversion.max_kld},
    }


def logits_record(logits: Path, *, gguf: Path, params: Params) -> dict:
    """What logits@<trainer> wrote beside ``logits``; it must be of ``gguf`` and these settings."""
    path = logits_record_path(logits)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"cannot read {path} ({type(exc).__name__}); rerun the logits "
                           "stage") from None
    ev = params.evaluate
    wanted = {"gguf": gguf.name, "ctx": ev.ctx, "chunks": ev.chunks}
    if {k: record.get(k) for k in wanted} != wanted:
        raise ReleaseError(f"{logits} was saved for {[record.get(k) for k in wanted]}, not "
                           f"{list(wanted.values())} (GGUF, ctx, chunks); rerun the logits stage")
    return record


def answers_ctx(tok, prompts: list[str], max_new_tokens: int) -> int:
    """llama-completion's context for the longest prompt and its answer (multiple of 256)."""
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    return max(512, -(-(longest + max_new_tokens + 16) // 256) * 256)


def run(*, params: Params, trainer_key: str, gguf: Path, base_gguf: Path, merged: Path,
        logits: Path, out: Path) -> ReferenceResult:
    """Run the four checks of ``trainer_key`` and write ``out``."""
    trainer, ev = params.trainer(trainer_key), params.evaluate
    for path, stage in ((gguf, "convert"), (base_gguf, "convert_base"),
                        (merged / "config.json", "merge"), (logits, "logits")):
        if not path.is_file():
            raise ReleaseError(f"{path} not found; run the {stage} stage first")
    ppl = logits_record(logits, gguf=gguf, params=params)["ppl"]
    start = time.monotonic()
    tok = load_tokenizer(merged, chat_template=trainer.chat_template, eos_token=trainer.eos_token)
    header = open_reader(gguf)
    info = chat_info(header)
    tokenize = llamacpp.tool_path("llama-tokenize", params.llama_cpp_version)

    def llama_ids(text: str, special: bool) -> list[int]:
        return llama_token_ids(tool=tokenize, gguf=gguf, text=text, add_special=special)

    chat = check_chat(tok=tok, gguf=info, where=str(gguf), fix=fix_hint(trainer),
                      llama_ids=llama_ids)
    log.info("chat template and special tokens: ok (EOS %r, turn end %r)", chat.eos_token,
             chat.turn_end)
    parity = check_tokenizer_parity(
        tok=tok, texts=parity_texts(tok, ev.text.read_text(encoding="utf-8")),
        llama_ids=llama_ids,
        gguf_tokens=header.get("tokenizer.ggml.tokens") or [],
        pre=header.get("tokenizer.ggml.pre"), where=str(gguf),
        fix="The converter picked the wrong pre-tokenizer or vocabulary for this tokenizer: "
            "check convert_hf_to_gguf.py's warnings; a tokenizer the pinned llama.cpp does not "
            "know needs a newer one (llama_cpp.version).")
    log.info("tokenizer parity: ok, %d token ids the same in transformers and llama.cpp "
             "(pre-tokenizer %r)", parity.tokens, parity.pre)
    # Streamed, a few rows at a time: before the models load whole.
    merge = verify_merge(base=trainer.base_model.path, adapter=trainer.adapter, merged=merged,
                         fix=f"Rerun `dvc repro merge@{trainer.key}`.")
    # Greedy answers by llama.cpp (a generated token costs a pass over every weight,
    # which streamed HF models would read from disk again), then one forward pass of each
    # HF model, streamed (stages/fidelity/streamed.py): memory stays within two resident
    # budgets plus one module, whatever the model size.
    prompts = load_prompts(ev.adapter.prompts)
    texts = render_prompts(tok, prompts)
    tool = llamacpp.tool_path("llama-completion", params.llama_cpp_version)
    ctx = answers_ctx(tok, texts, ev.adapter.max_new_tokens)
    answers = {name: greedy_answers(tool=tool, gguf=path, prompts=texts, ctx=ctx,
                                    max_tokens=ev.adapter.max_new_tokens)
               for name, path in (("merged", gguf), ("base", base_gguf))}
    with streamed_model(merged) as model:
        with streamed_model(trainer.base_model.path) as base:
            adapter = adapter_effect(base=base, merged=model, tok=tok, prompts=prompts,
                                     merged_answers=answers["merged"],
                                     base_answers=answers["base"])
        log.info("adapter effect (information): KLD %.4f from the base, %d/%d answers differ",
                 adapter.kld_mean, adapter.answers_differ, adapter.prompts)
        conversion = None
        if not ev.conversion.skipped:
            conversion = conversion_check(model=model, base=read_base_logits(logits),
                                          chunks=ev.conversion.chunks,
                                          bos_id=info.bos_id if info.add_bos else None)
            check_conversion(conversion, max_kld=ev.conversion.max_kld, gguf=gguf)
            log.info("conversion: KLD %.6f, same top token %.2f%%, PPL HF %.4f vs GGUF %.4f",
                     conversion.kld_mean, conversion.top1_pct, conversion.ppl_hf,
                     conversion.ppl_gguf)
    res = ReferenceResult(out=out, ppl=ppl, chat=chat, tokenizer=parity, merge=merge,
                          adapter=adapter, conversion=conversion)
    record = reference_record(res, params=params, trainer=trainer, gguf=gguf)
    atomic.write_text(out, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info("wrote %s in %.0f s", out, time.monotonic() - start)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.reference", "Check a trainer's merge and bf16/f16 GGUF (chat template and "
        "special tokens, the merge against the adapter, HF-vs-GGUF conversion on the tokens of "
        "the logits file) and measure the adapter's effect for the card.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--gguf", type=Path, required=True, help="the trainer's bf16/f16 GGUF")
    parser.add_argument("--base-gguf", type=Path, required=True,
                        help="the base model's GGUF (convert_base stage)")
    parser.add_argument("--merged", type=Path, required=True, help="the merged HF model folder")
    parser.add_argument("--logits", type=Path, required=True,
                        help="the GGUF's base-logits file, written by the logits stage")
    parser.add_argument("--out", type=Path, required=True, help="reference.json to write")

    def body(args) -> None:
        run(params=load_params(args.params), trainer_key=args.trainer, gguf=args.gguf,
            base_gguf=args.base_gguf, merged=args.merged, logits=args.logits, out=args.out)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
