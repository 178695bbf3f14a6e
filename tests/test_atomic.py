"""Atomic outputs: a failure leaves the old output (or nothing), never a partial one."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core import atomic


@pytest.mark.parametrize("sync", [True, False])
def test_output_dir_replaces_whole_on_success(tmp_path: Path, sync: bool) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    with atomic.output_dir(out, sync=sync) as tmp:
        (tmp / "model.safetensors").write_text("new")
        assert not (out / "model.safetensors").exists()  # nothing visible before the end
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_output_dir_failure_keeps_old_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    with pytest.raises(RuntimeError), atomic.output_dir(out) as tmp:
        (tmp / "half.safetensors").write_text("half")
        raise RuntimeError("killed half way")
    assert sorted(p.name for p in out.iterdir()) == ["old.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_output_file_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gguf" / "Q8_0.gguf"
    with pytest.raises(KeyboardInterrupt), atomic.output_file(out) as tmp:
        tmp.write_bytes(b"GGUF partial")
        raise KeyboardInterrupt
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("sync", [True, False])
def test_output_file_replaces_the_old_file_only_once_the_new_one_is_whole(
        tmp_path: Path, sync: bool) -> None:
    out = tmp_path / "Q8_0.gguf"
    out.write_bytes(b"old")
    with atomic.output_file(out, sync=sync) as tmp:
        tmp.write_bytes(b"GGUF new")
        assert out.read_bytes() == b"old"  # the old file stays while the tool writes
    assert out.read_bytes() == b"GGUF new"
    assert [p.name for p in tmp_path.iterdir()] == ["Q8_0.gguf"]
    with pytest.raises(RuntimeError), atomic.output_file(out, sync=sync) as tmp:
        tmp.write_bytes(b"GGUF half")
        raise RuntimeError("killed half way")
    assert out.read_bytes() == b"GGUF new"
    assert [p.name for p in tmp_path.iterdir()] == ["Q8_0.gguf"]


def test_output_file_that_the_tool_never_wrote_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic.output_file(tmp_path / "x.gguf"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_write_text_is_complete_or_absent(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    atomic.write_text(path, "{}\n")
    atomic.write_text(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


@pytest.mark.parametrize("sync", [True, False])
def test_write_text_replaces_whole_with_or_without_fsync(tmp_path: Path, sync: bool) -> None:
    out = tmp_path / "Q8_0.json"
    atomic.write_text(out, "old", sync=sync)
    atomic.write_text(out, '{"level": "Q8_0"}', sync=sync)
    assert out.read_text() == '{"level": "Q8_0"}'
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["Q8_0.json"]


def test_next_write_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    """A SIGKILLed writer cannot clean up: the next write of the same target does."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)  # a process that has ended
    out = tmp_path / "merged"
    left = [tmp_path / f".merged.{pid}.x1y2z3.tmp", tmp_path / f".merged.{pid}.old",
            tmp_path / f".merged.{pid}.tmp"]
    left[0].mkdir()
    (left[0] / "model.safetensors").write_bytes(b"half")
    left[1].mkdir()
    left[2].write_text("half")
    alive = tmp_path / f".merged.{os.getppid()}.a1.tmp"  # a running writer's: kept
    alive.mkdir()
    other = tmp_path / f".merged2.{pid}.tmp"  # another target's: not ours to remove
    other.write_text("x")
    with atomic.output_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", alive.name, other.name])
    atomic.write_text(tmp_path / "merged2", "done")
    assert not other.exists()


def test_sweep_tree_removes_dead_writers_leftovers_anywhere(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True, check=True).stdout)
    deep = tmp_path / "build/sft/work/quant"
    deep.mkdir(parents=True)
    dead = [deep / f".Q4_K_M.gguf.{pid}.tmp", tmp_path / f"build/sft/.gguf.{pid}.ab12.tmp"]
    dead[0].write_text("half")
    dead[1].mkdir()
    (dead[1] / "README.md").write_text("half")
    kept = [deep / "Q4_K_M.gguf", deep / f".Q8_0.gguf.{os.getpid()}.tmp", deep / ".hidden"]
    for path in kept:
        path.write_text("x")
    assert sorted(atomic.sweep_tree(tmp_path / "build")) == sorted(dead)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in dead)
