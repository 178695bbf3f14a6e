"""What the Hugging Face Hub takes, as params validate it: license ids, the file size limit.

Here, not in the release library that renders the card (:mod:`stages.release.hub_meta`
applies the same rules to the card), because every stage validates params and config
must not import the release library: every stage would then rerun when the card changed.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path

# The Hub's license ids, with their source; the file sits with the release code.
HUB_LICENSES_FILE = Path(__file__).resolve().parents[1] / "release" / "hub_licenses.json"
# `license_name` of `license: other`, as the Hub's validate-yaml takes it.
LICENSE_NAME = r"[a-z0-9][a-z0-9.-]*"
# The largest file we publish to the Hub: 50 GB, decimal, the per-file limit the Hub long
# documented for LFS files.  huggingface.co/docs/hub/storage-limits ("Repository
# limitations and recommendations", hub-docs 8b9e49eb) now says 500 GB hard and chunks
# under 200 GB recommended: 50 GB stays within both, and keeps downloads resumable.
HUB_FILE_LIMIT = 50 * 10**9


@cache
def hub_licenses() -> tuple[str, ...]:
    """The license ids the Hub knows, in the order of its docs (``other`` included)."""
    return tuple(json.loads(HUB_LICENSES_FILE.read_text())["licenses"])


def license_problem(license_: str, name: str | None, link: str | None) -> tuple[str, str] | None:
    """What is wrong with a card's ``license`` (+ ``license_name``, ``license_link``), as
    ``(key, what)``; ``None`` when the Hub takes it."""
    other = ("use `license: other` with `license_name` and `license_link` for a license "
             "the Hub does not list")
    if license_ not in hub_licenses():
        near = difflib.get_close_matches(license_.lower(), hub_licenses(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'`{n}`' for n in near)}? Or " if near else ""
        return "license", (f"is not a license id of the Hub ({HUB_LICENSES_FILE.name}); "
                           f"{hint}{other}")
    for key, value in (("license_name", name), ("license_link", link)):
        if license_ == "other" and not value:
            return key, ("is missing; `license: other` needs `license_name` (lower-case, e.g. "
                         "`my-model-license`) and `license_link` (the license's URL)")
        if license_ != "other" and value is not None:
            return key, f"applies only with `license: other` (license is `{license_}`)"
    return None
