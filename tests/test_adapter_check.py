"""The adapter check of the reference stage (stages/fidelity/adapter_check.py).

``verify_merge`` recomputes every merged tensor with peft's own layer code and
must pass, exactly (every value the nearest bf16 to peft's float64 merge, or
its neighbour), on what the real merge writes for every adapter variant of
the pico models: DoRA, rank/alpha patterns, rsLoRA, LoRA bias, ``bias="all"``,
tied embeddings (Llama, GPT-2's Conv1D), ``modules_to_save``, a resized
vocabulary.  It fails on an untrained adapter, on merged files of another
adapter or base, on one value moved a few rounding steps and on one bit of a
copied tensor; and it passes a small adapter whatever its effect on the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.core.errors import CheckFailed
from stages.fidelity.adapter_check import AdapterCheck, verify_merge
from stages.weights.merge import MergeResult, merge_adapter
from tests.merge_fixtures import (
    EMBED,
    LM_HEAD,
    PICO_VARIANTS,
    build_peft_adapter,
    build_pico,
    build_pico_family,
    peft_config,
    write_adapter,
)

FIX = "Rerun `dvc repro merge@sft`."
# GPT-2: tied `transformer.wte`, Conv1D layers stored in×out (peft transposes them).
# Each case: its LoraConfig arguments, and (LoRA-merged, replaced) tensors of two layers.
GPT2_CASES = {
    "lora_wte_and_conv1d": (dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]), (3, 0)),
    "lora_lm_head_and_conv1d_proj": (dict(r=4, lora_alpha=8,
                                          target_modules=["lm_head", "c_proj"]), (5, 0)),
    "save_lm_head": (dict(r=4, lora_alpha=8, target_modules=["c_fc"],
                          modules_to_save=["lm_head"]), (2, 1)),
}
Q_V = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def picos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pico")
    return {"tied": build_pico(root / "tied"),
            "untied": build_pico(root / "untied", tied=False, seed=1),
            "bias": build_pico(root / "bias", tied=False, bias=True, seed=2),
            "other": build_pico(root / "other", tied=False, seed=9)}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pico_family(tmp_path_factory.mktemp("gpt2") / "gpt2", "gpt2", seed=10)


def merged(base: Path, adapter: Path, out: Path) -> tuple[Path, MergeResult]:
    return out, merge_adapter(base=base, adapter=adapter, out=out)


def passes(base: Path, adapter: Path, out: Path) -> tuple[AdapterCheck, MergeResult]:
    """Merge with the real merge, check, and hold the check to exactness."""
    folder, result = merged(base, adapter, out)
    check = verify_merge(base=base, adapter=adapter, merged=folder, fix=FIX)
    assert check.tensors == check.lora_merged + check.replaced + check.copied
    assert (check.lora_merged, check.replaced, check.copied, check.untied) == \
        (result.merged, result.replaced, result.copied, result.untied)
    # each merged value is the nearest bf16 to peft's float64 merge, or its neighbour
    assert check.worst_steps <= 1 and check.fp32_bound == 0, check
    assert check.not_nearest <= check.merged_elements // 100, check
    return check, result


def fails(base: Path, adapter: Path, folder: Path) -> str:
    with pytest.raises(CheckFailed) as info:
        verify_merge(base=base, adapter=adapter, merged=folder, fix=FIX)
    return str(info.value)


@pytest.mark.parametrize("variant", list(PICO_VARIANTS))
def test_every_merge_variant_passes_exactly(variant: str, picos: dict, tmp_path: Path) -> None:
    base_key, config = PICO_VARIANTS[variant]
    adapter = build_peft_adapter(picos[base_key], tmp_path / "a", peft_config(**config), seed=7)
    check, _ = passes(picos[base_key], adapter, tmp_path / "out")
    assert check.lora_merged > 0 and check.dtype == "BF16"
    assert check.untied == variant.endswith("_tied")
    assert check.replaced == {"bias_all": 8, "save_embed_tied": 1}.get(variant, 0)


@pytest.mark.parametrize("tied", [True, False])
def test_resized_vocabulary_passes_exactly(tied: bool, picos: dict, tmp_path: Path) -> None:
    """Embedding and head resized to 72 rows and saved whole (modules_to_save): their
    new rows are the adapter's, byte for byte; config.json says 72."""
    base = picos["tied" if tied else "untied"]
    adapter = build_peft_adapter(base, tmp_path / "a", peft_config(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        seed=3, resize=72)
    check, result = passes(base, adapter, tmp_path / "out")
    assert result.vocab_size == 72 and check.replaced == 2 and check.untied == tied


@pytest.mark.parametrize("case", list(GPT2_CASES))
def test_gpt2_tied_embedding_and_conv1d_pass_exactly(case: str, gpt2: Path,
                                                     tmp_path: Path) -> None:
    config, counts = GPT2_CASES[case]
    adapter = build_peft_adapter(gpt2, tmp_path / "a", peft_config(**config), seed=11, std=0.1)
    check, _ = passes(gpt2, adapter, tmp_path / "out")
    assert check.untied and (check.lora_merged, check.replaced) == counts


def test_a_small_adapter_passes_whatever_its_effect(picos: dict, tmp_path: Path) -> None:
    """r=8 on q/v with a small lora_B (a short, gentle DPO run): the merged model's KL
    divergence from its base is ~0.004, which the old gate (min_kld 0.01) refused."""
    from transformers import AutoModelForCausalLM

    base = picos["untied"]
    adapter = build_peft_adapter(base, tmp_path / "a", peft_config(**Q_V), seed=4, std=0.5)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 0.02 if "lora_B" in k else v for k, v in load_file(weights).items()},
              weights)  # lora_B std 0.01
    check, _ = passes(base, adapter, tmp_path / "out")
    assert check.lora_merged == 4

    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_m, log_b = (torch.log_softmax(AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32)(ids).logits, -1) for folder in (tmp_path / "out", base))
    kld = float((log_m.exp() * (log_m - log_b)).sum(-1).mean())
    assert 0.001 < kld < 0.01, kld


@pytest.mark.parametrize("variant", ["untied", "embed_lora_tied"])
def test_an_untrained_adapter_is_its_own_error(variant: str, picos: dict,
                                               tmp_path: Path) -> None:
    """Every LoRA delta zero, as peft initialises it (lora_B; lora_embedding_A for an
    embedding): refused before the merged files are even looked at."""
    base_key, config = ("untied", Q_V) if variant == "untied" else PICO_VARIANTS[variant]
    adapter = build_peft_adapter(picos[base_key], tmp_path / "a", peft_config(**config), seed=2)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v.zero_() if "lora_B" in k or "lora_embedding_A" in k else v
               for k, v in load_file(weights).items()}, weights)
    message = fails(picos[base_key], adapter, tmp_path / "never-written")
    assert message.startswith("the adapter is untrained: every lora_B of its ")
    assert "is `adapter` the right run" in message.lower() and str(adapter) in message
    folder, _ = merged(picos[base_key], adapter, tmp_path / "out")  # the merge itself works
    assert fails(picos[base_key], adapter, folder).startswith("the adapter is untrained")


def test_merged_files_of_another_adapter_fail(picos: dict, tmp_path: Path) -> None:
    base = picos["untied"]
    ours, theirs = (build_peft_adapter(base, tmp_path / name, peft_config(**Q_V), seed=seed)
                    for name, seed in (("ours", 1), ("theirs", 2)))
    folder, _ = merged(base, theirs, tmp_path / "out")
    message = fails(base, ours, folder)
    assert message.startswith("merged tensor `model.layers.0.self_attn.q_proj.weight` is not "
                              "this adapter applied to this base: at [")
    assert "peft's merge of the adapter gives" in message and "rounding steps of BF16" in message
    assert message.endswith(f"Merged files from another adapter or base? {FIX}")


def test_merged_into_another_base_fails(picos: dict, tmp_path: Path) -> None:
    """Same shapes, other weights: the first tensor checked is named."""
    adapter = build_peft_adapter(picos["untied"], tmp_path / "a", peft_config(**Q_V), seed=1)
    folder, _ = merged(picos["other"], adapter, tmp_path / "out")
    assert "is not this adapter applied to this base" in fails(picos["untied"], adapter, folder)


def _edit_tensor(folder: Path, name: str, change) -> None:
    """Change tensor ``name`` in place in whichever shard holds it."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            change(tensors[name])
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError(f"{name} is in no shard of {folder}")


def _steps_up(count: int):
    """Move element [1, 2] of a bf16 tensor ``count`` representable values away from zero."""
    def change(t: torch.Tensor) -> None:
        bits = t.view(torch.int16)
        bits[1, 2] += count
    return change


def test_one_value_a_few_rounding_steps_off_fails(picos: dict, tmp_path: Path) -> None:
    base = picos["untied"]
    adapter = build_peft_adapter(base, tmp_path / "a", peft_config(**Q_V), seed=5)
    folder, _ = merged(base, adapter, tmp_path / "out")
    target = "model.layers.1.self_attn.v_proj.weight"
    nearest = verify_merge(base=base, adapter=adapter, merged=folder).not_nearest
    _edit_tensor(folder, target, _steps_up(1))  # one step: the other neighbour, allowed
    check = verify_merge(base=base, adapter=adapter, merged=folder)
    assert check.not_nearest == nearest + 1 and check.worst_steps == 1
    _edit_tensor(folder, target, _steps_up(2))  # three steps off
    message = fails(base, adapter, folder)
    assert message.startswith(f"merged tensor `{target}` is not this adapter applied to this "
                              "base: at [1, 2] it holds ")
    assert "(1 of the 128 values checked with it off)" in message


@pytest.mark.parametrize("tensor, whose", [
    ("model.layers.0.input_layernorm.weight", "the base's"),
    (EMBED, "the adapter's own"),
])
def test_one_bit_of_a_copied_or_replaced_tensor_fails(tensor: str, whose: str, picos: dict,
                                                      tmp_path: Path) -> None:
    base = picos["tied"]
    adapter = build_peft_adapter(base, tmp_path / "a", peft_config(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]), seed=6)
    folder, _ = merged(base, adapter, tmp_path / "out")

    def flip(t: torch.Tensor) -> None:
        t.view(torch.int16).view(-1)[5] ^= 1
    _edit_tensor(folder, tensor, flip)
    message = fails(base, adapter, folder)
    assert message.startswith(f"merged tensor `{tensor}` should be {whose}, byte for byte")
    assert "the first at [" in message


def test_a_config_that_keeps_the_tie_fails(picos: dict, tmp_path: Path) -> None:
    """Untied weights with a config that ties them: loaded, the head would be the merged
    embedding, whatever the files say."""
    adapter = build_peft_adapter(picos["tied"], tmp_path / "a", peft_config(
        r=4, lora_alpha=8, target_modules=["embed_tokens"]), seed=8)
    folder, _ = merged(picos["tied"], adapter, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    assert "leaves `tie_word_embeddings` True" in fails(picos["tied"], adapter, folder)


def test_a_tensor_neither_base_nor_adapter_explains_fails(picos: dict, tmp_path: Path) -> None:
    adapter = build_peft_adapter(picos["tied"], tmp_path / "a", peft_config(
        r=4, lora_alpha=8, target_modules=["lm_head"]), seed=8)
    folder, _ = merged(picos["tied"], adapter, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    # the untied head of the merged files checked against a merge that keeps the tie
    other = write_adapter(tmp_path / "b", {"r": 2, "lora_alpha": 4}, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 16),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(16, 2)})
    message = fails(picos["tied"], other, folder)
    assert message.startswith(f"the merged files in {folder} hold tensor `{LM_HEAD}`")


def test_reference_json_records_the_check_and_the_effect_without_a_threshold(
        repo_root: Path) -> None:
    from dataclasses import asdict

    from stages.config.params import load_params
    from stages.fidelity.hf_checks import AdapterResult, ChatCheck, TokenizerParity
    from stages.reference import ReferenceResult, reference_record

    params = load_params(repo_root / "params.yaml")
    merge = AdapterCheck(tensors=3, lora_merged=1, replaced=0, copied=2, untied=False,
                         dtype="BF16", merged_elements=256, not_nearest=1, fp32_bound=0,
                         worst_steps=1, worst_tensor="a.weight", seconds=0.1)
    effect = AdapterResult(prompts=2, kld_mean=0.004, answers_differ=1, example_prompt="q",
                           example_base="a", example_merged="b")
    chat = ChatCheck(template_sha256="0" * 64, eos_token="</s>", eos_id=2, add_bos=False,
                     turn_end="</s>")
    result = ReferenceResult(out=Path("r.json"), ppl=9.0, chat=chat,
                             tokenizer=TokenizerParity(texts=2, tokens=10, pre="smollm"),
                             merge=merge, adapter=effect, conversion=None)
    record = reference_record(result, params=params, trainer=params.trainer("sft"),
                              gguf=Path("full.gguf"))
    assert record["adapter_merge"] == asdict(merge)
    assert record["adapter"] == {**asdict(effect), "prompts_file": "data/probes.jsonl"}
    assert "min_kld" not in json.dumps(record)


def _peak_rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_memory_stays_flat_for_large_tensors(tmp_path: Path) -> None:
    """Two 64 MiB bf16 tensors (one LoRA-merged, one copied) raise the peak RSS by far
    less than one of them: a few row chunks in memory (in float64 the merged one would
    take 256 MiB whole)."""
    rows = 2**15  # × 1024 columns × 2 bytes = 64 MiB
    for folder in ("base", "out"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text('{"tie_word_embeddings": false}')
    emb = torch.full((rows, 1024), 0.5, dtype=torch.bfloat16)
    save_file({EMBED: emb, LM_HEAD: emb.clone()}, tmp_path / "base" / "model.safetensors")
    save_file({EMBED: emb, LM_HEAD: emb + 8}, tmp_path / "out" / "model.safetensors")  # 2·(B@A)
    write_adapter(tmp_path / "ad", {"r": 4, "lora_alpha": 8}, {
        "base_model.model.lm_head.lora_A.weight": torch.ones(4, 1024),
        "base_model.model.lm_head.lora_B.weight": torch.ones(rows, 4)})
    del emb
    try:  # the peak RSS (VmHWM) := the RSS now (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here: {exc}")
    before = _peak_rss_mb()
    check = verify_merge(base=tmp_path / "base", adapter=tmp_path / "ad", merged=tmp_path / "out")
    growth = _peak_rss_mb() - before
    assert (check.lora_merged, check.copied, check.not_nearest) == (1, 1, 0)
    assert growth < 40, f"peak RSS grew by {growth} MB while checking 2 × 64 MiB"
