"""Fused backends: dispatch, expert GEMMs and combine in one kernel (DeepGEMM Mega-MoE).

A :class:`FusedMoE` replaces dispatcher + experts + combine for the steps it can run. Its
backend spec names a fallback backend and a capacity rule (``CapacityRule`` with
``over_capacity="fallback"``); the layer decides per step from the agreed ``BatchInfo`` —
identically on every rank, so collectives stay matched — whether the step takes the fused
path or the fallback (a standard dispatcher with the ordinary experts).
"""

from __future__ import annotations

import abc
from typing import ClassVar, Protocol

import torch

from moe_a2a.dispatchers.base import DispatcherSetup, ResourceOwner
from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK


class LocalExpertWeightsLike(Protocol):
    """This rank's routed experts (duck-typed; ``moe_a2a.weights.LocalExpertWeights`` fits).

    ``w_gate [E_local, I, H]``, ``w_up [E_local, I, H]``, ``w_down [E_local, H, I]``; SwiGLU
    ``down(silu(gate(x)) * up(x))``.
    """

    # read-only members: a frozen dataclass (LocalExpertWeights) fits them
    @property
    def w_gate(self) -> torch.Tensor: ...
    @property
    def w_up(self) -> torch.Tensor: ...
    @property
    def w_down(self) -> torch.Tensor: ...


class FusedMoE(ResourceOwner, abc.ABC):
    """One layer's fused routed-experts computation over the EP group.

    Class attributes:
        token_layout: the layout of the fused path's input: ``"scattered"`` (each rank passes
            its own tokens; the kernel moves them) or ``"replicated"``.
        communicator_class: owns the kernel's buffers (e.g. the symmetric buffer, cached per
            group and shape).
    """

    token_layout: ClassVar[str] = "scattered"

    def __init__(self, setup: DispatcherSetup) -> None:
        self._attach(setup)

    @abc.abstractmethod
    def prepare_weights(self, weights: LocalExpertWeightsLike) -> None:
        """Transform this rank's expert weights into the kernel's layout, once, at build time.

        Args:
            weights: the local experts; the fallback path keeps using them, so a backend that
                can share their storage (its settings say so, e.g. Mega-MoE's ``fix_memory``)
                must leave them valid for the fallback.
        """

    @abc.abstractmethod
    def forward(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                batch: BatchInfo) -> torch.Tensor:
        """The routed experts' weighted sum for this rank's tokens.

        Args:
            hidden_states: ``[T, H]`` this rank's tokens (in ``token_layout``); ``T`` may be 0.
            topk: ``ids [T, K]`` global physical ids (``-1`` = none), ``weights [T, K]`` float32.
            batch: the step's agreed facts (the layer only calls this when the capacity holds).
        Returns:
            ``[T, H]`` in ``hidden_states``' dtype (shared experts are not included).
        """


__all__ = ["FusedMoE", "LocalExpertWeightsLike"]
