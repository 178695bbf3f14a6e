"""Publish a released folder to a Hugging Face Hub repo (``target: {kind: hub, ...}``).

Plan, apply, receipt, with the rules of :mod:`stages.release.publish`, through
``huggingface_hub``'s ``HfApi`` (nothing hand-rolled over HTTP):

- **plan**: ``list_repo_tree`` gives every remote file's size, git blob id and,
  for LFS files, sha256; the remote ``manifest.json`` says what our earlier
  release published (only those files are ever deleted);
- **apply**: one commit per format (``create_commit`` with add and delete
  operations, the manifest in the same commit) whose ``parent_commit`` is the
  head the plan saw, so a retried commit can never be applied twice; a repo
  that does not exist is created just before it, so a failed push leaves at
  most the Hub's ``.gitattributes``; the LFS objects go first
  (``preupload_lfs_files``), and the Hub's LFS batch answer says which it
  already has, so a push killed mid-upload resumes without re-sending them;
- **receipt**: repo, revision, commit id and URL, files, ``bytes_uploaded``.

The token comes from ``HF_TOKEN``, else ``.env`` at the repo root, else the
``hf auth login`` cache; it is handed to the client and never printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from stages.config.hub import HUB_FILE_LIMIT
from stages.config.params import FormatRelease, Target
from stages.core.cli import progress_enabled
from stages.core.errors import ParamsError, ReleaseError
from stages.release.publish import (
    MANIFEST,
    FormatReceipt,
    PushPlan,
    Release,
    make_plan,
    published_names,
    read_release,
)

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


@dataclass(frozen=True)
class Remote:
    """What the target repo holds at the plan's head."""

    exists: bool
    head: str | None
    files: dict  # path -> RepoFile (size, blob_id, lfs)
    manifest: bytes | None


def read_remote(api, repo_id: str, revision: str) -> Remote:
    """The repo's files and our earlier manifest at ``revision`` (empty if it does not exist)."""
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        head = api.repo_info(repo_id, revision=revision).sha
    except RepositoryNotFoundError:
        return Remote(exists=False, head=None, files={}, manifest=None)
    except RevisionNotFoundError:
        return Remote(exists=True, head=None, files={}, manifest=None)
    files = {f.path: f for f in api.list_repo_tree(repo_id, revision=head, recursive=True)
             if isinstance(f, RepoFile)}
    manifest = None
    if MANIFEST in files:
        with tempfile.TemporaryDirectory() as tmp:
            path = api.hf_hub_download(repo_id, MANIFEST, revision=head, cache_dir=tmp)
            manifest = Path(path).read_bytes()
    return Remote(exists=True, head=head, files=files, manifest=manifest)


def plan_hub(release: Release, remote: Remote) -> PushPlan:
    """Compare the release with the remote files: LFS by sha256, others by git blob id."""
    def same(name: str, sha256: str, local: Callable[[], bytes]) -> bool:
        entry = remote.files.get(name)
        if entry is None:
            return False
        if entry.lfs is not None:
            return entry.lfs.sha256 == sha256
        return entry.blob_id == git_blob_id(local())

    flags = {name: same(name, e["sha256"], (release.folder / name).read_bytes)
             for name, e in release.files.items()}
    flags[MANIFEST] = same(MANIFEST, hashlib.sha256(release.manifest).hexdigest(),
                           lambda: release.manifest)
    return make_plan(release, same=flags, present=set(remote.files),
                     previous=published_names(remote.manifest))


def commit_message(name: str, release: Release, git_commit: str) -> str:
    return (f"Release {name}: manifest sha256 {hashlib.sha256(release.manifest).hexdigest()}, "
            f"llm-release {git_commit}")


def push_hub(folder: Path, release: FormatRelease, *, message: str,
             dry_run: bool = False) -> tuple[PushPlan, FormatReceipt | None]:
    """Make the Hub repo of ``release.target`` hold exactly ``folder``'s files, in one commit."""
    target = release.target
    repo_id, revision = str(target.repo_id), target.revision or "main"
    built = read_release(folder)
    too_big = [n for n, e in built.files.items() if e["bytes"] > HUB_FILE_LIMIT]
    if too_big:
        raise PublishError(f"{too_big[0]} is over the Hub's 50 GB file limit; set "
                           f"release.{release.format}.split_max_size to split it")
    api = hub_api(find_token())
    with hub_errors(repo_id, f"reading {repo_id}"):
        remote = read_remote(api, repo_id, revision)
        plan = plan_hub(built, remote)
    if dry_run:
        return plan, None
    with hub_errors(repo_id, f"publishing to {repo_id}"):
        if target.tag and remote.exists:  # before the commit: a refused tag must not leave one
            _check_tag(api, repo_id, target.tag, remote.head,
                       changes=bool(plan.upload or plan.delete))
        head, sent = _apply(api, folder, built, plan, target, remote, message)
        tag = _tag(api, repo_id, target.tag, head, message) if target.tag else None
    url = f"{api.endpoint}/{repo_id}/commit/{head}" if head else None
    return plan, FormatReceipt(format=release.format, kind="hub", target=repo_id,
                               uploaded=plan.upload, skipped=plan.skip, deleted=plan.delete,
                               bytes_uploaded=sent, revision=revision, commit=head, url=url,
                               tag=tag)


def _apply(api, folder: Path, built: Release, plan: PushPlan, target: Target, remote: Remote,
           message: str) -> tuple[str | None, int]:
    """Create the repo (and branch) if needed, upload, commit; (head commit, bytes sent)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo_id, revision = str(target.repo_id), target.revision or "main"
    if not plan.upload and not plan.delete:
        log.info("%s@%s already holds this release; no commit", repo_id, revision)
        return remote.head, 0
    head = remote.head
    if not remote.exists:
        with_retries(lambda: api.create_repo(repo_id, private=target.private, exist_ok=True),
                     f"creating {repo_id}")
        log.info("created %s repo %s", "private" if target.private else "public", repo_id)
    if head is None:
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=revision).sha
    adds = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
            for name in plan.upload if name != MANIFEST]
    if MANIFEST in plan.upload:
        adds.append(CommitOperationAdd(path_in_repo=MANIFEST, path_or_fileobj=built.manifest))
    if README in plan.upload:  # before any upload: the Hub would refuse the commit
        validate_card((folder / README).read_text(), repo_id)
    missing = _lfs_missing(api, repo_id, revision, adds)
    api.preupload_lfs_files(repo_id, additions=adds, revision=revision)
    deletes = [CommitOperationDelete(path_in_repo=name) for name in plan.delete]
    info = with_retries(lambda: api.create_commit(
        repo_id, operations=[*adds, *deletes], commit_message=message.splitlines()[0],
        commit_description=message, revision=revision, parent_commit=head), "commit")
    # What went over the wire: regular files travel inside the commit; an LFS file only
    # when the Hub's batch answer said it lacked the object. (_upload_mode is the client's
    # record of the preupload answer, set on each operation.)
    sent = sum(op.upload_info.size for op in adds
               if op._upload_mode != "lfs" or op.upload_info.sha256.hex() in missing)
    log.info("committed %s to %s@%s: %d files, %d deleted, %d bytes sent", info.oid[:12],
             repo_id, revision, len(adds), len(deletes), sent)
    return info.oid, sent


def _lfs_missing(api, repo_id: str, revision: str, adds: list) -> set[str]:
    """sha256 of the objects the Hub's LFS store lacks (it answers with upload actions)."""
    from huggingface_hub.lfs import post_lfs_batch_info

    if not adds:
        return set()
    actions, errors, _ = post_lfs_batch_info(
        upload_infos=[op.upload_info for op in adds], token=api.token, repo_type="model",
        repo_id=repo_id, revision=revision, endpoint=api.endpoint)
    if errors:
        raise PublishError(f"the Hub's LFS store refused {len(errors)} file(s): {errors[0]}")
    return {a["oid"] for a in actions if a.get("actions")}


def _tags(api, repo_id: str) -> dict[str, str]:
    """Tag name -> commit of the repo."""
    return {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}


def _tag_taken(repo_id: str, tag: str, commit: str) -> PublishError:
    return PublishError(f"tag `{tag}` of {repo_id} already names commit {commit[:12]}; a tag "
                        "pins one release: change the target's `tag` for this one")


def _check_tag(api, repo_id: str, tag: str, head: str | None, *, changes: bool) -> None:
    """Refuse, before committing, a tag that names a commit other than the one this push
    leaves (``head`` when nothing ``changes``, else a new commit)."""
    named = _tags(api, repo_id).get(tag)
    if named is not None and (changes or named != head):
        raise _tag_taken(repo_id, tag, named)


def _tag(api, repo_id: str, tag: str, commit: str | None, message: str) -> str:
    """Tag ``commit``; a tag that already names another commit is an error (it pins one)."""
    named = _tags(api, repo_id).get(tag)
    if named is not None:
        if named == commit:
            return tag
        raise _tag_taken(repo_id, tag, named)
    api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message.splitlines()[0])
    return tag
