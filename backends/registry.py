"""The backend registry: the one process-global of this package.

Lookups go through :data:`REGISTRY`; tests restore its state with :func:`registry_snapshot`.

Third-party backends come from the entry-point group ``moe_a2a.backends``. The entry point's
*name* is the backend name; its *value* is either

* a dispatcher class decorated with :func:`register_backend` (importing it registers it), or
* a zero-argument callable returning a :class:`BackendSpec` (the loader registers it; use this
  form to keep heavy dispatcher modules out of the import, with a dotted-path dispatcher).

Entry points are scanned lazily (the first lookup of a name that is not registered, or the
first listing), and :func:`load_entry_points` is idempotent: an entry point already loaded is
never loaded again, so calling it in every worker process is safe. A broken entry point never
breaks lookups of other names: its error (naming the distribution and the entry point) is
recorded, raised when its name is requested, and listed by ``available_backends``.

Loading third-party code is guarded: whatever an entry point raises while it is imported or
called (``SystemExit`` included; ``KeyboardInterrupt`` excepted) becomes its recorded error, and
what it prints goes to stderr (stdout stays clean for ``--json``). A name that two installed
distributions provide with different specs is unavailable, with an error naming both, until one
of them is removed: which one wins must not depend on ``sys.path`` order.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
    Type,
    TypeVar,
    Union,
    overload,
)

from moe_a2a.backends.builtins import BUILTIN_SPECS
from moe_a2a.backends.errors import (
    BackendConflictError,
    BackendEntryPointError,
    EntryPointConflictError,
    InvalidBackendError,
    ReservedBackendNameError,
    UnknownBackendError,
)
from moe_a2a.backends.names import BUILTIN_NAMES, SGLANG_ONLY_BACKENDS, MoeA2ABackend
from moe_a2a.backends.settings import BackendSettings, NoSettings
from moe_a2a.backends.spec import BackendSpec, RequirementLike, normalize_name, validate_name

ENTRY_POINT_GROUP = "moe_a2a.backends"
DOCS_HINT = "https://github.com/moe-a2a/moe-a2a/blob/main/docs/custom-backend.md"
# Per-class record of the backends a class was registered as, set by register_backend; the
# entry-point loader reads it so a module imported before a registry restore still registers.
_CLASS_ATTR = "__moe_a2a_backends__"

BackendName = Union[str, MoeA2ABackend, None]
C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class _State:
    specs: Dict[str, BackendSpec]
    sources: Dict[str, str]
    errors: Dict[str, BackendEntryPointError]
    loaded: Set[Tuple[Optional[str], str, str]]
    scanned: bool
    origins: Dict[str, Tuple[Optional[str], str, str]]
    conflicts: Dict[str, EntryPointConflictError]


class BackendRegistry:
    """Backend specs by normalised name, plus the entry-point bookkeeping.

    Thread-safe; re-entrant so that an entry point whose import registers a backend (the
    decorator form) can do so while the loader holds the lock.
    """

    def __init__(self, builtins: Iterable[BackendSpec] = BUILTIN_SPECS) -> None:
        self._lock = threading.RLock()
        self._specs: Dict[str, BackendSpec] = {}
        self._sources: Dict[str, str] = {}
        self._errors: Dict[str, BackendEntryPointError] = {}
        self._loaded: Set[Tuple[Optional[str], str, str]] = set()
        self._scanned = False
        self._loading: Optional[str] = None  # source label of the entry point being loaded
        self._loading_origin: Optional[Tuple[Optional[str], str, str]] = None
        # name -> (distribution, entry point, value) of names registered by an entry point
        self._origins: Dict[str, Tuple[Optional[str], str, str]] = {}
        # names two distributions provide differently: unavailable until one is removed
        self._conflicts: Dict[str, EntryPointConflictError] = {}
        for spec in builtins:
            self._specs[spec.name] = spec
            self._sources[spec.name] = "builtin"

    # -- registration ---------------------------------------------------------------------

    def register(self, spec: BackendSpec, *, source: Optional[str] = None) -> BackendSpec:
        """Add ``spec``; identical re-registration is a no-op and returns the existing spec.

        Raises:
            ReservedBackendNameError: ``spec.name`` is a built-in name, or ``builtin=True``.
            BackendConflictError: a different backend is registered under ``spec.name``.
        """
        if not isinstance(spec, BackendSpec):
            raise InvalidBackendError(
                f"cannot register {spec!r}: expected a backends.BackendSpec; "
                f"fix: build one with BackendSpec(...) or use register_backend(...)"
            )
        with self._lock:
            if spec.name in self._conflicts:
                raise self._conflicts[spec.name]
            existing = self._specs.get(spec.name)
            if existing is not None and existing.same_entry(spec):
                return existing
            if spec.name in BUILTIN_NAMES:
                raise ReservedBackendNameError(
                    f"backend name {spec.name!r} is reserved: the built-in backends "
                    f"({', '.join(BUILTIN_NAMES)}) cannot be replaced or registered again; "
                    f"fix: register under another name, e.g. 'my_{spec.name}'"
                )
            if spec.builtin:
                raise ReservedBackendNameError(
                    f"backend {spec.name!r} has builtin=True, which is reserved for moe-a2a's "
                    f"own backends; fix: leave builtin=False"
                )
            if existing is not None:
                error = BackendConflictError(_conflict_message(existing, spec, self._sources, source))
                error.backend_name, error.existing, error.rejected = spec.name, existing, spec
                raise error
            self._specs[spec.name] = spec
            self._sources[spec.name] = self._loading or source or "register_backend"
            if self._loading_origin is not None:
                self._origins[spec.name] = self._loading_origin
            return spec

    # -- lookup ---------------------------------------------------------------------------

    def get(self, name: BackendName) -> BackendSpec:
        """The spec registered as ``name`` (str, :class:`MoeA2ABackend` or None → ``none``).

        Raises:
            UnknownBackendError: not registered (the message lists the registered names);
                a specific message for SGLang names this library does not provide.
            BackendEntryPointError: the entry point that should provide ``name`` is broken.
        """
        key = _lookup_key(name)
        with self._lock:
            spec = self._specs.get(key)
            if spec is None and not self._scanned:
                self.load_entry_points()
                spec = self._specs.get(key)
            if spec is not None:
                return spec
            if key in self._errors:
                raise self._errors[key]
            raise UnknownBackendError(self._unknown_message(name, key))

    def specs(self) -> List[BackendSpec]:
        """Every registered spec: built-ins in enum order, then the others by name."""
        with self._lock:
            if not self._scanned:
                self.load_entry_points()
            builtin = [self._specs[n] for n in BUILTIN_NAMES if n in self._specs]
            others = sorted((s for s in self._specs.values() if s.name not in BUILTIN_NAMES),
                            key=lambda s: s.name)
            return builtin + others

    def names(self) -> List[str]:
        return [spec.name for spec in self.specs()]

    def source(self, name: BackendName) -> str:
        """Where a backend came from: ``"builtin"``, ``"register_backend (module m)"`` or
        ``"entry point 'x' of distribution 'd'"``."""
        with self._lock:
            return self._sources.get(_lookup_key(name), "unknown")

    def entry_point_errors(self) -> List[BackendEntryPointError]:
        """Entry points that failed to load, by name."""
        with self._lock:
            if not self._scanned:
                self.load_entry_points()
            return [self._errors[k] for k in sorted(self._errors)]

    # -- entry points ---------------------------------------------------------------------

    def load_entry_points(self) -> List[BackendEntryPointError]:
        """Load every not-yet-loaded entry point of group ``moe_a2a.backends``; idempotent.

        Returns the errors of all broken entry points seen so far (never raises for them).
        """
        with self._lock:
            self._scanned = True
            try:
                found = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
            except Exception as exc:  # unreadable metadata on sys.path: nothing to load
                self._errors["<metadata>"] = BackendEntryPointError(
                    f"cannot read the installed entry points of group {ENTRY_POINT_GROUP!r}: "
                    f"{type(exc).__name__}: {exc}; fix: repair the broken *.dist-info on sys.path",
                    entry_point="<metadata>", distribution=None, value="",
                )
                return self.entry_point_errors()
            for ep in found:
                dist = _dist_label(ep)
                key = (dist, ep.name, ep.value)
                if key in self._loaded:
                    continue
                self._loaded.add(key)  # before loading: a broken one is recorded once, not retried
                try:
                    # third-party code: its prints must not reach stdout (``--json``)
                    with contextlib.redirect_stdout(sys.stderr):
                        self._load_one(ep, dist)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # SystemExit too: a plugin never ends the caller
                    if not self._record_conflict(ep, dist, exc):
                        err = _entry_point_error(ep, dist, exc)
                        self._errors.setdefault(_safe_key(ep.name), err)
            return [self._errors[k] for k in sorted(self._errors)]

    def _record_conflict(self, ep: Any, dist: Optional[str], exc: BaseException) -> bool:
        """Two distributions provide one name with different specs: withdraw it, naming both."""
        if not isinstance(exc, BackendConflictError) or isinstance(exc, EntryPointConflictError):
            return False
        name = exc.backend_name
        first = self._origins.get(name) if name else None
        if not name or first is None or exc.existing is None or exc.rejected is None:
            return False  # the name came from register_backend in code, not a distribution
        a, b = exc.existing.to_dict(), exc.rejected.to_dict()
        differ = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
        first_dist, first_ep, first_value = first
        error = EntryPointConflictError(
            f"backend {name!r} is provided by two installed distributions with different specs: "
            f"{first_dist!r} (entry point {first_ep!r} = {first_value!r}) and {dist!r} (entry "
            f"point {ep.name!r} = {ep.value!r}); differences: {differ}; {name!r} stays "
            f"unavailable until one of them is removed; fix: uninstall one ("
            + " or ".join(f"pip uninstall {d.split()[0]}" for d in (first_dist, dist) if d)
            + ") or ask its authors to rename the backend",
            entry_point=ep.name, distributions=(first_dist, dist), value=ep.value)
        self._specs.pop(name, None)
        self._sources.pop(name, None)
        del self._origins[name]
        self._conflicts[name] = error
        self._errors[name] = error
        return True

    def _load_one(self, ep: Any, dist: Optional[str]) -> None:
        name = validate_name(ep.name)
        if name in BUILTIN_NAMES:
            raise ReservedBackendNameError(
                f"{name!r} is a built-in backend name and cannot come from an entry point; "
                f"fix: rename the entry point, e.g. 'my_{name}'"
            )
        source = f"entry point {ep.name!r} of distribution {dist!r}"
        outer, self._loading = self._loading, source
        outer_origin, self._loading_origin = self._loading_origin, (dist, ep.name, ep.value)
        try:
            obj = ep.load()
            if isinstance(obj, type):
                spec = obj.__dict__.get(_CLASS_ATTR, {}).get(name)
                if spec is None:
                    registered = sorted(obj.__dict__.get(_CLASS_ATTR, {}))
                    raise InvalidBackendError(
                        f"{ep.value} is a class that is not registered as backend {name!r}"
                        + (f" (it is registered as {registered})" if registered else "")
                        + f"; fix: decorate it with @register_backend({name!r}, token_layout=..., "
                        f"ep_policy=...) or rename the entry point to the name it registers"
                    )
            elif callable(obj):
                spec = obj()
                if not isinstance(spec, BackendSpec):
                    raise InvalidBackendError(
                        f"factory {ep.value} returned {spec!r}, not a backends.BackendSpec; "
                        f"fix: return BackendSpec(name={name!r}, dispatcher=..., ...)"
                    )
            else:
                raise InvalidBackendError(
                    f"{ep.value} is {obj!r}; an entry point of group {ENTRY_POINT_GROUP!r} must "
                    f"name a dispatcher class decorated with @register_backend or a zero-argument "
                    f"function returning a BackendSpec; fix: point it at one of those"
                )
            if spec.name != name:
                raise InvalidBackendError(
                    f"entry point name {ep.name!r} must equal the backend name, but {ep.value} "
                    f"provides {spec.name!r}; fix: rename the entry point to {spec.name!r}"
                )
            self.register(spec, source=source)
        finally:
            self._loading, self._loading_origin = outer, outer_origin

    # -- state ----------------------------------------------------------------------------

    @contextmanager
    def snapshot(self, *, builtins_only: bool = False) -> Iterator["BackendRegistry"]:
        """Restore every registration and entry-point record on exit (for tests).

        ``builtins_only``: inside, the registry holds the built-in backends alone and counts as
        scanned (installed entry points are not loaded unless ``load_entry_points`` is called):
        what tests and generated docs that describe moe-a2a itself need, whatever is installed.
        """
        with self._lock:
            state = _State(dict(self._specs), dict(self._sources), dict(self._errors),
                           set(self._loaded), self._scanned, dict(self._origins),
                           dict(self._conflicts))
            if builtins_only:
                self._specs = {n: s for n, s in self._specs.items() if n in BUILTIN_NAMES}
                self._sources = {n: self._sources[n] for n in self._specs}
                self._errors, self._loaded, self._scanned = {}, set(), True
                self._origins, self._conflicts = {}, {}
        try:
            yield self
        finally:
            with self._lock:
                self._specs, self._sources = dict(state.specs), dict(state.sources)
                self._errors, self._loaded = dict(state.errors), set(state.loaded)
                self._scanned = state.scanned
                self._origins, self._conflicts = dict(state.origins), dict(state.conflicts)

    def _unknown_message(self, asked: Any, key: str) -> str:
        registered = list(self._specs)
        ordered = [n for n in BUILTIN_NAMES if n in registered] + sorted(
            n for n in registered if n not in BUILTIN_NAMES)
        how = (f"register one by decorating a moe_a2a.dispatchers.BaseDispatcher subclass with "
               f"@moe_a2a.backends.register_backend({_show(key)}, token_layout=..., ep_policy=...), or expose "
               f"it from a package through the entry-point group {ENTRY_POINT_GROUP!r} "
               f"(see {DOCS_HINT})")
        if key in SGLANG_ONLY_BACKENDS:
            return (
                f"MoE A2A backend {_show(asked)} ({SGLANG_ONLY_BACKENDS[key]}) is known from SGLang but "
                f"is not provided by moe-a2a, and no installed package registers it. Registered "
                f"backends: {', '.join(ordered)}. To use it, {how}"
            )
        close = difflib.get_close_matches(key, ordered, n=1)
        maybe = f" Did you mean {close[0]!r}?" if close else ""
        broken = sorted(k for k in self._errors if not k.startswith("<"))
        broken_note = (f" Entry points that failed to load: {', '.join(broken)} "
                       f"(see `moe-a2a backends`)." if broken else "")
        return (
            f"unknown MoE A2A backend {_show(asked)}: registered backends are "
            f"{', '.join(ordered)}.{maybe}{broken_note} To add a backend, {how}"
        )


def _show(name: Any) -> str:
    """A requested name as echoed in a message: its repr, cut to a sane length."""
    text = repr(name)
    return text if len(text) <= 80 else f"{text[:77]}... ({len(text)} chars)"


def _lookup_key(name: Any) -> str:
    if name is None:
        return MoeA2ABackend.NONE.value
    if isinstance(name, (str, MoeA2ABackend)):
        return normalize_name(name)
    raise TypeError(
        f"backend name must be a str, MoeA2ABackend or None, not {type(name).__name__} ({name!r})"
    )


def _dist_label(ep: Any) -> Optional[str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    try:
        return f"{dist.name} {dist.version}"
    except Exception:  # metadata without Name/Version: still report what we can
        return getattr(dist, "name", None)


def _safe_key(name: str) -> str:
    try:
        return normalize_name(name)
    except Exception:
        return str(name)


def _entry_point_error(ep: Any, dist: Optional[str], exc: BaseException) -> BackendEntryPointError:
    where = f"distribution {dist!r}" if dist else "an unknown distribution"
    detail = str(exc) if isinstance(exc, InvalidBackendError) else describe_load_failure(exc)
    return BackendEntryPointError(
        f"backend entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}, {where}) "
        f"failed to load: {detail}; backend {ep.name!r} is unavailable; fix that distribution "
        f"(or uninstall it)",
        entry_point=ep.name, distribution=dist, value=ep.value,
    )


def describe_load_failure(exc: BaseException) -> str:
    """What third-party code did when it failed to load, on one line (cut to a sane length)."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}) while being loaded"
    text = " ".join(str(exc).split())
    text = text if len(text) <= 500 else f"{text[:480]}... ({len(text)} chars)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _conflict_message(
    old: BackendSpec, new: BackendSpec, sources: Dict[str, str], new_source: Optional[str]
) -> str:
    a, b = old.to_dict(), new.to_dict()
    differ = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
    return (
        f"backend {new.name!r} is already registered with dispatcher {old.dispatcher_path!r} "
        f"(from {sources.get(old.name, 'unknown')}); refusing to register a different entry with "
        f"dispatcher {new.dispatcher_path!r}"
        + (f" (from {new_source})" if new_source else "")
        + f" (differences: {differ}); fix: choose another name, or register the identical entry"
    )


REGISTRY = BackendRegistry()
"""The process-wide registry (the one global; see :func:`registry_snapshot`)."""


# -- public functions ---------------------------------------------------------------------


@overload
def register_backend(
    name: str, dispatcher: None = None, *, token_layout: str, ep_policy: str, fused_experts: bool = ...,
    modes: Iterable[str] = ..., cuda_graph_modes: Iterable[str] = ..., devices: Iterable[str] = ...,
    requires: Iterable[RequirementLike] = ..., min_compute_capability: Optional[Tuple[int, int]] = ...,
    install_hint: str = ..., description: str = ..., features: Iterable[str] = ...,
    settings: Optional[Type[BackendSettings]] = ..., settings_fields: Optional[dict] = ...,
    mode_setting: Optional[str] = ..., capacities: Iterable[Any] = ..., fallback: Optional[str] = ...,
    extra: Optional[dict] = ...,
) -> Callable[[C], C]: ...
@overload
def register_backend(
    name: str, dispatcher: Union[str, type], *, token_layout: str, ep_policy: str, fused_experts: bool = ...,
    modes: Iterable[str] = ..., cuda_graph_modes: Iterable[str] = ..., devices: Iterable[str] = ...,
    requires: Iterable[RequirementLike] = ..., min_compute_capability: Optional[Tuple[int, int]] = ...,
    install_hint: str = ..., description: str = ..., features: Iterable[str] = ...,
    settings: Optional[Type[BackendSettings]] = ..., settings_fields: Optional[dict] = ...,
    mode_setting: Optional[str] = ..., capacities: Iterable[Any] = ..., fallback: Optional[str] = ...,
    extra: Optional[dict] = ...,
) -> BackendSpec: ...


def register_backend(
    name: str,
    dispatcher: Union[str, type, None] = None,
    *,
    token_layout: str,
    ep_policy: str,
    fused_experts: bool = False,
    modes: Iterable[str] = ("default",),
    cuda_graph_modes: Iterable[str] = (),
    devices: Iterable[str] = ("cpu", "cuda"),
    requires: Iterable[RequirementLike] = (),
    min_compute_capability: Optional[Tuple[int, int]] = None,
    install_hint: str = "",
    description: str = "",
    features: Iterable[str] = (),
    settings: Optional[Type[BackendSettings]] = None,
    settings_fields: Optional[dict] = None,
    mode_setting: Optional[str] = None,
    capacities: Iterable[Any] = (),
    fallback: Optional[str] = None,
    extra: Optional[dict] = None,
) -> Any:
    """Register a backend under ``name`` (normalised: lower case, ``-`` → ``_``).

    Two forms::

        @register_backend("my_a2a", token_layout="scattered", ep_policy="tp")
        class MyDispatcher(BaseDispatcher): ...           # returns the class unchanged

        register_backend("my_a2a", "my_pkg.dispatch:MyDispatcher",
                         token_layout="scattered", ep_policy="tp")   # returns the BackendSpec

    The dotted path is imported only when the dispatcher is built or availability is checked.
    Every value is validated now. Registering the identical entry again is a no-op; a
    different entry under a registered name raises :class:`BackendConflictError`, and
    built-in names raise :class:`ReservedBackendNameError` (both ``ValueError``).
    ``requires`` accepts :class:`Requirement` objects or ``"module>=version"`` strings.
    ``features`` names optional capabilities (``"waterfill"``); ``settings`` /
    ``settings_fields`` / ``mode_setting`` / ``capacities`` / ``fallback`` describe the
    backend's typed knobs and capacities (see :class:`BackendSpec`).
    """

    def build(target: Union[str, type]) -> BackendSpec:
        # the ignores: BackendSpec.__post_init__ validates and normalises these loose inputs
        # (str to the Literal choices, iterables to tuples); dataclass fields have no converters
        spec = BackendSpec(
            name=name, dispatcher=target, fused_experts=fused_experts,
            token_layout=token_layout, ep_policy=ep_policy,  # type: ignore[arg-type]
            modes=modes, cuda_graph_modes=cuda_graph_modes, devices=devices,  # type: ignore[arg-type]
            requires=requires, min_compute_capability=min_compute_capability,  # type: ignore[arg-type]
            install_hint=install_hint, description=description, features=tuple(features),
            settings=settings if settings is not None else NoSettings,
            settings_fields=settings_fields or {}, mode_setting=mode_setting,
            capacities=tuple(capacities), fallback=fallback,
            extra=extra if extra is not None else {},
        )
        where = target.__module__ if isinstance(target, type) else None
        source = f"register_backend (module {where})" if where else None
        registered = REGISTRY.register(spec, source=source)
        if isinstance(target, type):
            # own (not inherited) record, so a subclass is not mistaken for its decorated base
            record = dict(target.__dict__.get(_CLASS_ATTR, {}))
            record[registered.name] = registered
            setattr(target, _CLASS_ATTR, record)
        return registered

    if dispatcher is None:
        validate_name(name)  # fail at the decorator line, before the class body is needed

        def decorate(cls: C) -> C:
            build(cls)
            return cls

        return decorate
    return build(dispatcher)


def get_backend(name: BackendName) -> BackendSpec:
    """The spec of ``name`` (str, :class:`MoeA2ABackend`, or None for ``none``).

    Raises :class:`UnknownBackendError` (a ``ValueError``) listing the registered names.
    """
    return REGISTRY.get(name)


def list_backends() -> List[BackendSpec]:
    """Every registered spec: built-ins first (enum order), then the others by name."""
    return REGISTRY.specs()


def backend_names() -> List[str]:
    """Registered names in :func:`list_backends` order."""
    return REGISTRY.names()


def load_entry_points() -> List[BackendEntryPointError]:
    """Load the ``moe_a2a.backends`` entry points not loaded yet; idempotent.

    Returns the errors of broken entry points (also surfaced by ``available_backends`` and
    raised when their name is requested).
    """
    return REGISTRY.load_entry_points()


def entry_point_errors() -> List[BackendEntryPointError]:
    """Errors of the entry points that failed to load."""
    return REGISTRY.entry_point_errors()


def registry_snapshot(*, builtins_only: bool = False) -> ContextManager[BackendRegistry]:
    """Context manager restoring the registry on exit::

        with registry_snapshot():
            register_backend("tmp", ...)
        # "tmp" is gone again

    ``builtins_only=True`` also hides every other backend inside the block (installed
    third-party ones included), e.g. for tests that describe the built-ins alone.
    """
    return REGISTRY.snapshot(builtins_only=builtins_only)


__all__ = [
    "BackendRegistry",
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "backend_names",
    "describe_load_failure",
    "entry_point_errors",
    "get_backend",
    "list_backends",
    "load_entry_points",
    "register_backend",
    "registry_snapshot",
]
