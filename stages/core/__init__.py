"""core: what every stage and library shares, and nothing domain-specific.

``errors`` (the one exception hierarchy: every expected failure is a
:class:`ReleaseError`), ``cli`` (the one stage skeleton: parser with
``--params/--debug/--quiet``, logging, one ``error:`` line), ``atomic``
(temp + rename writes, so a killed stage leaves nothing under a final name),
``hashing`` (chunked sha256) and ``preflight`` (free disk and RAM before heavy
work, CPU threads, human-readable sizes).  Imports nothing else of ``stages``.
"""
