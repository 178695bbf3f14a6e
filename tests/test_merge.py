"""The streaming LoRA merge (stages.merge, stages.lora) on real models and adapters.

SmolLM2-135M with real peft adapters: every merged tensor is within rounding of
the float64 merge and at least as close to it as peft's merge_and_unload;
untouched tensors are byte-identical; the result loads and generates.  A pico
Llama covers the edge cases: DoRA, patterns, bias, ties, prefixes, errors; pico
GPT-2, OPT and Bloom the ties of embeddings not named like Llama's.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages import merge as merge_stage
from stages.core import preflight
from stages.core.errors import ReleaseError
from stages.weights import merge
from tests.merge_fixtures import (
    EMBED,
    LM_HEAD,
    NEW_TEMPLATE,
    PICO_FAMILIES,
    PICO_VARIANTS,
    build_peft_adapter,
    build_pico,
    build_pico_family,
    load_model_tensors,
    peft_config,
    peft_merged,
    raw_bytes,
    reference_merge,
    rounding_error,
    write_adapter,
)

RESIZED = 49160  # SmolLM2's 49152 + 8 added tokens
SMOL_CASES = {
    "lora_qv": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), None),
    "rslora_all_linear": (dict(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True,
                               rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 8}), None),
    "modules_to_save": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["lm_head"]), None),
    "resized_vocab": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["embed_tokens", "lm_head"]), RESIZED),
    # As Unsloth's get_peft_model + save_pretrained leave it (continued-pretraining
    # recipe): the seven projections, r = alpha = 16, no dropout, both embeddings trained
    # whole on a tied base, and the adapter naming the 4-bit base it was trained on.
    "unsloth": (dict(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"],
                     modules_to_save=["embed_tokens", "lm_head"]), None),
}
UNSLOTH_BASE = "unsloth/SmolLM2-135M-Instruct-bnb-4bit"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smol_merges(smollm2_base: Path, module_tmp) -> dict:
    """Each SmolLM2 case: its real peft adapter and our merge of it (built once)."""
    root = module_tmp("smol_merges")
    cases = {}
    for seed, (name, (config, resize)) in enumerate(SMOL_CASES.items()):
        adapter = build_peft_adapter(smollm2_base, root / name, peft_config(**config), seed=seed,
                                     resize=resize, tokenizer=resize is not None)
        if name == "unsloth":
            config_file = adapter / "adapter_config.json"
            saved = json.loads(config_file.read_text())
            config_file.write_text(json.dumps({**saved, "base_model_name_or_path": UNSLOTH_BASE},
                                              indent=2))
        result = merge.merge_adapter(base=smollm2_base, adapter=adapter,
                                     out=root / f"{name}-merged")
        cases[name] = (adapter, result, resize)
    return cases


@pytest.mark.parametrize("case", list(SMOL_CASES))
def test_smol_merge_is_exact_and_no_worse_than_peft(case: str, smol_merges: dict,
                                                    smollm2_base: Path) -> None:
    adapter, result, resize = smol_merges[case]
    ours = load_model_tensors(result.out)
    base = load_model_tensors(smollm2_base)
    ref, changed, bounds = reference_merge(smollm2_base, adapter)
    theirs = peft_merged(smollm2_base, adapter, resize=resize)
    assert sorted(ours) == sorted(ref)
    assert changed and result.merged + result.replaced == len(changed)
    for name, exact in ref.items():
        if name not in changed:
            assert raw_bytes(ours[name]) == raw_bytes(base[name]), f"{name} was not copied as is"
            continue
        assert ours[name].dtype == torch.bfloat16 and ours[name].shape == exact.shape, name
        excess, ours_err = rounding_error(ours[name], exact, bounds.get(name, 0.0))
        assert excess == 0, f"{name} is {excess:.3g} half-steps off the rounded exact merge"
        peft_err = (theirs[name].double() - exact).abs_().mean().item()
        # 1e-6: fp32 sums round ties either way, which moves the mean by ~1e-9.
        assert ours_err <= peft_err * (1 + 1e-6), \
            f"{name}: ours {ours_err:.3e} > peft {peft_err:.3e}"


def test_smol_config_tokenizer_and_template(smol_merges: dict, smollm2_base: Path) -> None:
    from transformers import AutoTokenizer

    plain = smol_merges["lora_qv"][1].out
    config = json.loads((plain / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (plain / name).read_bytes() == (smollm2_base / name).read_bytes(), name
    assert json.loads((plain / "model.safetensors.index.json").read_text())["weight_map"]

    resized = smol_merges["resized_vocab"][1]
    config = json.loads((resized.out / "config.json").read_text())
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (RESIZED, False)
    assert resized.vocab_size == RESIZED and resized.untied
    tok = AutoTokenizer.from_pretrained(resized.out)
    assert len(tok) == RESIZED and tok.chat_template == NEW_TEMPLATE
    untied = json.loads((smol_merges["modules_to_save"][1].out / "config.json").read_text())
    assert untied["tie_word_embeddings"] is False


@pytest.mark.parametrize("case", ["modules_to_save", "resized_vocab", "unsloth"])
def test_smol_merged_model_loads_and_matches_the_adapter(case: str, smol_merges: dict,
                                                         smollm2_base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, result, resize = smol_merges[case]
    tok = AutoTokenizer.from_pretrained(result.out)
    inputs = tok("The capital of France is", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    if resize:
        base.resize_token_embeddings(resize, mean_resizing=False)
    unmerged = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        ours, truth = merged(**inputs).logits, unmerged(**inputs).logits
    # bf16 rounding of the merged weights moves logits by ~1e-2; a wrong tie
    # (lm_head = embed_tokens) moves them by whole units.
    assert (ours - truth).abs().max().item() < 0.25
    generated = merged.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 6


# --- pico Llama: variants and edge cases ----------------------------------


@pytest.fixture(scope="module")
def picos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pico")
    return {"tied": build_pico(root / "tied"),
            "untied": build_pico(root / "untied", tied=False, seed=1),
            "bias": build_pico(root / "bias", tied=False, bias=True, seed=2),
            "wide": build_pico(root / "wide", hidden=24, seed=3)}


def test_smol_threads_write_identical_shards(smol_merges: dict, smollm2_base: Path,
                                            tmp_path: Path) -> None:
    """Threads write tensors in any order at planned offsets: the files are the same."""
    adapter = smol_merges["rslora_all_linear"][0]
    results = [merge.merge_adapter(base=smollm2_base, adapter=adapter, out=tmp_path / f"t{n}",
                         max_shard_size="100MB", threads=n) for n in (1, 3)]
    assert results[0].shards == results[1].shards and len(results[0].shards) == 3
    for name in [*results[0].shards, "model.safetensors.index.json"]:
        assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t3" / name).read_bytes(), name


def test_smol_failing_thread_stops_the_merge_and_leaves_nothing(
        smol_merges: dict, smollm2_base: Path, tmp_path: Path, repo_root: Path) -> None:
    """A write that fails in one thread (here: files capped at 64 MB by RLIMIT_FSIZE, as a
    full disk would) ends the merge with its error and no output, whichever thread hit it."""
    adapter = smol_merges["rslora_all_linear"][0]
    out = tmp_path / "out"

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**20, 64 * 2**20))

    proc = subprocess.run([sys.executable, "-m", "stages.merge", "--base", str(smollm2_base),
                           "--adapter", str(adapter), "--out", str(out), "--threads", "2"],
                          cwd=repo_root, capture_output=True, text=True, preexec_fn=cap_file_size)
    assert proc.returncode == 1, proc.stderr
    assert "error: " in proc.stderr and "File too large" in proc.stderr, proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def merge_and_check(base: Path, adapter: Path, out: Path, **kwargs) -> merge.MergeResult:
    """Merge, then compare every tensor with the float64 reference."""
    result = merge.merge_adapter(base=base, adapter=adapter, out=out, **kwargs)
    ours = load_model_tensors(out)
    ref, changed, bounds = reference_merge(base, adapter)
    assert sorted(ours) == sorted(ref) and changed
    for name in changed:
        excess, _ = rounding_error(ours[name], ref[name], bounds.get(name, 0.0))
        assert excess == 0, f"{name} is {excess:.3g} half-steps off the rounded exact merge"
    return result


@pytest.mark.parametrize("variant", list(PICO_VARIANTS))
def test_pico_variants_match_float64(variant: str, picos: dict, tmp_path: Path) -> None:
    base_key, config = PICO_VARIANTS[variant]
    adapter = build_peft_adapter(picos[base_key], tmp_path / "adapter", peft_config(**config),
                                 seed=7)
    result = merge_and_check(picos[base_key], adapter, tmp_path / "out")
    tied_before = base_key == "tied"
    config_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_out["tie_word_embeddings"] == (tied_before and not result.untied)
    if tied_before and result.untied:
        ours, base = load_model_tensors(tmp_path / "out"), load_model_tensors(picos["tied"])
        side = LM_HEAD if variant.startswith(("embed", "save")) else EMBED
        assert raw_bytes(ours[side]) == raw_bytes(base[EMBED]), "untouched side must stay the base"


def test_pico_keeps_tie_when_adapter_leaves_embeddings(picos: dict, tmp_path: Path) -> None:
    adapter = build_peft_adapter(picos["tied"], tmp_path / "a", peft_config(
        r=2, lora_alpha=4, target_modules=["v_proj"]), seed=3)
    result = merge_and_check(picos["tied"], adapter, tmp_path / "out", max_shard_size="6KB")
    assert not result.untied and LM_HEAD not in load_model_tensors(tmp_path / "out")
    assert len(result.shards) > 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _hand_lora(base: Path, *, layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Adapter tensors for q_proj/v_proj of layer 0, keyed the way ``layout`` says."""
    gen = torch.Generator().manual_seed(seed)
    weights = load_model_tensors(base)
    tensors = {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        out_dim, in_dim = weights[f"{module}.weight"].shape
        key = {"peft": f"base_model.model.{module}.{{}}.weight",
               "default": f"base_model.model.{module}.{{}}.default.weight",
               "bare": f"{module}.{{}}.weight",
               "no_model_prefix": f"base_model.model.{module.removeprefix('model.')}.{{}}.weight"}
        tensors[key[layout].format("lora_A")] = torch.randn(3, in_dim, generator=gen)
        tensors[key[layout].format("lora_B")] = torch.randn(out_dim, 3, generator=gen)
    return tensors


def test_pico_key_prefixes_give_identical_output(picos: dict, tmp_path: Path) -> None:
    config = {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"]}
    outputs = []
    for layout in ("peft", "default", "bare", "no_model_prefix"):
        adapter = write_adapter(tmp_path / layout, config,
                                _hand_lora(picos["untied"], layout=layout))
        merge.merge_adapter(base=picos["untied"], adapter=adapter, out=tmp_path / f"{layout}-out")
        merged = load_model_tensors(tmp_path / f"{layout}-out")
        outputs.append({k: raw_bytes(v) for k, v in merged.items()})
    assert all(o == outputs[0] for o in outputs[1:])
    merge_and_check(picos["untied"], tmp_path / "peft", tmp_path / "check")


def test_pico_fan_in_fan_out(picos: dict, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    module = "base_model.model.model.layers.1.self_attn.q_proj"  # 16×16: both layouts fit
    adapter = write_adapter(tmp_path / "a", {"r": 2, "lora_alpha": 3, "fan_in_fan_out": True}, {
        f"{module}.lora_A.weight": torch.randn(2, 16, generator=gen),
        f"{module}.lora_B.weight": torch.randn(16, 2, generator=gen)})
    merge_and_check(picos["untied"], adapter, tmp_path / "out")


def test_pico_resized_vocabulary_by_hand(picos: dict, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    tensors = _hand_lora(picos["tied"], layout="peft")
    for name in ("model.embed_tokens", "lm_head"):
        tensors[f"base_model.model.{name}.modules_to_save.weight"] = torch.randn(
            72, 16, generator=gen).to(torch.bfloat16)
    adapter = write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 6}, tensors)
    result = merge_and_check(picos["tied"], adapter, tmp_path / "out")
    assert result.vocab_size == 72
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 72


def test_pico_tied_head_follows_the_resized_original(picos: dict, tmp_path: Path) -> None:
    """Resized + modules_to_save=["embed_tokens"] on a tied base: the head keeps the
    resized, untrained embedding (peft's ``original_module``), the embedding is the copy."""
    gen = torch.Generator().manual_seed(8)
    trained, original = (torch.randn(72, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    adapter = write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 6}, {
        "base_model.model.model.embed_tokens.modules_to_save.weight": trained,
        "base_model.model.model.embed_tokens.original_module.weight": original})
    result = merge.merge_adapter(base=picos["tied"], adapter=adapter, out=tmp_path / "out")
    ours = load_model_tensors(tmp_path / "out")
    assert result.untied and result.vocab_size == 72
    assert raw_bytes(ours[EMBED]) == raw_bytes(trained)
    assert raw_bytes(ours[LM_HEAD]) == raw_bytes(original)


# --- tied embeddings not named like Llama's: pico GPT-2, OPT, Bloom -------------

# One side of a tied embedding trained (LoRA or modules_to_save).  peft wraps only the
# layer it targets, so the adapter's model computes the other side with the original
# weight: the exact merge is untied, the untouched side the base's embedding.
TIED_FAMILY_CASES = {
    "gpt2_lora_wte": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"])),
    # nn.Linear and Conv1D targets: peft saves fan_in_fan_out=False, yet transposes c_proj
    "gpt2_lora_lm_head_and_conv1d": ("gpt2", dict(r=4, lora_alpha=8,
                                                  target_modules=["lm_head", "c_proj"])),
    "gpt2_save_lm_head": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"],
                                       modules_to_save=["lm_head"])),
    "gpt2_save_wte": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_fc"],
                                   modules_to_save=["wte"])),
    "opt_lora_embed_tokens": ("opt", dict(r=4, lora_alpha=8,
                                          target_modules=["embed_tokens", "q_proj"])),
    "opt_save_lm_head": ("opt", dict(r=4, lora_alpha=8, target_modules=["v_proj"],
                                     modules_to_save=["lm_head"])),
    "bloom_lora_word_embeddings": ("bloom", dict(r=4, lora_alpha=8, target_modules=[
        "word_embeddings", "query_key_value"])),
}
TOKEN_IDS = [[1, 5, 9, 30, 2, 63, 17]]


@pytest.fixture(scope="module")
def pico_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_pico_family(root / name, name, seed=10 + i)
            for i, name in enumerate(PICO_FAMILIES)}


def _peft_untied_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload in float64, into ``base`` untied first (its head a copy of
    the embedding): into the tied base, a LoRA of the embedding would move the head too
    (one weight), which the adapter's model never computed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64,
                                                 tie_word_embeddings=False)
    embedding = model.get_input_embeddings().weight.detach()
    model.get_output_embeddings().weight = torch.nn.Parameter(embedding.clone())
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(TOKEN_IDS)).logits


@pytest.mark.parametrize("case", list(TIED_FAMILY_CASES))
def test_tied_families_untie_exactly(case: str, pico_families: dict, tmp_path: Path) -> None:
    """The merged model is untied (its own head, tie_word_embeddings false); every tensor
    is peft's float64 merge of the untied base rounded once to bf16, or the base's bytes;
    it loads and computes what peft's unmerged model computes.  (The merge used to keep
    the tie and write no head, the head becoming the merged embedding, or to refuse a
    head the base has no tensor for with "is the base model right?".)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    family, config = TIED_FAMILY_CASES[case]
    base, embed = pico_families[family], PICO_FAMILIES[family][2]
    adapter = build_peft_adapter(base, tmp_path / "a", peft_config(**config), seed=11, std=0.1)
    result = merge.merge_adapter(base=base, adapter=adapter, out=tmp_path / "out")
    config_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert result.untied and config_out["tie_word_embeddings"] is False
    ours, before = load_model_tensors(tmp_path / "out"), load_model_tensors(base)
    assert LM_HEAD in ours and LM_HEAD not in before

    unmerged = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    conv1d = {name for name, module in unmerged.named_modules() if isinstance(module, Conv1D)}
    ref, changed, bounds = reference_merge(base, adapter, embed=embed, conv1d=conv1d)
    theirs = _peft_untied_merge(base, adapter)
    assert sorted(ours) == sorted(ref) == sorted(theirs)
    assert len({embed, LM_HEAD} & changed) == 1
    for name, exact in ref.items():
        assert (exact - theirs[name]).abs().max().item() < 1e-12, f"{name}: reference != peft"
        if name in changed:
            excess, _ = rounding_error(ours[name], exact, bounds.get(name, 0.0))
            assert excess == 0, f"{name} is {excess:.3g} half-steps off the rounded exact merge"
        else:  # the untouched side of the tie is the original embedding
            assert raw_bytes(ours[name]) == raw_bytes(before.get(name, before[embed])), name

    truth = _logits(PeftModel.from_pretrained(unmerged, adapter))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert (_logits(merged) - truth).abs().max().item() < 1e-2
    # the tie kept (the head one weight with the embedding) is another model
    merged.get_output_embeddings().weight = merged.get_input_embeddings().weight
    assert (_logits(merged) - truth).abs().max().item() > 0.1


def test_gpt2_checkpoint_of_the_bare_model(pico_families: dict, tmp_path: Path) -> None:
    """GPT-2's own checkpoints (openai-community/gpt2) hold GPT2Model's tensors, `wte.weight`
    without `transformer.`: the adapter's names still resolve, the untied head is added as
    `lm_head.weight`, and transformers loads the same model as from a full checkpoint."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = pico_families["gpt2"]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(base / "config.json", bare / "config.json")
    save_file({k.removeprefix("transformer."): v for k, v in load_model_tensors(base).items()},
              bare / "model.safetensors", metadata={"format": "pt"})
    adapter = build_peft_adapter(base, tmp_path / "a", peft_config(
        r=4, lora_alpha=8, target_modules=["wte", "c_attn"]), seed=12, std=0.1)
    merge.merge_adapter(base=base, adapter=adapter, out=tmp_path / "full")
    result = merge.merge_adapter(base=bare, adapter=adapter, out=tmp_path / "out")
    ours, full = load_model_tensors(tmp_path / "out"), load_model_tensors(tmp_path / "full")
    assert result.untied and "wte.weight" in ours and LM_HEAD in ours
    assert {k: raw_bytes(v) for k, v in ours.items()} == {
        k.removeprefix("transformer."): raw_bytes(v) for k, v in full.items()}
    loaded = [AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict()
              for n in ("out", "full")]
    assert loaded[0].keys() == loaded[1].keys()
    assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[0])


def test_tie_of_an_unknown_architecture_is_refused(pico_families: dict, tmp_path: Path) -> None:
    """A model transformers cannot build (say, remote code): whether its embedding is tied,
    and to what, cannot be read, so an adapter changing a vocabulary-sized tensor is
    refused naming that; an adapter that leaves them alone merges."""
    base = tmp_path / "base"
    shutil.copytree(pico_families["gpt2"], base)
    config = json.loads((base / "config.json").read_text())
    config |= {"model_type": "gpt2-remote", "architectures": ["Gpt2RemoteForCausalLM"]}
    del config["tie_word_embeddings"]
    (base / "config.json").write_text(json.dumps(config))
    adapter = build_peft_adapter(pico_families["gpt2"], tmp_path / "a", peft_config(
        r=4, lora_alpha=8, target_modules=["wte", "c_attn"]), seed=13)
    message = _error(base, adapter, tmp_path / "out")
    assert "`transformer.wte.weight`" in message and "`gpt2-remote`" in message
    assert "tied" in message and "is the base" not in message
    adapter = build_peft_adapter(pico_families["gpt2"], tmp_path / "b", peft_config(
        r=4, lora_alpha=8, target_modules=["c_attn"]), seed=13)
    assert not merge.merge_adapter(base=base, adapter=adapter, out=tmp_path / "out").untied


def test_embedding_tied_to_more_than_the_head_is_refused(tmp_path: Path) -> None:
    """T5 shares its embedding with the encoder, the decoder and the head; untying that
    takes more than tie_word_embeddings, so a change to it is refused, saying so."""
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                        vocab_size=64)).save_pretrained(tmp_path / "t5")
    gen = torch.Generator().manual_seed(14)
    adapter = write_adapter(tmp_path / "a", {"r": 2, "lora_alpha": 4}, {
        "base_model.model.shared.lora_embedding_A": torch.randn(2, 64, generator=gen),
        "base_model.model.shared.lora_embedding_B": torch.randn(16, 2, generator=gen)})
    message = _error(tmp_path / "t5", adapter, tmp_path / "out")
    assert "`shared.weight`" in message and "`encoder.embed_tokens.weight`" in message
    assert "not supported" in message


def _error(base: Path | None, adapter: Path, out: Path) -> str:
    with pytest.raises(ReleaseError) as info:
        merge.merge_adapter(base=base, adapter=adapter, out=out)
    assert not out.exists(), "a failed merge must leave no output folder"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return str(info.value)


def test_wrong_base_names_tensor_and_shapes(picos: dict, tmp_path: Path) -> None:
    adapter = build_peft_adapter(picos["tied"], tmp_path / "a", peft_config(
        r=2, lora_alpha=4, target_modules=["q_proj"]), seed=1)
    message = _error(picos["wide"], adapter, tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj.weight" in message
    assert "16×16" in message and "24×24" in message
    tensors = _hand_lora(picos["tied"], layout="peft")
    tensors["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = torch.ones(3, 16)
    tensors["base_model.model.model.layers.9.mlp.up_proj.lora_B.weight"] = torch.ones(32, 3)
    adapter = write_adapter(tmp_path / "b", {"r": 3, "lora_alpha": 6}, tensors)
    assert "model.layers.9.mlp.up_proj" in _error(picos["tied"], adapter, tmp_path / "out")


@pytest.mark.parametrize("config, expected", [
    (("IA3", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
     "IA3"),
    (("LoHa", {"r": 2, "target_modules": ["q_proj"]}), "LOHA"),
    (None, "PREFIX_TUNING"),
    (None, "LOKR"),
])
def test_non_lora_adapters_are_refused(config, expected: str, picos: dict, tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    if config is None:
        write_adapter(adapter, {"r": 2}, {"x.weight": torch.ones(1)})
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": expected}))
    else:
        build_peft_adapter(picos["tied"], adapter, peft_config(config[0], **config[1]))
    assert expected in _error(picos["tied"], adapter, tmp_path / "out")


@pytest.mark.parametrize("extra, expected", [
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
    ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
])
def test_unsupported_lora_variants_are_refused(extra: dict, expected: str, picos: dict,
                                               tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 6, **extra},
                            _hand_lora(picos["tied"], layout="peft"))
    assert expected in _error(picos["tied"], adapter, tmp_path / "out")


def test_pickled_adapter_and_quantized_base_are_refused(picos: dict, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 6},
                            _hand_lora(picos["tied"], layout="peft"))
    base = tmp_path / "base"
    shutil.copytree(picos["tied"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    message = _error(base, adapter, tmp_path / "out")
    assert "bitsandbytes" in message and "16-bit" in message
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    assert "safe_serialization" in _error(picos["tied"], adapter, tmp_path / "out")


@pytest.mark.parametrize("name, expected", [
    ("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "unsloth/Llama-3.2-1B-Instruct"),
    ("unsloth/Qwen2.5-7B-Instruct-unsloth-bnb-4bit", "unsloth/Qwen2.5-7B-Instruct"),
    ("unsloth/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B-Instruct"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
])
def test_sixteen_bit_id(name: str, expected: str) -> None:
    assert merge.sixteen_bit_id(name) == expected


def test_base_resolution_from_adapter(picos: dict, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 6,
                                             "base_model_name_or_path": str(picos["untied"])},
                            _hand_lora(picos["untied"], layout="peft"))
    result = merge.merge_adapter(base=None, adapter=adapter, out=tmp_path / "out")
    assert result.base == picos["untied"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/pico-llama-never-cached-unsloth-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    message = _error(None, adapter, tmp_path / "out2")
    assert "`unsloth/pico-llama-never-cached`" in message and "--base" in message


def test_cli(picos: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adapter = write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 6},
                            _hand_lora(picos["untied"], layout="peft"))
    args = ["--base", str(picos["untied"]), "--adapter", str(adapter), "--quiet"]
    assert merge_stage.main([*args, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert merge_stage.main([*args, "--out", str(tmp_path / "o2"), "--backend", "unsloth"]) == 1
    assert merge_stage.main([*args, "--out", str(tmp_path / "o3"), "--max-shard-size", "lots"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "unsloth" in err[0] and "lots" in err[1]


def test_cli_base_wins_over_the_adapters_own_base(picos: dict, tmp_path: Path) -> None:
    """--base: the given folder is used even when the adapter names a base that is nowhere."""
    adapter = write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 6,
                                             "base_model_name_or_path": "org/not-here"},
                            _hand_lora(picos["untied"], layout="peft"))
    out = tmp_path / "out"
    assert merge_stage.main(["--base", str(picos["untied"]), "--adapter", str(adapter),
                             "--out", str(out), "--quiet"]) == 0
    merge_and_check(picos["untied"], adapter, tmp_path / "check")
    assert load_model_tensors(out).keys() == load_model_tensors(tmp_path / "check").keys()


@pytest.mark.parametrize("need_disk, free_disk, need_ram, free_ram, expected", [
    (10, 20, 10, 20, None),
    (30 * 10**9, 20 * 10**9, 1, 2, "needs 30.00 GB, 20.00 GB are free"),
    (1, 2, 3 * 10**9, 10**9, "needs 3.00 GB"),
])
def test_check_resources(need_disk, free_disk, need_ram, free_ram, expected) -> None:
    kwargs = dict(need_disk=need_disk, free_disk=free_disk, need_ram=need_ram,
                  free_ram=free_ram, out=Path("out"))
    if expected is None:
        preflight.check_resources(**kwargs)
    else:
        with pytest.raises(ReleaseError, match=expected):
            preflight.check_resources(**kwargs)


FLAT_SCRIPT = """
import resource, sys
from pathlib import Path
from stages.weights import merge
root = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge.merge_adapter(base=root / "base", adapter=root / "ad", out=root / "out")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_memory_stays_flat_for_large_tensors(tmp_path: Path, repo_root: Path) -> None:
    """Two 128 MiB tensors (one merged, one copied) raise the peak RSS by far less."""
    from safetensors.torch import save_file

    rows = 2**16  # × 1024 columns × 2 bytes = 128 MiB
    (tmp_path / "base").mkdir()
    emb = torch.full((rows, 1024), 0.5, dtype=torch.bfloat16)
    save_file({EMBED: emb, LM_HEAD: emb.clone()}, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text('{"tie_word_embeddings": false}')
    write_adapter(tmp_path / "ad", {"r": 4, "lora_alpha": 8}, {
        "base_model.model.lm_head.lora_A.weight": torch.ones(4, 1024),
        "base_model.model.lm_head.lora_B.weight": torch.ones(rows, 4)})
    del emb
    proc = subprocess.run([sys.executable, "-c", FLAT_SCRIPT, str(tmp_path)], cwd=repo_root,
                          capture_output=True, text=True, check=True)
    growth_mb = int(proc.stdout.strip().splitlines()[-1])
    assert growth_mb < 48, f"peak RSS grew by {growth_mb} MB while merging 256 MiB"
    merged = load_model_tensors(tmp_path / "out")
    assert torch.equal(merged[LM_HEAD], torch.full((rows, 1024), 8.5, dtype=torch.bfloat16))
