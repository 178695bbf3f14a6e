"""The quality section of a release: per-level figures, notes that explain
surprising ones, and the plot of file size against KL divergence.

Reads what reference@<trainer> and evaluate@<trainer>-<LEVEL> wrote into
``build/<trainer>/work/eval/``; the card stage renders it into the model card,
``quality.png`` (published) and the DVC plot data ``build/<trainer>/quality.json``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ReleaseError

# PNG size and resolution: readable on a Hub model card page (~800 px wide).
FIGSIZE = (6.4, 4.0)
DPI = 125


@dataclass(frozen=True)
class Quality:
    reference: dict
    levels: list[dict]  # <LEVEL>.details.json of each level, in params order
    notes: list[str]


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise ReleaseError(f"no evaluation record {path}; run `dvc repro {stage}`")
    return json.loads(path.read_text())


def quality_notes(levels: list[dict], records: list[dict]) -> list[str]:
    """Say which level is closest, and why a bigger file can measure worse."""
    fallbacks = {r["level"]: r["fallbacks"] for r in records}
    best = min(levels, key=lambda lv: lv["kld_mean"])
    notes = [f"{best['level']} is the closest to the full-precision model "
             f"(mean KLD {best['kld_mean']:.4f})."]
    by_size = sorted(levels, key=lambda lv: lv["bytes"])
    for i, big in enumerate(by_size):
        worse = [s for s in by_size[:i] if s["kld_mean"] < big["kld_mean"]]
        if not worse:
            continue
        small = worse[0]
        why = ", ".join(f"{fb['tensors']} tensors as {fb['used']} instead of {fb['wanted']}"
                        for fb in fallbacks.get(big["level"], []))
        notes.append(
            f"{big['level']} is larger than {small['level']} but measures worse (mean KLD "
            f"{big['kld_mean']:.4f} vs {small['kld_mean']:.4f})"
            + (f": llama.cpp stored {why} (rows not a multiple of the K-quant block), so the "
               "file is not the mix its name promises." if why else "."))
    return notes


def load_quality(eval_dir: Path, records: list[dict], trainer: str) -> Quality:
    """reference.json and every level's details, in the order of ``records``."""
    reference = _read(eval_dir / "reference.json", f"reference@{trainer}")
    levels = [_read(eval_dir / f"{r['level']}.details.json", f"evaluate@{trainer}-{r['level']}")
              for r in records]
    for lv, rec in zip(levels, records, strict=True):
        if lv["bytes"] != rec["bytes"]:
            raise ReleaseError(f"{eval_dir / lv['level']}.details.json measured a file of "
                               f"{lv['bytes']} bytes, the level's GGUF has {rec['bytes']}; "
                               f"rerun `dvc repro evaluate@{trainer}-{lv['level']}`")
    return Quality(reference=reference, levels=levels, notes=quality_notes(levels, records))


def plot_points(quality: Quality) -> list[dict]:
    """Rows of the DVC plot (x: size in MiB, y: mean KLD)."""
    return [{"level": lv["level"], "size_mib": lv["size_mib"], "kld_mean": lv["kld_mean"],
             "kld_p99": lv["kld_p99"]} for lv in quality.levels]


def render_plot(quality: Quality, title: str) -> bytes:
    """PNG of file size against mean KL divergence, one labelled point per level."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = sorted(plot_points(quality), key=lambda p: p["size_mib"])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot([p["size_mib"] for p in points], [p["kld_mean"] for p in points], "o")
    for p in points:
        ax.annotate(p["level"], (p["size_mib"], p["kld_mean"]), textcoords="offset points",
                    xytext=(6, 6))
    if all(p["kld_mean"] > 0 for p in points):
        ax.set_yscale("log")
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence from full precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    # No metadata: the same figures give the same bytes (push copies changed files only).
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def one_line(text: str) -> str:
    """Generated text on one line (a Markdown list item or quote)."""
    return " ".join(text.split()) or "(empty)"


def table_cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return one_line(text).replace("|", "\\|")
