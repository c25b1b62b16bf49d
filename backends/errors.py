"""Errors raised by the backend registry.

All of them are ``ValueError`` subclasses: a bad backend name or a bad registration is a
user-fixable input problem, and the command line turns ``ValueError`` into exit status 2 with
one message. Every message names the value seen, the constraint it broke and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    from moe_a2a.backends.spec import BackendSpec


class BackendError(ValueError):
    """Base class of every error raised by :mod:`backends`."""


class InvalidBackendError(BackendError):
    """A backend spec or registration call carries an invalid value (bad layout, mode ...)."""


class ReservedBackendNameError(InvalidBackendError):
    """A registration tried to take a built-in backend name."""


class BackendConflictError(InvalidBackendError):
    """A different backend is already registered under the same name.

    Attributes (None when raised without them): ``backend_name``, ``existing`` (the registered
    spec) and ``rejected`` (the spec that was refused).
    """

    backend_name: Optional[str] = None
    existing: Optional[BackendSpec] = None
    rejected: Optional[BackendSpec] = None


class UnknownBackendError(BackendError):
    """No backend is registered under the requested name."""


class BackendEntryPointError(UnknownBackendError):
    """An entry point in group ``moe_a2a.backends`` failed to load.

    It subclasses :class:`UnknownBackendError` because the name it should have provided cannot
    be resolved; code that handles unknown names handles this one too.

    Attributes:
        entry_point: the entry point's name (the backend name it should provide).
        distribution: the distribution that declares it (``None`` when metadata lacks it).
        value: the entry point's ``module:attr`` value.
    """

    def __init__(
        self, message: str, *, entry_point: str, distribution: Optional[str], value: str
    ) -> None:
        super().__init__(message)
        self.entry_point = entry_point
        self.distribution = distribution
        self.value = value


class EntryPointConflictError(BackendEntryPointError, BackendConflictError):
    """Two installed distributions provide the same backend name with different specs.

    The name stays unavailable (every lookup raises this error) until one of them is removed;
    ``distributions`` names both.
    """

    def __init__(self, message: str, *, entry_point: str, distributions: Tuple[Optional[str], ...],
                 value: str) -> None:
        super().__init__(message, entry_point=entry_point, distribution=distributions[-1],
                         value=value)
        self.distributions = distributions


class BackendUnavailableError(BackendError):
    """A registered backend cannot run here (missing package, no CUDA, ...)."""
