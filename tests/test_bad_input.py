"""Bad input: every stage CLI ends in one ``error:`` line that names the file or
key and the fix, exits 1, prints no traceback, and leaves no output.

Each case runs the real command line (``python -m stages.<name>``, or ``make``)
in a subprocess on real files: a tiny Llama saved as a user's base would be
(bf16, sharded) with a peft adapter for the merge, the demo's own build for the
later stages (slow tier).  The table of the README's "Troubleshooting" section
is these cases.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline import copy_repo

REPO = Path(__file__).resolve().parent.parent
TIB = 2**40


def run_cli(args: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, env=os.environ | env, timeout=600)


def error_line(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The one ``error:`` line of a failed command (and no traceback)."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, text
    assert "Traceback" not in text, text
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, text
    print(errors[0])  # the table of the closing note: pytest -rP shows it
    return errors[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def sparse_safetensors(path: Path, name: str, size: int) -> None:
    """A valid safetensors file of ``size`` data bytes that takes no disk (a sparse file)."""
    side = int((size // 2) ** 0.5)
    header = json.dumps({name: {"dtype": "BF16", "shape": [side, side],
                                "data_offsets": [0, 2 * side * side]}}).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + 2 * side * side)


# --- the merge's inputs (fast: a tiny Llama) -----------------------------------------


@pytest.fixture(scope="module")
def pico(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig

    from tests.merge_fixtures import build_peft_adapter, build_pico

    root = tmp_path_factory.mktemp("pico")
    base = build_pico(root / "base", tied=False)
    adapter = build_peft_adapter(base, root / "adapter",
                                 LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    return {"base": base, "adapter": adapter}


def broken_copy(pico: dict[str, Path], tmp_path: Path, case: str) -> tuple[Path, Path]:
    """Copies of the pico base and adapter with one thing wrong."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(pico["base"], base)
    shutil.copytree(pico["adapter"], adapter)
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    if case == "base folder missing":
        shutil.rmtree(base)
    elif case == "base without config.json":
        (base / "config.json").unlink()
    elif case == "base config.json not JSON":
        (base / "config.json").write_text('{"model_type": "llama",')
    elif case == "base shard missing (dangling link)":
        shard.unlink()
        shard.symlink_to(tmp_path / "gone" / shard.name)
    elif case == "base shard truncated":
        os.truncate(shard, shard.stat().st_size // 2)
    elif case == "base shard header corrupt":
        data = bytearray(shard.read_bytes())
        data[8:24] = b"#" * 16
        shard.write_bytes(bytes(data))
    elif case == "base shard not safetensors":
        shard.write_bytes(b"PK\x03\x04 a zip, as torch.save writes")
    elif case == "adapter folder missing":
        shutil.rmtree(adapter)
    elif case == "adapter weights missing":
        (adapter / "adapter_model.safetensors").unlink()
    elif case == "adapter weights truncated":
        os.truncate(adapter / "adapter_model.safetensors", 100)
    elif case == "adapter config not JSON":
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8')
    elif case == "base larger than the free disk":
        sparse_safetensors(base / "model-extra.safetensors", "extra.weight", 3 * TIB)
        index = json.loads((base / "model.safetensors.index.json").read_text())
        index["weight_map"]["extra.weight"] = "model-extra.safetensors"
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        raise AssertionError(case)
    return base, adapter


MERGE_CASES: dict[str, tuple[str, ...]] = {
    # case: what the error line must hold (the file and the fix)
    "base folder missing": ("base", "does not exist", "base_model.path"),
    "base without config.json": ("config.json", "base_model.path"),
    "base config.json not JSON": ("config.json", "not readable JSON", "copy"),
    "base shard missing (dangling link)": ("model-00002-of-00002.safetensors", "missing",
                                           "copy or download"),
    "base shard truncated": ("model-00002-of-00002.safetensors", "truncated", "copy or download"),
    "base shard header corrupt": ("model-00002-of-00002.safetensors", "corrupt",
                                  "copy or download"),
    "base shard not safetensors": ("model-00002-of-00002.safetensors", "not a safetensors file",
                                   "copy or download"),
    "adapter folder missing": ("adapter", "adapter_config.json", "make pick"),
    "adapter weights missing": ("adapter_model.safetensors", "missing", "make pick"),
    "adapter weights truncated": ("adapter_model.safetensors", "copy or download"),
    "adapter config not JSON": ("adapter_config.json", "not valid JSON", "make pick"),
    "base larger than the free disk": ("not enough disk", "GB are free", "needs"),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_refuses(case: str, pico: dict[str, Path], tmp_path: Path) -> None:
    base, adapter = broken_copy(pico, tmp_path, case)
    before = listing(tmp_path)
    out = tmp_path / "merged"
    line = error_line(run_cli(["stages.merge", "--base", str(base), "--adapter", str(adapter),
                               "--out", str(out)]))
    for part in MERGE_CASES[case]:
        assert part in line, line
    assert listing(tmp_path) == before  # no output, no temp folder
    if case == "base larger than the free disk":  # both numbers: needed and free
        need, free = (float(x) for x in line.split("needs ")[1].split(" GB are free")[0]
                      .replace(" GB, ", " ").split())
        assert need > 3000 > free


# --- params, and make around the stages (fast) -------------------------------------------


def test_params_not_yaml_names_file_and_line(tmp_path: Path) -> None:
    lines = (REPO / "params.yaml").read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("trainers:"))
    lines.insert(at + 1, "  sft: {base_model: [unclosed")
    bad = tmp_path / "params.yaml"
    bad.write_text("\n".join(lines) + "\n")
    line = error_line(run_cli(["stages.params", "--params", str(bad)]))
    assert str(bad) in line and f"line {at + 2}" in line and "not valid YAML" in line


def test_unknown_quant_level_lists_the_tools_levels(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["quantize"]["levels"]["Q4_K_X"] = {}
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    line = error_line(run_cli(["stages.params", "--params", str(bad)]))
    assert "quantize.levels.Q4_K_X" in line and "Q4_K_M" in line and "IQ4_XS" in line


def test_unknown_trainer_lists_the_trainers() -> None:
    trainers = list(yaml.safe_load((REPO / "params.yaml").read_text())["trainers"])
    line = error_line(run_cli(["stages.params", "--trainer", "nosuch"]))
    assert "nosuch" in line and all(t in line for t in trainers)


def test_convert_refuses_a_folder_without_config(tmp_path: Path) -> None:
    model = tmp_path / "merged"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    out = tmp_path / "full.gguf"
    line = error_line(run_cli(["stages.convert", "--trainer", "sft", "--model", str(model),
                               "--out", str(out)]))
    assert "config.json" in line and str(model) in line
    assert listing(tmp_path) == ["merged", "merged/model.safetensors"]


def test_convert_refuses_an_architecture_the_pinned_llama_cpp_lacks(llama_tools: str,
                                                                     tmp_path: Path) -> None:
    """Before any work (no weights read, no converter started): which architecture, that
    the pinned llama.cpp lacks it, and what it does know that is near."""
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text(
        '{"architectures": ["LlamaFancyForCausalLM"], "model_type": "llama_fancy"}')
    (model / "model.safetensors").write_bytes(b"")
    before = listing(tmp_path)
    line = error_line(run_cli(["stages.convert", "--trainer", "sft", "--model", str(model),
                               "--out", str(tmp_path / "full.gguf")]))
    assert line.startswith(f"error: {model}: architecture LlamaFancyForCausalLM is not one the "
                           "pinned llama.cpp can convert (llama-cpp-python "), line
    assert "LlamaForCausalLM" in line and "llama_cpp.version" in line
    assert listing(tmp_path) == before


# --- the later stages, on the demo's build (slow) ---------------------------------------


@pytest.fixture(scope="module")
def bad_repo(built_repo: Path, module_tmp) -> Path:
    """A copy of the built demo (sharing its DVC cache) to break things in."""
    return copy_repo(REPO, module_tmp("bad") / "repo", cache_from=built_repo)


@pytest.mark.parametrize("case", ["damaged header", "architecture llama.cpp lacks"])
def test_quantize_refuses_a_gguf_it_cannot_read(case: str, llama_tools: str,
                                                tmp_path: Path) -> None:
    source = tmp_path / "full.gguf"
    if case == "damaged header":
        source.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 4096)
    else:  # well formed, and refused by llama-quantize itself
        import gguf
        import numpy as np

        writer = gguf.GGUFWriter(source, "nosucharch")
        writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    out = tmp_path / "quant" / "Q4_K_M.gguf"
    line = error_line(run_cli(["stages.quantize", "--level", "Q4_K_M", "--in", str(source),
                               "--out", str(out)]))
    assert str(source) in line and "dvc repro --force convert@" in line, line
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_quantize_and_convert_check_the_disk_first(llama_tools: str, tmp_path: Path) -> None:
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    sparse_safetensors(model / "model.safetensors", "model.embed_tokens.weight", 3 * TIB)
    line = error_line(run_cli(["stages.convert", "--trainer", "sft", "--model", str(model),
                               "--out", str(tmp_path / "full.gguf")]))
    assert "not enough disk" in line and "full.gguf" in line and "GB are free" in line
    source = tmp_path / "big.gguf"
    with source.open("wb") as fh:
        fh.truncate(3 * TIB)
    line = error_line(run_cli(["stages.quantize", "--level", "Q8_0", "--in", str(source),
                               "--out", str(tmp_path / "q.gguf")]))
    assert "not enough disk" in line and "q.gguf" in line and "GB are free" in line
    assert listing(tmp_path) == ["big.gguf", "merged", "merged/config.json",
                                 "merged/model.safetensors", "merged/tokenizer.json"]


def stage_args(repo: Path, stage: str) -> list[str]:
    """``stages.<name> ...``: the command dvc.yaml gives ``stage``, as dvc.lock resolved it."""
    cmd = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["cmd"]
    return cmd.split(" -m ", 1)[1].split()


def test_logits_checks_the_disk_for_its_file(bad_repo: Path) -> None:
    params = bad_repo / "params-huge.yaml"
    shutil.copy(bad_repo / "params.yaml", params)
    data = yaml.safe_load(params.read_text())
    data["evaluate"]["chunks"] = 10**7
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    before = listing(bad_repo / "build/sft/work")
    line = error_line(run_cli([*stage_args(bad_repo, "logits@sft"), "--params", str(params)],
                              cwd=bad_repo))
    assert "not enough disk" in line and "reference.kld" in line and "GB are free" in line
    assert listing(bad_repo / "build/sft/work") == before


def test_card_names_the_template_line_that_does_not_render(bad_repo: Path) -> None:
    template = bad_repo / "templates/README.md.j2"
    original = template.read_text()
    before = listing(bad_repo / "build")
    try:
        lines = original.splitlines()
        lines.insert(5, "{{ files.steps }}")  # an attribute the card's file list lacks
        template.write_text("\n".join(lines) + "\n")
        line = error_line(run_cli(stage_args(bad_repo, "card@sft"), cwd=bad_repo))
        assert "templates/README.md.j2, line 6" in line and "steps" in line, line
        lines[5] = "{% if %}"  # a syntax error
        template.write_text("\n".join(lines) + "\n")
        line = error_line(run_cli(stage_args(bad_repo, "card@sft"), cwd=bad_repo))
        assert "templates/README.md.j2, line 6" in line and "git diff" in line, line
    finally:
        template.write_text(original)
    assert listing(bad_repo / "build") == before


def test_card_refuses_a_lineage_that_is_not_json(bad_repo: Path) -> None:
    lineage = bad_repo / "inputs/runs/sft/demo/training_lineage.json"
    original = lineage.read_bytes()
    before = listing(bad_repo / "build")
    try:
        lineage.unlink()  # never write through: it may be a link into the DVC cache
        lineage.write_text('{"trainer": "dpo", "base_model": ')
        line = error_line(run_cli(stage_args(bad_repo, "card@sft"), cwd=bad_repo))
        assert str(lineage.relative_to(bad_repo)) in line and "not valid JSON" in line, line
    finally:
        lineage.unlink()
        lineage.write_bytes(original)
    assert listing(bad_repo / "build") == before


def test_make_push_of_an_unknown_trainer_lists_the_trainers(bad_repo: Path) -> None:
    trainers = list(yaml.safe_load((bad_repo / "params.yaml").read_text())["trainers"])
    proc = subprocess.run(["make", "push", "TRAINER=nosuch"], cwd=bad_repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "nosuch" in errors[0], proc.stderr
    assert all(t in errors[0] for t in trainers), errors[0]
    assert not (bad_repo / "build/nosuch").exists()


def test_pinned_quant_levels_are_the_tools_own(llama_tools: str) -> None:
    """The level list in errors is what the pinned llama-quantize accepts (its QUANT_OPTIONS)."""
    import re

    from stages.config.params import QUANT_LEVELS
    from stages.llamacpp.tools import source_dir

    source = (source_dir(llama_tools) / "tools/quantize/quantize.cpp").read_text()
    options = source.split("QUANT_OPTIONS", 1)[1].split("};", 1)[0]
    accepted = set(re.findall(r'\{\s*"([A-Z0-9_]+)"\s*,', options))
    # COPY copies every tensor unchanged (the input again): not a release level.
    assert accepted - {"COPY"} == set(QUANT_LEVELS)


@pytest.mark.parametrize("case", ["no tokenizer", "tokenizer.json not JSON"])
def test_convert_refuses_a_folder_without_a_readable_tokenizer(case: str, tmp_path: Path) -> None:
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(b"")
    if case == "tokenizer.json not JSON":
        (model / "tokenizer.json").write_text('{"model": ')
    before = listing(tmp_path)
    line = error_line(run_cli(["stages.convert", "--trainer", "sft", "--model", str(model),
                               "--out", str(tmp_path / "full.gguf")]))
    assert str(model) in line and "tokenizer" in line and "save_pretrained" in line, line
    assert listing(tmp_path) == before


def test_evaluate_checks_memory_before_llama_perplexity_loads(llama_tools: str,
                                                              tmp_path: Path) -> None:
    """A GGUF bigger than available memory: refused with both numbers, before the tool runs."""
    gguf = tmp_path / "Q4_K_M.gguf"
    with gguf.open("wb") as fh:
        fh.truncate(3 * TIB)
    logits = tmp_path / "reference.kld"
    logits.write_bytes(b"_logits_")
    out = tmp_path / "eval" / "Q4_K_M.json"
    line = error_line(run_cli(["stages.evaluate", "--level", "Q4_K_M", "--gguf", str(gguf),
                               "--logits", str(logits), "--out", str(out)]))
    assert "not enough memory for llama-perplexity" in line and "GB are available" in line
    need = float(line.split("it needs ")[1].split(" GB")[0])
    assert need > 3000
    assert not out.parent.exists()
