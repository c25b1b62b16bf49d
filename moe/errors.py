"""Errors a user can trigger outside configuration (which raises ``server_args.ConfigError``)."""


class MoeA2AError(ValueError):
    """A user-fixable problem: the message names the value, the constraint and the fix."""


def user_error_types() -> tuple:
    """Exceptions that mean "bad input" anywhere in the library (the CLI exits 2 on them)."""
    from moe_a2a.backends.errors import BackendError
    from moe_a2a.dispatchers.base import DispatcherError
    from moe_a2a.server_args import ConfigError

    return (ConfigError, BackendError, DispatcherError, MoeA2AError)
