"""Expected failures end as one ``error:`` line, exit 1, no traceback, no output.

Each case runs the real command line (``python -m stages.<name>``) in a
subprocess, as make and DVC do.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def run_stage(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, env=os.environ | env, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_missing_llama_cpp_tool(tmp_path: Path) -> None:
    source = tmp_path / "full.gguf"
    source.write_bytes(b"GGUF")
    out = tmp_path / "quant" / "Q4_K_M.gguf"
    proc = run_stage(["stages.quantize", "--in", str(source), "--level", "Q4_K_M",
                      "--out", str(out)], tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"))
    line = one_error_line(proc)
    assert "llama-quantize" in line and "make tools" in line
    assert not out.exists() and not list(out.parent.glob("*"))


def test_params_typo_names_the_key_and_the_closest_one(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    sft = data["trainers"]["sft"]
    sft["licence"] = sft.pop("license")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(data))
    line = one_error_line(run_stage(["stages.params", "--params", str(bad)], tmp_path))
    assert "trainers.sft.licence" in line and "did you mean `license`" in line


def test_bad_adapter(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8')  # cut short
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    out = tmp_path / "merged"
    line = one_error_line(run_stage(["stages.merge", "--adapter", str(adapter),
                                     "--base", str(tmp_path), "--out", str(out)], tmp_path))
    assert "adapter_config.json" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.parametrize("module", ["merge", "convert", "quantize", "logits", "reference",
                                    "evaluate",
                                    "card", "push", "params", "pick", "summary", "tools",
                                    "demo.prepare_base", "demo.train"])
def test_every_command_explains_itself(module: str, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m stages.<module> --help``, run in this process (``runpy`` is what ``-m``
    does): one import of the libraries for all the commands instead of one per command."""
    monkeypatch.setattr(sys, "argv", [f"{module}.py", "--help"])
    # as a fresh `python -m` would: the module not imported yet by another test
    monkeypatch.delitem(sys.modules, f"stages.{module}", raising=False)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"stages.{module}", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"python -m stages.{module}" in out
    assert "--debug" in out and "--quiet" in out
