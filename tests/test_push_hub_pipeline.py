"""``make push TRAINER=sft`` to the Hub, as a user runs it: the Makefile, DVC, the real client.

One copy of the built demo repo (conftest ``built_repo``, sharing its DVC
cache) has the sft release's three formats pointed at three repos of a local Hub
(tests/hub_server.py) in params.yaml, and is pushed once for the module: the
GGUF alone (``FORMAT=gguf``), then everything; the tests then run the
Makefile's other ways of pushing against that state, each leaving it up to
date.  ``make`` gets the client's environment (``HF_ENDPOINT`` = the server,
``HF_HUB_DISABLE_XET=1``, a token carrying ``MARKER``, no ``HF_HUB_OFFLINE``:
the Makefile exports ``HF_HUB_OFFLINE=1`` itself, and unsets it for the push
only).  What ran is read from DVC's output, what was published from the
server's state and counters and the receipts ``build/sft/push-<format>.json``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hub_server import HubServer, LfsPointer
from tests.pipeline import CACHED, RAN, copy_repo, run, set_param

# Random, so that no file holds it unless a run wrote it (these sources are copied too).
MARKER = f"hf_MARKER{secrets.token_hex(6)}"
TOKEN = f"{MARKER}_write_alice"
REPO_ID = "alice/pirate-sft-GGUF"
TARGET = {"kind": "hub", "repo_id": REPO_ID, "private": True}
ADAPTER_REPO = "alice/pirate-sft-LoRA"
ADAPTER_TARGET = {"kind": "hub", "repo_id": ADAPTER_REPO, "private": True}
MERGED_REPO = "alice/pirate-sft"
MERGED_TARGET = {"kind": "hub", "repo_id": MERGED_REPO, "private": True}
OTHER_REPOS = {"adapter": ADAPTER_REPO, "merged": MERGED_REPO}
REGULAR = ("Modelfile", "README.md", "manifest.json")  # sent inside the commit, not by LFS


@dataclass
class Published:
    """The clone, the server it publishes to, and every output captured so far."""

    repo: Path
    hub: HubServer
    home: Path  # HF_HOME
    first: subprocess.CompletedProcess | None = None  # the module's first `make push` (gguf)
    second: subprocess.CompletedProcess | None = None  # then a plain one: the other formats
    first_lfs: int = 0  # LFS bytes the server received from the first push
    outputs: list[str] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
        return env | {"HF_ENDPOINT": self.hub.endpoint, "HF_HUB_DISABLE_XET": "1",
                      "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(self.home),
                      "HF_TOKEN": TOKEN} | extra

    def run(self, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``cmd`` in the clone; fails on a non-zero exit or the token in the output."""
        res = subprocess.run(cmd, cwd=self.repo, env=env or self.env(), capture_output=True,
                             text=True, timeout=600)
        self.outputs.append(res.stdout + res.stderr)
        assert MARKER not in res.stdout + res.stderr, f"the token is in the output of {cmd}"
        assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout[-4000:]}\n" \
                                    f"{res.stderr[-4000:]}"
        return res

    def make_push(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("make", "push", "TRAINER=sft", *args)

    def receipt(self, fmt: str = "gguf") -> dict:
        """The receipt's one format."""
        formats = json.loads((self.repo / f"build/sft/push-{fmt}.json").read_text())["formats"]
        assert [f["format"] for f in formats] == [fmt]
        return formats[0]

    def manifest(self, fmt: str = "gguf") -> dict:
        return json.loads((self.repo / f"build/sft/{fmt}/manifest.json").read_text())

    def size(self, name: str) -> int:
        return (self.repo / "build/sft/gguf" / name).stat().st_size


def stages_ran(res: subprocess.CompletedProcess) -> set[str]:
    """The DVC stages a command ran, or restored from the run-cache (another test of the
    session may have run the same stage with the same inputs in a copy sharing the cache)."""
    text = res.stdout + res.stderr
    return set(RAN.findall(text)) | set(CACHED.findall(text))


def regular_bytes(hub: HubServer, names: list[str]) -> int:
    """Bytes of the files among ``names`` the repo stores in git (sent in the commit)."""
    files = hub.files(REPO_ID)
    return sum(len(files[n]) for n in names if not isinstance(files[n], LfsPointer))


@pytest.fixture(scope="module")
def published(built_repo: Path, module_tmp
              ) -> Iterator[Published]:
    """A copy of the built demo with the sft release pointed at a local Hub, pushed once."""
    tmp = module_tmp("push_hub")
    repo = copy_repo(built_repo, tmp / "repo", cache_from=built_repo)
    with HubServer() as hub:
        hub.add_token(TOKEN, user="alice", role="write")
        (tmp / "hf_home").mkdir()
        set_param(repo, "trainers.sft.release.gguf.target", TARGET)
        set_param(repo, "trainers.sft.release.adapter.target", ADAPTER_TARGET)
        set_param(repo, "trainers.sft.release.merged.target", MERGED_TARGET)
        state = Published(repo, hub, tmp / "hf_home")
        state.first = state.make_push("FORMAT=gguf")
        state.first_lfs = hub.lfs_bytes_received
        state.second = state.make_push()
        yield state
    assert hub.requests["unrouted"] == 0, [e for e in hub.log if e[2] == 404]


def test_make_push_publishes_the_release_to_the_hub(published: Published) -> None:
    """Pointing sft at the Hub changes ``trainers.sft``, which convert@sft and card@sft take
    whole (convert for the optional chat_template / eos_token, the card for name, license,
    tags): both rerun, and push@sft.  convert@sft writes the same full.gguf (the target is not
    in it), so DVC reruns nothing below it: no reference, quantize or evaluate."""
    hub, first = published.hub, published.first
    assert first is not None
    assert stages_ran(first) == {"convert@sft", "card@sft", "push@sft-gguf"}
    assert "gguf -> hub alice/pirate-sft-GGUF: ok (token of alice, write)" in first.stderr
    assert "adapter -> hub" not in first.stderr
    assert hub.commits_made[REPO_ID] == 1 and hub.is_private(REPO_ID)
    files = hub.files(REPO_ID)
    listed = {e["path"].removeprefix("gguf/"): e["sha256"]
              for e in published.manifest()["artifacts"]}
    assert set(files) == set(listed) | {"manifest.json", ".gitattributes"}
    assert {name: hub.file_sha256(REPO_ID, name) for name in listed} == listed
    assert files["manifest.json"] == (published.repo / "build/sft/gguf/manifest.json").read_bytes()
    pushed = published.receipt()
    names = [*sorted(listed), "manifest.json"]
    assert pushed["uploaded"] == names and pushed["skipped"] == pushed["deleted"] == []
    assert pushed["commit"] == hub.commits(REPO_ID)[0].oid
    assert pushed["bytes_uploaded"] == published.first_lfs + regular_bytes(hub, names)
    assert pushed["bytes_uploaded"] == sum(published.size(n) for n in names)
    # kto's release is untouched: still the local folder
    assert json.loads((published.repo / "build/kto/push-gguf.json").read_text())["formats"][0][
        "kind"] == "local"


def test_a_plain_push_after_format_gguf_pushes_the_other_formats_to_their_own_repos(
        published: Published) -> None:
    """The second ``make push`` builds and pushes what FORMAT=gguf left: the adapter and
    the merged weights, each in its repo, exactly its manifest's files; the GGUF repo is
    not touched again.  The three cards link each other, with the Hub's lineage: the
    adapter an adapter of the base, the merged repo a fine-tune of it, the GGUF repo a
    quantization of the merged repo."""
    hub, second = published.hub, published.second
    assert second is not None
    assert stages_ran(second) == {"adapter@sft", "merged@sft", "push@sft-adapter",
                                  "push@sft-merged"}
    assert hub.commits_made[REPO_ID] == 1
    for fmt, repo in OTHER_REPOS.items():
        assert hub.commits_made[repo] == 1 and hub.is_private(repo)
        listed = {e["path"].removeprefix(f"{fmt}/"): e["sha256"]
                  for e in published.manifest(fmt)["artifacts"]}
        assert set(hub.files(repo)) == set(listed) | {"manifest.json", ".gitattributes"}
        assert {name: hub.file_sha256(repo, name) for name in listed} == listed
        assert published.receipt(fmt)["commit"] == hub.commits(repo)[0].oid
    adapter_files = hub.files(ADAPTER_REPO)
    assert "training_args.bin" not in adapter_files and "adapter_model.safetensors" in \
        adapter_files
    assert "model-00001-of-00001.safetensors" in hub.files(MERGED_REPO)
    cards = {repo: hub.files(repo)["README.md"].decode()
             for repo in (REPO_ID, ADAPTER_REPO, MERGED_REPO)}
    for repo, card in cards.items():  # each card links the two other repos
        assert {r for r in cards if f"(https://huggingface.co/{r})" in card} == \
            set(cards) - {repo}, repo
    assert "base_model_relation: adapter" in cards[ADAPTER_REPO]
    assert f'PeftModel.from_pretrained(base, "{ADAPTER_REPO}")' in cards[ADAPTER_REPO]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\nbase_model_relation: finetune" \
        in cards[MERGED_REPO]
    assert f'AutoModelForCausalLM.from_pretrained("{MERGED_REPO}"' in cards[MERGED_REPO]
    assert f"base_model: {MERGED_REPO}\nbase_model_relation: quantized" in cards[REPO_ID]


def test_make_push_force_reruns_only_push_and_sends_nothing(published: Published) -> None:
    hub = published.hub
    commits, lfs, puts = hub.commits_made[REPO_ID], hub.lfs_bytes_received, hub.requests[
        "lfs_put"]
    before = published.receipt()
    res = published.make_push("FORCE=1")
    for fmt in ("adapter", "merged", "gguf"):
        assert f"FORCE=1: push@sft-{fmt} was up to date; re-planning against the target" \
            in res.stdout
    assert stages_ran(res) == {"push@sft-adapter", "push@sft-merged", "push@sft-gguf"}
    for fmt, repo in OTHER_REPOS.items():
        assert published.receipt(fmt)["bytes_uploaded"] == 0
        assert hub.commits_made[repo] == 1
    pushed = published.receipt()
    assert pushed["bytes_uploaded"] == 0 and pushed["uploaded"] == pushed["deleted"] == []
    assert set(pushed["skipped"]) == set(before["uploaded"]) | set(before["skipped"])
    assert pushed["commit"] == before["commit"] == hub.commits(REPO_ID)[0].oid
    assert hub.commits_made[REPO_ID] == commits
    assert (hub.lfs_bytes_received, hub.requests["lfs_put"]) == (lfs, puts)


def test_make_push_dry_run_prints_the_plan_and_runs_no_stage(published: Published) -> None:
    """With a params change pending: the plan is for what is built, and the build is out of
    date; nothing is built, pushed or recorded."""
    params = published.repo / "params.yaml"
    text, lock = params.read_text(), (published.repo / "dvc.lock").read_text()
    receipt = (published.repo / "build/sft/push-gguf.json").read_text()
    hub = published.hub
    commits, requests = hub.commits(REPO_ID), sum(hub.requests.values())
    sent = (hub.requests["preupload"], hub.requests["lfs_put"], hub.requests["commit"])
    set_param(published.repo, "trainers.sft.tags", ["pirate", "sft", "lora", "changed"])
    try:
        res = published.make_push("DRY_RUN=1")
    finally:
        params.write_text(text)
    name = published.manifest()["name"]
    assert f"gguf -> hub {REPO_ID}:\n" in res.stdout
    assert re.search(rf"^  skip   {re.escape(name)}-Q8_0\.gguf  ", res.stdout, re.M)
    assert "  0 to upload (0 B), 7 unchanged, 0 to delete" in res.stdout
    assert "note: the build of sft is out of date" in res.stdout
    assert stages_ran(res) == set()
    assert (published.repo / "dvc.lock").read_text() == lock
    assert (published.repo / "build/sft/push-gguf.json").read_text() == receipt
    assert hub.commits(REPO_ID) == commits
    assert (hub.requests["preupload"], hub.requests["lfs_put"], hub.requests["commit"]) == sent
    assert sum(hub.requests.values()) > requests  # the plan was made against the Hub


def test_changing_one_level_uploads_only_that_gguf_and_what_lists_it(
        published: Published) -> None:
    hub = published.hub
    commits, lfs = hub.commits_made[REPO_ID], hub.lfs_bytes_received
    set_param(published.repo, "quantize.levels.Q5_K_M", {"pure": True})
    res = published.make_push()
    assert stages_ran(res) == {"quantize@sft-Q5_K_M", "evaluate@sft-Q5_K_M", "card@sft",
                               "push@sft-gguf"}
    name = published.manifest()["name"]
    gguf = f"{name}-Q5_K_M.gguf"
    pushed = published.receipt()
    # The card lists every file's sha256 and the plot every level's KLD; the Modelfile
    # names Q4_K_M (the ollama_level), so it stays.
    assert pushed["uploaded"] == ["README.md", gguf, "quality.png", "manifest.json"]
    assert pushed["deleted"] == []
    assert hub.commits_made[REPO_ID] == commits + 1
    assert hub.lfs_bytes_received - lfs == published.size(gguf) + published.size("quality.png")
    assert pushed["bytes_uploaded"] == (hub.lfs_bytes_received - lfs
                                        + regular_bytes(hub, ["README.md", "manifest.json"]))
    assert hub.file_sha256(REPO_ID, gguf) == next(
        e["sha256"] for e in published.manifest()["artifacts"] if e["path"] == f"gguf/{gguf}")


def makefile_exports(repo: Path) -> dict[str, str]:
    """The variables the Makefile exports to every recipe (``export NAME := value``)."""
    text = (repo / "Makefile").read_text()
    return dict(re.findall(r"^export (\w+) := (.*)$", text, re.M))


def test_stages_other_than_push_make_no_http_request(published: Published) -> None:
    """convert (huggingface_hub and transformers' tokenizer code), card (Hub metadata
    rules), adapter and merged (peft), forced to run with HF_ENDPOINT at a fresh server
    and the Makefile's environment (HF_HUB_OFFLINE=1): the server sees no request at all."""
    exports = makefile_exports(published.repo)
    assert exports["HF_HUB_OFFLINE"] == "1"
    with HubServer() as silent:
        silent.add_token(TOKEN, user="alice", role="write")
        env = published.env(HF_ENDPOINT=silent.endpoint, **exports)
        res = published.run(".venv/bin/dvc", "repro", "--force", "--single-item", "convert@sft",
                            "card@sft", "adapter@sft", "merged@sft", env=env)
        assert stages_ran(res) == {"convert@sft", "card@sft", "adapter@sft", "merged@sft"}
        assert silent.log == [] and sum(silent.requests.values()) == 0
    status = run([str(published.repo / ".venv/bin/dvc"), "status", "--json", "push@sft-gguf",
                  "push@sft-adapter", "push@sft-merged"], cwd=published.repo).stdout
    assert json.loads(status.strip() or "{}") == {}, "forced stages must rebuild the same bytes"


def test_the_token_is_in_no_file_of_the_clone_and_no_output(published: Published,
                                                          built_repo: Path) -> None:
    assert published.outputs and all(MARKER not in out for out in published.outputs)
    scanned, holding = set(), []
    roots = [published.repo, published.home, built_repo / ".dvc/cache/runs"]
    for root in roots:
        for folder, dirs, files in os.walk(root):  # not into .venv (a link to the checkout's)
            dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
            for name in files:
                path = Path(folder) / name
                if path.is_symlink():
                    continue
                scanned.add(path)
                if MARKER.encode() in path.read_bytes():
                    holding.append(path)
    assert not holding, f"the token is written in {holding}"
    for must in ("dvc.lock", ".dvc/config", ".dvc/config.local", "build/sft/push-gguf.json",
                 "build/sft/push-adapter.json", "build/sft/adapter/README.md",
                 "build/sft/push-merged.json", "build/sft/merged/README.md",
                 "build/sft/gguf/README.md", "params.yaml"):
        assert published.repo / must in scanned, must
