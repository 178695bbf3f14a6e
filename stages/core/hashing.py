"""Content hashes of files, read in chunks so memory stays flat."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 8 << 20  # 8 MiB reads: large enough to run at disk speed


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
