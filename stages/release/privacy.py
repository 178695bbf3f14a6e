"""What a release gives away: nothing of the build machine, and no secret.

Everything in a release folder (model card, Modelfile, manifest.json, the GGUF
files and their metadata; a push uploads exactly that folder) leaves the
machine that built it.  The rules, all here:

1. **Explicit lists.**  params.yaml reaches the card and manifest only through
   :data:`PUBLISHED_PARAMS` (:func:`publish_params`); a run's
   ``training_lineage.json`` only through its known keys
   (:mod:`stages.release.lineage`).  Everything else is dropped, and the card
   and manifest say which keys they show.
2. **Secrets.**  A value looks secret by its key's name (:func:`secret_name`:
   ``*token*``, ``*api_key*``, ``*secret*``, ``*password*``) or by its shape
   (:data:`SECRET_SHAPES`: Hugging Face, OpenAI-style and AWS keys).  In a key
   that would be published it stops the card stage with one error naming the
   key and the file; in a dropped key it is a warning naming the key
   (:func:`check_secrets`).  The value itself is never printed, logged or written.
3. **Local paths.**  A published params value may not be a local path
   (:func:`is_local_path`); the published path settings (:data:`PATH_PARAMS`)
   are shown relative to the repository, or by file name (:func:`public_path`).
4. **Final scan.**  Before the release folder is renamed into place, every text
   file in it and every GGUF metadata string outside the tokenizer's vocabulary
   is searched (:func:`check_release`) for home folders, a Windows drive, this
   repository's absolute path, the home directory, the user and host names
   (:class:`Machine`) and secret shapes.  It backs up rules 1-3: whatever slips
   past them fails the card stage instead of being published.
"""

from __future__ import annotations

import copy
import getpass
import json
import logging
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config.params import Params
from stages.core.errors import ParamsError, ReleaseError
from stages.llamacpp.gguf_meta import open_reader

log = logging.getLogger(__name__)

# --- 1. what params.yaml publishes -----------------------------------------------------

# Dotted keys of params.yaml that a format's manifest publishes (`{trainer}`: the trainer
# being released) and its card names: what made that format's files.  A key names one
# value or a section whose keys the schema fixes (stages/config refuses unknown keys), so
# nothing unknown rides along.  Not here: adapter, output_root, base_model.path (this
# machine's folders), release targets (where we publish is not part of what we publish),
# other trainers, demo.  The stage writing a format lists these as its DVC params
# (tests/test_dvc_yaml.py checks), so a change to one rebuilds what publishes it.
TRAINER_PARAMS: tuple[str, ...] = (
    "trainers.{trainer}.name",  # names the published files
    "trainers.{trainer}.base_model.id",  # the Hub id, also in the card and GGUF metadata
    "trainers.{trainer}.license",
    "trainers.{trainer}.license_name",
    "trainers.{trainer}.license_link",
    "trainers.{trainer}.tags",
)
PUBLISHED_PARAMS: dict[str, tuple[str, ...]] = {
    "adapter": (
        *TRAINER_PARAMS,
        "trainers.{trainer}.release.adapter.gguf_lora",
        "evaluate.text",  # the GGUF LoRA check's text, chunks and threshold
        "evaluate.ctx",
        "evaluate.lora",
        "convert.outtype",  # the base GGUF the check applies the LoRA to
        "llama_cpp.version",
    ),
    "merged": (
        *TRAINER_PARAMS,
        "trainers.{trainer}.release.merged.dtype",
    ),
    "merged_4bit": TRAINER_PARAMS,
    "gguf": (
        *TRAINER_PARAMS,
        "trainers.{trainer}.chat_template",  # overrides applied before conversion
        "trainers.{trainer}.eos_token",
        "trainers.{trainer}.release.gguf.ollama_level",
        "trainers.{trainer}.release.gguf.split_max_size",
        "quantize.levels",  # every level and its options
        "convert.outtype",
        "evaluate",  # every fidelity setting and threshold the card reports
        "llama_cpp.version",
    ),
}
# Published settings that are paths (of the evaluation data): see public_path.
PATH_PARAMS: tuple[str, ...] = ("evaluate.text", "evaluate.adapter.prompts")


@dataclass(frozen=True)
class PublishedParams:
    """The part of params.yaml a release publishes, nested as in the file."""

    data: dict[str, Any]
    keys: tuple[str, ...]  # the format's PUBLISHED_PARAMS present, in that order


# --- 2. secrets -------------------------------------------------------------------------

# Key names whose value is a credential: *api_key* (apikey too), *secret*, *password*
# (passwd too), *token*; case-insensitive substrings, as a trainer or a config spells them.
SECRET_NAME = re.compile(r"api_?key|secret|passw(?:or)?d|token", re.IGNORECASE)
# ...but "token" is also a piece of text: a tokenizer, a count of tokens, a special token
# of the vocabulary.  These spellings are removed before SECRET_NAME looks, so eos_token,
# pad_token_id, max_new_tokens, token_embedding_type or tokenizer_name are not secrets
# while hub_token, HF_TOKEN or access_token are.
TEXT_TOKEN = re.compile(
    r"tokeni[sz]|tokens"  # tokenizer, tokenize, max_tokens, tokens_per_second
    r"|(?:eos|bos|eot|eom|pad|unk|sep|cls|mask|special|added|chat)_?token"  # vocabulary
    r"|token_?(?:embedding|type|ids?|count|length|len|limit)",  # token_embedding_type...
    re.IGNORECASE)
# Values under a secret name that hold nothing: TRL's TrainingArguments.to_dict() writes
# "<HUB_TOKEN>" for a set hub_token; "***" masks; "$HF_TOKEN" / "${HF_TOKEN}" name a
# variable, not its value.
PLACEHOLDER = re.compile(r"<[^<>]*>|\*+|\$\{?\w+\}?")
# Secrets by shape, wherever they are.  The look-behinds keep a longer word from matching
# ("task-..." holds "sk-").
SECRET_SHAPES: dict[str, re.Pattern[str]] = {
    # Hugging Face access tokens: "hf_" and 34 letters/digits today; 30+ leaves room.
    "a Hugging Face token (hf_…)": re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}"),
    # OpenAI-style API keys: "sk-" and 20+ (sk-proj-... keys hold "-" and "_").
    "an API key (sk-…)": re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}"),
    # AWS access key ids: "AKIA" and 16 upper-case letters/digits.
    "an AWS access key id (AKIA…)": re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])"),
}


def secret_name(key: str) -> bool:
    """Whether a key's name says its value is a credential (``wandb_api_key``, ``hub_token``)."""
    return bool(SECRET_NAME.search(TEXT_TOKEN.sub("", key)))


def secret_shape(text: str) -> str | None:
    """What kind of secret ``text`` holds by its shape, or None."""
    return next((kind for kind, shape in SECRET_SHAPES.items() if shape.search(text)), None)


def secret_kind(path: str, value: Any) -> str | None:
    """Why the value at dotted ``path`` looks secret (by a key name or its shape), or None.

    Only text can be a secret: ``hub_token: null`` or ``use_auth_token: true`` hold none.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    parts = path.split(".")
    name = next((part for part in parts if secret_name(part)), None)
    if name is not None and not PLACEHOLDER.fullmatch(value.strip()):
        return "by its name" if name == parts[-1] else f"by its name, under `{name}`"
    shape = secret_shape(value)
    return f"by its shape: {shape}" if shape else None


def leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar under ``value`` with its dotted path (list items by index: ``tags.0``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{prefix}.{index}" if prefix else str(index))
    else:
        yield prefix, value


def is_published(path: str, published: frozenset[str]) -> bool:
    """Whether dotted ``path`` is, or lies under, one of the ``published`` paths."""
    parts = path.split(".")
    return any(".".join(parts[:n]) in published for n in range(1, len(parts) + 1))


def check_secrets(tree: dict, published: frozenset[str], *, source: str,
                  error: type[ReleaseError] = ReleaseError) -> None:
    """Raise ``error`` for the first secret-looking value of ``tree`` in a published path;
    warn (naming the key, never the value) for each one in a dropped path."""
    for path, value in leaves(tree):
        why = secret_kind(path, value)
        if why is None:
            continue
        if is_published(path, published):
            raise error(f"{source}: `{path}` looks like a secret ({why}), and the release "
                        "would publish it (model card, manifest); remove it from the file")
        log.warning("%s: `%s` looks like a secret (%s); it is not published, but better "
                    "keep secrets out of this file", source, path, why)


# --- 3. local paths ---------------------------------------------------------------------

# Text that names a place on one machine's file system, from its start.
LOCAL_PATH_START = re.compile(r"""
      /(?!/)           # POSIX absolute (not //host/..., a protocol-relative URL)
    | ~                # a home folder: ~/x, ~alice/x
    | [A-Za-z]:[\\/]   # a Windows drive: C:\x, C:/x
    | \\\\             # a Windows share: \\server\x
    | file:            # a file URL
""", re.VERBOSE)
# A relative path that climbs out of the repository (../dpo_output_4090/...) tells how
# this machine's folders are laid out.
CLIMBING = re.compile(r"(?:^|[\\/])\.\.(?:[\\/]|$)")


def is_local_path(text: str) -> bool:
    """Whether ``text`` is a path of this machine: absolute, home, drive, share, file URL,
    or relative but climbing out (``../x``).  ``data/eval.txt`` is not: it names a file of
    the repository, the same on every machine."""
    text = text.strip()
    return bool(LOCAL_PATH_START.match(text) or CLIMBING.search(text))


def file_name(text: str) -> str:
    """The last part of a path written with / or \\ (``C:\\d\\uf.jsonl`` -> ``uf.jsonl``)."""
    return re.split(r"[\\/]", text.strip().rstrip("\\/"))[-1]


def public_path(text: Any) -> Any:
    """A path as a release shows it: as given when inside the repository, else its file name."""
    return file_name(text) if isinstance(text, str) and is_local_path(text) else text


# Keys of config.json and tokenizer_config.json that transformers fills with the folder a
# model or tokenizer was loaded from.
LOADED_FROM_KEYS: tuple[str, ...] = ("_name_or_path", "name_or_path")


def named_by_hub_id(config: dict, hub_id: str) -> dict:
    """A config as published: the keys naming the folder it was loaded from set to
    ``hub_id`` (where the model is published from)."""
    return config | {k: hub_id for k in LOADED_FROM_KEYS if k in config}


def _lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _insert(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def publish_params(params: Params, trainer_key: str, fmt: str) -> PublishedParams:
    """The PUBLISHED_PARAMS of format ``fmt`` of ``trainer_key``, checked: a secret or a
    local path in one is a :class:`ParamsError` naming the key; a secret in another key
    is a warning."""
    raw = params.raw
    data: dict[str, Any] = {}
    keys = []
    for pattern in PUBLISHED_PARAMS[fmt]:
        key = pattern.format(trainer=trainer_key)
        found, value = _lookup(raw, key)
        if found and value is not None:
            _insert(data, key, copy.deepcopy(value))
            keys.append(key)
    for key in PATH_PARAMS:
        found, value = _lookup(data, key)
        if found:
            _insert(data, key, public_path(value))
    published = frozenset(keys)
    for path, value in leaves(data):
        if isinstance(value, str) and is_local_path(value):
            raise ParamsError(f"params: `{path}` is a local path ({value}), and the release "
                              "would publish it (model card, manifest, GGUF metadata); "
                              "use a name or a URL instead")
    # Other trainers' entries are not this release's business.
    scope = {**raw, "trainers": {trainer_key: raw.get("trainers", {}).get(trainer_key, {})}}
    check_secrets(scope, published, source="params.yaml", error=ParamsError)
    return PublishedParams(data=data, keys=tuple(keys))


# --- 4. the final scan ------------------------------------------------------------------

# User and host names that identify no one: accounts every container or CI runner has,
# and names that are ordinary words.  Their home folders are still found, by path.
COMMON_NAMES: frozenset[str] = frozenset({
    "root", "admin", "administrator", "user", "users", "guest", "ubuntu", "debian", "fedora",
    "centos", "alpine", "runner", "builder", "build", "worker", "docker", "jenkins",
    "vagrant", "codespace", "ec2-user", "localhost", "home", "test", "tests", "default",
    "server", "host", "node", "main", "master", "train", "model",
})
# A user or host name shorter than this is too likely to be a word ("vm", "dev", "pi").
MIN_NAME = 4
# Home folders (Linux /home/<user>, macOS /Users/<user>, /root) and Windows drives, where
# a path starts: not inside a word or a URL (https://example.com/home/x is a web page).
MACHINE_PATH = re.compile(r"""
      (?: (?<![\w.~/-]) | (?<=file://) )    # a path starts here (file:///home/... too)
      (?: /(?:home|Users)/[^\s/\\'"`()<>|]+ # a user's home folder: /home/alice
        | /root(?![\w.-]) )                 # root's home: /root, /root/...
    | (?<![A-Za-z0-9]) [A-Za-z]:\\{1,2}(?=[\w.~$-])  # C:\Users (C:\\Users inside JSON)
""", re.VERBOSE)
# The tokenizer's vocabulary (tokens, merges, types, scores): tens of thousands of model
# strings, not metadata anyone wrote.  Every other GGUF key is scanned.
GGUF_VOCABULARY = "tokenizer.ggml."
# A safetensors header is JSON of tensor names, shapes and offsets: megabytes at most.
SAFETENSORS_HEADER_MAX = 100 * 2**20


@dataclass(frozen=True)
class Machine:
    """What identifies the build machine in published text."""

    paths: tuple[str, ...]  # this repository's absolute path, the home directory
    names: tuple[str, ...]  # the user and host names, when they name someone


def _distinctive(name: str) -> bool:
    return len(name) >= MIN_NAME and name.lower() not in COMMON_NAMES and not name.isdigit()


def this_machine(root: Path | None = None, *, allowed: Iterable[str] = ()) -> Machine:
    """The machine the card stage runs on, with ``root`` (default: the working directory,
    where every stage runs) as the repository.  A user or host name that is a word of one
    of the ``allowed`` texts (what params publish on purpose: a Hub id ``alice/model`` of
    user alice) is not looked for; its home folder still is."""
    root = Path.cwd() if root is None else root
    paths = {str(root.absolute()), str(root.resolve()), str(Path.home())}
    names = {socket.gethostname(), socket.gethostname().split(".")[0]}
    try:
        names.add(getpass.getuser())
    except (OSError, KeyError):  # no user name in the environment or the password file
        pass
    allowed = list(allowed)
    names = {n for n in names if _distinctive(n) and not any(
        re.search(rf"(?<![A-Za-z0-9]){re.escape(n)}(?![A-Za-z0-9])", text) for text in allowed)}
    return Machine(paths=tuple(sorted(p for p in paths if len(p.strip("/\\")) >= 3)),
                   names=tuple(sorted(names)))


def scan_text(text: str, machine: Machine) -> list[tuple[int, str]]:
    """(line, what) for each thing in ``text`` that identifies ``machine`` or is a secret;
    a secret is described, never quoted."""
    found = []
    literal = [(re.compile(rf"(?<![\w.-]){re.escape(p)}(?![\w.-])"), f"the local path `{p}`")
               for p in machine.paths]
    words = [(re.compile(rf"(?<![A-Za-z0-9]){re.escape(n)}(?![A-Za-z0-9])"),
              f"the user or host name `{n}`") for n in machine.names]
    for number, line in enumerate(text.splitlines(), 1):
        found += [(number, f"the absolute path `{m[0]}`") for m in MACHINE_PATH.finditer(line)]
        found += [(number, what) for pattern, what in literal + words if pattern.search(line)]
        found += [(number, kind) for kind, shape in SECRET_SHAPES.items() if shape.search(line)]
    return list(dict.fromkeys(found))  # /root/x is a home folder and the home directory


def gguf_strings(path: Path) -> Iterator[tuple[str, str]]:
    """(key, text) of every string in ``path``'s metadata outside the vocabulary."""
    for field in open_reader(path).fields.values():
        if field.is_array and field.name.startswith(GGUF_VOCABULARY):
            continue
        items = field.value if field.is_array else [field.value]
        for index, item in enumerate(items):
            if isinstance(item, str):
                yield (f"{field.name}.{index}" if field.is_array else field.name), item


def safetensors_strings(path: Path) -> Iterator[tuple[str, str]]:
    """(key, text) of ``path``'s header metadata (``__metadata__``: what the saving code
    chose to write there) and its tensor names."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        try:
            if not 0 < size <= SAFETENSORS_HEADER_MAX:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(fh.read(size))
            if not isinstance(header, dict):
                raise ValueError("its header is no JSON object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
            raise ReleaseError(f"{path.name} is not a safetensors file ({exc}); the release "
                               "cannot be checked for what it would publish") from None
    for key, value in (header.pop("__metadata__", None) or {}).items():
        yield f"__metadata__.{key}", f"{key}: {value}"
    for name in header:
        yield "tensor name", name


def scan_release(folder: Path, machine: Machine) -> list[str]:
    """Where ``folder``'s files identify ``machine`` or hold a secret: ``file: where: what``.
    Text files line by line; GGUF metadata and safetensors headers key by key."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".gguf", ".safetensors"):
            strings = gguf_strings(path) if path.suffix == ".gguf" else safetensors_strings(path)
            for key, text in strings:
                found += [f"{path.name}: {key}: {what}" for _, what in scan_text(text, machine)]
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # quality.png: rendered by us, without PNG text chunks
            continue
        found += [f"{path.name} line {line}: {what}" for line, what in scan_text(text, machine)]
    return found


def check_release(folder: Path, machine: Machine, *, trainer_key: str) -> None:
    """Raise unless nothing in ``folder`` identifies ``machine`` or is a secret."""
    found = scan_release(folder, machine)
    if found:
        shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
        raise ReleaseError(
            f"the release of trainer {trainer_key} would publish what identifies this machine "
            f"or a secret, so it was not written: {shown}. Find where it comes from (params of "
            f"trainers.{trainer_key}, training_lineage.json, the merged model's files) and "
            "remove it; what the release publishes of params and lineage is listed in "
            "stages/release/privacy.py and stages/release/lineage.py")
