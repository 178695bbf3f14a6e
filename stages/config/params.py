"""params.yaml: schema, validation and loading.

Every stage loads params through :func:`load_params`, so a bad key fails
before any work, with a message naming the key.  The schema is frozen
dataclasses that validate themselves in ``__post_init__``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.core.errors import ReleaseError
from stages.config.evaluate import EvalSettings, parse_overrides
from stages.config.schema import need as _need
from stages.config.schema import unknown as _unknown

# Levels llama-quantize accepts, from tools/quantize/quantize.cpp
# (QUANT_OPTIONS, llama-cpp-python 0.3.36).
QUANT_LEVELS: frozenset[str] = frozenset(
    "Q1_0 Q2_0 Q4_0 Q4_1 MXFP4_MOE Q5_0 Q5_1 IQ2_XXS IQ2_XS IQ2_S IQ2_M IQ1_S IQ1_M "
    "TQ1_0 TQ2_0 Q2_K Q2_K_S IQ3_XXS IQ3_S IQ3_M Q3_K IQ3_XS Q3_K_S Q3_K_M Q3_K_L "
    "IQ4_NL IQ4_XS Q4_K Q4_K_S Q4_K_M Q5_K Q5_K_S Q5_K_M Q6_K Q8_0 F16 BF16 F32".split()
)
# These need an importance matrix (llama-imatrix), which we do not build yet.
IMATRIX_LEVELS: frozenset[str] = frozenset(
    "IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ2_M Q2_K_S".split()
)
# Tensor types llama-quantize takes for --output-tensor-type / --token-embedding-type.
TENSOR_TYPES: frozenset[str] = frozenset(
    "f32 f16 bf16 q8_0 q6_k q5_k q5_0 q5_1 q4_k q4_0 q4_1 q3_k q2_k".split()
)
CONVERT_OUTTYPES: tuple[str, ...] = ("bf16", "f16")
FORMATS: tuple[str, ...] = ("gguf",)
TARGET_KINDS: tuple[str, ...] = ("local", "hub")
# Trainer keys become folder and DVC stage names (quantize@<trainer>-<LEVEL>).
TRAINER_KEY = re.compile(r"^[a-z0-9][a-z0-9_]*$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Target:
    """Where one format is published: a local folder, or a Hub repo."""

    kind: str
    path: Path | None = None
    repo_id: str | None = None
    private: bool = True
    where: str = "target"

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ReleaseError(
                f"params: `{self.where}.kind` is {self.kind!r}; use one of {', '.join(TARGET_KINDS)}"
            )
        if self.kind == "local" and not self.path:
            raise ReleaseError(f"params: `{self.where}.path` is needed for a local target")
        if self.kind == "hub" and not (self.repo_id and REPO_ID.match(self.repo_id)):
            raise ReleaseError(
                f"params: `{self.where}.repo_id` is {self.repo_id!r}; a Hub target needs "
                "`owner/name`"
            )

    @classmethod
    def parse(cls, data: Any, where: str) -> Target:
        kind = _need(data, "kind", where, str)
        _unknown(data, {"kind", "path", "repo_id", "private"}, where)
        path = data.get("path")
        return cls(
            kind=kind,
            path=Path(path) if path else None,
            repo_id=data.get("repo_id"),
            private=bool(data.get("private", True)),
            where=where,
        )


@dataclass(frozen=True)
class FormatRelease:
    """One published format of a trainer (only ``gguf`` for now)."""

    format: str
    target: Target
    ollama_level: str | None = None

    @classmethod
    def parse(cls, fmt: str, data: Any, where: str) -> FormatRelease:
        if fmt not in FORMATS:
            raise ReleaseError(
                f"params: `{where}` names format {fmt!r}; supported: {', '.join(FORMATS)}"
            )
        _unknown(data, {"target", "ollama_level"}, where)
        target = Target.parse(_need(data, "target", where, dict), f"{where}.target")
        return cls(format=fmt, target=target, ollama_level=data.get("ollama_level"))


@dataclass(frozen=True)
class BaseModel:
    """The base a trainer's adapter was trained on."""

    id: str
    path: Path


@dataclass(frozen=True)
class Trainer:
    """One trainer entry: its run, its base, and what to publish."""

    key: str
    adapter: Path
    base_model: BaseModel
    name: str
    license: str
    tags: tuple[str, ...]
    release: dict[str, FormatRelease]
    output_root: Path | None = None
    # Overrides applied before conversion, for trainers that save a broken one.
    chat_template: str | None = None
    eos_token: str | None = None

    def __post_init__(self) -> None:
        if not TRAINER_KEY.match(self.key):
            raise ReleaseError(
                f"params: trainer key {self.key!r} must be lower-case letters, digits and _ "
                "(it names folders and DVC stages)"
            )
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name):
            raise ReleaseError(
                f"params: `trainers.{self.key}.name` is {self.name!r}; use letters, digits, "
                "'.', '_' and '-' (it names the published files)"
            )

    @property
    def run_dir(self) -> Path:
        """The run folder (holds final_model/ and training_lineage.json)."""
        return self.adapter.parent

    @classmethod
    def parse(cls, key: str, data: Any) -> Trainer:
        where = f"trainers.{key}"
        _need({where: data}, where, "params", dict)
        _unknown(data, {"adapter", "output_root", "base_model", "name", "license", "tags",
                        "release", "chat_template", "eos_token"}, where)
        base = _need(data, "base_model", where, dict)
        _unknown(base, {"id", "path"}, f"{where}.base_model")
        release = _need(data, "release", where, dict)
        if not release:
            raise ReleaseError(f"params: `{where}.release` lists no format; add e.g. `gguf:`")
        tags = data.get("tags", [])
        chat_template, eos_token = parse_overrides(data, where)
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ReleaseError(f"params: `{where}.tags` must be a list of strings, got {tags!r}")
        return cls(
            key=key,
            adapter=Path(_need(data, "adapter", where, str)),
            base_model=BaseModel(
                id=_need(base, "id", f"{where}.base_model", str),
                path=Path(_need(base, "path", f"{where}.base_model", str)),
            ),
            name=_need(data, "name", where, str),
            license=_need(data, "license", where, str),
            tags=tuple(tags),
            release={
                fmt: FormatRelease.parse(fmt, cfg, f"{where}.release.{fmt}")
                for fmt, cfg in release.items()
            },
            output_root=Path(data["output_root"]) if data.get("output_root") else None,
            chat_template=chat_template,
            eos_token=eos_token,
        )


@dataclass(frozen=True)
class QuantLevel:
    """One llama-quantize level and its options."""

    name: str
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False

    def __post_init__(self) -> None:
        where = f"quantize.levels.{self.name}"
        if self.name not in QUANT_LEVELS:
            raise ReleaseError(
                f"params: `{where}`: {self.name!r} is not a llama-quantize level; "
                f"known: {', '.join(sorted(QUANT_LEVELS))}"
            )
        if self.name in IMATRIX_LEVELS:
            raise ReleaseError(
                f"params: `{where}`: {self.name} needs an importance matrix, which this "
                "pipeline does not compute yet; pick a K-quant such as Q3_K_M or Q4_K_M"
            )
        for key in ("output_tensor_type", "token_embedding_type"):
            value = getattr(self, key)
            if value is not None and value not in TENSOR_TYPES:
                raise ReleaseError(
                    f"params: `{where}.{key}` is {value!r}; use one of {', '.join(sorted(TENSOR_TYPES))}"
                )

    def quantize_args(self) -> list[str]:
        """Extra llama-quantize flags for this level's options."""
        args: list[str] = []
        if self.output_tensor_type:
            args += ["--output-tensor-type", self.output_tensor_type]
        if self.token_embedding_type:
            args += ["--token-embedding-type", self.token_embedding_type]
        if self.pure:
            args.append("--pure")
        return args

    @classmethod
    def parse(cls, name: str, data: Any) -> QuantLevel:
        where = f"quantize.levels.{name}"
        data = data or {}
        if not isinstance(data, dict):
            raise ReleaseError(f"params: `{where}` must be a mapping of options (or {{}})")
        _unknown(data, {"output_tensor_type", "token_embedding_type", "pure"}, where)
        return cls(name=name, **data)


@dataclass(frozen=True)
class DemoRun:
    """One embedded demo training run (``demo.runs.<name>``)."""

    name: str
    method: str
    dataset: Path
    output_root: Path
    run_name: str
    steps: int
    batch_size: int
    learning_rate: float
    lora_r: int
    lora_alpha: int
    max_length: int
    seed: int

    def __post_init__(self) -> None:
        where = f"demo.runs.{self.name}"
        if self.method not in ("sft", "kto"):
            raise ReleaseError(f"params: `{where}.method` is {self.method!r}; use sft or kto")
        for key in ("steps", "batch_size", "lora_r", "lora_alpha", "max_length"):
            if getattr(self, key) <= 0:
                raise ReleaseError(f"params: `{where}.{key}` must be positive")

    @classmethod
    def parse(cls, name: str, data: Any) -> DemoRun:
        where = f"demo.runs.{name}"
        fields = {"method": str, "dataset": str, "output_root": str, "run_name": str,
                  "steps": int, "batch_size": int, "learning_rate": float, "lora_r": int,
                  "lora_alpha": int, "max_length": int, "seed": int}
        _unknown(data if isinstance(data, dict) else {}, set(fields), where)
        values = {k: _need(data, k, where, (float, int) if t is float else t)
                  for k, t in fields.items()}
        values["dataset"] = Path(values["dataset"])
        values["output_root"] = Path(values["output_root"])
        values["learning_rate"] = float(values["learning_rate"])
        return cls(name=name, **values)


@dataclass(frozen=True)
class Params:
    """All of params.yaml, validated."""

    llama_cpp_version: str
    convert_outtype: str
    levels: dict[str, QuantLevel]
    trainers: dict[str, Trainer]
    evaluate: EvalSettings
    demo_base_id: str = ""
    demo_runs: dict[str, DemoRun] = field(default_factory=dict)
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.convert_outtype not in CONVERT_OUTTYPES:
            raise ReleaseError(
                f"params: `convert.outtype` is {self.convert_outtype!r}; "
                f"use one of {', '.join(CONVERT_OUTTYPES)}"
            )
        if not self.levels:
            raise ReleaseError("params: `quantize.levels` is empty; list at least one level")
        self.evaluate.check_levels(list(self.levels))
        for trainer in self.trainers.values():
            gguf = trainer.release.get("gguf")
            if gguf and gguf.ollama_level and gguf.ollama_level not in self.levels:
                raise ReleaseError(
                    f"params: `trainers.{trainer.key}.release.gguf.ollama_level` is "
                    f"{gguf.ollama_level!r}, which is not in quantize.levels "
                    f"({', '.join(self.levels)})"
                )

    def trainer(self, key: str) -> Trainer:
        """The trainer entry ``key``, or an error listing the known ones."""
        if key not in self.trainers:
            raise ReleaseError(
                f"no trainer {key!r} in params.yaml; known: {', '.join(self.trainers) or 'none'}"
            )
        return self.trainers[key]

    def demo_run(self, name: str) -> DemoRun:
        """The demo training run ``name``."""
        if name not in self.demo_runs:
            raise ReleaseError(
                f"no demo run {name!r} in demo.runs; known: {', '.join(self.demo_runs) or 'none'}"
            )
        return self.demo_runs[name]

    def level(self, name: str) -> QuantLevel:
        """The quantization level ``name``, or an error listing the known ones."""
        if name not in self.levels:
            raise ReleaseError(
                f"no level {name!r} in quantize.levels; known: {', '.join(self.levels)}"
            )
        return self.levels[name]


def parse_params(data: Any) -> Params:
    """Validate a params mapping (as loaded from YAML)."""
    if not isinstance(data, dict):
        raise ReleaseError("params: the file must hold a mapping at the top level")
    llama = _need(data, "llama_cpp", "params", dict)
    convert = data.get("convert", {}) or {}
    quant = _need(data, "quantize", "params", dict)
    levels = _need(quant, "levels", "quantize", dict)
    trainers = _need(data, "trainers", "params", dict)
    demo = data.get("demo") or {}
    runs = demo.get("runs") or {}
    return Params(
        demo_base_id=str(demo.get("base_id", "")),
        demo_runs={str(name): DemoRun.parse(str(name), cfg) for name, cfg in runs.items()},
        llama_cpp_version=str(_need(llama, "version", "llama_cpp", (str, int, float))),
        convert_outtype=str(convert.get("outtype", "bf16")),
        levels={str(name): QuantLevel.parse(str(name), cfg) for name, cfg in levels.items()},
        trainers={str(key): Trainer.parse(str(key), cfg) for key, cfg in trainers.items()},
        evaluate=EvalSettings.parse(_need(data, "evaluate", "params", dict)),
        raw=data,
    )


def load_params(path: Path) -> Params:
    """Load and validate ``path`` (params.yaml)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReleaseError(f"params file {path} not found; run from the repository root") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ReleaseError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(data)
