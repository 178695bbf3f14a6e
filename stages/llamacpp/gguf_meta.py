"""Reading a GGUF's header (metadata and tensor table) in one sequential pass.

gguf-py's ``GGUFReader`` makes a numpy view per value: ~5 s for a 49k-token
vocabulary, more for Llama 3's 128k or Gemma's 256k, paid by every stage that
looks at a GGUF.  This parser reads the same header with ``struct`` (arrays of
numbers in one unpack), checks it as llama.cpp's loader does (magic, version,
value types, tensor types, every tensor's bytes inside the file), and never
touches tensor data.  Format: gguf-py's ``gguf/constants.py`` and
``docs/gguf.md`` of the pinned llama.cpp.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ReleaseError

# Special-token ids whose text ends a turn (gguf-py Keys.Tokenizer).
STOP_KEYS: tuple[str, ...] = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                              "tokenizer.ggml.eom_token_id")
MAGIC = b"GGUF"
VERSIONS = (2, 3)
STRING, ARRAY = 8, 9  # GGUFValueType
# GGUFValueType -> struct format of one value
SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                           10: "Q", 11: "q", 12: "d"}
DEFAULT_ALIGNMENT = 32
# A header bigger than this is damage, not a model (Gemma's 256k vocabulary: ~6 MB).
MAX_COUNT = 1 << 24


@dataclass(frozen=True)
class Field:
    name: str
    value: object  # a number, bool, str, or a list of them
    is_array: bool


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class Header:
    """What a GGUF says about itself."""

    path: Path
    version: int
    fields: dict[str, Field]
    tensors: tuple[TensorEntry, ...]
    data_offset: int

    def get(self, key: str):
        field = self.fields.get(key)
        return None if field is None else field.value


@dataclass(frozen=True)
class ChatInfo:
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    add_bos: bool | None
    stop_strings: tuple[str, ...]


class _Damaged(Exception):
    pass


class _Parser:
    """Reads the header from a memory map: ``struct.unpack_from`` at an offset, no copies
    but the strings (a 256k vocabulary and its merges are ~500k of them)."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def tell(self) -> int:
        return self.pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise _Damaged(f"the file ends inside its header (wanted {n} bytes)")
        data, self.pos = self.buf[self.pos:end], end
        return data

    def unpack(self, fmt: str):
        fmt = "<" + fmt
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Damaged(f"the file ends inside its header (wanted {size} bytes)")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def count(self, what: str) -> int:
        (n,) = self.unpack("Q")
        if n > MAX_COUNT:
            raise _Damaged(f"{what} count {n} is not plausible")
        return n

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if n > MAX_COUNT:
            raise _Damaged(f"a string of {n} bytes is not plausible")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Damaged(f"a string is not UTF-8 ({exc})") from None

    def strings(self, n: int) -> list[str]:
        """``n`` strings in a row (an array's), without a call per piece."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack_from = struct.Struct("<Q").unpack_from
        try:
            for _ in range(n):
                if pos + 8 > end:
                    raise _Damaged("the file ends inside its header (in a string array)")
                (size,) = unpack_from(buf, pos)
                if size > MAX_COUNT or pos + 8 + size > end:
                    raise _Damaged(f"a string of {size} bytes is not plausible")
                out.append(buf[pos + 8:pos + 8 + size].decode("utf-8"))
                pos += 8 + size
        except UnicodeDecodeError as exc:
            raise _Damaged(f"a string is not UTF-8 ({exc})") from None
        self.pos = pos
        return out

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])[0]
        raise _Damaged(f"unknown value type {kind}")

    def array(self):
        (kind,) = self.unpack("I")
        n = self.count("array")
        if kind in SCALARS:
            return list(self.unpack(f"{n}{SCALARS[kind]}")) if n else []
        if kind == STRING:
            return self.strings(n)
        return [self.value(kind) for _ in range(n)]


def _parse(path: Path, buf) -> Header:
    from gguf.constants import GGML_QUANT_SIZES

    p = _Parser(buf)
    if p.take(4) != MAGIC:
        raise _Damaged("it does not start with GGUF")
    (version,) = p.unpack("I")
    if version not in VERSIONS:
        raise _Damaged(f"version {version} (llama.cpp reads {VERSIONS})")
    n_tensors, n_fields = p.count("tensor"), p.count("metadata")
    fields: dict[str, Field] = {}
    for _ in range(n_fields):
        name = p.string()
        (kind,) = p.unpack("I")
        fields[name] = (Field(name, p.array(), True) if kind == ARRAY
                        else Field(name, p.value(kind), False))
    tensors = []
    for _ in range(n_tensors):
        name = p.string()
        (n_dims,) = p.unpack("I")
        if n_dims > 8:
            raise _Damaged(f"tensor `{name}` has {n_dims} dimensions")
        shape = p.unpack(f"{n_dims}Q")
        ggml_type, offset = p.unpack("IQ")
        if ggml_type not in GGML_QUANT_SIZES:
            raise _Damaged(f"tensor `{name}` has unknown type {ggml_type}")
        block, size = GGML_QUANT_SIZES[ggml_type]
        n_elements = 1
        for d in shape:
            n_elements *= d
        tensors.append(TensorEntry(name, tuple(shape), ggml_type, offset, n_elements,
                                   n_elements // block * size))
    alignment = fields.get("general.alignment")
    align = alignment.value if alignment and isinstance(alignment.value, int) and \
        alignment.value > 0 else DEFAULT_ALIGNMENT
    data_offset = -(-p.tell() // align) * align
    size = path.stat().st_size
    for tensor in tensors:
        if data_offset + tensor.offset + tensor.n_bytes > size:
            raise _Damaged(f"tensor `{tensor.name}` ends at byte "
                           f"{data_offset + tensor.offset + tensor.n_bytes}, the file holds "
                           f"{size}")
    return Header(path, version, fields, tuple(tensors), data_offset)


def open_reader(path: Path) -> Header:
    """The header of ``path`` (tensor data is not read); one error line if it is damaged."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise _Damaged("it is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf)
    except FileNotFoundError:
        raise ReleaseError(f"{path} not found") from None
    except (_Damaged, struct.error, OSError) as exc:
        raise ReleaseError(f"{path} is not a readable GGUF file ({exc}): it is truncated or "
                           "damaged") from None


def vocab_size(path: Path) -> int:
    """Number of tokens in the GGUF's vocabulary (the logits' width).

    Reads the metadata up to that array only (a stage asks before a tool starts:
    decoding the whole vocabulary and its merges would cost more than the check)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            p = _Parser(buf)
            if p.take(4) != MAGIC or p.unpack("I")[0] not in VERSIONS:
                raise _Damaged("it does not start with a GGUF header llama.cpp reads")
            p.count("tensor")
            for _ in range(p.count("metadata")):
                name = p.string()
                (kind,) = p.unpack("I")
                if kind != ARRAY:
                    p.value(kind)
                    continue
                if name == "tokenizer.ggml.tokens":
                    p.unpack("I")
                    return p.count("array")
                p.array()
        return 0
    except FileNotFoundError:
        raise ReleaseError(f"{path} not found") from None
    except (_Damaged, struct.error, OSError, ValueError) as exc:
        raise ReleaseError(f"{path} is not a readable GGUF file ({exc}): it is truncated or "
                           "damaged") from None


def chat_info(reader) -> ChatInfo:
    """Chat template, BOS/EOS ids and stop strings from an open reader."""
    tokens = reader.get("tokenizer.ggml.tokens") or []
    stops: list[str] = []
    for key in STOP_KEYS:
        token_id = reader.get(key)
        if token_id is not None and 0 <= token_id < len(tokens) and tokens[token_id] not in stops:
            stops.append(tokens[token_id])
    return ChatInfo(
        chat_template=reader.get("tokenizer.chat_template"),
        bos_id=reader.get("tokenizer.ggml.bos_token_id"),
        eos_id=reader.get("tokenizer.ggml.eos_token_id"),
        add_bos=reader.get("tokenizer.ggml.add_bos_token"),
        stop_strings=tuple(stops),
    )


def read_chat_info(path: Path) -> ChatInfo:
    """Chat template, BOS/EOS ids and stop strings of a GGUF file."""
    return chat_info(open_reader(path))


def bits_per_weight(reader, path: Path) -> float:
    """Tensor bits per weight, as llama.cpp reports it (tensor bytes × 8 / elements)."""
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elements = sum(int(t.n_elements) for t in reader.tensors)
    if not n_elements:
        raise ReleaseError(f"{path} holds no tensors")
    return n_bytes * 8 / n_elements
