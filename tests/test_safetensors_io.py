"""stages.safetensors_io: shard headers, lazy reads, planned shard writes."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stages.core.errors import ReleaseError
from stages.weights.safetensors_io import (
    Reader,
    ShardWriter,
    TensorSpec,
    model_tensors,
    parse_size,
    plan_shards,
    read_header,
)


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000),
    ("4096", 4096), (123, 123), ("10kib", 10240),
])
def test_parse_size(text, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "5XB", "-1GB", "0"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ReleaseError, match="not understood"):
        parse_size(text)


def _specs(*sizes: int, dtype: str = "U8") -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", dtype, (n,)) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes, cap, expected", [
    ((10, 10, 10), 100, [["t0", "t1", "t2"]]),
    ((10, 10, 10), 20, [["t0", "t1"], ["t2"]]),
    ((50, 10, 10), 20, [["t0"], ["t1", "t2"]]),
    ((10, 50, 10), 20, [["t0"], ["t1"], ["t2"]]),
    ((5,), 1, [["t0"]]),
])
def test_plan_shards(sizes, cap: int, expected) -> None:
    assert [[s.name for s in shard] for shard in plan_shards(_specs(*sizes), cap)] == expected


def test_plan_shards_puts_wide_dtypes_first() -> None:
    specs = [TensorSpec("a", "BF16", (3,)), TensorSpec("b", "F32", (2,)),
             TensorSpec("c", "I64", (1,))]
    assert [s.name for s in plan_shards(specs, 10**6)[0]] == ["c", "b", "a"]


def _source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"w.bf16": torch.randn(33, 7, generator=gen).to(torch.bfloat16),
               "w.f32": torch.randn(5, 3, generator=gen),
               "w.f16": torch.randn(11, generator=gen).half(),
               "ids": torch.arange(9, dtype=torch.int64),
               "scalar": torch.tensor(3.5)}
    path = tmp_path / "src.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_read_header_and_read_into(tmp_path: Path) -> None:
    path, tensors = _source(tmp_path)
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"} and set(infos) == set(tensors)
    with Reader() as reader:
        for name, tensor in tensors.items():
            info = infos[name]
            assert info.shape == tuple(tensor.shape)
            raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
            assert bytes(reader.read(info)) == raw
        part = bytearray(7 * 2)  # second row of the bf16 tensor
        reader.read_into(infos["w.bf16"], memoryview(part), start=7 * 2)
        assert bytes(part) == tensors["w.bf16"][1].view(torch.uint8).numpy().tobytes()


def test_writer_round_trip(tmp_path: Path) -> None:
    path, tensors = _source(tmp_path)
    infos, _ = read_header(path)
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in sorted(infos.items())]
    out = tmp_path / "out"
    out.mkdir()
    with Reader() as reader, ShardWriter(out, specs, max_shard_size=200) as writer:
        def put(spec: TensorSpec) -> None:
            if spec.name.startswith("w."):
                data = bytes(reader.read(infos[spec.name]))
                writer.write(spec.name, [data[:5], data[5:]])  # in two uneven chunks
            else:
                writer.copy(spec.name, infos[spec.name], reader)

        # Any order, from several threads at once: each tensor lands at its own offset.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(put, reversed(writer.order)))
        index = writer.finish()
    # 462 bytes of bf16 exceed the 200-byte cap: a shard of their own, between two others.
    assert writer.names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [[s.name for s in shard] for shard in writer.shards] == [
        ["ids", "scalar"], ["w.bf16"], ["w.f32", "w.f16"]]
    weight_map = json.loads(index.read_text())["weight_map"]
    assert sorted(weight_map) == sorted(tensors) and set(weight_map.values()) == set(writer.names)
    loaded = {}
    for name in writer.names:
        raw = (out / name).read_bytes()
        assert struct.unpack("<Q", raw[:8])[0] % 8 == 0, "header must be padded to 8 bytes"
        loaded |= load_file(out / name)
        with safe_open(out / name, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype, name
    assert model_tensors(out).keys() == tensors.keys()


def test_writer_refuses_unknown_repeated_short_and_missing_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "U8", (4,)), TensorSpec("b", "U8", (4,)), TensorSpec("c", "U8", (2,))]
    with ShardWriter(tmp_path, specs) as writer:
        with pytest.raises(ValueError, match="`z` is not a planned tensor"):
            writer.write("z", [b"1234"])
        writer.write("b", [b"12", b"34"])
        with pytest.raises(ValueError, match="`b` was already written"):
            writer.write("b", [b"1234"])
        with pytest.raises(ReleaseError, match="produced 3 bytes, expected 4"):
            writer.write("a", [b"123"])
        with pytest.raises(ReleaseError, match="produced 3 bytes, expected 2"):
            writer.write("c", [b"12", b"3"])
        with pytest.raises(ValueError, match="2 tensors were not written"):
            writer.finish()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_model_tensors_finds_shards_and_refuses_pickles(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert {n: i.shape for n, i in model_tensors(tmp_path).items()} == {"a": (2,), "b": (3,)}
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ReleaseError, match="pickle"):
        model_tensors(pickled)
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ReleaseError, match="not a safetensors file"):
        read_header(tmp_path / "broken.safetensors")
