"""Save what every level of one trainer is measured against: the bf16/f16 GGUF's logits.

Reads:  ``--gguf`` (the trainer's bf16/f16 GGUF) and ``evaluate.text``,
        ``evaluate.ctx``, ``evaluate.chunks`` in params.yaml.
Writes: ``--out`` (llama-perplexity's base log-probs of the GGUF on the held-out
        text, ``--kl-divergence-base``: the reference of every
        evaluate@<trainer>-<LEVEL> and of the conversion check in
        reference@<trainer>) and, beside it, ``<out>.json`` (its
        perplexity, the chunks and tokens scored).  Atomically.

One llama-perplexity run and nothing else, so that this stage costs what the
tool costs (``make bench-pipeline``): the checks that need transformers live
in reference@<trainer>, which reads this file.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from stages.config.params import load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import InputError
from stages.core.preflight import check_disk
from stages.fidelity.llama_checks import (
    base_logits_bytes,
    logits_record_path,
    save_base_logits,
    scored_tokens,
)
from stages.llamacpp import tools as llamacpp
from stages.llamacpp.gguf_meta import vocab_size

log = logging.getLogger(__name__)


def run(*, params_path: Path, gguf: Path, out: Path) -> dict:
    """Write ``out`` and its record; return the record."""
    params = load_params(params_path)
    ev = params.evaluate
    if not gguf.is_file():
        raise InputError(f"{gguf} not found; run the convert stage first")
    check_disk(out, base_logits_bytes(n_vocab=vocab_size(gguf), ctx=ev.ctx, chunks=ev.chunks))
    start = time.monotonic()
    with atomic.output_file(out, sync=False) as tmp:  # ~25-330 MB that the tool wrote
        ppl = save_base_logits(tool=llamacpp.tool_path("llama-perplexity",
                                                       params.llama_cpp_version),
                               gguf=gguf, text=ev.text, ctx=ev.ctx, chunks=ev.chunks, out=tmp)
    record = {"gguf": gguf.name, "text": ev.text.as_posix(), "ctx": ev.ctx, "chunks": ev.chunks,
              "tokens": scored_tokens(ctx=ev.ctx, chunks=ev.chunks), "ppl": ppl,
              "llama_cpp": params.llama_cpp_version}
    atomic.write_text(logits_record_path(out), json.dumps(record, indent=2) + "\n", sync=False)
    log.info("wrote %s (PPL %.4f over %d tokens) in %.0f s", out, ppl, record["tokens"],
             time.monotonic() - start)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.logits", "Save the base log-probs of a trainer's bf16/f16 GGUF on the held-out "
        "text (llama-perplexity --kl-divergence-base): what every level and the conversion "
        "check are measured against. Also writes <out>.json.")
    parser.add_argument("--gguf", type=Path, required=True, help="the trainer's bf16/f16 GGUF")
    parser.add_argument("--out", type=Path, required=True, help="base-logits file to write")

    def body(args) -> None:
        run(params_path=args.params, gguf=args.gguf, out=args.out)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
