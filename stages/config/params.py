"""params.yaml: schema, validation and loading.

Every stage loads params through :func:`load_params`, so a bad key fails
before any work, with one message naming the dotted key.  The schema is
pydantic models (frozen, unknown keys refused) whose sections mirror the file;
``Params`` also offers the flat names the stages use (``params.levels``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stages.config.base import (
    NOTHING,
    Count,
    Flag,
    Index,
    Keyed,
    ParamsModel,
    PathText,
    Positive,
    Text,
    named,
    own_key,
    params_error,
    pattern,
    problem,
)
from stages.config.evaluate import EvalSettings
from stages.config.hub import HUB_FILE_LIMIT, LICENSE_NAME, license_problem
from stages.core.errors import ParamsError, ReleaseError

# Levels llama-quantize accepts, from tools/quantize/quantize.cpp (QUANT_OPTIONS,
# llama-cpp-python 0.3.36; tests/test_bad_input.py compares), less COPY: it copies
# the input unchanged, which is no release level.
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
TensorType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_0", "q5_1", "q4_k",
                     "q4_0", "q4_1", "q3_k", "q2_k"]
TENSOR_TYPES: frozenset[str] = frozenset(get_args(TensorType))
ConvertOuttype = Literal["bf16", "f16"]
# The merged format's 16-bit dtype.
MergedDtype = Literal["bf16", "f16"]
CONVERT_OUTTYPES: tuple[str, ...] = get_args(ConvertOuttype)
# Release formats, in the order they are pushed (the GGUF card links the others).
FORMATS: tuple[str, ...] = ("adapter", "merged", "merged_4bit", "gguf")
# The options of release.<format> beside `target`, by format.
FORMAT_OPTIONS: dict[str, frozenset[str]] = {
    "adapter": frozenset({"gguf_lora"}),
    "merged": frozenset({"dtype"}),
    "merged_4bit": frozenset(),
    "gguf": frozenset({"ollama_level", "split_max_size"}),
}
TargetKind = Literal["local", "hub"]
TARGET_KINDS: tuple[str, ...] = get_args(TargetKind)
# Trainer keys become folder and DVC stage names (quantize@<trainer>-<LEVEL>).
TRAINER_KEY = r"[a-z0-9][a-z0-9_]*"
REPO_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"
PUBLISHED_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
# llama-gguf-split's --split-max-size: N(M|G), 1000-based (gguf-split.cpp,
# split_str_to_n_bytes); N is read with %d, so at most 9 digits keeps it an int.
SPLIT_SIZE = r"([1-9][0-9]{0,8})([MG])"
SPLIT_UNITS = {"M": 1000**2, "G": 1000**3}
# Tensors of a shard stay within 49 * 10^9 bytes; the first shard adds the metadata
# (tokenizer and chat template: tens of MB at most), so every shard is under the Hub's
# 50 * 10^9 with ~1 GB to spare.
DEFAULT_SPLIT_MAX_SIZE = "49G"


def _quant_level(name: str) -> str:
    if name not in QUANT_LEVELS:
        raise problem(f"is not a llama-quantize level; known: {', '.join(sorted(QUANT_LEVELS))}")
    if name in IMATRIX_LEVELS:
        raise problem("needs an importance matrix, which this pipeline does not compute yet; "
                      "pick a K-quant such as Q3_K_M or Q4_K_M")
    return name


def _format(name: str) -> str:
    if name not in FORMATS:
        raise problem(f"is not a format this pipeline publishes; supported: {', '.join(FORMATS)}")
    return name


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantize on this machine's CPU (None: it can).  Checked
    without importing it (that imports torch): the package and its CPU library."""
    import importlib.util

    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return "bitsandbytes is not installed in this environment (`make venv` installs it)"
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not any(folder.glob("libbitsandbytes_cpu.*")):
        return (f"this bitsandbytes has no CPU library (libbitsandbytes_cpu) in {folder.name}/, "
                "so it cannot quantize without a GPU")
    return None


def _some(hint: str) -> AfterValidator:
    """A mapping with at least one entry, each told its key."""
    def check(mapping: dict) -> dict:
        if not mapping:
            raise problem(f"is empty; {hint}")
        return named(mapping)
    return AfterValidator(check)


TrainerKey = Annotated[Text, pattern(
    TRAINER_KEY, "must be lower-case letters, digits and _; it names folders and DVC stages")]
LevelName = Annotated[Text, AfterValidator(_quant_level)]
FormatName = Annotated[Text, AfterValidator(_format)]


def split_size_bytes(text: str) -> int:
    """Bytes of a ``--split-max-size`` value, as llama-gguf-split reads it (``48G``)."""
    match = re.fullmatch(SPLIT_SIZE, text)
    if match is None:
        raise ValueError(f"{text!r} is not N(M|G)")
    return int(match[1]) * SPLIT_UNITS[match[2]]


class Target(ParamsModel):
    """Where one format is published: ``{kind: local, path}`` or ``{kind: hub, repo_id}``."""

    kind: TargetKind
    path: PathText | None = None  # local
    repo_id: Annotated[Text, pattern(REPO_ID, "must be a Hub repo id, `owner/name`")] | None = None
    private: Flag = True  # hub, and so are the rest
    revision: Text | None = None
    tag: Text | None = None

    @model_validator(mode="after")
    def _fits_kind(self) -> Target:
        needed, why = (("path", "the folder to publish to") if self.kind == "local"
                       else ("repo_id", "a Hub repo id, `owner/name`"))
        if getattr(self, needed) is None:
            raise problem(f"is missing; a {self.kind} target needs {why}", at=needed, got=NOTHING)
        hub_only = {"repo_id", "private", "revision", "tag"}
        foreign = sorted(self.model_fields_set & (hub_only if self.kind == "local" else {"path"}))
        if foreign:
            raise problem(f"does not apply to a {self.kind} target", at=foreign[0],
                          got=getattr(self, foreign[0]))
        return self


class FormatRelease(Keyed):
    """One published format of a trainer: its target and its options
    (:data:`FORMAT_OPTIONS`; the trainer checks each applies to its format)."""

    target: Target
    # adapter: also publish the adapter as a GGUF LoRA (llama.cpp's --lora)
    gguf_lora: Flag = True
    # merged: the published weights' dtype (a float tensor of another dtype is cast)
    dtype: MergedDtype = "bf16"
    ollama_level: Text | None = None  # the level `ollama run` gets; checked against the levels
    # A GGUF bigger than this is published in shards (llama-gguf-split); never Ollama's level.
    split_max_size: Annotated[Text, pattern(
        SPLIT_SIZE, "must be a size as llama-gguf-split takes it: a whole number and M or G "
        f"(1000-based), e.g. `{DEFAULT_SPLIT_MAX_SIZE}`")] = DEFAULT_SPLIT_MAX_SIZE

    format = own_key("The key under ``release:`` (``adapter``, ``merged``, ``merged_4bit``, "
                     "``gguf``).")

    @property
    def split_max_bytes(self) -> int:
        """``split_max_size`` in bytes."""
        return split_size_bytes(self.split_max_size)

    @model_validator(mode="after")
    def _shards_fit_the_hub(self) -> FormatRelease:
        if self.target.kind == "hub" and self.split_max_bytes >= HUB_FILE_LIMIT:
            raise problem(f"leaves shards the Hub refuses: it takes files up to 50 GB (and the "
                          f"first shard adds the metadata); use e.g. `{DEFAULT_SPLIT_MAX_SIZE}`",
                          at="split_max_size", got=self.split_max_size)
        return self


class BaseModelRef(ParamsModel):
    """The base a trainer's adapter was trained on."""

    id: Text
    path: PathText


class Trainer(Keyed):
    """One trainer entry: its run, its base, and what to publish."""

    adapter: PathText
    base_model: BaseModelRef
    name: Annotated[Text, pattern(PUBLISHED_NAME, "must be letters, digits, '.', '_' and '-'; "
                                  "it names the published files")]
    license: Text  # a Hub license id (config/hub.py), or `other` with the next two
    license_name: Annotated[Text, pattern(
        LICENSE_NAME, "must be lower-case letters, digits, '-' and '.' (the Hub's rule)")] \
        | None = None
    license_link: Text | None = None
    tags: tuple[Text, ...] = ()
    release: Annotated[dict[FormatName, FormatRelease], _some("add e.g. `gguf:`")]
    output_root: PathText | None = None  # where the trainer writes <timestamp>/final_model
    # Overrides applied before conversion, for trainers that save a broken one.
    chat_template: str | None = None
    eos_token: str | None = None

    @field_validator("chat_template", "eos_token", mode="before")
    @classmethod
    def _override_text(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or (isinstance(value, str) and value.strip()):
            return value
        what = str(info.field_name).replace("_", " ")
        raise problem(f"must be non-empty text: the {what}; or remove the key to keep the "
                      "trainer's own")

    key = own_key("The key under ``trainers:`` (it names folders and DVC stages).")

    @model_validator(mode="after")
    def _license_known(self) -> Trainer:
        found = license_problem(self.license, self.license_name, self.license_link)
        if found:
            key, what = found
            value = getattr(self, key)
            raise problem(what, at=key, got=NOTHING if value is None else value)
        return self

    @model_validator(mode="after")
    def _options_fit_formats(self) -> Trainer:
        for fmt, release in self.release.items():
            foreign = sorted(release.model_fields_set - {"target"} - FORMAT_OPTIONS[fmt])
            if foreign:
                allowed = ", ".join(sorted(FORMAT_OPTIONS[fmt])) or "none"
                raise problem(f"does not apply to the {fmt} format (its options: {allowed})",
                              at=f"release.{fmt}.{foreign[0]}",
                              got=getattr(release, foreign[0]))
        return self

    @model_validator(mode="after")
    def _4bit_possible(self) -> Trainer:
        if "merged_4bit" in self.release:
            why = bitsandbytes_problem()
            if why:
                raise problem(f"cannot be built here: {why}. Publish 4-bit weights as GGUF "
                              "instead (`gguf:` with the Q4_K_M level), or the `adapter`",
                              at="release.merged_4bit", got=NOTHING)
        return self

    def releases(self, fmt: str | None = None) -> list[str]:
        """The formats this trainer releases, in push order (:data:`FORMATS`); with
        ``fmt``, ``[fmt]`` when it releases it."""
        if fmt is not None and fmt not in self.release:
            raise ReleaseError(f"trainer {self.key} does not release {fmt}; it releases "
                               f"{', '.join(self.releases())} (trainers.{self.key}.release)")
        return [f for f in FORMATS if f in self.release and fmt in (None, f)]

    @property
    def run_dir(self) -> Path:
        """The run folder (holds final_model/ and training_lineage.json)."""
        return self.adapter.parent


class QuantLevel(Keyed):
    """One llama-quantize level and its options."""

    output_tensor_type: TensorType | None = None
    token_embedding_type: TensorType | None = None
    pure: Flag = False
    name = own_key("The level, as llama-quantize spells it (``Q4_K_M``).")

    @model_validator(mode="before")
    @classmethod
    def _no_options(cls, data: Any) -> Any:
        return {} if data is None else data  # `Q8_0:` means `Q8_0: {}`

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


class DemoRun(Keyed):
    """One embedded demo training run (``demo.runs.<name>``)."""

    method: Literal["sft", "kto"]
    dataset: PathText
    output_root: PathText
    run_name: Text
    steps: Count
    batch_size: Count
    learning_rate: Positive
    lora_r: Count
    lora_alpha: Count
    max_length: Count
    seed: Index
    name = own_key("The key under ``demo.runs:``.")


class LlamaCpp(ParamsModel):
    """``llama_cpp:``: the llama-cpp-python sdist whose llama.cpp we build and run."""

    version: Text


class Convert(ParamsModel):
    """``convert:``: the full-precision GGUF every level is quantized from."""

    outtype: ConvertOuttype = "bf16"


class Quantize(ParamsModel):
    """``quantize:``: one key per level, in the order of the file."""

    levels: Annotated[dict[LevelName, QuantLevel], _some("list at least one level")]


class Demo(ParamsModel):
    """``demo:``: the embedded default inputs (base model and training runs)."""

    base_id: Text = ""
    base_package: Text | None = None  # read by dvc.yaml only
    base_path: PathText | None = None  # read by dvc.yaml only
    runs: Annotated[dict[Text, DemoRun], AfterValidator(named)] = {}


class Params(ParamsModel):
    """All of params.yaml, validated."""

    llama_cpp: LlamaCpp
    convert: Convert = Convert()
    quantize: Quantize
    evaluate: EvalSettings
    trainers: Annotated[dict[TrainerKey, Trainer], AfterValidator(named)]
    demo: Demo = Demo()
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _levels_known(self) -> Params:
        self.evaluate.check_levels(list(self.levels))
        for key in self.evaluate.smoke.skip:
            if key not in self.trainers:
                raise problem(f"is no trainer; known: {', '.join(self.trainers)}",
                              at="evaluate.smoke.skip", got=key)
        for trainer in self.trainers.values():
            for fmt, release in trainer.release.items():
                if release.ollama_level and release.ollama_level not in self.levels:
                    raise problem(f"is not in quantize.levels ({', '.join(self.levels)})",
                                  at=f"trainers.{trainer.key}.release.{fmt}.ollama_level",
                                  got=release.ollama_level)
        return self

    # The flat names the stages use.
    @property
    def llama_cpp_version(self) -> str:
        return self.llama_cpp.version

    @property
    def convert_outtype(self) -> str:
        return self.convert.outtype

    @property
    def levels(self) -> dict[str, QuantLevel]:
        return self.quantize.levels

    @property
    def demo_base_id(self) -> str:
        return self.demo.base_id

    @property
    def demo_runs(self) -> dict[str, DemoRun]:
        return self.demo.runs

    @property
    def raw(self) -> dict[str, Any]:
        """The mapping as loaded, published in the model card."""
        return self._raw

    def trainer(self, key: str) -> Trainer:
        """The trainer entry ``key``, or an error listing the known ones."""
        return _lookup(self.trainers, key, "trainer", "params.yaml")

    def demo_run(self, name: str) -> DemoRun:
        """The demo training run ``name``, or an error listing the known ones."""
        return _lookup(self.demo_runs, name, "demo run", "demo.runs")

    def level(self, name: str) -> QuantLevel:
        """The quantization level ``name``, or an error listing the known ones."""
        return _lookup(self.levels, name, "level", "quantize.levels")


def _lookup(mapping: dict[str, Any], key: str, noun: str, where: str) -> Any:
    if key not in mapping:
        raise ReleaseError(f"no {noun} {key!r} in {where}; known: {', '.join(mapping) or 'none'}")
    return mapping[key]


def parse_params(data: Any) -> Params:
    """Validate a params mapping (as loaded from YAML)."""
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise params_error(exc, Params) from None
    params._raw = data
    return params


def load_params(path: Path, *, pipeline: bool = True) -> Params:
    """Load and validate ``path`` (params.yaml); with ``pipeline``, also check that the
    ``pipeline.yaml`` beside it is current (stages/config/pipeline.py)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found; run from the repository root "
                          "(or pass --params)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc)
        if context and getattr(exc, "context", None):  # e.g. a bracket opened lines earlier
            what += f" ({exc.context} from line {context.line + 1})"
        raise ParamsError(f"params: {path}{line}: not valid YAML: {what}") from None
    params = parse_params(data)
    if pipeline:
        from stages.config.pipeline import check_current  # it builds on this module

        check_current(path, params)
    return params
