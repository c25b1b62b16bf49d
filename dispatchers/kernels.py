"""Optional kernel packages (``deep_ep``, ``deep_gemm``): lazy import, emulation marker, device.

Backends that run kernels import them through :func:`import_kernel_package` inside their
constructors, never at module import, and keep the real import error. The CPU emulations in
``moe_a2a.testing`` install stand-in modules under the real names; a stand-in carries
:data:`EMULATION_ATTRIBUTE` (an object with ``compute_capability``), which is the only thing
that tells it apart from the real package. Code paths are otherwise identical.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Optional, Tuple

import torch

from moe_a2a.dispatchers.errors import DispatcherError

#: Attribute a stand-in module installed by ``moe_a2a.testing.emulate_kernels`` carries.
EMULATION_ATTRIBUTE = "__moe_a2a_emulation__"


def emulation_info(module: Any) -> Optional[Any]:
    """The emulation record of a stand-in module, or None for a real package."""
    return getattr(module, EMULATION_ATTRIBUTE, None)


def is_emulated(module_name: str) -> bool:
    """``module_name`` is currently a moe-a2a emulation in ``sys.modules`` (no import done)."""
    module = sys.modules.get(module_name)
    return module is not None and emulation_info(module) is not None


def import_kernel_package(name: str, who: str, install_hint: str) -> ModuleType:
    """Import ``name`` or raise ``DispatcherError`` with the real import error and the hint."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken CUDA build raising something else
        raise DispatcherError(
            f"{who} needs the {name} package: import {name} failed: {type(exc).__name__}: "
            f"{exc}; install: {install_hint}") from exc


def kernel_capability(device: torch.device, module: Any) -> Optional[Tuple[int, int]]:
    """The compute capability the kernels of ``module`` run on for ``device``.

    CUDA devices report their own. Off CUDA only an emulation can run, and it reports the
    capability it was asked to emulate; a real package off CUDA gives None.
    """
    if torch.device(device).type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]
    info = emulation_info(module)
    return None if info is None else tuple(info.compute_capability)  # type: ignore[return-value]


__all__ = ["EMULATION_ATTRIBUTE", "emulation_info", "import_kernel_package", "is_emulated",
           "kernel_capability"]
