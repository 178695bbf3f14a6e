"""The local Hub (tests/hub_server.py) speaks the protocol of the real huggingface_hub client.

Every test drives the real ``HfApi`` against the server over HTTP, in a
subprocess: the suite exports ``HF_HUB_OFFLINE=1``, which huggingface_hub reads
once at import, so the client runs with a clean ``HF_*`` environment of its own
(``HF_ENDPOINT`` = the server, ``HF_HUB_DISABLE_XET=1``, ``HF_TOKEN``).  What
the client saw comes back as JSON; what the server received is asserted on its
counters and state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hub_server import (
    LICENSES_FILE,
    STALE_PARENT,
    HubServer,
    LfsPointer,
    card_metadata,
    validate_card_metadata,
)

WRITE, READ, BOB = "hf_write_alice_0001", "hf_read_alice_0002", "hf_write_bob_0003"
README = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
base_model_relation: finetune
library_name: gguf
pipeline_tag: text-generation
tags: [gguf, sft]
datasets: [HuggingFaceH4/no_robots, imdb]
---
# acme/smol-sft
"""
# Runs first in each client subprocess: the real client, and `error()` to report a failure.
PRELUDE = """
import hashlib, json, sys
from huggingface_hub import CommitOperationAdd as Add, CommitOperationDelete as Delete
from huggingface_hub import HfApi, hf_hub_download
api = HfApi()
out = {}

def error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        response = getattr(exc, "response", None)
        return {"type": type(exc).__name__, "message": str(exc),
                "status": getattr(response, "status_code", None),
                "retry_after": None if response is None else response.headers.get("Retry-After")}
    return None
"""


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A started server knowing alice (write, member of acme), alice (read) and bob.

    Afterwards, every request the client made must have been one the server speaks.
    """
    with HubServer() as server:
        server.add_token(WRITE, user="alice", orgs=["acme"], role="write")
        server.add_token(READ, user="alice", orgs=["acme"], role="read")
        server.add_token(BOB, user="bob", role="write")
        yield server
    assert server.requests["unrouted"] == 0, [e for e in server.log if e[2] == 404]


def run_client(hub: HubServer, tmp_path: Path, script: str, *args: Any) -> dict[str, Any]:
    """Run ``script`` (after PRELUDE) with the real client, as alice, against ``hub``.

    ``args`` are the script's ``sys.argv[1:]``; returns the script's ``out``.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_TOKEN=WRITE)
    code = PRELUDE + textwrap.dedent(script) + "\nprint('RESULT ' + json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1].removeprefix("RESULT "))


def git_blob(data: bytes) -> str:
    """git's blob id, computed here independently of the server."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pointer(data: bytes) -> bytes:
    """The LFS pointer file of ``data`` (git-lfs spec v1)."""
    sha = hashlib.sha256(data).hexdigest()
    text = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
    return text.encode()


def test_publish_flow_end_to_end(hub: HubServer, tmp_path: Path) -> None:
    """whoami, private repo, LFS + regular commit, tree, dedup, tag, download, no-op commit."""
    gguf = random.Random(0).randbytes(2 * 1024 * 1024 + 17)
    (tmp_path / "model.gguf").write_bytes(gguf)
    (tmp_path / "README.md").write_text(README)
    out = run_client(hub, tmp_path, """
        repo, gguf, readme = "acme/smol-sft", sys.argv[1], sys.argv[2]
        out["whoami"] = api.whoami()
        out["url"] = str(api.create_repo(repo, private=True))
        initial = out["initial"] = api.model_info(repo).sha
        ops = [Add("README.md", readme), Add("notes.txt", b"hello\\n"), Add("model.gguf", gguf)]
        c1 = api.create_commit(repo, ops, commit_message="Release v1", parent_commit=initial)
        out["c1"] = c1.oid
        out["tree"] = {e.path: {"size": e.size, "blob_id": e.blob_id, "lfs": e.lfs}
                       for e in api.list_repo_tree(repo, recursive=True)}
        ops = [Delete("notes.txt"), Add("copy.gguf", gguf)]
        c2 = api.create_commit(repo, ops, commit_message="Release v2", parent_commit=c1.oid)
        out["c2"] = c2.oid
        api.create_tag(repo, tag="v1", revision=c2.oid)
        out["tags"] = {t.name: t.target_commit for t in api.list_repo_refs(repo).tags}
        path = hf_hub_download(repo, "copy.gguf", revision="v1")
        out["download_sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        out["readme"] = open(hf_hub_download(repo, "README.md")).read()
        info = api.model_info(repo, files_metadata=True)
        out["info"] = {"private": info.private, "sha": info.sha, "license": info.card_data.license,
                       "siblings": {s.rfilename: s.size for s in info.siblings}}
        noop = api.create_commit(repo, [Add("copy.gguf", gguf), Add("README.md", readme)],
                                 commit_message="nothing changed")
        out["noop"] = noop.oid
        out["titles"] = [c.title for c in api.list_repo_commits(repo)]
    """, tmp_path / "model.gguf", tmp_path / "README.md")

    repo, sha = "acme/smol-sft", hashlib.sha256(gguf).hexdigest()
    assert out["whoami"]["name"] == "alice"
    assert [o["name"] for o in out["whoami"]["orgs"]] == ["acme"]
    assert out["whoami"]["auth"]["accessToken"]["role"] == "write"
    assert out["url"] == f"{hub.endpoint}/{repo}" and hub.is_private(repo)
    tree = out["tree"]
    assert tree["notes.txt"] == {"size": 6, "blob_id": git_blob(b"hello\n"), "lfs": None}
    assert tree["README.md"]["blob_id"] == git_blob(README.encode())
    assert tree["model.gguf"] == {"size": len(gguf), "blob_id": git_blob(pointer(gguf)),
                                  "lfs": {"size": len(gguf), "sha256": sha,
                                          "pointer_size": len(pointer(gguf))}}
    # the .gguf went through LFS once: the second commit re-used the stored object
    assert hub.requests["lfs_put"] == 1  # later batches answered "stored": no actions
    assert hub.lfs_bytes_received == len(gguf) and hub.lfs_objects == {sha}
    files = hub.files(repo)
    assert files["copy.gguf"] == files["model.gguf"] == LfsPointer(sha, len(gguf))
    assert "notes.txt" not in files and files["README.md"] == README.encode()
    assert hub.file_sha256(repo, "README.md") == hashlib.sha256(README.encode()).hexdigest()
    assert hub.commits_made[repo] == 2 and out["noop"] == out["c2"]  # no-op skipped by client
    assert [c.oid for c in hub.commits(repo)] == [out["c2"], out["c1"], out["initial"]]
    assert out["titles"] == ["Release v2", "Release v1", "initial commit"]
    assert out["tags"] == hub.tags(repo) == {"v1": out["c2"]}
    assert out["download_sha256"] == sha and out["readme"] == README
    assert out["info"] == {"private": True, "sha": out["c2"], "license": "apache-2.0",
                           "siblings": {".gitattributes": len(files[".gitattributes"]),
                                        "README.md": len(README), "copy.gguf": len(gguf),
                                        "model.gguf": len(gguf)}}


def test_validate_yaml_rejects_bad_metadata_before_any_upload(hub: HubServer,
                                                              tmp_path: Path) -> None:
    """The server's 400 reaches the client as ValueError('Invalid metadata in README.md ...')."""
    hub.seed_repo("alice/card", {})
    hub.reject_validate_yaml("the Hub is grumpy today")
    out = run_client(hub, tmp_path, """
        def card(meta):
            ops = [Add("README.md", f"---\\n{meta}\\n---\\n# card\\n".encode()),
                   Add("model.gguf", b"\\0" * 10)]
            return error(api.create_commit, "alice/card", ops, commit_message="card")
        out["injected"] = card("license: mit")
        out["datasets"] = card("license: mit\\ndatasets: [sft.jsonl]")
        out["license"] = card("license: not-a-license")
        out["other"] = card("license: other")
        out["relation"] = card("base_model: org/base\\nbase_model_relation: distilled")
    """)
    assert all(e["type"] == "ValueError" for e in out.values())
    assert all(e["message"].startswith("Invalid metadata in README.md.\n- ") for e in out.values())
    assert out["injected"]["message"].endswith("- the Hub is grumpy today")
    message = out["datasets"]["message"]
    assert '"datasets[0]" with value "sft.jsonl" is not a Hub dataset id' in message
    assert '- "license" must be one of [apache-2.0, mit, openrail,' in out["license"]["message"]
    assert '"license_name" is required' in out["other"]["message"]
    assert '"license_link" is required' in out["other"]["message"]
    assert '"base_model_relation" must be one of [adapter, merge, quantized, finetune]' in (
        out["relation"]["message"])
    assert hub.requests["validate_yaml"] == 5
    assert hub.requests["preupload"] == hub.commits_made["alice/card"] == 0  # failed early


def test_auth_read_token_anonymous_foreign_namespace_and_private_repos(hub: HubServer,
                                                                       tmp_path: Path) -> None:
    """401 without a valid token, 403 without the right, private repos hidden (404)."""
    hub.seed_repo("alice/pub", {"a.txt": b"a"})
    hub.seed_repo("acme/secret", {"a.txt": b"a"}, private=True)
    out = run_client(hub, tmp_path, f"""
        out["read_commit"] = error(api.create_commit, "alice/pub", [Add("b.txt", b"b")],
                                   commit_message="m", token="{READ}")
        out["read_auth_check"] = error(api.auth_check, "alice/pub", write=True, token="{READ}")
        out["bad_whoami"] = error(api.whoami, token="hf_not_a_known_token")
        out["anon_create"] = error(api.create_repo, "alice/new", token=False)
        out["foreign_ns"] = error(api.create_repo, "bob/mine")
        out["exists"] = error(api.create_repo, "alice/pub")
        out["exist_ok"] = str(api.create_repo("alice/pub", exist_ok=True))
        out["bob_private"] = error(api.model_info, "acme/secret", token="{BOB}")
        out["anon_private"] = error(api.model_info, "acme/secret", token=False)
        out["anon_public"] = api.model_info("alice/pub", token=False).id
        out["member_private"] = api.model_info("acme/secret").id
        out["write_auth_check"] = error(api.auth_check, "acme/secret", write=True)
    """)
    assert out["read_commit"]["status"] == 403 and "read role" in out["read_commit"]["message"]
    assert out["read_auth_check"]["status"] == 403
    assert out["bad_whoami"]["status"] == 401
    assert "Invalid user token" in out["bad_whoami"]["message"]
    assert out["anon_create"]["status"] == 401
    assert out["foreign_ns"]["status"] == 403
    assert out["exists"]["status"] == 409 and out["exist_ok"] == f"{hub.endpoint}/alice/pub"
    assert out["bob_private"]["type"] == "RepositoryNotFoundError"
    assert out["bob_private"]["status"] == 404
    assert out["anon_private"]["type"] == "RepositoryNotFoundError"
    assert out["anon_private"]["status"] == 401
    assert out["anon_public"] == "alice/pub" and out["member_private"] == "acme/secret"
    assert out["write_auth_check"] is None
    assert not hub.repo_exists("alice/new") and not hub.repo_exists("bob/mine")
    assert hub.commits_made["alice/pub"] == 0


def test_stale_parent_and_injected_failures(hub: HubServer, tmp_path: Path) -> None:
    """412 on a stale parent; 429/500 on commit surface at once; 503 on preupload is retried."""
    hub.seed_repo("alice/flaky", {"a.txt": b"a"})
    hub.fail("preupload", status=503, times=1)
    hub.fail("commit", status=429, times=1, retry_after=7)
    hub.fail("commit", status=500, times=1)
    blocked = b"\0blocked weights" * 100  # what the client below uploads
    hub.fail_lfs_put(sha256=hashlib.sha256(blocked).hexdigest(), times=None, status=403)
    out = run_client(hub, tmp_path, """
        repo = "alice/flaky"
        base = api.model_info(repo).sha
        add = lambda: [Add("b.txt", b"b")]
        out["rate_limited"] = error(api.create_commit, repo, add(), commit_message="b")
        out["server_error"] = error(api.create_commit, repo, add(), commit_message="b")
        out["ok"] = api.create_commit(repo, add(), commit_message="b", parent_commit=base[:7]).oid
        out["stale"] = error(api.create_commit, repo, [Add("c.txt", b"c")], commit_message="c",
                             parent_commit=base)
        out["lfs_blocked"] = error(api.create_commit, repo,
                                   [Add("w.bin", b"\\0blocked weights" * 100)],
                                   commit_message="weights")
    """)
    assert out["rate_limited"]["status"] == 429 and out["rate_limited"]["retry_after"] == "7"
    assert out["rate_limited"]["type"] == "HfHubHTTPError"
    assert out["server_error"]["status"] == 500 and out["server_error"]["type"] == "HfHubHTTPError"
    assert out["stale"]["status"] == 412 and STALE_PARENT in out["stale"]["message"]
    assert [c.oid for c in hub.commits("alice/flaky")][0] == out["ok"]
    preupload = [status for _, path, status in hub.log if "/preupload/" in path]
    assert preupload[:2] == [503, 200]  # the client retried the 503 by itself
    assert [s for _, p, s in hub.log if "/commit/" in p] == [429, 500, 200, 412]
    assert out["lfs_blocked"]["type"] == "RuntimeError"  # 403 on the PUT: not retried
    assert hub.requests["lfs_put"] == 1 and hub.lfs_bytes_received == len(blocked)
    assert hashlib.sha256(blocked).hexdigest() not in hub.lfs_objects
    assert hub.commits_made["alice/flaky"] == 1


def test_tree_pagination_paths_info_and_git_oids(hub: HubServer, tmp_path: Path) -> None:
    """Paginated listings (Link header), paths-info, 404s, and oids equal to real git's."""
    files = {"a.txt": b"A\n", "sub/b.txt": b"B\n", "sub/deep/c.txt": b"C\n", "sub/d.txt": b"D\n",
             "sub/deep.txt": b"git sorts me before deep/\n", "w.safetensors": b"\0" * 64}
    hub.seed_repo("alice/tree", files)
    hub.seed_repo("alice/tree", {"r.txt": b"R"}, branch="release/v1")  # a '/' to URL-quote
    hub.page_size = 2
    out = run_client(hub, tmp_path, """
        repo, branch = "alice/tree", "release/v1"
        ops = [Add("x.txt", b"x")]
        out["on_branch"] = api.create_commit(repo, ops, commit_message="x", revision=branch).oid
        out["branch_root"] = sorted(e.path for e in api.list_repo_tree(repo, revision=branch))
        out["branch_file"] = open(hf_hub_download(repo, "r.txt", revision=branch)).read()
        oid = lambda e: getattr(e, "blob_id", None) or e.tree_id
        out["all"] = {e.path: oid(e) for e in api.list_repo_tree(repo, recursive=True)}
        out["sub"] = sorted(e.path for e in api.list_repo_tree(repo, path_in_repo="sub"))
        out["paths"] = sorted((e.path, type(e).__name__)
                              for e in api.get_paths_info(repo, ["a.txt", "sub", "nope"]))
        out["missing_file"] = error(hf_hub_download, repo, "nope.txt")
        out["missing_rev"] = error(lambda: list(api.list_repo_tree(repo, revision="nope")))
        out["missing_dir"] = error(lambda: list(api.list_repo_tree(repo, path_in_repo="x")))
    """)
    assert out["on_branch"] == hub.commits("alice/tree", "release/v1")[0].oid
    assert out["branch_root"] == [".gitattributes", "a.txt", "r.txt", "sub", "w.safetensors",
                                  "x.txt"]
    assert out["branch_file"] == "R" and "x.txt" not in hub.files("alice/tree")
    assert set(out["all"]) == {".gitattributes", *files, "sub", "sub/deep"}
    assert hub.requests["tree"] >= 6  # 9 entries, 2 a page, plus the other listings
    assert out["sub"] == ["sub/b.txt", "sub/d.txt", "sub/deep", "sub/deep.txt"]
    assert out["paths"] == [["a.txt", "RepoFile"], ["sub", "RepoFolder"]]
    assert out["missing_file"]["type"] == "RemoteEntryNotFoundError"
    assert out["missing_rev"]["type"] == "RevisionNotFoundError"
    assert out["missing_dir"]["type"] == "RemoteEntryNotFoundError"
    if shutil.which("git") is None:
        pytest.skip("git is not installed: oids not cross-checked")
    work = tmp_path / "git"
    for path, entry in hub.files("alice/tree").items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        content = pointer(files[path]) if isinstance(entry, LfsPointer) else entry
        (work / path).write_bytes(content)
    git = ["git", "-C", str(work), "-c", "core.autocrlf=false"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    tree = subprocess.run([*git, "write-tree"], check=True, capture_output=True, text=True)
    listing = subprocess.run([*git, "ls-tree", "-r", "-t", tree.stdout.strip()], check=True,
                             capture_output=True, text=True).stdout
    assert out["all"] == {line.split("\t")[1]: line.split()[2] for line in listing.splitlines()}


def test_commit_rejects_an_lfs_pointer_without_its_object(hub: HubServer) -> None:
    """A guard the client cannot trip (it uploads first), so sent raw: 400, no commit."""
    hub.seed_repo("alice/raw", {})
    lines = [{"key": "header", "value": {"summary": "raw", "description": ""}},
             {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64,
                                          "size": 3}}]
    request = urllib.request.Request(
        f"{hub.endpoint}/api/models/alice/raw/commit/main", method="POST",
        data=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        headers={"Authorization": f"Bearer {WRITE}", "Content-Type": "application/x-ndjson"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(request, timeout=10)
    assert caught.value.code == 400
    assert "LFS pointer pointed to a file that does not exist" in json.load(caught.value)["error"]
    assert hub.commits_made["alice/raw"] == 0 and len(hub.commits("alice/raw")) == 2


def test_card_metadata_rules() -> None:
    """The validate-yaml rules, directly: Hub ids, relations, licenses, tags, datasets."""
    licenses = json.loads(LICENSES_FILE.read_text())["licenses"]
    assert {"apache-2.0", "mit", "llama3.1", "gemma", "other"} <= set(licenses)
    assert len(licenses) == len(set(licenses))
    good = card_metadata(README)
    assert validate_card_metadata(good, licenses) == []
    assert validate_card_metadata({"license": "other", "license_name": "acme-1.0",
                                   "license_link": "LICENSE"}, licenses) == []
    bad = {"base_model": ["ok/model", "not an id"], "tags": "gguf", "library_name": 3,
           "pipeline_tag": "text-gen", "datasets": ["imdb", "data/sft.jsonl", "sft.jsonl"],
           "base_model_relation": "adapter"}
    errors = validate_card_metadata(bad, licenses)
    assert errors.pop(2).startswith('"pipeline_tag" must be one of [text-generation, ')
    assert errors == [
        '"base_model[1]" with value "not an id" is not a Hub model id (owner/name)',
        '"library_name" must be a string',
        '"tags" must be a list of strings',
        '"datasets[1]" with value "data/sft.jsonl" is not a Hub dataset id',
        '"datasets[2]" with value "sft.jsonl" is not a Hub dataset id',
    ]
    assert card_metadata("# no front matter\n") is None
    with pytest.raises(ValueError, match="Invalid YAML"):
        card_metadata("---\nlicense: [unclosed\n---\n")
