"""Every model family our users fine-tune, end to end: merge -> convert -> convert_base ->
quantize -> logits -> reference -> evaluate -> card, on a tiny random-weight model of each
family with a LoRA on every linear layer (tests/families.py).

Each stage runs as dvc.yaml runs it (``python -m stages.<name>``), with a params file
whose trainers are the families (one level, few chunks, no smoke turn: random weights
never stop).  The merged tensors are checked against peft's own ``merge_and_unload`` in
float64, independently of the reference stage's adapter check; the GGUF must load in
llama.cpp (quantize, logits and evaluate read it) and the card must render.  A family
whose converter refuses every tokenizer that can be made here (:data:`REFUSED`) must
stop at convert with one error line that says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.families import FAMILIES, SENTENCEPIECE, build_adapter, build_base, build_sp_tokenizer
from tests.merge_fixtures import load_model_tensors

REPO = Path(__file__).resolve().parent.parent
LEVEL = "Q8_0"
# Families whose converter refuses the demo's tokenizer and no other can be made here: the
# convert stage stops with one error line saying why.  Qwen2's converter identifies a BPE
# tokenizer by a hash of its output (convert_hf_to_gguf_update.py's list, each a real
# model's tokenizer from the Hub) and knows none that can be built offline.  Gemma 2 and
# Phi-3 get a SentencePiece tokenizer trained here (tests/families.py).
REFUSED = {
    "qwen2": "does not know this tokenizer: convert_hf_to_gguf.py identifies a BPE tokenizer "
             "(Qwen2ForCausalLM) by a hash of its output",
}

pytestmark = pytest.mark.usefixtures("llama_tools")


@pytest.fixture(scope="module")
def family_root(smollm2_base: Path, module_tmp) -> Path:
    """Every family's base and adapter, and one params file with a trainer per family."""
    root = module_tmp("families")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    trainers = {}
    for family in FAMILIES:
        tokenizer = smollm2_base
        if family in SENTENCEPIECE:
            style = SENTENCEPIECE[family]
            tokenizer = root / f"sentencepiece-{style}"
            if not tokenizer.is_dir():
                build_sp_tokenizer(tokenizer, style, REPO / "data/eval.txt")
        base = build_base(root / family / "base", family, tokenizer)
        adapter = build_adapter(root / family / "run", base, family)
        trainers[family] = {
            "output_root": str(root / family), "adapter": str(adapter),
            "base_model": {"id": f"tests/tiny-{family}", "path": str(base)},
            "name": f"tiny-{family}-lora", "license": "apache-2.0", "tags": [family],
            "release": {"gguf": {"ollama_level": LEVEL,
                                 "target": {"kind": "local",
                                            "path": str(root / family / "published")}}}}
    params["trainers"] = trainers
    params["quantize"]["levels"] = {LEVEL: {}}
    ev = params["evaluate"]
    ev.update(chunks=2, max_kld={"default": 1.0})
    ev["conversion"]["chunks"] = 2
    ev["smoke"]["skip"] = list(FAMILIES)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def stage(root: Path, *args: str, fails: bool = False) -> subprocess.CompletedProcess:
    """``python -m stages.<args>`` with the families' params (the merge takes none), from
    the repository."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    params = [] if args[0] == "merge" else ["--params", str(root / "params.yaml")]
    res = subprocess.run([sys.executable, "-m", f"stages.{args[0]}", *args[1:], *params],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert (res.returncode != 0) == fails, f"stages.{args[0]} exit {res.returncode}:\n" \
        f"{res.stderr[-3000:]}"
    return res


def peft_merge_float64(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's own merge of ``adapter`` into ``base``, in float64 (an independent merge)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    if model.config.tie_word_embeddings:  # the merge unties a head it changes; peft would not
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def check_merged(merged: Path, base: Path, adapter: Path) -> None:
    ours = load_model_tensors(merged)
    theirs = peft_merge_float64(base, adapter)
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    for name, tensor in ours.items():
        want = theirs[name]
        assert tensor.dtype == torch.bfloat16 and tensor.shape == want.shape, name
        # the nearest bf16 to peft's float64 merge, or one rounding step from it (1.5 units
        # in the last place at most: under 2 eps relative), and a float32 merge's error
        step = 2 * torch.finfo(torch.bfloat16).eps * want.abs() + 1e-6
        assert (tensor.double() - want).abs().le(step).all(), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_releases_end_to_end(family: str, family_root: Path) -> None:
    root, t = family_root, family
    work = root / family / "build"
    base, adapter = root / family / "base", root / family / "run" / "final_model"
    stage(root, "merge", "--base", str(base), "--adapter", str(adapter),
          "--out", str(work / "merged"))
    check_merged(work / "merged", base, adapter)
    res = stage(root, "convert", "--trainer", t, "--model", str(work / "merged"),
                "--out", str(work / "full.gguf"), fails=family in REFUSED)
    if family in REFUSED:
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {work / 'merged'}: the pinned llama.cpp"), last
        assert REFUSED[family] in last and "Traceback" not in res.stderr, last
        assert not (work / "full.gguf").exists()
        return
    stage(root, "convert", "--base", "--trainer", t, "--model", str(base),
          "--out", str(work / "base.gguf"))
    stage(root, "quantize", "--level", LEVEL, "--in", str(work / "full.gguf"),
          "--out", str(work / f"quant/{LEVEL}.gguf"))
    stage(root, "logits", "--gguf", str(work / "full.gguf"), "--out", str(work / "reference.kld"))
    stage(root, "reference", "--trainer", t, "--gguf", str(work / "full.gguf"),
          "--base-gguf", str(work / "base.gguf"), "--merged", str(work / "merged"),
          "--logits", str(work / "reference.kld"), "--out", str(work / "eval/reference.json"))
    stage(root, "evaluate", "--trainer", t, "--level", LEVEL,
          "--gguf", str(work / f"quant/{LEVEL}.gguf"), "--logits", str(work / "reference.kld"),
          "--out", str(work / f"eval/{LEVEL}.json"))
    stage(root, "card", "--trainer", t, "--quant-dir", str(work / "quant"),
          "--eval-dir", str(work / "eval"), "--out", str(work / "gguf"),
          "--plot-data", str(work / "quality.json"))
    ref = json.loads((work / "eval/reference.json").read_text())
    assert ref["conversion"]["kld_mean"] < ref["conversion"]["max_kld"]
    assert ref["adapter_merge"]["lora_merged"] > 0
    assert ref["tokenizer"]["tokens"] > 0
    level = json.loads((work / f"eval/{LEVEL}.json").read_text())
    assert level["kld_mean"] >= 0 and level["size_mib"] > 0
    card = (work / "gguf/README.md").read_text()
    assert f"tiny-{family}-lora-{LEVEL}.gguf" in card and "base_model: tests/tiny-" in card


def test_sentencepiece_files_reach_the_converter(family_root: Path, tmp_path: Path) -> None:
    """A Gemma 2 run saved by transformers 5 has tokenizer.json alone: the merge takes the
    base's tokenizer.model and writes the added_tokens_decoder the converter marks special
    tokens from.  With no tokenizer.model anywhere, convert stops in one line."""
    base, adapter = family_root / "gemma2" / "base", family_root / "gemma2" / "run" / "final_model"
    assert not (adapter / "tokenizer.model").exists()
    assert "added_tokens_decoder" not in json.loads((adapter / "tokenizer_config.json").read_text())
    merged = tmp_path / "merged"
    stage(family_root, "merge", "--base", str(base), "--adapter", str(adapter),
          "--out", str(merged))
    assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    decoder = json.loads((merged / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {"<start_of_turn>", "<end_of_turn>", "<bos>"} <= {t["content"] for t in decoder.values()}
    (merged / "tokenizer.model").unlink()
    res = stage(family_root, "convert", "--trainer", "gemma2", "--model", str(merged),
                "--out", str(tmp_path / "full.gguf"), fails=True)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {merged}: the pinned llama.cpp"), last
    assert "converter for Gemma2ForCausalLM reads a SentencePiece tokenizer.model, which this " \
           "folder lacks" in last and "Traceback" not in res.stderr, last
    assert not (tmp_path / "full.gguf").exists()
