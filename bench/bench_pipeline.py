"""Benchmark: every pipeline stage on a synthetic Llama, beside its tools run alone.

A bf16 Llama of TinyLlama's shape (1.1B) or Llama-3.2-3B's (3B), random weights,
with the demo base's tokenizer (its vocabulary size), an r=16 LoRA on every
linear layer (bench_merge.py's generator; cached in
``${XDG_CACHE_HOME:-~/.cache}/llm-release/bench/pipeline-<size>/``), is added as
the only trainer of a temporary copy of this repository.  Each stage command
(merge, convert, convert_base, quantize Q8_0 and Q4_K_M, logits, reference,
evaluate per level, card) runs as dvc.yaml resolves it, under ``/usr/bin/time
-v`` (wall time, and the peak RSS of the largest process of its tree), then the
tool it wraps runs alone on the same inputs: ``cp -r`` for the merge,
``convert_hf_to_gguf.py``, ``llama-quantize``, ``llama-perplexity``.  The table
gives each stage's overhead over its tools as a ratio: the fastest of
``--repeat`` passes of each (stage then tool on the first pass, tool then stage
after), since one pass of either varies by up to 20% here.  Each command starts
with its inputs read into the page cache and the previous command's writes on
disk (``warm``, ``settled``), as in a pipeline run.  Reference and card wrap
no tool: they are our checks (adapter tensors against peft's merge, HF vs GGUF,
the adapter's effect) and our release files, shown with their cost alone.

The stage commands run directly, not through ``dvc repro`` (but, as it does, with
their outputs removed first): DVC's hashing of
gigabytes of outputs is DVC's cost, the same for any stage, and is not what
this measures.  Few evaluation chunks (``--chunks``), no smoke turn (random
weights never stop), thresholds off (random weights have no quality to keep).

Usage:  .venv/bin/python bench/bench_pipeline.py [--size 1.1B|3B] [--chunks 2]
Needs the demo base (``make demo`` or ``dvc repro prepare_base``) and the tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_merge import (  # noqa: E402
    SHAPES,
    build_adapter,
    build_base,
    cache_root,
    timed,
    warm,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
LEVELS = ("Q8_0", "Q4_K_M")
KEY = "big"


@dataclass(frozen=True)
class Row:
    stage: str
    wall: float
    rss_gb: float
    tool: str = ""
    tool_wall: float | None = None
    tool_rss_gb: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.wall / self.tool_wall if self.tool_wall else None


def settled(cmd, cwd: Path) -> tuple[float, float]:
    """``timed`` after ``sync``: the previous command's gigabytes of dirty pages are on
    disk before the clock starts, not written back during the next one (a 3B Q8_0 took
    14.7 s alone in one pass and 24.3 s in the other without it)."""
    os.sync()
    return timed(cmd, cwd)


def demo_base() -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    base = REPO / params["demo"]["base_path"]
    if not (base / "tokenizer.json").is_file():
        raise SystemExit(f"{base} is not built: run `make demo` (or `dvc repro prepare_base`)")
    return base


def ensure_models(size: str, tok_source: Path) -> tuple[Path, Path]:
    """The synthetic base (the demo's tokenizer and vocabulary) and its adapter, once."""
    vocab = json.loads((tok_source / "config.json").read_text())["vocab_size"]
    shape = {**SHAPES[size], "vocab_size": vocab}
    root = cache_root() / f"pipeline-{size}"
    root.mkdir(parents=True, exist_ok=True)
    base, adapter = root / "base", root / "adapter"
    if not base.is_dir():
        print(f"generating the {size} base in {base} (once)", file=sys.stderr)
        build_base(base, shape)
        for name in TOKENIZER_FILES:
            if (tok_source / name).is_file():
                shutil.copy2(tok_source / name, base / name)
    if not adapter.is_dir():
        build_adapter(adapter, base, shape)
        (root / "training_lineage.json").write_text(json.dumps(
            {"trainer": "bench", "note": "synthetic adapter, random weights"}))
    return base, adapter


def work_repo(root: Path, base: Path, adapter: Path, size: str, chunks: int) -> Path:
    """A copy of this repository whose one trainer is the synthetic model."""
    from tests.pipeline import copy_repo

    repo = copy_repo(REPO, root / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["trainers"] = {KEY: {
        "output_root": str(adapter.parent), "adapter": str(adapter),
        "base_model": {"id": f"bench/synthetic-llama-{size}", "path": str(base)},
        "name": f"synthetic-llama-{size}", "license": "apache-2.0", "tags": ["bench"],
        "release": {"gguf": {"ollama_level": "Q4_K_M",
                             "target": {"kind": "local", "path": f"published/{KEY}/gguf"}}}}}
    params["quantize"]["levels"] = {level: {} for level in LEVELS}
    ev = params["evaluate"]
    ev["chunks"] = chunks
    ev["conversion"]["chunks"] = min(chunks, ev["conversion"]["chunks"])
    ev["smoke"]["skip"] = [KEY]
    ev["max_kld"] = {"default": 1e9}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from stages.config.params import load_params
    from stages.config.pipeline import PIPELINE_FILE, render

    (repo / PIPELINE_FILE).write_text(render(load_params(repo / "params.yaml", pipeline=False)))
    return repo


@dataclass(frozen=True)
class Stage:
    cmd: str
    deps: tuple[Path, ...]
    outs: tuple[Path, ...]

    def run(self, repo: Path) -> tuple[float, float]:
        """As ``dvc repro`` runs it: its outputs removed first, then its command (its
        inputs warm)."""
        for out in self.outs:
            shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
        warm(self.deps)
        return settled(self.cmd, repo)


def stage_commands(repo: Path) -> dict[str, Stage]:
    """Each stage's command and outputs as DVC resolves them from dvc.yaml (no hashing,
    nothing run)."""
    from dvc.repo import Repo

    wanted = [f"merge@{KEY}", f"convert@{KEY}", f"convert_base@{KEY}",
              *(f"quantize@{KEY}-{lv}" for lv in LEVELS), f"logits@{KEY}", f"reference@{KEY}",
              *(f"evaluate@{KEY}-{lv}" for lv in LEVELS), f"card@{KEY}"]
    with Repo(str(repo)) as dvc:
        stages = {stage.name: Stage(stage.cmd, tuple(Path(d.fs_path) for d in stage.deps
                                                     if not Path(d.fs_path).is_relative_to(
                                                         repo / "stages")),
                                    tuple(Path(o.fs_path) for o in stage.outs))
                  for stage in dvc.index.stages}
    return {name: stages[name] for name in wanted}


def tool_commands(repo: Path, base: Path, scratch: Path) -> dict[str, tuple[str, list[str]]]:
    """The tools alone, on the inputs the stages had, writing into ``scratch``."""
    from stages.config.params import load_params
    from stages.core.preflight import threads
    from stages.llamacpp.tools import source_dir, tool_path

    p = load_params(repo / "params.yaml")
    version, work = p.llama_cpp_version, repo / f"build/{KEY}/work"
    perplexity = str(tool_path("llama-perplexity", version))
    ev, t = p.evaluate, str(threads())
    base_run = [perplexity, "-m", str(work / "full.gguf"), "-f", str(repo / ev.text),
                "-c", str(ev.ctx), "--chunks", str(ev.chunks), "-t", t,
                "--kl-divergence-base", str(scratch / "ref.kld")]
    tools = {
        f"merge@{KEY}": ("cp -r", ["cp", "-r", str(base), str(scratch / "copy")]),
        f"convert@{KEY}": ("convert_hf_to_gguf.py", [
            sys.executable, str(source_dir(version) / "convert_hf_to_gguf.py"),
            str(work / "merged"), "--outfile", str(scratch / "full.gguf"),
            "--outtype", p.convert_outtype]),
        f"convert_base@{KEY}": ("convert_hf_to_gguf.py", [
            sys.executable, str(source_dir(version) / "convert_hf_to_gguf.py"),
            str(base), "--outfile", str(scratch / "base.gguf"), "--outtype", p.convert_outtype]),
        f"logits@{KEY}": ("llama-perplexity (base logits)", base_run),
    }
    for level in LEVELS:
        tools[f"quantize@{KEY}-{level}"] = ("llama-quantize", [
            str(tool_path("llama-quantize", version)), str(work / "full.gguf"),
            str(scratch / f"{level}.gguf"), level, t])
        tools[f"evaluate@{KEY}-{level}"] = ("llama-perplexity (KLD)", [
            perplexity, "-m", str(work / f"quant/{level}.gguf"), "-f", str(repo / ev.text),
            "-c", str(ev.ctx), "--chunks", str(ev.chunks), "-t", t,
            "--kl-divergence-base", str(work / "reference.kld"), "--kl-divergence"])
    return tools


def report(rows: list[Row], size: str, chunks: int, repeat: int) -> str:
    lines = [f"synthetic Llama {size}, {chunks} evaluation chunks, {os.cpu_count()} cores; "
             f"fastest of {repeat} passes, peak RSS the largest", "",
             "| stage | wall (s) | peak RSS (GB) | tool alone | wall (s) | peak RSS (GB) | "
             "stage / tool |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        tool = (f"{r.tool} | {r.tool_wall:.1f} | {r.tool_rss_gb:.2f} | {r.ratio:.2f}×"
                if r.tool_wall else "— | | | ")
        lines.append(f"| {r.stage} | {r.wall:.1f} | {r.rss_gb:.2f} | {tool} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="3B")
    parser.add_argument("--chunks", type=int, default=2, help="evaluation chunks (ctx 256)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="passes over each stage and its tool (the table keeps the fastest "
                             "of each: one pass varies by up to 20%% on a shared machine)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    base, adapter = ensure_models(args.size, demo_base())
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=cache_root()))
    rows: list[Row] = []
    try:
        repo = work_repo(root, base, adapter, args.size, args.chunks)
        commands = stage_commands(repo)
        scratch = root / "scratch"
        scratch.mkdir()
        for stage, st in commands.items():
            print(f"{stage}: {st.cmd}", file=sys.stderr)
            wall, rss = st.run(repo)
            rows.append(Row(stage, wall, rss))
            print(f"  {wall:.1f} s, {rss:.2f} GB", file=sys.stderr)
        tools = tool_commands(repo, base, scratch)
        for rnd in range(args.repeat):
            for i, row in enumerate(rows):
                if row.stage not in tools:
                    continue
                name, cmd = tools[row.stage]
                stage = commands[row.stage]
                # Pass 1 ran every stage before its tool; later passes run the tool
                # first: alternating the order cancels a drift (the other core's load)
                # between the two.
                warm(stage.deps)
                t_wall, t_rss = settled(cmd, repo)
                print(f"{row.stage}, pass {rnd + 1}: {name} alone: {t_wall:.1f} s, "
                      f"{t_rss:.2f} GB", file=sys.stderr)
                if rnd:
                    wall, rss = stage.run(repo)
                    print(f"{row.stage}, pass {rnd + 1}: stage {wall:.1f} s, {rss:.2f} GB",
                          file=sys.stderr)
                    row = replace(row, wall=min(row.wall, wall), rss_gb=max(row.rss_gb, rss))
                rows[i] = replace(row, tool=name, tool_wall=min(t_wall, row.tool_wall or t_wall),
                                  tool_rss_gb=max(t_rss, row.tool_rss_gb or 0.0))
                for leftover in scratch.iterdir():  # disk: one tool output at a time
                    if leftover.name != "ref.kld":
                        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(report(rows, args.size, args.chunks, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
