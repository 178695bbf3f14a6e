"""Demo input: a real LoRA fine-tune on CPU with TRL (SFT or KTO).

Reads:  the base model folder, a JSONL dataset shipped in ``data/``, and the
        run's settings in ``demo.runs.<name>`` of params.yaml.
Writes: ``<output_root>/<run_name>/`` laid out like a real trainer's run:
        ``final_model/`` (adapter_config.json, adapter_model.safetensors,
        tokenizer files) and ``training_lineage.json``.

The whole output root is written atomically, so DVC never records a run that
stopped half way.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stages.config.params import DemoRun, load_params
from stages.core import atomic
from stages.core.cli import run_stage, stage_parser
from stages.core.errors import ReleaseError
from stages.core.hashing import sha256_file

log = logging.getLogger(__name__)

LINEAGE = "training_lineage.json"


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    final_loss: float
    steps: int
    seconds: float


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _trainer(spec: DemoRun, model, tokenizer, dataset, work: Path):
    from peft import LoraConfig

    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(output_dir=str(work), max_steps=spec.steps, learning_rate=spec.learning_rate,
                  per_device_train_batch_size=spec.batch_size, logging_steps=1,
                  save_strategy="no", report_to=[], seed=spec.seed, use_cpu=True,
                  activation_checkpointing=False, bf16=False,  # bf16 matmuls crawl on CPU
                  disable_tqdm=not sys.stderr.isatty(), max_length=spec.max_length)
    if spec.method == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=dataset,
                      processing_class=tokenizer, peft_config=lora)


def _final_loss(history: list[dict]) -> float:
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses:
        raise ReleaseError("training logged no loss; is the dataset empty?")
    return float(losses[-1])


def run(*, spec: DemoRun, base: Path, base_id: str) -> TrainResult:
    """Fine-tune a LoRA on ``base`` as ``spec`` says; write the run folder."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    if not spec.dataset.is_file():
        raise ReleaseError(f"dataset {spec.dataset} not found (demo.runs.{spec.name}.dataset)")
    set_seed(spec.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started, t0 = _now(), time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(spec.dataset), split="train")
    log.info("training %s: %s on %d examples, %d steps", spec.name, spec.method.upper(),
             len(dataset), spec.steps)
    with atomic.output_dir(spec.output_root) as tmp, tempfile.TemporaryDirectory() as work:
        trainer = _trainer(spec, model, tokenizer, dataset, Path(work))
        trainer.train()
        run_dir = tmp / spec.run_name
        trainer.save_model(str(run_dir / "final_model"))
        tokenizer.save_pretrained(run_dir / "final_model")
        loss = _final_loss(trainer.state.log_history)
        lineage = {
            "trainer": spec.method,
            "trainer_library": "trl",
            "base_model": base_id,
            "dataset": {"name": spec.dataset.name, "path": str(spec.dataset),
                        "sha256": sha256_file(spec.dataset), "examples": len(dataset)},
            "hyperparameters": {k: v for k, v in spec.model_dump().items()
                                if k not in ("name", "dataset", "output_root", "run_name")}
            | {"target_modules": "all-linear"},
            "steps": trainer.state.global_step,
            "final_loss": loss,
            "started": started,
            "finished": _now(),
        }
        atomic.write_text(run_dir / LINEAGE, json.dumps(lineage, indent=2) + "\n")
    seconds = time.monotonic() - t0
    log.info("trained %s in %.0f s, final loss %.4f", spec.name, seconds, loss)
    return TrainResult(run_dir=spec.output_root / spec.run_name, final_loss=loss,
                       steps=lineage["steps"], seconds=seconds)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "stages.demo.train", "Fine-tune the demo LoRA adapter for one demo run "
        "(demo.runs.<name> in params.yaml) and write a run folder shaped like a real trainer's.",)
    parser.add_argument("--run", required=True, help="demo run name (a key of demo.runs)")
    parser.add_argument("--base", type=Path, required=True, help="base model folder (HF format)")

    def body(args) -> None:
        params = load_params(args.params)
        run(spec=params.demo_run(args.run), base=args.base, base_id=params.demo_base_id)

    return run_stage(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
