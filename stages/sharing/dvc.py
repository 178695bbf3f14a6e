"""Run dvc as the make targets do, and read what it says.

Each command is echoed first (``$ dvc repro --pull``), as make echoes its
recipes, so a person sees which DVC command did the work; DVC's own output
streams through unchanged.  The readers parse the ``Running stage '<name>'``
lines of ``dvc repro --dry`` and ask DVC's stage graph (``dvc.repo.Repo``).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.core.errors import ReleaseError

log = logging.getLogger(__name__)

DVC = (sys.executable, "-m", "dvc")
RUNNING = re.compile(r"Running stage '([^']+)'")


def run_dvc(root: Path, *args: str) -> int:
    """``dvc <args>`` in ``root``, echoed, its output streaming through; its exit code."""
    log.info("$ dvc %s", " ".join(args))
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.run([*DVC, *args], cwd=root).returncode


def check_dvc(root: Path, *args: str) -> None:
    """``dvc <args>``; a :class:`ReleaseError` when it fails."""
    code = run_dvc(root, *args)
    if code != 0:
        raise ReleaseError(f"`dvc {' '.join(args)}` failed (exit {code}); DVC says why above")


def read_dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` with its output captured (a plan or a status, not work)."""
    return subprocess.run([*DVC, *args], cwd=root, capture_output=True, text=True)


def stages_to_run(root: Path, *targets: str) -> set[str] | None:
    """The stages ``dvc repro --allow-missing targets`` would run: those whose code, params
    or upstream outputs changed, not those whose data are only absent here (DVC compares a
    missing dependency with its producer's output in dvc.lock, iterative/dvc#9533).  None
    when DVC cannot tell without the data: a stage that must run lacks a dependency, and
    ``--dry`` fails on hashing it (iterative/dvc#9818; still so in 3.67.1)."""
    res = read_dvc(root, "repro", "--allow-missing", "--dry", *targets)
    if res.returncode != 0:
        return None
    return set(RUNNING.findall(res.stdout + res.stderr))


@dataclass(frozen=True)
class StageInputs:
    """What one stage reads, as DVC's graph of dvc.yaml says."""

    producers: tuple[str, ...]  # the stages whose outputs it depends on
    missing: tuple[str, ...]  # its dependencies this workspace lacks


def stage_inputs(root: Path, name: str) -> StageInputs:
    """The producers of ``name``'s dependencies (edges of DVC's stage graph point from a
    stage to the stages it depends on) and the dependencies absent from the workspace."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stage = next((s for s in graph if s.addressing == name), None)
        if stage is None:
            raise ReleaseError(f"dvc.yaml has no stage {name!r} (dvc stage list)")
        producers = sorted(s.addressing for s in graph.successors(stage))
        missing = sorted(dep.def_path for dep in stage.deps if not dep.exists)
    return StageInputs(producers=tuple(producers), missing=tuple(missing))


def stage_names(root: Path) -> list[str]:
    """Every stage of dvc.yaml, foreach and matrix expanded (``merge@sft``)."""
    res = read_dvc(root, "stage", "list", "--name-only")
    if res.returncode != 0:
        raise ReleaseError(f"`dvc stage list` failed: {res.stderr.strip()}")
    return res.stdout.split()


def locked_stages(root: Path) -> set[str]:
    """The stages dvc.lock has an entry for."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return set()
    return set((yaml.safe_load(lock.read_text()) or {}).get("stages", {}))


def lock_uncommitted(root: Path) -> bool:
    """True when git sees dvc.lock new or changed (False outside git, or when it is clean)."""
    res = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock"], cwd=root,
                         capture_output=True, text=True)
    return res.returncode == 0 and bool(res.stdout.strip())
