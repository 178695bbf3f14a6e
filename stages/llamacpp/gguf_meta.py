"""Reading GGUF metadata (chat template, special tokens) with gguf-py.

Only the header is parsed; tensor data stays on disk (memory-mapped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ReleaseError

# Special-token ids whose text ends a turn (gguf-py Keys.Tokenizer).
STOP_KEYS: tuple[str, ...] = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                              "tokenizer.ggml.eom_token_id")


@dataclass(frozen=True)
class ChatInfo:
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    add_bos: bool | None
    stop_strings: tuple[str, ...]


def _scalar(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def open_reader(path: Path):
    """A gguf-py reader of ``path`` (header parsed, tensor data memory-mapped)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except FileNotFoundError:
        raise ReleaseError(f"{path} not found") from None
    except Exception as exc:  # noqa: BLE001 - gguf-py fails on damaged bytes in many ways
        raise ReleaseError(f"{path} is not a readable GGUF file ({type(exc).__name__}: "
                           f"{exc}): it is truncated or damaged") from None


def vocab_size(path: Path) -> int:
    """Number of tokens in the GGUF's vocabulary (the logits' width)."""
    return len(_scalar(open_reader(path), "tokenizer.ggml.tokens") or [])


def chat_info(reader) -> ChatInfo:
    """Chat template, BOS/EOS ids and stop strings from an open reader."""
    tokens = _scalar(reader, "tokenizer.ggml.tokens") or []
    stops: list[str] = []
    for key in STOP_KEYS:
        token_id = _scalar(reader, key)
        if token_id is not None and 0 <= token_id < len(tokens) and tokens[token_id] not in stops:
            stops.append(tokens[token_id])
    return ChatInfo(
        chat_template=_scalar(reader, "tokenizer.chat_template"),
        bos_id=_scalar(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_scalar(reader, "tokenizer.ggml.eos_token_id"),
        add_bos=_scalar(reader, "tokenizer.ggml.add_bos_token"),
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
