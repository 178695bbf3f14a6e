"""Before heavy work: is there disk and memory for it, and how many threads to use.

One check for every stage that writes gigabytes (merge, convert, quantize,
logits): it fails before any work with both numbers, in decimal GB as disk
vendors and ``df -H`` count them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil

from stages.core.errors import ReleaseError


def threads() -> int:
    """CPU threads for a tool (and the merge's default): the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def free_disk(path: Path) -> int:
    """Free bytes on the file system that ``path`` (or its nearest existing parent) is on."""
    existing = next(p for p in [path.resolve(), *path.resolve().parents] if p.exists())
    return shutil.disk_usage(existing).free


def check_resources(*, need_disk: int, free_disk: int, need_ram: int = 0, free_ram: int = 0,
                    out: Path) -> None:
    """Refuse to start work on ``out`` that cannot finish, naming both numbers."""
    if need_disk > free_disk:
        raise ReleaseError(f"not enough disk for {out}: it needs {need_disk / 1e9:.2f} GB, "
                           f"{free_disk / 1e9:.2f} GB are free; free space or write elsewhere")
    if need_ram > free_ram:
        raise ReleaseError(f"not enough memory for {out}: it needs {need_ram / 1e9:.2f} GB, "
                           f"{free_ram / 1e9:.2f} GB are available; close other programs")


def check_disk(out: Path, need: int) -> None:
    """Fail early when the file system of ``out`` lacks ``need`` bytes."""
    check_resources(need_disk=need, free_disk=free_disk(out.parent), out=out)


def check_disk_and_ram(out: Path, *, need_disk: int, need_ram: int) -> None:
    """:func:`check_disk`, and the same for available memory."""
    check_resources(need_disk=need_disk, free_disk=free_disk(out.parent), need_ram=need_ram,
                    free_ram=psutil.virtual_memory().available, out=out)


def check_memory(what: str, need: int) -> None:
    """Fail early when available memory (free plus reclaimable cache) is under ``need``."""
    free = psutil.virtual_memory().available
    if need > free:
        raise ReleaseError(f"not enough memory for {what}: it needs {need / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB are available; close other programs or use a "
                           "machine with more memory")
