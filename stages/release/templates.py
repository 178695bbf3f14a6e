"""The Jinja environment for ``templates/*.j2``."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jinja2

from stages.core.errors import ReleaseError

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


def _template_line(exc: BaseException, name: str) -> int | None:
    """The template line a Jinja runtime error was raised at (Jinja maps its frames)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render(template: str, /, **context: object) -> str:
    """Render ``templates/<name>``; a template that does not render is one ReleaseError
    naming the file and line."""
    where = f"templates/{template}"
    try:
        return environment().get_template(template).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise ReleaseError(f"{where}, line {exc.lineno}: {exc.message}; fix the template "
                           f"(`git diff {where}` shows what changed)") from None
    except jinja2.TemplateNotFound:
        raise ReleaseError(f"{where} is missing; restore it with `git checkout -- {where}`") \
            from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
        line = _template_line(exc, template)
        at = f", line {line}" if line else ""
        raise ReleaseError(f"{where}{at} does not render: {exc}; fix the template "
                           f"(`git diff {where}` shows what changed)") from None
