"""Atomic writes: a temp file or folder beside the target, renamed into place.

A killed stage therefore leaves either the old output or nothing, never a half
written file that DVC could record.  Temp names carry the writer's pid
(``.<name>.<pid>.<random>.tmp``, ``.<name>.<pid>.old``): the next write of the
same target removes those of writers that are no longer running (a SIGKILLed
stage cannot clean up after itself; a merge's leftover is the size of a model).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep(path: Path) -> list[Path]:
    """Remove the temp files and folders that dead writers of ``path`` left beside it."""
    if not path.parent.is_dir():
        return []
    stale = re.compile(rf"^\.{re.escape(path.name)}\.(?P<pid>\d+)(\.[^.]+)?\.(tmp|old)$")
    removed = []
    for entry in path.parent.iterdir():
        m = stale.match(entry.name)
        if m and not _alive(int(m["pid"])):
            remove(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d leftover temp file(s) of an interrupted run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(\.[^.]+)?\.(tmp|old)$")


def sweep_tree(root: Path) -> list[Path]:
    """Remove, anywhere under ``root``, what dead writers left (for ``make demo``: a stage
    that DVC restores from its run-cache does not run, so cannot sweep for itself)."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            m = LEFTOVER.match(name)
            if m and not _alive(int(m["pid"])):
                remove(Path(dirpath) / name)
                removed.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in removed]
    if removed:
        log.info("removed %d leftover temp file(s) of interrupted runs under %s", len(removed),
                 root)
    return removed


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def write_bytes(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    ``sync=False``: no fsync, for a record written beside a gigabyte output that is not
    fsynced either (it would buy nothing after a power cut, and an fsync waits for the
    journal, which waits for the writeback of that output: ~2 s after a 3B Q8_0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        _fsync_dir(path.parent)


def write_text(path: Path, text: str, *, sync: bool = True) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (``sync``: as :func:`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"), sync=sync)


def remove(path: Path) -> None:
    """Remove a file, link or folder if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@contextlib.contextmanager
def output_file(path: Path, *, sync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it to ``path`` on success.

    For tools that write a file themselves (llama.cpp): they write the temp
    path, and only a complete file ever appears under the final name.
    ``sync=False`` is for gigabyte outputs whose data the tool does not fsync
    either: an old ``path`` is removed before the rename rather than replaced
    by it (ext4 writes a file renamed over another back at once: seconds for a
    3 GB GGUF, 9 s of a 3B Q8_0's 26 measured) and the folder is not fsynced.
    Either way a killed run leaves the old file or none, never a partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp} was not written")
        if not sync:
            remove(path)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    if sync:
        _fsync_dir(path.parent)


@contextlib.contextmanager
def output_dir(path: Path, *, sync: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; swap it in on success.

    An existing ``path`` is replaced whole only once the new one is complete.
    ``sync=False`` skips the fsync that makes the rename itself durable: for
    folders whose data is not fsynced either (the merge's gigabytes), it would
    buy nothing after a power cut, and it waits for the journal to commit the
    writeback in flight (0.5-3 s measured after a 6 GB merge).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            remove(old)
    except BaseException:
        remove(tmp)
        raise
    if sync:
        _fsync_dir(path.parent)
