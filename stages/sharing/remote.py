"""Ask the DVC remote, in seconds, whether it holds anything and answers at all.

DVC answers an unreachable remote with an error after its retries: an S3
endpoint on a closed port costs ~15 s, then ``ERROR: unexpected error - Could not
connect to the endpoint URL`` and ``dvc repro --pull`` stops without building.
The pipeline must build without the remote, so the make targets ask here first
and say in one line what they do instead.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The longest any remote may take to list its top folder (a host that drops
# packets instead of refusing them); a refused S3 connection answers in ~1 s.
PROBE_SECONDS = 20.0
# One attempt and a short connect timeout for the probe only: botocore retries a
# refused connection with back-off and s3fs retries on top (~11 s measured).
S3_PROBE_CONFIG = {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 15}

CLIENT_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec")

Status = Literal["data", "empty", "unreachable", "none"]


@dataclass(frozen=True)
class RemoteState:
    """The default DVC remote as a probe found it."""

    name: str
    url: str
    status: Status
    reason: str = ""

    @property
    def usable(self) -> bool:
        """True when pulling from it can save work."""
        return self.status == "data"

    def describe(self) -> str:
        """``remote 'shared' (URL)``, or that there is none."""
        return f"remote '{self.name}' ({self.url})" if self.name else "no DVC remote configured"

    def problem(self) -> str:
        """Why it cannot help, in a few words (empty when it can)."""
        if self.status == "empty":
            return f"{self.describe()} is empty"
        if self.status == "none":
            return "no DVC remote is configured (dvc remote list)"
        if self.status == "unreachable":
            return f"{self.describe()} is unreachable ({self.reason})"
        return ""

    def notice(self) -> str:
        """The one line a build prints when the remote cannot help."""
        return f"note: {self.problem()}: building here without it"


def call_within(func: Callable[[], Any], seconds: float) -> Any:
    """``func()``, or :class:`TimeoutError` when it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = func()
        except Exception as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def quick_fs(fs: Any) -> Any:
    """The remote's filesystem set to fail fast (S3); other kinds as DVC made them."""
    if getattr(fs, "protocol", None) != "s3":
        return fs
    import s3fs

    args = dict(fs.fs_args)  # credentials, endpoint, region: the remote's own settings
    config = {**(args.pop("config_kwargs", None) or {}), **S3_PROBE_CONFIG}
    quick = s3fs.S3FileSystem(**args, config_kwargs=config)
    quick.retries = 1
    return quick


def one_line(exc: BaseException) -> str:
    """An exception as one short line (URLs without their query strings)."""
    text = re.sub(r"\?[^\s\"']+", "", " ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def quiet_clients() -> None:
    """Keep the storage clients' INFO lines ("Found credentials in environment variables")
    out of a make target's output, unless we log at DEBUG."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def probe(root: Path, *, name: str | None = None, seconds: float = PROBE_SECONDS) -> RemoteState:
    """List the top folder of the remote ``name`` (default: DVC's default remote)."""
    from dvc.config import NoRemoteError, RemoteConfigError
    from dvc.repo import Repo

    quiet_clients()

    with Repo(str(root)) as repo:
        try:
            remote = repo.cloud.get_remote(name)
        except NoRemoteError:
            return RemoteState(name="", url="", status="none")
        except RemoteConfigError as exc:
            return RemoteState(name=name or "", url="", status="unreachable", reason=one_line(exc))
        label = remote.name or name or ""
        url = remote.fs.unstrip_protocol(remote.path)
        fs = quick_fs(remote.fs)
        try:
            entries = call_within(lambda: fs.ls(remote.path, detail=False), seconds)
        except FileNotFoundError:
            entries = []
        except Exception as exc:  # any failure to answer means: build without it
            return RemoteState(name=label, url=url, status="unreachable", reason=one_line(exc))
    return RemoteState(name=label, url=url, status="data" if entries else "empty")
