"""Errors and warnings of the configuration layer."""

from __future__ import annotations

# Every deprecation message names this release, so users know how long the old names work.
REMOVAL_RELEASE = "moe-a2a 0.4"


class ConfigError(ValueError):
    """A user-fixable configuration problem.

    The message names the flag(s) or variable(s) involved, the value(s) seen, the constraint
    that was broken and the fix. The command line turns it into exit status 2 and one line
    on stderr.
    """


class ConfigWarning(UserWarning):
    """A configuration that works but probably is not what was meant (a flag without effect)."""


class ConfigDeprecationWarning(FutureWarning):
    """A legacy SGLang variable or flag was used.

    A ``FutureWarning`` (shown by default) rather than a ``DeprecationWarning`` (hidden outside
    ``__main__``): the people who must act are the ones launching jobs, not library developers.
    """


# Values echoed in messages are cut to this many characters: an error names the value, it
# does not reprint a 10 kB JSON document or a pasted file.
ECHO_LIMIT = 80


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, with the cut marked (``'...' (1234 chars)``)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 3, 1)]}... ({len(text)} chars)"


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` clipped: how a raw value is echoed in an error message."""
    try:
        text = repr(value)
    except RecursionError:  # a pathologically nested container
        text = f"<{type(value).__name__} nested too deeply to show>"
    return clip(text, limit)
