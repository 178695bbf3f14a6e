"""A local Hugging Face Hub for tests: the real ``huggingface_hub`` client over real HTTP.

The project's only test double for the Hub.  :class:`HubServer` serves, on
``127.0.0.1``, the endpoints ``HfApi`` (huggingface_hub 2.4) calls in a
publishing flow; point the client at it with ``HF_ENDPOINT=<server.endpoint>``
and ``HF_HUB_DISABLE_XET=1`` (uploads then take the classic LFS batch path).
State is in memory: repos with a linear git-like history per branch (real git
blob/tree/commit oids), an LFS object store keyed by sha256, tags.

Behaviour follows the Hub where the client depends on it: errors carry
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
a JSON ``{"error": ...}`` body; a new repo has an ``initial commit`` holding the
Hub's default ``.gitattributes``; a stale ``parentCommit`` gets 412; a missing
repo or a private one is 404 (401 without a token).  Reads of public repos need
no token, as on the Hub; an unknown token is 401 everywhere.  Known gaps: no
pull requests, branches other than ``main`` only through :meth:`HubServer.seed_repo`,
no Range downloads, LFS files are served directly (the Hub redirects to a CDN).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import threading
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml

LICENSES_FILE = Path(__file__).resolve().parent.parent / "stages/release/hub_licenses.json"
LFS_THRESHOLD = 1 << 20  # bytes; larger files go to LFS (the Hub's own cut is 10 MB)
LFS_EXTENSIONS = (".gguf", ".png", ".safetensors")
DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model "
        "*.msgpack *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar "
        "*.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst "
        "*tfevents*").split())
RELATIONS = ("adapter", "merge", "quantized", "finetune")
PIPELINE_TAGS = (
    "text-generation", "text2text-generation", "text-classification", "token-classification",
    "question-answering", "summarization", "translation", "fill-mask", "feature-extraction",
    "sentence-similarity", "zero-shot-classification", "image-text-to-text", "text-to-image",
    "image-classification", "automatic-speech-recognition", "text-to-speech", "any-to-any")
STALE_PARENT = "The branch was updated since you opened this page. Please refresh and try again."
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", None: "model"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w][\w.-]{0,95}")
_REPO_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}")
_LICENSE_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".zip", ".gz")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_A = r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)"  # an API repo path
_G = r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)"  # a git/web repo path
_ROUTES: tuple[tuple[str, str, str], ...] = (  # (methods, raw-path regex, endpoint name)
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", _A + r"(?:/revision/([^/]+))?", "repo_info"),
    ("GET", _A + r"/auth-check(/write)?", "auth_check"),
    ("GET", _A + r"/tree/([^/]+)(?:/(.+))?", "tree"),
    ("POST", _A + r"/paths-info/([^/]+)", "paths_info"),
    ("POST", _A + r"/preupload/([^/]+)", "preupload"),
    ("POST", _A + r"/commit/([^/]+)", "commit"),
    ("POST", _A + r"/tag/([^/]+)", "tag"),
    ("GET", _A + r"/refs", "refs"),
    ("GET", _A + r"/commits/([^/]+)", "commits"),
    ("POST", _G + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", _G + r"\.git/info/lfs/objects/verify", "lfs_verify"),
    ("PUT", r"/lfs-upload/([0-9a-f]{64})", "lfs_put"),
    ("GET HEAD", _G + r"/resolve/([^/]+)/(.+)", "resolve"),
)
ENDPOINTS = tuple(name for _, _, name in _ROUTES)


@dataclass(frozen=True)
class LfsPointer:
    """A file stored with LFS: git holds this pointer, the object store holds the bytes."""

    sha256: str
    size: int

    def text(self) -> bytes:
        """The pointer file git stores in place of the content."""
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n").encode()


Entry = bytes | LfsPointer


@dataclass(frozen=True)
class Commit:
    """One commit of a branch: its full file tree, not a diff."""

    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Entry]


@dataclass
class _Repo:
    """A repo: branches and tags point into ``commits`` (oid -> commit)."""

    type: str
    repo_id: str
    private: bool
    created: str
    branches: dict[str, str]
    tags: dict[str, str]
    commits: dict[str, Commit]


@dataclass(frozen=True)
class _Token:
    """Who a token is: user, orgs, role (``read`` or ``write``)."""

    user: str
    orgs: tuple[str, ...]
    role: str


@dataclass
class _Failure:
    """A pending injected failure (``times`` None: for ever)."""

    endpoint: str
    status: int
    times: int | None
    retry_after: int = 0
    sha256: str | None = None  # lfs_put: only this object
    reason: str | None = None  # validate_yaml: the error of a 400


@dataclass
class _Request:
    """One HTTP request, body read."""

    method: str
    path: str  # raw, still percent-encoded
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or a 400."""
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc

    def flag(self, name: str) -> bool:
        """Whether query parameter ``name`` is true (``true``/``True``/``1``)."""
        return self.query.get(name, [""])[0].lower() in ("true", "1")


@dataclass
class _Response:
    """One HTTP response (Content-Length is added when sent)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] | None = None


class HubError(Exception):
    """An HTTP error answered the Hub's way: JSON ``{"error": ...}`` and X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = dict(headers or {}), body

    def response(self) -> _Response:
        """The error as a response."""
        headers = {**self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        if "\n" not in self.message and self.message.isascii():
            headers["X-Error-Message"] = self.message
        return _json(self.body or {"error": self.message}, self.status, headers)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None,
          content_type: str = "application/json") -> _Response:
    """A JSON response."""
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": content_type,
                                                        **(headers or {})})


def _now() -> str:
    """Now, as the Hub writes dates (``2024-01-31T12:00:00.000Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git_bytes(entry: Entry) -> bytes:
    """What git stores for ``entry``: the content, or the LFS pointer."""
    return entry.text() if isinstance(entry, LfsPointer) else entry


def _size(entry: Entry) -> int:
    """The size of the file ``entry`` stands for."""
    return entry.size if isinstance(entry, LfsPointer) else len(entry)


def git_tree_oid(files: dict[str, Entry], prefix: str = "") -> str:
    """The git tree id of folder ``prefix`` (``""`` or ending in ``/``) of ``files``."""
    children: dict[str, tuple[bytes, bytes, str]] = {}  # name -> (mode, sha, sort key)
    for path, entry in files.items():
        if not path.startswith(prefix):
            continue
        head, slash, _ = path[len(prefix):].partition("/")
        if slash and head not in children:
            sha = git_tree_oid(files, f"{prefix}{head}/")
            children[head] = (b"40000", bytes.fromhex(sha), head + "/")
        elif not slash:
            children[head] = (b"100644", bytes.fromhex(git_blob_oid(_git_bytes(entry))), head)
    body = b"".join(mode + b" " + name.encode() + b"\0" + sha
                    for name, (mode, sha, _) in sorted(children.items(), key=lambda c: c[1][2]))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def _commit_oid(tree: str, parent: str | None, author: str, title: str, message: str) -> str:
    """A git commit id for this tree, parent, author and message."""
    when = int(datetime.now(UTC).timestamp())
    stamp = f"{author} <{author}@users.noreply.huggingface.co> {when} +0000"
    body = (f"tree {tree}\n" + (f"parent {parent}\n" if parent else "")
            + f"author {stamp}\ncommitter {stamp}\n\n{title}\n\n{message}\n").encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


def load_hub_licenses(path: Path = LICENSES_FILE) -> tuple[str, ...]:
    """The Hub's license ids from ``stages/release/hub_licenses.json``."""
    return tuple(json.loads(path.read_text())["licenses"])


def is_repo_id(value: str) -> bool:
    """Whether ``value`` is a Hub repo id ``owner/name`` (huggingface_hub's rules)."""
    return (bool(_REPO_ID.fullmatch(value)) and "--" not in value and ".." not in value
            and not value.endswith(".git"))


def is_dataset_id(value: str) -> bool:
    """``owner/name``, or a bare canonical name (no dot: ``sft.jsonl`` is a file, not an id)."""
    if "/" in value:
        return is_repo_id(value) and not value.lower().endswith(_DATA_SUFFIXES)
    return re.fullmatch(r"[A-Za-z0-9][\w-]*", value) is not None


def card_metadata(readme: str) -> dict[str, Any] | None:
    """The YAML front matter of a README (``None`` if it has none); ValueError if invalid."""
    match = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", readme, re.S | re.M)
    if match is None:
        return None
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise ValueError(f"Invalid YAML in the metadata: {exc}") from exc
    if meta is not None and not isinstance(meta, dict):
        raise ValueError("The metadata must be a YAML mapping")
    return meta or {}


def _ids_errors(key: str, value: Any, ok: Any, what: str, single: bool) -> list[str]:
    """Errors for ``key``: one id (if ``single``) or a list of ids, each ``ok``."""
    if value is None:
        return []
    if single and isinstance(value, str):
        return [] if ok(value) else [f'"{key}" with value "{value}" is not {what}']
    if not isinstance(value, list) or not value:
        return [f'"{key}" must be {"one or " if single else ""}a list of {what}s']
    return [f'"{key}[{i}]" with value "{v}" is not {what}'
            for i, v in enumerate(value) if not (isinstance(v, str) and ok(v))]


def validate_card_metadata(meta: dict[str, Any], licenses: Sequence[str]) -> list[str]:
    """Errors in model-card metadata, worded like the Hub's validate-yaml (empty: valid)."""
    errors = _ids_errors("base_model", meta.get("base_model"), is_repo_id,
                         "a Hub model id (owner/name)", single=True)
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in RELATIONS:
        errors.append(f'"base_model_relation" must be one of [{", ".join(RELATIONS)}]')
    elif relation is not None and "base_model" not in meta:
        errors.append('"base_model_relation" requires "base_model"')
    license_ = meta.get("license")
    if license_ is not None and license_ not in licenses:
        errors.append(f'"license" must be one of [{", ".join(licenses)}]')
    if license_ == "other":
        name = meta.get("license_name")
        if not (isinstance(name, str) and _LICENSE_NAME.fullmatch(name)):
            errors.append('"license_name" is required with "license: other" and must be '
                          "lowercase letters, digits, '-' and '.'")
        if not (isinstance(meta.get("license_link"), str) and meta["license_link"]):
            errors.append('"license_link" is required with "license: other"')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be one of [{", ".join(PIPELINE_TAGS)}]')
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append('"tags" must be a list of strings')
    return errors + _ids_errors("datasets", meta.get("datasets"), is_dataset_id,
                                "a Hub dataset id", single=False)


def _check_path(path: Any) -> str:
    """A path in a commit, or a 422 as the Hub answers a bad one."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if "\\" in str(path) or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(422, f"Invalid path in commit: {path!r}")
    return path


def _lfs_by_attributes(path: str, attributes: Entry | None) -> bool:
    """Whether a ``filter=lfs`` line of ``.gitattributes`` matches ``path``."""
    if not isinstance(attributes, bytes):
        return False
    patterns = [line.split()[0] for line in attributes.decode(errors="replace").splitlines()
                if "filter=lfs" in line and not line.startswith("#")]
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch(path if "/" in p else name, p) for p in patterns)


def _file_json(path: str, entry: Entry) -> dict[str, Any]:
    """A file as tree and paths-info list it."""
    out: dict[str, Any] = {"type": "file", "oid": git_blob_oid(_git_bytes(entry)),
                           "size": _size(entry), "path": path}
    if isinstance(entry, LfsPointer):
        out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.text())}
    return out


def _folder_json(files: dict[str, Entry], path: str) -> dict[str, Any]:
    """A folder as tree and paths-info list it."""
    return {"type": "directory", "oid": git_tree_oid(files, path + "/"), "size": 0, "path": path}


def _tree_entries(files: dict[str, Entry], base: str, recursive: bool) -> list[dict[str, Any]]:
    """What ``/tree/{rev}/{base}`` lists: folders first, then files, by path."""
    prefix = base.strip("/") + "/" if base.strip("/") else ""
    if prefix and not any(p.startswith(prefix) for p in files):
        raise HubError(404, f"{base} does not exist", code="EntryNotFound")
    folders, entries = set(), []
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        depth = len(parts) if recursive else min(2, len(parts))
        folders.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
        if recursive or len(parts) == 1:
            entries.append(_file_json(path, files[path]))
    return [_folder_json(files, f) for f in sorted(folders)] + entries


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, lets the :class:`HubServer` answer it, writes the answer."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, *args: Any) -> None:
        """Quiet: tests read ``HubServer.log`` instead."""

    def _read_body(self) -> bytes:
        """The request body, whether sized (Content-Length) or chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        """Answer one request (any method)."""
        url = urlsplit(self.path)
        request = _Request(self.command, url.path, parse_qs(url.query), self.headers,
                           self._read_body())
        response = self.server.hub.handle(request)
        self.send_response(response.status)
        for key, value in (response.headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


class _HTTPServer(ThreadingHTTPServer):
    """The stdlib server, pointing at its :class:`HubServer`."""

    daemon_threads = True
    hub: HubServer


class HubServer:
    """The local Hub.  ``with HubServer() as hub:``, then ``HF_ENDPOINT=hub.endpoint``.

    Set up: :meth:`add_token`, :meth:`seed_repo`.  Inject failures: :meth:`fail` (any
    endpoint of ``ENDPOINTS``), :meth:`fail_lfs_put`, :meth:`reject_validate_yaml`.
    Count: ``requests`` (by endpoint; ``unrouted`` for paths it does not speak),
    ``commits_made`` (by repo), ``lfs_bytes_received``, ``lfs_objects``, ``log``.
    Inspect: :meth:`files`, :meth:`file_sha256`, :meth:`commits`, :meth:`tags`.
    """

    def __init__(self, *, licenses: Sequence[str] | None = None,
                 lfs_threshold: int = LFS_THRESHOLD, page_size: int = 1000) -> None:
        self.licenses = tuple(licenses) if licenses is not None else load_hub_licenses()
        self.lfs_threshold, self.page_size = lfs_threshold, page_size
        self.requests: Counter[str] = Counter()  # requests by endpoint name (ENDPOINTS)
        self.commits_made: Counter[str] = Counter()  # API commits by repo id
        self.lfs_bytes_received = 0  # body bytes of every LFS PUT
        self.log: list[tuple[str, str, int]] = []  # (method, raw path, status)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._objects: dict[str, bytes] = {}
        self._tokens: dict[str, _Token] = {}
        self._failures: list[_Failure] = []
        self._secret = hashlib.sha256(str(id(self)).encode()).digest()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, port: int = 0) -> HubServer:
        """Listen on ``port`` (default: a free one) of 127.0.0.1 in a background thread."""
        self._http = _HTTPServer(("127.0.0.1", port), _Handler)
        self._http.hub = self
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,),
                                        daemon=True, name="hub-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout=5)
            self._http = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The URL to put in ``HF_ENDPOINT``."""
        assert self._http is not None, "HubServer is not started"
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    # -- setup and failure injection -------------------------------------------------------
    def add_token(self, token: str, user: str, orgs: Sequence[str] = (),
                  role: str = "write") -> None:
        """Accept ``token`` for ``user`` (member of ``orgs``) with role ``read`` or ``write``."""
        assert role in ("read", "write"), role
        self._tokens[token] = _Token(user, tuple(orgs), role)

    def fail(self, endpoint: str, status: int = 500, times: int | None = 1,
             retry_after: int = 0) -> None:
        """Answer the next ``times`` (None: all) requests to ``endpoint`` with ``status``.

        A 429 carries ``Retry-After: retry_after``; a 5xx has a plain-text body.
        """
        assert endpoint in ENDPOINTS, f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}"
        with self._lock:
            self._failures.append(_Failure(endpoint, status, times, retry_after))

    def fail_lfs_put(self, sha256: str | None = None, times: int | None = 1,
                     status: int = 500) -> None:
        """Fail the LFS object PUTs (of object ``sha256`` only, if given); 5xx are retried."""
        with self._lock:
            self._failures.append(_Failure("lfs_put", status, times, sha256=sha256))

    def reject_validate_yaml(self, reason: str, times: int | None = 1) -> None:
        """Answer the next ``times`` validate-yaml calls 400 with ``reason`` as the error."""
        with self._lock:
            self._failures.append(_Failure("validate_yaml", 400, times, reason=reason))

    def seed_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False,
                  repo_type: str = "model", branch: str = "main",
                  message: str = "seed") -> str:
        """Create ``repo_id`` if needed and commit ``files`` to ``branch``; the commit oid."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create(
                repo_type, repo_id, private, author="system")
            head = repo.branches.get(branch, repo.branches["main"])
            tree = dict(repo.commits[head].files)
            for path, data in files.items():
                if self._upload_mode(path, len(data), data[:512], tree) == "lfs" and data:
                    sha = hashlib.sha256(data).hexdigest()
                    self._objects[sha] = data
                    tree[_check_path(path)] = LfsPointer(sha, len(data))
                else:
                    tree[_check_path(path)] = data
            repo.branches.setdefault(branch, head)
            return self._new_commit(repo, branch, tree, message, "", "system")

    # -- inspection ------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main",
              repo_type: str = "model") -> dict[str, Entry]:
        """Path -> content (bytes) or :class:`LfsPointer`, at ``revision``."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return dict(repo.commits[self._revision(repo, revision)].files)

    def file_sha256(self, repo_id: str, path: str, revision: str = "main",
                    repo_type: str = "model") -> str:
        """The sha256 of the content of ``path`` (of the object, for an LFS file)."""
        entry = self.files(repo_id, revision, repo_type)[path]
        return entry.sha256 if isinstance(entry, LfsPointer) else hashlib.sha256(entry).hexdigest()

    @property
    def lfs_objects(self) -> frozenset[str]:
        """The sha256 of every stored LFS object."""
        with self._lock:
            return frozenset(self._objects)

    def commits(self, repo_id: str, revision: str = "main",
                repo_type: str = "model") -> list[Commit]:
        """History of ``revision``, newest first (the last one is the ``initial commit``)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return self._history(repo, self._revision(repo, revision))

    def tags(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """Tag name -> commit oid."""
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].tags)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        """Whether the repo was created."""
        return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        """Whether the repo is private."""
        return self._repos[(repo_type, repo_id)].private

    # -- dispatch --------------------------------------------------------------------------
    def handle(self, request: _Request) -> _Response:
        """Route one request to its endpoint, failure injection first."""
        for methods, pattern, name in _ROUTES:  # noqa: B007 - `name` is used after the loop
            match = re.fullmatch(pattern, request.path)
            if match and request.method in methods.split():
                break
        else:
            with self._lock:
                self.requests["unrouted"] += 1
                self.log.append((request.method, request.path, 404))
            return HubError(404, f"No route for {request.method} {request.path}").response()
        args = [unquote(g) if g is not None else None for g in match.groups()]
        with self._lock:
            self.requests[name] += 1
            if name == "lfs_put":
                self.lfs_bytes_received += len(request.body)
            try:
                response = self._injected(name, args) or getattr(self, f"_{name}")(request, *args)
            except HubError as exc:
                response = exc.response()
            except Exception:  # a server bug: show it to the test
                response = _Response(500, traceback.format_exc().encode(),
                                     {"Content-Type": "text/plain"})
            request_id = f"local-{next(self._ids)}"
            response.headers = {**(response.headers or {}), "X-Request-Id": request_id}
            self.log.append((request.method, request.path, response.status))
            return response

    def _injected(self, name: str, args: list[str | None]) -> _Response | None:
        """The injected failure for this request, if one is pending (and count it down)."""
        for failure in self._failures:
            if failure.endpoint == name and failure.sha256 in (None, *args[:1]):
                break
        else:
            return None
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                self._failures.remove(failure)
        if failure.reason is not None:  # validate-yaml's own error format
            return _json({"errors": [{"message": failure.reason}], "warnings": []}, 400)
        if failure.status >= 500:
            return _Response(failure.status, b"injected server error",
                             {"Content-Type": "text/plain"})
        headers = {"Retry-After": str(failure.retry_after)} if failure.status == 429 else {}
        return _json({"error": f"injected failure ({failure.status})"}, failure.status, headers)

    # -- auth and lookups ------------------------------------------------------------------
    def _caller(self, request: _Request) -> _Token | None:
        """The token's owner; None without a token; 401 for an unknown token."""
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        caller = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return caller

    def _check_write(self, caller: _Token | None, namespace: str) -> _Token:
        """401 without a token, 403 for a read token or a foreign namespace."""
        if caller is None:
            raise HubError(401, "You must be authenticated to write (Authorization header)")
        if caller.role != "write":
            raise HubError(403, "Your token has the read role: it cannot write")
        if namespace not in (caller.user, *caller.orgs):
            raise HubError(403, f"You don't have the rights to write in namespace {namespace}")
        return caller

    def _visible(self, request: _Request, kind: str | None, ns: str, name: str) -> _Repo:
        """The repo if the caller may read it; else RepoNotFound (401 anonymous, 404)."""
        caller = self._caller(request)
        repo = self._repos.get((_TYPES[kind], f"{ns}/{name}"))
        hidden = repo is not None and repo.private and (
            caller is None or ns not in (caller.user, *caller.orgs))
        if repo is None or hidden:
            raise HubError(401 if caller is None else 404, "Repository not found",
                           code="RepoNotFound")
        return repo

    def _writable(self, request: _Request, kind: str | None, ns: str, name: str) -> _Repo:
        """The repo if the caller may write it."""
        repo = self._visible(request, kind, ns, name)
        self._check_write(self._caller(request), ns)
        return repo

    def _revision(self, repo: _Repo, rev: str) -> str:
        """The commit oid of a branch, tag or (short) commit id; else RevisionNotFound."""
        if rev in repo.branches or rev in repo.tags:
            return repo.branches.get(rev) or repo.tags[rev]
        found = [oid for oid in repo.commits if re.fullmatch(r"[0-9a-f]{7,40}", rev)
                 and oid.startswith(rev)]
        if len(found) != 1:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return found[0]

    def _history(self, repo: _Repo, oid: str | None) -> list[Commit]:
        """Commits from ``oid`` back to the first, newest first."""
        out = []
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    def _upload_mode(self, path: str, size: int, sample: bytes, files: dict[str, Entry]) -> str:
        """``lfs`` for large, binary, LFS-typed or .gitattributes-tracked files."""
        lfs = (size > self.lfs_threshold or path.lower().endswith(LFS_EXTENSIONS)
               or b"\0" in sample or _lfs_by_attributes(path, files.get(".gitattributes")))
        return "lfs" if lfs else "regular"

    def _create(self, repo_type: str, repo_id: str, private: bool, author: str) -> _Repo:
        """A new repo whose ``initial commit`` holds the default ``.gitattributes``."""
        repo = _Repo(repo_type, repo_id, private, _now(), {}, {}, {})
        self._repos[(repo_type, repo_id)] = repo
        self._new_commit(repo, "main", {".gitattributes": DEFAULT_GITATTRIBUTES.encode()},
                         "initial commit", "", author)
        return repo

    def _new_commit(self, repo: _Repo, branch: str, files: dict[str, Entry], title: str,
                    message: str, author: str) -> str:
        """Commit ``files`` as the new head of ``branch``; the commit oid."""
        parent = repo.branches.get(branch)
        oid = _commit_oid(git_tree_oid(files), parent, author, title, message)
        repo.commits[oid] = Commit(oid, parent, title, message, author, _now(), files)
        repo.branches[branch] = oid
        return oid

    def _paginate(self, request: _Request, items: list[Any]) -> _Response:
        """One page of ``items``, with a ``Link: <...>; rel="next"`` header if more follow."""
        start = int(request.query.get("cursor", ["0"])[0])
        size = min(self.page_size, 50) if request.flag("expand") else self.page_size
        headers = {}
        if start + size < len(items):
            query = {**request.query, "cursor": [str(start + size)]}
            link = f"{self.endpoint}{request.path}?{urlencode(query, doseq=True)}"
            headers["Link"] = f'<{link}>; rel="next"'
        return _json(items[start:start + size], headers=headers)

    # -- endpoints: account and repos ------------------------------------------------------
    def _whoami(self, request: _Request) -> _Response:
        """``GET /api/whoami-v2``."""
        caller = self._caller(request)
        if caller is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        role_in_org = "write" if caller.role == "write" else "read"
        return _json({
            "type": "user", "id": hashlib.sha1(caller.user.encode()).hexdigest()[:24],
            "name": caller.user, "fullname": caller.user,
            "email": f"{caller.user}@users.noreply.huggingface.co", "emailVerified": True,
            "canPay": False, "isPro": False, "avatarUrl": "",
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": role_in_org}
                     for org in caller.orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "local", "role": caller.role}}})

    def _create_repo(self, request: _Request) -> _Response:
        """``POST /api/repos/create`` (409, with the repo ``url``, if it exists)."""
        caller, body = self._caller(request), request.json()
        repo_type, name = body.get("type") or "model", body.get("name")
        namespace = body.get("organization") or (caller.user if caller else "")
        if repo_type not in URL_PREFIX or not (isinstance(name, str)
                                              and _REPO_NAME.fullmatch(name)):
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type})")
        self._check_write(caller, namespace)
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            raise HubError(409, f"You already created this {repo_type} repo",
                           body={"error": f"You already created this {repo_type} repo",
                                 "url": url})
        private = body.get("visibility") == "private" or body.get("private") is True
        self._create(repo_type, repo_id, private, caller.user)
        return _json({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()})

    def _repo_info(self, request: _Request, kind: str, ns: str, name: str,
                   rev: str | None) -> _Response:
        """``GET /api/{type}s/{id}[/revision/{rev}]`` (``?blobs=true``: sizes, oids)."""
        repo = self._visible(request, kind, ns, name)
        commit = repo.commits[self._revision(repo, rev or "main")]
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if request.flag("blobs"):
                sibling.update(size=_size(entry), blobId=git_blob_oid(_git_bytes(entry)))
                if isinstance(entry, LfsPointer):
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size,
                                      "pointerSize": len(entry.text())}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": ns, "sha": commit.oid, "lastModified": commit.date,
            "createdAt": repo.created, "private": repo.private, "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(_size(e) for e in commit.files.values())}
        readme = commit.files.get("README.md")
        try:
            meta = card_metadata(readme.decode()) if isinstance(readme, bytes) else None
        except ValueError:
            meta = None
        if meta:
            tags = meta.get("tags")
            info.update(cardData=meta, tags=tags if isinstance(tags, list) else [],
                        **{k: meta[k] for k in ("pipeline_tag", "library_name") if k in meta})
        return _json(info)

    def _auth_check(self, request: _Request, kind: str, ns: str, name: str,
                    write: str | None) -> _Response:
        """``GET /api/{type}s/{id}/auth-check[/write]``."""
        (self._writable if write else self._visible)(request, kind, ns, name)
        return _json({})

    def _refs(self, request: _Request, kind: str, ns: str, name: str) -> _Response:
        """``GET /api/{type}s/{id}/refs``."""
        repo = self._visible(request, kind, ns, name)

        def refs(names: dict[str, str], kind_: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind_}/{n}", "targetCommit": oid}
                    for n, oid in sorted(names.items())]
        return _json({"branches": refs(repo.branches, "heads"), "converts": [],
                      "tags": refs(repo.tags, "tags"), "pullRequests": []})

    def _commits(self, request: _Request, kind: str, ns: str, name: str,
                 rev: str) -> _Response:
        """``GET /api/{type}s/{id}/commits/{rev}`` (paginated)."""
        repo = self._visible(request, kind, ns, name)
        return self._paginate(request, [
            {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
             "authors": [{"user": c.author, "avatar": ""}]}
            for c in self._history(repo, self._revision(repo, rev))])

    def _tag(self, request: _Request, kind: str, ns: str, name: str, rev: str) -> _Response:
        """``POST /api/{type}s/{id}/tag/{rev}`` (409 if the name exists)."""
        repo, body = self._writable(request, kind, ns, name), request.json()
        tag = body.get("tag")
        if not (isinstance(tag, str) and re.fullmatch(r"[\w.-][\w./-]*", tag)) or ".." in tag:
            raise HubError(400, f"Invalid tag name: {tag!r}")
        if tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Reference {tag} already exists")
        repo.tags[tag] = self._revision(repo, rev)
        return _json({})

    # -- endpoints: files ------------------------------------------------------------------
    def _tree(self, request: _Request, kind: str, ns: str, name: str, rev: str,
              path: str | None) -> _Response:
        """``GET /api/{type}s/{id}/tree/{rev}[/{path}]?recursive=&expand=`` (paginated)."""
        repo = self._visible(request, kind, ns, name)
        files = repo.commits[self._revision(repo, rev)].files
        return self._paginate(request, _tree_entries(files, path or "", request.flag("recursive")))

    def _paths_info(self, request: _Request, kind: str, ns: str, name: str,
                    rev: str) -> _Response:
        """``POST /api/{type}s/{id}/paths-info/{rev}`` (form: paths, expand)."""
        repo = self._visible(request, kind, ns, name)
        files = repo.commits[self._revision(repo, rev)].files
        out = []
        for path in parse_qs(request.body.decode()).get("paths", []):
            if path in files:
                out.append(_file_json(path, files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in files):
                out.append(_folder_json(files, path.rstrip("/")))
        return _json(out)

    def _resolve(self, request: _Request, kind: str | None, ns: str, name: str,
                      rev: str, path: str) -> _Response:
        """``GET|HEAD /[{type}s/]{id}/resolve/{rev}/{path}`` with the download headers."""
        repo = self._visible(request, kind, ns, name)
        oid = self._revision(repo, rev)
        entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound",
                           headers={"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "Content-Type": "application/octet-stream"}
        if isinstance(entry, LfsPointer):
            data, etag = self._objects[entry.sha256], entry.sha256
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        else:
            data, etag = entry, git_blob_oid(entry)
        return _Response(200, data, {**headers, "ETag": f'"{etag}"'})


    def _preupload(self, request: _Request, kind: str, ns: str, name: str,
                   rev: str) -> _Response:
        """``POST /api/{type}s/{id}/preupload/{rev}``: regular or lfs, and the old oid."""
        repo = self._writable(request, kind, ns, name)
        head = self._revision(repo, rev)
        files = repo.commits[head].files
        out = []
        for item in request.json().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            mode = self._upload_mode(item["path"], int(item["size"]), sample, files)
            info = {"path": item["path"], "uploadMode": mode, "shouldIgnore": False}
            old = files.get(item["path"])
            if old is not None:  # the client compares it with its own oid to skip no-ops
                info["oid"] = (old.sha256 if isinstance(old, LfsPointer) else git_blob_oid(old))
            out.append(info)
        return _json({"files": out, "commitOid": head})

    def _commit(self, request: _Request, kind: str, ns: str, name: str, rev: str) -> _Response:
        """``POST /api/{type}s/{id}/commit/{rev}``: apply the ndjson operations."""
        repo = self._writable(request, kind, ns, name)
        caller = self._caller(request)
        if request.flag("create_pr"):
            raise HubError(400, "create_pr is not supported by the local Hub")
        try:
            lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        except ValueError as exc:
            raise HubError(400, f"Invalid ndjson body: {exc}") from exc
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Add a line with the key `header` first")
        if rev not in repo.branches:
            self._revision(repo, rev)  # 404 if unknown
            raise HubError(400, f"Can only commit to a branch, not {rev}")
        header, head = lines[0].get("value", {}), repo.branches[rev]
        parent = str(header.get("parentCommit") or "").lower()
        if parent and not head.startswith(parent):
            raise HubError(412, STALE_PARENT)
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            self._apply(files, line.get("key"), line.get("value") or {})
        readme = files.get("README.md")
        if repo.type == "model" and isinstance(readme, bytes) and readme != repo.commits[
                head].files.get("README.md"):
            errors = self._card_errors(readme.decode(errors="replace"))
            if errors:
                raise HubError(400, "Invalid metadata in README.md.\n" + "\n".join(
                    f"- {e}" for e in errors))
        oid = self._new_commit(repo, rev, files, str(header.get("summary", "")),
                               str(header.get("description", "")), caller.user)
        self.commits_made[repo.repo_id] += 1
        url = f"{self.endpoint}/{URL_PREFIX[repo.type]}{repo.repo_id}/commit/{oid}"
        return _json({"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": ""})

    def _apply(self, files: dict[str, Entry], key: Any, value: dict[str, Any]) -> None:
        """Apply one commit operation (file, lfsFile, deletedFile, deletedFolder) to ``files``."""
        if key == "deletedFolder":
            prefix = _check_path(str(value.get("path", "")).rstrip("/")) + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {prefix}",
                               code="EntryNotFound")
            for path in doomed:
                del files[path]
            return
        path = _check_path(value.get("path"))
        if key == "file":
            content = str(value.get("content", ""))
            files[path] = (base64.b64decode(content) if value.get("encoding") == "base64"
                           else content.encode())
        elif key == "lfsFile":
            data = self._objects.get(str(value.get("oid")))
            if data is None or value.get("size", len(data)) != len(data):
                raise HubError(400, "Your push was rejected because an LFS pointer pointed to a "
                               f"file that does not exist. Offending file: - {path}")
            files[path] = LfsPointer(str(value["oid"]), len(data))
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}",
                               code="EntryNotFound")
        else:
            raise HubError(400, f"Unknown commit operation key: {key!r}")

    # -- endpoints: LFS --------------------------------------------------------------------
    def _lfs_batch(self, request: _Request, kind: str | None, ns: str, name: str) -> _Response:
        """``POST /[{type}s/]{id}.git/info/lfs/objects/batch`` (upload only)."""
        repo, body = self._writable(request, kind, ns, name), request.json()
        if body.get("operation") != "upload":
            raise HubError(422, "The local Hub only supports the upload operation")
        git_url = f"{self.endpoint}/{URL_PREFIX[repo.type]}{repo.repo_id}.git"
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            stored = self._objects.get(oid) if isinstance(oid, str) else None
            if not (isinstance(oid, str) and _SHA256.fullmatch(oid) and isinstance(size, int)):
                item["error"] = {"code": 422, "message": "Invalid oid or size"}
            elif stored is not None and len(stored) != size:
                item["error"] = {"code": 422, "message": "Size does not match the stored object"}
            elif stored is None:  # already stored objects get no actions: nothing to send
                item["actions"] = {"upload": {"href": self._put_url(oid, size)},
                                   "verify": {"href": f"{git_url}/info/lfs/objects/verify"}}
            objects.append(item)
        return _json({"transfer": "basic", "objects": objects},
                     content_type="application/vnd.git-lfs+json")

    def _put_url(self, oid: str, size: int) -> str:
        """The pre-signed URL where the client PUTs object ``oid``."""
        return f"{self.endpoint}/lfs-upload/{oid}?size={size}&sig={self._signature(oid, size)}"

    def _signature(self, oid: str, size: int) -> str:
        """The signature of a PUT URL."""
        return hmac.new(self._secret, f"{oid}:{size}".encode(), "sha256").hexdigest()[:32]

    def _lfs_put(self, request: _Request, oid: str) -> _Response:
        """The pre-signed PUT of one object (no Authorization header, as to S3)."""
        size = request.query.get("size", ["-1"])[0]
        if not size.isdigit() or not hmac.compare_digest(
                request.query.get("sig", [""])[0], self._signature(oid, int(size))):
            raise HubError(403, "SignatureDoesNotMatch")
        body = request.body
        if len(body) != int(size) or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "The uploaded content does not match its sha256 and size")
        self._objects[oid] = body
        etag = hashlib.md5(body, usedforsecurity=False).hexdigest()  # as S3 answers
        return _Response(200, b"", {"ETag": f'"{etag}"'})

    def _lfs_verify(self, request: _Request, kind: str | None, ns: str, name: str) -> _Response:
        """``POST /[{type}s/]{id}.git/info/lfs/objects/verify``."""
        self._writable(request, kind, ns, name)
        body = request.json()
        stored = self._objects.get(str(body.get("oid")))
        if stored is None or len(stored) != body.get("size"):
            raise HubError(404, "Object not found")
        return _json({}, content_type="application/vnd.git-lfs+json")

    # -- endpoints: model card -------------------------------------------------------------
    def _card_errors(self, readme: str) -> list[str]:
        """The metadata errors of a README."""
        try:
            meta = card_metadata(readme)
        except ValueError as exc:
            return [str(exc)]
        return validate_card_metadata(meta or {}, self.licenses)

    def _validate_yaml(self, request: _Request) -> _Response:
        """``POST /api/validate-yaml``: always JSON, ``{"errors": [...], "warnings": [...]}``."""
        self._caller(request)  # an unknown token is 401, a missing one is fine
        body = request.json()
        content = str(body.get("content", ""))
        if body.get("repoType", "model") != "model":
            errors: list[str] = []
        else:
            errors = self._card_errors(content)
        try:
            empty = not card_metadata(content)
        except ValueError:
            empty = False
        warnings = ([{"message": "Empty or missing yaml metadata in repo card"}]
                    if empty else [])
        return _json({"errors": [{"message": e} for e in errors], "warnings": warnings},
                     400 if errors else 200)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.hub_server``: serve a local Hub to try ``make push`` offline."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m tests.hub_server", description=main.__doc__)
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1")
    parser.add_argument("--user", default="alice", help="the token's user (its namespace)")
    parser.add_argument("--token", default="hf_local_write_token", help="a write token")
    args = parser.parse_args(argv)
    with HubServer() as hub:
        hub.stop()
        hub.start(args.port)
        hub.add_token(args.token, user=args.user, role="write")
        print(f"HF_ENDPOINT={hub.endpoint} HF_TOKEN={args.token} (user {args.user}); "
              "Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
