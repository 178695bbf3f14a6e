"""Check the adapter format's GGUF LoRA: the base GGUF with ``--lora`` must score the
evaluation text like the merged GGUF.

Reads:  the trainer's adapter (converted here to the GGUF LoRA that adapter@<trainer>
        publishes, byte for byte), ``--base`` (the base model's folder: the
        converter reads its config.json), ``--base-gguf`` (convert_base@<trainer>),
        ``--logits`` (logits@<trainer>: the merged bf16/f16 GGUF's log-probs on
        ``evaluate.text``) and ``evaluate.lora.max_kld``.
Writes: ``--out`` (``build/<trainer>/work/eval/lora.json``): the GGUF LoRA's sha256
        and its KL divergence from the merged GGUF (mean, 99th percentile, same top
        token, PPL ratio), which the adapter card shows.

``llama-perplexity -m base.gguf --lora <name>-lora-f16.gguf --kl-divergence``
against the merged model's logits: a LoRA that llama.cpp applies as peft merged it
gives the merged model's distribution (the demo's sft: mean KLD ~0.0003); a LoRA
of another run, another base, or a wrong scale does not (~0.03 for the demo's kto
LoRA on sft's logits).  Above ``evaluate.lora.max_kld`` the stage fails and the
adapter format is not built.  Runs only for a trainer releasing both the adapter
(with ``gguf_lora``) and ``gguf``: the check needs the merged GGUF's logits.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from stages.config.params import load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.core.hashing import sha256_file
from stages.fidelity.llama_checks import KldStats, kl_divergence
from stages.llamacpp import tools as llamacpp
from stages.release.adapter import gguf_lora


def check_lora_kld(*, kld: KldStats, max_kld: float, trainer_key: str, lora: str) -> None:
    """Fail with the figures when the GGUF LoRA does not give the merged model."""
    if kld.kld_mean > max_kld:
        raise ReleaseError(
            f"the GGUF LoRA {lora} on the base GGUF does not score like the merged GGUF: mean "
            f"KL divergence {kld.kld_mean:.5f}, above evaluate.lora.max_kld ({max_kld}); 99th "
            f"percentile {kld.kld_p99:.4f}, same top token {kld.top1_pct:.2f}%. The adapter "
            f"(trainers.{trainer_key}.adapter) and the merged model may come from different "
            "runs or bases, or llama.cpp applies the adapter differently from peft; publish "
            f"the adapter without it (trainers.{trainer_key}.release.adapter.gguf_lora: false)")


def run(*, params_path: Path, trainer_key: str, base: Path, base_gguf: Path, logits: Path,
        out: Path, lora: Path | None = None) -> dict:
    """Measure the trainer's GGUF LoRA (or ``lora``, a GGUF LoRA file) and write ``out``."""
    params = load_params(params_path)
    trainer = params.trainer(trainer_key)
    tool = llamacpp.tool_path("llama-perplexity", params.llama_cpp_version)
    with tempfile.TemporaryDirectory() as tmp:
        if lora is None:
            lora = gguf_lora(params=params, trainer=trainer, base=base, folder=Path(tmp)).out
        kld = kl_divergence(tool=tool, gguf=base_gguf, base=logits, ctx=params.evaluate.ctx,
                            lora=lora)
        record = {"lora_file": lora.name, "lora_sha256": sha256_file(lora),
                  "max_kld": params.evaluate.lora.max_kld, **asdict(kld)}
    check_lora_kld(kld=kld, max_kld=params.evaluate.lora.max_kld, trainer_key=trainer.key,
                   lora=record["lora_file"])
    atomic.write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"GGUF LoRA: ok, mean KL divergence {kld.kld_mean:.6f} from the merged GGUF "
          f"(limit {record['max_kld']}), same top token {kld.top1_pct:.2f}%", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.lora_check", "Check the adapter's GGUF LoRA: llama-perplexity on the base GGUF "
        "with --lora must score the evaluation text like the merged GGUF (mean KL divergence "
        "under evaluate.lora.max_kld); write the figures for the adapter card.")
    parser.add_argument("--trainer", required=True, help="trainer key in params.yaml")
    parser.add_argument("--base", type=Path, required=True,
                        help="the base model's folder (trainers.<t>.base_model.path)")
    parser.add_argument("--base-gguf", type=Path, required=True,
                        help="the base model's GGUF (convert_base@<trainer>)")
    parser.add_argument("--logits", type=Path, required=True,
                        help="the merged GGUF's logits (logits@<trainer>)")
    parser.add_argument("--lora", type=Path,
                        help="measure this GGUF LoRA file instead of converting the trainer's")
    parser.add_argument("--out", type=Path, required=True, help="record JSON to write")

    def body(args) -> None:
        run(params_path=args.params, trainer_key=args.trainer, base=args.base,
            base_gguf=args.base_gguf, logits=args.logits, out=args.out, lora=args.lora)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
