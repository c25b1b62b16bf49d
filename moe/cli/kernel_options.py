"""What ``moe-a2a run`` does about kernel packages: shapes the kernels accept, emulations.

* :func:`fit_shape` fills the demo shape the user left to defaults (``--hidden-size``,
  ``--intermediate-size``, ``--dtype``) with values the backend's kernels accept
  (``kernel_requirements`` of its dispatcher class: DeepEP's low-latency kernels are compiled
  for a few hidden sizes, DeepEP combines bfloat16 only, ...) and rejects explicit values they
  do not accept, naming the flag, before any rank starts.
* :func:`emulation_plan` decides which packages ``--emulate-kernels`` replaces with
  ``moe_a2a.testing``'s emulations: every emulated package the backend requires on
  ``--device cpu`` (the kernels cannot run there), only the missing ones on ``--device cuda``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Type

from moe_a2a.errors import MoeA2AError

if TYPE_CHECKING:
    from moe_a2a.dispatchers import ResourceOwner
    from moe_a2a.run_plan import ModelShape
    from moe_a2a.server_args import ServerArgs

#: The flag that sets each field the kernel requirements speak about.
FLAGS = {"dtype": "--dtype", "hidden_size": "--hidden-size",
         "intermediate_size": "--intermediate-size", "top_k": "--top-k",
         "ep_size": "--tp-size", "num_experts": "--num-experts"}
GENERIC_DTYPE = "float32"


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--emulate-kernels", nargs="?", const="sm100", default=None, metavar="ARCH",
        choices=["sm90", "sm100"],
        help="run deep_ep / deep_gemm through moe_a2a.testing's emulations (all of them on "
             "--device cpu, the missing ones on --device cuda): same APIs, real token movement "
             "over gloo/nccl, no kernels. ARCH is the compute capability the emulation reports "
             "off GPU: sm100 (default; upstream DeepGEMM Mega-MoE, bf16) or sm90 (SGLang's "
             "DeepGEMM fork, FP8)")


def kernel_requirements(args: "ServerArgs") -> Any:
    """The backend's ``KernelRequirements`` for its resolved settings, or None."""
    try:
        cls: Type[ResourceOwner] = args.backend_spec.load_dispatcher_class()
    except Exception:  # availability reports it with the real reason
        return None
    return cls.kernel_requirements(args.backend_settings)


def fit_shape(ns: argparse.Namespace, args: "ServerArgs",
              shape: "ModelShape") -> Tuple["ModelShape", str, List[Dict[str, Any]]]:
    """``(shape, dtype, decisions)``: the defaults the kernels accept, explicit values checked.

    ``ns.hidden_size``, ``ns.intermediate_size`` and ``ns.dtype`` are None when not given.
    """
    reqs = kernel_requirements(args)
    decisions: List[Dict[str, Any]] = []
    dtype = ns.dtype
    if dtype is None:
        dtype = reqs.default_dtype(GENERIC_DTYPE) if reqs is not None else GENERIC_DTYPE
        if dtype != GENERIC_DTYPE:
            decisions.append(_decision("dtype", GENERIC_DTYPE, dtype, reqs, "--dtype"))
    if reqs is None or shape.hf_config is not None:
        if reqs is not None:
            _raise_problems(reqs.problems(dtype=_torch_dtype(dtype)), args)
        return shape, dtype, decisions
    changes: Dict[str, Any] = {}
    if ns.hidden_size is None:
        hidden = reqs.default_hidden_size(shape.hidden_size)
        if hidden != shape.hidden_size:
            changes["hidden_size"] = hidden
            decisions.append(_decision("hidden_size", shape.hidden_size, hidden, reqs,
                                       "--hidden-size"))
    if ns.intermediate_size is None:
        inter = reqs.default_intermediate_size(shape.intermediate_size)
        if inter != shape.intermediate_size:
            changes["intermediate_size"] = inter
            if ns.shared_intermediate_size is None:
                changes["shared_intermediate_size"] = inter
            decisions.append(_decision("intermediate_size", shape.intermediate_size, inter, reqs,
                                       "--intermediate-size"))
    shape = dataclasses.replace(shape, **changes)
    _raise_problems(reqs.problems(
        dtype=_torch_dtype(dtype), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, top_k=shape.top_k, ep_size=args.ep_size,
        num_experts=shape.num_experts), args)
    return shape, dtype, decisions


def _decision(field: str, old: Any, new: Any, reqs: Any, flag: str) -> Dict[str, Any]:
    return {"field": field, "from": old, "to": new,
            "reason": f"{reqs.kernels} need it (moe-a2a run's demo default; {flag} overrides)"}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _raise_problems(problems: List[Any], args: "ServerArgs") -> None:
    if problems:
        text = "; ".join(f"{FLAGS.get(p.field, p.field)} {p.value}: {p.message}" for p in problems)
        raise MoeA2AError(f"backend {args.moe_a2a_backend}: {text}; fix: pass values its kernels "
                          f"accept (or leave them to run's defaults), or choose another backend")


# ---- emulation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EmulationPlan:
    """Which packages ``--emulate-kernels`` replaces, and the emulated compute capability."""

    packages: Tuple[str, ...] = ()
    compute_capability: Tuple[int, int] = (10, 0)
    real: Tuple[str, ...] = ()      # required packages that stay real

    @property
    def active(self) -> bool:
        return bool(self.packages)


def emulation_plan(arch: Optional[str], args: "ServerArgs", device: str) -> EmulationPlan:
    if arch is None:
        return EmulationPlan()
    from moe_a2a.testing.kernel_emulation import EMULATED_PACKAGES, parse_arch

    capability = parse_arch(arch)
    required = [r.module for r in args.backend_spec.requires if r.module in EMULATED_PACKAGES]
    emulate, real = [], []
    for module in required:
        if device == "cpu" or not _importable(module):
            emulate.append(module)
        else:
            real.append(module)
    return EmulationPlan(tuple(emulate), capability, tuple(real))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False


@contextmanager
def emulated(plan: EmulationPlan) -> Iterator[None]:
    """``emulate_kernels`` for the plan's packages (nothing when there are none)."""
    if not plan.active:
        yield
        return
    from moe_a2a.testing.kernel_emulation import emulate_kernels

    with emulate_kernels(plan.packages, compute_capability=plan.compute_capability):
        yield


def kernels_summary(plan: EmulationPlan) -> Dict[str, str]:
    """``{package: "emulated" | "<version>"}`` for the run summary."""
    out = {m: "emulated" for m in plan.packages}
    for module in plan.real:
        try:
            from importlib.metadata import version

            out[module] = version(module)
        except Exception:
            out[module] = "installed (version unknown)"
    return out


__all__ = ["EmulationPlan", "FLAGS", "add_arguments", "emulated",
           "emulation_plan", "fit_shape", "kernel_requirements", "kernels_summary"]
