"""The llama.cpp side of the fidelity checks.

Runs ``llama-perplexity`` (base logits of the bf16/f16 GGUF, then KL divergence
of a quantized GGUF against them) and ``llama-completion`` (one greedy chat
turn with the GGUF's own chat template; greedy answers of the merged and base
GGUFs to the adapter prompts), and parses what they print.  Also
reads the base-logits file, so the Hugging Face model can be scored on exactly
the tokens llama.cpp scored.

Output formats: tools/perplexity/perplexity.cpp and tools/completion/
completion.cpp of the pinned llama.cpp (llama-cpp-python 0.3.36).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import ReleaseError
from stages.core.preflight import check_memory, threads
from stages.llamacpp.gguf_meta import vocab_size
from stages.llamacpp.tools import run_captured

log = logging.getLogger(__name__)

# OpenMP threads that spin while they wait make llama.cpp and torch several times
# slower when other processes share the cores; measured on a loaded 2-core
# machine, 24 greedy tokens of SmolLM2-135M in torch took 10.3 s by default and
# 2.3 s with PASSIVE. Set on import, before torch loads or a tool starts (they
# inherit it); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Base-logits file (perplexity.cpp, perplexity() with --kl-divergence-base):
# "_logits_", int32 n_ctx, n_vocab, n_chunk, int32 tokens[n_chunk*n_ctx], then
# per chunk, for the n_ctx - 1 - n_ctx/2 scored positions, nv = 2*((n_vocab+1)/2)
# + 4 uint16: two float32 (scale, min log-prob), then n_vocab quantized
# log-probs: log p = scale*q + min.
MAGIC = b"_logits_"
# perplexity.cpp counts only base log-probs above -16 in the KL sum.
LOG_PROB_FLOOR = -16.0
# The statistics block printed after `--kl-divergence` (perplexity.cpp).
KLD_LINES: dict[str, str] = {
    "ppl_q": r"Mean PPL\(Q\)\s+:\s+([\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s+:\s+([\d.]+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+([\d.]+)",
    "kld_mean": r"Mean\s+KLD:\s+(-?[\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s+(-?[\d.]+)",
    "kld_max": r"Maximum KLD:\s+(-?[\d.]+)",
    "top1_pct": r"Same top p:\s+([\d.]+)",
}
FINAL_PPL = re.compile(r"Final estimate: PPL = ([\d.]+)")
KLD_DONE = re.compile(KLD_LINES["top1_pct"])  # the statistics block's last line
# completion.cpp logs " [end of text]" when the last token is end-of-generation
# (EOS/EOT), and "eval time = ... / N runs" (every sampled token but the last).
END_OF_TEXT = " [end of text]"
EVAL_RUNS = re.compile(r"\beval time =\s+[\d.]+ ms /\s+(\d+) runs")
PROMPT_TOKEN = re.compile(r"^\S+ I\s+(\d+) -> '", re.MULTILINE)


@dataclass(frozen=True)
class KldStats:
    """llama-perplexity --kl-divergence figures of one GGUF against the base."""

    ppl_q: float
    ppl_base: float
    ppl_ratio: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_pct: float


@dataclass(frozen=True)
class SmokeRun:
    """One greedy chat turn by llama-completion."""

    text: str
    tokens: int
    max_tokens: int
    stopped: bool  # ended on an end-of-generation token, not the token limit
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class BaseLogits:
    """The base-logits file, memory-mapped."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # [n_chunk, n_ctx] int32, as tokenized by llama.cpp
    rows: np.ndarray  # [n_chunk, n_ctx - 1 - n_ctx/2, nv] uint16

    @property
    def first(self) -> int:
        """First position whose next token is scored (the second half)."""
        return self.n_ctx // 2

    def log_probs(self, chunk: int) -> np.ndarray:
        """Base log-probs of ``chunk``'s scored positions: [positions, n_vocab] float32."""
        rows = self.rows[chunk]
        head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # [positions, 2]
        quant = rows[:, 4:4 + self.n_vocab].astype(np.float32)
        return quant * head[:, :1] + head[:, 1:2]


def logits_record_path(logits: Path) -> Path:
    """The JSON record written beside a base-logits file (``reference.kld.json``)."""
    return logits.with_name(logits.name + ".json")


def scored_tokens(*, ctx: int, chunks: int) -> int:
    """Tokens llama-perplexity scores: the second half of each chunk, its last token aside."""
    return chunks * (ctx - 1 - ctx // 2)


def base_logits_bytes(*, n_vocab: int, ctx: int, chunks: int) -> int:
    """Size of a ``--kl-divergence-base`` file (its layout above): for the disk preflight."""
    scored = ctx - 1 - ctx // 2
    return 20 + 4 * ctx * chunks + 2 * chunks * scored * (2 * ((n_vocab + 1) // 2) + 4)


# What a llama.cpp tool holds beside the model's weights: its context, compute
# buffers and the logits of one batch (ctx x vocabulary floats, counted twice).
TOOL_OVERHEAD = 256 * 2**20


def check_fits(*, tool: Path, gguf: Path, ctx: int, extra: int = 0) -> None:
    """Before a tool reads a whole GGUF: refuse when available memory cannot hold it.

    The tools memory-map the file, so the kernel could page it in and out, but a
    model bigger than memory makes every chunk read it from disk again: hours
    instead of minutes.  Fail first with both numbers, as the merge does.  ``extra``:
    bytes the tool loads besides (a GGUF LoRA).
    """
    check_memory(f"{tool.name} on {gguf}", tool_memory(gguf, ctx=ctx) + extra)


def tool_memory(gguf: Path, *, ctx: int) -> int:
    """What a llama.cpp tool running ``gguf`` with context ``ctx`` holds at most: the whole
    file mapped, :data:`TOOL_OVERHEAD`, and one batch of logits (counted twice)."""
    try:
        n_vocab = vocab_size(gguf)
    except ReleaseError:
        n_vocab = 0  # the tool itself says what is wrong with the file
    return gguf.stat().st_size + TOOL_OVERHEAD + 2 * 4 * ctx * n_vocab


def save_base_logits(*, tool: Path, gguf: Path, text: Path, ctx: int, chunks: int,
                     out: Path) -> float:
    """Write ``out`` (base log-probs of ``gguf`` on ``text``); return its perplexity.

    ``out`` is written in place: pass a temporary path (``atomic.output_file``).
    """
    check_fits(tool=tool, gguf=gguf, ctx=ctx)
    stdout, stderr = run_until(
        [str(tool), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks",
         str(chunks), "-t", str(threads()), "--kl-divergence-base", str(out)],
        f"llama-perplexity --kl-divergence-base on {gguf}", FINAL_PPL)
    got = re.search(r"calculating perplexity over (\d+) chunks", stderr)
    if got is None or int(got.group(1)) < chunks:
        raise ReleaseError(
            f"{text} is too short: llama-perplexity scored {got.group(1) if got else 0} "
            f"chunks of {ctx} tokens, evaluate.chunks asks for {chunks}; add text or "
            "lower evaluate.chunks")
    found = FINAL_PPL.search(stderr + stdout)
    if found is None:
        raise ReleaseError(f"llama-perplexity printed no final PPL for {gguf}")
    return float(found.group(1))


def parse_kld_stats(text: str) -> KldStats:
    """The statistics block of ``llama-perplexity --kl-divergence``."""
    values: dict[str, float] = {}
    for key, pattern in KLD_LINES.items():
        found = re.search(pattern, text)
        if found is None:
            raise ReleaseError(f"llama-perplexity printed no `{pattern}` line; is the "
                               "base-logits file from the same model family and long enough?")
        values[key] = float(found.group(1))
    return KldStats(**values)


def kl_divergence(*, tool: Path, gguf: Path, base: Path, ctx: int,
                  lora: Path | None = None) -> KldStats:
    """KL divergence (and PPL ratio, same top token) of ``gguf`` (with the GGUF LoRA
    ``lora`` applied, when given) against ``base``."""
    check_fits(tool=tool, gguf=gguf, ctx=ctx, extra=lora.stat().st_size if lora else 0)
    with_lora = ["--lora", str(lora)] if lora else []
    stdout, stderr = run_until(
        [str(tool), "-m", str(gguf), *with_lora, "--kl-divergence-base", str(base),
         "--kl-divergence", "-c", str(ctx), "-t", str(threads())],
        f"llama-perplexity --kl-divergence on {gguf}" + (f" with {lora.name}" if lora else ""),
        KLD_DONE)
    return parse_kld_stats(stdout + "\n" + stderr)


def parse_smoke(stdout: str, stderr: str, max_tokens: int) -> SmokeRun:
    """What llama-completion generated, and whether it stopped on its own."""
    stopped = END_OF_TEXT in stdout
    text = stdout.split(END_OF_TEXT, 1)[0] if stopped else stdout
    runs = EVAL_RUNS.search(stderr)
    if runs is None:
        raise ReleaseError("llama-completion printed no `eval time = ... runs` line; "
                           "cannot count the generated tokens")
    return SmokeRun(text=text.strip(), tokens=int(runs.group(1)) + 1, max_tokens=max_tokens,
                    stopped=stopped,
                    prompt_ids=tuple(int(i) for i in PROMPT_TOKEN.findall(stderr)))


def smoke_chat(*, tool: Path, gguf: Path, prompt: str, max_tokens: int,
               repeat_penalty: float) -> SmokeRun:
    """One greedy chat turn with the chat template embedded in ``gguf`` (Jinja)."""
    check_fits(tool=tool, gguf=gguf, ctx=max(512, 4 * max_tokens))
    stdout, stderr = run_until(
        [str(tool), "-m", str(gguf), "--jinja", "-cnv", "--single-turn", "-p", prompt,
         "-n", str(max_tokens), "--temp", "0", "--seed", "0",
         "--repeat-penalty", str(repeat_penalty), "-c", str(max(512, 4 * max_tokens)),
         "-t", str(threads()), "--no-display-prompt", "--verbose-prompt", "--no-warmup"],
        f"llama-completion on {gguf}", EVAL_RUNS)
    return parse_smoke(stdout, stderr, max_tokens)


def run_until(cmd: list[str], what: str, done: re.Pattern, tries: int = 5) -> tuple[str, str]:
    """Run a llama.cpp tool until its output holds ``done`` (at most ``tries`` times).

    The pinned tools log through an asynchronous logger that exit does not drain: a run
    that finishes within milliseconds (a tiny model) sometimes exits 0 with its last
    lines unwritten, timings and results included (llama-completion on a tiny Gemma 2:
    7 runs in 40).  The work is deterministic, so a rerun gives the same figures."""
    for attempt in range(1, tries):
        stdout, stderr = run_captured(cmd, what)
        if done.search(stdout) or done.search(stderr):
            return stdout, stderr
        log.warning("%s exited before printing all of its output (try %d of %d)", what,
                    attempt, tries)
    return run_captured(cmd, what)  # the last try: its parser names what is missing


def greedy_answers(*, tool: Path, gguf: Path, prompts: list[str], max_tokens: int,
                   ctx: int) -> list[SmokeRun]:
    """``gguf``'s greedy continuation of each prompt text (chat template already applied;
    special tokens in it are parsed as such), up to ``max_tokens`` or end of generation."""
    check_fits(tool=tool, gguf=gguf, ctx=ctx)
    runs = []
    for prompt in prompts:
        stdout, stderr = run_until(
            [str(tool), "-m", str(gguf), "-no-cnv", "-p", prompt, "-n", str(max_tokens),
             "--temp", "0", "--seed", "0", "--repeat-penalty", "1.0", "-c", str(ctx),
             "-t", str(threads()), "--no-display-prompt", "--no-warmup"],
            f"llama-completion on {gguf}", EVAL_RUNS)
        runs.append(parse_smoke(stdout, stderr, max_tokens))
    return runs


def llama_token_ids(*, tool: Path, gguf: Path, text: str, add_special: bool) -> list[int]:
    """llama.cpp's token ids of ``text`` (``llama-tokenize``, the GGUF's vocabulary only):
    special tokens written in the text parsed as such (its default), and with
    ``add_special`` the BOS/EOS the GGUF says to add (``tokenizer.ggml.add_bos_token``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        path.write_bytes(text.encode("utf-8"))  # read verbatim by llama-tokenize
        stdout, _ = run_captured(
            [str(tool), "-m", str(gguf), "-f", str(path), "--ids", "--log-disable",
             "--no-escape", *([] if add_special else ["--no-bos"])],
            f"llama-tokenize on {gguf}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[")]
    if not lines:
        raise ReleaseError(f"llama-tokenize printed no token ids for {gguf}")
    body = lines[-1].strip("[] \n")
    return [int(x) for x in body.split(",")] if body else []


def read_base_logits(path: Path) -> BaseLogits:
    """Memory-map a ``--kl-divergence-base`` file and check its size."""
    with path.open("rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:8] != MAGIC:
        raise ReleaseError(f"{path} is not a llama-perplexity base-logits file; rerun its "
                           "reference stage")
    n_ctx, n_vocab, n_chunk = np.frombuffer(head[8:], dtype=np.int32).tolist()
    nv = 2 * ((n_vocab + 1) // 2) + 4
    scored = n_ctx - 1 - n_ctx // 2
    size = 20 + 4 * n_chunk * n_ctx + 2 * n_chunk * scored * nv
    if path.stat().st_size != size:
        raise ReleaseError(f"{path} has {path.stat().st_size} bytes, its header implies {size}; "
                           "rerun its reference stage")
    tokens = np.memmap(path, dtype=np.int32, mode="r", offset=20, shape=(n_chunk, n_ctx))
    rows = np.memmap(path, dtype=np.uint16, mode="r", offset=20 + 4 * n_chunk * n_ctx,
                     shape=(n_chunk, scored, nv))
    return BaseLogits(n_ctx=n_ctx, n_vocab=n_vocab, tokens=tokens, rows=rows)
