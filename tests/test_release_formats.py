"""Release formats besides GGUF: the adapter as peft loads it, and as a GGUF LoRA.

On the demo build (session fixture): the adapter folder holds only what peft needs
(never training_args.bin or the trainer's README), names its base by Hub id and
loads with peft on the base to the same logits as our merged model; the GGUF LoRA
on the base's GGUF scores the evaluation text like the merged GGUF, and a GGUF
LoRA of another run does not.  On pico adapters: what a GGUF LoRA cannot hold is
refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.config.params import load_params
from stages.core.errors import InputError
from stages.fidelity.llama_checks import kl_divergence
from stages.llamacpp.gguf_meta import open_reader
from stages.llamacpp.lora import check_gguf_lora, convert_lora, gguf_alpha, gguf_lora_problems
from stages.llamacpp.tools import tool_path
from stages.release import adapter as adapter_release
from stages.release.privacy import scan_release, this_machine
from stages.weights.lora import load_adapter
from tests.merge_fixtures import PICO_VARIANTS, build_peft_adapter, build_pico, peft_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The GGUF LoRA on the base GGUF against the merged GGUF: 0.00027 measured for the
# demo's sft (bf16); the base alone is 0.044 from it.
LORA_MAX_KLD = 0.01


@pytest.fixture(scope="module")
def released(built_repo: Path, module_tmp) -> dict[str, Path]:
    """The adapter folder and GGUF LoRA of each demo trainer."""
    params = load_params(built_repo / "params.yaml")
    out = {}
    for key in ("sft", "kto"):
        trainer = params.trainer(key)
        folder = module_tmp(f"adapter-{key}")
        adapter_release.write_files(adapter=built_repo / trainer.adapter,
                                    base_id=trainer.base_model.id, out=folder)
        lora = load_adapter(built_repo / trainer.adapter)
        config = json.loads((folder / "adapter_config.json").read_text())
        convert_lora(adapter=lora, config=config, base=built_repo / trainer.base_model.path,
                     out=folder / f"{trainer.name}-lora-bf16.gguf", name=trainer.name,
                     outtype="bf16", trainer_key=key, llama_cpp_version=params.llama_cpp_version)
        out[key] = folder
    return out


def test_the_adapter_folder_holds_what_peft_needs_and_nothing_the_trainer_left(
        built_repo: Path, released: dict[str, Path]) -> None:
    folder = released["sft"]
    run = built_repo / "inputs/runs/sft/demo/final_model"
    names = sorted(p.name for p in folder.iterdir() if p.suffix != ".gguf")
    assert names == sorted({"adapter_config.json", "adapter_model.safetensors",
                            "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
                           & {p.name for p in run.iterdir()})
    assert (run / "training_args.bin").is_file() and (run / "README.md").is_file()
    _, left_out = adapter_release.sources(run)
    assert {"training_args.bin", "README.md"} <= set(left_out)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ours = json.loads((run / "adapter_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in ours.items() if k != "base_model_name_or_path"}
    assert (folder / "adapter_model.safetensors").read_bytes() == \
        (run / "adapter_model.safetensors").read_bytes()
    assert scan_release(folder, this_machine(built_repo)) == []


def test_the_adapter_loads_with_peft_on_the_base_like_our_merged_model(
        built_repo: Path, released: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = built_repo / "inputs/base/SmolLM2-135M-Instruct"
    tok = AutoTokenizer.from_pretrained(released["sft"])
    ids = tok.apply_chat_template([{"role": "user", "content": "Where is the treasure?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, released["sft"])
    merged = AutoModelForCausalLM.from_pretrained(built_repo / "build/sft/work/merged",
                                                  dtype=torch.float32)
    with torch.no_grad():
        with_adapter, ours = peft_model(ids).logits, merged(ids).logits
    # Our merged weights are bf16 (rounded once), peft adds the adapter in fp32: 0.81 of
    # logits that the adapter moves by 26 (measured); another adapter moves them as much
    # as the adapter itself does.
    effect = (with_adapter - base_logits).abs().max().item()
    assert effect > 5.0
    assert (with_adapter - ours).abs().max().item() < 0.1 * effect
    same_top = (with_adapter.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert same_top >= 0.9, same_top


def test_the_gguf_lora_scores_like_the_merged_gguf_and_another_runs_does_not(
        built_repo: Path, released: dict[str, Path]) -> None:
    params = load_params(built_repo / "params.yaml")
    tool = tool_path("llama-perplexity", params.llama_cpp_version)
    work = built_repo / "build/sft/work"
    name = params.trainer("sft").name

    def kld(trainer: str) -> float:
        lora = next(released[trainer].glob("*-lora-bf16.gguf"))
        return kl_divergence(tool=tool, gguf=work / "base.gguf", base=work / "reference.kld",
                             ctx=params.evaluate.ctx, lora=lora).kld_mean

    own, other = kld("sft"), kld("kto")
    assert own < LORA_MAX_KLD < other, (own, other)
    header = open_reader(released["sft"] / f"{name}-lora-bf16.gguf")
    assert header.get("general.type") == "adapter" and header.get("adapter.type") == "lora"
    # gguf-py names it after the folder it converts, spaced and capitalised: the view's
    # (the release name), not the run's final_model
    assert header.get("general.name").replace(" ", "-").lower() == name.lower()
    assert header.get("adapter.lora.alpha") == 16.0
    assert scan_release(released["sft"], this_machine(built_repo)) == []


# Adapters a GGUF LoRA holds exactly: ranks that differ by module (one alpha), and rsLoRA
# of one rank (alpha/√r, rewritten as alpha'/r).
HOLDABLE = {
    "rank_pattern": ("untied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                    rank_pattern={"o_proj": 2})),
    "rslora": ("untied", dict(r=4, lora_alpha=7, use_rslora=True,
                              target_modules=["q_proj", "gate_proj"])),
}


@pytest.fixture(scope="module")
def picos(module_tmp) -> dict[str, Path]:
    """Thirteen peft adapters on pico Llamas (~20 s with peft's import): the slow tier,
    so `make test-fast` stays under a minute."""
    root = module_tmp("pico-lora")
    bases = {"tied": build_pico(root / "tied"),
             "untied": build_pico(root / "untied", tied=False, seed=1),
             "bias": build_pico(root / "bias", tied=False, bias=True, seed=2)}
    variants = {**PICO_VARIANTS, **HOLDABLE}
    return {name: build_peft_adapter(bases[base], root / name, peft_config(**kwargs))
            for name, (base, kwargs) in variants.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "problem"), [
    ("dora", "DoRA"), ("patterns", "different alphas"), ("lora_bias", "LoRA bias"),
    ("save_embed_tied", "holds whole tensors"), ("rslora_lm_head", "holds whole tensors"),
    ("bias_all", "holds whole tensors"), ("rank_pattern", None), ("rslora", None)])
def test_what_a_gguf_lora_cannot_hold_is_refused_with_the_reason(
        picos: dict[str, Path], variant: str, problem: str | None) -> None:
    adapter = load_adapter(picos[variant])
    problems = gguf_lora_problems(adapter)
    if problem is None:
        assert problems == []
        return
    assert any(problem in p for p in problems), problems
    with pytest.raises(InputError, match=r"release\.adapter\.gguf_lora: false"):
        check_gguf_lora(adapter, "sft")


@pytest.mark.slow
def test_rslora_gets_the_alpha_that_gives_llama_cpp_peft_s_scale(
        picos: dict[str, Path]) -> None:
    # peft: alpha/√r = 7/2; llama.cpp: alpha'/r, so alpha' = 7/2 × 4 = 14
    assert gguf_alpha(load_adapter(picos["rslora"])) == pytest.approx(14.0)
    # ranks 4 and 2, alpha 8: peft's 8/4 and 8/2 are llama.cpp's 8/rank
    assert gguf_alpha(load_adapter(picos["rank_pattern"])) == pytest.approx(8.0)
    assert gguf_alpha(load_adapter(picos["patterns"])) is None  # alpha_pattern
