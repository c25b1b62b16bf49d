"""FP8 (e4m3) casts the DeepEP and DeepGEMM paths use, in plain torch.

Two granularities, both with float32 scales (``value = fp8 * scale``):

* per token, per 128 channels (activations): ``x [N, H] -> (q [N, H], s [N, H // 128])``;
* per 128 x 128 block (weights): ``w [G, N, K] -> (q [G, N, K], s [G, N // 128, K // 128])``.

The scale of a group is ``amax / 448`` (448 is e4m3's largest finite value), with ``amax``
clamped to ``1e-4`` so an all-zero group does not divide by zero (DeepEP's and DeepGEMM's test
casts use the same rule). ``round_scale`` rounds the scale up to a power of two (UE8M0-ready).
"""

from __future__ import annotations

from typing import Tuple

import torch

from moe_a2a.dispatchers.errors import DispatcherError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128
_AMAX_FLOOR = 1e-4


def _scale(amax: torch.Tensor, round_scale: bool) -> torch.Tensor:
    scale = amax.clamp(min=_AMAX_FLOOR) / FP8_MAX
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def quantize_per_token(x: torch.Tensor, *, round_scale: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [N, H]`` (``H % 128 == 0``) -> ``(q [N, H] e4m3, scales [N, H // 128] float32)``."""
    if x.dim() != 2 or x.shape[1] % GROUP:
        raise DispatcherError(f"FP8 per-token cast needs [N, H] with H a multiple of {GROUP}; "
                              f"got {tuple(x.shape)}")
    n, h = x.shape
    groups = x.float().reshape(n, h // GROUP, GROUP)
    scale = _scale(groups.abs().amax(dim=2), round_scale)
    q = (groups / scale.unsqueeze(2)).reshape(n, h).to(FP8)
    return q, scale


def dequantize_per_token(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_per_token` for any leading shape: ``q [*, H]``,
    ``scales [*, H // 128]`` -> float32 ``[*, H]``."""
    if q.shape[:-1] != scales.shape[:-1] or q.shape[-1] != scales.shape[-1] * GROUP:
        raise DispatcherError(f"FP8 payload {tuple(q.shape)} and scales {tuple(scales.shape)} do "
                              f"not match: expected scales [..., H // {GROUP}]")
    return q.float() * scales.float().repeat_interleave(GROUP, dim=-1)


def quantize_blocks(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``w [G, N, K]`` (``N``, ``K`` multiples of 128) -> ``(q e4m3, scales [G, N/128, K/128])``."""
    g, n, k = w.shape
    if n % GROUP or k % GROUP:
        raise DispatcherError(f"FP8 block cast needs both matrix dims to be multiples of {GROUP}; "
                              f"got {tuple(w.shape)}")
    blocks = w.float().reshape(g, n // GROUP, GROUP, k // GROUP, GROUP)
    scale = _scale(blocks.abs().amax(dim=(2, 4)), False)
    q = (blocks / scale[:, :, None, :, None]).reshape(g, n, k).to(FP8)
    return q, scale


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_blocks`: float32 ``[G, N, K]``."""
    expanded = scales.float().repeat_interleave(GROUP, dim=1).repeat_interleave(GROUP, dim=2)
    return q.float() * expanded


__all__ = ["FP8", "FP8_MAX", "GROUP", "dequantize_blocks", "dequantize_per_token",
           "quantize_blocks", "quantize_per_token"]
