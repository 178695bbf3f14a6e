"""Release formats besides GGUF: the adapter as peft loads it, and as a GGUF LoRA; the
merged weights as transformers loads them.

On the demo build (session fixture; sft releases its adapter, ``adapter@sft``):
the adapter folder holds only what peft needs (never training_args.bin or the
trainer's README) with a card and manifest, names its base by Hub id and loads
with peft on the base to the same logits as our merged model; the GGUF LoRA on
the base's GGUF scores the evaluation text like the merged GGUF, and a GGUF LoRA
of another run (kto's, converted here: kto releases no adapter) does not.  On
pico adapters: what a GGUF LoRA cannot hold is refused with the reason.  The merged
folder (``merged@sft``) answers like peft's own merge_and_unload, in bf16 or f16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from stages.config.params import load_params
from stages.core.errors import InputError, ReleaseError
from stages.core.hashing import sha256_file
from stages.llamacpp.gguf_meta import open_reader
from stages.llamacpp.lora import check_gguf_lora, convert_lora, gguf_alpha, gguf_lora_problems
from stages.release import adapter as adapter_release
from stages.release.privacy import scan_release, this_machine
from stages.weights.lora import load_adapter
from stages.weights.safetensors_io import Reader, model_tensors
from tests.hub_server import card_metadata, load_hub_licenses, validate_card_metadata
from tests.merge_fixtures import PICO_VARIANTS, build_peft_adapter, build_pico, peft_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def released(built_repo: Path, module_tmp) -> dict[str, Path]:
    """The adapter folder of each demo trainer: sft's as the pipeline built it, kto's
    files and GGUF LoRA made here the same way."""
    params = load_params(built_repo / "params.yaml")
    trainer = params.trainer("kto")
    folder = module_tmp("adapter-kto")
    adapter_release.write_files(adapter=built_repo / trainer.adapter,
                                base_id=trainer.base_model.id, out=folder)
    lora = load_adapter(built_repo / trainer.adapter)
    config = json.loads((folder / "adapter_config.json").read_text())
    convert_lora(adapter=lora, config=config, base=built_repo / trainer.base_model.path,
                 out=folder / f"{trainer.name}-lora-f16.gguf", name=trainer.name,
                 outtype=adapter_release.GGUF_LORA_OUTTYPE, trainer_key="kto",
                 llama_cpp_version=params.llama_cpp_version)
    return {"sft": built_repo / "build/sft/adapter", "kto": folder}


def test_the_adapter_folder_holds_what_peft_needs_and_nothing_the_trainer_left(
        built_repo: Path, released: dict[str, Path]) -> None:
    folder = released["sft"]
    run = built_repo / "inputs/runs/sft/demo/final_model"
    names = sorted(p.name for p in folder.iterdir()
                   if p.suffix != ".gguf" and p.name not in ("README.md", "manifest.json"))
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
        built_repo: Path, released: dict[str, Path], tmp_path: Path) -> None:
    """lora_check@sft measured the very file adapter@sft published, under the limit, and
    the card shows it; the same check with kto's GGUF LoRA on sft's base and logits fails
    naming the figure, the limit and the way out."""
    from stages import lora_check

    params = load_params(built_repo / "params.yaml")
    name = params.trainer("sft").name
    lora = released["sft"] / f"{name}-lora-f16.gguf"
    record = json.loads((built_repo / "build/sft/work/eval/lora.json").read_text())
    assert record["lora_sha256"] == sha256_file(lora)
    assert record["kld_mean"] < params.evaluate.lora.max_kld == record["max_kld"]
    card = (released["sft"] / "README.md").read_text()
    assert f"mean KL divergence {record['kld_mean']:.6f} (limit" in card
    work = built_repo / "build/sft/work"
    with pytest.raises(ReleaseError, match=r"above evaluate\.lora\.max_kld.*gguf_lora: false") \
            as err:
        lora_check.run(params_path=built_repo / "params.yaml", trainer_key="sft",
                       base=built_repo / params.trainer("sft").base_model.path,
                       base_gguf=work / "base.gguf", logits=work / "reference.kld",
                       out=tmp_path / "lora.json", lora=next(released["kto"].glob("*.gguf")))
    other = float(str(err.value).split("mean KL divergence ")[1].split(",")[0])
    assert other > 10 * record["kld_mean"], (other, record["kld_mean"])
    assert not (tmp_path / "lora.json").exists()
    header = open_reader(released["sft"] / f"{name}-lora-f16.gguf")
    assert header.get("general.type") == "adapter" and header.get("adapter.type") == "lora"
    # gguf-py names it after the folder it converts, spaced and capitalised: the view's
    # (the release name), not the run's final_model
    assert header.get("general.name").replace(" ", "-").lower() == name.lower()
    assert header.get("adapter.lora.alpha") == 16.0
    assert scan_release(released["sft"], this_machine(built_repo)) == []



def test_the_adapter_release_lists_its_files_and_its_card_passes_the_hub_rules(
        built_repo: Path) -> None:
    folder = built_repo / "build/sft/adapter"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "adapter" and manifest["trainer"] == "sft"
    listed = {e["path"]: e for e in manifest["artifacts"]}
    assert set(listed) == \
        {f"adapter/{p.name}" for p in folder.iterdir() if p.name != "manifest.json"}
    for path, entry in listed.items():
        assert sha256_file(built_repo / "build/sft" / path) == entry["sha256"], path
    assert {e["kind"] for e in listed.values()} >= {"adapter", "config", "gguf_lora", "card"}
    for tool in ("llama.cpp", "transformers", "peft", "torch", "dvc"):
        assert manifest["tools"][tool]
    card = (folder / "README.md").read_text()
    meta = card_metadata(card)
    assert validate_card_metadata(meta, load_hub_licenses()) == []
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["base_model_relation"], meta["library_name"]) == ("adapter", "peft")
    # the GGUF card links this format, and this card the GGUF's (local targets: folders)
    assert "`published/sft/gguf` (a local folder)" in card
    assert "`published/sft/adapter` (a local folder)" in \
        (built_repo / "build/sft/gguf/README.md").read_text()
    assert "lora-f16.gguf -cnv" in card and "Training lineage" in card

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


# --- merged -------------------------------------------------------------------------------


def greedy_reply(model, ids: torch.Tensor, tokens: int = 24) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_the_merged_folder_answers_like_peft_merge_and_unload_of_the_adapter(
        built_repo: Path) -> None:
    """The published merged folder, loaded by transformers alone, gives the greedy reply
    of peft's own merge (merge_and_unload of the run's adapter on the base, rounded to
    the published bf16), and not the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = built_repo / "build/sft/merged"
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "Where is the treasure?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    base_path = built_repo / "inputs/base/SmolLM2-135M-Instruct"
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base_reply = greedy_reply(base, ids)
    peft_merged = PeftModel.from_pretrained(
        base, built_repo / "inputs/runs/sft/demo/final_model").merge_and_unload()
    peft_merged = peft_merged.to(torch.bfloat16).to(torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert ours.config.dtype == torch.float32
    reply = greedy_reply(ours, ids)
    assert reply == greedy_reply(peft_merged, ids), tok.decode(reply)
    assert reply != base_reply


def test_the_merged_release_lists_its_files_and_its_card_passes_the_hub_rules(
        built_repo: Path) -> None:
    folder = built_repo / "build/sft/merged"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "merged" and manifest["trainer"] == "sft"
    listed = {e["path"]: e for e in manifest["artifacts"]}
    assert set(listed) == \
        {f"merged/{p.name}" for p in folder.iterdir() if p.name != "manifest.json"}
    for path, entry in listed.items():
        assert sha256_file(built_repo / "build/sft" / path) == entry["sha256"], path
    assert {e["kind"] for e in listed.values()} >= {
        "weights", "weights_index", "config", "generation_config", "tokenizer", "card"}
    for tool in ("llama.cpp", "transformers", "peft", "torch", "dvc"):
        assert manifest["tools"][tool]
    assert manifest["params"]["trainers"]["sft"]["release"]["merged"] == {"dtype": "bf16"}
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    dtypes = {info.dtype for info in model_tensors(folder).values()}
    assert dtypes == {"BF16"}
    card = (folder / "README.md").read_text()
    meta = card_metadata(card)
    assert validate_card_metadata(meta, load_hub_licenses()) == []
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["base_model_relation"], meta["library_name"]) == ("finetune", "transformers")
    assert "every one of the 272 tensors is what the adapter" in card.replace("\n", " ")
    for other in ("adapter", "gguf"):
        assert "`published/sft/merged` (a local folder)" in \
            (built_repo / f"build/sft/{other}/README.md").read_text()
        assert f"`published/sft/{other}` (a local folder)" in card
    assert scan_release(folder, this_machine(built_repo)) == []
    whole = json.loads((built_repo / "build/sft/manifest.json").read_text())
    assert whole["formats"] == ["adapter", "merged", "gguf"]
    assert {e["format"] for e in whole["artifacts"]} == {"adapter", "merged", "gguf"}


def test_the_merged_format_in_f16_and_what_f16_cannot_hold(
        built_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dtype: f16``: every float tensor cast, the model loads and predicts like the bf16
    release; a value beyond f16's range is an error naming the tensor and bf16; a merge
    of another adapter (sft's merged files released as kto's) publishes nothing."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from stages.config.params import parse_params
    from stages.core.errors import CheckFailed
    from stages.release import merged as merged_release

    monkeypatch.chdir(built_repo)
    data = yaml.safe_load((built_repo / "params.yaml").read_text())
    data["trainers"]["sft"]["release"]["merged"]["dtype"] = "f16"
    data["trainers"]["kto"]["release"]["merged"] = {
        "target": {"kind": "local", "path": "published/kto/merged"}}
    params = parse_params(data)
    work = built_repo / "build/sft/work/merged"
    base = built_repo / params.trainer("sft").base_model.path
    out = tmp_path / "sft" / "merged"
    result = merged_release.render_merged_release(params=params, trainer_key="sft",
                                                  merged=work, base=base, out=out)
    tensors = model_tensors(out)
    assert {i.dtype for i in tensors.values()} == {"F16"}
    assert result.cast == len(tensors) and result.check.tensors == len(tensors)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    ids = torch.tensor([[1, 504, 3458, 282, 253, 6420, 30, 2]])
    with torch.no_grad():
        f16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        bf16 = AutoModelForCausalLM.from_pretrained(built_repo / "build/sft/merged",
                                                    dtype=torch.float32)(ids).logits
    assert (f16.argmax(-1) == bf16.argmax(-1)).all()
    assert (f16 - bf16).abs().max().item() < 0.05 * bf16.abs().max().item()
    # beyond f16
    big = tmp_path / "big"
    big.mkdir()
    save_file({"w": torch.tensor([1.0, -7.0e4, 3.0], dtype=torch.bfloat16)},
              str(big / "model.safetensors"))
    info = model_tensors(big)["w"]
    with pytest.raises(ReleaseError, match=r"`w` holds values F16 cannot.*dtype: bf16"), \
            Reader() as reader:
        list(merged_release.cast_chunks(info, "F16", reader))
    # another adapter's merge
    other = tmp_path / "kto" / "merged"
    with pytest.raises(CheckFailed, match="not this adapter applied to this base"):
        merged_release.render_merged_release(params=params, trainer_key="kto", merged=work,
                                             base=base, out=other)
    assert not other.parent.exists() or list(other.parent.iterdir()) == []


# --- merged_4bit --------------------------------------------------------------------------


def test_the_merged_4bit_format_is_nf4_that_transformers_loads(
        built_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes quantizes on this CPU: the folder holds NF4 linears and a config that
    loads them with no option; it scores our fine-tune's pirate reply like the fine-tune,
    not like the base; on the Hub beside a merged repo, its card is a quantization of that repo."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.config.params import parse_params
    from stages.release import merged_4bit

    monkeypatch.chdir(built_repo)
    data = yaml.safe_load((built_repo / "params.yaml").read_text())
    release = data["trainers"]["sft"]["release"]
    release["merged"]["target"] = {"kind": "hub", "repo_id": "alice/pirate-sft"}
    release["merged_4bit"] = {"target": {"kind": "hub", "repo_id": "alice/pirate-sft-bnb-4bit"}}
    params = parse_params(data)
    out = tmp_path / "sft" / "merged_4bit"
    result = merged_4bit.render_4bit_release(
        params=params, trainer_key="sft", merged=built_repo / "build/sft/work/merged",
        base=built_repo / params.trainer("sft").base_model.path, out=out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bnb_4bit_quant_type"], config["load_in_4bit"]) == \
        ("bitsandbytes", "nf4", True)
    assert result.quantized.linear_4bit == 210 == result.check.lora_merged
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 210
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Where is the treasure?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    ours = AutoModelForCausalLM.from_pretrained(built_repo / "build/sft/merged",
                                                dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        built_repo / params.trainer("sft").base_model.path, dtype=torch.float32)
    with torch.no_grad():  # our fine-tune's reply, scored by each model
        text = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=24, do_sample=False)
        reply = slice(ids.shape[1] - 1, -1)
        logp = {name: m(text).logits.float().log_softmax(-1)[0, reply]
                for name, m in (("ours", ours), ("nf4", model), ("base", base))}

    def kld(q: str) -> float:  # mean KL(ours || q) over the reply
        return (logp["ours"].exp() * (logp["ours"] - logp[q])).sum(-1).mean().item()
    # measured: 0.21 for NF4, 1.17 for the base
    assert kld("nf4") < 0.5 * kld("base"), (kld("nf4"), kld("base"))
    meta = card_metadata((out / "README.md").read_text())
    assert validate_card_metadata(meta, load_hub_licenses()) == []
    assert (meta["base_model"], meta["base_model_relation"]) == ("alice/pirate-sft", "quantized")
    assert "bitsandbytes" in meta["tags"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "merged_4bit"
    assert {e["path"] for e in manifest["artifacts"]} == \
        {f"merged_4bit/{p.name}" for p in out.iterdir() if p.name != "manifest.json"}
    assert scan_release(out, this_machine(built_repo)) == []


def test_merged_4bit_is_refused_where_bitsandbytes_cannot_quantize_on_the_cpu(
        tmp_path: Path) -> None:
    """A bitsandbytes without its CPU library (a GPU-only build) shadows ours: params
    validation names why, and what to publish instead."""
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "libbitsandbytes_cuda128.so").write_bytes(b"")
    code = ("import sys, yaml; from stages.config.params import parse_params\n"
            "from stages.core.errors import ParamsError\n"
            "data = yaml.safe_load(open('params.yaml'))\n"
            "data['trainers']['kto']['release']['merged_4bit'] = "
            "{'target': {'kind': 'local', 'path': 'x'}}\n"
            "try:\n    parse_params(data)\nexcept ParamsError as exc:\n    print(exc)\n")
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{repo}"},
                         timeout=120)
    assert "`trainers.kto.release.merged_4bit` cannot be built here: this bitsandbytes has no " \
           "CPU library" in res.stdout, res.stdout + res.stderr
    assert "`gguf:` with the Q4_K_M level" in res.stdout
