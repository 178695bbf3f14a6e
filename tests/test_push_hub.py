"""Publishing to the Hub: ``python -m stages.push`` against the local Hub (tests/hub_server.py).

The release is the golden one (``tests.test_card_golden.render``: README.md,
Modelfile, three tiny GGUFs, quality.png, manifest.json) with its target set to
``{kind: hub, repo_id: alice/golden, private: true}``; variants re-render it
with one level's GGUF changed or one level removed.  Every push is a
subprocess started from this checkout (the receipt records its git commit)
with the client's own environment: the suite exports ``HF_HUB_OFFLINE=1``,
which huggingface_hub reads at import, so it is removed there and
``HF_ENDPOINT`` points at a server started per test.  Nothing is
monkeypatched: what the client did is read from the server's state and
counters, the receipt and the command's output.

Every token carries ``MARKER``: no captured output and no file under the test's
folders may contain it (checked after every run and at the end of every test).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from stages.core.preflight import human_size
from tests.hub_server import HubServer, LfsPointer
from tests.test_card_golden import QUANT, RUN_DIR, render

REPO = Path(__file__).resolve().parent.parent
# Random, so that no file holds it unless a run wrote it (these sources are copied too).
MARKER = f"hf_MARKER{secrets.token_hex(6)}"
WRITE = f"{MARKER}_write_alice"
READ = f"{MARKER}_read_alice"
REPO_ID = "alice/golden"
NAME = "SmolLM2-135M-Instruct-golden-sft"
GGUF = {level: f"{NAME}-{level}.gguf" for level in ("Q4_K_M", "Q5_K_M", "Q8_0")}
DATASET = "HuggingFaceH4/ultrachat_200k"  # a Hub dataset id, which the card may list
REGULAR = ("Modelfile", "README.md", "manifest.json")  # sent inside the commit, not by LFS
# A scenario runs the client several times (re-pushes, retries with their waits, resumes):
# end to end, so `make test` runs it and the unit tier keeps one push and the preflights.
SCENARIO = pytest.mark.slow


# --- the releases -------------------------------------------------------------------------


def set_target(params: Path, **target: object) -> None:
    """Point the sft trainer's gguf release at ``target`` (a Hub target by default)."""
    data = yaml.safe_load(params.read_text())
    data["trainers"]["sft"]["release"]["gguf"]["target"] = {
        "kind": "hub", "repo_id": REPO_ID, "private": True, **target}
    params.write_text(yaml.safe_dump(data, sort_keys=False))


def hub_release(root: Path) -> None:
    """The change every release here gets: a Hub target, and a Hub dataset id in the lineage
    (the card must list only Hub ids; the fixture's dataset is a file, ``sft.jsonl``)."""
    set_target(root / "params.yaml")
    path = root / RUN_DIR / "training_lineage.json"
    lineage = json.loads(path.read_text())
    lineage["dataset"]["hub_id"] = DATASET
    path.write_text(json.dumps(lineage, indent=2))


def requantized_q5(root: Path) -> None:
    """Q5_K_M quantized again: one weight differs (same size; the card hashes it)."""
    from gguf import GGUFReader

    hub_release(root)
    gguf = root / QUANT / "Q5_K_M.gguf"
    reader = GGUFReader(gguf, "r+")
    reader.tensors[0].data[0, 0] += 1.0
    reader.data.flush()
    del reader


def without_q8(root: Path) -> None:
    """Q8_0 dropped from the levels (and its KL divergence threshold)."""
    hub_release(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    del params["quantize"]["levels"]["Q8_0"]
    params["evaluate"]["max_kld"].pop("Q8_0", None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass(frozen=True)
class Release:
    """A rendered release: its params and ``build/sft`` folder."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def build(self) -> Path:
        return self.root / "build/sft"

    @property
    def folder(self) -> Path:
        return self.build / "gguf"

    def manifest(self) -> dict:
        return json.loads((self.folder / "manifest.json").read_text())

    def files(self) -> dict[str, str]:
        """name -> sha256 of every published file, manifest.json included."""
        listed = {e["path"].removeprefix("gguf/"): e["sha256"]
                  for e in self.manifest()["artifacts"]}
        return listed | {"manifest.json": hashlib.sha256(
            (self.folder / "manifest.json").read_bytes()).hexdigest()}

    def size(self, name: str) -> int:
        return (self.folder / name).stat().st_size

    def with_target(self, tmp: Path, **target: object) -> Path:
        """A copy of the params with other target settings (the build is the same)."""
        params = tmp / f"params-{len(list(tmp.glob('params-*')))}.yaml"
        params.write_text(self.params.read_text())
        set_target(params, **target)
        return params


_RENDERS: dict[str, Callable[[Path], None]] = {
    "release": hub_release, "requantized": requantized_q5, "without_q8": without_q8}


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Release]]:
    """Each variant rendered once for the module, when first asked for."""
    done: dict[str, Release] = {}

    def get(name: str) -> Release:
        if name not in done:
            done[name] = Release(tmp_path_factory.mktemp(name))
            render(done[name].root, change=_RENDERS[name])
        return done[name]

    yield get
    for release in done.values():
        assert_no_marker(release.root)


@pytest.fixture
def release(renders) -> Release:
    return renders("release")


# --- the client and the server ------------------------------------------------------------


def assert_no_marker(folder: Path) -> None:
    """No file under ``folder`` holds the token marker."""
    holding = [p for p in folder.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]
    assert not holding, f"the token is written in {holding}"


@dataclass
class Pusher:
    """Runs ``python -m stages.push`` as a user would, against ``hub``."""

    hub: HubServer
    tmp: Path
    outputs: list[str] = field(default_factory=list)

    @property
    def receipt(self) -> Path:
        return self.tmp / "push.json"

    def env(self, token: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
        env.update(HF_ENDPOINT=self.hub.endpoint, HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(self.tmp / "hf_home"),
                   PYTHONPATH=str(REPO))
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def run(self, *args: str, token: str | None = WRITE,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "stages.push", "--trainer", "sft", *args],
                             cwd=cwd, env=self.env(token), capture_output=True, text=True,
                             timeout=120)
        self.outputs.append(res.stdout + res.stderr)
        assert MARKER not in res.stdout + res.stderr, "the token is in the output"
        return res

    def push(self, release: Release, *args: str, params: Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        """Push ``release`` (its own params unless ``params``) and write the receipt."""
        self.receipt.unlink(missing_ok=True)
        res = self.run("--params", str(params or release.params), "--build", str(release.build),
                       "--receipt", str(self.receipt), *args)
        if check:
            assert res.returncode == 0, res.stdout + res.stderr
        return res

    def preflight(self, params: Path, token: str | None = WRITE) -> subprocess.CompletedProcess:
        # From a folder without .env: the token is then HF_TOKEN or nothing.
        return self.run("--preflight", "--params", str(params), token=token, cwd=self.tmp)

    def pushed(self) -> dict:
        """The receipt's one format."""
        formats = json.loads(self.receipt.read_text())["formats"]
        assert len(formats) == 1
        return formats[0]


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A fresh server knowing alice (a write and a read token), who may write to alice/."""
    with HubServer() as server:
        server.add_token(WRITE, user="alice", role="write")
        server.add_token(READ, user="alice", role="read")
        yield server
    assert server.requests["unrouted"] == 0, [e for e in server.log if e[2] == 404]


@pytest.fixture
def client(hub: HubServer, tmp_path: Path) -> Iterator[Pusher]:
    pusher = Pusher(hub, tmp_path)
    (tmp_path / "hf_home").mkdir()
    yield pusher
    assert_no_marker(tmp_path)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line a failed command printed (last, no traceback)."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], res.stderr
    return errors[0]


def holds_exactly(hub: HubServer, release: Release, *, extra: dict[str, bytes] | None = None
                  ) -> None:
    """The repo holds the release's files with their sha256, the Hub's .gitattributes and
    ``extra`` files, nothing else."""
    files = hub.files(REPO_ID)
    expected = {**release.files(), **{name: hashlib.sha256(data).hexdigest()
                                      for name, data in (extra or {}).items()}}
    assert set(files) == set(expected) | {".gitattributes"}
    assert {name: hub.file_sha256(REPO_ID, name) for name in expected} == expected
    assert files["manifest.json"] == (release.folder / "manifest.json").read_bytes()


def regular_bytes(hub: HubServer, names: list[str]) -> int:
    """Bytes of the files among ``names`` that the repo stores in git (sent in the commit)."""
    files = hub.files(REPO_ID)
    return sum(len(files[n]) for n in names if not isinstance(files[n], LfsPointer))


# --- tests --------------------------------------------------------------------------------


def test_the_rendered_release_is_one_the_hub_takes(release: Release) -> None:
    """The inputs these tests push: seven files, and the card lists only Hub dataset ids."""
    assert set(release.files()) == {*GGUF.values(), "Modelfile", "README.md", "quality.png",
                                    "manifest.json"}
    card = (release.folder / "README.md").read_text()
    datasets = yaml.safe_load(card.split("---\n")[1]).get("datasets", [])
    assert datasets == [DATASET]


def test_first_push_uploads_every_file_in_one_commit(hub: HubServer, client: Pusher,
                                                     release: Release) -> None:
    res = client.push(release)
    assert "created private repo alice/golden" in res.stderr
    assert hub.commits_made[REPO_ID] == 1 and len(hub.commits(REPO_ID)) == 2  # + initial commit
    assert hub.is_private(REPO_ID)
    holds_exactly(hub, release)
    head = hub.commits(REPO_ID)[0]
    pushed = client.pushed()
    everything = [*sorted(set(release.files()) - {"manifest.json"}), "manifest.json"]
    assert pushed == {
        "format": "gguf", "kind": "hub", "target": REPO_ID, "revision": "main",
        "commit": head.oid, "url": f"{hub.endpoint}/{REPO_ID}/commit/{head.oid}",
        "uploaded": everything, "skipped": [], "deleted": [], "tag": None,
        "bytes_uploaded": pushed["bytes_uploaded"]}
    # What the server received: the LFS objects, and the regular files inside the commit.
    assert hub.lfs_bytes_received == sum(release.size(n) for n in everything if n not in REGULAR)
    assert pushed["bytes_uploaded"] == hub.lfs_bytes_received + regular_bytes(hub, everything)
    assert pushed["bytes_uploaded"] == sum(release.size(n) for n in everything)
    git_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    receipt = json.loads(client.receipt.read_text())
    assert receipt["git_commit"] in (git_head, f"{git_head}-dirty")
    manifest_sha = release.files()["manifest.json"]
    assert head.title == f"Release {NAME}: manifest sha256 {manifest_sha}, llm-release " \
                         f"{receipt['git_commit']}"


@SCENARIO
def test_pushing_the_same_release_again_sends_nothing(hub: HubServer, client: Pusher,
                                                      release: Release) -> None:
    client.push(release)
    first, lfs, puts = client.pushed(), hub.lfs_bytes_received, hub.requests["lfs_put"]
    res = client.push(release)
    again = client.pushed()
    assert "already holds this release; no commit" in res.stderr
    assert hub.commits_made[REPO_ID] == 1
    assert (hub.lfs_bytes_received, hub.requests["lfs_put"]) == (lfs, puts)
    assert hub.requests["preupload"] == 1  # nothing was offered for upload the second time
    assert again["bytes_uploaded"] == 0
    assert again["uploaded"] == [] and again["deleted"] == []
    assert again["skipped"] == first["uploaded"]
    assert again["commit"] == first["commit"] == hub.commits(REPO_ID)[0].oid
    holds_exactly(hub, release)


@SCENARIO
def test_a_changed_level_uploads_only_it_and_what_lists_it(hub: HubServer, client: Pusher,
                                                          renders) -> None:
    """Q5_K_M quantized again: its GGUF, the card (its sha256 table) and the manifest."""
    client.push(renders("release"))
    lfs = hub.lfs_bytes_received
    changed = renders("requantized")
    client.push(changed)
    pushed = client.pushed()
    assert pushed["uploaded"] == ["README.md", GGUF["Q5_K_M"], "manifest.json"]
    assert pushed["deleted"] == []
    assert hub.commits_made[REPO_ID] == 2
    assert hub.lfs_bytes_received - lfs == changed.size(GGUF["Q5_K_M"])
    assert pushed["bytes_uploaded"] == (changed.size(GGUF["Q5_K_M"])
                                        + regular_bytes(hub, ["README.md", "manifest.json"]))
    holds_exactly(hub, changed)


@SCENARIO
def test_a_removed_level_is_deleted_and_files_a_person_added_are_kept(
        hub: HubServer, client: Pusher, renders) -> None:
    notes = {"NOTES.md": b"written by a person on the Hub\n"}
    hub.seed_repo(REPO_ID, notes, private=True)  # before our first push
    attributes = hub.files(REPO_ID)[".gitattributes"]
    client.push(renders("release"))
    extra_gguf = {f"{NAME}-IQ2_XS.gguf": b"GGUF" + b"\1" * 4096}  # a person's, after our push
    hub.seed_repo(REPO_ID, extra_gguf)
    smaller = renders("without_q8")
    client.push(smaller)
    pushed = client.pushed()
    assert pushed["deleted"] == [GGUF["Q8_0"]]
    assert pushed["uploaded"] == ["README.md", "quality.png", "manifest.json"]
    assert hub.commits_made[REPO_ID] == 2
    holds_exactly(hub, smaller, extra=notes | extra_gguf)
    assert hub.files(REPO_ID)[".gitattributes"] == attributes


@SCENARIO
def test_dry_run_prints_the_plan_and_changes_nothing(hub: HubServer, client: Pusher,
                                                     renders) -> None:
    release = renders("release")
    res = client.push(release, "--dry-run")
    assert not hub.repo_exists(REPO_ID), "a dry run must not create the repo"
    assert f"  upload {GGUF['Q8_0']}  " in res.stdout
    total = human_size(sum(release.size(n) for n in release.files()))
    assert f"  7 to upload ({total}), 0 unchanged, 0 to delete" in res.stdout
    client.push(release)
    commits, lfs = hub.commits(REPO_ID), hub.lfs_bytes_received
    res = client.push(renders("without_q8"), "--dry-run")
    lines = res.stdout.splitlines()
    assert lines[0] == f"gguf -> hub {REPO_ID}:"
    actions = {line.split()[1]: line.split()[0] for line in lines[1:-1]}
    assert actions == {"Modelfile": "skip", "README.md": "upload", GGUF["Q4_K_M"]: "skip",
                       GGUF["Q5_K_M"]: "skip", "quality.png": "upload",
                       "manifest.json": "upload", GGUF["Q8_0"]: "delete"}
    assert lines[-1].startswith("  3 to upload (") and lines[-1].endswith(
        ", 3 unchanged, 1 to delete")
    assert not client.receipt.exists()
    assert hub.commits(REPO_ID) == commits and hub.lfs_bytes_received == lfs
    assert hub.requests["preupload"] == 1


def test_preflight_passes_with_a_write_token_and_writes_nothing(hub: HubServer, client: Pusher,
                                                                release: Release) -> None:
    res = client.preflight(release.params)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[-1] == "gguf -> hub alice/golden: ok (token of alice, write)"
    assert hub.requests["whoami"] == 1 and hub.requests["auth_check"] == 1
    assert not hub.repo_exists(REPO_ID) and hub.requests["create_repo"] == 0


PREFLIGHT_FAILURES: dict[str, str] = {  # case -> the start of its error line
    "read-only token": "error: the token of `alice` is read-only; create a write token",
    "no token": "error: no Hugging Face token: set HF_TOKEN",
    "repo id params refuse": "error: params: `trainers.sft.release.gguf.target.repo_id` must be "
                             "a Hub repo id",
    "repo id the Hub refuses": "error: `alice/golden--v2` is not a valid Hub repo id",
    "unknown namespace": "error: `carol/golden` does not exist and the token of `alice` cannot "
                         "create it: `carol` is neither that user nor one of its orgs",
    "bad license": "error: params: `trainers.sft.license`",
}


@pytest.mark.parametrize(("case", "expected"), PREFLIGHT_FAILURES.items(),
                         ids=list(PREFLIGHT_FAILURES))
def test_preflight_fails_in_seconds_naming_the_fix(hub: HubServer, client: Pusher,
                                                   release: Release, case: str,
                                                   expected: str) -> None:
    token = {"read-only token": READ, "no token": None}.get(case, WRITE)
    repo_id = {"repo id params refuse": "alice golden", "repo id the Hub refuses":
               "alice/golden--v2", "unknown namespace": "carol/golden"}.get(case, REPO_ID)
    params = release.with_target(client.tmp, repo_id=repo_id)
    if case == "bad license":
        params.write_text(params.read_text().replace("license: apache-2.0", "license: apache-2"))
    start = time.monotonic()
    res = client.preflight(params, token=token)
    seconds = time.monotonic() - start
    line = error_line(res)
    assert line.startswith(expected), line
    assert seconds < 10, f"the preflight took {seconds:.1f} s to fail"
    assert not hub.repo_exists(REPO_ID) and not hub.repo_exists("carol/golden")
    assert hub.requests["create_repo"] == 0 and sum(hub.commits_made.values()) == 0


@SCENARIO
def test_an_unreachable_hub_fails_after_retries_naming_the_endpoint(
        client: Pusher, release: Release) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = client.env(WRITE) | {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    res = subprocess.run([sys.executable, "-m", "stages.push", "--trainer", "sft", "--preflight",
                          "--params", str(release.params)], cwd=client.tmp, env=env,
                         capture_output=True, text=True, timeout=120)
    line = error_line(res)
    assert f"cannot reach http://127.0.0.1:{port}" in line and "HF_ENDPOINT" in line, line
    assert res.stderr.count("trying again") == 3, res.stderr


@SCENARIO
def test_a_commit_refused_with_429_then_500_is_retried_into_one_commit(
        hub: HubServer, client: Pusher, release: Release) -> None:
    hub.fail("commit", status=429, times=1, retry_after=0)
    hub.fail("commit", status=500, times=1)
    res = client.push(release)
    assert [status for _, path, status in hub.log if "/commit/" in path] == [429, 500, 200]
    assert "trying again" in res.stderr
    assert hub.commits_made[REPO_ID] == 1 and len(hub.commits(REPO_ID)) == 2
    assert client.pushed()["commit"] == hub.commits(REPO_ID)[0].oid
    holds_exactly(hub, release)


@SCENARIO
def test_a_push_failing_mid_upload_resumes_without_sending_anything_twice(
        hub: HubServer, client: Pusher, release: Release) -> None:
    """The largest GGUF's PUT fails for the whole first run (403, as S3 answers an expired
    URL; a 5xx would first be retried by the client for ~23 s, to the same end)."""
    big = GGUF["Q8_0"]
    sha = release.files()[big]
    hub.fail_lfs_put(sha256=sha, times=1, status=403)  # the client does not retry a 403
    line = error_line(client.push(release, check=False))
    assert big in line and "push again" in line
    assert set(hub.files(REPO_ID)) == {".gitattributes"}  # no card, no manifest
    assert hub.commits_made[REPO_ID] == 0 and not client.receipt.exists()
    assert sha not in hub.lfs_objects
    others = {release.files()[n] for n in ("quality.png", GGUF["Q4_K_M"], GGUF["Q5_K_M"])}
    assert others <= hub.lfs_objects  # received before the failure
    puts, lfs = hub.requests["lfs_put"], hub.lfs_bytes_received
    client.push(release)
    assert hub.requests["lfs_put"] - puts == 1
    assert hub.lfs_bytes_received - lfs == release.size(big)
    pushed = client.pushed()
    assert pushed["bytes_uploaded"] == release.size(big) + regular_bytes(hub, list(REGULAR))
    assert hub.commits_made[REPO_ID] == 1
    holds_exactly(hub, release)


@pytest.mark.parametrize("rejection", ["injected", "license unknown to the Hub"])
def test_a_card_the_hub_rejects_fails_before_any_upload(tmp_path: Path, release: Release,
                                                        rejection: str) -> None:
    """The card is validated (validate-yaml) before any upload, and the Hub's reason shown."""
    licenses = ("mit", "other") if rejection != "injected" else None  # None: the Hub's list
    with HubServer(licenses=licenses) as hub:
        hub.add_token(WRITE, user="alice", role="write")
        if rejection == "injected":
            hub.reject_validate_yaml("the card needs a widget today")
        (tmp_path / "hf_home").mkdir()
        client = Pusher(hub, tmp_path)
        line = error_line(client.push(release, check=False))
    assert line.startswith(f"error: the Hub rejected the model card of {REPO_ID}")
    assert ("the card needs a widget today" if rejection == "injected"
            else '"license" must be one of [mit, other]') in line
    assert hub.requests["validate_yaml"] == 1
    assert hub.requests["lfs_batch"] == hub.requests["lfs_put"] == 0
    assert hub.lfs_bytes_received == 0 and not hub.lfs_objects
    assert hub.commits_made[REPO_ID] == 0
    assert set(hub.files(REPO_ID)) <= {".gitattributes"}
    assert not client.receipt.exists()
    assert_no_marker(tmp_path)


@SCENARIO
def test_a_tag_pins_the_release(hub: HubServer, client: Pusher, renders, tmp_path: Path) -> None:
    release = renders("release")
    params = release.with_target(tmp_path, tag="v1")
    client.push(release, params=params)
    head = hub.commits(REPO_ID)[0].oid
    assert hub.tags(REPO_ID) == {"v1": head} and client.pushed()["tag"] == "v1"
    client.push(release, params=params)  # the same release again: the tag stays
    assert hub.tags(REPO_ID) == {"v1": head} and client.pushed()["tag"] == "v1"
    assert hub.commits_made[REPO_ID] == 1
    # Another release under the same tag is refused before it commits.
    line = error_line(client.push(renders("requantized"), params=params, check=False))
    assert "tag `v1` of alice/golden already names commit" in line
    assert "change the target's `tag`" in line
    assert hub.commits_made[REPO_ID] == 1 and hub.tags(REPO_ID) == {"v1": head}


@SCENARIO
def test_the_token_is_in_no_output_or_file_even_with_debug(hub: HubServer, client: Pusher,
                                                           release: Release) -> None:
    """--debug shows tracebacks and the HTTP client's logs: still no token."""
    refused = client.run("--debug", "--params", str(release.params), "--build",
                         str(release.build), "--receipt", str(client.tmp / "refused.json"),
                         token=READ)
    assert refused.returncode == 1 and "Traceback" in refused.stderr
    assert "HTTP 403" in refused.stderr
    ok = client.push(release, "--debug")
    assert "DEBUG" in ok.stderr and "HTTP 403" not in ok.stderr
    assert all(MARKER not in out for out in client.outputs) and len(client.outputs) == 2
    assert_no_marker(client.tmp)
    assert MARKER not in client.receipt.read_text()
    assert all(MARKER not in c.title + c.message for c in hub.commits(REPO_ID))
