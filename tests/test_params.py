"""params.yaml validation: every bad key is named in the message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stages.errors import ReleaseError
from stages.params import load_params, parse_params

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


@pytest.mark.parametrize(("path", "value", "message"), [
    ("llama_cpp", KeyError, "`params.llama_cpp` is missing"),
    ("quantize.levels", {}, "`quantize.levels` is empty"),
    ("quantize.levels.Q4_K_X", {}, "Q4_K_X' is not a llama-quantize level"),
    ("quantize.levels.IQ2_XS", {}, "needs an importance matrix"),
    ("quantize.levels.Q4_K_M", {"pure": True, "bogus": 1}, "unknown key `quantize.levels.Q4_K_M.bogus`"),
    ("quantize.levels.Q4_K_M", {"output_tensor_type": "q9"}, "output_tensor_type` is 'q9'"),
    ("convert.outtype", "q8_0", "`convert.outtype` is 'q8_0'"),
    ("trainers.sft.adapter", KeyError, "`trainers.sft.adapter` is missing"),
    ("trainers.sft.adapter", 3, "`trainers.sft.adapter` must be str"),
    ("trainers.sft.base_model.path", KeyError, "`trainers.sft.base_model.path` is missing"),
    ("trainers.sft.name", "has space", "`trainers.sft.name` is 'has space'"),
    ("trainers.sft.tags", "pirate", "`trainers.sft.tags` must be a list"),
    ("trainers.sft.releases", {}, "unknown key `trainers.sft.releases`"),
    ("trainers.sft.release", {}, "`trainers.sft.release` lists no format"),
    ("trainers.sft.release.onnx", {"target": {"kind": "local", "path": "x"}}, "names format 'onnx'"),
    ("trainers.sft.release.gguf.target", {"kind": "s3"}, "`trainers.sft.release.gguf.target.kind` is 's3'"),
    ("trainers.sft.release.gguf.target", {"kind": "hub"}, "a Hub target needs `owner/name`"),
    ("trainers.sft.release.gguf.target", {"kind": "local"}, "`trainers.sft.release.gguf.target.path` is needed"),
    ("trainers.sft.release.gguf.ollama_level", "Q2_K", "ollama_level` is 'Q2_K', which is not in quantize.levels"),
    ("trainers.Bad-Key", GOOD["trainers"]["sft"], "trainer key 'Bad-Key'"),
    ("demo.runs.sft.method", "ppo", "`demo.runs.sft.method` is 'ppo'"),
    ("demo.runs.sft.steps", 0, "`demo.runs.sft.steps` must be positive"),
    ("evaluate", KeyError, "`params.evaluate` is missing"),
    ("evaluate.extra", 1, "unknown key `evaluate.extra`"),
    ("evaluate.ctx", 255, "`evaluate.ctx` is 255; use an even number"),
    ("evaluate.chunks", 0, "llama-perplexity needs 100 for its statistics"),
    ("evaluate.max_kld.Q6_K", 0.1, "`evaluate.max_kld.Q6_K` names a level that is not in quantize"),
    ("evaluate.max_kld", {"Q8_0": 0.01}, "no entry for level Q4_K_M and no `default`"),
    ("evaluate.max_kld.default", -1, "`evaluate.max_kld.default` is -1.0; it must be a positive"),
    ("evaluate.max_kld.default", "high", "`evaluate.max_kld.default` must be int or float"),
    ("evaluate.smoke.max_tokens", True, "`evaluate.smoke.max_tokens` must be int, got bool"),
    ("evaluate.smoke.prompt", " ", "`evaluate.smoke.prompt` is empty"),
    ("evaluate.smoke.repeat_penalty", 0.5, "`evaluate.smoke.repeat_penalty` is 0.5; use 1.0"),
    ("evaluate.conversion.chunks", 11, "`evaluate.conversion.chunks` is 11, more than the 10"),
    ("evaluate.conversion.chunks", -1, "`evaluate.conversion.chunks` is -1; use 0 (skip)"),
    ("evaluate.adapter.min_kld", 0, "`evaluate.adapter.min_kld` is 0.0; it must be a positive"),
    ("evaluate.adapter.prompts", KeyError, "`evaluate.adapter.prompts` is missing"),
    ("trainers.sft.chat_template", "", "`trainers.sft.chat_template` is ''; give the chat template"),
    ("trainers.sft.eos_token", 2, "`trainers.sft.eos_token` is 2; give the eos token text"),
])
def test_bad_params_name_the_key(path: str, value: object, message: str) -> None:
    with pytest.raises(ReleaseError) as err:
        parse_params(edited(path, value))
    assert message in str(err.value)


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


def test_cli_exits_nonzero_with_one_error_line(tmp_path: Path) -> None:
    from stages.params import main

    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(edited("convert.outtype", "f8")))
    assert main(["--params", str(bad)]) == 1
    assert main(["--params", str(REPO / "params.yaml"), "--trainer", "sft"]) == 0
