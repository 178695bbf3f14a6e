"""Safetensors I/O that never holds a model in memory.

Reading: the JSON headers of a model's shards are parsed up front (a few KB);
tensor bytes are read on demand with ``pread`` into buffers the caller owns,
never through ``mmap``, so pages of the shards do not count as our resident
memory.  Writing: every shard header is computed from names, dtypes and shapes
before any data is written; each tensor is then written at its own offset,
in any order and from several threads, either from chunks the caller produces
or copied byte for byte inside the kernel (``copy_file_range``).  Shards are
named the Hugging Face way (``model-00001-of-00003.safetensors``) and listed in
``model.safetensors.index.json``.

Format (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header length N, N bytes of JSON, then the data; offsets in the
JSON are relative to the first byte after the header.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ReleaseError

# Bytes per element, from the safetensors spec (Dtype enum).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
HEADER_LEN = struct.Struct("<Q")
# The safetensors library refuses headers above 100 MB (MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# Headers are padded with spaces to a multiple of 8, as safetensors does, so
# data starts aligned.
HEADER_ALIGN = 8
# transformers' default for save_pretrained(max_shard_size=...): "5GB".
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# Bytes per copy_file_range call: big enough to be cheap, small enough that a
# failing merge stops within a fraction of a second.
COPY_STEP = 64 * 2**20
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute offset, length."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shape_text(self) -> str:
        """``576×16`` style, for messages."""
        return "×".join(str(d) for d in self.shape) or "scalar"


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about a tensor before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5·10⁹, ``"1GiB"`` → 2³⁰, like transformers' ``max_shard_size``."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ReleaseError(f"size {text!r} is not understood; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors listed in one safetensors file, and its ``__metadata__``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_LEN.size)
            size = HEADER_LEN.unpack(raw)[0] if len(raw) == HEADER_LEN.size else -1
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ReleaseError(f"{path} is not a safetensors file (header length {size}); "
                                   "copy or download it again")
            header = json.loads(fh.read(size))
            file_size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        raise ReleaseError(f"{path} is missing (a dangling link or a shard not copied); "
                           "copy or download the model's files again") from None
    except PermissionError:
        raise ReleaseError(f"{path} is not readable by this user; fix its permissions "
                           f"(chmod a+r {path.name})") from None
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"cannot read the safetensors header of {path} ({exc}): the file is "
                           "corrupt or truncated; copy or download it again") from None
    metadata = header.pop("__metadata__", None) or {}
    start = HEADER_LEN.size + size
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        info = TensorInfo(name=name, dtype=entry["dtype"], shape=tuple(entry["shape"]),
                          path=path, offset=start + begin, nbytes=end - begin)
        if start + end > file_size:
            raise ReleaseError(f"{path} is truncated: it holds {file_size} bytes, tensor `{name}` "
                               f"ends at byte {start + end}; copy or download it again")
        if info.dtype not in DTYPE_SIZES or info.nbytes != info.numel * DTYPE_SIZES[info.dtype]:
            raise ReleaseError(f"{path}: tensor `{name}` has a broken header entry {entry}; "
                               "the file is corrupt, copy or download it again")
        tensors[name] = info
    return tensors, metadata


def model_shards(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (index, single file, or glob)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ReleaseError(
            f"{folder} holds PyTorch pickle weights (*.bin), not safetensors; convert them "
            "first (load with transformers and save_pretrained(safe_serialization=True))"
        )
    raise ReleaseError(f"no safetensors weights in {folder}")


def model_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder, by name, from the shard headers only."""
    tensors: dict[str, TensorInfo] = {}
    for shard in model_shards(folder):
        found, _ = read_header(shard)
        for name in found.keys() & tensors.keys():
            raise ReleaseError(f"{folder}: tensor `{name}` is in two shards")
        tensors.update(found)
    return tensors


class Reader:
    """Reads tensor bytes with ``pread``; keeps each file open once; thread-safe."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every file this reader opened."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, path: Path) -> int:
        """An open read-only descriptor for ``path``."""
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read_into(self, info: TensorInfo, buf: memoryview, start: int = 0) -> None:
        """Fill ``buf`` with the tensor's bytes from byte ``start`` on."""
        fd, done, want = self.fd(info.path), 0, len(buf)
        if start + want > info.nbytes:
            raise ValueError(f"read past the end of `{info.name}`")
        while done < want:
            got = os.preadv(fd, [buf[done:]], info.offset + start + done)
            if got <= 0:
                raise ReleaseError(f"{info.path} ended early while reading `{info.name}`")
            done += got

    def read(self, info: TensorInfo) -> bytearray:
        """The whole tensor as a new buffer (for small tensors)."""
        buf = bytearray(info.nbytes)
        self.read_into(info, memoryview(buf))
        return buf


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors into shards of at most ``max_shard_size`` data bytes.

    Greedy, in order, as transformers does; a tensor larger than the cap gets a
    shard of its own.  Within a shard, wider dtypes come first so every tensor
    starts aligned to its element size.
    """
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > max_shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [sorted(shard, key=lambda s: -DTYPE_SIZES[s.dtype]) for shard in shards]


def encode_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON header (space-padded to 8 bytes) for ``specs``."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return HEADER_LEN.pack(len(raw)) + raw


def _copy_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    """Copy up to ``count`` bytes between offsets, in the kernel where it can."""
    try:
        return os.copy_file_range(src, dst, count, src_offset, dst_offset)
    except OSError as exc:  # older kernels across file systems, some file systems
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, min(count, COPY_STEP), src_offset)
    return os.pwrite(dst, data, dst_offset) if data else 0


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class ShardWriter:
    """Writes planned shards: every tensor at its own offset, from any thread.

    The shard files are created with their headers when the writer opens (the
    header follows from names, dtypes and shapes alone).  :meth:`write` and
    :meth:`copy` then put one tensor's bytes in place with ``pwrite`` /
    ``copy_file_range``, once per tensor, in any order and from several
    threads at once.  :meth:`finish` checks that every tensor was written in
    full, then writes the index.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], *,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.shards = plan_shards(specs, max_shard_size)
        total = len(self.shards)
        self.names = [SHARD_NAME.format(i + 1, total) for i in range(total)]
        self.order = [spec for shard in self.shards for spec in shard]
        self.metadata = {"format": "pt", **(metadata or {})}
        self.total_size = sum(spec.nbytes for spec in self.order)
        # name -> (spec, shard, absolute offset of its first byte in the shard file)
        self._place: dict[str, tuple[TensorSpec, int, int]] = {}
        self._claimed: set[str] = set()
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._fds: list[int] = []
        try:
            for i, shard in enumerate(self.shards):
                header = encode_header(shard, self.metadata)
                fd = os.open(folder / self.names[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _pwrite_all(fd, header, 0)
                offset = len(header)
                for spec in shard:
                    self._place[spec.name] = (spec, i, offset)
                    offset += spec.nbytes
        except OSError as exc:
            self.close()
            raise ReleaseError(f"cannot create shards in {folder}: {exc}") from None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files (no fsync, as with save_pretrained and cp: it would
        tie the merge to the disk's speed, 284 MB/s measured here against 1.4 GB/s
        for cp -r)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def shard_of(self, name: str) -> int:
        """The index (into :attr:`names`) of the shard that holds tensor ``name``."""
        return self._place[name][1]

    def _claim(self, name: str) -> tuple[TensorSpec, int, int]:
        with self._lock:
            if name not in self._place:
                raise ValueError(f"writer: `{name}` is not a planned tensor")
            if name in self._claimed:
                raise ValueError(f"writer: `{name}` was already written")
            self._claimed.add(name)
        spec, shard, offset = self._place[name]
        return spec, self._fds[shard], offset

    def _done(self, name: str) -> None:
        with self._lock:
            self._written.add(name)

    def write(self, name: str, chunks: Iterable[memoryview | bytes]) -> None:
        """Write tensor ``name`` from consecutive chunks of its bytes.

        Each chunk is written before the next is asked for, so a producer may
        reuse one buffer for all of them.
        """
        spec, fd, offset = self._claim(name)
        written = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if written + view.nbytes > spec.nbytes:
                written += view.nbytes
                break
            try:
                _pwrite_all(fd, view, offset + written)
            except OSError as exc:  # e.g. the disk filled up after the preflight check
                raise ReleaseError(f"writing `{name}` in {self.folder} failed: {exc}") from None
            written += view.nbytes
        if written != spec.nbytes:
            raise ReleaseError(f"`{name}`: produced {written} bytes, expected {spec.nbytes}")
        self._done(name)

    def copy(self, name: str, source: TensorInfo, reader: Reader) -> None:
        """Copy tensor ``name`` byte for byte from ``source`` (in the kernel)."""
        spec, fd, offset = self._claim(name)
        if source.nbytes != spec.nbytes:
            raise ValueError(f"`{name}`: source has {source.nbytes} bytes, plan {spec.nbytes}")
        src, done = reader.fd(source.path), 0
        while done < spec.nbytes:
            try:
                step = _copy_range(src, fd, min(COPY_STEP, spec.nbytes - done),
                                   source.offset + done, offset + done)
            except OSError as exc:
                raise ReleaseError(f"copying `{name}` into {self.folder} failed: {exc}") from None
            if step <= 0:
                raise ReleaseError(f"{source.path} ended early while copying `{source.name}`")
            done += step
        self._done(name)

    def finish(self) -> Path:
        """Close the shards and write the index; returns the index path."""
        missing = [spec.name for spec in self.order if spec.name not in self._written]
        if missing:
            raise ValueError(
                f"writer: {len(missing)} tensors were not written, e.g. `{missing[0]}`")
        self.close()
        weight_map = {spec.name: self.names[self.shard_of(spec.name)]
                      for spec in sorted(self.order, key=lambda s: s.name)}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        path = self.folder / INDEX_NAME
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path
