"""The one exception type for expected failures.

Every message says what failed, the value seen, and what to do about it.
Stage ``main`` functions turn it into a single ``error: ...`` line.
"""


class ReleaseError(Exception):
    """An expected failure: bad params, bad inputs, a tool that failed."""
