"""Routed-experts capture for RL rollout routing replay (R3).

The capturer is a ``StepObserver`` owned by ``MoEStack`` (built when
``--enable-return-routed-experts`` is on). Every layer reports its router's ``LogicalTopK``:
*logical* expert ids, before EPLB's logical→physical remap and before fused shared-expert
columns, columns in the router's order. Per step:

1. ``observe`` (inside the forward, possibly inside a CUDA graph): the gather strategy writes the
   layer's ids into the device cache ``[M, L, K]`` (rows ``[0, T)`` = this DP rank's batch);
   ``early`` all-gathers over attention-TP here. Nothing is read to the host. A graph replay
   re-runs these kernels without calling ``observe`` (steps begun with ``capturing=True``).
2. ``on_step_end`` (after the forward): ``late`` all-gathers here; then the rows and the
   step's KV-cache slots are copied to pinned host staging (``non_blocking`` on CUDA; an event
   marks completion). Two staging buffers alternate, so a step waits at most for the copy of
   the step before the previous one.
3. ``finalize`` (before any collection): waits for the copies, in step order, and scatters the
   rows into the host cache ``[S, L, K]`` at their KV slots.

``get_topk`` then reads a request's rows through its ``req_to_token`` row: positions
``[start_len, seqlen - 1)`` (the last token has not been forwarded yet). A slot shared through a
prefix-cache hit returns the rows written when it was forwarded. ``-1`` means "no expert": host
rows never written hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from moe_a2a.errors import MoeA2AError
from moe_a2a.routed_experts_gather import GatherStrategy, make_gather
from moe_a2a.routed_experts_wire import encode_routed_experts, encode_routed_experts_base64
from moe_a2a.routing import LogicalTopK
from moe_a2a.step import RowSpan, StepContext, StepObserver

if TYPE_CHECKING:
    from moe_a2a.dispatchers.groups import CommGroups
    from moe_a2a.parallel import ParallelContext
    from moe_a2a.server_args import ServerArgs

#: The padding sentinel: no expert (host rows never written, padded wire rows).
PADDING = -1


class RoutedExpertsRequestError(MoeA2AError):
    """One request's collection was rejected (bad ``start_len``, positions, slots); the other
    requests of the batch are unaffected."""


# ---- sizes -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CaptureSizes:
    """Buffer sizes of one capturer, from ``capture_sizes``.

    Attributes:
        max_tokens_per_step: ``M``, the most tokens one DP rank forwards in a step (rows of the
            device cache).
        num_token_slots: ``S``, KV-cache slots (rows of the host cache).
        limits: ``(what, tokens)`` of every bound that was considered; ``M`` is the largest.
    """

    max_tokens_per_step: int
    num_token_slots: int
    limits: Tuple[Tuple[str, int], ...] = ()

    def device_bytes(self, num_layers: int, top_k: int) -> int:
        """Bytes on the device: the cache and the gather buffers (at most twice the cache)."""
        return 3 * self.max_tokens_per_step * num_layers * top_k * 4

    def host_bytes(self, num_layers: int, top_k: int) -> int:
        """Bytes of host memory (pinned on CUDA): the host cache and two staging buffers."""
        return (self.num_token_slots + 2 * self.max_tokens_per_step) * num_layers * top_k * 4


def capture_sizes(args: "ServerArgs", *, num_token_slots: int,
                  max_step_tokens: Optional[int] = None) -> CaptureSizes:
    """The capturer's buffer sizes, from the server arguments and the engine's KV cache.

    One DP rank's step holds at most: a prefill chunk (``--chunked-prefill-size`` is global and
    split over DP ranks under DP attention, as in SGLang), one decode token per running request
    (``--max-running-requests`` over the DP ranks, the fullest rank counts), a captured CUDA
    graph batch (``--cuda-graph-max-bs``, per DP rank) and, when given, the engine's own bound
    ``max_step_tokens`` (e.g. mixed chunked prefill, speculative verify tokens). The device
    cache takes the largest. Only this DP rank's rows are kept (the layer routes only them),
    so dp_size divides the limits instead of multiplying the buffer.

    Args:
        args: resolved server arguments.
        num_token_slots: KV-cache slots of this rank (the host cache is indexed by slot).
        max_step_tokens: the engine's own bound on one DP rank's tokens per step.
    """
    if isinstance(num_token_slots, bool) or not isinstance(num_token_slots, int) or num_token_slots < 1:
        raise MoeA2AError(f"num_token_slots={num_token_slots!r} must be an integer >= 1 (the KV-"
                          f"cache slots the host cache is indexed by)")
    from moe_a2a.server_args.validate import prefill_tokens_per_dp_rank

    dp = args.attn_dp_size
    over = f" over {dp} DP ranks" if dp > 1 else ""
    limits: List[Tuple[str, int]] = []
    chunk = prefill_tokens_per_dp_rank(args.values(), dp)  # SGLang's split of the global chunk
    if chunk is not None:
        limits.append((f"--chunked-prefill-size {args.chunked_prefill_size}{over}", chunk))
    if args.max_running_requests is not None:
        limits.append((f"--max-running-requests {args.max_running_requests}{over}",
                       -(-args.max_running_requests // dp)))
    if args.cuda_graph_max_bs is not None and not args.disable_cuda_graph:
        limits.append((f"--cuda-graph-max-bs {args.cuda_graph_max_bs}", args.cuda_graph_max_bs))
    if max_step_tokens is not None:
        if isinstance(max_step_tokens, bool) or not isinstance(max_step_tokens, int) or max_step_tokens < 1:
            raise MoeA2AError(f"max_step_tokens={max_step_tokens!r} must be an integer >= 1")
        limits.append((f"max_step_tokens {max_step_tokens}", max_step_tokens))
    if not limits:
        raise MoeA2AError(
            "routed-experts capture needs a bound on the tokens one DP rank forwards in a step "
            "(the device cache rows); fix: pass --chunked-prefill-size (and "
            "--max-running-requests), or capture_sizes(..., max_step_tokens=N)")
    return CaptureSizes(max_tokens_per_step=max(n for _, n in limits),
                        num_token_slots=num_token_slots, limits=tuple(limits))


# ---- requests ----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RoutedExpertsRequest:
    """One request to collect.

    Attributes:
        req_pool_idx: the request's row of ``req_to_token``.
        seqlen: tokens of the sequence, the last one not forwarded yet.
        start_len: first position returned (``0`` = the whole sequence; a multi-turn client
            passes the length it already holds).
        prompt_len: tokens of this turn's prompt; ``start_len`` may not exceed it. None: the
            bound is the forwarded positions, ``seqlen - 1``.
    """

    req_pool_idx: int
    seqlen: int
    start_len: int = 0
    prompt_len: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class RequestRows:
    """A collected request: its rows, or why it was rejected.

    Attributes:
        request: what was asked.
        ids: ``[end - start, L, K]`` int32 logical expert ids (``-1`` padding), or None.
        start / end: positions of the rows.
        num_experts: routed experts of the model (the wire dtype).
        error: the rejection message, or None.
    """

    request: RoutedExpertsRequest
    ids: Optional[torch.Tensor]
    start: int
    end: int
    num_experts: int
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> bytes:
        """The wire blob (``moe_a2a.encode_routed_experts``)."""
        if self.ids is None:
            raise MoeA2AError(f"request {self.request.req_pool_idx} was rejected: {self.error}")
        return encode_routed_experts(self.ids, num_experts=self.num_experts, start=self.start)

    def encode_base64(self) -> str:
        if self.ids is None:
            raise MoeA2AError(f"request {self.request.req_pool_idx} was rejected: {self.error}")
        return encode_routed_experts_base64(self.ids, num_experts=self.num_experts, start=self.start)


def check_request(request: RoutedExpertsRequest, req_to_token: torch.Tensor) -> Tuple[int, int]:
    """``(start, end)`` positions to return, or ``RoutedExpertsRequestError``."""
    idx, seqlen, start_len = request.req_pool_idx, request.seqlen, request.start_len
    who = f"request {idx}"
    if req_to_token.dim() != 2:
        raise MoeA2AError(f"req_to_token has shape {tuple(req_to_token.shape)}; expected "
                          f"[requests, max_context] KV slots")
    if not 0 <= idx < req_to_token.shape[0]:
        raise RoutedExpertsRequestError(f"{who}: req_pool_idx {idx} is outside req_to_token's "
                                        f"{req_to_token.shape[0]} rows")
    if not 1 <= seqlen <= req_to_token.shape[1] + 1:
        raise RoutedExpertsRequestError(
            f"{who}: seqlen {seqlen} must be in [1, {req_to_token.shape[1] + 1}] (the positions "
            f"of req_to_token plus the token not forwarded yet)")
    bound, what = ((request.prompt_len, "the prompt length") if request.prompt_len is not None
                   else (seqlen - 1, "the forwarded positions (seqlen - 1)"))
    if request.prompt_len is not None and not 0 <= request.prompt_len <= seqlen:
        raise RoutedExpertsRequestError(f"{who}: prompt_len {request.prompt_len} must be in "
                                        f"[0, seqlen {seqlen}]")
    if isinstance(start_len, bool) or not isinstance(start_len, int) or not 0 <= start_len <= bound:
        raise RoutedExpertsRequestError(
            f"{who}: routed_experts_start_len {start_len!r} must be in [0, {bound}] ({what}); "
            f"fix: pass the number of leading positions the client already holds, 0 for all")
    end = seqlen - 1
    return min(start_len, end), end


# ---- the capturer ------------------------------------------------------------------------------

class _Staging:
    """Pinned host rows and slots of one step, copied from the device without blocking."""

    def __init__(self, rows: int, layers: int, top_k: int, pinned: bool) -> None:
        self.ids = torch.empty((rows, layers, top_k), dtype=torch.int32, pin_memory=pinned)
        self.slots = torch.empty((rows,), dtype=torch.int64, pin_memory=pinned)
        self.num_tokens = 0
        self.step_index = -1
        self.event: Optional[torch.cuda.Event] = None
        self.busy = False


class RoutedExpertsCapturer(StepObserver):
    """Captures every layer's logical routed experts per token, indexed by KV-cache slot.

    Attributes:
        layer_ids: the layers captured, in column order of ``[.., L, K]`` results.
        top_k: ``K``, routed experts per token (fused shared columns are never captured).
        num_experts: routed (logical) experts.
        gather: the strategy (``none``, ``early``, ``late``) that places rows.
        device_cache: ``[M, L, K]`` int32 on the device; rows ``[0, T)`` = the step's batch.
        host_cache: ``[S, L, K]`` int32 on the host (pinned on CUDA), by KV slot; ``-1`` unwritten.
    """

    def __init__(self, *, sizes: CaptureSizes, layer_ids: Sequence[int], top_k: int,
                 num_experts: int, groups: "CommGroups", gather: str,
                 device: torch.device = torch.device("cpu")) -> None:
        if len(set(layer_ids)) != len(layer_ids) or not layer_ids:
            raise MoeA2AError(f"layer_ids {list(layer_ids)} must be distinct and non-empty")
        self.sizes = sizes
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self._column = {layer: c for c, layer in enumerate(self.layer_ids)}
        self.top_k = int(top_k)
        self.num_experts = int(num_experts)
        self.device = torch.device(device)
        m, layers, k = sizes.max_tokens_per_step, len(self.layer_ids), self.top_k
        self.device_cache = torch.zeros((m, layers, k), dtype=torch.int32, device=self.device)
        pinned = self.device.type == "cuda"
        self.host_cache = torch.full((sizes.num_token_slots, layers, k), PADDING,
                                     dtype=torch.int32, pin_memory=pinned)
        self._staging = [_Staging(m, layers, k, pinned) for _ in range(2)]
        self._next = 0
        self.gather: GatherStrategy = make_gather(gather, self.device_cache, groups,
                                                    self.layer_ids)
        self._seen: List[int] = [0] * layers
        self._step_tokens = 0

    @classmethod
    def for_layers(cls, args: "ServerArgs", ctx: "ParallelContext", layers: Sequence,
                   sizes: Optional[CaptureSizes]) -> Optional["RoutedExpertsCapturer"]:
        """The capturer of a stack's layers when ``--enable-return-routed-experts`` is on."""
        if not args.enable_return_routed_experts:
            if sizes is not None:
                raise MoeA2AError("capture sizes were given but --enable-return-routed-experts is "
                                  "off; fix: enable it or drop capture=")
            return None
        if sizes is None:
            raise MoeA2AError(
                "--enable-return-routed-experts needs the capture buffer sizes; fix: pass "
                "capture=moe_a2a.routed_experts.capture_sizes(args, num_token_slots=<KV slots>) "
                "to MoEStack.build")
        routers = {(layer.router.top_k, layer.router.num_experts) for layer in layers}
        if len(routers) != 1:
            raise MoeA2AError(f"routed-experts capture needs one (top_k, num_experts) for every "
                              f"layer, got {sorted(routers)}")
        (top_k, num_experts), = routers
        return cls(sizes=sizes, layer_ids=[layer.layer_id for layer in layers], top_k=top_k,
                   num_experts=num_experts, groups=ctx.groups, gather=args.routed_experts_gather,
                   device=ctx.device)

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def collectives(self) -> int:
        """All-gathers the gather strategy issued so far."""
        return self.gather.collectives

    # ---- the step (StepObserver) -------------------------------------------------------------

    def on_step_begin(self, step: StepContext) -> None:
        n = step.num_tokens
        # every DP rank's size is agreed: all ranks refuse the same step together, so none is
        # left waiting in a collective
        sizes = step.batch.dp_num_tokens or (n,)
        if max(sizes) > self.sizes.max_tokens_per_step:
            big = max(range(len(sizes)), key=lambda d: sizes[d])
            limits = "; ".join(f"{what} -> {tokens}" for what, tokens in self.sizes.limits)
            raise MoeA2AError(
                f"routed-experts capture: step {step.index} has {sizes[big]} tokens on DP rank "
                f"{big} but the device cache holds {self.sizes.max_tokens_per_step} per DP rank "
                f"({limits}); fix: raise the limit that bounds this batch")
        if n and step.token_slots is None:
            raise MoeA2AError(
                f"routed-experts capture: step {step.index} has {n} tokens but no token_slots; "
                f"fix: pass begin_step(..., token_slots=<[T] KV-cache slot of each token>)")
        if step.token_slots is not None and step.token_slots.device.type == "cpu" and n:
            self._check_slots(step.token_slots, step.index)
        if step.batch.capturing and self.gather.name == "late":
            raise MoeA2AError(
                f"routed-experts capture: step {step.index} runs in a CUDA graph, but the late "
                f"gather collects per-layer slices in Python at step end, which a graph replay "
                f"skips; fix: --routed-experts-gather early (auto picks it when graphs are on)")
        self._seen = [0] * self.num_layers
        self._step_tokens = n
        self.gather.begin_step(n)

    def observe(self, layer_id: int, topk: LogicalTopK, rows: RowSpan, step: StepContext) -> None:
        col = self._column.get(layer_id)
        if col is None:
            raise MoeA2AError(
                f"routed-experts capture: layer {layer_id} is not one of the captured layers "
                f"{list(self.layer_ids)}; a draft (MTP) model needs its own capturer or none")
        ids = topk.ids
        if tuple(ids.shape) != (rows.num_rows, self.top_k) or rows.num_tokens != self._step_tokens:
            raise MoeA2AError(
                f"routed-experts capture: layer {layer_id} reported ids of shape "
                f"{tuple(ids.shape)} for rows [{rows.start}, {rows.stop}) of {rows.num_tokens}; "
                f"expected [{rows.num_rows}, {self.top_k}] logical ids of the step's "
                f"{self._step_tokens} tokens (fused shared columns are never captured)")
        self._seen[col] += 1
        self.gather.observe(col, ids, rows)

    def on_step_end(self, step: StepContext) -> None:
        self.gather.end_step()
        replayed = step.batch.capturing and not any(self._seen)  # kernels ran, Python did not
        if not replayed and any(count != 1 for count in self._seen):
            missing = [self.layer_ids[c] for c, n in enumerate(self._seen) if n == 0]
            repeated = [self.layer_ids[c] for c, n in enumerate(self._seen) if n > 1]
            raise MoeA2AError(
                f"routed-experts capture: step {step.index} ran layers incompletely (never: "
                f"{missing}, more than once: {repeated}); every captured layer must run once per "
                f"step, or the replayed routing would be misaligned")
        n = step.num_tokens
        if n == 0:
            return
        slots = step.token_slots
        if slots is None:  # on_step_begin refuses such a step
            raise MoeA2AError(f"routed-experts capture: step {step.index} has {n} tokens but no "
                              f"token_slots")
        staging = self._staging[self._next]
        if staging.busy:  # two steps ago: its copy has long finished
            self._finalize(staging)
        cuda = self.device.type == "cuda"
        staging.ids[:n].copy_(self.device_cache[:n], non_blocking=cuda)
        staging.slots[:n].copy_(slots, non_blocking=cuda)
        staging.event = None
        if cuda:
            staging.event = torch.cuda.Event()
            staging.event.record()
        staging.num_tokens, staging.step_index, staging.busy = n, step.index, True
        self._next = 1 - self._next

    def finalize(self) -> None:
        """Finish every started copy into the host cache (in step order). ``get_topk`` calls it."""
        for staging in sorted((s for s in self._staging if s.busy), key=lambda s: s.step_index):
            self._finalize(staging)

    def _finalize(self, staging: _Staging) -> None:
        if staging.event is not None:
            staging.event.synchronize()
        n = staging.num_tokens
        slots = staging.slots[:n]
        staging.busy = False
        self._check_slots(slots, staging.step_index)
        self.host_cache[slots] = staging.ids[:n]

    def _check_slots(self, slots: torch.Tensor, step_index: int) -> None:
        low, high = int(slots.min()), int(slots.max())
        if low < 0 or high >= self.sizes.num_token_slots:
            bad = low if low < 0 else high
            raise MoeA2AError(
                f"routed-experts capture: step {step_index} has token slot {bad}, outside the "
                f"host cache's {self.sizes.num_token_slots} slots; fix: size it with "
                f"capture_sizes(num_token_slots=<every KV-cache slot>)")

    # ---- collection --------------------------------------------------------------------------

    def get_topk(self, req_pool_idx: int, seqlen: int, req_to_token: torch.Tensor,
                 start_len: int = 0, *, prompt_len: Optional[int] = None) -> torch.Tensor:
        """A request's routed experts for positions ``[start_len, seqlen - 1)``.

        Args:
            req_pool_idx: the request's row of ``req_to_token``.
            seqlen: the sequence's tokens, the last one not forwarded yet.
            req_to_token: ``[requests, max_context]`` integer KV slot of each position (host or
                device; only the request's row is read).
            start_len: first position returned; must be in ``[0, prompt_len]`` (``prompt_len``
                defaults to ``seqlen - 1``).
        Returns:
            ``[seqlen - 1 - start_len, L, K]`` int32 logical ids on the host (``-1``: a slot
            never written).
        Raises:
            RoutedExpertsRequestError: this request's arguments are invalid.
        """
        request = RoutedExpertsRequest(req_pool_idx=req_pool_idx, seqlen=seqlen,
                                       start_len=start_len, prompt_len=prompt_len)
        return self._read(request, req_to_token)[2]

    def collect(self, requests: Sequence[RoutedExpertsRequest],
                req_to_token: torch.Tensor) -> List[RequestRows]:
        """``get_topk`` for a batch of requests: a rejected request carries its error and
        leaves every other request untouched."""
        out = []
        for request in requests:
            try:
                start, end, ids = self._read(request, req_to_token)
            except RoutedExpertsRequestError as exc:
                out.append(RequestRows(request=request, ids=None, start=0, end=0,
                                       num_experts=self.num_experts, error=str(exc)))
                continue
            out.append(RequestRows(request=request, ids=ids, start=start, end=end,
                                   num_experts=self.num_experts))
        return out

    def _read(self, request: RoutedExpertsRequest,
              req_to_token: torch.Tensor) -> Tuple[int, int, torch.Tensor]:
        start, end = check_request(request, req_to_token)
        self.finalize()
        slots = req_to_token[request.req_pool_idx, start:end].to("cpu", torch.int64)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.sizes.num_token_slots):
            raise RoutedExpertsRequestError(
                f"request {request.req_pool_idx}: req_to_token maps positions [{start}, {end}) "
                f"to slots outside [0, {self.sizes.num_token_slots}); fix: collect only "
                f"positions that were forwarded")
        return start, end, self.host_cache[slots]

    def close(self) -> None:
        """Finish pending copies (the host cache stays readable)."""
        self.finalize()


__all__ = ["CaptureSizes", "PADDING", "RequestRows", "RoutedExpertsCapturer",
           "RoutedExpertsRequest", "RoutedExpertsRequestError", "capture_sizes", "check_request"]
