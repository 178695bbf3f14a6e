"""params.yaml validation: every bad key is named in the message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stages.config.params import load_params, parse_params
from stages.core.errors import ParamsError, ReleaseError

REPO = Path(__file__).resolve().parent.parent
GOOD = yaml.safe_load((REPO / "params.yaml").read_text())


def edited(path: str, value: object) -> dict:
    data = copy.deepcopy(GOOD)
    node = data
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


def test_shipped_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert list(params.levels) == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    assert set(params.trainers) == {"sft", "kto"}
    assert params.trainer("sft").run_dir == Path("inputs/runs/sft/demo")
    assert params.raw == GOOD


def test_models_know_their_own_keys() -> None:
    params = parse_params(GOOD)
    assert [t.key for t in params.trainers.values()] == ["sft", "kto"]
    assert [level.name for level in params.levels.values()] == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    assert params.demo_run("kto").name == "kto"
    assert params.trainer("sft").release["gguf"].format == "gguf"
    assert params.level("Q8_0").model_dump() == {"output_tensor_type": None, "pure": False,
                                                 "token_embedding_type": None, "name": "Q8_0"}
    assert params.demo_run("sft").learning_rate == pytest.approx(1e-3)


TARGET = "trainers.sft.release.gguf.target"


@pytest.mark.parametrize(("path", "value", "message"), [
    ("llama_cpp", KeyError, "`llama_cpp` is missing"),
    ("llama_cpp.version", 0.3, "`llama_cpp.version` must be text; quote it (got 0.3)"),
    ("quantize.levels", {}, "`quantize.levels` is empty"),
    ("quantize.levels.Q4_K_X", {}, "`quantize.levels.Q4_K_X` is not a llama-quantize level"),
    ("quantize.levels.IQ2_XS", {}, "`quantize.levels.IQ2_XS` needs an importance matrix"),
    ("quantize.levels.Q4_K_M", {"pure": True, "bogus": 1},
     "unknown key `quantize.levels.Q4_K_M.bogus`; allowed keys: output_tensor_type"),
    ("quantize.levels.Q4_K_M", {"output_tensor_type": "q9"},
     "`quantize.levels.Q4_K_M.output_tensor_type` must be 'f32', 'f16'"),
    ("quantize.levels.Q4_K_M", {"pure": 1}, "`quantize.levels.Q4_K_M.pure` must be true or false"),
    ("quantize.levels.Q4_K_M", {"name": "Q8_0"}, "unknown key `quantize.levels.Q4_K_M.name`"),
    ("convert.outtype", "q8_0", "`convert.outtype` must be 'bf16' or 'f16' (got 'q8_0')"),
    ("trainers.sft.adapter", KeyError, "`trainers.sft.adapter` is missing"),
    ("trainers.sft.adapter", 3, "`trainers.sft.adapter` must be a path"),
    ("trainers.sft.adapter", "", "`trainers.sft.adapter` must be a path, written as non-empty"),
    ("trainers.sft.base_model.path", KeyError, "`trainers.sft.base_model.path` is missing"),
    ("trainers.sft.name", "has space", "it names the published files (got 'has space')"),
    ("trainers.sft.tags", "pirate", "`trainers.sft.tags` must be a list (got 'pirate')"),
    ("trainers.sft.releases", {}, "unknown key `trainers.sft.releases`; did you mean `release`?"),
    ("trainers.sft.licence", "mit", "unknown key `trainers.sft.licence`; did you mean `license`?"),
    ("trainers.sft.release", {}, "`trainers.sft.release` is empty; add e.g. `gguf:`"),
    ("trainers.sft.release.onnx", {"target": {"kind": "local", "path": "x"}},
     "`trainers.sft.release.onnx` is not a format this pipeline publishes; supported: "
     "adapter, merged, merged_4bit, gguf"),
    (TARGET, {"kind": "s3"}, f"`{TARGET}.kind` must be 'local' or 'hub' (got 's3')"),
    (TARGET, {"kind": "hub"}, f"`{TARGET}.repo_id` is missing; a hub target needs"),
    (TARGET, {"kind": "hub", "repo_id": "name"}, f"`{TARGET}.repo_id` must be a Hub repo id"),
    (TARGET, {"kind": "hub", "repo_id": "o/n", "tag": 1}, f"`{TARGET}.tag` must be text"),
    (TARGET, {"kind": "local"}, f"`{TARGET}.path` is missing; a local target needs"),
    (TARGET, {"kind": "local", "path": "x", "revision": "main"},
     f"`{TARGET}.revision` does not apply to a local target"),
    ("trainers.sft.release.gguf.ollama_level", "Q2_K",
     "`trainers.sft.release.gguf.ollama_level` is not in quantize.levels"),
    ("trainers.Bad-Key", GOOD["trainers"]["sft"],
     "`trainers.Bad-Key` must be lower-case letters, digits and _; it names folders and DVC"),
    ("demo.runs.sft.method", "ppo", "`demo.runs.sft.method` must be 'sft' or 'kto' (got 'ppo')"),
    ("demo.runs.sft.steps", 0, "`demo.runs.sft.steps` must be greater than 0 (got 0)"),
    ("demo.runs.sft.learning_rate", True, "`demo.runs.sft.learning_rate` must be a number"),
    ("demo.runs.sft.learning_rate", "1e-3", "unquoted, with a dot: `1.0e-3` (got '1e-3')"),
    ("evaluate", KeyError, "`evaluate` is missing"),
    ("evaluate.extra", 1, "unknown key `evaluate.extra`; allowed keys: text, ctx"),
    ("evaluate.ctx", 255, "`evaluate.ctx` must be a multiple of 2 (got 255)"),
    ("evaluate.smoke.skip", ["dpo"], "`evaluate.smoke.skip` is no trainer; known: sft, kto (got"),
    ("evaluate.smoke.skip", "sft", "`evaluate.smoke.skip` must be a list (got 'sft')"),
    ("evaluate.ctx", 8, "`evaluate.ctx` must be greater than or equal to 16"),
    ("evaluate.chunks", 0, "llama-perplexity needs 100 for its statistics"),
    ("evaluate.max_kld.Q6_K", 0.1, "`evaluate.max_kld.Q6_K` names a level that is not in quantize"),
    ("evaluate.max_kld", {"Q8_0": 0.01}, "no entry for level Q4_K_M and no `default`"),
    ("evaluate.max_kld.default", -1, "`evaluate.max_kld.default` must be greater than 0 (got -1)"),
    ("evaluate.max_kld.default", "high", "`evaluate.max_kld.default` must be a number"),
    ("evaluate.smoke.max_tokens", True,
     "`evaluate.smoke.max_tokens` must be a whole number (got true)"),
    ("evaluate.smoke.prompt", " ", "`evaluate.smoke.prompt` is empty"),
    ("evaluate.smoke.repeat_penalty", 0.5,
     "`evaluate.smoke.repeat_penalty` must be greater than or equal to 1 (got 0.5)"),
    ("evaluate.conversion.chunks", 11, "`evaluate.conversion.chunks` is more than the 10 chunks"),
    ("evaluate.conversion.chunks", -1,
     "`evaluate.conversion.chunks` must be greater than or equal to 0 (got -1)"),
    ("evaluate.conversion.max_kld", True, "`evaluate.conversion.max_kld` must be a number"),
    ("evaluate.adapter.min_kld", 0.01, "`evaluate.adapter.min_kld` was removed: the adapter's "
     "effect is no longer gated"),
    ("evaluate.adapter.prompts", KeyError, "`evaluate.adapter.prompts` is missing"),
    ("trainers.sft.chat_template", "", "`trainers.sft.chat_template` must be non-empty text: "
     "the chat template"),
    ("trainers.sft.eos_token", 2, "`trainers.sft.eos_token` must be non-empty text: the eos token"),
    ("trainers.sft.license", "Apache-2.0", "`trainers.sft.license` is not a license id of the "
     "Hub (hub_licenses.json); did you mean `apache-2.0`? Or use `license: other` with "
     "`license_name` and `license_link` for a license the Hub does not list (got 'Apache-2.0')"),
    ("trainers.sft.license", "proprietary", "`trainers.sft.license` is not a license id of "
     "the Hub (hub_licenses.json); use `license: other` with `license_name` and `license_link`"),
    ("trainers.sft.license", "other", "`trainers.sft.license_name` is missing; `license: other` "
     "needs `license_name`"),
    ("trainers.sft.license_name", "my-license",
     "`trainers.sft.license_name` applies only with `license: other` (license is `apache-2.0`) "
     "(got 'my-license')"),
    ("trainers.sft.license_link", 3, "`trainers.sft.license_link` must be text; quote it (got 3)"),
    ("trainers.sft.release.gguf.split_max_size", "48GB",
     "`trainers.sft.release.gguf.split_max_size` must be a size as llama-gguf-split takes it: a "
     "whole number and M or G (1000-based), e.g. `49G` (got '48GB')"),
    ("trainers.sft.release.gguf.split_max_size", "1.5G", "split_max_size` must be a size as"),
    ("trainers.sft.release.gguf.split_max_size", "0M", "split_max_size` must be a size as"),
    ("trainers.sft.release.gguf.split_max_size", 48, "split_max_size` must be text; quote it"),
])
def test_bad_params_name_the_key(path: str, value: object, message: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(edited(path, value))
    assert message in str(err.value)
    assert str(err.value).startswith("params: ")


def test_several_problems_report_the_first_and_count_the_rest() -> None:
    data = edited("evaluate.ctx", True)
    data["trainers"]["sft"]["adapter"] = 3
    with pytest.raises(ParamsError, match=r"^params: `evaluate.ctx` must be a whole number "
                                          r"\(got true\) \[and 1 more problem\]$"):
        parse_params(data)


def test_a_renamed_key_is_one_problem_not_two() -> None:
    data = copy.deepcopy(GOOD)
    data["trainers"]["sft"]["licence"] = data["trainers"]["sft"].pop("license")
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    assert str(err.value) == ("params: unknown key `trainers.sft.licence`; "
                              "did you mean `license`?")


def test_hub_target_takes_revision_and_tag() -> None:
    hub = {"kind": "hub", "repo_id": "owner/name", "revision": "main", "tag": "v1"}
    target = parse_params(edited(TARGET, hub)).trainer("sft").release["gguf"].target
    assert (target.kind, target.repo_id, target.private) == ("hub", "owner/name", True)
    assert (target.path, target.revision, target.tag) == (None, "main", "v1")


OTHER = {"license": "other", "license_name": "my-model-license",
         "license_link": "https://example.com/LICENSE"}


def test_other_license_takes_a_name_and_a_link() -> None:
    data = copy.deepcopy(GOOD)
    data["trainers"]["sft"] |= OTHER
    trainer = parse_params(data).trainer("sft")
    assert (trainer.license, trainer.license_name, trainer.license_link) == tuple(OTHER.values())
    assert parse_params(GOOD).trainer("sft").license_name is None


@pytest.mark.parametrize(("change", "message"), [
    ({"license_link": None}, "`trainers.sft.license_link` is missing; `license: other` needs"),
    ({"license_name": "My License"}, "`trainers.sft.license_name` must be lower-case letters, "
     "digits, '-' and '.' (the Hub's rule) (got 'My License')"),
])
def test_other_license_needs_a_valid_name_and_a_link(change: dict, message: str) -> None:
    data = copy.deepcopy(GOOD)
    data["trainers"]["sft"] |= {k: v for k, v in (OTHER | change).items() if v is not None}
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    assert message in str(err.value)


def test_every_hub_license_id_is_accepted() -> None:
    from stages.config.hub import hub_licenses

    assert "apache-2.0" in hub_licenses() and "other" in hub_licenses()
    for license_ in hub_licenses():
        if license_ != "other":
            parse_params(edited("trainers.sft.license", license_))


@pytest.mark.parametrize(("size", "kind", "ok"), [
    ("49G", "hub", True), ("48000M", "hub", True), ("1M", "hub", True),
    ("50G", "hub", False), ("60G", "hub", False), ("60G", "local", True),
])
def test_split_max_size_must_leave_shards_the_hub_takes(size: str, kind: str, ok: bool) -> None:
    target = ({"kind": "hub", "repo_id": "owner/name"} if kind == "hub"
              else {"kind": "local", "path": "x"})
    data = edited(TARGET, target)
    data["trainers"]["sft"]["release"]["gguf"]["split_max_size"] = size
    if ok:
        release = parse_params(data).trainer("sft").release["gguf"]
        assert release.split_max_bytes == int(size[:-1]) * {"M": 10**6, "G": 10**9}[size[-1]]
        return
    with pytest.raises(ParamsError, match=r"^params: `trainers.sft.release.gguf.split_max_size` "
                                          r"leaves shards the Hub refuses: .*\(got '\d+G'\)$"):
        parse_params(data)


def test_split_max_size_defaults_to_just_under_the_hubs_50_gb() -> None:
    from stages.config.hub import HUB_FILE_LIMIT

    release = parse_params(GOOD).trainer("sft").release["gguf"]
    assert release.split_max_size == "49G"
    # llama-gguf-split counts G as 10^9 bytes of tensors; the metadata rides on top.
    assert HUB_FILE_LIMIT - release.split_max_bytes == 10**9


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("llama_cpp:\n  version: \"0.3.36\"\nquantize:\n  levels: [Q4_K_M\nconvert: {}\n")
    with pytest.raises(ParamsError, match=rf"^params: {bad}, line 5: not valid YAML: "):
        load_params(bad)


def test_missing_file_says_to_run_from_the_repo_root(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found; run from the repository root"):
        load_params(tmp_path / "params.yaml")


def test_the_file_must_hold_a_mapping() -> None:
    with pytest.raises(ParamsError, match=r"^params: the file must be a mapping \(got \[1\]\)$"):
        parse_params([1])


def test_unknown_trainer_and_level_list_the_known_ones() -> None:
    params = parse_params(GOOD)
    with pytest.raises(ReleaseError, match="known: sft, kto"):
        params.trainer("dpo")
    with pytest.raises(ReleaseError, match="known: Q4_K_M, Q5_K_M, Q8_0"):
        params.level("Q6_K")


def test_evaluate_thresholds_overrides_and_skip() -> None:
    params = parse_params(GOOD)
    assert params.evaluate.max_kld_for("Q8_0") < params.evaluate.max_kld_for("Q4_K_M")
    assert params.evaluate.max_kld_for("Q4_K_M") == GOOD["evaluate"]["max_kld"]["default"]
    assert not params.evaluate.conversion.skipped
    assert params.trainer("sft").chat_template is None
    data = edited("evaluate.conversion.chunks", 0)
    data["trainers"]["sft"] |= {"chat_template": "{{ messages }}", "eos_token": "<|im_end|>"}
    params = parse_params(data)
    assert params.evaluate.conversion.skipped
    assert params.trainer("sft").eos_token == "<|im_end|>"


def test_level_options_become_llama_quantize_flags() -> None:
    params = parse_params(edited("quantize.levels.Q4_K_M",
                                 {"output_tensor_type": "q8_0", "pure": True}))
    assert params.level("Q4_K_M").quantize_args() == ["--output-tensor-type", "q8_0", "--pure"]
    assert params.level("Q8_0").quantize_args() == []
    assert parse_params(edited("quantize.levels.Q8_0", None)).level("Q8_0").quantize_args() == []


def test_cli_exits_nonzero_with_one_error_line(tmp_path: Path) -> None:
    from stages.params import main

    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(edited("convert.outtype", "f8")))
    assert main(["--params", str(bad)]) == 1
    assert main(["--params", str(REPO / "params.yaml"), "--trainer", "sft"]) == 0
