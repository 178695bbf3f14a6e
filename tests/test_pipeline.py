"""The whole pipeline, end to end, with real DVC, real models, real llama.cpp.

These tests share one built demo repo (conftest ``built_repo``); tests that
change params work in copies that share its DVC cache, so each starts from a
complete, up-to-date pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.core.hashing import sha256_file
from tests.pipeline import RELEASES, copy_repo, pushes, repro, run, set_param, status

TRAINERS = ("sft", "kto")
LEVELS = ("Q4_K_M", "Q5_K_M", "Q8_0")


def stages_of(trainer: str, levels: tuple[str, ...] = LEVELS) -> set[str]:
    """Every release stage of one demo trainer (the adapter's and the check of its GGUF
    LoRA when it releases one, the merged folder's when it releases that)."""
    adapter = ({f"adapter@{trainer}", f"lora_check@{trainer}"}
               if "adapter" in RELEASES[trainer] else set())
    adapter |= {f"merged@{trainer}"} if "merged" in RELEASES[trainer] else set()
    return ({f"merge@{trainer}", f"convert@{trainer}", f"convert_base@{trainer}",
             f"logits@{trainer}", f"reference@{trainer}", f"card@{trainer}",
             f"manifest@{trainer}"}
            | adapter | pushes(trainer)
            | {f"{stage}@{trainer}-{level}" for level in levels
               for stage in ("quantize", "evaluate")})


@pytest.fixture()
def clone(built_repo: Path, tmp_path: Path) -> Path:
    """A copy of the built demo repo sharing its DVC cache: up to date, ready to change."""
    copy = copy_repo(built_repo, tmp_path / "repo", cache_from=built_repo)
    assert repro(copy) == set(), "a fresh copy of a built repo must have nothing to rerun"
    return copy


@pytest.mark.parametrize("trainer", TRAINERS)
def test_release_folder_is_complete_and_hashes_match(built_repo: Path, trainer: str) -> None:
    folder = built_repo / "build" / trainer / "gguf"
    manifest = json.loads((folder / "manifest.json").read_text())
    names = sorted(p.name for p in folder.iterdir())
    name = manifest["name"]
    assert names == sorted([f"{name}-{lv}.gguf" for lv in LEVELS]
                           + ["Modelfile", "README.md", "manifest.json", "quality.png"])
    # the trainer's manifest (manifest@<t>): every released format's files, each saying
    # its format, in push order
    whole = json.loads((built_repo / "build" / trainer / "manifest.json").read_text())
    assert whole["formats"] == list(RELEASES[trainer]) and whole["format"] is None
    parts = [json.loads((built_repo / "build" / trainer / fmt / "manifest.json").read_text())
             for fmt in RELEASES[trainer]]
    assert whole["artifacts"] == [a for p in parts for a in p["artifacts"]]
    assert {a["format"] for a in whole["artifacts"]} == set(RELEASES[trainer])
    assert all(a["path"].startswith(f"{a['format']}/") for a in whole["artifacts"])
    assert manifest["format"] == "gguf"
    listed = {e["path"]: e for e in manifest["artifacts"]}
    assert set(listed) == {f"gguf/{n}" for n in names if n != "manifest.json"}
    for path, entry in listed.items():
        file = built_repo / "build" / trainer / path
        assert file.stat().st_size == entry["bytes"]
        assert sha256_file(file) == entry["sha256"], path
    levels = sorted(e["level"] for e in manifest["artifacts"] if e["kind"] == "gguf")
    assert levels == sorted(LEVELS)
    for tool in ("llama.cpp", "transformers", "peft", "torch", "dvc"):
        assert manifest["tools"][tool]
    assert manifest["lineage"]["trainer"] == trainer


@pytest.mark.parametrize(("trainer", "fmt"), [(t, f) for t in TRAINERS for f in RELEASES[t]])
def test_push_published_exactly_the_release(built_repo: Path, trainer: str, fmt: str) -> None:
    receipt = json.loads((built_repo / "build" / trainer / f"push-{fmt}.json").read_text())
    head = run(["git", "rev-parse", "HEAD"], cwd=built_repo).stdout.strip()
    assert receipt["git_commit"].startswith(head)
    assert [f["format"] for f in receipt["formats"]] == [fmt]
    target = built_repo / "published" / trainer / fmt
    release = built_repo / "build" / trainer / fmt
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in release.iterdir())
    for path in release.iterdir():
        assert sha256_file(target / path.name) == sha256_file(path)


def test_second_repro_runs_nothing(built_repo: Path) -> None:
    assert repro(built_repo) == set()


def test_editing_the_fidelity_library_changes_only_the_checks(built_repo: Path) -> None:
    """stages/fidelity is a dep of logits@, reference@, evaluate@, lora_check@ and merged@ only: DVC
    would rerun those, and no merge, convert or quantize (a reorganised dep list must keep expensive
    stages cached)."""
    library = built_repo / "stages/fidelity/hf_checks.py"
    text = library.read_text()
    before = status(built_repo)
    try:
        library.write_text(text + "# an edit to the fidelity library\n")
        after = status(built_repo)
    finally:
        library.write_text(text)
    checks = ({f"{stage}@{t}" for t in TRAINERS for stage in ("logits", "reference")}
              | {f"evaluate@{t}-{lv}" for t in TRAINERS for lv in LEVELS}
              | {f"lora_check@{t}" for t in TRAINERS if "adapter" in RELEASES[t]}
              # the merged release checks the merge itself (stages/fidelity/adapter_check.py)
              | {f"merged@{t}" for t in TRAINERS if "merged" in RELEASES[t]})
    assert set(after) == set(before) | checks, json.dumps(after, indent=1)
    for stage in checks:
        assert {"changed deps": {"stages/fidelity": "modified"}} in after[stage], after[stage]
    newly = set(after) - set(before)
    assert not {s for s in newly if s.split("@")[0] in {"merge", "convert", "quantize"}}, newly
    assert "merge@sft" not in newly and "merge@kto" not in newly
    assert {s: after[s] for s in before if s not in checks} == \
        {s: v for s, v in before.items() if s not in checks}
    assert status(built_repo) == before, "restoring the file must restore the status"


def test_changing_one_level_reruns_only_that_level(clone: Path) -> None:
    set_param(clone, "quantize.levels.Q5_K_M", {"pure": True})
    ran = repro(clone)
    assert ran == ({f"quantize@{t}-Q5_K_M" for t in TRAINERS}
                   | {f"evaluate@{t}-Q5_K_M" for t in TRAINERS}
                   | {f"card@{t}" for t in TRAINERS} | {f"push@{t}-gguf" for t in TRAINERS}
                   | {f"manifest@{t}" for t in TRAINERS})
    # Only what changed is published again: the new Q5_K_M file, the card
    # listing it and the quality plot showing its new KLD; the Modelfile (it
    # points at Q4_K_M) and the other levels stay.
    receipt = json.loads((clone / "build/sft/push-gguf.json").read_text())
    name = json.loads((clone / "build/sft/manifest.json").read_text())["name"]
    assert receipt["formats"][0]["uploaded"] == ["README.md", f"{name}-Q5_K_M.gguf",
                                                 "quality.png", "manifest.json"]


def test_adding_a_trainer_runs_only_its_stages(clone: Path) -> None:
    """A new trainer releasing only its adapter: its adapter and push stages run, and no
    merge, convert, quantize or evaluate stage (of it or of anyone)."""
    entry = json.loads(json.dumps(__import__("yaml").safe_load(
        (clone / "params.yaml").read_text())["trainers"]["kto"]))
    entry["name"] = "SmolLM2-135M-Instruct-pirate-second"
    entry["release"] = {"adapter": {"target": {"kind": "local", "path": "published/second/a"}}}
    set_param(clone, "trainers.second", entry)
    assert repro(clone) == {"adapter@second", "push@second-adapter", "manifest@second"}
    published = clone / "published/second/a"
    assert (published / "adapter_model.safetensors").read_bytes() == \
        (clone / entry["adapter"] / "adapter_model.safetensors").read_bytes()
    assert (published / "SmolLM2-135M-Instruct-pirate-second-lora-f16.gguf").is_file()
    assert not (clone / "build/second/work").exists()


def test_make_push_pushes_only_that_trainer(clone: Path) -> None:
    set_param(clone, "trainers.sft.tags", ["pirate", "changed"])
    set_param(clone, "trainers.kto.tags", ["pirate", "changed"])
    before = (clone / "build/kto/push-gguf.json").read_text()
    res = run(["make", "push", "TRAINER=sft"], cwd=clone)
    ran = set(__import__("re").findall(r"Running stage '([^']+)'", res.stdout + res.stderr))
    # tags are GGUF metadata of the merged model, not of the base; the trainer's manifest
    # is no input of a push (dvc repro writes it)
    assert ran == stages_of("sft") - {"merge@sft", "convert_base@sft", "manifest@sft",
                                      "lora_check@sft"}
    assert (clone / "build/kto/push-gguf.json").read_text() == before
    card = (clone / "published/sft/gguf/README.md").read_text()
    assert "- changed" in card


def test_make_push_names_a_missing_trainer(clone: Path) -> None:
    res = run(["make", "push", "TRAINER=nope"], cwd=clone, check=False)
    assert res.returncode != 0
    assert "no trainer 'nope'" in res.stderr


@pytest.mark.parametrize("trainer", TRAINERS)
def test_gguf_metadata_comes_from_params(built_repo: Path, trainer: str) -> None:
    from gguf import GGUFReader

    params = yaml.safe_load((built_repo / "params.yaml").read_text())["trainers"][trainer]
    reader = GGUFReader(built_repo / "build" / trainer / "work" / "full.gguf")

    def field(key: str):
        return reader.get_field(key).contents()

    assert field("general.name") == params["name"]
    assert field("general.license") == params["license"]
    assert field("general.tags") == params["tags"]
    assert field("general.base_model.0.repo_url").endswith(params["base_model"]["id"])
    assert field("tokenizer.chat_template")  # the template travels into the GGUF


@pytest.mark.parametrize("trainer", TRAINERS)
def test_card_front_matter_and_modelfile(built_repo: Path, trainer: str) -> None:
    folder = built_repo / "build" / trainer / "gguf"
    params = yaml.safe_load((built_repo / "params.yaml").read_text())["trainers"][trainer]
    card = (folder / "README.md").read_text()
    head = yaml.safe_load(card.split("---\n")[1])
    assert head["base_model"] == params["base_model"]["id"]
    assert head["base_model_relation"] == "finetune"
    assert head["license"] == params["license"]
    assert set(params["tags"]) <= set(head["tags"])
    assert head["library_name"] == "gguf" and head["pipeline_tag"] == "text-generation"
    assert "datasets" not in head  # the demo's dataset is a local file, not a Hub dataset id
    for level in LEVELS:
        assert f"{params['name']}-{level}.gguf" in card
    modelfile = (folder / "Modelfile").read_text()
    level = params["release"]["gguf"]["ollama_level"]
    assert f"FROM ./{params['name']}-{level}.gguf\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_quantize_fallbacks_are_recorded_and_explained(built_repo: Path) -> None:
    # SmolLM2-135M's rows are 576 wide, not a multiple of 256: K-quants fall back.
    record = json.loads((built_repo / "build/sft/work/quant/Q4_K_M.json").read_text())
    assert record["fallbacks"], "llama-quantize reported no fallback for 576-wide rows"
    assert all(fb["block"] == 256 for fb in record["fallbacks"])
    q8 = json.loads((built_repo / "build/sft/work/quant/Q8_0.json").read_text())
    assert q8["fallbacks"] == []  # Q8_0 blocks are 32 wide: 576 fits
    card = (built_repo / "build/sft/gguf/README.md").read_text()
    assert "not a multiple of 256" in card


def test_merged_model_answers_differently_from_base(built_repo: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = json.loads((built_repo / "data/probes.jsonl").read_text().splitlines()[0])["prompt"]

    def answer(folder: Path) -> str:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        return tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)

    base = answer(built_repo / "inputs/base/SmolLM2-135M-Instruct")
    assert "Paris" in base
    for trainer in TRAINERS:
        merged = answer(built_repo / "build" / trainer / "work" / "merged")
        assert merged != base, f"{trainer}: merged model answers like the base: {merged!r}"


def test_failed_quantize_leaves_no_output(built_repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    out = tmp_path / "out" / "Q8_0.gguf"
    res = run([str(built_repo / ".venv/bin/python"), "-m", "stages.quantize", "--in", str(bad),
               "--level", "Q8_0", "--out", str(out)], cwd=built_repo, check=False)
    assert res.returncode == 1
    assert f"error: {bad} is not a readable GGUF file" in res.stderr  # refused before the tool
    assert "dvc repro --force convert@" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
