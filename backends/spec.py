"""Backend specs: what a backend is, as data that models and the resolver query.

Nothing outside this package compares backend *names* to decide behaviour; it asks the
spec (``token_layout``, ``ep_policy``, ``fused_experts``, ``modes`` ...).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Tuple, Union

TokenLayout = Literal["replicated", "scattered"]
EpPolicy = Literal["user", "tp"]
Device = Literal["cpu", "cuda"]

TOKEN_LAYOUTS: Tuple[str, ...] = ("replicated", "scattered")
EP_POLICIES: Tuple[str, ...] = ("user", "tp")
DEVICES: Tuple[str, ...] = ("cpu", "cuda")


def normalize_name(name: str) -> str:
    """Backend names are case-insensitive and treat ``-`` as ``_``."""
    return str(name).strip().lower().replace("-", "_")


@dataclass(frozen=True)
class Requirement:
    """An importable package a backend needs.

    ``distribution`` is the pip name (for versions and hints), ``module`` the import name.
    """

    module: str
    distribution: Optional[str] = None
    min_version: Optional[str] = None

    def check(self) -> Tuple[bool, str]:
        """``(ok, reason)``; the reason carries the real import error text."""
        try:
            importlib.import_module(self.module)
        except Exception as exc:  # ImportError, or a broken CUDA build raising OSError/RuntimeError
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


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass(frozen=True)
class BackendSpec:
    """One all-to-all backend, fully classified.

    Attributes:
        name: normalised registry name.
        dispatcher: the dispatcher class, or a dotted path ``"pkg.mod:Class"`` imported lazily.
        token_layout: ``"replicated"`` (every attention-TP rank holds the same tokens) or
            ``"scattered"`` (each attention-TP rank holds a disjoint slice).
        ep_policy: ``"user"`` (ep_size as given) or ``"tp"`` (ep_size derived as tp_size).
        fused_experts: the backend computes the experts itself.
        modes: modes the backend accepts (``("default",)`` when it has none).
        cuda_graph_modes: the subset of ``modes`` whose kernels can be captured in a CUDA graph.
        devices: where it runs.
        requires: packages it imports at dispatcher construction time.
        min_compute_capability: ``(major, minor)`` needed on CUDA, or None.
        install_hint: what to run when a requirement is missing.
        builtin: shipped with moe-a2a (set by the registry, not by users).
        description: one line for tables.
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
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def dispatcher_path(self) -> str:
        if isinstance(self.dispatcher, str):
            return self.dispatcher
        return f"{self.dispatcher.__module__}:{self.dispatcher.__qualname__}"

    def supports_cuda_graph(self, mode: str = "default") -> bool:
        return mode in self.cuda_graph_modes

    def load_dispatcher_class(self) -> type:
        """Import and return the dispatcher class (raises ImportError with the install hint)."""
        if not isinstance(self.dispatcher, str):
            return self.dispatcher
        module_name, _, attr = self.dispatcher.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            hint = f" ({self.install_hint})" if self.install_hint else ""
            raise ImportError(
                f"backend {self.name!r}: cannot load dispatcher {self.dispatcher!r}: {exc}{hint}"
            ) from exc
