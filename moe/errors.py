"""Errors a user can trigger outside configuration (which raises ``server_args.ConfigError``)."""


class MoeA2AError(ValueError):
    """A user-fixable problem: the message names the value, the constraint and the fix."""


class CheckFailed(RuntimeError):
    """An output did not match its reference (``moe-a2a run`` exits 1)."""
