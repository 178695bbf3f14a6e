"""Helpers for running the real pipeline in temporary repository copies."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RAN = re.compile(r"Running stage '([^']+)'")
# What the demo's params.yaml releases, per trainer, in push order.
RELEASES: dict[str, tuple[str, ...]] = {"sft": ("adapter", "merged", "gguf"), "kto": ("gguf",)}
# The stage that writes each format's folder build/<trainer>/<format>/.
FOLDER_STAGE: dict[str, str] = {"adapter": "adapter", "merged": "merged", "gguf": "card"}


def pushes(trainer: str) -> set[str]:
    """The push stages of a demo trainer: push@<trainer>-<format>."""
    return {f"push@{trainer}-{fmt}" for fmt in RELEASES[trainer]}

CACHED = re.compile(r"Stage '([^']+)' is cached")


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, returning its output; on failure show all of it."""
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n"
                             f"--- stdout\n{res.stdout[-6000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return res


def copy_repo(src: Path, dst: Path, *, cache_from: Path | None = None) -> Path:
    """Copy the working tree (tracked and untracked, not ignored) into a new git repo.

    ``.venv`` is linked, not copied; the DVC remote ``shared`` is ``<dst>-remote``
    (absent until something is shared).  With ``cache_from``, the copy shares that
    repo's DVC cache and takes its dvc.lock, build outputs and push receipts,
    as a second machine that pulled from a remote would.
    """
    files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=src).stdout.split()
    for name in files:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
    os.symlink(src / ".venv" if (src / ".venv").exists() else REPO / ".venv", dst / ".venv")
    # Its own DVC remote, empty until a test shares to it: no test reads or writes the
    # user's default remote (.dvc/config), so none depends on what is there.
    (dst / ".dvc/config.local").write_text(
        f"['remote \"shared\"']\n    url = {dst.parent / (dst.name + '-remote')}\n")
    run(["git", "init", "-q"], cwd=dst)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "copy",
         "--allow-empty"], cwd=dst, check=False)
    run(["git", "add", "-A"], cwd=dst)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=dst)
    if cache_from is not None:
        run([str(dst / ".venv/bin/dvc"), "cache", "dir", "--local",
             str(cache_from / ".dvc/cache")], cwd=dst)
        shutil.copy2(cache_from / "dvc.lock", dst / "dvc.lock")
        run([str(dst / ".venv/bin/dvc"), "checkout", "-q"], cwd=dst)
        for receipt in cache_from.glob("build/*/push-*.json"):
            shutil.copy2(receipt, dst / receipt.relative_to(cache_from))
        if (cache_from / "published").is_dir():
            shutil.copytree(cache_from / "published", dst / "published")
    return dst


def repro(repo: Path, *targets: str) -> set[str]:
    """``dvc repro`` in ``repo``; return the stages that ran (or came from the run-cache)."""
    res = run([str(repo / ".venv/bin/dvc"), "repro", *targets], cwd=repo)
    text = res.stdout + res.stderr
    return set(RAN.findall(text)) | set(CACHED.findall(text))


def status(repo: Path) -> dict[str, list]:
    """``dvc status --json`` in ``repo``: each stage that would rerun -> what changed.

    E.g. ``{"reference@sft": [{"changed deps": {"stages/fidelity": "modified"}}]}``;
    ``{}`` when everything is up to date.
    """
    res = run([str(repo / ".venv/bin/dvc"), "status", "--json"], cwd=repo)
    return json.loads(res.stdout.strip() or "{}")


def set_param(repo: Path, dotted: str, value: object) -> None:
    """Set one key of ``repo``'s params.yaml (comments are not kept: tests only)."""
    path = repo / "params.yaml"
    data = yaml.safe_load(path.read_text())
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if (repo / "pipeline.yaml").is_file():  # as `make pipeline` after editing params.yaml
        run([str(repo / ".venv/bin/python"), "-m", "stages.pipeline"], cwd=repo)
