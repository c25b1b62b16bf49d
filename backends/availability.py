"""Can a backend run here? ``(ok, reason)`` with the real reason, never an exception.

Everything heavy (torch, ``deep_ep``, ``deep_gemm``, dispatcher modules) is imported inside
the check, never when :mod:`backends` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple, Union

from moe_a2a.backends.errors import BackendError, BackendUnavailableError
from moe_a2a.backends.names import MoeA2ABackend
from moe_a2a.backends.registry import REGISTRY
from moe_a2a.backends.spec import DEVICES, BackendSpec


@dataclass(frozen=True)
class BackendAvailability:
    """One row of :func:`available_backends`.

    Attributes:
        name: the backend name.
        spec: its spec, or ``None`` for an entry point that failed to load (then ``reason``
            is that entry point's error, naming the distribution and the entry point).
        ok: it can run on the device asked for.
        reason: empty when ``ok``; otherwise every unmet requirement, ``"; "``-separated.
        emulated: every package it requires is a moe-a2a emulation currently installed in
            ``sys.modules`` (``moe_a2a.testing.emulate_kernels``): it runs, but no kernel does.

    Unpacks as ``spec, ok, reason = row``.
    """

    name: str
    spec: Optional[BackendSpec]
    ok: bool
    reason: str
    emulated: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.spec, self.ok, self.reason))

    @property
    def builtin(self) -> bool:
        return bool(self.spec and self.spec.builtin)


def check_availability(
    spec: Union[BackendSpec, str, MoeA2ABackend, None], device: Optional[str] = None
) -> Tuple[bool, str]:
    """Whether ``spec`` can run on ``device`` here, and if not, why.

    Args:
        spec: a spec, or a name resolved with ``get_backend``.
        device: ``"cpu"``, ``"cuda"`` (a ``torch.device`` works too) or None for "this
            machine": CUDA when the backend supports it and a GPU is visible, else CPU.
    Returns:
        ``(True, "")``, or ``(False, reason)`` where the reason is the real import error text
        or the unmet requirement: the device the backend does not support, no CUDA visible
        (``torch.cuda.is_available()`` is False), the compute capability found vs needed, a
        missing or too old package, or the dispatcher module failing to import. Never raises.
    """
    try:
        if not isinstance(spec, BackendSpec):
            spec = REGISTRY.get(spec)
        return _check(spec, device)
    except BackendError as exc:
        return False, str(exc)
    except Exception as exc:  # the contract is "never raises": report instead
        return False, f"availability check failed: {type(exc).__name__}: {exc}"


def available_backends(device: Optional[str] = None) -> List[BackendAvailability]:
    """Every registered backend with its availability on ``device`` (see check_availability),
    in ``list_backends`` order, followed by one row per broken entry point (``spec=None``)."""
    rows = []
    for spec in REGISTRY.specs():
        ok, reason = check_availability(spec, device)
        rows.append(BackendAvailability(spec.name, spec, ok, reason, is_emulated(spec)))
    registered = {row.name for row in rows}
    for err in REGISTRY.entry_point_errors():
        if err.entry_point not in registered:
            rows.append(BackendAvailability(err.entry_point, None, False, str(err)))
    return rows


def ensure_available(
    name: Union[BackendSpec, str, MoeA2ABackend, None], device: Optional[str] = None
) -> BackendSpec:
    """The spec of ``name`` if it can run on ``device``; else :class:`BackendUnavailableError`
    naming the reason and the install hint (for code that must fail closed)."""
    spec = name if isinstance(name, BackendSpec) else REGISTRY.get(name)
    ok, reason = check_availability(spec, device)
    if not ok:
        raise BackendUnavailableError(unavailable_message(spec.name, device, reason))
    return spec


def unavailable_message(name: str, device: Any, reason: str) -> str:
    """The one wording of "this backend cannot run here" (the CLI and the layer use it)."""
    where = f" on {_device_text(device)}" if device is not None else " here"
    return f"--moe-a2a-backend {name} cannot run{where}: {reason}"


def _device_text(device: Any) -> str:
    return str(getattr(device, "type", device))


def is_emulated(spec: Optional[BackendSpec]) -> bool:
    """Every package ``spec`` requires is a moe-a2a emulation now in ``sys.modules``."""
    if spec is None or not spec.requires:
        return False
    from moe_a2a.dispatchers.kernels import is_emulated as module_emulated

    return all(module_emulated(r.module) for r in spec.requires)


def _check(spec: BackendSpec, device: Any) -> Tuple[bool, str]:
    reasons: List[str] = []
    # under moe_a2a.testing.emulate_kernels the required packages are stand-ins that compute
    # on any device: the device, CUDA and compute-capability requirements are waived
    emulated = is_emulated(spec)
    if device is not None:
        device = _device_text(device).split(":")[0].strip().lower()
        if device not in DEVICES:
            return False, (f"unknown device {device!r}: expected one of {', '.join(DEVICES)} "
                           f"(or None for this machine)")
        if device not in spec.devices and not emulated:
            reasons.append(f"backend {spec.name!r} runs on {', '.join(spec.devices)} only; "
                           f"device {device!r} is not supported")
    cuda_ok, cuda_reason = _cuda_visible() if "cuda" in spec.devices else (False, "")
    if device is None:
        device = "cuda" if ("cuda" in spec.devices and cuda_ok) or "cpu" not in spec.devices else "cpu"
        if emulated and not cuda_ok:
            device = "cpu"
    if device == "cuda" and not reasons and not emulated:
        if not cuda_ok:
            reasons.append(cuda_reason)
        elif spec.min_compute_capability is not None:
            reasons.extend(_check_capability(spec.min_compute_capability))
    missing = False
    for requirement in spec.requires:
        ok, reason = requirement.check()
        if not ok:
            reasons.append(reason)
            missing = True
    dispatcher_reason, not_built = _check_dispatcher(spec, device)
    if dispatcher_reason:
        reasons.append(dispatcher_reason)
        missing = missing or not not_built
    if missing and spec.install_hint:
        reasons.append(f"install: {spec.install_hint}")
    return (not reasons), "; ".join(reasons)


def _cuda_visible() -> Tuple[bool, str]:
    try:
        import torch
    except Exception as exc:
        return False, f"import torch failed: {type(exc).__name__}: {exc}"
    try:
        if torch.cuda.is_available():
            return True, ""
    except Exception as exc:  # a broken driver can raise instead of returning False
        return False, f"torch.cuda.is_available() raised {type(exc).__name__}: {exc}"
    build = torch.version.cuda
    why = f"built with CUDA {build}" if build else "a CPU-only build"
    return False, f"no CUDA device visible: torch.cuda.is_available() is False (torch {torch.__version__}, {why})"


def _check_capability(needed: Tuple[int, int]) -> List[str]:
    import torch

    try:
        index = torch.cuda.current_device()
        found = tuple(torch.cuda.get_device_capability(index))
        gpu = torch.cuda.get_device_name(index)
    except Exception as exc:
        return [f"cannot read the CUDA compute capability: {type(exc).__name__}: {exc}"]
    if found < tuple(needed):
        return [f"compute capability {found[0]}.{found[1]} found on cuda:{index} ({gpu}); "
                f"{needed[0]}.{needed[1]} or newer needed"]
    return []


def _check_dispatcher(spec: BackendSpec, device: str) -> Tuple[str, bool]:
    """``(reason, runnable_check_failed)``: the class cannot be loaded, or says it cannot run."""
    try:
        cls = spec.load_dispatcher_class()
    except ImportError as exc:
        cause = exc.__cause__ or exc
        return (f"dispatcher {spec.dispatcher_path} cannot be imported: "
                f"{type(cause).__name__}: {cause}"), False
    except Exception as exc:  # not a BaseDispatcher subclass, or anything odd
        return str(exc), False
    ok, reason = cls.check_runnable(device)
    return ("" if ok else reason), not ok
