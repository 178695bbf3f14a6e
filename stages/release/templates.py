"""The Jinja environment for ``templates/*.j2``."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def _tojson(value: object, indent: int | None = None) -> str:
    # Plain JSON (Jinja's own tojson escapes <, >, & for HTML, which a
    # Modelfile or a manifest does not want).
    return json.dumps(value, indent=indent, ensure_ascii=False, sort_keys=False)


@cache
def environment() -> jinja2.Environment:
    """Strict environment: an undefined variable is an error, not ''."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["tojson"] = _tojson
    return env
