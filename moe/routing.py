"""Routing: router logits → :class:`LogicalTopK` (logical expert ids and their weights).

Routing stages are types: the router returns ``LogicalTopK`` (what routed-experts capture and
the EPLB recorder see); ``moe_a2a.remap`` alone turns it into ``dispatchers.PhysicalTopK``
(EPLB's logical→physical placement, fused shared-expert columns), what dispatchers see.

Two scoring rules cover the supported models:

* ``softmax`` (Mixtral, Qwen3-MoE): softmax over all ``E`` experts in float32, top-k of the
  probabilities, optional renormalisation of the ``K`` kept probabilities.
* ``sigmoid`` (DeepSeek-V3): ``scores = sigmoid(logits)``; selection uses the *biased* scores
  ``scores + correction_bias``; with ``n_group > 1`` the experts are split into ``n_group``
  contiguous groups, each group is scored by the sum of its two best biased scores, only the
  best ``topk_group`` groups stay eligible, and the top-k is taken over the eligible biased
  scores. The weights are the *unbiased* scores of the chosen experts, renormalised when
  ``renormalize`` is set (denominator ``sum + 1e-20``).

Grouped selection (``n_group > 1``) works the same way for both scoring rules (group score =
sum of the top-2 selection scores of the group; a group of one expert uses that one score).
In every case the weights are finally multiplied by ``routed_scaling_factor``.

All routing math is float32, whatever the model dtype. The output columns are sorted by
descending selection score (transformers uses ``sorted=False`` in places; compare ids as sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from moe_a2a.errors import MoeA2AError

SCORING_FUNCS = ("softmax", "sigmoid")

#: Added to the renormalisation denominator (as DeepSeek-V3 does); a no-op unless the kept
#: scores are all ~0.
RENORM_EPS = 1e-20


@dataclass(frozen=True)
class LogicalTopK:
    """The router's choice for ``T`` tokens, in *logical* expert ids.

    Attributes:
        ids: ``[T, K]`` int64 logical expert ids in ``[0, E)`` (no ``-1``), columns in the
            router's order (descending selection score).
        weights: ``[T, K]`` float32 (renormalised if configured, times the routed scaling factor).
    """

    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])


@dataclass(frozen=True)
class RouterConfig:
    """How a router turns ``[T, E]`` logits into ``K`` experts per token.

    Attributes:
        num_experts: ``E``, routed experts (global, logical = physical here).
        top_k: ``K``, experts per token, ``1 <= K <= E``.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        n_group: expert groups for grouped top-k (``1`` = no grouping); must divide ``E``.
        topk_group: groups kept per token, ``1 <= topk_group <= n_group``; with
            ``n_group == 1`` it must be 1.
        renormalize: divide the ``K`` kept weights by their sum.
        routed_scaling_factor: multiplies the final weights (DeepSeek-V3: 2.5).
        has_correction_bias: the router takes an ``[E]`` score-correction bias that affects
            the choice but not the weights (DeepSeek-V3 ``e_score_correction_bias``).
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoeA2AError(f"RouterConfig.{name}={value!r} must be an integer >= 1")
        e, k = self.num_experts, self.top_k
        if k > e:
            raise MoeA2AError(
                f"top_k={k} exceeds num_experts={e}: a token cannot pick more experts than exist; "
                f"use top_k <= {e} or more experts"
            )
        if self.scoring not in SCORING_FUNCS:
            raise MoeA2AError(
                f"scoring={self.scoring!r} is not supported: use one of {', '.join(SCORING_FUNCS)}"
            )
        if e % self.n_group:
            raise MoeA2AError(
                f"n_group={self.n_group} does not divide num_experts={e}: groups must be equal; "
                f"choose n_group dividing {e} (1 disables grouping)"
            )
        if self.topk_group > self.n_group:
            raise MoeA2AError(
                f"topk_group={self.topk_group} exceeds n_group={self.n_group}: cannot keep more "
                f"groups than exist; use topk_group <= {self.n_group}"
            )
        per_group = e // self.n_group
        if k > self.topk_group * per_group:
            need = -(-k // per_group)
            raise MoeA2AError(
                f"top_k={k} exceeds the {self.topk_group * per_group} experts eligible with "
                f"topk_group={self.topk_group} of n_group={self.n_group} groups "
                f"({per_group} experts each): raise topk_group to >= {need} "
                f"(or use fewer groups / a smaller top_k)"
            )
        for name in ("renormalize", "has_correction_bias"):
            if not isinstance(getattr(self, name), bool):
                raise MoeA2AError(f"RouterConfig.{name}={getattr(self, name)!r} must be a bool")
        rsf = self.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not math.isfinite(rsf) or rsf <= 0:
            raise MoeA2AError(
                f"routed_scaling_factor={rsf!r} must be a finite number > 0 (1.0 = no scaling)"
            )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group


def default_groups(num_experts: int, top_k: int) -> Tuple[int, int]:
    """A valid ``(n_group, topk_group)`` for any ``1 <= top_k <= num_experts``.

    DeepSeek-like 8 groups with 4 kept when 8 divides the experts (at least 2 per group);
    otherwise 4 or 2 groups keeping half; ``topk_group`` is raised when ``top_k`` needs more
    eligible experts; ``(1, 1)`` (no grouping) when no split into groups of >= 2 exists.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise MoeA2AError(f"num_experts={num_experts!r} must be an integer >= 1")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise MoeA2AError(
            f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}]: "
            f"use top_k <= {num_experts} or more experts"
        )
    for n_group in (8, 4, 2):
        if num_experts % n_group or num_experts // n_group < 2:
            continue
        per_group = num_experts // n_group
        topk_group = max(n_group // 2, -(-top_k // per_group))
        if topk_group <= n_group:
            return n_group, topk_group
    return 1, 1


def compute_router_logits(hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``[T, H]`` hidden states (any float dtype) × ``[E, H]`` gate → ``[T, E]`` float32 logits."""
    return hidden.float() @ gate.float().t()


def _check_inputs(logits: torch.Tensor, config: RouterConfig, bias: Optional[torch.Tensor]) -> None:
    if logits.dim() != 2 or logits.shape[1] != config.num_experts:
        raise MoeA2AError(
            f"router_logits has shape {tuple(logits.shape)}; expected [T, {config.num_experts}] "
            f"(num_experts of the RouterConfig)"
        )
    if not logits.is_floating_point():
        raise MoeA2AError(f"router_logits has dtype {logits.dtype}; pass a floating-point tensor")
    if config.has_correction_bias and bias is None:
        raise MoeA2AError(
            "the RouterConfig has has_correction_bias=True but correction_bias is None: "
            "pass the [E] bias (MoEWeights.correction_bias) or set has_correction_bias=False"
        )
    if not config.has_correction_bias and bias is not None:
        raise MoeA2AError(
            "a correction_bias was passed but the RouterConfig has has_correction_bias=False: "
            "set has_correction_bias=True or drop the bias"
        )
    if bias is not None and tuple(bias.shape) != (config.num_experts,):
        raise MoeA2AError(
            f"correction_bias has shape {tuple(bias.shape)}; expected [{config.num_experts}]"
        )


def route(router_logits: torch.Tensor, config: RouterConfig,
          correction_bias: Optional[torch.Tensor] = None) -> LogicalTopK:
    """Pick ``K`` experts per token.

    Args:
        router_logits: ``[T, E]`` float (any float dtype; math is float32). ``T == 0`` is fine.
        config: the routing rule.
        correction_bias: ``[E]`` float, required iff ``config.has_correction_bias``; added to
            the scores for selection only.
    Returns:
        ``LogicalTopK`` with ``ids [T, K]`` int64 logical expert ids (no ``-1``) and ``weights [T, K]``
        float32 (renormalised if configured, times ``routed_scaling_factor``), columns sorted
        by descending selection score.
    """
    _check_inputs(router_logits, config, correction_bias)
    logits = router_logits.float()
    if config.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
    choice = scores
    if correction_bias is not None:
        choice = scores + correction_bias.to(device=scores.device, dtype=torch.float32)
    if config.n_group > 1 and config.topk_group < config.n_group:
        choice = _mask_groups(choice, config)
    ids = torch.topk(choice, k=config.top_k, dim=-1, sorted=True)[1]
    weights = scores.gather(1, ids)
    if config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return LogicalTopK(ids=ids.to(torch.int64), weights=weights.to(torch.float32).contiguous())


def _mask_groups(choice: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """``[T, E]`` selection scores → same with experts outside the kept groups set to -inf."""
    t = choice.shape[0]
    per_group = config.experts_per_group
    grouped = choice.view(t, config.n_group, per_group)
    group_scores = grouped.topk(min(2, per_group), dim=-1)[0].sum(dim=-1)  # [T, n_group]
    group_idx = torch.topk(group_scores, k=config.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
    group_mask.scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(t, config.n_group, per_group).reshape(t, config.num_experts)
    return choice.masked_fill(~expert_mask, float("-inf"))


__all__ = ["LogicalTopK", "RouterConfig", "SCORING_FUNCS", "compute_router_logits", "default_groups", "route"]
