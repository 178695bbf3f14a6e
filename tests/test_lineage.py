"""training_lineage.json of any shape: the card and manifest render it, or one clear error.

Each lineage replaces the golden fixture's and the release is rendered from the
fixed inputs (``tests.test_card_golden.render``): the card parses with
``huggingface_hub.ModelCard``, passes the local Hub's metadata rules, shows the
known keys in their rows and says which keys it shows; a missing key is simply
absent.  The reduction itself is tested table-style on
``stages.release.lineage.publish_lineage``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from stages.core.errors import InputError
from stages.release.lineage import publish_lineage
from tests.hub_server import card_metadata, load_hub_licenses, validate_card_metadata
from tests.test_card_golden import INPUTS, OUT, QUANT, RUN_DIR, lay_out, render

DEMO = json.loads((INPUTS / "training_lineage.json").read_text())
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex digits, W&B's shape
# Shaped like the run of issue 12: another trainer's keys, a home folder, a secret.
DPO_RUN = {
    "trainer": "dpo",
    "trainer_library": "trl",
    "base_model": "meta-llama/Llama-3.2-1B-Instruct",
    "output_dir": "/home/alice/projects/x",
    "dataset": {"name": "ultrafeedback", "path": "/home/alice/data/uf.jsonl"},
    "hyperparameters": {"beta": 0.1, "learning_rate": 5e-07, "per_device_train_batch_size": 2,
                        "gradient_accumulation_steps": 8},
    "wandb_api_key": FAKE_WANDB_KEY,
}
NESTED_UNKNOWN = {
    "trainer": "sft",
    "run": {"host": {"gpu": "RTX 4090", "cuda": [12, 4]}, "operator_notes": ["a", {"b": None}]},
    "hyperparameters": {"lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
                        "optim": {"name": "adamw_torch", "betas": [0.9, 0.999]}},
    "custom_metrics": {"eval": {"loss": 0.5}},
}
# TRL's trainer_state.json names, and TrainingArguments.to_dict() with its paths.
TRL_STATE = {
    "global_step": 500,
    "epoch": 2.0,
    "train_loss": 0.6123,
    "training_args": {"output_dir": "/home/alice/out", "logging_dir": "/home/alice/out/runs",
                      "learning_rate": 2e-05, "report_to": ["wandb"], "hub_token": None,
                      "push_to_hub_token": "<PUSH_TO_HUB_TOKEN>", "run_name": "/home/alice/out"},
}
# axolotl's config names: datasets as a list of {path, type}.
AXOLOTL = {
    "base_model": "NousResearch/Llama-2-7b-hf",
    "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
    "num_train_epochs": 3,
}

# lineage, the keys the card and manifest show, card rows that must be there, must not.
CASES = {
    "demo": (DEMO, ["trainer", "trainer_library", "base_model", "dataset", "hyperparameters",
                    "steps", "final_loss", "started", "finished"],
             ["| Trainer | sft |", "| Steps | 16 |", "| Final loss | 1.2346 |"], []),
    "empty": ({}, [], [], ["| Trainer |", "Hyperparameters:"]),
    "trainer only": ({"trainer": "dpo"}, ["trainer"], ["| Trainer | dpo |"],
                     ["| Dataset |", "| Steps |", "Hyperparameters:"]),
    "dpo run": (DPO_RUN, ["trainer", "trainer_library", "base_model", "dataset",
                          "hyperparameters"],
                ["| Trainer | dpo |", "| Library | trl |",
                 "| Dataset | ultrafeedback (? examples) |", "| beta | `0.1` |",
                 "| learning_rate | `5e-07` |"],
                ["| Steps |", "output_dir", "wandb", "/home/alice", "uf.jsonl"]),
    "nested unknown keys": (NESTED_UNKNOWN, ["trainer", "hyperparameters"],
                            ["| lora.r | `16` |",
                             '| lora.target_modules | `["q_proj", "v_proj"]` |',
                             "| optim.betas | `[0.9, 0.999]` |"],
                            ["4090", "custom_metrics", "operator_notes"]),
    "trl trainer state": (TRL_STATE, ["training_args", "global_step", "epoch", "train_loss"],
                          ["| Steps | 500 |", "| Epochs | 2.0 |", "| Final loss | 0.6123 |",
                           "| learning_rate | `2e-05` |", '| report_to | `["wandb"]` |'],
                          ["output_dir", "/home/alice", "hub_token", "PUSH_TO_HUB"]),
    "axolotl": (AXOLOTL, ["base_model", "datasets", "num_train_epochs"],
                ["| Base model | `NousResearch/Llama-2-7b-hf` |",
                 "| Dataset | alpaca_2k_test (? examples) |", "| Epochs | 3 |"], []),
}


def with_lineage(lineage: object):
    """A ``render`` change that writes ``lineage`` as the run's training_lineage.json."""
    def change(root: Path) -> None:
        (root / RUN_DIR / "training_lineage.json").write_text(json.dumps(lineage))
    return change


@pytest.mark.parametrize(("lineage", "shown", "rows", "absent"), CASES.values(), ids=CASES)
def test_any_lineage_renders_a_card_the_hub_takes(tmp_path: Path, lineage: dict,
                                                  shown: list[str], rows: list[str],
                                                  absent: list[str]) -> None:
    from huggingface_hub import ModelCard

    files = render(tmp_path, with_lineage(lineage))
    card = files["README.md"].decode()
    parsed = ModelCard(card)
    assert parsed.data.to_dict() == card_metadata(card)
    assert validate_card_metadata(card_metadata(card), load_hub_licenses()) == []
    manifest = json.loads(files["manifest.json"])
    assert list(manifest["lineage"]) == shown
    assert manifest["published_keys"]["lineage"] == shown
    if shown:
        line = ", ".join(f"`{key}`" for key in shown)
        assert f"from the run's `training_lineage.json`: {line}\n" in card
    else:
        assert "The run's `training_lineage.json` records none of the keys this card shows" in card
    for row in rows:
        assert f"\n{row}\n" in card, row
    for text in absent:
        assert text not in card and text not in files["manifest.json"].decode(), text


def test_the_first_sentence_names_the_method_only_when_the_lineage_does(tmp_path: Path) -> None:
    dpo = render(tmp_path / "dpo", with_lineage(DPO_RUN))["README.md"].decode()
    assert "trained with DPO (trl)\nand a LoRA adapter, merged" in dpo
    bare = render(tmp_path / "bare", with_lineage({}))["README.md"].decode()
    assert "trained with a LoRA adapter, merged" in bare


@pytest.mark.parametrize("lineage", [[], "x", 3, None, [{"trainer": "sft"}]],
                         ids=["list", "text", "number", "null", "list of objects"])
def test_a_lineage_that_is_not_an_object_is_one_clear_error(tmp_path: Path,
                                                            lineage: object) -> None:
    with pytest.raises(InputError) as err:
        render(tmp_path, with_lineage(lineage))
    message = str(err.value)
    assert str(RUN_DIR / "training_lineage.json") in message
    assert "not an object" in message
    assert not (tmp_path / OUT).exists()


def test_the_card_stage_turns_a_bad_lineage_into_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stages import card

    lay_out(tmp_path)
    (tmp_path / RUN_DIR / "training_lineage.json").write_text('["not", "an", "object"]')
    with contextlib.chdir(tmp_path):
        code = card.main(["--trainer", "sft", "--quant-dir", str(QUANT),
                          "--eval-dir", "build/sft/work/eval", "--out", str(OUT),
                          "--plot-data", "build/sft/quality.json"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "training_lineage.json holds a JSON list" in err and "Traceback" not in err
    assert not (tmp_path / OUT).exists()


# --- the reduction, table-style ----------------------------------------------------------


@pytest.mark.parametrize(("raw", "published"), [
    ({"method": "dpo"}, {"method": "dpo"}),
    ({"trainer": "sft", "method": "dpo"}, {"trainer": "sft"}),  # the first name wins
    ({"trainer": {"name": "dpo"}}, {}),  # not text
    ({"base_model": "/home/alice/models/llama"}, {}),  # a path
    ({"base_model_name_or_path": "../models/llama"}, {}),
    ({"base_model": {"id": "org/model", "path": "/models/x"}}, {"base_model": "org/model"}),
    ({"dataset": "/home/alice/d/uf.jsonl"}, {"dataset": {"name": "uf.jsonl"}}),
    ({"dataset": "org/ds"}, {"dataset": {"name": "org/ds", "hub_id": "org/ds"}}),
    ({"dataset": {"path": "data/x.jsonl", "num_rows": 5, "split": "train"}},
     {"dataset": {"name": "x.jsonl", "examples": 5}}),
    ({"datasets": ["org/ds", 7, {"path": "C:\\data\\y.jsonl"}]},
     {"datasets": [{"name": "org/ds", "hub_id": "org/ds"}, {"name": "y.jsonl"}]}),
    ({"dataset": {"type": "alpaca"}}, {}),  # nothing names it
    ({"hyperparameters": {"lr": 1e-4, "output_dir": "out", "resume": "/home/a/ckpt",
                          "lora": {"r": 8, "cache_dir": "x"}, "hub_token": None,
                          "schedule": [{"step": 1}]}},
     {"hyperparameters": {"lr": 1e-4, "lora": {"r": 8}}}),
    ({"hyperparameters": {"output_dir": "/x"}}, {}),  # nothing left
    ({"hyperparameters": "lr=1e-4"}, {}),  # not a mapping
    ({"final_loss": float("nan")}, {"final_loss": "nan"}),  # a diverged run, as text
    ({"steps": 10, "global_step": 12}, {"steps": 10}),
])
def test_only_known_keys_reduced_to_what_a_reader_needs_are_published(
        raw: dict, published: dict) -> None:
    lineage = publish_lineage(raw, source=Path("training_lineage.json"))
    assert lineage.published == published
    assert lineage.shown == tuple(published)
    assert json.loads(json.dumps(lineage.published)) == published  # valid JSON, no NaN


def test_dropped_keys_are_listed_for_the_log() -> None:
    lineage = publish_lineage(DPO_RUN, source=Path("training_lineage.json"))
    assert set(lineage.dropped) == {"output_dir", "dataset.path", "wandb_api_key"}
    assert lineage.fields["trainer"] == "dpo" and lineage.fields["steps"] is None
