"""A CPU-capable emulation of DeepGEMM's Mega-MoE Python API (``deep_gemm``).

``moe_a2a.testing.emulate_kernels()`` installs this module's public names as ``deep_gemm``
(and ``deep_gemm.mega``). Two API variants are emulated:

* upstream DeepGEMM (SM100; ``deep_gemm/mega/__init__.py`` at deepseek-ai/DeepGEMM commit
  54e22612409371d6364144b69086735beb54e98b): ``SymmBuffer``, ``get_symm_buffer_for_mega_moe``,
  ``transform_weights_for_mega_moe``, ``bf16_mega_moe``, ``fp8_fp4_mega_moe``;
* SGLang's DeepGEMM fork (SM90 FP8; the ``sgl-deep-gemm`` interface):
  ``SM90SymmBuffer``, ``get_symm_buffer_for_sm90_mega_moe``,
  ``transform_weights_for_mega_moe_sm90``, ``fp8_mega_moe``.

What is real: each rank's tokens really travel to the ranks owning their experts and back
(``all_to_all_single`` over the buffer's group, gloo or nccl); the math follows the kernels'
numerics (L1 in fp32, gate/up rounded to bf16 and clamped, SwiGLU times the top-k weight,
L2 input in bf16 (``bf16_mega_moe``) or FP8 with per-128-channel scales (``fp8_mega_moe``),
bf16 rows summed per token); the host checks (``DG_HOST_ASSERT``: dtypes, shapes, capacity,
alignment, the architecture) raise ``RuntimeError`` as the extension does.

What differs (see docs/megamoe.md): no symmetric memory (the scratch views ``l1_acts`` /
``l2_acts`` have the real shapes but no storage); the architecture check uses the emulated
compute capability off CUDA; ``fp8_fp4_mega_moe`` checks its arguments but does not model
FP4 weight layouts (it raises ``NotImplementedError``; moe-a2a's backend does not call it).
"""

from __future__ import annotations

import types
import warnings
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from moe_a2a.dispatchers.collectives import all_to_all_v
from moe_a2a.dispatchers.fp8 import FP8, dequantize_blocks, dequantize_per_token, quantize_per_token
from moe_a2a.dispatchers.kernels import emulation_info

TOKEN_ALIGNMENT = 384     # layout::kLCMCandidateBlockM
_GRAN = 8                 # gate/up interleave granularity of the L1 weights

#: Set by ``emulate_kernels`` on the installed module; read through ``emulation_info``.
_SELF: List[Any] = []


def _check(cond: bool, text: str, why: str = "") -> None:
    """``DG_HOST_ASSERT``: the extension raises ``RuntimeError`` with the failed condition."""
    if not cond:
        raise RuntimeError(f"Assertion error (csrc/apis/mega.hpp): '{text}' (moe_a2a emulation "
                           f"of DeepGEMM Mega-MoE{': ' + why if why else ''})")


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _arch_major(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0]
    info = emulation_info(_SELF[0]) if _SELF else None
    return info.compute_capability[0] if info is not None else 0


def _group_checked(group: Any, what: Tuple[Any, ...]) -> None:
    """Allocation is collective (symmetric memory rendezvous): every rank asks the same."""
    if group.size() == 1:
        return
    everyone: List[Any] = [None] * group.size()
    dist.all_gather_object(everyone, what, group=group)
    _check(all(e == what for e in everyone), "every rank allocates the same symmetric buffer",
           f"ranks asked for {everyone}")
    dist.barrier(group=group)


def _no_storage(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype).expand(*shape)


# --------------------------------------------------------------------------- SM100 (upstream)

class SymmBuffer:
    """The symmetric buffer of upstream Mega-MoE: input views ``x``, ``x_sf``, ``topk_idx``,
    ``topk_weights`` (``[num_max_tokens_per_rank, ...]``) that the caller fills."""

    def __init__(self, group: dist.ProcessGroup,
                 num_experts: int,
                 num_max_tokens_per_rank: int, num_topk: int,
                 hidden: int, intermediate_hidden: int,
                 num_ring_tokens: int,
                 mma_type: str = 'fp8xfp4',
                 activation: str = 'swiglu'):
        assert activation == 'swiglu', f'Only `swiglu` activation is supported, got `{activation}`'
        self.group = group
        self.num_experts = num_experts
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_topk = num_topk
        self.hidden = hidden
        self.intermediate_hidden = intermediate_hidden
        self.num_ring_tokens = num_ring_tokens
        self.mma_type = mma_type
        _check(num_experts % group.size() == 0, "num_experts % num_ranks == 0")
        _check(mma_type in ("fp8xfp4", "bf16xbf16"), "parse_mma_kind(mma_type)",
               f"unknown mma_type {mma_type!r}")
        with_sf = mma_type == "fp8xfp4"
        if with_sf:
            _check(hidden % 128 == 0 and intermediate_hidden % 128 == 0,
                   "hidden % 128 == 0 and intermediate_hidden % 128 == 0")
        _group_checked(group, (num_experts, num_max_tokens_per_rank, num_topk, hidden,
                               intermediate_hidden, mma_type))
        device = _device(group)
        act = FP8 if with_sf else torch.bfloat16
        cap = num_max_tokens_per_rank
        self.buffer = torch.zeros(0, dtype=torch.int8, device=device)
        self.handle = types.SimpleNamespace(buffer_ptrs=[0] * group.size())
        self.x = torch.zeros(cap, hidden, dtype=act, device=device)
        self.x_sf = torch.zeros(cap, hidden // 128, dtype=torch.int32, device=device) if with_sf else None
        self.topk_idx = torch.full((cap, num_topk), -1, dtype=torch.int64, device=device)
        self.topk_weights = torch.zeros(cap, num_topk, dtype=torch.float32, device=device)
        self.l1_acts = _no_storage((num_ring_tokens, hidden), act)
        self.l1_acts_sf = _no_storage((num_ring_tokens, hidden // 128), torch.int32) if with_sf else None
        self.l2_acts = _no_storage((num_ring_tokens, intermediate_hidden), act)
        self.l2_acts_sf = (_no_storage((num_ring_tokens, intermediate_hidden // 128), torch.int32)
                           if with_sf else None)

    def destroy(self):
        self.handle = None
        self.buffer = None
        self.group = None
        self.x = None
        self.x_sf = None


def _device(group: Any) -> torch.device:
    """Where the buffer lives: the current GPU (as the real one), or the CPU for gloo groups."""
    if group.size() > 1 and str(dist.get_backend(group)).lower() == "gloo":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_symm_buffer_for_mega_moe(group: dist.ProcessGroup,
                                 num_experts: int,
                                 num_max_tokens_per_rank: int, num_topk: int,
                                 hidden: int, intermediate_hidden: int,
                                 use_fp8_dispatch: Union[bool, None] = None,
                                 mma_type: str = 'fp8xfp4',
                                 activation: str = 'swiglu') -> SymmBuffer:
    """Allocate the symmetric buffer (collective); ``num_max_tokens_per_rank`` is rounded up
    to the token alignment (384)."""
    num_max_tokens_per_rank = _align(num_max_tokens_per_rank, TOKEN_ALIGNMENT)
    num_ring_tokens = _align(num_max_tokens_per_rank * num_topk, TOKEN_ALIGNMENT)
    if use_fp8_dispatch is not None:
        assert use_fp8_dispatch == (mma_type.split('x')[0] == 'fp8')
        warnings.warn('`use_fp8_dispatch` will be deprecated in the future, please use `mma_type`',
                      DeprecationWarning, stacklevel=3)
    return SymmBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                      intermediate_hidden, num_ring_tokens, mma_type=mma_type,
                      activation=activation)


def _interleave(t: torch.Tensor, gran: int = _GRAN) -> torch.Tensor:
    """``[g, 2n, *]`` ``[gate | up]`` -> ``[gate 0..7, up 0..7, gate 8..15, ...]``."""
    g, n, *rest = t.shape
    half = n // 2
    gate = t[:, :half].reshape(g, half // gran, gran, *rest)
    up = t[:, half:].reshape(g, half // gran, gran, *rest)
    return torch.stack([gate, up], dim=2).reshape(g, n, *rest).contiguous()


def _deinterleave(t: torch.Tensor, gran: int = _GRAN) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_interleave` for one expert ``[2n, K]`` -> ``(gate [n, K], up)``."""
    n2, k = t.shape
    pairs = t.reshape(n2 // (2 * gran), 2, gran, k)
    return pairs[:, 0].reshape(n2 // 2, k), pairs[:, 1].reshape(n2 // 2, k)


def _transpose_sf_for_utccp(sf: torch.Tensor) -> torch.Tensor:
    num_groups, mn, packed_sf_k = sf.shape
    assert sf.dtype == torch.int and mn % 128 == 0
    return (sf.reshape(num_groups, -1, 4, 32, packed_sf_k).transpose(2, 3)
            .reshape(num_groups, mn, packed_sf_k).contiguous())


def transform_weights_for_mega_moe(
    l1_weights: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    l2_weights: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    activation: str = 'swiglu'
) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
           Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]:
    """BF16: interleave L1's gate/up rows (L2 unchanged). FP8/FP4 tuples: interleave L1 data and
    scales and transpose the scales for UTCCP."""
    assert activation == 'swiglu', f'Only `swiglu` activation is supported, got `{activation}`'
    if isinstance(l1_weights, tuple):
        l1 = (_interleave(l1_weights[0]), _transpose_sf_for_utccp(_interleave(l1_weights[1])))
        return l1, (l2_weights[0], _transpose_sf_for_utccp(l2_weights[1]))
    return _interleave(l1_weights), l2_weights


def _check_common(y: torch.Tensor, sym_buffer: Any, activation: str,
                  activation_clamp: Optional[float], stats: Optional[torch.Tensor],
                  num_local: int) -> float:
    _check(activation == "swiglu", 'activation == "swiglu"')
    clamp = float("inf") if activation_clamp is None else float(activation_clamp)
    _check(clamp >= 0, "activation_clamp >= 0")
    _check(y.dim() == 2 and y.dtype == torch.bfloat16 and y.shape[1] == sym_buffer.hidden,
           "y bf16 [num_tokens, hidden]")
    _check(y.shape[0] <= sym_buffer.num_max_tokens_per_rank,
           "num_tokens <= num_max_tokens_per_rank",
           f"y has {y.shape[0]} rows, the buffer holds {sym_buffer.num_max_tokens_per_rank}")
    _check(num_local * sym_buffer.group.size() == sym_buffer.num_experts,
           "num_experts == num_experts_per_rank * num_ranks")
    if stats is not None:
        _check(stats.dtype == torch.int32 and stats.numel() == num_local and stats.is_contiguous(),
               "cumulative_local_expert_recv_stats int32 [num_experts_per_rank]")
    return clamp


def bf16_mega_moe(y: torch.Tensor,
                  l1_weights: torch.Tensor,
                  l2_weights: torch.Tensor,
                  sym_buffer: SymmBuffer,
                  cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                  activation: str = 'swiglu',
                  activation_clamp: Optional[float] = None,
                  fast_math: bool = True):
    """Fused dispatch + SwiGLU experts + combine for the first ``y.size(0)`` buffer rows."""
    _check(l1_weights.dtype == torch.bfloat16 and l2_weights.dtype == torch.bfloat16,
           "l1_weights/l2_weights scalar_type() == torch::kBFloat16")
    _check(l1_weights.dim() == 3 and l2_weights.dim() == 3, "grouped [E, N, K] weights")
    num_local, two_i, hidden = (int(s) for s in l1_weights.shape)
    num_local_, hidden_, inter = (int(s) for s in l2_weights.shape)
    _check(num_local == num_local_ and hidden == hidden_ and two_i == 2 * inter,
           "l1 [E, 2I, H] and l2 [E, H, I] agree")
    _check(l1_weights.is_contiguous() and l2_weights.is_contiguous(),
           "l1_weights.is_contiguous() and l2_weights.is_contiguous()")
    clamp = _check_common(y, sym_buffer, activation, activation_clamp,
                          cumulative_local_expert_recv_stats, num_local)
    _check(getattr(sym_buffer, "mma_type", "") == "bf16xbf16",
           "sym_buffer.nbytes() >= num_required_bytes",
           f"the buffer was allocated for mma_type={getattr(sym_buffer, 'mma_type', '?')!r}; "
           f"bf16_mega_moe needs mma_type='bf16xbf16'")
    _check(_arch_major(y.device) == 10, "Unsupported architecture",
           "bf16_mega_moe runs on SM100 (compute capability 10.x) only")

    def expert(e: int, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_w, up_w = _deinterleave(l1_weights[e])
        act = _swiglu(rows.float(), gate_w.float(), up_w.float(), weights, clamp)
        return act.to(torch.bfloat16).float() @ l2_weights[e].float().t()

    _fused(y, sym_buffer, sym_buffer.x[:y.shape[0]].float(), expert, num_local,
           cumulative_local_expert_recv_stats)


def fp8_fp4_mega_moe(y: torch.Tensor,
                     l1_weights: Tuple[torch.Tensor, torch.Tensor],
                     l2_weights: Tuple[torch.Tensor, torch.Tensor],
                     sym_buffer: SymmBuffer,
                     cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                     recipe: Tuple[int, int, int] = (1, 1, 32),
                     activation: str = 'swiglu',
                     activation_clamp: Optional[float] = None,
                     fast_math: bool = True):
    """FP8 activations x FP4 weights (UE8M0 scales, UTCCP layout): arguments are checked,
    the computation is not emulated."""
    _check(tuple(recipe) == (1, 1, 32), "rm == 1 and rn == 1 and rk == 32")
    _check(getattr(sym_buffer, "mma_type", "") == "fp8xfp4", "sym_buffer.nbytes() >= num_required_bytes")
    _check_common(y, sym_buffer, activation, activation_clamp, cumulative_local_expert_recv_stats,
                  int(l1_weights[0].shape[0]))
    _check(_arch_major(y.device) == 10, "Unsupported architecture")
    raise NotImplementedError(
        "the moe_a2a emulation does not model DeepGEMM's FP4 weight layouts, so "
        "fp8_fp4_mega_moe is not computed; moe-a2a's megamoe backend uses bf16_mega_moe on SM100")


# --------------------------------------------------------------------------- SM90 (SGLang fork)

class SM90SymmBuffer:
    """The SM90 FP8 Mega-MoE buffer: ``x`` e4m3 ``[cap, H]``, ``x_sf`` float32 ``[cap, H/128]``
    (K-major), ``topk_idx`` int64 and ``topk_weights`` float32 ``[cap, K]``."""

    def __init__(self, group,
                 num_experts: int,
                 num_max_tokens_per_rank: int, num_topk: int,
                 hidden: int, intermediate_hidden: int,
                 use_fp8_dispatch: bool = True,
                 activation: str = 'swiglu'):
        self.group = group
        self.num_experts = num_experts
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_topk = num_topk
        self.hidden = hidden
        self.intermediate_hidden = intermediate_hidden
        _check(num_experts % group.size() == 0, "num_experts % num_ranks == 0")
        _check(use_fp8_dispatch, "use_fp8_dispatch", "the SM90 Mega-MoE dispatches FP8 only")
        _check(activation == "swiglu", 'activation == "swiglu"')
        _check(hidden % 128 == 0 and intermediate_hidden % 128 == 0,
               "hidden % 128 == 0 and intermediate_hidden % 128 == 0")
        _group_checked(group, (num_experts, num_max_tokens_per_rank, num_topk, hidden,
                               intermediate_hidden, "sm90"))
        device = _device(group)
        cap = num_max_tokens_per_rank
        ring = _align(cap * num_topk, TOKEN_ALIGNMENT)
        self.buffer = torch.zeros(0, dtype=torch.int8, device=device)
        self.handle = types.SimpleNamespace(buffer_ptrs=[0] * group.size())
        self.x = torch.zeros(cap, hidden, dtype=FP8, device=device)
        self.x_sf = torch.zeros(cap, hidden // 128, dtype=torch.float32, device=device)
        self.topk_idx = torch.full((cap, num_topk), -1, dtype=torch.int64, device=device)
        self.topk_weights = torch.zeros(cap, num_topk, dtype=torch.float32, device=device)
        self.l1_acts = _no_storage((ring, hidden), FP8)
        self.l1_acts_sf = _no_storage((ring, hidden // 128), torch.float32)
        self.l2_acts = _no_storage((ring, intermediate_hidden), FP8)
        self.l2_acts_sf = _no_storage((ring, intermediate_hidden // 128), torch.float32)

    def destroy(self):
        self.handle = None
        self.buffer = None
        self.group = None
        self.x = None
        self.x_sf = None


def get_symm_buffer_for_sm90_mega_moe(group,
                                      num_experts: int,
                                      num_max_tokens_per_rank: int, num_topk: int,
                                      hidden: int, intermediate_hidden: int,
                                      use_fp8_dispatch: bool = True,
                                      activation: str = 'swiglu') -> SM90SymmBuffer:
    num_max_tokens_per_rank = _align(num_max_tokens_per_rank, TOKEN_ALIGNMENT)
    return SM90SymmBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                          intermediate_hidden, use_fp8_dispatch, activation)


def transform_weights_for_mega_moe_sm90(
    l1_weights: Tuple[torch.Tensor, torch.Tensor],
    l2_weights: Tuple[torch.Tensor, torch.Tensor]
) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """Interleave L1's gate/up FP8 rows; the block scales keep their natural layout."""
    l1_fp8, l1_sf = l1_weights
    return (_interleave(l1_fp8), l1_sf), l2_weights


def fp8_mega_moe(y: torch.Tensor,
                 l1_weights: Tuple[torch.Tensor, torch.Tensor],
                 l2_weights: Tuple[torch.Tensor, torch.Tensor],
                 sym_buffer: SM90SymmBuffer,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 recipe: Tuple[int, int, int] = (128, 128, 128),
                 activation: str = 'swiglu',
                 activation_clamp: Optional[float] = None,
                 fast_math: bool = True):
    """SM90 fused MoE: e4m3 weights with 128x128 block scales, e4m3 activations with
    per-token 128-channel scales."""
    (l1, l1_sf), (l2, l2_sf) = l1_weights, l2_weights
    _check(tuple(recipe) == (128, 128, 128), "recipe == (128, 128, 128)")
    _check(l1.dtype == FP8 and l2.dtype == FP8, "weights are float8_e4m3fn")
    _check(l1_sf.dtype == torch.float32 and l2_sf.dtype == torch.float32, "weight scales are float32")
    num_local, two_i, hidden = (int(s) for s in l1.shape)
    num_local_, hidden_, inter = (int(s) for s in l2.shape)
    _check(num_local == num_local_ and hidden == hidden_ and two_i == 2 * inter,
           "l1 [E, 2I, H] and l2 [E, H, I] agree")
    _check(tuple(l1_sf.shape) == (num_local, two_i // 128, hidden // 128)
           and tuple(l2_sf.shape) == (num_local, hidden // 128, inter // 128),
           "block (128, 128) weight scales [E, N / 128, K / 128]")
    _check(l1.is_contiguous() and l2.is_contiguous(), "weights contiguous")
    _check(isinstance(sym_buffer, SM90SymmBuffer), "an SM90 symmetric buffer",
           "allocate it with get_symm_buffer_for_sm90_mega_moe")
    clamp = _check_common(y, sym_buffer, activation, activation_clamp,
                          cumulative_local_expert_recv_stats, num_local)
    _check(_arch_major(y.device) == 9, "Unsupported architecture",
           "fp8_mega_moe runs on SM90 (compute capability 9.x) only")
    n = y.shape[0]
    x = dequantize_per_token(sym_buffer.x[:n], sym_buffer.x_sf[:n])

    def expert(e: int, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w1 = dequantize_blocks(_deinterleave_fp8(l1[e]).unsqueeze(0), l1_sf[e].unsqueeze(0))[0]
        gate_w, up_w = w1[:inter], w1[inter:]
        act = _swiglu(rows, gate_w, up_w, weights, clamp)
        q, s = quantize_per_token(act)                      # L2 input is FP8 in the kernel
        w2 = dequantize_blocks(l2[e].unsqueeze(0), l2_sf[e].unsqueeze(0))[0]
        return dequantize_per_token(q, s) @ w2.t()

    _fused(y, sym_buffer, x, expert, num_local, cumulative_local_expert_recv_stats)


def _deinterleave_fp8(t: torch.Tensor) -> torch.Tensor:
    gate, up = _deinterleave(t.view(torch.uint8))
    return torch.cat([gate, up]).view(FP8)


# --------------------------------------------------------------------------- shared math

def _swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, weights: torch.Tensor,
            clamp: float) -> torch.Tensor:
    """``silu(gate) * up * weight`` with gate/up rounded to bf16 and clamped as the kernels do."""
    gate = (x @ gate_w.t()).to(torch.bfloat16).float()
    up = (x @ up_w.t()).to(torch.bfloat16).float()
    if clamp != float("inf"):
        gate = gate.clamp(max=clamp)
        up = up.clamp(-clamp, clamp)
    return torch.nn.functional.silu(gate) * up * weights.unsqueeze(1)


def _fused(y: torch.Tensor, buf: Any, x: torch.Tensor, expert, num_local: int,
           stats: Optional[torch.Tensor]) -> None:
    """Move each (token, expert) pair to its rank, run ``expert``, bring bf16 rows back, sum."""
    group, world = buf.group, buf.group.size()
    n, k = y.shape[0], buf.num_topk
    ids = buf.topk_idx[:n].reshape(-1)
    weights = buf.topk_weights[:n].reshape(-1)
    token = torch.arange(n * k, device=y.device) // k
    keep = ids >= 0
    ids, weights, token = ids[keep], weights[keep], token[keep]
    order = torch.argsort(ids, stable=True)
    ids, weights, token = ids[order], weights[order], token[order]
    dest = torch.div(ids, num_local, rounding_mode="floor")
    send = torch.bincount(dest, minlength=world)[:world]
    recv = _exchange_counts(send, group)
    send_l, recv_l = send.tolist(), recv.tolist()
    rows = _a2a(x.index_select(0, token), recv_l, send_l, group)
    r_ids = _a2a(ids, recv_l, send_l, group) - group.rank() * num_local
    r_w = _a2a(weights, recv_l, send_l, group)
    out = torch.zeros(rows.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    for e in range(num_local):
        sel = torch.nonzero(r_ids == e, as_tuple=True)[0]
        if sel.numel():
            out[sel] = expert(e, rows.index_select(0, sel), r_w.index_select(0, sel))
    if stats is not None:
        stats += torch.bincount(r_ids, minlength=num_local)[:num_local].to(torch.int32)
    back = _a2a(out.to(torch.bfloat16), send_l, recv_l, group)
    acc = torch.zeros(n, y.shape[1], dtype=torch.float32, device=y.device)
    acc.index_add_(0, token, back.float())
    y.copy_(acc)


def _exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    if group.size() == 1:
        return send.clone()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


def _a2a(x: torch.Tensor, recv, send, group) -> torch.Tensor:
    if group.size() == 1:
        return x.clone()
    return all_to_all_v(x.contiguous(), recv, send, group)


__all__ = ["SM90SymmBuffer", "SymmBuffer", "bf16_mega_moe", "fp8_fp4_mega_moe", "fp8_mega_moe",
           "get_symm_buffer_for_mega_moe", "get_symm_buffer_for_sm90_mega_moe",
           "transform_weights_for_mega_moe", "transform_weights_for_mega_moe_sm90"]
