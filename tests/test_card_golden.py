"""Golden files: the model card, Modelfile and manifest of a release, byte for byte.

``stages.release.card.render_release`` renders one trainer's release from fixed
inputs committed under ``tests/fixtures/release/`` (params.yaml, the run's
training_lineage.json, the quantize records ``quant/<LEVEL>.json``, the fidelity
figures ``eval/``) and three tiny GGUF files this module writes with gguf-py
(same bytes every time, so their sizes are the records').  README.md,
Modelfile and manifest.json must equal ``tests/fixtures/golden/``.

What legitimately differs between machines is injected or normalised, nothing
else: the tool versions (llama.cpp's version line, "(tools not built)" where
the tools are absent, and the Python packages' versions) are injected as
placeholders, with the same keys as the real ``tool_versions`` (checked
below); the plot's size and sha256 in manifest.json are replaced by
placeholders after checking that they are the rendered quality.png's (PNG
rasterisation is not byte-stable across platforms).  Paths are relative: the
release is rendered from a temporary folder laid out like the repository.

A plain test run never writes the goldens.  After an intended change to the
templates or the card code, rewrite them and review the diff:

    make golden     # = .venv/bin/python -m tests.test_card_golden --update
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INPUTS = FIXTURES / "release"
GOLDEN = FIXTURES / "golden"
GOLDEN_FILES: tuple[str, ...] = ("README.md", "Modelfile", "manifest.json")
TRAINER = "sft"
LEVELS: tuple[str, ...] = ("Q4_K_M", "Q5_K_M", "Q8_0")
UPDATE_HINT = ("If the change is intended, run `make golden` "
               "(.venv/bin/python -m tests.test_card_golden --update) and review the diff.")

# Where the pipeline keeps each input and output, relative to the repository root.
RUN_DIR = Path("inputs/runs/sft/golden")  # trainers.sft.adapter's parent in the fixture params
QUANT = Path("build/sft/work/quant")
EVAL = Path("build/sft/work/eval")
OUT = Path("build/sft/gguf")
BUILD = Path("build/sft")  # manifest paths are relative to it
PLOT_DATA = Path("build/sft/quality.json")

# The metadata the card reads from a GGUF (stages/llamacpp/gguf_meta.py), as
# convert_hf_to_gguf.py writes it for SmolLM2: ChatML, BOS <|im_start|>, EOS <|im_end|>.
TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                           *(f"tok{i}" for i in range(13)))
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Rows of the one 256-wide f32 tensor per level: sizes grow with the level, as they do.
ROWS = {"Q4_K_M": 100, "Q5_K_M": 120, "Q8_0": 190}


def write_gguf(path: Path, level: str, extra: dict[str, str] | None = None) -> None:
    """A tiny GGUF carrying the chat metadata of a SmolLM2 conversion (deterministic bytes);
    ``extra``: more string keys (tests of what the metadata may hold)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("SmolLM2-135M-Instruct-golden-sft")
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(TOKENS))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rows = ROWS[level]
    writer.add_tensor("token_embd.weight",
                      np.arange(rows * 256, dtype=np.float32).reshape(rows, 256) / 1024)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lay_out(root: Path) -> None:
    """The fixed inputs under ``root``, where the pipeline keeps them, plus the GGUFs."""

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(INPUTS / "params.yaml", root / "params.yaml")
    (root / RUN_DIR).mkdir(parents=True)
    shutil.copy2(INPUTS / "training_lineage.json", root / RUN_DIR / "training_lineage.json")
    shutil.copytree(INPUTS / "quant", root / QUANT)
    shutil.copytree(INPUTS / "eval", root / EVAL)
    for level in LEVELS:
        gguf = root / QUANT / f"{level}.gguf"
        write_gguf(gguf, level)
        record = json.loads((root / QUANT / f"{level}.json").read_text())
        found = {"bytes": gguf.stat().st_size}
        if {k: record[k] for k in found} != found:
            raise AssertionError(
                f"the GGUF this test writes for {level} is {found}, but "
                f"tests/fixtures/release/quant/{level}.json records "
                f"{ {k: record[k] for k in found} } (did gguf-py change its output?); update the "
                f"record's bytes, and `bytes` in eval/{level}.details.json")


def fixed_tool_versions(llama_cpp_version: str) -> dict[str, str]:
    """What ``tool_versions`` returns, with placeholders for what differs between machines."""
    from stages.release.manifest import PACKAGES

    return {"llama.cpp": f"llama-cpp-python=={llama_cpp_version} (llama.cpp <version line>)",
            **{name: f"<{name} version>" for name in PACKAGES}}


def normalise_plot(manifest: str, plot: Path) -> str:
    """The manifest with quality.png's size and sha256 (checked first) as placeholders."""
    from stages.core.hashing import sha256_file

    entry = (f'"path": "{OUT.name}/{plot.name}",\n      "bytes": {plot.stat().st_size},\n'
             f'      "sha256": "{sha256_file(plot)}",')
    if manifest.count(entry) != 1:
        raise AssertionError(f"manifest.json does not list {plot.name} with its real size and "
                             f"sha256 once:\n{manifest}")
    return manifest.replace(entry, f'"path": "{OUT.name}/{plot.name}",\n'
                                   '      "bytes": "<quality.png bytes>",\n'
                                   '      "sha256": "<quality.png sha256>",')


def render(root: Path, change: Callable[[Path], None] | None = None) -> dict[str, bytes]:
    """Render the release under ``root`` (``change`` edits the inputs first); the golden files."""
    from stages.config.params import load_params
    from stages.release import card

    lay_out(root)
    if change is not None:
        change(root)
    with contextlib.chdir(root), pytest.MonkeyPatch.context() as patch:
        patch.setattr(card, "tool_versions", fixed_tool_versions)
        card.render_release(params=load_params(Path("params.yaml")), trainer_key=TRAINER,
                            quant_dir=QUANT, eval_dir=EVAL, out=OUT, plot_data=PLOT_DATA)
    folder = root / OUT
    files = {name: (folder / name).read_bytes() for name in GOLDEN_FILES}
    files["manifest.json"] = normalise_plot(files["manifest.json"].decode(),
                                            folder / card.PLOT).encode()
    return files


def golden_diff(rendered: dict[str, bytes], golden: Path = GOLDEN) -> str:
    """Unified diffs of every rendered file that is not byte for byte its golden ('' if none)."""
    diffs = []
    for name in GOLDEN_FILES:
        path = golden / name
        if not path.is_file():
            diffs.append(f"{path} does not exist\n")
            continue
        expected = path.read_bytes()
        if rendered[name] == expected:
            continue
        diff = "".join(difflib.unified_diff(
            expected.decode(errors="replace").splitlines(keepends=True),
            rendered[name].decode(errors="replace").splitlines(keepends=True),
            f"golden/{name}", f"rendered/{name}"))
        diffs.append(diff or f"{name}: the bytes differ (line endings or encoding)\n")
    return "".join(diffs)


def assert_matches_golden(rendered: dict[str, bytes]) -> None:
    """Fail with the unified diff (and how to update) unless every file equals its golden."""
    diff = golden_diff(rendered)
    if diff:
        pytest.fail(f"the rendered release differs from tests/fixtures/golden/:\n{diff}\n"
                    f"{UPDATE_HINT}", pytrace=False)


# --- tests -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("golden")
    return root, render(root)


def test_card_modelfile_and_manifest_match_the_goldens(rendered) -> None:
    assert_matches_golden(rendered[1])


def test_the_release_folder_is_consistent(rendered) -> None:
    from stages.release.manifest import check_manifest, verify_hashes

    root, _ = rendered
    names = sorted(p.name for p in (root / OUT).iterdir())
    name = "SmolLM2-135M-Instruct-golden-sft"
    assert names == sorted([f"{name}-{lv}.gguf" for lv in LEVELS]
                           + ["Modelfile", "README.md", "manifest.json", "quality.png"])
    text = (root / OUT / "manifest.json").read_text()
    verify_hashes(check_manifest(text, root / BUILD), root / BUILD)
    assert (root / OUT / "quality.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    points = json.loads((root / PLOT_DATA).read_text())
    assert [p["level"] for p in points] == list(LEVELS)


def test_tool_versions_have_the_injected_keys() -> None:
    """The injection keeps the real shape: the same tools, each with a version."""
    from stages.release.manifest import tool_versions

    real = tool_versions("0.3.36")
    assert real.keys() == fixed_tool_versions("0.3.36").keys()
    assert real["llama.cpp"].startswith("llama-cpp-python==0.3.36")
    assert "not installed" not in real.values()


def test_a_changed_input_fails_the_comparison_with_a_diff(tmp_path: Path) -> None:
    """The comparison can fail: one more training step shows up in the card and manifest,
    and the failure leaves the goldens as they were."""
    def one_more_step(root: Path) -> None:
        path = root / RUN_DIR / "training_lineage.json"
        lineage = json.loads(path.read_text())
        lineage["steps"] += 1
        path.write_text(json.dumps(lineage))

    goldens = {name: ((GOLDEN / name).read_bytes(), (GOLDEN / name).stat().st_mtime_ns)
               for name in GOLDEN_FILES}
    changed = render(tmp_path / "changed", change=one_more_step)
    with pytest.raises(pytest.fail.Exception) as err:
        assert_matches_golden(changed)
    message = str(err.value)
    assert "make golden" in message
    assert "--- golden/README.md\n+++ rendered/README.md" in message
    assert "\n-| Steps | 16 |\n" in message and "\n+| Steps | 17 |\n" in message
    assert "--- golden/manifest.json\n+++ rendered/manifest.json" in message
    assert "golden/Modelfile" not in message  # the Modelfile does not show the lineage
    assert {name: ((GOLDEN / name).read_bytes(), (GOLDEN / name).stat().st_mtime_ns)
            for name in GOLDEN_FILES} == goldens
    missing = tmp_path / "no-goldens"
    assert golden_diff(changed, missing).count("does not exist") == len(GOLDEN_FILES)
    assert not missing.exists()


# --- make golden -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.test_card_golden",
        description="Render the golden release from tests/fixtures/release and compare it with "
                    "tests/fixtures/golden; --update rewrites the goldens.")
    parser.add_argument("--update", action="store_true",
                        help="write the rendered README.md, Modelfile and manifest.json to "
                             "tests/fixtures/golden (review with `git diff`)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = render(Path(tmp))
    diff = golden_diff(files)
    if not diff:
        print("the goldens are up to date")
        return 0
    print(diff, end="")
    if not args.update:
        print(UPDATE_HINT)
        return 1
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name in GOLDEN_FILES:
        path = GOLDEN / name
        if not path.is_file() or path.read_bytes() != files[name]:
            path.write_bytes(files[name])
            print(f"wrote {path.relative_to(FIXTURES.parent.parent)}")
    print("review the change with `git diff tests/fixtures/golden` and commit it")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def test_a_trainer_without_smoke_turn_says_so_in_its_card(tmp_path: Path) -> None:
    """``evaluate.smoke.skip``: evaluate writes no reply; the card says the turn was not run."""
    from huggingface_hub import ModelCard

    def no_smoke(root: Path) -> None:
        for details in (root / EVAL).glob("*.details.json"):
            data = json.loads(details.read_text())
            data["smoke"] = {"skipped": "evaluate.smoke.skip"}
            details.write_text(json.dumps(data))

    card = render(tmp_path, change=no_smoke)["README.md"].decode()
    assert "Smoke test: not run for this model (`evaluate.smoke.skip`" in card
    assert "| Level | Reply |" not in card and "stopped after" not in card
    assert card.count("| not run |") == 3  # each level's row of the quality table
    assert ModelCard(card).data.base_model
