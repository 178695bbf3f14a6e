"""Child processes (llama.cpp tools, the converter) that end with their stage.

A stage killed with SIGKILL cannot stop its children, and an orphaned
``llama-quantize`` would go on writing a temp file that the next run removes
or, worse, competing with it for memory.  On Linux the kernel sends the child
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere this is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:  # runs in the child, between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def dies_with_parent() -> dict:
    """Keyword arguments for ``subprocess.run`` / ``Popen``: the child dies with us."""
    return {"preexec_fn": _set_pdeathsig} if sys.platform.startswith("linux") else {}
