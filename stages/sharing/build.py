"""Build with the remote: pull what it already has, build here only what it lacks.

The remote holds outputs by content hash, and the run-cache: which command, on
which inputs, made which outputs.  DVC (3.67.1, ``dvc/stage/__init__.py``
``Stage.reproduce`` and ``dvc/stage/run.py``) uses both under ``dvc repro --pull``:
it copies the remote's run-cache first; then a stage whose outputs dvc.lock
records and the workspace lacks is pulled by hash ("Pulling data for stage"),
and a stage that dvc.lock does not describe (no lock, or changed code or
params) is restored from the run-cache when the remote has its outputs ("Stage
is cached"); only what neither covers runs.  With ``--allow-missing`` a stage
whose data are only absent is skipped instead ("Skip stages with missing data
but no other changes", ``dvc repro --help``;
https://dvc.org/doc/command-reference/repro).

Two things we add, both measured on DVC 3.67.1:

- a push receipt is not cached (``cache: false``; publishing is not a
  computation), so with a dvc.lock from another machine ``--pull`` "pulls" it
  as nothing and skips the push stage: a second pass runs the push stages alone;
- ``dvc repro --pull push@t`` pulls every intermediate of the chain (hundreds of
  GB at 70B), so when ``dvc repro --allow-missing --dry`` of the stages the push
  reads from runs nothing (dvc.lock describes them; their data are only absent),
  we pull just the folders the push stage reads and run it alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from stages.core.atomic import sweep_tree
from stages.sharing.dvc import check_dvc, run_dvc, stage_inputs, stages_to_run
from stages.sharing.remote import RemoteState, probe

log = logging.getLogger(__name__)

PUSH_STAGES = "push@*"  # dvc.yaml: push is a foreach stage, one per trainer and format


@dataclass(frozen=True)
class BuildResult:
    """What a build asked of the remote."""

    remote: RemoteState
    release_only: bool = False  # only the push stage's inputs were pulled, by name
    pulled: tuple[str, ...] = ()


def sweep_leftovers(root: Path) -> None:
    """Temp files of killed runs under build/ and published/ (see atomic.sweep_tree)."""
    for folder in ("build", "published"):
        if (root / folder).is_dir():
            sweep_tree(root / folder)


def build_all(root: Path, targets: tuple[str, ...] = ()) -> BuildResult:
    """``targets`` (default: every stage, ``make demo``): pull what the remote has, build
    the rest; then the push stages among them, which a pulled dvc.lock would skip."""
    sweep_leftovers(root)
    remote = probe(root)
    if not remote.usable:
        log.warning(remote.notice())
        check_dvc(root, "repro", *targets)
        return BuildResult(remote)
    check_dvc(root, "repro", "--pull", *targets)
    pushes = [t for t in targets if t.startswith("push@")] if targets else ["--glob", PUSH_STAGES]
    if pushes:
        check_dvc(root, "repro", "--single-item", *pushes)
    return BuildResult(remote)


def build_for_push(root: Path, stages: list[str], *, force: bool = False) -> BuildResult:
    """What each push stage of ``stages`` (``push@<trainer>-<format>``, in push order)
    needs, then the push (``make push TRAINER=<trainer> [FORMAT=<format>]``).  With
    ``force``, a push stage DVC found up to date runs again (re-planned against its
    target: a file someone changed there is restored)."""
    sweep_leftovers(root)
    remote = probe(root)
    if not remote.usable:
        log.warning(remote.notice())
    result = BuildResult(remote)
    for stage in stages:
        before = receipt_text(root, stage)
        result = _build_one(root, stage, remote)
        if force and before is not None and receipt_text(root, stage) == before:
            print(f"FORCE=1: {stage} was up to date; re-planning against the target", flush=True)
            check_dvc(root, "repro", "--force", "--single-item", stage)
    return result


def receipt_text(root: Path, stage: str) -> str | None:
    """The receipt ``push@<trainer>-<format>`` writes, or None before its first push."""
    trainer, _, fmt = stage.removeprefix("push@").rpartition("-")
    path = root / "build" / trainer / f"push-{fmt}.json"
    return path.read_text() if path.is_file() else None


def _build_one(root: Path, stage: str, remote: RemoteState) -> BuildResult:
    if not remote.usable:
        check_dvc(root, "repro", stage)
        return BuildResult(remote)
    inputs = stage_inputs(root, stage)
    rebuild = stages_to_run(root, *inputs.producers) if inputs.producers else set()
    if rebuild == set():
        if not inputs.missing or run_dvc(root, "pull", *inputs.missing) == 0:
            check_dvc(root, "repro", "--single-item", stage)
            return BuildResult(remote, release_only=True, pulled=inputs.missing)
        log.warning("note: %s cannot give all of %s: pulling or building the whole chain",
                    remote.describe(), " ".join(inputs.missing))
    check_dvc(root, "repro", "--pull", stage)
    check_dvc(root, "repro", "--single-item", stage)
    return BuildResult(remote)
