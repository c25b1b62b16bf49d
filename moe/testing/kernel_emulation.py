"""``emulate_kernels()``: importable stand-ins for ``deep_ep`` and ``deep_gemm`` on any machine.

::

    from moe_a2a.testing import emulate_kernels

    with emulate_kernels():                 # both packages; SM100 off-GPU
        import deep_ep, deep_gemm           # the stand-ins, under the real names
        ...                                 # code written against the real APIs runs on CPU

Inside the block ``sys.modules`` maps ``deep_ep`` (with ``deep_ep.buffer``, ``deep_ep.utils``)
and ``deep_gemm`` (with ``deep_gemm.mega``) to modules built from
``moe_a2a.testing.deep_ep_emulation`` and ``moe_a2a.testing.deep_gemm_emulation``; leaving it
restores whatever was there before (a real package, or nothing). Each stand-in carries
``__moe_a2a_emulation__`` (:class:`EmulationInfo`), which is how availability checks and the
run summary tell it from the real package; moe-a2a's backends otherwise run the same code.

The stand-ins compute over torch.distributed, so a multi-rank test enters ``emulate_kernels``
in every rank. ``sys.modules`` is process-global: do not enter it from two threads at once.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from moe_a2a.dispatchers.kernels import EMULATION_ATTRIBUTE

#: The packages that have an emulation, and what each emulates.
EMULATED_PACKAGES: Dict[str, str] = {
    "deep_ep": "DeepEP v1.2.1 (deep_ep.Buffer: normal and low-latency all-to-all)",
    "deep_gemm": "DeepGEMM Mega-MoE (upstream SM100 bf16 API and SGLang's SM90 FP8 API)",
}

ARCHES: Dict[str, Tuple[int, int]] = {"sm90": (9, 0), "sm100": (10, 0)}


@dataclass(frozen=True)
class EmulationInfo:
    """What a stand-in module emulates.

    Attributes:
        package: ``"deep_ep"`` or ``"deep_gemm"``.
        emulates: the real API it follows.
        compute_capability: what kernels report off CUDA (``(10, 0)``: SM100, ``(9, 0)``: SM90).
    """

    package: str
    emulates: str
    compute_capability: Tuple[int, int]


def _set(module: types.ModuleType, **attrs: Any) -> None:
    # setattr: mypy does not allow new attributes on a ModuleType
    for name, value in attrs.items():
        setattr(module, name, value)


def _deep_ep_modules(info: EmulationInfo) -> Dict[str, types.ModuleType]:
    from moe_a2a.testing import deep_ep_emulation as emu

    top = types.ModuleType("deep_ep", "moe_a2a emulation of DeepEP v1.2.1 (see "
                                      "moe_a2a.testing.deep_ep_emulation)")
    buffer = types.ModuleType("deep_ep.buffer")
    utils = types.ModuleType("deep_ep.utils")
    for module in (top, buffer, utils):
        setattr(module, EMULATION_ATTRIBUTE, info)
    _set(top, Buffer=emu.Buffer, EventOverlap=emu.EventOverlap, Config=emu.Config,
         buffer=buffer, utils=utils, __version__="1.2.1+moe_a2a.emulation")
    top.__path__ = []  # a package, so ``import deep_ep.buffer`` resolves from sys.modules
    _set(buffer, Buffer=emu.Buffer, Config=emu.Config, EventHandle=emu.EventHandle,
         EventOverlap=emu.EventOverlap)
    _set(utils, EventOverlap=emu.EventOverlap, EventHandle=emu.EventHandle, Config=emu.Config,
         check_nvlink_connections=emu.check_nvlink_connections)
    return {"deep_ep": top, "deep_ep.buffer": buffer, "deep_ep.utils": utils}


def _deep_gemm_modules(info: EmulationInfo) -> Dict[str, types.ModuleType]:
    from moe_a2a.testing import deep_gemm_emulation as emu

    top = types.ModuleType("deep_gemm", "moe_a2a emulation of DeepGEMM Mega-MoE (see "
                                        "moe_a2a.testing.deep_gemm_emulation)")
    mega = types.ModuleType("deep_gemm.mega")
    for module in (top, mega):
        setattr(module, EMULATION_ATTRIBUTE, info)
        for name in emu.__all__:
            setattr(module, name, getattr(emu, name))
    _set(top, mega=mega, __version__="2.1.1+moe_a2a.emulation")
    top.__path__ = []
    return {"deep_gemm": top, "deep_gemm.mega": mega}


_BUILDERS = {"deep_ep": _deep_ep_modules, "deep_gemm": _deep_gemm_modules}


@contextmanager
def emulate_kernels(packages: Iterable[str] = ("deep_ep", "deep_gemm"), *,
                    compute_capability: Tuple[int, int] = (10, 0)) -> Iterator[List[EmulationInfo]]:
    """Put stand-ins for ``packages`` in ``sys.modules`` for the duration of the block.

    Args:
        packages: names from :data:`EMULATED_PACKAGES` (a real installed package of the same
            name is hidden inside the block and restored afterwards).
        compute_capability: what the emulated kernels report when tensors are not on a GPU:
            ``(10, 0)`` selects upstream DeepGEMM's SM100 Mega-MoE, ``(9, 0)`` the SM90 FP8
            variant of SGLang's fork. On a GPU the device's own capability counts.
    Yields:
        the ``EmulationInfo`` of each installed stand-in.
    """
    names = list(dict.fromkeys(packages))
    unknown = [n for n in names if n not in EMULATED_PACKAGES]
    if unknown:
        raise ValueError(f"emulate_kernels: no emulation for {unknown}; emulated packages: "
                         f"{', '.join(EMULATED_PACKAGES)}")
    cc = tuple(int(v) for v in compute_capability)
    if len(cc) != 2:
        raise ValueError(f"emulate_kernels: compute_capability={compute_capability!r} must be "
                         f"(major, minor), e.g. (10, 0)")
    installed: Dict[str, types.ModuleType] = {}
    infos = []
    for name in names:
        info = EmulationInfo(package=name, emulates=EMULATED_PACKAGES[name],
                             compute_capability=cc)  # type: ignore[arg-type]
        infos.append(info)
        installed.update(_BUILDERS[name](info))
    saved: Dict[str, Optional[types.ModuleType]] = {}
    for name in names:  # hide the real package and every submodule of it
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            saved[key] = sys.modules.pop(key)
    for key in installed:
        saved.setdefault(key, None)
    from moe_a2a.testing import deep_gemm_emulation

    sys.modules.update(installed)
    if "deep_gemm" in installed:
        deep_gemm_emulation._SELF.insert(0, installed["deep_gemm"])
    try:
        yield infos
    finally:
        if "deep_gemm" in installed:
            deep_gemm_emulation._SELF.remove(installed["deep_gemm"])
        for key in installed:
            if sys.modules.get(key) is installed[key]:
                del sys.modules[key]
        for key, module in saved.items():
            if module is not None:
                sys.modules[key] = module


def parse_arch(text: str) -> Tuple[int, int]:
    """``"sm90"`` / ``"sm100"`` -> compute capability (the ``--emulate-kernels`` value)."""
    try:
        return ARCHES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"--emulate-kernels {text!r}: expected one of {', '.join(ARCHES)}") from None


__all__ = ["ARCHES", "EMULATED_PACKAGES", "EmulationInfo", "emulate_kernels", "parse_arch"]
