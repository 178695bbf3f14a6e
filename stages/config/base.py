"""What every params model shares: the frozen base class, strict field types, the formatter.

A key is declared once, on its model.  How a bad value is reported is written
once, here: :func:`params_error` turns pydantic's ``ValidationError`` into one
:class:`~stages.core.errors.ParamsError` naming the dotted key, what is wrong
and the value seen, or, for a key no model declares, the closest valid key.
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path, PurePath
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    computed_field,
)
from pydantic_core import PydanticCustomError

from stages.core.errors import ParamsError


class ParamsModel(BaseModel):
    """A section of params.yaml: frozen, and refusing any key it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Keyed(ParamsModel):
    """A model stored under a mapping key that it knows (filled by :func:`named`, never written)."""

    _key: str = PrivateAttr(default="")


def own_key(doc: str) -> Any:
    """The key a :class:`Keyed` model is stored under, as a read-only attribute.

    A computed field: ``model_dump()`` and ``repr`` show it; params.yaml cannot set it.
    """
    return computed_field(property(lambda self: self._key, doc=doc), return_type=str)


K = TypeVar("K", bound=Keyed)


def named(mapping: dict[str, K]) -> dict[str, K]:
    """Tell each value of a validated mapping its own key."""
    for key, value in mapping.items():
        value._key = key
    return mapping


NOTHING: Any = object()  # ``got`` of a problem that has no single value to show
_INPUT: Any = object()


def problem(what: str, *, at: str = "", got: Any = _INPUT) -> PydanticCustomError:
    """A validation error in our own words, for a reason pydantic cannot state.

    ``at`` is a dotted key below the model that raises it (for a check across
    fields); ``got`` is the value to show: by default the one being validated.
    """
    ctx: dict[str, Any] = {"at": at}
    if got is not _INPUT:
        ctx["got"] = got
    return PydanticCustomError("params", what, ctx)


def pattern(regex: str, what: str) -> AfterValidator:
    """Text that must match ``regex`` whole, else fail with ``what``."""
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise problem(what)
        return value

    return AfterValidator(check)


def _path_text(value: Any) -> Any:
    if isinstance(value, str) and value.strip():
        return value
    raise problem("must be a path, written as non-empty text")


# Strict, because a YAML `true` is never a count or a threshold and `"0.5"` is text.
# (A strict float still takes an int: `max_kld: 1` is fine.)
Text = Annotated[str, Strict()]
Count = Annotated[int, Strict(), Field(gt=0)]
Index = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[float, Strict(), Field(gt=0)]
Flag = Annotated[bool, Strict()]
PathText = Annotated[Path, BeforeValidator(_path_text)]  # "" would be Path(".")

_NUMBER = re.compile(r"[-+]?\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?")
_WHAT = {
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "tuple_type": "must be a list",
}


def describe(key: str, what: str, got: Any = NOTHING) -> str:
    """``params: `key` <what is wrong> (got <value>)``: the one shape of a params message."""
    where = f"`{key}`" if key else "the file"
    return f"params: {where} {what}" + ("" if got is NOTHING else f" (got {_show(got)})")


def params_error(exc: ValidationError, root: type[BaseModel]) -> ParamsError:
    """The first error of ``exc`` (validating ``root``) as one message naming its dotted key.

    An unknown key comes first: a typo also leaves the key it meant missing,
    which is the same problem said less usefully, so that one is dropped.
    """
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    meant = {_loc(e)[:-1] + (near,) for e in errors
             if e["type"] == "extra_forbidden" and (near := _closest(e, root)[0])}
    errors = [e for e in errors if not (e["type"] == "missing" and _loc(e) in meant)]
    text = _message(errors[0], root)
    more = len(errors) - 1
    return ParamsError(text + (f" [and {more} more problem{'s' * (more > 1)}]" if more else ""))


def _loc(err: Any) -> tuple[str, ...]:
    """The dotted key of ``err`` as parts, with a cross-field check's ``at`` appended."""
    loc = tuple(str(part) for part in err["loc"] if part != "[key]")
    at = (err.get("ctx") or {}).get("at")
    return loc + tuple(at.split(".")) if at else loc


def _closest(err: Any, root: type[BaseModel]) -> tuple[str | None, list[str]]:
    """The valid key nearest to the unknown key of ``err`` (if one is near), and all of them."""
    allowed = list(_model_at(root, _loc(err)[:-1]).model_fields)
    near = difflib.get_close_matches(_loc(err)[-1], allowed, n=1, cutoff=0.7)
    return (near[0] if near else None), allowed


def _message(err: Any, root: type[BaseModel]) -> str:
    key = ".".join(_loc(err))
    if err["type"] == "extra_forbidden":
        near, allowed = _closest(err, root)
        hint = f"did you mean `{near}`?" if near else f"allowed keys: {', '.join(allowed)}"
        return f"params: unknown key `{key}`; {hint}"
    if err["type"] == "missing":
        return describe(key, "is missing")
    got = (err.get("ctx") or {}).get("got", err["input"])
    what = _WHAT.get(err["type"]) or err["msg"].replace("Input should be ", "must be ", 1)
    if err["type"] == "string_type" and isinstance(got, (int, float)):
        what += "; quote it"
    quoted_number = isinstance(got, str) and _NUMBER.fullmatch(got)
    if err["type"] in ("int_type", "float_type") and quoted_number:
        what += "; write it unquoted"
        if "e" in got.lower() and "." not in got:  # YAML 1.1 (PyYAML) reads `1e-3` as text
            what += ", with a dot: `1.0e-3`"
    return describe(key, what, got)


def _model_at(root: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel]:
    """The model class that validates the mapping at ``loc``."""
    node: Any = root
    for part in loc:  # a model's field, or a key of a mapping of models
        node = get_args(node)[1] if get_origin(node) is dict else node.model_fields[part].annotation
        while get_origin(node) in (Union, types.UnionType):  # `Model | None`
            node = next(arg for arg in get_args(node) if arg is not type(None))
    return node


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, cut short when long."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = repr(str(value) if isinstance(value, PurePath) else value)
    return text if len(text) <= 80 else text[:77] + "..."

