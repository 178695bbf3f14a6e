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

Token, errors and retries: :mod:`stages.release.hub_client`.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stages.config.hub import HUB_FILE_LIMIT
from stages.config.params import FormatRelease, Target
from stages.release.hub_client import (
    README,
    PublishError,
    find_token,
    git_blob_id,
    hub_api,
    hub_errors,
    validate_card,
    with_retries,
)
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
