"""The adapter's effect (stages/fidelity/hf_checks.py, adapter_effect): the KL divergence of
the merged model from its base on the merged GGUF's answers, scored in one left-padded batch,
must be what each conversation scored alone gives; answers that differ are counted as texts."""

from __future__ import annotations

import pytest
import torch

from stages.fidelity.hf_checks import adapter_effect
from stages.fidelity.llama_checks import SmokeRun
from tests.merge_fixtures import build_pico

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["<pad>", "<s>", "</s>", "<|user|>", "<|bot|>", "<unk>", *(f"w{i}" for i in range(58))]
TEMPLATE = ("{% for m in messages %}{{ '<|' + ('user' if m.role == 'user' else 'bot') + '|> ' }}"
            "{{ m.content + ' ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|bot|> ' }}"
            "{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("effect")
    load = [AutoModelForCausalLM.from_pretrained(build_pico(root / n, seed=s),
                                                 dtype=torch.float32).eval()
            for n, s in (("base", 0), ("merged", 1))]
    return load[0], load[1]


def run(text: str, stopped: bool) -> SmokeRun:
    return SmokeRun(text=text, tokens=len(text.split()) + stopped, max_tokens=8, stopped=stopped,
                    prompt_ids=())


def alone(base, merged, ids: list[int], head: int) -> tuple[float, int]:
    """KL summed over the answer positions of one unpadded conversation, and their count."""
    x = torch.tensor([ids])
    with torch.no_grad():
        lm, lb = (torch.log_softmax(m(x).logits.float(), -1)[0] for m in (merged, base))
    kl = (lm.exp() * (lm - lb)).sum(-1)[head - 1:len(ids) - 1]
    return float(kl.sum()), kl.numel()


def test_batched_effect_equals_each_conversation_alone(tok, pair) -> None:
    base, merged = pair
    prompts = [[{"role": "user", "content": "w1 w2 w3 w4 w5 w6"}],
               [{"role": "user", "content": "w7"}],
               [{"role": "user", "content": "w8 w9"}, {"role": "assistant", "content": "w10"},
                {"role": "user", "content": "w11"}]]
    merged_answers = [run("w20 w21 w22", True), run("w23", False), run("", True)]
    base_answers = [run("w20 w21 w22", True), run("w30", False), run("w31", True)]
    got = adapter_effect(base=base, merged=merged, tok=tok, prompts=prompts,
                         merged_answers=merged_answers, base_answers=base_answers)
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, merged_answers, strict=True):
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        tail = tok(answer.text, add_special_tokens=False)["input_ids"]
        tail += [tok.eos_token_id] if answer.stopped else []
        kl, n = alone(base, merged, head_ids + tail, len(head_ids))
        total, count = total + kl, count + n
    assert count == (3 + 1) + 1 + (0 + 1)  # answer tokens, EOS where the answer stopped
    assert got.kld_mean == pytest.approx(total / count, rel=1e-4)
    assert got.kld_mean > 0.01  # two different random models
    assert got.answers_differ == 2 and got.prompts == 3
    assert (got.example_prompt, got.example_base, got.example_merged) == (
        "w1 w2 w3 w4 w5 w6", "w20 w21 w22", "w20 w21 w22")


def test_identical_models_have_no_effect(tok, pair) -> None:
    base, _ = pair
    answers = [run("w5 w6", True), run("w7 w8 w9", False)]
    got = adapter_effect(base=base, merged=base, tok=tok,
                         prompts=[[{"role": "user", "content": "w1"}],
                                  [{"role": "user", "content": "w2 w3 w4"}]],
                         merged_answers=answers, base_answers=answers)
    assert got.kld_mean == pytest.approx(0.0, abs=1e-6) and got.answers_differ == 0


def test_prompts_render_with_the_chat_template(tok) -> None:
    from stages.fidelity.hf_checks import render_prompts

    text = render_prompts(tok, [[{"role": "user", "content": "w1 w2"}]])
    assert text == ["<|user|> w1 w2 <|bot|> "]
    assert 5 not in tok(text[0], add_special_tokens=False)["input_ids"]  # no <unk>
