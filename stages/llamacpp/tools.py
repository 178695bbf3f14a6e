"""llama.cpp tools: where they live, and building them once per pinned version.

llama.cpp comes from the PyPI sdist of ``llama-cpp-python``, which vendors the
whole llama.cpp tree (``convert_hf_to_gguf.py``, ``gguf-py``, ``tools/``).  We
build the command-line tools we need once per version into a cache outside the
repository and reuse that build from every clone:

    ${XDG_CACHE_HOME:-~/.cache}/llm-release/llama.cpp-<version>/
        src/          the vendored llama.cpp tree (convert script + gguf-py)
        bin/          statically linked tools (TOOLS below)
        BUILD.json    version, tools and build flags

The build happens in a sibling temp folder that is renamed into place when it
is complete, so an interrupted build never leaves a half cache behind.

``make tools`` runs ``python -m stages.tools`` (see its ``--help``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ToolError
from stages.core.process import dies_with_parent

log = logging.getLogger(__name__)

# The one list of llama.cpp tools this project uses.  Changing it rebuilds llama.cpp on
# every machine (~12 min on 2 cores), so it already names the tools of planned stages:
# llama-gguf-split (shards under the Hub's 50 GB file limit), llama-tokenize (tokenizer
# parity checks) and llama-imatrix (importance matrices for low-bit levels).
TOOLS: tuple[str, ...] = (
    "llama-quantize", "llama-perplexity", "llama-completion",
    "llama-gguf-split", "llama-tokenize", "llama-imatrix",
)

# Flags seen working with llama-cpp-python 0.3.36 on this kind of machine.
# Static libraries so the binaries can be moved out of the build tree.
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
# GGML_NATIVE compiles for this CPU (-march=native), which on Intel Sapphire Rapids and
# later includes the AMX matmul backend; it segfaults in ggml_backend_amx_mul_mat on our
# Q4_K_M files (llama-perplexity --kl-divergence, seen on 0.3.36; llama.cpp issue #20824,
# closed without a fix). Turn the AMX instructions off; the AVX-512/AVX2 paths remain.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if platform.machine() in ("x86_64", "AMD64"):
    CMAKE_FLAGS += (f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")
PROJECT = "llm-release"


def cache_root() -> Path:
    """Folder that holds one llama.cpp build per version."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / PROJECT


def install_dir(version: str) -> Path:
    """Folder of the build for ``version`` (it may not exist yet)."""
    return cache_root() / f"llama.cpp-{version}"


def tool_path(name: str, version: str) -> Path:
    """Path of one built tool; raises with the fix when it is missing."""
    if name not in TOOLS:
        raise ToolError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    path = install_dir(version) / "bin" / name
    if not path.is_file():
        raise ToolError(
            f"llama.cpp tool {name} for version {version} is missing at {path}; "
            "run `make tools` (or `python -m stages.tools`) to build it"
        )
    return path


def source_dir(version: str) -> Path:
    """The vendored llama.cpp tree (convert_hf_to_gguf.py, gguf-py)."""
    src = install_dir(version) / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise ToolError(
            f"llama.cpp sources for version {version} are missing at {src}; run `make tools`"
        )
    return src


def describe(version: str) -> str:
    """What a manifest records: the package pin and the tools' own version line."""
    text = f"llama-cpp-python=={version}"
    try:
        res = subprocess.run([str(tool_path("llama-completion", version)), "--version"],
                             capture_output=True, text=True, timeout=30)
    except (ToolError, OSError, subprocess.TimeoutExpired):
        return f"{text} (tools not built)"
    line = next((ln for ln in (res.stdout + res.stderr).splitlines()
                 if ln.startswith("version:")), "")
    return f"{text} (llama.cpp {line.removeprefix('version:').strip()})" if line else text


def is_built(version: str) -> bool:
    """True when ``version`` was built with today's TOOLS and CMAKE_FLAGS (else rebuild)."""
    root = install_dir(version)
    try:
        info = json.loads((root / "BUILD.json").read_text())
    except (OSError, ValueError):
        return False
    return (info.get("cmake_flags") == list(CMAKE_FLAGS)
            and set(TOOLS) <= set(info.get("tools", []))
            and all((root / "bin" / t).is_file() for t in TOOLS))


@dataclass(frozen=True)
class ToolRun:
    """A finished tool run: its exit code and everything it printed."""

    returncode: int
    output: str

    def tail(self, lines: int = 15) -> str:
        """The last lines of the output, for error messages."""
        return "\n".join(self.output.strip().splitlines()[-lines:])


def run_tool(cmd: list[str], *, progress: re.Pattern[str] | None = None,
             desc: str = "") -> ToolRun:
    """Run a llama.cpp program, capturing its output.

    With ``progress`` (a pattern whose groups are ``done`` and ``total``), a
    tqdm bar follows the tool's own counters (e.g. llama-quantize's
    ``[ 12/ 272]`` per tensor); the bar is quiet when stderr is not a terminal.
    """
    from tqdm import tqdm

    log.debug("$ %s", " ".join(cmd))
    lines: list[str] = []
    bar = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", **dies_with_parent()) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            match = progress.search(line) if progress else None
            if match:
                done, total = int(match["done"]), int(match["total"])
                if bar is None:
                    bar = tqdm(total=total, desc=desc, unit="tensor",
                               disable=not sys.stderr.isatty())
                bar.update(done - bar.n)
    if bar is not None:
        bar.close()
    return ToolRun(returncode=proc.returncode, output="".join(lines))


def run_captured(cmd: list[str], what: str) -> tuple[str, str]:
    """Run a llama.cpp program whose stdout is its result (generated text, statistics)
    apart from its log on stderr; both, or a ToolError with the tail of the log."""
    log.debug("$ %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         errors="replace", **dies_with_parent())
    if res.returncode != 0:
        tail = ToolRun(returncode=res.returncode, output=res.stdout + res.stderr).tail(12)
        raise ToolError(f"{what} failed (exit {res.returncode}):\n{tail}")
    return res.stdout, res.stderr


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    log.info("$ %s", " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd)
    if result.returncode != 0:
        raise ToolError(f"command failed with exit code {result.returncode}: {' '.join(cmd)}")


def _download_sdist(version: str, dest: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
          "--no-binary=:all:", f"llama-cpp-python=={version}", "-d", str(dest)])
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise ToolError(f"pip downloaded no sdist of llama-cpp-python=={version} into {dest}")
    return found[0]


def _extract_vendor(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    tops = [p for p in dest.iterdir() if p.is_dir()]
    vendored = [p / "vendor" / "llama.cpp" for p in tops if (p / "vendor" / "llama.cpp").is_dir()]
    if not vendored:
        raise ToolError(f"{sdist.name} has no vendor/llama.cpp folder")
    return vendored[0]


def build(version: str, *, jobs: int | None = None, tools: tuple[str, ...] = TOOLS) -> Path:
    """Build ``tools`` of llama.cpp ``version`` into the cache; return its folder."""
    final = install_dir(version)
    if is_built(version):
        log.info("llama.cpp %s already built at %s", version, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix=f".llama.cpp-{version}-", dir=final.parent) as tmp:
        tmp_path = Path(tmp)
        sdist = _download_sdist(version, tmp_path / "dl")
        src = _extract_vendor(sdist, tmp_path / "x")
        build_dir = tmp_path / "build"
        _run(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS])
        _run(["cmake", "--build", str(build_dir), f"-j{jobs}", "--target", *tools])
        stage = tmp_path / "install"
        (stage / "bin").mkdir(parents=True)
        for tool in tools:
            shutil.copy2(build_dir / "bin" / tool, stage / "bin" / tool)
        shutil.move(str(src), stage / "src")
        info = {"version": version, "tools": list(tools), "cmake_flags": list(CMAKE_FLAGS)}
        (stage / "BUILD.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():  # an older build (other tools or flags): replace it whole
            shutil.rmtree(final)
        os.replace(stage, final)
    log.info("built llama.cpp %s into %s", version, final)
    return final
