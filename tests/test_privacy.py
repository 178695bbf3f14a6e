"""What we publish gives nothing away: no path, user or host of the build machine, no secret.

The rules of ``stages.release.privacy`` table-style; then releases rendered from
the golden fixture's inputs (``tests.test_card_golden.render``) with params and a
lineage that hold absolute paths, a home folder, fake secrets and unknown keys:
none of them is published, a secret in a published key stops the card stage
naming the key and the file, one in a dropped key is only a warning, and the
final scan stops a release (text or GGUF metadata) before its folder appears.
Last, in the full suite, the demo's real releases are scanned for this machine's
repository path, home directory, user and host names.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from stages.core.errors import InputError, ParamsError, ReleaseError
from stages.core.hashing import sha256_file
from stages.release import privacy
from stages.release.privacy import Machine
from tests.test_card_golden import BUILD, EVAL, OUT, QUANT, RUN_DIR, render, write_gguf

FAKE_HF = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3f"  # hf_ + 34 letters and digits
FAKE_SK = "sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8"
FAKE_AWS = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example key id
FAKE_WANDB = "0123456789abcdef0123456789abcdef01234567"
LINEAGE = RUN_DIR / "training_lineage.json"
NOBODY = Machine(paths=(), names=())


# --- the rules, table-style --------------------------------------------------------------


@pytest.mark.parametrize(("key", "secret"), [
    ("wandb_api_key", True), ("apiKey", True), ("OPENAI_API_KEY", True), ("hub_token", True),
    ("HF_TOKEN", True), ("access_token", True), ("token", True), ("client_secret", True),
    ("db_password", True), ("passwd", True),
    ("eos_token", False), ("pad_token_id", False), ("max_tokens", False),
    ("max_new_tokens", False), ("token_embedding_type", False), ("tokenizer_name", False),
    ("add_bos_token", False), ("chat_template", False), ("learning_rate", False),
])
def test_a_key_name_says_secret_only_when_it_means_a_credential(key: str, secret: bool) -> None:
    assert privacy.secret_name(key) is secret


@pytest.mark.parametrize(("path", "value", "secret"), [
    ("wandb_api_key", FAKE_WANDB, True),
    ("credentials.secret.value", "x", True),  # under a secret-named key
    ("hub_token", None, False), ("hub_token", "", False), ("use_auth_token", True, False),
    ("hub_token", "<HUB_TOKEN>", False), ("hub_token", "${HF_TOKEN}", False),
    ("notes", f"pushed with {FAKE_HF}", True), ("notes", FAKE_SK, True),
    ("notes", f"key={FAKE_AWS}", True),
    ("notes", "hf_short", False), ("notes", "task-specific-adapter-for-long-names", False),
    ("notes", "AKIAIOSFODNN7EXAMPLEX", False),  # 17 characters after AKIA: not a key id
])
def test_a_value_is_secret_by_its_key_name_or_its_shape(path: str, value: object,
                                                        secret: bool) -> None:
    assert (privacy.secret_kind(path, value) is not None) is secret


@pytest.mark.parametrize(("text", "local"), [
    ("/home/alice/data/uf.jsonl", True), ("~/data", True), ("C:\\Users\\alice", True),
    ("D:/runs", True), ("\\\\server\\share", True), ("file:///srv/x", True),
    ("../dpo_output_4090/20261127_101500/final_model", True), ("data/../../etc", True),
    ("data/eval.txt", False), ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
    ("https://example.com/home/x", False), ("//cdn.example.com/x", False), ("sft.jsonl", False),
])
def test_a_local_path_is_absolute_home_drive_share_file_url_or_climbing(text: str,
                                                                       local: bool) -> None:
    assert privacy.is_local_path(text) is local


@pytest.mark.parametrize(("text", "shown"), [
    ("data/eval.txt", "data/eval.txt"), ("/home/alice/eval/eval.txt", "eval.txt"),
    ("C:\\data\\probes.jsonl", "probes.jsonl"), ("../x/y.txt", "y.txt"), (3, 3)])
def test_a_published_path_is_relative_to_the_repository_or_its_file_name(text: object,
                                                                         shown: object) -> None:
    assert privacy.public_path(text) == shown


ALICE = Machine(paths=("/srv/work/llm-release", "/data/homes/alice"), names=("alice", "gpu-box-7"))


@pytest.mark.parametrize(("text", "found"), [
    ("weights in /home/bob/models", ["the absolute path `/home/bob`"]),
    ('"path": "/root/.cache/x"', ["the absolute path `/root`"]),
    ("see file:///Users/carol/x", ["the absolute path `/Users/carol`"]),
    ('"C:\\\\Users\\\\dan\\\\x"', ["the absolute path `C:\\\\`"]),
    ("built in /srv/work/llm-release/build", ["the local path `/srv/work/llm-release`"]),
    ("cache /data/homes/alice/.cache", ["the local path `/data/homes/alice`",
                                        "the user or host name `alice`"]),
    ("ran on gpu-box-7 tonight", ["the user or host name `gpu-box-7`"]),
    (f"token {FAKE_HF}", ["a Hugging Face token (hf_…)"]),
    (f"aws {FAKE_AWS}", ["an AWS access key id (AKIA…)"]),
    # Not the machine: a web page, a word that contains a name, root as a word, a table cell.
    ("https://example.com/home/bob/page", []),
    ("malice and the root of it; /srv/work/llm-release-2 is another repo", []),
    ("| Q4_K_M | Arr: a:\\| matey |", []),
    ("/rootfs/x and /home", []),
])
def test_the_final_scan_finds_this_machine_and_secrets_but_not_words(text: str,
                                                                    found: list[str]) -> None:
    assert [what for _, what in privacy.scan_text(text, ALICE)] == found
    assert not any(FAKE_HF in what for _, what in privacy.scan_text(text, ALICE))


def test_this_machine_leaves_out_names_that_name_no_one(monkeypatch) -> None:
    monkeypatch.setattr(privacy.getpass, "getuser", lambda: "root")
    monkeypatch.setattr(privacy.socket, "gethostname", lambda: "alice-laptop.example.org")
    machine = privacy.this_machine(Path("/srv/work/llm-release"))
    assert machine.names == ("alice-laptop", "alice-laptop.example.org")
    assert "/srv/work/llm-release" in machine.paths and str(Path.home()) in machine.paths
    monkeypatch.setattr(privacy.socket, "gethostname", lambda: "vm")
    assert privacy.this_machine(Path("/srv/x")).names == ()
    # A name params publish on purpose (the user's Hub namespace) is not looked for.
    monkeypatch.setattr(privacy.getpass, "getuser", lambda: "alice")
    assert privacy.this_machine(Path("/srv/x")).names == ("alice",)
    assert privacy.this_machine(Path("/srv/x"), allowed=["alice/llama-ft"]).names == ()
    assert privacy.this_machine(Path("/srv/x"), allowed=["malice"]).names == ("alice",)


def test_gguf_metadata_we_set_comes_from_params_only() -> None:
    from stages.config.params import load_params
    from stages.llamacpp.convert import gguf_metadata

    trainer = load_params(Path(__file__).resolve().parent.parent / "params.yaml").trainer("sft")
    meta = gguf_metadata(trainer)
    # Left unset, so that the converter does not derive them from folder names.
    assert meta["general.organization"] is None and meta["general.version"] is None
    for path, value in privacy.leaves(meta):
        assert not (isinstance(value, str) and privacy.is_local_path(value)), path


# --- releases rendered from planted inputs ------------------------------------------------


def plant(*, lineage: dict | None = None, params: dict | None = None,
          absolute_adapter: bool = False):
    """A ``render`` change: the run's lineage replaced, params entries of trainer sft set."""
    def change(root: Path) -> None:
        if lineage is not None:
            (root / LINEAGE).write_text(json.dumps(lineage))
        data = yaml.safe_load((root / "params.yaml").read_text())
        data["trainers"]["sft"] |= params or {}
        if absolute_adapter:  # this repository's absolute path, planted in params
            data["trainers"]["sft"]["adapter"] = str(root / RUN_DIR / "final_model")
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return change


PLANTED_LINEAGE = {
    "trainer": "dpo",
    "trainer_library": "trl",
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "output_dir": "/home/alice/projects/x",
    "dataset": {"name": "ultrafeedback", "path": "/home/alice/data/uf.jsonl", "examples": 64},
    "hyperparameters": {"beta": 0.1, "logging_dir": "/home/alice/projects/x/runs",
                        "resume_from_checkpoint": "/home/alice/ckpt/checkpoint-500"},
    "wandb_api_key": FAKE_WANDB,
    "hf_token": FAKE_HF,
    "cluster": {"node": "gpu-alice-01", "scheduler": {"partition": "a100-private"}},
}
PLANTED_PARAMS = {
    "output_root": "/home/alice/dpo_output_4090",
    "base_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "path": "/home/alice/models/SmolLM2-135M-Instruct"},
    "release": {"gguf": {"ollama_level": "Q4_K_M",
                         "target": {"kind": "local", "path": "/home/alice/published/sft"}}},
}
# Nothing of these may be in the release.
PLANTED = ("/home/alice", "alice", "dpo_output_4090", "uf.jsonl", FAKE_WANDB, FAKE_HF,
           "wandb_api_key", "hf_token", "output_dir", "logging_dir", "checkpoint-500",
           "cluster", "gpu-alice-01", "a100-private", "published/sft")


def published_text(root: Path) -> dict[str, str]:
    """Every text file of the release and the GGUF metadata strings, by name."""
    texts = {}
    for path in sorted((root / OUT).iterdir()):
        if path.suffix == ".gguf":
            texts[path.name] = "\n".join(f"{k}={v}" for k, v in privacy.gguf_strings(path))
        elif path.suffix != ".png":
            texts[path.name] = path.read_text()
    return texts


def test_the_release_holds_no_planted_path_home_secret_or_unknown_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        render(tmp_path, plant(lineage=PLANTED_LINEAGE, params=PLANTED_PARAMS,
                               absolute_adapter=True))
    texts = published_text(tmp_path)
    assert set(texts) >= {"README.md", "Modelfile", "manifest.json"}
    for name, text in texts.items():
        for planted in (*PLANTED, str(tmp_path)):
            assert planted not in text, f"{name} holds {planted!r}"
    manifest = json.loads(texts["manifest.json"])
    assert manifest["lineage"]["dataset"] == {"name": "ultrafeedback", "examples": 64}
    assert manifest["lineage"]["hyperparameters"] == {"beta": 0.1}
    assert "adapter" not in manifest["params"]["trainers"]["sft"]
    # The secrets in dropped keys are warned about by key, never by value.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("`wandb_api_key` looks like a secret" in w for w in warnings), warnings
    assert any("`hf_token` looks like a secret" in w for w in warnings), warnings
    assert not any(FAKE_WANDB in r.getMessage() or FAKE_HF in r.getMessage()
                   for r in caplog.records)


@pytest.mark.parametrize(("change", "error", "key", "file", "why"), [
    (plant(lineage={**PLANTED_LINEAGE, "hyperparameters": {"beta": 0.1, "hub_token": FAKE_HF}}),
     InputError, "hyperparameters.hub_token", "training_lineage.json", "by its name"),
    (plant(lineage={"trainer": "dpo", "trainer_library": FAKE_HF}),
     InputError, "trainer_library", "training_lineage.json", "Hugging Face token"),
    (plant(lineage={"trainer": "dpo", "dataset": {"name": FAKE_SK}}),
     InputError, "dataset.name", "training_lineage.json", "API key (sk-…)"),
    (plant(params={"tags": ["pirate", FAKE_AWS]}),
     ParamsError, "trainers.sft.tags.1", "params.yaml", "AWS access key id"),
], ids=["by name in hyperparameters", "hf token as library", "sk key as dataset",
        "aws key in tags"])
def test_a_secret_in_a_published_key_stops_the_card_naming_the_key_and_file(
        tmp_path: Path, change, error: type, key: str, file: str, why: str) -> None:
    with pytest.raises(error) as err:
        render(tmp_path, change)
    message = str(err.value)
    assert f"`{key}` looks like a secret" in message and file in message and why in message
    assert not any(secret in message for secret in (FAKE_HF, FAKE_SK, FAKE_AWS))
    assert not (tmp_path / OUT).exists()
    assert sorted(p.name for p in (tmp_path / BUILD).iterdir()) == ["work"]


def test_a_local_path_in_a_published_param_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"`trainers\.sft\.tags\.0` is a local path"):
        render(tmp_path, plant(params={"tags": ["/home/alice/tags"]}))
    assert not (tmp_path / OUT).exists()


def test_evaluation_data_outside_the_repository_is_named_by_its_file(tmp_path: Path) -> None:
    def outside(root: Path) -> None:
        data = yaml.safe_load((root / "params.yaml").read_text())
        data["evaluate"]["text"] = "/home/alice/eval/eval.txt"
        data["evaluate"]["adapter"]["prompts"] = "../shared/probes.jsonl"
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        reference = json.loads((root / EVAL / "reference.json").read_text())
        reference["text"] = data["evaluate"]["text"]  # the reference stage records them
        reference["adapter"]["prompts_file"] = data["evaluate"]["adapter"]["prompts"]
        (root / EVAL / "reference.json").write_text(json.dumps(reference))

    files = render(tmp_path, outside)
    card, manifest = files["README.md"].decode(), json.loads(files["manifest.json"])
    assert "(`eval.txt`, 10 chunks" in card and "(`probes.jsonl`)" in card
    assert manifest["params"]["evaluate"]["text"] == "eval.txt"
    assert manifest["params"]["evaluate"]["adapter"]["prompts"] == "probes.jsonl"
    assert "/home/alice" not in card + files["manifest.json"].decode() and "../" not in card


def test_the_final_scan_stops_the_release_before_its_folder_appears(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """A name the rules cannot know (here the build machine is called `matey`, which the
    fixture's smoke replies say) is still caught, and nothing is written."""
    from stages.release import card

    monkeypatch.setattr(card, "this_machine", lambda **_: Machine(paths=(), names=("matey",)))
    with pytest.raises(ReleaseError) as err:
        render(tmp_path)
    message = str(err.value)
    assert re.search(r"README\.md line \d+: the user or host name `matey`", message)
    assert "so it was not written" in message
    assert not (tmp_path / OUT).exists()
    assert sorted(p.name for p in (tmp_path / BUILD).iterdir()) == ["work"]


def test_gguf_metadata_is_scanned_too(tmp_path: Path) -> None:
    def leaky_gguf(root: Path) -> None:
        gguf = root / QUANT / "Q8_0.gguf"
        write_gguf(gguf, "Q8_0", {"general.source.url": "file:///home/alice/models/x"})
        for record in (root / QUANT / "Q8_0.json", root / EVAL / "Q8_0.details.json"):
            data = json.loads(record.read_text())
            data["bytes"] = gguf.stat().st_size
            if "sha256" in data:
                data["sha256"] = sha256_file(gguf)
            record.write_text(json.dumps(data))

    with pytest.raises(ReleaseError) as err:
        render(tmp_path, leaky_gguf)
    assert ("SmolLM2-135M-Instruct-golden-sft-Q8_0.gguf: general.source.url: the absolute "
            "path `/home/alice`") in str(err.value)
    assert not (tmp_path / OUT).exists()



def test_safetensors_headers_are_scanned_too(tmp_path: Path) -> None:
    """A trainer may write anything in a safetensors header's ``__metadata__`` (the adapter
    format publishes the run's adapter_model.safetensors as it is)."""
    import torch
    from safetensors.torch import save_file

    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)}
    save_file(tensors, tmp_path / "adapter_model.safetensors",
              metadata={"format": "pt", "source": "/home/alice/runs/dpo/checkpoint-40"})
    found = privacy.scan_release(tmp_path, Machine(paths=(), names=()))
    assert found == ["adapter_model.safetensors: __metadata__.source: the absolute path "
                     "`/home/alice`"], found
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    assert privacy.scan_release(tmp_path, Machine(paths=(), names=())) == []
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ReleaseError, match="not a safetensors file"):
        privacy.scan_release(tmp_path, Machine(paths=(), names=()))


# --- the demo's real releases (full suite) -------------------------------------------------


def machine_strings(repo: Path) -> list[str]:
    """What this machine plants in a build: the repository's path, home, user and host."""
    import getpass
    import socket

    planted = [str(repo), str(repo.resolve()), f"{Path.home()}/"]
    return planted + [n for n in {getpass.getuser(), socket.gethostname()} if len(n) >= 3]


@pytest.mark.parametrize("trainer", ["sft", "kto"])
def test_a_demo_release_gives_nothing_of_the_build_machine_away(built_repo: Path,
                                                                trainer: str) -> None:
    folder = built_repo / "build" / trainer / "gguf"
    texts = {"manifest.json (build)": (built_repo / "build" / trainer / "manifest.json")
             .read_text()}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".gguf":
            texts[path.name] = "\n".join(f"{k}={v}" for k, v in privacy.gguf_strings(path))
        else:
            try:
                texts[path.name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # quality.png
                continue
    assert {"README.md", "Modelfile", "manifest.json"} <= set(texts)
    for name, text in texts.items():
        for planted in machine_strings(built_repo):
            # A whole path, or a whole word for user and host names ("root" in "rootfs"
            # or "vm" in "llvm" is not the machine).
            pattern = re.escape(planted) if "/" in planted else \
                rf"(?<![A-Za-z0-9]){re.escape(planted)}(?![A-Za-z0-9])"
            assert not re.search(pattern, text), f"{name} holds {planted!r}"
        # ...and the card stage's own scan agrees.
        assert privacy.scan_text(text, privacy.this_machine(built_repo)) == [], name
