"""Share to the remote and collect garbage (``make share``, ``make gc``).

Sharing is ``dvc push --run-cache``: every output dvc.lock records (DVC restores
a stage from the run-cache only when all of its outputs are on the remote) and
the run-cache itself.  The push receipt is not cached, so it is never shared.

Garbage collection keeps what the workspace's dvc.lock records, the current
release of every trainer with its intermediates (``dvc gc --workspace``), in the
cache and, when asked, on the remote (``--cloud``: irreversible, so only from a
dvc.lock that describes every stage).  ``dvc gc`` leaves run-cache entries (a
few hundred bytes each): one whose outputs were collected is simply not used
(https://dvc.org/doc/command-reference/gc; ``dvc/repo/gc.py`` collects objects only).
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.errors import ReleaseError
from stages.sharing.dvc import check_dvc, lock_uncommitted, locked_stages, stage_names
from stages.sharing.remote import RemoteState, probe

log = logging.getLogger(__name__)

# Stages whose only output is not cached: nothing of theirs is on the remote.
UNCACHED_PREFIXES = ("push@",)


def share(root: Path, targets: tuple[str, ...] = ()) -> RemoteState:
    """Upload the outputs of ``targets`` (default: all) and the whole run-cache."""
    remote = probe(root)
    if remote.status in ("unreachable", "none"):
        raise ReleaseError(f"cannot share: {remote.problem()}; "
                           "check `dvc remote list` and the credentials "
                           "(README: Sharing across machines)")
    check_dvc(root, "push", "--run-cache", *targets)
    if lock_uncommitted(root):
        log.warning("note: dvc.lock has changes git has not committed: commit it "
                    "(git add dvc.lock && git commit) so other machines pull this build "
                    "by its hashes")
    return remote


def collect_garbage(root: Path, *, cloud: bool = False) -> None:
    """Drop every cache object (and, with ``cloud``, remote object) dvc.lock does not use."""
    if cloud:
        unlocked = sorted(name for name in set(stage_names(root)) - locked_stages(root)
                          if not name.startswith(UNCACHED_PREFIXES))
        if unlocked:
            raise ReleaseError(
                f"dvc.lock has no entry for {', '.join(unlocked)}: `dvc gc --cloud` would "
                "delete from the remote what another machine shared for them; get the "
                "dvc.lock that describes every trainer (git pull) first, or run without CLOUD=1")
        remote = probe(root)
        if remote.status in ("unreachable", "none"):
            raise ReleaseError(f"cannot collect on the remote: {remote.problem()}")
    check_dvc(root, "gc", "--workspace", "--force", *(("--cloud",) if cloud else ()))
