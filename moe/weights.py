"""MoE weights: global (unsharded) tensors, and the slice one EP / moe-TP rank holds.

Layouts follow ``torch.nn.functional.linear`` (``[out, in]``):

* router ``gate [E, H]`` (float32) and optional ``correction_bias [E]`` (float32),
* routed experts ``w_gate [E, I, H]``, ``w_up [E, I, H]``, ``w_down [E, H, I]``,
* optional shared expert ``w_gate [Is, H]``, ``w_up [Is, H]``, ``w_down [H, Is]`` (several
  shared experts fused into one have ``Is = n_shared * I``, as DeepSeek-V3 stores them).

Expert ``e`` computes ``w_down[e] @ (silu(w_gate[e] @ x) * (w_up[e] @ x))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_a2a.dispatchers.base import ExpertPlacement
from moe_a2a.errors import MoeA2AError

# Sub-seed offsets so every tensor has its own stream and values do not depend on which
# optional tensors were requested, nor on which rank generates them.
_SEED_STRIDE = 1_000_003
_GATE, _BIAS, _SHARED, _EXPERT0 = 0, 1, 2, 16


def _generator(seed: int, slot: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed((seed * _SEED_STRIDE + slot) % (2**63 - 1))


def _randn(shape, scale: float, seed: int, slot: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed, slot), dtype=torch.float32) * scale


def _check_split(intermediate: int, moe_tp_size: int, moe_tp_rank: int, what: str) -> int:
    if moe_tp_size < 1 or not 0 <= moe_tp_rank < moe_tp_size:
        raise MoeA2AError(
            f"moe_tp_rank={moe_tp_rank} is outside [0, moe_tp_size={moe_tp_size}) for {what}"
        )
    if intermediate % moe_tp_size:
        raise MoeA2AError(
            f"{what} intermediate size {intermediate} is not divisible by moe_tp_size={moe_tp_size}: "
            f"choose an intermediate size divisible by {moe_tp_size} (or change tp/ep so that "
            f"moe_tp = tp / ep divides it)"
        )
    return intermediate // moe_tp_size


@dataclass(frozen=True)
class SharedExpertWeights:
    """One (possibly fused) shared expert applied to every token.

    Attributes:
        w_gate: ``[Is, H]``.
        w_up: ``[Is, H]``.
        w_down: ``[H, Is]``.
    """

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor

    def __post_init__(self) -> None:
        if self.w_gate.dim() != 2 or self.w_up.shape != self.w_gate.shape:
            raise MoeA2AError(
                f"shared expert w_gate {tuple(self.w_gate.shape)} and w_up {tuple(self.w_up.shape)} "
                f"must both be [Is, H]"
            )
        i_s, h = self.w_gate.shape
        if tuple(self.w_down.shape) != (h, i_s):
            raise MoeA2AError(
                f"shared expert w_down has shape {tuple(self.w_down.shape)}; expected [H, Is] = [{h}, {i_s}]"
            )

    @property
    def hidden_size(self) -> int:
        return int(self.w_gate.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.w_gate.shape[0])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SharedExpertWeights":
        return SharedExpertWeights(*(w.to(device=device, dtype=dtype) for w in (self.w_gate, self.w_up, self.w_down)))

    def shard(self, moe_tp_rank: int, moe_tp_size: int) -> "SharedExpertWeights":
        """Slice ``Is`` into ``moe_tp_size`` contiguous parts (outputs are then partial sums)."""
        part = _check_split(self.intermediate_size, moe_tp_size, moe_tp_rank, "shared expert")
        sl = slice(moe_tp_rank * part, (moe_tp_rank + 1) * part)
        return SharedExpertWeights(self.w_gate[sl].contiguous(), self.w_up[sl].contiguous(),
                                   self.w_down[:, sl].contiguous())


class _ExpertStack:
    """Sizes read off ``w_gate [E, I, H]``, shared by the global and the local expert stacks."""

    w_gate: torch.Tensor

    @property
    def hidden_size(self) -> int:
        return int(self.w_gate.shape[2])

    @property
    def intermediate_size(self) -> int:
        """``I`` (``I_local``, this rank's slice, for local weights)."""
        return int(self.w_gate.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The experts' dtype."""
        return self.w_gate.dtype


@dataclass(frozen=True)
class LocalExpertWeights(_ExpertStack):
    """The routed experts one rank computes: its ``E_local`` experts, its slice of ``I``.

    Attributes:
        placement: which experts (``placement.first_local_expert`` + local id).
        moe_tp_rank: this rank's slice of the intermediate dimension.
        moe_tp_size: number of slices (outputs are partial sums when > 1).
        w_gate: ``[E_local, I_local, H]``, ``I_local = I // moe_tp_size``.
        w_up: ``[E_local, I_local, H]``.
        w_down: ``[E_local, H, I_local]``.
    """

    placement: ExpertPlacement
    moe_tp_rank: int
    moe_tp_size: int
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor

    def __post_init__(self) -> None:
        _check_expert_shapes(self.w_gate, self.w_up, self.w_down, "local experts")
        if self.w_gate.shape[0] != self.placement.num_local_experts:
            raise MoeA2AError(
                f"local expert weights hold {self.w_gate.shape[0]} experts but the placement gives "
                f"this rank {self.placement.num_local_experts}"
            )

    @property
    def num_local_experts(self) -> int:
        return int(self.w_gate.shape[0])

    @property
    def device(self) -> torch.device:
        return self.w_gate.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LocalExpertWeights":
        return LocalExpertWeights(self.placement, self.moe_tp_rank, self.moe_tp_size,
                                  *(w.to(device=device, dtype=dtype) for w in (self.w_gate, self.w_up, self.w_down)))


def _check_expert_shapes(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, what: str) -> None:
    if w_gate.dim() != 3 or w_up.shape != w_gate.shape:
        raise MoeA2AError(
            f"{what}: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must both be [E, I, H]"
        )
    e, i, h = w_gate.shape
    if tuple(w_down.shape) != (e, h, i):
        raise MoeA2AError(f"{what}: w_down has shape {tuple(w_down.shape)}; expected [E, H, I] = [{e}, {h}, {i}]")


@dataclass(frozen=True)
class MoEWeights(_ExpertStack):
    """Global weights of one MoE layer (every rank may hold the same copy).

    The expert stacks hold one entry per *physical slot*: the logical experts themselves
    (``physical_to_logical`` None), or EPLB's physical layout (``physical(...)``: replicas of
    hot experts, fused shared-expert slots) while the router stays logical.

    Attributes:
        gate: ``[E, H]`` router weight over the ``E`` logical experts (float32 by convention;
            routing math is float32).
        correction_bias: ``[E]`` float32 score-correction bias, or ``None``.
        w_gate: ``[P, I, H]`` expert gate projections (``P = E`` unless physical).
        w_up: ``[P, I, H]`` expert up projections.
        w_down: ``[P, H, I]`` expert down projections.
        shared: the shared expert, or ``None``.
        physical_to_logical: ``[P]`` int64 logical expert of each slot (``-1``: a fused
            shared-expert slot), or ``None`` when slot ``e`` is logical expert ``e``.
    """

    gate: torch.Tensor
    correction_bias: Optional[torch.Tensor]
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    shared: Optional[SharedExpertWeights] = None
    physical_to_logical: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        _check_expert_shapes(self.w_gate, self.w_up, self.w_down, "MoEWeights")
        p, _, h = self.w_gate.shape
        e = p if self.physical_to_logical is None else int(self.gate.shape[0])
        if tuple(self.gate.shape) != (e, h):
            raise MoeA2AError(f"router gate has shape {tuple(self.gate.shape)}; expected [E, H] = [{e}, {h}]")
        p2l = self.physical_to_logical
        if p2l is not None and (tuple(p2l.shape) != (p,) or bool(((p2l < -1) | (p2l >= e)).any())):
            raise MoeA2AError(f"physical_to_logical has shape {tuple(p2l.shape)} / values outside "
                              f"[-1, {e}); expected [{p}] logical ids (-1 = fused shared slot)")
        if self.correction_bias is not None and tuple(self.correction_bias.shape) != (e,):
            raise MoeA2AError(
                f"correction_bias has shape {tuple(self.correction_bias.shape)}; expected [E] = [{e}]"
            )
        if self.shared is not None and self.shared.hidden_size != h:
            raise MoeA2AError(
                f"shared expert hidden size {self.shared.hidden_size} differs from the experts' {h}"
            )

    @property
    def num_experts(self) -> int:
        """Expert slots (``P``; the logical experts unless the weights are physical)."""
        return int(self.w_gate.shape[0])

    @property
    def num_logical_experts(self) -> int:
        """``E``, the experts the router chooses from."""
        return int(self.gate.shape[0])

    def physical(self, physical_to_logical: torch.Tensor) -> "MoEWeights":
        """The weights of ``P`` physical slots: slot ``p`` holds a copy of logical expert
        ``physical_to_logical[p]`` (``[P]`` int64, e.g. one layer of an EPLB
        ``ExpertLocation.physical_to_logical``); router and shared expert unchanged."""
        if self.physical_to_logical is not None:
            raise MoeA2AError("MoEWeights.physical: these weights are already physical; start "
                              "from the logical weights")
        index = torch.as_tensor(physical_to_logical, dtype=torch.int64).cpu()
        if index.dim() != 1 or bool(((index < 0) | (index >= self.num_experts)).any()):
            raise MoeA2AError(f"MoEWeights.physical: physical_to_logical must be [P] ids in "
                              f"[0, {self.num_experts}), got shape {tuple(index.shape)}")
        slots = index.to(self.w_gate.device)
        return MoEWeights(gate=self.gate, correction_bias=self.correction_bias,
                          w_gate=self.w_gate.index_select(0, slots),
                          w_up=self.w_up.index_select(0, slots),
                          w_down=self.w_down.index_select(0, slots),
                          shared=self.shared, physical_to_logical=index)

    @classmethod
    def random(cls, num_experts: int, hidden: int, intermediate: int, shared_intermediate: int = 0, *,
               seed: int = 0, dtype: torch.dtype = torch.float32,
               with_correction_bias: bool = False) -> "MoEWeights":
        """Seeded random weights, identical on every rank and device (generated on CPU in
        float32, then cast to ``dtype``; the router gate and bias stay float32).

        Scales keep activations O(1): projections ``N(0, 1/fan_in)``, gate ``N(0, 1/H)``,
        bias ``N(0, 0.1^2)``. Each expert has its own seed stream, so
        ``random_local(...)`` equals ``random(...).shard(...)`` without building all experts.
        ``shared_intermediate == 0`` means no shared expert.
        """
        _check_sizes(num_experts, hidden, intermediate, shared_intermediate)
        experts = [_random_expert(seed, e, hidden, intermediate) for e in range(num_experts)]
        return cls(
            gate=_random_gate(seed, num_experts, hidden),
            correction_bias=_random_bias(seed, num_experts) if with_correction_bias else None,
            w_gate=torch.stack([x[0] for x in experts]).to(dtype),
            w_up=torch.stack([x[1] for x in experts]).to(dtype),
            w_down=torch.stack([x[2] for x in experts]).to(dtype),
            shared=_random_shared(seed, hidden, shared_intermediate, dtype),
        )

    @staticmethod
    def random_local(placement: ExpertPlacement, moe_tp_rank: int, moe_tp_size: int,
                     hidden: int, intermediate: int, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> LocalExpertWeights:
        """``random(placement.num_experts, hidden, intermediate, seed=seed, dtype=dtype)
        .shard(placement, moe_tp_rank, moe_tp_size)``, generating only this rank's experts."""
        _check_sizes(placement.num_experts, hidden, intermediate, 0)
        part = _check_split(intermediate, moe_tp_size, moe_tp_rank, "routed expert")
        sl = slice(moe_tp_rank * part, (moe_tp_rank + 1) * part)
        first = placement.first_local_expert
        experts = [_random_expert(seed, first + e, hidden, intermediate) for e in range(placement.num_local_experts)]
        return LocalExpertWeights(
            placement, moe_tp_rank, moe_tp_size,
            w_gate=torch.stack([x[0][sl] for x in experts]).to(dtype).contiguous(),
            w_up=torch.stack([x[1][sl] for x in experts]).to(dtype).contiguous(),
            w_down=torch.stack([x[2][:, sl] for x in experts]).to(dtype).contiguous(),
        )

    def shard(self, placement: ExpertPlacement, moe_tp_rank: int = 0, moe_tp_size: int = 1) -> LocalExpertWeights:
        """The experts of ``placement.ep_rank`` (contiguous: ``first_local_expert`` onwards), their
        intermediate dimension cut into ``moe_tp_size`` contiguous slices, slice ``moe_tp_rank`` kept."""
        if placement.num_experts != self.num_experts:
            raise MoeA2AError(
                f"the placement is for num_experts={placement.num_experts} but the weights hold "
                f"{self.num_experts} experts: build the placement from the weights' expert count"
            )
        part = _check_split(self.intermediate_size, moe_tp_size, moe_tp_rank, "routed expert")
        sl = slice(moe_tp_rank * part, (moe_tp_rank + 1) * part)
        es = slice(placement.first_local_expert, placement.first_local_expert + placement.num_local_experts)
        return LocalExpertWeights(
            placement, moe_tp_rank, moe_tp_size,
            w_gate=self.w_gate[es, sl].contiguous(),
            w_up=self.w_up[es, sl].contiguous(),
            w_down=self.w_down[es, :, sl].contiguous(),
        )

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MoEWeights":
        """Experts and shared expert to ``device``/``dtype``; router gate and bias to ``device``
        only (they stay float32)."""
        return MoEWeights(
            gate=self.gate.to(device=device),
            correction_bias=None if self.correction_bias is None else self.correction_bias.to(device=device),
            w_gate=self.w_gate.to(device=device, dtype=dtype),
            w_up=self.w_up.to(device=device, dtype=dtype),
            w_down=self.w_down.to(device=device, dtype=dtype),
            shared=None if self.shared is None else self.shared.to(device, dtype),
            physical_to_logical=self.physical_to_logical,
        )


def _check_sizes(num_experts: int, hidden: int, intermediate: int, shared_intermediate: int) -> None:
    for name, value, low in (("num_experts", num_experts, 1), ("hidden", hidden, 1),
                             ("intermediate", intermediate, 1), ("shared_intermediate", shared_intermediate, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MoeA2AError(f"{name}={value!r} must be an integer >= {low}")


def _random_gate(seed: int, num_experts: int, hidden: int) -> torch.Tensor:
    return _randn((num_experts, hidden), hidden ** -0.5, seed, _GATE)


def _random_bias(seed: int, num_experts: int) -> torch.Tensor:
    return _randn((num_experts,), 0.1, seed, _BIAS)


def _random_expert(seed: int, expert: int, hidden: int, intermediate: int):
    gen = _generator(seed, _EXPERT0 + expert)
    w_gate = torch.randn(intermediate, hidden, generator=gen) * hidden ** -0.5
    w_up = torch.randn(intermediate, hidden, generator=gen) * hidden ** -0.5
    w_down = torch.randn(hidden, intermediate, generator=gen) * intermediate ** -0.5
    return w_gate, w_up, w_down


def _random_shared(seed: int, hidden: int, shared_intermediate: int, dtype: torch.dtype):
    if shared_intermediate == 0:
        return None
    gen = _generator(seed, _SHARED)
    w_gate = torch.randn(shared_intermediate, hidden, generator=gen) * hidden ** -0.5
    w_up = torch.randn(shared_intermediate, hidden, generator=gen) * hidden ** -0.5
    w_down = torch.randn(hidden, shared_intermediate, generator=gen) * shared_intermediate ** -0.5
    return SharedExpertWeights(w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype))


__all__ = ["LocalExpertWeights", "MoEWeights", "SharedExpertWeights"]
