"""Where every logical expert lives: the physical slots of each layer and their GPUs.

With ``redundant`` extra slots a layer has ``P = E + redundant`` physical experts; slot ``p``
lives on EP rank ``p // (P / ep_size)`` (contiguous, as the dispatchers place experts), and
holds a copy of logical expert ``physical_to_logical[layer, p]``. A hot logical expert can
have several replicas; every logical expert has at least one.

Initialisations (``--init-expert-location``):

* ``trivial``: slot ``p`` holds logical ``p % E`` (the first ``redundant`` experts get a
  second replica in the last slots);
* a mapping: ``{"physical_to_logical_map": [[...P ids...] per layer]}`` (one row is used for
  every layer);
* counts: ``{"logical_count": [[...E counts...] per layer]}`` (or ``[steps][layers][E]``,
  summed over steps), placed by the rebalance algorithm.

given as JSON text, a ``.json`` file or a ``.pt`` file holding such a dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from moe_a2a.eplb.rebalance import choose_algorithm, rebalance
from moe_a2a.errors import MoeA2AError


def physical_count_error(num_experts: int, redundant: int, ep_size: int, *,
                         experts_flag: str = "num_experts",
                         redundant_flag: str = "ep_num_redundant_experts") -> Optional[str]:
    """The message when ``num_experts + redundant`` cannot be split over ``ep_size``, else None.

    Names the nearest valid redundant counts below and above ``redundant``.
    """
    physical = num_experts + redundant
    if ep_size >= 1 and physical % ep_size == 0:
        return None
    over = physical % ep_size
    options = [n for n in (redundant - over, redundant + ep_size - over) if n >= 0]
    return (f"{experts_flag} {num_experts} + {redundant_flag} {redundant} = {physical} physical "
            f"experts cannot be split over ep {ep_size}: the physical expert count must be a "
            f"multiple of {ep_size}; fix: use {redundant_flag} "
            + " or ".join(str(n) for n in options))


@dataclass(frozen=True, kw_only=True)
class ExpertLocation:
    """The placement of every layer's logical experts on physical slots (on the CPU).

    Attributes:
        physical_to_logical: ``[L, P]`` int64, the logical expert in each physical slot.
        logical_to_all_physical: ``[L, E, R]`` int64, each logical expert's slots in ascending
            order, ``-1`` padded (``R`` = the most replicas any expert has).
        replica_counts: ``[L, E]`` int64, replicas of each logical expert (``>= 1``).
        ep_size: EP ranks; slot ``p`` lives on rank ``p // (P / ep_size)``.
    """

    physical_to_logical: torch.Tensor
    logical_to_all_physical: torch.Tensor
    replica_counts: torch.Tensor
    ep_size: int

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, physical_to_logical: Any, num_logical_experts: int, ep_size: int,
                     num_layers: Optional[int] = None) -> "ExpertLocation":
        """From ``[L, P]`` (or ``[P]``, repeated for ``num_layers`` layers) logical ids."""
        p2l = torch.as_tensor(physical_to_logical).to(device="cpu")
        if p2l.is_floating_point() or p2l.dtype == torch.bool:
            raise MoeA2AError(f"physical_to_logical_map has dtype {p2l.dtype}; give integer ids")
        p2l = p2l.to(torch.int64)
        if p2l.dim() == 1 and num_layers is not None:
            p2l = p2l.unsqueeze(0).expand(num_layers, -1)
        if p2l.dim() != 2 or p2l.shape[1] == 0:
            raise MoeA2AError(f"physical_to_logical_map has shape {tuple(p2l.shape)}; expected "
                              f"[layers, physical experts]")
        layers, physical = p2l.shape
        if num_layers is not None and layers != num_layers:
            raise MoeA2AError(f"physical_to_logical_map has {layers} layers but the model has "
                              f"{num_layers}; fix: give one row per MoE layer (or one row for all)")
        if physical < num_logical_experts:
            raise MoeA2AError(f"physical_to_logical_map has {physical} physical experts per layer "
                              f"for {num_logical_experts} logical experts: every logical expert "
                              f"needs a slot")
        message = physical_count_error(num_logical_experts, physical - num_logical_experts, ep_size)
        if message:
            raise MoeA2AError(f"physical_to_logical_map: {message}")
        bad = (p2l < 0) | (p2l >= num_logical_experts)
        if bool(bad.any()):
            layer, slot = (int(i) for i in bad.nonzero()[0])
            raise MoeA2AError(f"physical_to_logical_map[{layer}][{slot}] = {int(p2l[layer, slot])} "
                              f"is not a logical expert id in [0, {num_logical_experts})")
        counts = torch.zeros(layers, num_logical_experts, dtype=torch.int64)
        counts.scatter_add_(1, p2l, torch.ones_like(p2l))
        missing = (counts == 0).nonzero()
        if missing.numel():
            layer, expert = (int(i) for i in missing[0])
            raise MoeA2AError(f"physical_to_logical_map: layer {layer} has no replica of logical "
                              f"expert {expert}; fix: place every logical expert at least once")
        return cls(physical_to_logical=p2l.contiguous(),
                   logical_to_all_physical=_all_physical(p2l, counts),
                   replica_counts=counts, ep_size=ep_size)

    @classmethod
    def trivial(cls, num_layers: int, num_logical_experts: int, num_redundant: int,
                ep_size: int) -> "ExpertLocation":
        """Slot ``p`` holds logical ``p % E`` in every layer."""
        message = physical_count_error(num_logical_experts, num_redundant, ep_size)
        if message:
            raise MoeA2AError(message)
        physical = num_logical_experts + num_redundant
        row = torch.arange(physical) % num_logical_experts
        return cls.from_mapping(row.repeat(num_layers, 1), num_logical_experts, ep_size)

    @classmethod
    def from_counts(cls, counts: Any, num_physical: int, ep_size: int, *,
                    algorithm: str = "auto", num_groups: Optional[int] = None,
                    num_nodes: int = 1, num_layers: Optional[int] = None) -> "ExpertLocation":
        """Place ``[L, E]`` (or ``[S, L, E]``, summed over ``S``) expert loads with the
        rebalance algorithm (``auto``/``deepseek``/``deepseek_hierarchical``)."""
        load = torch.as_tensor(counts).to(device="cpu", dtype=torch.float64)
        if load.dim() == 3:
            load = load.sum(0)
        if load.dim() != 2:
            raise MoeA2AError(f"logical_count has shape {tuple(load.shape)}; expected [layers, "
                              f"experts] or [steps, layers, experts]")
        if num_layers is not None and load.shape[0] != num_layers:
            raise MoeA2AError(f"logical_count has {load.shape[0]} layers but the model has "
                              f"{num_layers}; fix: give one row per MoE layer")
        if bool((load < 0).any()) or not bool(torch.isfinite(load).all()):
            raise MoeA2AError("logical_count holds negative or non-finite loads; give token counts")
        experts = int(load.shape[1])
        if num_physical < experts:
            raise MoeA2AError(f"{num_physical} physical experts cannot hold {experts} logical ones")
        message = physical_count_error(experts, num_physical - experts, ep_size)
        if message:
            raise MoeA2AError(message)
        chosen = choose_algorithm(algorithm, num_groups, num_nodes)
        if chosen == "deepseek_hierarchical":
            if num_groups is None:
                raise MoeA2AError("eplb algorithm deepseek_hierarchical needs the router's "
                                  "expert groups (n_group); fix: use deepseek or auto")
            p2l = rebalance(load, num_physical, ep_size, num_groups=num_groups, num_nodes=num_nodes)
        else:
            p2l = rebalance(load, num_physical, ep_size)
        return cls.from_mapping(p2l, experts, ep_size)

    # ---- sizes --------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.physical_to_logical.shape[0])

    @property
    def num_physical_experts(self) -> int:
        return int(self.physical_to_logical.shape[1])

    @property
    def num_logical_experts(self) -> int:
        return int(self.replica_counts.shape[1])

    @property
    def num_local_physical_experts(self) -> int:
        return self.num_physical_experts // self.ep_size

    def rank_of_slot(self) -> torch.Tensor:
        """``[P]`` int64: the EP rank of each physical slot."""
        return torch.arange(self.num_physical_experts) // self.num_local_physical_experts

    # ---- loads --------------------------------------------------------------------------

    def gpu_share(self) -> torch.Tensor:
        """``[L, E, ep]`` float64: the fraction of each logical expert's replicas on each GPU
        (its tokens split evenly over its replicas)."""
        layers, physical = self.physical_to_logical.shape
        share = torch.zeros(layers, self.num_logical_experts, self.ep_size, dtype=torch.float64)
        flat = self.physical_to_logical * self.ep_size + self.rank_of_slot()
        share.view(layers, -1).scatter_add_(1, flat, torch.ones(layers, physical, dtype=torch.float64))
        return share / self.replica_counts.unsqueeze(-1)

    def gpu_load(self, counts: torch.Tensor) -> torch.Tensor:
        """``[L, E]`` logical loads → ``[L, ep]`` float64 load of each GPU."""
        return torch.einsum("le,leg->lg", counts.to(torch.float64).cpu(), self.gpu_share())

    def same_as(self, other: "ExpertLocation") -> torch.Tensor:
        """``[L]`` bool: the layers whose placement is identical in ``other``."""
        return (self.physical_to_logical == other.physical_to_logical).all(dim=1)

    def with_layers(self, other: "ExpertLocation", layers: Sequence[int]) -> "ExpertLocation":
        """This placement with ``layers`` taken from ``other`` (same sizes)."""
        p2l = self.physical_to_logical.clone()
        index = torch.as_tensor(list(layers), dtype=torch.int64)
        p2l[index] = other.physical_to_logical[index]
        return ExpertLocation.from_mapping(p2l, self.num_logical_experts, self.ep_size)


def utilization(gpu_load: torch.Tensor) -> torch.Tensor:
    """``[..., ep]`` GPU loads → ``[...]`` mean / max (1.0 where nothing ran)."""
    load = gpu_load.to(torch.float64)
    top = load.max(dim=-1).values
    return torch.where(top > 0, load.mean(dim=-1) / top.clamp_min(1e-30), torch.ones_like(top))


def _all_physical(p2l: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    layers, physical = p2l.shape
    width = int(counts.max())
    # slots sorted by (logical, slot): each logical's slots end up contiguous and ascending
    key = p2l * physical + torch.arange(physical)
    order = torch.argsort(key, dim=1)
    start = torch.cumsum(counts, dim=1) - counts                      # [L, E]
    sorted_logical = p2l.gather(1, order)
    rank_in_expert = torch.arange(physical) - start.gather(1, sorted_logical)
    table = torch.full((layers, counts.shape[1], width), -1, dtype=torch.int64)
    flat = sorted_logical * width + rank_in_expert
    table.view(layers, -1).scatter_(1, flat, order)
    return table


def load_location_spec(value: str) -> Optional[Dict[str, Any]]:
    """``--init-expert-location`` (resolved: ``trivial``, JSON text or an absolute path) →
    None for trivial, else the dict with ``physical_to_logical_map`` or ``logical_count``."""
    text = value.strip()
    if text == "trivial":
        return None
    if text.startswith("{"):
        data: Any = json.loads(text)
    elif text.endswith(".json"):
        with open(text, encoding="utf-8") as fh:
            data = json.load(fh)
    elif text.endswith(".pt"):
        data = torch.load(text, map_location="cpu", weights_only=True)
    else:
        raise MoeA2AError(f"--init-expert-location {value!r}: expected 'trivial', JSON text, or "
                          f"a .json/.pt path")
    if not isinstance(data, dict) or not ({"physical_to_logical_map", "logical_count"} & set(data)):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise MoeA2AError(f"--init-expert-location {value!r} holds {keys}; it needs "
                          f"physical_to_logical_map or logical_count")
    return data


def initial_location(value: str, *, num_layers: int, num_logical_experts: int, num_redundant: int,
                     ep_size: int, algorithm: str = "auto", num_groups: Optional[int] = None,
                     num_nodes: int = 1) -> ExpertLocation:
    """The placement ``--init-expert-location`` asks for (see the module docstring)."""
    message = physical_count_error(num_logical_experts, num_redundant, ep_size)
    if message:
        raise MoeA2AError(message)
    data = load_location_spec(value)
    physical = num_logical_experts + num_redundant
    if data is None:
        return ExpertLocation.trivial(num_layers, num_logical_experts, num_redundant, ep_size)
    if "physical_to_logical_map" in data:
        location = ExpertLocation.from_mapping(data["physical_to_logical_map"], num_logical_experts,
                                               ep_size, num_layers=num_layers)
        if location.num_physical_experts != physical:
            raise MoeA2AError(
                f"--init-expert-location maps {location.num_physical_experts} physical experts "
                f"per layer but {num_logical_experts} experts + {num_redundant} redundant = "
                f"{physical}; fix: set --ep-num-redundant-experts "
                f"{location.num_physical_experts - num_logical_experts}")
        return location
    location = ExpertLocation.from_counts(data["logical_count"], physical, ep_size,
                                          algorithm=algorithm, num_groups=num_groups,
                                          num_nodes=num_nodes, num_layers=num_layers)
    if location.num_logical_experts != num_logical_experts:
        raise MoeA2AError(f"--init-expert-location counts {location.num_logical_experts} experts "
                          f"per layer but the model has {num_logical_experts}")
    return location


__all__ = ["ExpertLocation", "initial_location", "load_location_spec", "physical_count_error",
           "utilization"]
