"""A stage killed with SIGKILL at any moment leaves nothing DVC could record, and
the next ``dvc repro`` completes with the same bytes as a clean run.

Each case runs a stage's command (as dvc.lock resolved it, its outputs removed
first, as ``dvc repro`` does) in a copy of the built demo repo sharing its DVC
cache, waits for an observable event (the temporary output appears, it has
grown, the final name appears), and SIGKILLs the stage's process (the llama.cpp
tools it started die with it).  Then: nothing half-written under a final name
and no tool left running; after all the kills, one ``dvc repro --force
--no-run-cache <stage>`` gives the clean run's outputs (the built repo's,
compared by dvc.lock hashes or bytes; fields that are times by nature excepted)
and removes the killed runs' temporary files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from stages.core.atomic import remove
from tests.pipeline import copy_repo, run

REPO = Path(__file__).resolve().parent.parent
TIME_FIELDS = {"seconds", "pushed_at"}
TOOLS = ("llama-quantize", "llama-perplexity", "llama-completion", "llama-gguf-split",
         "convert_hf_to_gguf.py")


@pytest.fixture(scope="module")
def kill_repo(built_repo: Path, module_tmp) -> Path:
    return copy_repo(REPO, module_tmp("interrupt") / "repo", cache_from=built_repo)


def temps(folder: Path) -> list[Path]:
    """Temporary files of atomic writes (``.<name>.<pid>...tmp`` / ``.old``) under ``folder``."""
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def tools_running(repo: Path) -> list[str]:
    """Command lines of llama.cpp tools (and the converter) running in ``repo``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(tool in cmd for tool in TOOLS):
            try:
                if proc.cwd() == str(repo):
                    found.append(cmd)
            except psutil.Error:  # it ended meanwhile
                pass
    return found


def stage_command(repo: Path, stage: str) -> tuple[list[str], dict[str, str]]:
    """The command dvc.yaml gives ``stage`` (as dvc.lock resolved it) and its environment."""
    words = shlex.split(yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["cmd"])
    env = dict(os.environ)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return words, env


def kill_at(repo: Path, stage: str, event: Callable[[], bool], timeout: float = 240) -> bool:
    """Run ``stage``'s command as ``dvc repro`` would (its outputs removed first) and
    SIGKILL it as soon as ``event()`` holds.  (Run directly, not under DVC: DVC records a
    stage only when its command exits 0, and a killed one never does; DVC's own start
    would cost seconds per kill point.)

    Returns whether the kill landed while the stage ran (False: it had finished).
    """
    for rel in lock_outs(repo, stage):
        remove(repo / rel)
    words, env = stage_command(repo, stage)
    proc = subprocess.Popen(words, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if event():
                proc.kill()  # an exited, unreaped stage takes it unharmed: exit code 0
                return proc.wait(60) == -signal.SIGKILL
            time.sleep(0.01)
        assert proc.poll() is not None, f"{stage}: the event never happened"
        assert proc.returncode == 0, f"{stage} failed on its own (exit {proc.returncode})"
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def lock_outs(repo: Path, stage: str) -> dict[str, str]:
    """``path -> md5`` of a stage's outputs in dvc.lock."""
    entry = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}


def without_times(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIME_FIELDS}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def same_output(repo: Path, clean: Path, rel: str) -> bool:
    """``rel`` in ``repo`` equals the clean run's (JSON: apart from time fields)."""
    ours, theirs = repo / rel, clean / rel
    if theirs.is_dir():
        return sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir()) \
            and all(same_output(repo, clean, f"{rel}/{p.name}") for p in theirs.iterdir())
    if rel.endswith(".json"):
        return without_times(json.loads(ours.read_text())) == \
            without_times(json.loads(theirs.read_text()))
    return ours.read_bytes() == theirs.read_bytes()


def no_tool_left(repo: Path) -> None:
    """The llama.cpp tools a killed stage started end with it."""
    deadline = time.monotonic() + 10  # the kernel kills them with their parent, not at once
    while tools_running(repo) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tools_running(repo), tools_running(repo)


def check_recovers(repo: Path, clean: Path, stage: str, outs: list[str]) -> None:
    """``dvc repro`` after the kills completes with the clean run's outputs, no temp left."""
    # Run for real, as after a first run killed (--force: whatever the kills left; no
    # restore from the run-cache, which would not run the stage, nor show its bytes).
    run([str(repo / ".venv/bin/dvc"), "repro", "--force", "--no-run-cache", "--single-item",
         stage], cwd=repo)
    assert not temps(repo / "build") and not temps(repo / "published"), \
        temps(repo / "build") + temps(repo / "published")
    for rel in outs:
        assert same_output(repo, clean, rel), f"{stage}: {rel} differs from the clean run"
    mine, theirs = lock_outs(repo, stage), lock_outs(clean, stage)
    for path, md5 in theirs.items():
        if not path.endswith(".json"):  # JSON compared above, apart from its time fields
            assert mine[path] == md5, f"{stage}: {path} differs from the clean run"


def grown(path_glob: Callable[[], list[Path]], size: int) -> Callable[[], bool]:
    def event() -> bool:
        return any(p.is_file() and p.stat().st_size >= size for p in path_glob())
    return event


def appears(path: Path) -> Callable[[], bool]:
    return lambda: path.exists()


def temp_of(path: Path) -> Callable[[], list[Path]]:
    return lambda: list(path.parent.glob(f".{path.name}.*tmp"))


def temp_appears(path: Path) -> Callable[[], bool]:
    return lambda: bool(temp_of(path)())


def final_or_absent(repo: Path, clean: Path, rel: str) -> None:
    """A final-named output after the kill is absent, or complete and correct.

    A push target is a mirror that a push updates file by file (manifest last):
    there each file present must be whole and right.
    """
    if rel.startswith("published/") and (repo / rel).is_dir():
        for path in (repo / rel).iterdir():
            if not path.name.startswith("."):
                assert same_output(repo, clean, f"{rel}/{path.name}"), f"{path} is not whole"
    elif (repo / rel).exists():
        assert same_output(repo, clean, rel), f"{rel} exists after the kill but is not complete"


def running_for(seconds: float) -> Callable[[], bool]:
    """``seconds`` have passed since the event was first asked (the stage's start)."""
    start: list[float] = []

    def event() -> bool:
        if not start:
            start.append(time.monotonic())
        return time.monotonic() - start[0] >= seconds
    return event


def folder_grown(path: Path, size: int) -> Callable[[], bool]:
    """A temp folder of ``path`` holds a file of at least ``size`` bytes."""
    def event() -> bool:
        return any(f.is_file() and f.stat().st_size >= size
                   for t in temp_of(path)() if t.is_dir() for f in t.iterdir())
    return event


CASES = {
    # stage: (module, outputs to compare, {kill point: event maker})
    "merge@sft": ("merge", ["build/sft/work/merged"], {
        "temp folder appears": lambda r: temp_appears(r / "build/sft/work/merged"),
        "a shard has grown": lambda r: folder_grown(r / "build/sft/work/merged", 50 << 20),
        "final name appears": lambda r: appears(r / "build/sft/work/merged"),
    }),
    "convert@sft": ("convert", ["build/sft/work/full.gguf"], {
        "temp appears": lambda r: temp_appears(r / "build/sft/work/full.gguf"),
        "temp has grown": lambda r: grown(temp_of(r / "build/sft/work/full.gguf"), 50 << 20),
        "final name appears": lambda r: appears(r / "build/sft/work/full.gguf"),
    }),
    "quantize@sft-Q4_K_M": ("quantize", ["build/sft/work/quant/Q4_K_M.gguf",
                                         "build/sft/work/quant/Q4_K_M.json"], {
        "temp appears": lambda r: temp_appears(r / "build/sft/work/quant/Q4_K_M.gguf"),
        "temp has grown": lambda r: grown(temp_of(r / "build/sft/work/quant/Q4_K_M.gguf"),
                                          20 << 20),
        "GGUF final, record not yet": lambda r: appears(r / "build/sft/work/quant/Q4_K_M.gguf"),
    }),
    "convert_base@sft": ("convert", ["build/sft/work/base.gguf"], {
        "temp has grown": lambda r: grown(temp_of(r / "build/sft/work/base.gguf"), 50 << 20),
    }),
    "logits@sft": ("logits", ["build/sft/work/reference.kld",
                              "build/sft/work/reference.kld.json"], {
        "logits temp appears": lambda r: temp_appears(r / "build/sft/work/reference.kld"),
        "logits final, record not yet": lambda r: appears(r / "build/sft/work/reference.kld"),
    }),
    "reference@sft": ("reference", ["build/sft/work/eval/reference.json"], {
        # One point: each costs most of a reference run (~30 s); its one output is written
        # last, in one atomic write, like every record tried on quantize and evaluate.
        "checks running": lambda r: running_for(8.0),
    }),
    "evaluate@sft-Q4_K_M": ("evaluate", ["build/sft/work/eval/Q4_K_M.json",
                                         "build/sft/work/eval/Q4_K_M.details.json"], {
        "llama-perplexity running": lambda r: lambda: any("llama-perplexity" in c
                                                          for c in tools_running(r)),
        "details final, figures not yet": lambda r: appears(
            r / "build/sft/work/eval/Q4_K_M.details.json"),
    }),
    "card@sft": ("card", ["build/sft/gguf", "build/sft/quality.json"], {
        "folder temp appears": lambda r: temp_appears(r / "build/sft/gguf"),
        "card written in the temp": lambda r: lambda: any(
            (t / "README.md").exists() for t in temp_of(r / "build/sft/gguf")()),
        "folder final, plot data not yet": lambda r: appears(r / "build/sft/gguf"),
    }),
    "push@sft-gguf": ("push", ["published/sft/gguf"], {
        "a GGUF half copied": lambda r: lambda: any(
            p.stat().st_size > 10 << 20 for p in (r / "published/sft/gguf").glob(".*.tmp")
            if p.is_file()),
        "manifest not yet": lambda r: lambda: (r / "published/sft/gguf").is_dir() and len(
            list((r / "published/sft/gguf").glob("*.gguf"))) >= 3,
    }),
}


@pytest.mark.parametrize("stage", list(CASES))
def test_sigkill_then_repro_gives_the_clean_outputs(stage: str, kill_repo: Path,
                                                    built_repo: Path) -> None:
    module, outs, points = CASES[stage]
    landed = []
    for point, make_event in points.items():
        if module == "push":  # a push copies only what the target lacks
            shutil.rmtree(kill_repo / "published/sft/gguf", ignore_errors=True)
        if kill_at(kill_repo, stage, make_event(kill_repo)):
            landed.append(point)
        no_tool_left(kill_repo)
        for rel in outs:
            final_or_absent(kill_repo, built_repo, rel)
    # One rerun after all the kills: it must also clear every killed run's temp files.
    check_recovers(kill_repo, built_repo, stage, outs)
    print(f"{stage}: killed at {landed}; finished before {[p for p in points if p not in landed]}")
    assert landed, f"{stage}: no kill point landed while the stage ran"
