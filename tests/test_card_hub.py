"""The release as the Hub takes it: card metadata by the Hub's rules, no file over 50 GB.

The card's front matter is checked with ``validate_card_metadata`` of the local
test Hub (``tests/hub_server.py``, the rules of the Hub's validate-yaml), no server
needed, and the same cards are shown to fail it when they break a rule.

Splitting: which levels split and the shard names are planned from tensor sizes
(pure, fast).  The real ``llama-gguf-split`` is reached through ``built_repo``
(the fast tier has no llama.cpp), so those tests are in the full suite: the tool
writes exactly the planned shards, gguf-py reads the tensors back whole, and a
split level of the demo loads in llama.cpp from its first shard.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from stages.config.hub import HUB_FILE_LIMIT
from stages.config.params import load_params, parse_params
from stages.core.errors import ReleaseError
from stages.llamacpp.split import (
    count_shards,
    plan_files,
    plan_split,
    shard_names,
    split_gguf,
    split_size_arg,
)
from stages.release import hub_meta
from stages.release.card import check_hub_limit
from tests.hub_server import card_metadata, load_hub_licenses, validate_card_metadata
from tests.test_card_golden import GOLDEN, INPUTS, RUN_DIR, TRAINER, render

LINEAGE = json.loads((INPUTS / "training_lineage.json").read_text())
PARAMS = yaml.safe_load((INPUTS / "params.yaml").read_text())


def fixture_trainer(**changes: object):
    """The golden fixture's trainer, with ``changes`` to its params entry."""
    data = copy.deepcopy(PARAMS)
    data["trainers"][TRAINER] |= changes
    return parse_params(data).trainer(TRAINER)


def hub_errors(meta: dict) -> list[str]:
    return validate_card_metadata(meta, load_hub_licenses())


# --- card metadata ------------------------------------------------------------


def test_the_fixture_card_passes_the_hubs_metadata_rules() -> None:
    meta = hub_meta.front_matter(fixture_trainer(), LINEAGE, "gguf")
    assert hub_errors(meta) == []
    assert hub_meta.metadata_problems(meta) == []
    assert meta["base_model_relation"] == "finetune" and meta["library_name"] == "gguf"
    assert "datasets" not in meta  # the lineage names sft.jsonl, a local file
    # ...and that is what the rendered card carries.
    assert card_metadata((GOLDEN / "README.md").read_text()) == meta


@pytest.mark.parametrize("change", [
    {"datasets": ["sft.jsonl"]},
    {"datasets": ["data/sft.jsonl"]},
    {"license": "not-a-license"},
    {"license": "other"},  # without license_name and license_link
    {"base_model": "SmolLM2-135M-Instruct"},
    {"base_model_relation": "fine-tune"},
    {"tags": "gguf"},
])
def test_a_card_that_breaks_a_rule_fails_the_check(change: dict) -> None:
    meta = hub_meta.front_matter(fixture_trainer(), LINEAGE, "gguf") | change
    assert hub_errors(meta), f"the Hub's rules let {change} through"
    assert hub_meta.metadata_problems(meta), f"our own check lets {change} through"
    with pytest.raises(ReleaseError, match="breaks the Hub's metadata rules"):
        hub_meta.check_front_matter(meta, trainer_key=TRAINER)


def test_an_other_license_is_named_and_linked() -> None:
    from stages.release.card import modelfile_license

    trainer = fixture_trainer(license="other", license_name="pirate-license-1.0",
                              license_link="https://example.com/pirate-license")
    meta = hub_meta.front_matter(trainer, LINEAGE, "gguf")
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "pirate-license-1.0", "https://example.com/pirate-license")
    assert hub_errors(meta) == [] and hub_meta.metadata_problems(meta) == []
    assert modelfile_license(trainer) == "pirate-license-1.0 (https://example.com/pirate-license)"


@pytest.mark.parametrize(("fmt", "relation"), [
    ("gguf", "finetune"), ("merged", "finetune"), ("adapter", "adapter")])
def test_base_model_relation_follows_what_the_repo_holds(fmt: str, relation: str) -> None:
    from tests.hub_server import RELATIONS

    assert hub_meta.base_model_relation(fmt) == relation
    assert relation in RELATIONS


@pytest.mark.parametrize(("dataset", "ids"), [
    ({"name": "sft.jsonl", "path": "data/sft.jsonl"}, []),
    ({"name": "sft.jsonl", "hub_id": "pirates/sft-chat"}, ["pirates/sft-chat"]),
    ({"name": "HuggingFaceH4/no_robots"}, ["HuggingFaceH4/no_robots"]),
    ({"name": "data/sft.jsonl"}, []),
    ({"name": "/home/me/data/sft"}, []),
    ({"path": "/home/me/data/sft.jsonl"}, []),
    ({"name": "sft"}, []),
    ({"hub_id": "not an id"}, []),
    ("pirates/sft-chat", ["pirates/sft-chat"]),
    ("sft.jsonl", []),
    ([{"name": "a/b"}, "c/d", {"name": "a/b"}], ["a/b", "c/d"]),
    (None, []),
    (3, []),
])
def test_only_hub_dataset_ids_reach_the_card(dataset: object, ids: list[str]) -> None:
    lineage = {**LINEAGE, "dataset": dataset}
    assert hub_meta.dataset_ids(lineage) == ids
    meta = hub_meta.front_matter(fixture_trainer(), lineage, "gguf")
    assert meta.get("datasets", []) == ids
    assert hub_errors(meta) == []
    assert hub_meta.dataset_ids({k: v for k, v in LINEAGE.items() if k != "dataset"}) == []


def _lineage(dataset: object):
    def change(root: Path) -> None:
        path = root / RUN_DIR / "training_lineage.json"
        lineage = json.loads(path.read_text())
        if dataset is None:
            del lineage["dataset"]
        else:
            lineage["dataset"] = dataset
        path.write_text(json.dumps(lineage))
    return change


@pytest.mark.parametrize(("dataset", "row"), [
    ("sft.jsonl", "| Dataset | sft.jsonl (? examples) |"),
    (None, None),  # no dataset recorded: no row
    ({"name": "sft.jsonl", "hub_id": "pirates/sft-chat", "examples": 81},
     "| Dataset | [sft.jsonl](https://huggingface.co/datasets/pirates/sft-chat) (81 examples) |"),
    ({"path": "/home/alice/data/uf.jsonl", "examples": 3},
     "| Dataset | uf.jsonl (3 examples) |"),  # a path lends only its file name
])
def test_the_card_names_the_training_data_however_the_lineage_records_it(
        tmp_path: Path, dataset: object, row: str | None) -> None:
    card = render(tmp_path, _lineage(dataset))["README.md"].decode()
    if row is None:
        assert "| Dataset |" not in card
    else:
        assert f"\n{row}\n" in card
    assert "/home/alice" not in card
    meta = card_metadata(card)
    assert hub_errors(meta) == []
    assert meta.get("datasets") == (["pirates/sft-chat"] if isinstance(dataset, dict)
                                    and "hub_id" in dataset else None)


# --- files the Hub cannot take ----------------------------------------------------


@pytest.mark.parametrize(("tensors", "max_bytes", "shards"), [
    ([], 64, 1),
    ([32, 32, 32], 96, 1),
    ([32, 32, 32], 64, 2),  # 32 + 32 fills a shard exactly: no split inside it
    ([10, 10, 10], 64, 2),  # each padded to 32 bytes, as gguf-split.cpp does
    ([32, 200, 32], 64, 3),  # a tensor over the limit gets a shard of its own
    ([32] * 10, 32, 10),
])
def test_shards_are_counted_as_llama_gguf_split_counts_them(
        tensors: list[int], max_bytes: int, shards: int) -> None:
    assert count_shards(tensors, max_bytes) == shards


def test_a_first_tensor_over_the_split_size_is_refused_before_the_tool_runs() -> None:
    with pytest.raises(ReleaseError, match="first tensor alone is 96 bytes.*raise "
                                           "`split_max_size`"):
        count_shards([96, 32], 64)


@pytest.mark.parametrize(("file_bytes", "tensors", "keep_whole", "files"), [
    (100, [32, 32], False, ("M-Q8_0.gguf",)),  # not over the limit
    (300, [96, 96, 96], True, ("M-Q8_0.gguf",)),  # Ollama's level stays whole
    (130, [96], False, ("M-Q8_0.gguf",)),  # over only by its metadata: one shard anyway
    (300, [96, 96, 96], False, ("M-Q8_0-00001-of-00003.gguf", "M-Q8_0-00002-of-00003.gguf",
                                "M-Q8_0-00003-of-00003.gguf")),
])
def test_a_level_over_the_split_size_is_planned_in_llama_cpp_shard_names(
        file_bytes: int, tensors: list[int], keep_whole: bool, files: tuple[str, ...]) -> None:
    assert plan_files(prefix="M-Q8_0", file_bytes=file_bytes, tensor_bytes=tensors,
                      max_bytes=128, keep_whole=keep_whole) == files


def test_shard_names_count_from_one_with_five_digits() -> None:
    names = shard_names("SmolLM2-sft-Q8_0", 12)
    assert names[0] == "SmolLM2-sft-Q8_0-00001-of-00012.gguf"
    assert names[-1] == "SmolLM2-sft-Q8_0-00012-of-00012.gguf"


@pytest.mark.parametrize(("max_bytes", "arg"), [
    (49 * 10**9, "49G"), (10**6, "1M"), (1500 * 10**6, "1500M"), (10**9, "1G")])
def test_the_split_size_is_passed_in_the_tools_units(max_bytes: int, arg: str) -> None:
    assert split_size_arg(max_bytes) == arg
    assert parse_params(_with_split_size(arg)).trainer("sft").release["gguf"] \
        .split_max_bytes == max_bytes


def _with_split_size(size: str) -> dict:
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    data["trainers"]["sft"]["release"]["gguf"]["split_max_size"] = size
    return data


# Tensor sizes (f32 elements) that put gguf-split's rule on its edges at 1M: t1 + t2
# fill a shard exactly; t5 alone is over 1M and gets its own shard.
BOUNDARY_TENSORS = (200_000, 100_000, 150_000, 10, 200_000, 260_000, 50_000)
BOUNDARY_SHARDS = 5


def write_multi_tensor_gguf(path: Path, elements: tuple[int, ...] = BOUNDARY_TENSORS) -> None:
    """A small GGUF (a few MB of f32 tensors, deterministic) for splitting."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("split-test")
    for i, n in enumerate(elements):
        writer.add_tensor(f"blk.{i}.weight", np.arange(n, dtype=np.float32) * (i + 1) / n)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_real_gguf_is_planned_from_its_tensor_header(tmp_path: Path) -> None:
    source = tmp_path / "Q8_0.gguf"
    write_multi_tensor_gguf(source)
    plan = plan_split(source=source, prefix="M-Q8_0", max_bytes=10**6)
    assert plan.split and plan.files == shard_names("M-Q8_0", BOUNDARY_SHARDS)
    assert not plan_split(source=source, prefix="M-Q8_0", max_bytes=10**6, keep_whole=True).split
    assert plan_split(source=source, prefix="M-Q8_0", max_bytes=10**7).files == ("M-Q8_0.gguf",)


def _records(sizes: dict[str, int]) -> list[dict]:
    return [{"level": level, "bytes": size} for level, size in sizes.items()]


@pytest.mark.parametrize(("kind", "ollama", "sizes", "fails"), [
    ("hub", "Q8_0", {"Q4_K_M": 40 * 10**9, "Q8_0": 75 * 10**9}, True),
    ("hub", "Q4_K_M", {"Q4_K_M": 40 * 10**9, "Q8_0": 75 * 10**9}, False),  # Q8_0 is split
    ("hub", None, {"Q4_K_M": 60 * 10**9, "Q8_0": 75 * 10**9}, True),  # the first level
    ("hub", "Q8_0", {"Q4_K_M": 1, "Q8_0": HUB_FILE_LIMIT}, False),  # 50 GB is allowed
    ("local", "Q8_0", {"Q4_K_M": 40 * 10**9, "Q8_0": 75 * 10**9}, False),
])
def test_ollamas_level_must_fit_in_one_hub_file(kind: str, ollama: str | None,
                                                sizes: dict[str, int], fails: bool) -> None:
    data = _with_split_size("49G")
    release = data["trainers"]["sft"]["release"]["gguf"]
    release["target"] = ({"kind": "hub", "repo_id": "owner/name"} if kind == "hub"
                         else {"kind": "local", "path": "x"})
    release["ollama_level"] = ollama
    if ollama is None:
        del release["ollama_level"]
    data["quantize"]["levels"] = {level: {} for level in sizes}
    data["evaluate"]["max_kld"] = {"default": 0.25}
    trainer = parse_params(data).trainer("sft")
    if not fails:
        check_hub_limit(trainer, _records(sizes))
        return
    with pytest.raises(ReleaseError) as err:
        check_hub_limit(trainer, _records(sizes))
    message = str(err.value)
    key = "trainers.sft.release.gguf"
    assert f"`{key}.ollama_level`" in message and f"`{key}.split_max_size`" in message
    assert "Ollama cannot import a split GGUF" in message
    assert ("Q4_K_M (37.3 GiB)" in message) == (sizes["Q4_K_M"] < HUB_FILE_LIMIT)


# --- the real llama-gguf-split (full suite: llama.cpp comes with built_repo) --------------


def tensor_digests(paths: list[Path]) -> list[tuple[str, int, tuple[int, ...], str]]:
    """Every tensor of ``paths`` in order: name, type, shape, sha256 of its data."""
    from gguf import GGUFReader

    found = []
    for path in paths:
        for t in GGUFReader(path).tensors:
            found.append((t.name, int(t.tensor_type), tuple(int(d) for d in t.shape),
                          hashlib.sha256(t.data.tobytes()).hexdigest()))
    return found


def test_llama_gguf_split_writes_the_planned_shards(built_repo: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    version = load_params(built_repo / "params.yaml").llama_cpp_version
    source = tmp_path / "Q8_0.gguf"
    write_multi_tensor_gguf(source)
    plan = plan_split(source=source, prefix="M-Q8_0", max_bytes=10**6)
    out = tmp_path / "out"
    out.mkdir()
    shards = split_gguf(plan, out_dir=out, max_bytes=10**6, llama_cpp_version=version)
    assert sorted(p.name for p in out.iterdir()) == list(plan.files)
    assert tensor_digests(shards) == tensor_digests([source])
    for index, shard in enumerate(shards):
        reader = GGUFReader(shard)
        assert reader.get_field("split.no").contents() == index
        assert reader.get_field("split.count").contents() == BOUNDARY_SHARDS
        assert len(reader.tensors) > 0


def test_a_split_level_is_published_in_shards_and_loads_in_llama_cpp(built_repo: Path,
                                                                     tmp_path: Path) -> None:
    """The demo's sft release with a 50 MB split size: Q5_K_M and Q8_0 (100-150 MB) in
    shards, Q4_K_M (Ollama's level) whole; llama.cpp answers from the first shard exactly
    as from the unsplit file."""
    from stages.fidelity.llama_checks import smoke_chat
    from stages.llamacpp.tools import tool_path
    from tests.pipeline import copy_repo, repro, set_param, status

    repo = copy_repo(built_repo, tmp_path / "repo", cache_from=built_repo)
    set_param(repo, "trainers.sft.release.gguf.split_max_size", "50M")
    ran = repro(repo, "card@sft")
    # convert@sft reads the whole trainers.sft entry (dvc.yaml); its output is unchanged,
    # so nothing between it and the card reruns.
    assert {"card@sft"} <= ran <= {"convert@sft", "card@sft"}
    assert "push@sft-gguf" in status(repo)
    params = load_params(repo / "params.yaml")
    trainer, folder = params.trainer("sft"), repo / "build/sft/gguf"
    manifest = json.loads((folder / "manifest.json").read_text())
    card = (folder / "README.md").read_text()
    assert (folder / f"{trainer.name}-Q4_K_M.gguf").samefile(
        repo / "build/sft/work/quant/Q4_K_M.gguf")  # a hard link, as before
    first = {}
    for level in ("Q5_K_M", "Q8_0"):
        entries = [a for a in manifest["artifacts"] if a["level"] == level]
        count = len(entries)
        assert count >= 2 and not (folder / f"{trainer.name}-{level}.gguf").exists()
        names = shard_names(f"{trainer.name}-{level}", count)
        assert [a["path"] for a in entries] == [f"gguf/{n}" for n in names]
        assert [(a["shard"], a["shards"]) for a in entries] == [(i, count)
                                                               for i in range(1, count + 1)]
        assert f"- **{level}**: {count} parts; load `{names[0]}`" in card
        source = repo / f"build/sft/work/quant/{level}.gguf"
        assert tensor_digests([folder / n for n in names]) == tensor_digests([source])
        first[level] = folder / names[0]
    assert hub_errors(card_metadata(card)) == []
    tool = tool_path("llama-completion", params.llama_cpp_version)
    replies = [smoke_chat(tool=tool, gguf=gguf, prompt="What is the capital of France?",
                          max_tokens=24, repeat_penalty=1.1).text
               for gguf in (repo / "build/sft/work/quant/Q8_0.gguf", first["Q8_0"])]
    assert replies[0] and replies[0] == replies[1]
