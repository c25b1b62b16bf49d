"""The dispatcher package's user-facing error."""


class DispatcherError(ValueError):
    """A user-fixable dispatcher problem (bad sizes, unsupported layout, mismatched inputs,
    a batch above a capacity).

    The message names the value(s) seen, the constraint, and how to fix it.
    """


__all__ = ["DispatcherError"]
