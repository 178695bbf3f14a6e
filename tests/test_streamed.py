"""The fidelity checks' HF models, streamed from disk (stages/fidelity/streamed.py).

Same numbers as a model loaded whole (logits and greedy answers, bit for bit),
on tied, untied and GPT-2-style (Conv1D, ``transformer.wte``) models; and the
memory a forward pass adds stays near one module's weights, where loading the
model whole adds all of them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.core.errors import ReleaseError
from stages.fidelity.streamed import RESIDENT_ENV, resident_bytes, streamed_model
from tests.merge_fixtures import build_pico, build_pico_family, load_model_tensors

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"tied": build_pico(root / "tied"),  # two shards
            "untied": build_pico(root / "untied", tied=False, seed=1),
            "gpt2": build_pico_family(root / "gpt2", "gpt2", seed=10)}


def whole(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def answers(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    return logits, out


@pytest.mark.parametrize("name", ["tied", "untied", "gpt2"])
@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_streamed_equals_loaded_whole(name: str, budget: int, models: dict) -> None:
    folder = models[name]
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = answers(whole(folder), ids)
    with streamed_model(folder, budget=budget) as model:
        first, again = answers(model, ids), answers(model, ids)  # again: from what was kept
        # streamed, not loaded whole: with no budget every weight is back on disk, with one
        # (bigger than these models) every weight stayed
        assert all(p.is_meta == (budget == 0) for p in model.parameters())
    for got in (first, again):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("name", ["tied", "untied", "gpt2"])
def test_a_big_vocabulary_is_read_by_rows_and_its_logits_by_blocks(
        name: str, models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every embedding and head taken as big (Llama 3's, Gemma's): the embedding reads the
    rows of the tokens given, the head computes its logits 3 rows at a time."""
    from stages.fidelity import streamed

    folder = models[name]
    monkeypatch.setattr(streamed, "VOCAB_WHOLE_MAX", 0)
    hidden = json.loads((folder / "config.json").read_text()).get("hidden_size") or \
        json.loads((folder / "config.json").read_text())["n_embd"]
    monkeypatch.setattr(streamed, "HEAD_BLOCK_BYTES", 3 * hidden * 4)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))
    expected = answers(whole(folder), ids)
    with streamed_model(folder, budget=1 << 30) as model:
        got = answers(model, ids)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert embed.weight.is_meta and "forward" in head.__dict__  # never held whole
    assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-5)
    assert torch.equal(got[1], expected[1])
    assert "forward" not in head.__dict__  # the module is itself again


def test_a_model_it_cannot_stream_is_loaded_whole_with_a_warning(
        models: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for f in ("config.json", "generation_config.json"):
        (folder / f).write_bytes((models["untied"] / f).read_bytes())
    tensors = load_model_tensors(models["untied"])
    del tensors["model.norm.weight"]  # transformers initialises it; we have nothing to read
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING), streamed_model(folder, budget=0) as model:
        assert not any(p.is_meta for p in model.parameters())
    assert "cannot be streamed (parameter `model.norm.weight` has no tensor" in caplog.text
    assert "loading it whole" in caplog.text


def test_the_budget_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RESIDENT_ENV, "64")
    assert resident_bytes() == 64 << 20
    monkeypatch.setenv(RESIDENT_ENV, "1GB")
    with pytest.raises(ReleaseError, match=f"{RESIDENT_ENV}='1GB' is not a whole number"):
        resident_bytes()


# A Llama of ~68M parameters, most of them in its layers: 272 MB in fp32, its largest
# tensor (the embedding and the head) 12.6 MB.
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
             num_attention_heads=12, num_key_value_heads=4, vocab_size=4096,
             tie_word_embeddings=False)
# The child's peak RSS after a forward pass of a tiny model (imports, torch's own buffers),
# then after the big model's, streamed: the difference is what streaming it costs.
PEAK = """
import resource, sys, torch
from pathlib import Path
from stages.fidelity.streamed import streamed_model
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
ids = torch.randint(0, 64, (1, 64))
with streamed_model(Path(sys.argv[1]), budget=0) as tiny, torch.no_grad():
    tiny(ids)
before = peak_mb()
with streamed_model(Path(sys.argv[2]), budget=0) as model, torch.no_grad():
    model(ids)
print(peak_mb() - before)
"""


@pytest.mark.slow  # a child process and a 138 MB model: ~10 s, more than the unit tier allows
def test_a_forward_pass_adds_about_one_module_not_the_model(models: dict, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    save_file({k: (torch.randn(s) * 0.02).to(torch.bfloat16) for k, s in shapes.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = LlamaConfig(**SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    fp32_mb = sum(s.numel() for s in shapes.values()) * 4 >> 20
    proc = subprocess.run([sys.executable, "-c", PEAK, str(models["untied"]), str(tmp_path)],
                          cwd=REPO, text=True, capture_output=True, check=True)
    growth_mb = int(proc.stdout.split()[-1])
    # one module's weights (≤ 12.6 MB in fp32, read as 6.3 MB of bf16), the activations and
    # the allocator's slack: ~60 MB measured; the model loaded whole adds ~290 MB
    assert growth_mb < fp32_mb // 3, f"peak RSS grew {growth_mb} MB for a {fp32_mb} MB model"
