"""The Hugging Face side of the fidelity checks (transformers, CPU, fp32).

- :func:`check_chat`: the GGUF's chat template and special tokens against the
  trainer's tokenizer: same template, turns end on a token that stops
  generation, same EOS, no doubled BOS.
- :func:`conversion_check`: the merged HF model scores exactly the tokens that
  llama-perplexity scored with the bf16/f16 GGUF (read back from the
  base-logits file); KL divergence, same top token, both perplexities.
- :func:`adapter_effect`: the merged model against its base on held-out
  prompts (KL divergence on the merged GGUF's greedy answers, answers of the
  merged and base GGUFs that differ): information for the card, no threshold
  (whether the merge holds the adapter is adapter_check.py's).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ReleaseError
from stages.fidelity.llama_checks import LOG_PROB_FLOOR, BaseLogits
from stages.llamacpp.gguf_meta import ChatInfo

log = logging.getLogger(__name__)

# Markers rendered through the chat template to find where turns start and end.
USER_MARK = "Fidelity check, user turn 7d1f"
ANSWER_MARK = "Fidelity check, answer 3c9e"
# Prompts scored by the adapter-effect check: enough to see an effect, few
# enough to stay in seconds for a small model.
MAX_PROMPTS = 16


@dataclass(frozen=True)
class ChatCheck:
    template_sha256: str
    eos_token: str
    eos_id: int
    add_bos: bool
    turn_end: str  # what the template writes after an assistant answer


@dataclass(frozen=True)
class TokenizerParity:
    texts: int
    tokens: int  # token ids compared, BOS/EOS included
    pre: str | None  # the GGUF's pre-tokenizer (tokenizer.ggml.pre)


@dataclass(frozen=True)
class ConversionResult:
    chunks: int
    tokens: int
    ppl_hf: float
    ppl_gguf: float
    kld_mean: float
    kld_max: float
    top1_pct: float


@dataclass(frozen=True)
class AdapterResult:
    prompts: int
    kld_mean: float
    answers_differ: int
    example_prompt: str
    example_base: str
    example_merged: str


def load_tokenizer(folder: Path, *, chat_template: str | None, eos_token: str | None):
    """The trainer's tokenizer, with the params overrides the GGUF was built with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if chat_template is not None:
        tok.chat_template = chat_template
    if eos_token is not None:
        tok.eos_token = eos_token
    return tok


def first_difference(a: str, b: str) -> str:
    """Where two strings first differ, with a little context of each."""
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at character {i}: GGUF {a[max(0, i - 20):i + 30]!r} vs HF {b[max(0, i - 20):i + 30]!r}"


def _render(tok, template: str, messages: list[dict], generation: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation)
    # A bad template fails in Jinja, or in the Python it calls (raise_exception, indexing).
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ReleaseError(f"the chat template does not render a simple conversation: "
                           f"{type(exc).__name__}: {exc}") from None


def check_chat(*, tok, gguf: ChatInfo, where: str, fix: str, llama_ids=None) -> ChatCheck:
    """The GGUF's template and special tokens against ``tok``; raise on the first problem.

    ``llama_ids(text, add_special)``: llama.cpp's own tokenization (``llama-tokenize``), for
    the BOS check on what llama.cpp's chat path really feeds a model given the rendered
    prompt (one leading BOS removed where the GGUF adds it); without it, the trainer's
    tokenizer plus the GGUF's add_bos stands in."""
    hf = tok.chat_template
    if not gguf.chat_template:
        raise ReleaseError(f"{where} has no tokenizer.chat_template; chat tools would fall back "
                           f"to a guess. {fix}")
    if not isinstance(hf, str) or not hf:
        raise ReleaseError(f"the trainer's tokenizer has no chat template to compare with. {fix}")
    if gguf.chat_template != hf:
        raise ReleaseError(f"{where}: tokenizer.chat_template differs from the trainer's "
                           f"({first_difference(gguf.chat_template, hf)}). {fix}")
    user = [{"role": "user", "content": USER_MARK}]
    prompt = _render(tok, hf, user, generation=True)
    turns = _render(tok, hf, [*user, {"role": "assistant", "content": ANSWER_MARK}, *user],
                    generation=False)
    if USER_MARK not in prompt or ANSWER_MARK not in turns:
        raise ReleaseError(f"the chat template drops the messages it is given (rendered "
                           f"{prompt[:200]!r}). {fix}")
    after = turns.split(ANSWER_MARK, 1)[1].split(USER_MARK, 1)[0]
    ends = [after.find(stop) + len(stop) for stop in gguf.stop_strings if stop in after]
    if not ends:
        raise ReleaseError(
            f"the chat template ends an assistant turn with {after!r}, which holds none of "
            f"the GGUF's end-of-generation tokens {list(gguf.stop_strings)}: a model would "
            f"never stop after its answer. {fix}")
    if tok.eos_token_id != gguf.eos_id:
        raise ReleaseError(f"{where}: EOS id is {gguf.eos_id}, the trainer's tokenizer says "
                           f"{tok.eos_token_id} ({tok.eos_token!r}). {fix}")
    # As llama.cpp's chat path does (common/chat.cpp, common_chat_template_direct_apply):
    # a GGUF that adds BOS has one leading BOS of the rendered template removed first,
    # so Llama 3's and Gemma's `{{ bos_token }}...` templates give one BOS, not two.
    bos = tok.convert_ids_to_tokens(gguf.bos_id) if gguf.bos_id is not None else None
    if gguf.add_bos and isinstance(bos, str) and bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    if llama_ids is not None:
        ids = llama_ids(prompt, True)
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = [gguf.bos_id, *ids] if gguf.add_bos else ids
    if gguf.bos_id is not None and ids[:2] == [gguf.bos_id, gguf.bos_id]:
        how = ("adds BOS (tokenizer.ggml.add_bos_token) and the chat template writes it after "
               "llama.cpp has removed one" if gguf.add_bos
               else "the chat template writes BOS twice")
        raise ReleaseError(f"{where}: {how}: prompts would start with two BOS tokens "
                           f"({gguf.bos_id}). {fix}")
    return ChatCheck(template_sha256=hashlib.sha256(hf.encode()).hexdigest(),
                     eos_token=tok.eos_token, eos_id=int(tok.eos_token_id),
                     add_bos=bool(gguf.add_bos), turn_end=after[:min(ends)])


# A conversation that exercises what the evaluation text may not: digits, spaces and
# blank lines, punctuation, accents and an emoji, rendered by the chat template with its
# special tokens (parsed as such by both tokenizers).
PARITY_CONVERSATION = [
    {"role": "user", "content": "What's 12345 + 678?  Answer in   three words.\n\nThanks!"},
    {"role": "assistant", "content": "It's 13,023 — naïve café math 😊"},
    {"role": "user", "content": "And\tthe year 2024-06-01?"},
]


def parity_texts(tok, eval_text: str) -> dict[str, tuple[str, bool]]:
    """What tokenizer parity compares: name -> (text, add BOS/EOS as the tokenizer says)."""
    chat = tok.apply_chat_template(PARITY_CONVERSATION, add_generation_prompt=True,
                                   tokenize=False)
    return {"the evaluation text": (eval_text, True),
            "a conversation rendered by the chat template": (chat, False)}


def _token(ids: list[int], i: int, name) -> str:
    return f"{ids[i]} {name(ids[i])!r}" if i < len(ids) else "(end of the ids)"


def check_tokenizer_parity(*, tok, texts: dict[str, tuple[str, bool]], llama_ids,
                           gguf_tokens: list[str], pre: str | None, where: str,
                           fix: str) -> TokenizerParity:
    """The trainer's tokenizer and llama.cpp's (``llama_ids(text, add_special)``) give the
    same ids on each text, BOS/EOS included; raise at the first differing position."""
    total = 0
    for name, (text, add_special) in texts.items():
        hf = list(tok(text, add_special_tokens=add_special)["input_ids"])
        ll = llama_ids(text, add_special)
        if hf != ll:
            i = next((k for k, (a, b) in enumerate(zip(hf, ll, strict=False)) if a != b),
                     min(len(hf), len(ll)))
            before = tok.decode(hf[max(0, i - 8):i])
            raise ReleaseError(
                f"tokenizer parity: {where} tokenizes {name} differently from the trainer's "
                f"tokenizer: at token {i} (after {before!r}) transformers has "
                f"{_token(hf, i, tok.convert_ids_to_tokens)}, llama.cpp "
                f"{_token(ll, i, lambda t: gguf_tokens[t] if 0 <= t < len(gguf_tokens) else '?')}"
                f" ({len(hf)} vs {len(ll)} ids; the GGUF's pre-tokenizer is {pre!r}). {fix}")
        total += len(hf)
    return TokenizerParity(texts=len(texts), tokens=total, pre=pre)


def conversion_check(*, model, base: BaseLogits, chunks: int,
                     bos_id: int | None) -> ConversionResult:
    """Score ``chunks`` chunks of the base-logits file with the HF ``model``."""
    import torch

    first, n_vocab = base.first, base.n_vocab
    kl, nll_hf, nll_gguf, same = [], [], [], []
    for c in range(chunks):
        ids = torch.from_numpy(base.tokens[c].astype("int64"))
        if bos_id is not None:  # llama-perplexity puts BOS first in each chunk
            ids[0] = bos_id
        with torch.no_grad():
            logits = model(ids[None]).logits[0, first:-1].float()
        if logits.shape[-1] < n_vocab:
            raise ReleaseError(f"the HF model has {logits.shape[-1]} logits, the GGUF "
                               f"{n_vocab}: not the same vocabulary")
        log_q = torch.log_softmax(logits[:, :n_vocab], dim=-1)
        log_p = torch.from_numpy(base.log_probs(c))
        target = ids[first + 1:, None]
        kept = torch.where(log_p > LOG_PROB_FLOOR, log_p.exp() * (log_p - log_q), 0.0)
        kl.append(kept.sum(-1))
        nll_hf.append(-log_q.gather(1, target)[:, 0])
        nll_gguf.append(-log_p.gather(1, target)[:, 0])
        same.append(log_q.argmax(-1) == log_p.argmax(-1))
    kls, hf, gg = torch.cat(kl), torch.cat(nll_hf), torch.cat(nll_gguf)
    return ConversionResult(chunks=chunks, tokens=int(kls.numel()),
                            ppl_hf=float(hf.mean().exp()), ppl_gguf=float(gg.mean().exp()),
                            kld_mean=float(kls.mean()), kld_max=float(kls.max()),
                            top1_pct=100.0 * float(torch.cat(same).float().mean()))


def load_prompts(path: Path) -> list[list[dict]]:
    """User turns from JSONL: {"prompt": str}, {"prompt": [messages]} or {"messages": [...]}."""
    if not path.is_file():
        raise ReleaseError(f"no prompts file {path}; check evaluate.adapter.prompts")
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        turns = row.get("messages") or row.get("prompt")
        if isinstance(turns, str):
            turns = [{"role": "user", "content": turns}]
        if not isinstance(turns, list) or not turns:
            raise ReleaseError(f"{path}:{n} has no `prompt` or `messages`")
        cut = next((i for i, m in enumerate(turns) if m.get("role") == "assistant"), len(turns))
        found.append(turns[:cut])
    if not found:
        raise ReleaseError(f"{path} holds no prompts")
    return found[:MAX_PROMPTS]


def render_prompts(tok, prompts: list[list[dict]]) -> list[str]:
    """Each prompt as the chat template writes it, ready for the assistant's answer."""
    return [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts]


def adapter_effect(*, base, merged, tok, prompts: list[list[dict]], merged_answers: list,
                   base_answers: list) -> AdapterResult:
    """KL(merged || base) on the merged GGUF's greedy answers, and how many answers differ.

    ``*_answers``: llama-completion's greedy answers (``SmokeRun``) of the merged and base
    GGUFs to ``prompts``.  The HF models (streamed) score the merged answers, EOS included
    where the answer ended on it, in one left-padded batch: one forward pass each.
    """
    import torch

    rows, said = [], []
    for text, answer in zip(render_prompts(tok, prompts), merged_answers, strict=True):
        head = tok(text, add_special_tokens=False)["input_ids"]  # as the template wrote it
        tail = tok(answer.text, add_special_tokens=False)["input_ids"]
        if answer.stopped and tok.eos_token_id is not None:
            tail = [*tail, tok.eos_token_id]
        rows.append([*head, *tail])
        said.append((len(head), len(tail)))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # scored: the positions whose next token is an answer token
    scored = torch.zeros_like(mask, dtype=torch.bool)
    for i, (head, tail) in enumerate(said):
        start = width - head - tail
        scored[i, start + head - 1:width - 1] = True
    with torch.no_grad():
        lm, lb = (torch.log_softmax(m(ids, attention_mask=mask, position_ids=positions)
                                    .logits.float(), -1) for m in (merged, base))
    vocab = min(lm.shape[-1], lb.shape[-1])
    kl = (lm[..., :vocab].exp() * (lm[..., :vocab] - lb[..., :vocab])).sum(-1)
    texts = [[a.text for a in answers] for answers in (base_answers, merged_answers)]
    return AdapterResult(prompts=len(prompts),
                         kld_mean=float((kl * scored).sum() / max(int(scored.sum()), 1)),
                         answers_differ=sum(a != b for a, b in zip(*texts, strict=True)),
                         example_prompt=prompts[0][-1]["content"],
                         example_base=texts[0][0], example_merged=texts[1][0])
