"""Benchmark: our streaming merge against ``cp -r`` and peft, side by side.

Generates (once, cached under ``${XDG_CACHE_HOME:-~/.cache}/llm-release/bench/``)
synthetic bf16 Llamas of ~1.1B (TinyLlama's shape) and ~3.2B parameters
(Llama-3.2-3B's shape, tied embeddings), in 1 GB shards, each with an r=16
LoRA adapter on every linear layer.  Each contender runs as its own process
under ``/usr/bin/time -v``; the table shows wall time and maximum resident set
size, then the ratios the merge issue sets as goals.

Usage:  .venv/bin/python bench/bench_merge.py [--sizes 1.1B 3B] [--no-peft] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIME = Path("/usr/bin/time")
SHAPES: dict[str, dict] = {
    # TinyLlama-1.1B (config.json of TinyLlama/TinyLlama-1.1B-Chat-v1.0).
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                 tie_word_embeddings=False),
    # Llama-3.2-3B (config.json of meta-llama/Llama-3.2-3B).
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
SHARD_BYTES = 10**9
# peft's merge held ~1.2x the model's bytes at 1.1B (2.6 GB peak for 2.2 GB);
# it runs only where that, with a 2 GB margin, is available.
PEFT_RAM_FACTOR = 1.25


@dataclass(frozen=True)
class Measure:
    size: str
    name: str
    wall: float | None
    rss_gb: float | None
    note: str = ""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-release" / "bench"


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a Llama with ``shape``, as transformers names them."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not shape["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,)}
    return out


def build_base(folder: Path, shape: dict) -> None:
    """Random bf16 weights in ~1 GB shards, with config.json and an index."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    gen = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    shapes, size = tensor_shapes(shape), 0
    for name, dims in shapes.items():
        nbytes = 2 * int(torch.Size(dims).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
                   for n in names}
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(2 * int(torch.Size(d).numel()) for d in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = LlamaConfig(**shape, torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    os.replace(tmp, folder)


def build_adapter(folder: Path, base: Path, shape: dict) -> None:
    """An r=16 LoRA on every linear layer, keys and config as peft saves them."""
    import torch
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, dims in tensor_shapes(shape).items():
        if name.startswith("model.layers.") and name.split(".")[-2] in TARGETS:
            stem = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{stem}.lora_A.weight"] = torch.randn(RANK, dims[1], generator=gen) * 0.01
            tensors[f"{stem}.lora_B.weight"] = torch.randn(dims[0], RANK, generator=gen) * 0.01
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
              "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": str(base), "fan_in_fan_out": False,
              "inference_mode": True}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder)


def ensure_models(size: str) -> tuple[Path, Path]:
    root = cache_root() / size
    root.mkdir(parents=True, exist_ok=True)
    base, adapter = root / "base", root / "adapter"
    if not base.is_dir():
        print(f"generating the {size} base in {base} (once)", file=sys.stderr)
        build_base(base, SHAPES[size])
    if not adapter.is_dir():
        build_adapter(adapter, base, SHAPES[size])
    return base, adapter


def timed(cmd: list[str] | str, cwd: Path = REPO) -> tuple[float, float]:
    """Wall seconds and max RSS (GB; the largest process of its tree) of ``cmd`` (a shell
    line when a string) under /usr/bin/time -v."""
    args = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    proc = subprocess.run([str(TIME), "-v", *args], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{proc.stderr[-4000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    hours, minutes, seconds = wall.groups()
    return (int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds),
            int(rss.group(1)) * 1024 / 1e9)


def warm(paths: tuple[Path, ...]) -> None:
    """Read ``paths`` (files, or folders whole) into the page cache, untimed, so every
    contender starts from the same page cache.

    3B inputs and outputs (~30 GB) do not all fit in this machine's page cache, so
    whichever of bench_pipeline's stage and tool ran first would read its input from
    disk and the second from memory (a 3B Q8_0: 25.9 s first, 15.5 s second).  Both run
    warm, as a stage does in a pipeline right after the stage that wrote its input."""
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            with open(file, "rb") as fh:
                while fh.read(64 * 2**20):
                    pass


def contenders(size: str, base: Path, adapter: Path, out: Path, *, peft: bool,
               repeat: int) -> list[Measure]:
    """After a warm-up, cp -r and ours ``repeat`` times, interleaved (median wall, highest RSS);
    peft once."""
    import psutil

    py = sys.executable
    runs = {"cp -r": ["cp", "-r", str(base), str(out)],
            "ours": [py, "-m", "stages.merge", "--base", str(base), "--adapter", str(adapter),
                     "--out", str(out), "--max-shard-size", "1GB", "--quiet"]}
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    fits = PEFT_RAM_FACTOR * model_bytes + 2e9 < psutil.virtual_memory().available
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    # One untimed run of each (hyperfine's --warmup): the first run after other
    # work pays for cold library pages and writeback, whoever the contender is.
    for cmd in runs.values():
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        shutil.rmtree(out)
    if peft and fits:
        subprocess.run([py, "-c", "import torch, transformers, peft"], check=True, cwd=REPO)
    for _ in range(repeat):
        for name, cmd in runs.items():
            seen[name].append(_measure(size, name, cmd, base, out))
    if peft and fits:
        cmd = [py, __file__, "--peft-worker", str(base), str(adapter), str(out)]
        seen["peft"] = [_measure(size, "peft", cmd, base, out)]
    rows = [Measure(size, name, statistics.median(w for w, _ in got), max(r for _, r in got))
            for name, got in seen.items()]
    if peft and not fits:
        rows.append(Measure(size, "peft", None, None, "skipped: would not fit in RAM"))
    return rows


def _measure(size: str, name: str, cmd: list[str], base: Path, out: Path) -> tuple[float, float]:
    subprocess.run(["sync"], check=True)
    warm((base,))
    wall, rss = timed(cmd)
    shutil.rmtree(out)
    print(f"{size} {name}: {wall:.1f} s, {rss:.2f} GB", file=sys.stderr)
    return wall, rss


def peft_worker(base: str, adapter: str, out: str) -> None:
    """The reference contender: peft merge_and_unload + save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size="1GB")


def machine() -> str:
    """One line naming the machine: CPU, cores, memory, load while we ran."""
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
            f"load average at the end {load}")


def report(rows: list[Measure]) -> str:
    by = {(m.size, m.name): m for m in rows}
    lines = [f"Machine: {machine()}", "",
             "| model | contender | wall (s) | max RSS (MB) |", "|---|---|---:|---:|"]
    for m in rows:
        wall = f"{m.wall:.1f}" if m.wall is not None else "-"
        rss = f"{m.rss_gb * 1000:.0f}" if m.rss_gb is not None else m.note
        lines.append(f"| {m.size} | {m.name} | {wall} | {rss} |")
    lines.append("")
    for size in dict.fromkeys(m.size for m in rows):
        cp, ours, peft = by.get((size, "cp -r")), by.get((size, "ours")), by.get((size, "peft"))
        lines.append(f"{size}: ours / cp -r wall = {ours.wall / cp.wall:.2f}"
                     + (" (goal <= 2.0)" if size == "3B" else ""))
        if peft and peft.wall:
            lines.append(f"{size}: peft / ours wall = {peft.wall / ours.wall:.1f}x, peak RSS = "
                         f"{peft.rss_gb / ours.rss_gb:.1f}x"
                         + (" (goals: >= 5x, >= 4x)" if size == "1.1B" else ""))
    small, large = by.get(("1.1B", "ours")), by.get(("3B", "ours"))
    if small and large:
        lines.append(f"ours peak RSS 1.1B -> 3B: {100 * (large.rss_gb / small.rss_gb - 1):+.1f}% "
                     "(goal <= +10%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-peft", action="store_true", help="skip the peft contender")
    parser.add_argument("--repeat", type=int, default=3, help="runs of cp -r and ours (median)")
    parser.add_argument("--peft-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peft_worker:
        peft_worker(*args.peft_worker)
        return 0
    if not TIME.exists():
        raise SystemExit("/usr/bin/time is missing; install it with `apt-get install -y time`")
    rows: list[Measure] = []
    for size in args.sizes:
        base, adapter = ensure_models(size)
        out = cache_root() / size / "out"
        shutil.rmtree(out, ignore_errors=True)
        rows += contenders(size, base, adapter, out, peft=not args.no_peft, repeat=args.repeat)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
