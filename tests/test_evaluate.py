"""Fidelity checks, end to end: real model, real llama.cpp, real DVC.

The figures come from the built demo repo (conftest ``built_repo``); tests that
break something work in copies that share its DVC cache.  The parsers of
llama.cpp's output and the thresholds are tested on fixed text: they need none
of it and run in the fast tier (conftest marks ``slow`` by fixture).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stages.core.errors import ReleaseError
from stages.fidelity.llama_checks import KldStats, SmokeRun, parse_kld_stats, parse_smoke
from stages.llamacpp.gguf_meta import ChatInfo, open_reader
from tests.pipeline import copy_repo, run, set_param

TRAINERS = ("sft", "kto")
LEVELS = ("Q4_K_M", "Q5_K_M", "Q8_0")
METRICS = {"size_mib", "bpw", "kld_mean", "kld_p99", "ppl_ratio", "top1_pct", "smoke_pass"}
# ChatML as SmolLM2 writes it, but an assistant turn ends with nothing that stops generation.
NO_TURN_END = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture()
def clone(built_repo: Path, tmp_path: Path) -> Path:
    """A copy of the built demo repo sharing its DVC cache."""
    return copy_repo(built_repo, tmp_path / "repo", cache_from=built_repo)


def metrics_of(repo: Path, trainer: str) -> dict[str, dict]:
    return {lv: json.loads((repo / f"build/{trainer}/work/eval/{lv}.json").read_text())
            for lv in LEVELS}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_level_is_measured_and_q8_0_is_closest(built_repo: Path, trainer: str) -> None:
    metrics = metrics_of(built_repo, trainer)
    for level, m in metrics.items():
        assert set(m) == METRICS, level
        assert m["smoke_pass"] is True, level
        assert 0 < m["kld_mean"] <= m["kld_p99"], level
        assert 0 < m["top1_pct"] <= 100 and m["ppl_ratio"] > 0.9, level
        size = (built_repo / f"build/{trainer}/work/quant/{level}.gguf").stat().st_size
        assert m["size_mib"] == round(size / 2**20, 2)
    assert min(metrics, key=lambda lv: metrics[lv]["kld_mean"]) == "Q8_0"
    assert 8.0 < metrics["Q8_0"]["bpw"] < 9.0  # 34 bytes per 32 weights, plus f32 norms
    details = json.loads((built_repo / f"build/{trainer}/work/eval/Q4_K_M.details.json")
                         .read_text())
    assert details["smoke"]["stopped"] and details["smoke"]["reply"]
    assert details["smoke"]["tokens"] < details["smoke"]["max_tokens"]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_reference_checks_pass_with_their_figures(built_repo: Path, trainer: str) -> None:
    ref = json.loads((built_repo / f"build/{trainer}/work/eval/reference.json").read_text())
    conv = ref["conversion"]
    settings = yaml.safe_load((built_repo / "params.yaml").read_text())["evaluate"]
    assert ref["chunks"] == settings["chunks"] and ref["ctx"] == settings["ctx"] == 256
    assert conv["chunks"] == settings["conversion"]["chunks"] > 0
    assert conv["tokens"] == conv["chunks"] * 127  # the second half of each chunk, less one
    assert conv["kld_mean"] < conv["max_kld"] and conv["top1_pct"] > 95
    assert abs(conv["ppl_hf"] / conv["ppl_gguf"] - 1) < 0.02
    merge = ref["adapter_merge"]  # the demo: LoRA on every linear layer
    assert merge["tensors"] == merge["lora_merged"] + merge["replaced"] + merge["copied"]
    assert merge["lora_merged"] > 0 and merge["copied"] > 0
    assert merge["dtype"] == "BF16" and merge["merged_elements"] > 10**7
    # rounded once from fp32: all but a few values are the nearest bf16 to peft's exact merge
    assert merge["not_nearest"] + merge["fp32_bound"] < merge["merged_elements"] * 1e-4
    # the adapter's effect: information for the card (no threshold), but the demo's is large
    assert ref["adapter"]["kld_mean"] > 0 and "min_kld" not in ref["adapter"]
    assert ref["adapter"]["answers_differ"] > 0
    assert "Paris" in ref["adapter"]["example_base"]
    assert ref["chat"]["eos_token"] == ref["chat"]["turn_end"] == "<|im_end|>"
    # tokenizer parity: the whole evaluation text and one conversation, id for id
    assert ref["tokenizer"]["texts"] == 2 and ref["tokenizer"]["pre"] == "smollm"
    assert ref["tokenizer"]["tokens"] > 24 * 256


def test_dvc_metrics_show_lists_trainer_by_level(built_repo: Path) -> None:
    res = run([str(built_repo / ".venv/bin/dvc"), "metrics", "show", "--json"], cwd=built_repo)
    files = json.loads(res.stdout)[""]["data"]
    for trainer in TRAINERS:
        for level in LEVELS:
            data = files[f"build/{trainer}/work/eval/{level}.json"]["data"]
            assert set(data) == METRICS
    table = run([str(built_repo / ".venv/bin/dvc"), "metrics", "show"], cwd=built_repo).stdout
    assert "kld_mean" in table and "build/kto/work/eval/Q8_0.json" in table


@pytest.mark.parametrize("trainer", TRAINERS)
def test_card_shows_quality_table_and_plot(built_repo: Path, trainer: str) -> None:
    folder = built_repo / "build" / trainer / "gguf"
    card = (folder / "README.md").read_text()
    metrics = metrics_of(built_repo, trainer)
    assert "## Quality" in card and "![File size vs KL divergence](quality.png)" in card
    for level, m in metrics.items():
        row = next(line for line in card.splitlines() if line.startswith(f"| {level} | "))
        assert f"{m['kld_mean']:.4f}" in row and "stopped after" in row
    assert "Q8_0 is the closest to the full-precision model" in card
    assert "**Conversion**: the merged Hugging Face" in card
    assert "**Adapter effect** (information; no threshold)" in card
    assert "**Adapter merge**: each of the" in card and "BOS is not doubled" in card
    png = (folder / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"path": "gguf/quality.png", "kind": "plot"}.items() <= next(
        a for a in manifest["artifacts"] if a["kind"] == "plot").items()
    points = json.loads((built_repo / f"build/{trainer}/quality.json").read_text())
    assert [p["level"] for p in points] == list(LEVELS)
    published = built_repo / "published" / trainer / "gguf" / "quality.png"
    assert published.read_bytes() == png


def test_a_bigger_level_that_measures_worse_is_explained(built_repo: Path) -> None:
    for trainer in TRAINERS:
        metrics = metrics_of(built_repo, trainer)
        card = (built_repo / f"build/{trainer}/gguf/README.md").read_text()
        q4, q5 = metrics["Q4_K_M"], metrics["Q5_K_M"]
        if q5["kld_mean"] > q4["kld_mean"]:
            assert "Q5_K_M is larger than Q4_K_M but measures worse" in card
            assert "instead of q5_K" in card or "instead of q6_K" in card


def test_dvc_plot_of_size_vs_kld(built_repo: Path) -> None:
    res = run([str(built_repo / ".venv/bin/dvc"), "plots", "show", "--json"], cwd=built_repo)
    assert "build/sft/quality.json" in res.stdout and "kld_mean" in res.stdout


def test_level_over_its_threshold_fails_with_its_figures(built_repo: Path,
                                                         tmp_path: Path) -> None:
    from stages.fidelity.llama_checks import save_base_logits
    from stages.llamacpp import tools as llamacpp

    params = yaml.safe_load((built_repo / "params.yaml").read_text())
    params["evaluate"]["max_kld"] = {"default": 1.0e-6}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    logits = tmp_path / "one-chunk.kld"  # 127 scored tokens: enough for the statistics
    save_base_logits(tool=llamacpp.tool_path("llama-perplexity", params["llama_cpp"]["version"]),
                     gguf=built_repo / "build/sft/work/full.gguf",
                     text=built_repo / "data/eval.txt", ctx=256, chunks=1, out=logits)
    res = run([str(built_repo / ".venv/bin/python"), "-m", "stages.evaluate", "--level", "Q4_K_M",
               "--gguf", "build/sft/work/quant/Q4_K_M.gguf", "--logits", str(logits),
               "--out", str(tmp_path / "eval" / "Q4_K_M.json"),
               "--params", str(tmp_path / "params.yaml")], cwd=built_repo, check=False)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Q4_K_M: mean KL divergence from the full-precision GGUF")
    assert "above evaluate.max_kld for Q4_K_M (1e-06)" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "eval").exists()


def test_a_trainer_in_smoke_skip_gets_no_smoke_turn(built_repo: Path, tmp_path: Path) -> None:
    """``evaluate.smoke.skip``: the level is measured, no chat turn is run or checked."""
    from stages.fidelity.llama_checks import save_base_logits
    from stages.llamacpp import tools as llamacpp

    params = yaml.safe_load((built_repo / "params.yaml").read_text())
    params["evaluate"]["smoke"]["skip"] = ["kto"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    logits = tmp_path / "one-chunk.kld"
    save_base_logits(tool=llamacpp.tool_path("llama-perplexity", params["llama_cpp"]["version"]),
                     gguf=built_repo / "build/kto/work/full.gguf",
                     text=built_repo / "data/eval.txt", ctx=256, chunks=1, out=logits)
    found = {}
    for trainer in ("kto", "sft"):
        out = tmp_path / trainer / "Q8_0.json"
        res = run([str(built_repo / ".venv/bin/python"), "-m", "stages.evaluate", "--trainer",
                   trainer, "--level", "Q8_0", "--gguf", "build/kto/work/quant/Q8_0.gguf",
                   "--logits", str(logits), "--out", str(out),
                   "--params", str(tmp_path / "params.yaml")], cwd=built_repo)
        found[trainer] = (json.loads(out.read_text()),
                          json.loads(out.with_suffix(".details.json").read_text()), res.stderr)
    metrics, details, log = found["kto"]
    assert details["smoke"] == {"skipped": "evaluate.smoke.skip"} and metrics["smoke_pass"] is None
    assert "no smoke turn (evaluate.smoke.skip names trainer kto)" in log
    assert details["kld"]["kld_mean"] == found["sft"][1]["kld"]["kld_mean"]  # measured alike
    assert found["sft"][1]["smoke"]["reply"] and found["sft"][0]["smoke_pass"] is True


def test_broken_chat_template_fails_and_is_never_pushed(clone: Path) -> None:
    # The override is applied before conversion, so the GGUF carries the broken template.
    set_param(clone, "trainers.sft.chat_template", NO_TURN_END)
    receipt = (clone / "build/sft/push-gguf.json").read_text()
    published = {p.name: p.stat().st_mtime_ns for p in (clone / "published/sft/gguf").iterdir()}
    res = run([str(clone / ".venv/bin/dvc"), "repro", "push@sft-gguf"], cwd=clone,
              check=False)
    assert res.returncode != 0
    assert "the chat template ends an assistant turn with" in res.stderr
    assert "none of the GGUF's end-of-generation tokens ['<|im_end|>']" in res.stderr
    assert "trainers.sft.chat_template" in res.stderr and "Traceback" not in res.stderr
    assert "Running stage 'card@sft'" not in res.stdout
    assert (clone / "build/sft/push-gguf.json").read_text() == receipt
    assert {p.name: p.stat().st_mtime_ns
            for p in (clone / "published/sft/gguf").iterdir()} == published


def test_adapter_with_zeroed_lora_b_fails_the_adapter_check(clone: Path) -> None:
    from safetensors.torch import load_file, save_file

    run_dir = clone / "zeroed"
    shutil.copytree(clone / "inputs/runs/sft/demo", run_dir)
    weights = run_dir / "final_model" / "adapter_model.safetensors"
    tensors = load_file(weights)
    zeroed = [k for k in tensors if "lora_B" in k]
    assert zeroed
    save_file({k: v.zero_() if k in zeroed else v for k, v in tensors.items()}, weights)
    set_param(clone, "trainers.sft.adapter", "zeroed/final_model")
    res = run([str(clone / ".venv/bin/dvc"), "repro", "reference@sft"], cwd=clone, check=False)
    assert res.returncode != 0, res.stdout[-2000:]
    assert "error: the adapter is untrained: every lora_B of its" in res.stderr
    assert "zeroed/final_model" in res.stderr and "Traceback" not in res.stderr


def run_reference(repo: Path, out: Path, *, gguf: object = "build/sft/work/full.gguf",
                  merged: object = "build/sft/work/merged",
                  logits: object = "build/sft/work/reference.kld",
                  params: object = "params.yaml"):
    """sft's reference stage in ``repo`` on these inputs, writing ``out``; not checked."""
    return run([str(repo / ".venv/bin/python"), "-m", "stages.reference", "--trainer", "sft",
                "--gguf", str(gguf), "--base-gguf", "build/sft/work/base.gguf",
                "--merged", str(merged), "--logits", str(logits), "--out", str(out),
                "--params", str(params)], cwd=repo, check=False)


def test_merged_files_of_another_adapter_fail_the_adapter_check(built_repo: Path,
                                                                tmp_path: Path) -> None:
    """kto's merged files checked as sft's: the first LoRA target named, nothing written."""
    out = tmp_path / "eval" / "reference.json"
    res = run_reference(built_repo, out, merged="build/kto/work/merged")
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: merged tensor `model.layers.0."), last
    assert "is not this adapter applied to this base" in last
    assert "Rerun `dvc repro merge@sft`" in last and "Traceback" not in res.stderr
    assert not out.exists() and not out.parent.exists()


# GGUF metadata value types (gguf-py's GGUFValueType) this module patches: struct format.
GGUF_SCALARS = {4: "<I", 6: "<f", 7: "<?"}


def with_field(src: Path, dst: Path, key: str, value: object) -> object:
    """Copy a GGUF with metadata ``key`` set to ``value`` in place (a string of the same
    length, or a scalar: the rest of the file does not move); return the value it had."""
    import struct

    data = bytearray(src.read_bytes())
    at = data.index(key.encode()) + len(key)
    kind = int.from_bytes(data[at:at + 4], "little")
    if kind == 8:  # string: u64 length, bytes
        length = int.from_bytes(data[at + 4:at + 12], "little")
        assert length == len(str(value).encode()), "same length only"
        old = bytes(data[at + 12:at + 12 + length]).decode()
        data[at + 12:at + 12 + length] = str(value).encode()
    else:
        fmt = GGUF_SCALARS[kind]
        size = struct.calcsize(fmt)
        (old,) = struct.unpack(fmt, data[at + 4:at + 4 + size])
        data[at + 4:at + 4 + size] = struct.pack(fmt, value)
    dst.write_bytes(bytes(data))
    return old


def test_a_gguf_with_another_pre_tokenizer_fails_tokenizer_parity(built_repo: Path,
                                                                   tmp_path: Path) -> None:
    """sft's GGUF with Llama 3's pre-tokenizer in place of SmolLM2's (what a converter that
    guessed the tokenizer wrong writes): llama.cpp splits the text differently, and the
    reference stage says where, before any other work."""
    gguf = tmp_path / "full.gguf"
    assert with_field(built_repo / "build/sft/work/full.gguf", gguf,
                      "tokenizer.ggml.pre", "llama3") == "smollm"
    out = tmp_path / "eval" / "reference.json"
    res = run_reference(built_repo, out, gguf=gguf)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: tokenizer parity: {gguf} tokenizes the evaluation text "
                           "differently from the trainer's tokenizer: at token "), last
    assert "transformers has " in last and ", llama.cpp " in last
    assert "the GGUF's pre-tokenizer is 'llama3'" in last and "llama_cpp.version" in last
    assert "adapter merge" not in res.stderr  # it failed before the expensive checks
    assert not out.exists()


def test_a_template_that_writes_bos_twice_fails_the_bos_check(built_repo: Path,
                                                              tmp_path: Path) -> None:
    """sft released with a chat template override that writes `{{ bos_token }}` before
    SmolLM2's own first token, which is its BOS (`<|im_start|>`): converted for real, the
    GGUF carries that template, and llama.cpp's tokenization of a rendered prompt starts
    with BOS twice (llama-tokenize's output, after llama.cpp's chat path has removed what
    it removes).  (`llama-completion --jinja` in a level's smoke turn feeds the same.)"""
    python = str(built_repo / ".venv/bin/python")
    params = yaml.safe_load((built_repo / "params.yaml").read_text())
    template = (built_repo / "build/sft/work/merged/chat_template.jinja").read_text()
    params["trainers"]["sft"]["chat_template"] = "{{ bos_token }}" + template
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    gguf = tmp_path / "full.gguf"
    run([python, "-m", "stages.convert", "--trainer", "sft", "--model", "build/sft/work/merged",
         "--out", str(gguf), "--params", str(tmp_path / "params.yaml"), "--quiet"],
        cwd=built_repo)
    out = tmp_path / "eval" / "reference.json"
    res = run_reference(built_repo, out, gguf=gguf, params=tmp_path / "params.yaml")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {gguf}: the chat template writes BOS twice: prompts would "
                           "start with two BOS tokens (1)"), last
    assert not out.exists()


def test_a_gguf_with_another_rope_theta_fails_the_conversion_check(built_repo: Path,
                                                                    tmp_path: Path) -> None:
    """sft's GGUF with `llama.rope.freq_base` 100 times smaller than the model's (what a
    converter that misread the config writes): its logits, saved by the logits stage, are
    not the HF model's, and the conversion check fails with the figures."""
    python = str(built_repo / ".venv/bin/python")
    gguf, logits = tmp_path / "full.gguf", tmp_path / "reference.kld"
    source = built_repo / "build/sft/work/full.gguf"
    theta = open_reader(source).get("llama.rope.freq_base")
    assert with_field(source, gguf, "llama.rope.freq_base", theta / 100) == theta
    run([python, "-m", "stages.logits", "--gguf", str(gguf), "--out", str(logits)],
        cwd=built_repo)
    out = tmp_path / "eval" / "reference.json"
    res = run_reference(built_repo, out, gguf=gguf, logits=logits)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: conversion check: {gguf} disagrees with the merged HF model: "
                           "mean KL divergence "), last
    kld = float(last.split("mean KL divergence ")[1].split()[0])
    assert kld > 0.01 and "above evaluate.conversion.max_kld = 0.01" in last
    assert not out.exists()


def test_a_gguf_that_ends_its_turn_at_once_fails_the_smoke_turn(built_repo: Path,
                                                                tmp_path: Path) -> None:
    """sft's Q8_0 GGUF whose EOS id is the first token its reply starts with (a GGUF with a
    wrong EOS id): llama-completion stops at once (printing that token's text, as it prints
    an end-of-generation token that is not a control token), and the level fails."""
    from stages.fidelity.llama_checks import llama_token_ids
    from stages.llamacpp.tools import run_captured, tool_path

    version = yaml.safe_load((built_repo / "params.yaml").read_text())["llama_cpp"]["version"]
    source = built_repo / "build/sft/work/quant/Q8_0.gguf"
    prompt = yaml.safe_load((built_repo / "params.yaml").read_text())["evaluate"]["smoke"]["prompt"]
    stdout, _ = run_captured([str(tool_path("llama-completion", version)), "-m", str(source),
                              "--jinja", "-cnv", "--single-turn", "-p", prompt, "-n", "1",
                              "--temp", "0", "--repeat-penalty", "1.1", "-c", "512",
                              "--no-display-prompt", "--no-warmup"], "the first reply token")
    first = llama_token_ids(tool=tool_path("llama-tokenize", version), gguf=source,
                            text=stdout.split(" [end of text]")[0].rstrip("\n"),
                            add_special=False)
    assert len(first) == 1, (stdout, first)
    gguf = tmp_path / "Q8_0.gguf"
    with_field(source, gguf, "tokenizer.ggml.eos_token_id", first[0])
    out = tmp_path / "eval" / "Q8_0.json"
    res = run([str(built_repo / ".venv/bin/python"), "-m", "stages.evaluate", "--trainer", "sft",
               "--level", "Q8_0", "--gguf", str(gguf), "--logits", "build/sft/work/reference.kld",
               "--out", str(out)], cwd=built_repo, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Q8_0: the smoke reply is empty: the model ended its turn "
                           "at once"), last
    assert not out.exists()


# Peak RSS bound of reference's largest process (README, Fidelity): the libraries, the two
# resident budgets, and a few times the largest tensor in fp32 (read as bf16, converted).
LIBRARIES_MB = 700
LARGEST_TENSOR_TIMES = 4
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); sys.exit(rc)")


def test_reference_streams_the_hf_models_within_its_bound(built_repo: Path,
                                                           tmp_path: Path) -> None:
    """With no resident budget, sft's reference streams both HF models from disk: the same
    reference.json as the pipeline's (the demo fits its budget: held whole), and
    its largest process stays under the stated bound (loaded whole they take ~1.8 GB)."""
    from stages.weights.safetensors_io import model_tensors

    out = tmp_path / "eval" / "reference.json"
    python = str(built_repo / ".venv/bin/python")
    res = run(["env", "LLM_RELEASE_HF_RESIDENT_MB=0", python, "-c", PEAK, python, "-m",
               "stages.reference", "--trainer", "sft", "--gguf", "build/sft/work/full.gguf",
               "--base-gguf", "build/sft/work/base.gguf", "--merged", "build/sft/work/merged",
               "--logits", "build/sft/work/reference.kld", "--out", str(out)], cwd=built_repo)
    peak_mb = int(res.stdout.split()[-1])
    pipeline = built_repo / "build/sft/work"
    ours, theirs = (json.loads(p.read_text()) for p in (out, pipeline / "eval/reference.json"))
    for record in (ours, theirs):
        record["adapter_merge"].pop("seconds")  # a time by nature
    assert ours == theirs
    largest_mb = max(t.numel for t in model_tensors(pipeline / "merged").values()) * 4 >> 20
    bound_mb = (LIBRARIES_MB + LARGEST_TENSOR_TIMES * largest_mb) * 1.1
    assert peak_mb < bound_mb, f"reference peaked at {peak_mb} MB, bound {bound_mb:.0f} MB"


@pytest.fixture(scope="module")
def tokenizer(smollm2_base: Path):
    from stages.fidelity.hf_checks import load_tokenizer

    return load_tokenizer(smollm2_base, chat_template=None, eos_token=None)


def chat_info(tok, **change) -> ChatInfo:
    """What the GGUF of a correct conversion says, with ``change`` applied."""
    fields = {"chat_template": tok.chat_template, "bos_id": 1, "eos_id": 2, "add_bos": False,
              "stop_strings": ("<|im_end|>",)}
    return ChatInfo(**(fields | change))


@pytest.mark.parametrize(("change", "message"), [
    ({}, None),
    ({"chat_template": None}, "has no tokenizer.chat_template"),
    ({"chat_template": "{{ messages[0]['content'] }}"}, "differs from the trainer's (at char"),
    ({"eos_id": 0}, "EOS id is 0, the trainer's tokenizer says 2"),
    ({"stop_strings": ("<|endoftext|>",)}, "none of the GGUF's end-of-generation tokens"),
    # SmolLM2's BOS is <|im_start|>, its template's first token: llama.cpp's chat path
    # removes it from the rendered text before adding BOS, so one BOS reaches the model.
    ({"add_bos": True}, None),
    ({"add_bos": True, "template": "{{ bos_token }}"},
     "adds BOS (tokenizer.ggml.add_bos_token) and the chat template writes it after llama.cpp "
     "has removed one: prompts would start with two BOS tokens (1)"),
    ({"template": "{{ bos_token }}"},
     "the chat template writes BOS twice: prompts would start with two BOS tokens (1)"),
])
def test_chat_check_names_each_broken_piece(tokenizer, change: dict, message: str | None) -> None:
    from stages.fidelity.hf_checks import check_chat

    if "template" in change:  # written before the trainer's own template, in both files
        tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
        tokenizer.chat_template = change.pop("template") + tokenizer.chat_template
        change = {**change, "chat_template": tokenizer.chat_template}
    info = chat_info(tokenizer, **change)
    if message is None:
        result = check_chat(tok=tokenizer, gguf=info, where="x.gguf", fix="Fix it.")
        assert result.eos_token == result.turn_end == "<|im_end|>"
        return
    with pytest.raises(ReleaseError, match="Fix it") as err:
        check_chat(tok=tokenizer, gguf=info, where="x.gguf", fix="Fix it.")
    assert message in str(err.value)


def test_broken_template_syntax_is_reported(tokenizer) -> None:
    from stages.fidelity.hf_checks import check_chat

    broken = "{% for m in messages %}{{ m['content'] }"
    tokenizer_copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_copy.chat_template = broken
    with pytest.raises(ReleaseError, match="does not render a simple conversation"):
        check_chat(tok=tokenizer_copy, gguf=chat_info(tokenizer_copy), where="x.gguf", fix="")



KLD_LOG = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  18.191911 ±   0.950000
Mean PPL(base)                :  17.492355 ±   0.910000
Cor(ln(PPL(Q)), ln(PPL(base))):  99.10%
Mean ln(PPL(Q)/PPL(base))     :   0.039211 ±   0.001000
Mean PPL(Q)/PPL(base)         :   1.039992 ±   0.001000
====== KL divergence statistics ======
Mean    KLD:   0.048827 ±   0.000900
Maximum KLD:   0.507840
99.9%   KLD:   0.400000
99.0%   KLD:   0.193246
Same top p: 86.693 ± 0.674 %
"""


def test_parse_kld_statistics() -> None:
    assert parse_kld_stats(KLD_LOG) == KldStats(
        ppl_q=18.191911, ppl_base=17.492355, ppl_ratio=1.039992, kld_mean=0.048827,
        kld_p99=0.193246, kld_max=0.50784, top1_pct=86.693)
    with pytest.raises(ReleaseError, match="printed no"):
        parse_kld_stats(KLD_LOG.replace("Same top p", "Other"))


@pytest.mark.parametrize(("stdout", "stopped", "text"), [
    ("Arr, Paris it be! [end of text]\n\n", True, "Arr, Paris it be!"),
    ("Arr, arr, arr, arr\n\n", False, "Arr, arr, arr, arr"),
])
def test_parse_smoke_reply(stdout: str, stopped: bool, text: str) -> None:
    stderr = ("0.00.99 I      1 -> '<|im_start|>'\n0.00.99 I   9690 -> 'system'\n"
              "common_perf_print:        eval time =    433.87 ms /    12 runs\n")
    run_ = parse_smoke(stdout, stderr, 16)
    assert (run_.stopped, run_.text, run_.tokens, run_.prompt_ids) == (stopped, text, 13, (1, 9690))


def smoke(stopped: bool = True, ids: tuple[int, ...] = (1, 9690), text: str = "Arr!") -> SmokeRun:
    return SmokeRun(text=text, tokens=5, max_tokens=16, stopped=stopped, prompt_ids=ids)


@pytest.mark.parametrize(("kld", "run_", "message"), [
    (0.05, smoke(), None),
    (0.3, smoke(), "Q4_K_M: mean KL divergence from the full-precision GGUF is 0.30000, above"),
    (0.05, smoke(stopped=False), "Q4_K_M: the smoke reply did not stop: 5 tokens without EOS"),
    (0.05, smoke(ids=(1, 1, 9690)), "llama-completion fed two BOS tokens (1)"),
    (0.05, smoke(text=" \n"), "Q4_K_M: the smoke reply is empty: the model ended its turn at"),
])
def test_check_level_thresholds(kld: float, run_: SmokeRun, message: str | None) -> None:
    from stages.evaluate import check_level

    stats = KldStats(ppl_q=18.0, ppl_base=17.5, ppl_ratio=1.03, kld_mean=kld, kld_p99=4 * kld,
                     kld_max=10 * kld, top1_pct=88.0)
    if message is None:
        check_level(level="Q4_K_M", kld=stats, max_kld=0.25, smoke=run_, bos_id=1)
        return
    with pytest.raises(ReleaseError) as err:
        check_level(level="Q4_K_M", kld=stats, max_kld=0.25, smoke=run_, bos_id=1)
    assert message in str(err.value)


def test_overrides_are_applied_before_conversion(built_repo: Path, tmp_path: Path) -> None:
    from gguf import SpecialVocab

    from stages.config.params import load_params
    from stages.llamacpp.convert import model_view

    trainer = load_params(built_repo / "params.yaml").trainer("sft")
    merged = built_repo / "build/sft/work/merged"
    own = SpecialVocab(model_view(merged, tmp_path / "own", trainer), load_merges=False)
    assert own.chat_template == (merged / "chat_template.jinja").read_text()
    assert own.special_token_ids["eos"] == 2
    fixed = trainer.model_copy(update={"chat_template": NO_TURN_END, "eos_token": "<|endoftext|>"})
    vocab = SpecialVocab(model_view(merged, tmp_path / "view", fixed), load_merges=False)
    assert vocab.chat_template == NO_TURN_END  # what convert_hf_to_gguf.py writes
    assert vocab.special_token_ids["eos"] == 0
    with pytest.raises(ReleaseError, match="`trainers.sft.eos_token` is '</s>', which is not a"):
        model_view(merged, tmp_path / "bad", trainer.model_copy(update={"eos_token": "</s>"}))


def test_card_records_the_overrides(built_repo: Path, tmp_path: Path) -> None:
    from stages.config.params import parse_params
    from stages.release.card import render_release as render_card

    data = yaml.safe_load((built_repo / "params.yaml").read_text())
    data["trainers"]["sft"]["eos_token"] = "<|im_end|>"
    data["trainers"]["sft"]["adapter"] = str(built_repo / data["trainers"]["sft"]["adapter"])
    work = built_repo / "build/sft/work"
    render_card(params=parse_params(data), trainer_key="sft", quant_dir=work / "quant",
                eval_dir=work / "eval", out=tmp_path / "gguf", plot_data=tmp_path / "quality.json")
    card = " ".join((tmp_path / "gguf" / "README.md").read_text().split())
    assert "EOS was **overridden** in `params.yaml` to `<|im_end|>` before conversion" in card
    assert "chat template was **overridden**" not in card


@pytest.mark.parametrize(("lost", "runs"), [(0, 1), (2, 3), (9, 5)])
def test_a_tool_that_exits_before_its_last_lines_is_rerun(tmp_path: Path, lost: int,
                                                          runs: int) -> None:
    """The pinned tools' logger may lose a fast run's last lines at exit: a stand-in tool
    that loses them ``lost`` times, then prints them, is run until they come (5 at most;
    the last run's output then goes to the parser, which names what is missing)."""
    import re

    from stages.fidelity.llama_checks import EVAL_RUNS, run_until

    count = tmp_path / "count"
    tool = tmp_path / "tool"
    tool.write_text(f"#!/bin/sh\nn=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}\n"
                    f"echo reply\nif [ $n -ge {lost} ]; then echo 'eval time = 1.0 ms / 7 runs' "
                    ">&2; fi\n")
    tool.chmod(0o755)
    stdout, stderr = run_until([str(tool)], "tool", EVAL_RUNS)
    assert int(count.read_text()) == runs and stdout == "reply\n"
    assert bool(re.search(EVAL_RUNS, stderr)) == (lost < 5)
