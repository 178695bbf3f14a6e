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
