"""Errors a user can trigger outside configuration (which raises ``server_args.ConfigError``)."""


class MoeA2AError(ValueError):
    """A user-fixable problem: the message names the value, the constraint and the fix."""


def user_error_types() -> tuple:
    """Exceptions that mean "bad input" anywhere in the library (the CLI exits 2 on them).

    Imports nothing heavy: ``DispatcherError`` is included once the dispatchers (and torch) are
    imported, since only they raise it (a bad flag is reported without importing torch)."""
    import sys

    from moe_a2a.backends.errors import BackendError
    from moe_a2a.server_args.errors import ConfigError

    types: tuple = (ConfigError, BackendError, MoeA2AError)
    if "moe_a2a.dispatchers.errors" in sys.modules:
        types += (sys.modules["moe_a2a.dispatchers.errors"].DispatcherError,)
    return types
