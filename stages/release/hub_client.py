"""The Hub client side of publishing: token, ``HfApi``, errors that name the fix, retries.

The token comes from ``HF_TOKEN``, else ``.env`` at the repo root, else the
``hf auth login`` cache; it is handed to ``huggingface_hub`` and never printed.
Every exception of the client becomes one :class:`PublishError` (or a
``ParamsError`` for a bad repo id) saying what failed and what to do;
:func:`with_retries` tries again the calls the client does not retry itself
(whoami, create_repo, the commit); :func:`preflight` answers, in seconds and
before any build, whether the token may write to a target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from stages.config.hub import HUB_FILE_LIMIT
from stages.config.params import Target
from stages.core.cli import progress_enabled
from stages.core.errors import ParamsError, ReleaseError

log = logging.getLogger(__name__)

README = "README.md"  # the model card, which the Hub validates (validate-yaml) on commit
# Waits between tries of a call the client does not retry itself (whoami, create_repo,
# the commit): 4 tries in ~7 s, or what the server's Retry-After asks.
RETRY_WAITS = (1.0, 2.0, 4.0)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
NO_TOKEN = ("no Hugging Face token: set HF_TOKEN, put `HF_TOKEN=hf_...` in .env at the repo "
            "root (git- and dvc-ignored), or run `.venv/bin/hf auth login`")
T = TypeVar("T")


class PublishError(ReleaseError):
    """The Hub refused or could not be reached; the message names the fix."""


def find_token(root: Path = Path(".")) -> str | None:
    """``HF_TOKEN``, else ``HF_TOKEN`` in ``root/.env``, else the ``hf auth login`` cache."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    env = root / ".env"
    if env.is_file():
        from dotenv import dotenv_values

        token = dotenv_values(env).get("HF_TOKEN")
        if token:
            return token
    from huggingface_hub import get_token

    return get_token()


def hub_api(token: str | None):
    """An ``HfApi`` for ``HF_ENDPOINT`` (default: the Hub), or an error if offline mode is on."""
    from huggingface_hub import HfApi, constants

    if not progress_enabled():  # the client's tqdm bars, like ours, only for a person
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set, so huggingface_hub refuses every request; "
                           "publish with `make push TRAINER=...` (it unsets it for the push only)")
    return HfApi(token=token)


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 of ``data``: what the Hub lists as ``blob_id`` of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextlib.contextmanager
def hub_errors(repo_id: str, what: str) -> Iterator[None]:
    """Turn the client's exceptions into one PublishError naming the fix."""
    from httpx2 import TransportError
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        yield
    except HFValidationError as exc:
        raise ParamsError(f"`{repo_id}` is not a valid Hub repo id ({exc}); use `owner/name` "
                          "with letters, digits, '-', '_' and '.'") from None
    except HfHubHTTPError as exc:
        raise PublishError(_http_message(exc, repo_id, what)) from None
    except TransportError as exc:
        from huggingface_hub import constants

        raise PublishError(f"{what}: cannot reach {constants.ENDPOINT} ({type(exc).__name__}: "
                           f"{exc}); check the network, or HF_ENDPOINT") from None
    except RuntimeError as exc:
        # The client wraps a failed LFS transfer: "Error while uploading 'x' to the Hub."
        cause = exc.__cause__
        if not isinstance(cause, HfHubHTTPError | TransportError):
            raise
        status = cause.response.status_code if getattr(cause, "response", None) else None
        raise PublishError(f"{what}: {exc} ({f'HTTP {status}' if status else type(cause).__name__}"
                           f": {_first_line(cause)}); push again: the files the Hub received "
                           "are kept and not sent again, and nothing was committed") from None
    except ValueError as exc:
        if "Invalid metadata in README.md" in str(exc):
            raise PublishError(card_rejected(repo_id, str(exc))) from None
        raise


def _first_line(exc: BaseException) -> str:
    server = getattr(exc, "server_message", None)
    return ((server or "").strip() or str(exc).strip() or type(exc).__name__).splitlines()[0]


def card_rejected(repo_id: str, errors: str) -> str:
    """The message for a card the Hub's validate-yaml refused: the client's
    ``Invalid metadata in README.md.\n- error\n- ...``, on one line."""
    lines = [line.strip().removeprefix("- ") for line in errors.splitlines()[1:]]
    found = "; ".join(line for line in lines if line) or errors.strip()
    return (f"the Hub rejected the model card of {repo_id} (README.md metadata): {found}; fix "
            "the card's front matter (templates/README.md.j2, or the trainer's params: license, "
            "base_model, tags)")


def validate_card(text: str, repo_id: str) -> None:
    """Ask the Hub's validate-yaml about the card, before anything is uploaded."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(text).validate(repo_type="model")
    except ValueError as exc:
        # ModelCard.validate raises the 400's body as is: {"errors": [{"message": ...}]}.
        try:
            found = [str(e.get("message", e)) for e in json.loads(str(exc))["errors"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            found = [str(exc)]
        raise PublishError(card_rejected(repo_id, "Invalid metadata in README.md.\n"
                                         + "\n".join(f"- {e}" for e in found))) from None


def _http_message(exc, repo_id: str, what: str) -> str:
    status = exc.response.status_code if exc.response is not None else None
    server = (exc.server_message or "").strip() or str(exc).splitlines()[0]
    fixes = {
        401: "the token was refused: set a valid one (HF_TOKEN, .env, or `hf auth login`)",
        403: f"the token may not write to `{repo_id}`: use a write token of a user or org "
             "that owns this namespace",
        404: f"`{repo_id}` (or its revision) does not exist or the token cannot see it",
        409: "the Hub reports a conflict (the repo or tag exists with other content)",
        412: "the repo changed while we pushed; run the push again (it re-plans)",
        413: f"a file is too large for the Hub (limit {HUB_FILE_LIMIT // 10**9} GB per file): "
             "lower the format's split_max_size",
        429: "the Hub rate-limits this token; wait a few minutes and push again",
    }
    fix = fixes.get(status) or ("the Hub had a server error; push again later"
                                if status and status >= 500 else "see the Hub's message")
    return f"{what} failed (HTTP {status}): {server}; {fix}"


def with_retries(call: Callable[[], T], what: str, *, sleep=time.sleep) -> T:
    """``call()``, tried again after a 429, a 5xx or a dropped connection."""
    from httpx2 import TransportError
    from huggingface_hub.errors import HfHubHTTPError

    for wait in (*RETRY_WAITS, None):
        try:
            return call()
        except (HfHubHTTPError, TransportError) as exc:
            response = getattr(exc, "response", None)
            status = response.status_code if response is not None else None
            if wait is None or not (status in RETRY_STATUS or isinstance(exc, TransportError)):
                raise
            after = response.headers.get("Retry-After") if response is not None else None
            wait = float(after) if after and after.isdigit() else wait
            log.warning("%s: %s; trying again in %.0f s", what, status or type(exc).__name__, wait)
            sleep(wait)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Identity:
    """Who the token is, and what it may do."""

    user: str
    orgs: tuple[str, ...]
    role: str | None  # "read", "write", "fineGrained" (its scopes are checked per repo)


def preflight(target: Target, *, token: str | None) -> Identity:
    """Fail in seconds, before any build, when this target cannot be written."""
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    repo_id = str(target.repo_id)
    with hub_errors(repo_id, "checking the repo id"):
        validate_repo_id(repo_id)
    if not token:
        raise PublishError(NO_TOKEN)
    api = hub_api(token)
    with hub_errors(repo_id, "asking the Hub who the token belongs to (whoami)"):
        who = with_retries(api.whoami, "whoami")
    ident = Identity(user=who.get("name", "?"),
                     orgs=tuple(o.get("name", "") for o in who.get("orgs", [])),
                     role=((who.get("auth") or {}).get("accessToken") or {}).get("role"))
    if ident.role == "read":
        raise PublishError(f"the token of `{ident.user}` is read-only; create a write token "
                           "(https://huggingface.co/settings/tokens) and set HF_TOKEN")
    namespace = repo_id.split("/")[0]
    with hub_errors(repo_id, f"checking write access to {repo_id}"):
        try:
            api.auth_check(repo_id, write=True)
        except RepositoryNotFoundError:
            if namespace != ident.user and namespace not in ident.orgs:
                raise PublishError(
                    f"`{repo_id}` does not exist and the token of `{ident.user}` cannot create "
                    f"it: `{namespace}` is neither that user nor one of its orgs "
                    f"({', '.join(ident.orgs) or 'none'}); fix the target's repo_id") from None
    return ident
