"""Backend specs: what a backend is, as data that models and the resolver query.

Nothing outside this package compares backend *names* to decide behaviour; it asks the
spec (``token_layout``, ``ep_policy``, ``fused_experts``, ``modes`` ...).

A :class:`BackendSpec` validates itself when it is created, so an invalid spec cannot exist,
whichever way it was made (``register_backend``, an entry-point factory, or by hand).
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import re
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Iterable, Literal, Mapping, Optional, Tuple, Type, TypeGuard,
                    Union, cast)

from moe_a2a.backends.errors import InvalidBackendError
from moe_a2a.backends.settings import BackendSettings, CapacityRule, NoSettings, is_settings_class

if TYPE_CHECKING:
    from moe_a2a.dispatchers.base import BaseDispatcher
    from moe_a2a.dispatchers.fused import FusedMoE

    DispatcherClass = Union[Type[BaseDispatcher], Type[FusedMoE]]

TokenLayout = Literal["replicated", "scattered"]
EpPolicy = Literal["user", "tp"]
Device = Literal["cpu", "cuda"]

TOKEN_LAYOUTS: Tuple[str, ...] = ("replicated", "scattered")
EP_POLICIES: Tuple[str, ...] = ("user", "tp")
DEVICES: Tuple[str, ...] = ("cpu", "cuda")
# Feature names the server arguments know how to require (``BackendSpec.features``).
WATERFILL = "waterfill"

# A backend name after normalisation: it travels through flags, env variables and JSON.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED_PATH_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_REQUIREMENT_RE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][A-Za-z0-9.+\-]*))?\s*$")


def normalize_name(name: Any) -> str:
    """Backend names are case-insensitive and treat ``-`` as ``_`` (``"Deep-EP"`` → ``"deep_ep"``)."""
    if isinstance(name, enum.Enum):  # str(SomeStrEnum.X) is "SomeStrEnum.X" before 3.11's StrEnum
        name = name.value
    return str(name).strip().lower().replace("-", "_")


def validate_name(name: Any) -> str:
    """Normalise ``name`` and check it can travel through flags, env variables and JSON."""
    if not isinstance(name, str):
        raise InvalidBackendError(
            f"backend name {name!r} is a {type(name).__name__}: it must be a string; "
            f"fix: pass the name as text, e.g. 'my_a2a'"
        )
    normalised = normalize_name(name)
    if not _NAME_RE.match(normalised):
        raise InvalidBackendError(
            f"backend name {name!r} is invalid: after normalisation ({normalised!r}) it must match "
            f"[a-z][a-z0-9_]* (start with a letter; letters, digits, '_' or '-'); "
            f"fix: choose a name such as 'my_a2a'"
        )
    return normalised


def _version_tuple(text: str) -> Tuple[int, ...]:
    """``"2.1.0rc1+cu124"`` → ``(2, 1, 0)``: the leading release numbers only."""
    parts = []
    for piece in text.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # "0rc1": a pre-release tag ends the release part
            break
    return tuple(parts)


@dataclass(frozen=True)
class Requirement:
    """An importable package a backend needs.

    ``module`` is the import name, ``distribution`` the pip name (for versions and hints;
    defaults to ``module``), ``min_version`` the oldest release that works.
    """

    module: str
    distribution: Optional[str] = None
    min_version: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not re.match(rf"^{_IDENT}(\.{_IDENT})*$", self.module):
            raise InvalidBackendError(
                f"requirement module {self.module!r} is not an importable module name; "
                f"fix: give the import name, e.g. Requirement('deep_ep')"
            )
        if self.min_version is not None and not _version_tuple(str(self.min_version)):
            raise InvalidBackendError(
                f"requirement {self.module!r}: min_version {self.min_version!r} is not a version "
                f"number; fix: use a release such as '1.1' or '2.0.1'"
            )

    @classmethod
    def parse(cls, text: str) -> "Requirement":
        """``"deep_ep"`` or ``"deep_ep>=1.1"`` (module and distribution share the name)."""
        match = _REQUIREMENT_RE.match(text) if isinstance(text, str) else None
        if not match:
            raise InvalidBackendError(
                f"requirement {text!r} is not understood: expected 'module' or 'module>=version'; "
                f"fix: write e.g. 'deep_ep>=1.1', or pass Requirement(module=..., distribution=...)"
            )
        name, version = match.group(1), match.group(2)
        return cls(module=name.replace("-", "_"), distribution=name, min_version=version)

    def check(self) -> Tuple[bool, str]:
        """``(ok, reason)``; the reason carries the real import error text. Never raises."""
        try:
            importlib.import_module(self.module)
        except BaseException as exc:  # ImportError, or a broken CUDA build raising OSError/RuntimeError/SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            return False, f"import {self.module} failed: {type(exc).__name__}: {exc}"
        if self.min_version is None:
            return True, ""
        dist = self.distribution or self.module
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return True, ""  # importable but not pip-installed (e.g. a source build): cannot check
        if _version_tuple(found) < _version_tuple(self.min_version):
            return False, f"{dist} {found} is installed; {self.min_version} or newer is required"
        return True, ""

    def __str__(self) -> str:
        dist = self.distribution or self.module
        return f"{dist}>={self.min_version}" if self.min_version else dist


RequirementLike = Union[Requirement, str]


@dataclass(frozen=True)
class BackendSpec:
    """One all-to-all backend, fully classified.

    Attributes:
        name: normalised registry name.
        dispatcher: the dispatcher class (a ``dispatchers.BaseDispatcher`` subclass), or a
            dotted path ``"pkg.mod:Class"`` imported lazily.
        token_layout: ``"replicated"`` (every attention-TP rank holds the same tokens) or
            ``"scattered"`` (each attention-TP rank holds a disjoint slice).
        ep_policy: ``"user"`` (ep_size as given) or ``"tp"`` (ep_size derived as tp_size).
        fused_experts: the backend computes the experts itself.
        modes: modes the backend accepts (``("default",)`` when it has none).
        cuda_graph_modes: the subset of ``modes`` whose kernels can be captured in a CUDA graph.
        devices: where it runs (a non-empty subset of ``("cpu", "cuda")``).
        requires: packages it imports at dispatcher construction time.
        min_compute_capability: ``(major, minor)`` needed on CUDA, or None.
        install_hint: what to run when a requirement is missing.
        builtin: shipped with moe-a2a (only the registry's own built-ins set it).
        description: one line for tables.
        features: optional capabilities a server argument can require, as names (e.g.
            ``"waterfill"``: the backend can place each token's fused shared-expert column on
            the least-loaded rank, so ``--enable-deepep-waterfill`` may run on it).
        settings: the backend's typed settings class (a ``BackendSettings`` subclass).
        settings_fields: settings attribute -> server-argument field it is read from
            (e.g. ``{"mode": "deepep_mode"}``); attributes not listed keep their defaults.
        mode_setting: the settings attribute holding the mode (backends with modes), or None.
        capacities: per-rank capacities the resolver and the layer check (``CapacityRule``).
        fallback: the backend a step runs instead when a ``"fallback"`` capacity is exceeded.
        extra: free-form metadata for third parties; not compared, not validated.

    Sequences are stored as tuples and strings are normalised (modes lower case), so two
    specs built from equivalent arguments compare equal.
    """

    name: str
    dispatcher: Union[str, type]
    token_layout: TokenLayout
    ep_policy: EpPolicy
    fused_experts: bool = False
    modes: Tuple[str, ...] = ("default",)
    cuda_graph_modes: Tuple[str, ...] = ()
    devices: Tuple[str, ...] = ("cpu", "cuda")
    requires: Tuple[Requirement, ...] = ()
    min_compute_capability: Optional[Tuple[int, int]] = None
    install_hint: str = ""
    builtin: bool = False
    description: str = ""
    features: Tuple[str, ...] = ()
    settings: Type[BackendSettings] = NoSettings
    settings_fields: Mapping[str, str] = field(default_factory=dict, hash=False)
    mode_setting: Optional[str] = None
    capacities: Tuple[CapacityRule, ...] = ()
    fallback: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        set_ = lambda attr, value: object.__setattr__(self, attr, value)  # noqa: E731 - frozen
        name = validate_name(self.name)
        set_("name", name)
        set_("dispatcher", _check_dispatcher(name, self.dispatcher))
        set_("token_layout", _check_choice(name, "token_layout", self.token_layout, TOKEN_LAYOUTS))
        set_("ep_policy", _check_choice(name, "ep_policy", self.ep_policy, EP_POLICIES))
        for attr in ("fused_experts", "builtin"):
            if not isinstance(getattr(self, attr), bool):
                raise InvalidBackendError(
                    f"backend {name!r}: {attr}={getattr(self, attr)!r} must be True or False"
                )
        modes = _check_names(name, "modes", self.modes)
        if not modes:
            raise InvalidBackendError(
                f"backend {name!r}: modes=() is empty; a backend needs at least one mode; "
                f"fix: modes=('default',) when the backend has no modes"
            )
        set_("modes", modes)
        graph_modes = _check_names(name, "cuda_graph_modes", self.cuda_graph_modes)
        outside = [m for m in graph_modes if m not in modes]
        if outside:
            raise InvalidBackendError(
                f"backend {name!r}: cuda_graph_modes {outside} are not in modes {list(modes)}; "
                f"cuda_graph_modes must be a subset of modes; fix: add them to modes or drop them"
            )
        set_("cuda_graph_modes", graph_modes)
        devices = _check_names(name, "devices", self.devices)
        bad = [d for d in devices if d not in DEVICES]
        if bad or not devices:
            raise InvalidBackendError(
                f"backend {name!r}: devices={list(devices)} is invalid; it must be a non-empty "
                f"subset of {list(DEVICES)}; fix: e.g. devices=('cuda',)"
            )
        set_("devices", devices)
        set_("features", _check_names(name, "features", self.features))
        set_("requires", _check_requires(name, self.requires))
        set_("min_compute_capability", _check_cc(name, self.min_compute_capability, devices))
        for attr in ("install_hint", "description"):
            if not isinstance(getattr(self, attr), str):
                raise InvalidBackendError(
                    f"backend {name!r}: {attr}={getattr(self, attr)!r} must be a string"
                )
        if not isinstance(self.extra, Mapping):
            raise InvalidBackendError(f"backend {name!r}: extra={self.extra!r} must be a mapping")
        set_("extra", dict(self.extra))  # a private copy (a proxy would not pickle)
        _check_settings(self)
        if isinstance(self.dispatcher, type):  # a path is checked when it is loaded
            _check_class_contract(name, self.dispatcher, self.fused_experts)

    @property
    def has_modes(self) -> bool:
        """The backend has modes of its own (not only ``default``)."""
        return self.modes != ("default",)

    @property
    def fused_capacity(self) -> Optional[CapacityRule]:
        """The capacity that decides, per step, between the fused path and the fallback."""
        for rule in self.capacities:
            if rule.over_capacity == "fallback":
                return rule
        return None

    def default_settings(self) -> BackendSettings:
        return self.settings()

    @property
    def dispatcher_path(self) -> str:
        """``"pkg.mod:Class"`` whether the dispatcher was given as a class or as a path."""
        if isinstance(self.dispatcher, str):
            return self.dispatcher
        return f"{self.dispatcher.__module__}:{self.dispatcher.__qualname__}"

    def supports_cuda_graph(self, mode: str = "default") -> bool:
        """Whether ``mode``'s kernels can be captured in a CUDA graph."""
        return normalize_name(mode) in self.cuda_graph_modes

    def same_entry(self, other: "BackendSpec") -> bool:
        """Equal up to how the dispatcher is referenced (class object vs its dotted path).

        Re-importing a module (a worker, ``importlib.reload``) creates a new class object
        with the same path; that is the same registration, not a conflict.
        """
        return self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """JSON-ready capability data (the dispatcher as its dotted path)."""
        return {
            "name": self.name,
            "builtin": self.builtin,
            "dispatcher": self.dispatcher_path,
            "token_layout": self.token_layout,
            "ep_policy": self.ep_policy,
            "fused_experts": self.fused_experts,
            "modes": list(self.modes),
            "cuda_graph_modes": list(self.cuda_graph_modes),
            "devices": list(self.devices),
            "requires": [str(r) for r in self.requires],
            "min_compute_capability": (
                list(self.min_compute_capability) if self.min_compute_capability else None
            ),
            "install_hint": self.install_hint,
            "description": self.description,
            "features": list(self.features),
            "settings": f"{self.settings.__module__}:{self.settings.__qualname__}",
            "settings_fields": dict(self.settings_fields),
            "mode_setting": self.mode_setting,
            "capacities": [
                {"setting": r.setting, "batches": r.batches,
                 "modes": list(r.modes) if r.modes is not None else None,
                 "over_capacity": r.over_capacity}
                for r in self.capacities
            ],
            "fallback": self.fallback,
        }

    def load_dispatcher_class(self) -> DispatcherClass:
        """Import and return the dispatcher class.

        Raises:
            ImportError: the module or attribute cannot be loaded (the message carries the
                original error and the install hint).
            InvalidBackendError: the attribute is not a ``dispatchers.BaseDispatcher`` subclass.
        """
        if not isinstance(self.dispatcher, str):
            return cast("DispatcherClass", self.dispatcher)  # checked in __post_init__
        module_name, _, attr = self.dispatcher.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # any failure while importing is "cannot load"
            hint = f" ({self.install_hint})" if self.install_hint else ""
            raise ImportError(
                f"backend {self.name!r}: cannot load dispatcher {self.dispatcher!r}: "
                f"{type(exc).__name__}: {exc}{hint}"
            ) from exc
        if not _is_dispatcher_class(obj):
            raise InvalidBackendError(
                f"backend {self.name!r}: {self.dispatcher!r} is {obj!r}, not a subclass of "
                f"moe_a2a.dispatchers.BaseDispatcher or moe_a2a.dispatchers.FusedMoE; fix: point the backend at "
                f"one of those"
            )
        _check_class_contract(self.name, obj, self.fused_experts)
        return obj


def _is_dispatcher_class(obj: Any) -> TypeGuard[DispatcherClass]:
    # lazy: keeps `import moe_a2a.backends` free of torch
    from moe_a2a.dispatchers.base import BaseDispatcher
    from moe_a2a.dispatchers.fused import FusedMoE

    return isinstance(obj, type) and issubclass(obj, (BaseDispatcher, FusedMoE))


def _check_class_contract(name: str, cls: type, fused_experts: bool) -> None:
    """The class keeps the contract the spec names: fused or not, and a declared output class."""
    from moe_a2a.dispatchers.base import BaseDispatcher
    from moe_a2a.dispatchers.fused import FusedMoE
    from moe_a2a.dispatchers.outputs import DispatchOutput

    is_fused = issubclass(cls, FusedMoE)
    if is_fused != fused_experts:
        raise InvalidBackendError(
            f"backend {name!r}: fused_experts={fused_experts} but {cls.__qualname__} "
            f"{'is' if is_fused else 'is not'} a FusedMoE; fix: register a FusedMoE subclass "
            f"with fused_experts=True, or a BaseDispatcher subclass with fused_experts=False")
    if issubclass(cls, BaseDispatcher):
        out = getattr(cls, "output_class", None)
        if not (isinstance(out, type) and issubclass(out, DispatchOutput)):
            raise InvalidBackendError(
                f"backend {name!r}: {cls.__qualname__}.output_class is {out!r}; a dispatcher "
                f"declares the output class it returns (a dispatchers.DispatchOutput subclass, "
                f"e.g. StandardDispatchOutput) as a ClassVar; fix: set output_class on the class")


def _check_settings(spec: "BackendSpec") -> None:
    name = spec.name
    if not is_settings_class(spec.settings):
        raise InvalidBackendError(
            f"backend {name!r}: settings={spec.settings!r} must be a subclass of "
            f"moe_a2a.backends.BackendSettings (a frozen pydantic model); fix: declare one, or "
            f"leave the default NoSettings")
    attrs = set(spec.settings.model_fields)
    if not isinstance(spec.settings_fields, Mapping):
        raise InvalidBackendError(f"backend {name!r}: settings_fields must be a mapping "
                                  f"settings attribute -> server-argument field")
    unknown = sorted(set(spec.settings_fields) - attrs)
    if unknown:
        raise InvalidBackendError(
            f"backend {name!r}: settings_fields names {unknown}, which {spec.settings.__name__} "
            f"does not have (attributes: {sorted(attrs) or 'none'}); fix: map existing attributes")
    object.__setattr__(spec, "settings_fields", {str(k): str(v) for k, v in spec.settings_fields.items()})
    if spec.mode_setting is not None and spec.mode_setting not in attrs:
        raise InvalidBackendError(
            f"backend {name!r}: mode_setting={spec.mode_setting!r} is not an attribute of "
            f"{spec.settings.__name__}; fix: name the attribute that holds the mode")
    if spec.mode_setting is not None and not spec.has_modes:
        raise InvalidBackendError(
            f"backend {name!r}: mode_setting={spec.mode_setting!r} but modes={list(spec.modes)}; "
            f"fix: list the backend's modes, or drop mode_setting")
    rules = tuple(spec.capacities) if not isinstance(spec.capacities, CapacityRule) else (spec.capacities,)
    for rule in rules:
        if not isinstance(rule, CapacityRule):
            raise InvalidBackendError(f"backend {name!r}: capacities entry {rule!r} must be a "
                                      f"moe_a2a.backends.CapacityRule")
        if rule.setting not in attrs:
            raise InvalidBackendError(
                f"backend {name!r}: capacity setting {rule.setting!r} is not an attribute of "
                f"{spec.settings.__name__} (attributes: {sorted(attrs) or 'none'})")
        bad = [m for m in (rule.modes or ()) if m not in spec.modes]
        if bad:
            raise InvalidBackendError(f"backend {name!r}: capacity {rule.setting!r} names modes "
                                      f"{bad} that are not in modes {list(spec.modes)}")
    object.__setattr__(spec, "capacities", rules)
    needs_fallback = any(r.over_capacity == "fallback" for r in rules)
    if spec.fallback is not None:
        object.__setattr__(spec, "fallback", validate_name(spec.fallback))
        if spec.fallback == name:
            raise InvalidBackendError(f"backend {name!r}: fallback cannot be the backend itself")
    if needs_fallback and spec.fallback is None:
        raise InvalidBackendError(
            f"backend {name!r}: a capacity with over_capacity='fallback' needs fallback=<backend "
            f"name>; fix: e.g. fallback='none'")


def _check_dispatcher(name: str, dispatcher: Any) -> Union[str, type]:
    if isinstance(dispatcher, str):
        if not _DOTTED_PATH_RE.match(dispatcher):
            raise InvalidBackendError(
                f"backend {name!r}: dispatcher {dispatcher!r} is not a dotted path of the form "
                f"'package.module:ClassName'; fix: e.g. 'my_pkg.dispatch:MyDispatcher'"
            )
        return dispatcher
    if isinstance(dispatcher, type):
        if not _is_dispatcher_class(dispatcher):
            raise InvalidBackendError(
                f"backend {name!r}: dispatcher class {dispatcher.__module__}."
                f"{dispatcher.__qualname__} does not subclass moe_a2a.dispatchers.BaseDispatcher (or "
                f"moe_a2a.dispatchers.FusedMoE); fix: derive it from moe_a2a.dispatchers.BaseDispatcher and "
                f"implement dispatch/combine"
            )
        return dispatcher
    raise InvalidBackendError(
        f"backend {name!r}: dispatcher {dispatcher!r} must be a BaseDispatcher subclass or a "
        f"dotted path 'package.module:ClassName'; fix: pass one of those"
    )


def _check_choice(name: str, attr: str, value: Any, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise InvalidBackendError(
            f"backend {name!r}: {attr}={value!r} is invalid; expected one of "
            f"{', '.join(repr(c) for c in choices)}; fix: {attr}={choices[0]!r} or {choices[1]!r}"
        )
    return value.strip().lower()


def _check_names(name: str, attr: str, values: Any) -> Tuple[str, ...]:
    if isinstance(values, str):
        raise InvalidBackendError(
            f"backend {name!r}: {attr}={values!r} is a single string; it must be a tuple of "
            f"strings; fix: {attr}=({values!r},)"
        )
    if not isinstance(values, Iterable):
        raise InvalidBackendError(
            f"backend {name!r}: {attr}={values!r} must be a tuple of strings; fix: e.g. "
            f"{attr}=('default',)"
        )
    out = []
    for value in values:
        if not isinstance(value, str) or not _NAME_RE.match(normalize_name(value)):
            raise InvalidBackendError(
                f"backend {name!r}: {attr} entry {value!r} is invalid; entries are names matching "
                f"[a-z][a-z0-9_]*; fix: e.g. {attr}=('default',)"
            )
        normalised = normalize_name(value)
        if normalised in out:
            raise InvalidBackendError(
                f"backend {name!r}: {attr} lists {normalised!r} twice; fix: list each once"
            )
        out.append(normalised)
    return tuple(out)


def _check_requires(name: str, values: Any) -> Tuple[Requirement, ...]:
    if isinstance(values, (str, Requirement)):
        values = (values,)
    if not isinstance(values, Iterable):
        raise InvalidBackendError(
            f"backend {name!r}: requires={values!r} must be a tuple of Requirement or "
            f"'module>=version' strings"
        )
    out = []
    for value in values:
        if isinstance(value, str):
            value = Requirement.parse(value)
        if not isinstance(value, Requirement):
            raise InvalidBackendError(
                f"backend {name!r}: requires entry {value!r} must be a Requirement or a "
                f"'module>=version' string; fix: e.g. requires=('deep_ep>=1.1',)"
            )
        out.append(value)
    return tuple(out)


def _check_cc(name: str, value: Any, devices: Tuple[str, ...]) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )
    if not ok:
        raise InvalidBackendError(
            f"backend {name!r}: min_compute_capability={value!r} must be None or (major, minor) "
            f"with non-negative ints; fix: e.g. min_compute_capability=(9, 0) for SM90"
        )
    if "cuda" not in devices:
        raise InvalidBackendError(
            f"backend {name!r}: min_compute_capability={tuple(value)} only applies to CUDA but "
            f"devices={list(devices)} lacks 'cuda'; fix: add 'cuda' to devices or drop it"
        )
    return (value[0], value[1])
