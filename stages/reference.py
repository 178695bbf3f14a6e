"""Check one trainer's full-precision GGUF and save what every level is measured against.

Reads:  ``--gguf`` (the trainer's bf16/f16 GGUF), ``--merged`` (its merged HF
        model), the trainer's adapter and base model, and the ``evaluate:``
        settings in params.yaml (held-out text, adapter prompts, thresholds).
Writes: ``--logits``: llama-perplexity's base log-probs of the GGUF on the
        held-out text (the reference of every evaluate@<trainer>-<LEVEL>), and
        ``--out`` (reference.json) with the figures of three checks:

- chat template and special tokens: the GGUF's template equals the trainer's
  (params overrides applied), an assistant turn ends on a token that stops
  generation, EOS ids match, BOS is not doubled;
- adapter merge: the merged files are the adapter applied to the base, tensor
  by tensor against peft's own merge (stages/fidelity/adapter_check.py), so a
  merge of an untrained adapter, of another adapter or into another base fails;
- conversion: the merged HF model (transformers, fp32) and the GGUF agree on
  the same tokens (KL divergence), unless ``evaluate.conversion.chunks`` is 0.

The HF models (merged, and base for the adapter's effect) are never loaded
whole: their weights are read from disk as each module runs, within a resident
budget per model (stages/fidelity/streamed.py), so this stage's memory does not
grow with the model.

Any check that fails stops the stage, so nothing downstream (levels, card,
push) is built from a broken merge or conversion.  The adapter's effect (KL
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
from stages.core.preflight import check_disk
from stages.fidelity.adapter_check import AdapterCheck, verify_merge
from stages.fidelity.hf_checks import (
    AdapterResult,
    ChatCheck,
    ConversionResult,
    adapter_effect,
    check_chat,
    conversion_check,
    load_prompts,
    load_tokenizer,
)
from stages.fidelity.llama_checks import base_logits_bytes, read_base_logits, save_base_logits
from stages.fidelity.streamed import streamed_model
from stages.llamacpp import tools as llamacpp
from stages.llamacpp.gguf_meta import read_chat_info, vocab_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceResult:
    out: Path
    logits: Path
    ppl: float
    chat: ChatCheck
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
        "adapter_merge": asdict(res.merge),
        # information for the card, no threshold: a fine-tune may change the model a little
        "adapter": {**asdict(res.adapter), "prompts_file": ev.adapter.prompts.as_posix()},
        "conversion": {**conversion, "max_kld": ev.conversion.max_kld},
    }


def run(*, params: Params, trainer_key: str, gguf: Path, merged: Path, logits: Path,
        out: Path) -> ReferenceResult:
    """Run the three checks of ``trainer_key`` and write ``logits`` and ``out``."""
    trainer, ev = params.trainer(trainer_key), params.evaluate
    for path, stage in ((gguf, "convert"), (merged / "config.json", "merge")):
        if not path.is_file():
            raise ReleaseError(f"{path} not found; run the {stage} stage first")
    check_disk(logits, base_logits_bytes(n_vocab=vocab_size(gguf), ctx=ev.ctx, chunks=ev.chunks))
    start = time.monotonic()
    tok = load_tokenizer(merged, chat_template=trainer.chat_template, eos_token=trainer.eos_token)
    info = read_chat_info(gguf)
    chat = check_chat(tok=tok, gguf=info, where=str(gguf), fix=fix_hint(trainer))
    log.info("chat template and special tokens: ok (EOS %r, turn end %r)", chat.eos_token,
             chat.turn_end)
    # Streamed, a few rows at a time: before the models load whole.
    merge = verify_merge(base=trainer.base_model.path, adapter=trainer.adapter, merged=merged,
                         fix=f"Rerun `dvc repro merge@{trainer.key}`.")
    # Both models stream their weights from disk (stages/fidelity/streamed.py): memory stays
    # within two resident budgets plus one module, whatever the model size.
    with streamed_model(merged) as model:
        with streamed_model(trainer.base_model.path) as base:
            adapter = adapter_effect(base=base, merged=model, tok=tok,
                                     prompts=load_prompts(ev.adapter.prompts),
                                     max_new_tokens=ev.adapter.max_new_tokens)
        log.info("adapter effect (information): KLD %.4f from the base, %d/%d answers differ",
                 adapter.kld_mean, adapter.answers_differ, adapter.prompts)
        conversion = None
        with atomic.output_file(logits) as tmp:  # kept only if the conversion check passes
            ppl = save_base_logits(tool=llamacpp.tool_path("llama-perplexity",
                                                           params.llama_cpp_version),
                                   gguf=gguf, text=ev.text, ctx=ev.ctx, chunks=ev.chunks, out=tmp)
            if not ev.conversion.skipped:
                conversion = conversion_check(model=model, base=read_base_logits(tmp),
                                              chunks=ev.conversion.chunks,
                                              bos_id=info.bos_id if info.add_bos else None)
                check_conversion(conversion, max_kld=ev.conversion.max_kld, gguf=gguf)
                log.info("conversion: KLD %.6f, same top token %.2f%%, PPL HF %.4f vs GGUF "
                         "%.4f", conversion.kld_mean, conversion.top1_pct, conversion.ppl_hf,
                         conversion.ppl_gguf)
    res = ReferenceResult(out=out, logits=logits, ppl=ppl, chat=chat, merge=merge,
                          adapter=adapter, conversion=conversion)
    record = reference_record(res, params=params, trainer=trainer, gguf=gguf)
    atomic.write_text(out, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info("wrote %s and %s in %.0f s", out, logits, time.monotonic() - start)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.reference", "Check a trainer's bf16/f16 GGUF (chat template and special "
        "tokens, the merge against the adapter, HF-vs-GGUF conversion), measure the adapter's "
        "effect for the card, and save the GGUF's base logits for the level evaluations.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--gguf", type=Path, required=True, help="the trainer's bf16/f16 GGUF")
    parser.add_argument("--merged", type=Path, required=True, help="the merged HF model folder")
    parser.add_argument("--logits", type=Path, required=True,
                        help="base-logits file to write (llama-perplexity --kl-divergence-base)")
    parser.add_argument("--out", type=Path, required=True, help="reference.json to write")

    def body(args) -> None:
        run(params=load_params(args.params), trainer_key=args.trainer, gguf=args.gguf,
            merged=args.merged, logits=args.logits, out=args.out)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
