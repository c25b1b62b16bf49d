"""``moe-a2a run --enable-return-routed-experts``: simulated requests, every returned row checked.

Each DP rank turns its steps' tokens into requests, the way a scheduler with chunked prefill
does: a stream of positions, request after request, cut into the step batches (a step may end
one request and start the next). Requests have different lengths; every third one reuses a
prefix of the previous request's KV slots (a prefix-cache hit: those positions are not forwarded
again, and their rows must come back as written earlier). Slots come from a shuffled pool
through a small ``req_to_token`` table, with spare slots never written.

While the layers run, the single-process oracle routes each layer's input and the expected ids
(and the oracle's selection scores) are stored by KV slot. After the last step every request is
collected with a ``start_len`` from a cycle: 0, the middle of the prompt, the prompt length, -1
and one beyond the prompt; the last two must be rejected, alone. Each returned row must equal
the oracle's, column for column (transformers' routers do not sort their columns: compared as
sets there). Where they differ only a tie is accepted: the oracle's selection scores of the
captured ids equal those of its own choice within ``TIE_TOL`` (the layer's router GEMM runs on
another row count than the oracle's and rounds differently); ties are counted apart. Each blob
also round-trips through the wire format.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from moe_a2a.errors import MoeA2AError
from moe_a2a.routed_experts import (CaptureSizes, RequestRows, RoutedExpertsCapturer,
                                    RoutedExpertsRequest, capture_sizes)
from moe_a2a.routed_experts_wire import decode_routed_experts
from moe_a2a.routing import RouterConfig, route
from moe_a2a.run_plan import derived_seed

#: Selection scores (sigmoid or softmax, plus bias; values around 1) within this count as a tie.
TIE_TOL = 1e-5

#: Spare KV slots per DP rank that no token is written to (their host rows stay -1).
SPARE_SLOTS = 8


@dataclass(frozen=True)
class SimRequest:
    """One simulated request of a DP rank: positions ``[0, length)`` forwarded, the first
    ``shared`` of them through a prefix-cache hit on request ``prefix_of``."""

    req_pool_idx: int
    length: int
    prompt_len: int
    start_len: int
    shared: int = 0
    prefix_of: Optional[int] = None

    @property
    def valid(self) -> bool:
        return 0 <= self.start_len <= self.prompt_len

    def to_request(self) -> RoutedExpertsRequest:
        return RoutedExpertsRequest(req_pool_idx=self.req_pool_idx, seqlen=self.length + 1,
                                    start_len=self.start_len, prompt_len=self.prompt_len)


def simulate_requests(step_tokens: Sequence[int], *, seed: int, dp_rank: int,
                      max_step: int) -> List[SimRequest]:
    """Requests whose new (not prefix-cached) positions add up to ``sum(step_tokens)``."""
    gen = torch.Generator().manual_seed(derived_seed(seed, 65_537, dp_rank * 613 + 17))

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    remaining = sum(step_tokens)
    requests: List[SimRequest] = []
    while remaining > 0:
        i = len(requests)
        shared, prefix_of = 0, None
        if i % 3 == 2 and requests[-1].length > 1:
            prefix_of = i - 1
            shared = draw(1, requests[-1].length - 1)
        new = min(remaining, draw(1, max(1, max_step // 2)))
        remaining -= new
        length = shared + new
        prompt_len = max(shared, length - draw(0, min(3, length - 1)))
        start_len = (0, prompt_len // 2, prompt_len, -1, prompt_len + 1)[i % 5]
        requests.append(SimRequest(i, length, prompt_len, start_len, shared, prefix_of))
    return requests


class RequestTable:
    """KV slots of the simulated requests: ``req_to_token`` and the order positions run in."""

    def __init__(self, requests: Sequence[SimRequest], *, seed: int, dp_rank: int) -> None:
        fresh = sum(r.length - r.shared for r in requests)
        self.num_slots = fresh + SPARE_SLOTS
        gen = torch.Generator().manual_seed(derived_seed(seed, 7_919, dp_rank))
        pool = torch.randperm(self.num_slots, generator=gen)
        width = max((r.length for r in requests), default=0) + 1
        #: [requests, max_length + 1] int64 KV slot of each position, -1 where none
        self.req_to_token = torch.full((max(1, len(requests)), width), -1, dtype=torch.int64)
        stream: List[int] = []
        for r in requests:
            if r.prefix_of is not None:
                self.req_to_token[r.req_pool_idx, :r.shared] = self.req_to_token[r.prefix_of, :r.shared]
            n = r.length - r.shared
            self.req_to_token[r.req_pool_idx, r.shared:r.length] = pool[len(stream):len(stream) + n]
            stream.extend(pool[len(stream):len(stream) + n].tolist())
        #: [sum of new positions] int64 slots in the order the steps forward them
        self.stream = torch.tensor(stream, dtype=torch.int64)


@dataclass(frozen=True)
class ReferenceRouting:
    """The oracle's routing of one layer input: ``ids [T, K]`` int64, the selection scores
    ``[T, E]`` float32 it chose by (without group masking), and whether columns are sorted."""

    ids: torch.Tensor
    scores: torch.Tensor
    ordered: bool


class RouterOracle:
    """The reference router of one layer: ``moe_a2a.routing.route`` on the single-process
    logits, or, for a transformers block, the block's own gate."""

    def __init__(self, weights: Any, router: Optional[RouterConfig], hf_block: Any) -> None:
        self.hf_block = hf_block
        if hf_block is not None:
            from moe_a2a.hf import extract_moe

            weights, router = extract_moe(hf_block)
        if router is None:
            raise MoeA2AError("RouterOracle needs a router or a transformers block")
        self.router = router
        self.gate = weights.gate.float()
        self.bias = (weights.correction_bias.float() if router.has_correction_bias else None)

    def __call__(self, x: torch.Tensor) -> ReferenceRouting:
        x = x.float()
        logits = x @ self.gate.to(x.device).t()
        scores = logits.softmax(-1) if self.router.scoring == "softmax" else logits.sigmoid()
        bias = None if self.bias is None else self.bias.to(x.device)
        if bias is not None:
            scores = scores + bias
        if self.hf_block is None:
            return ReferenceRouting(route(logits, self.router, bias).ids, scores, True)
        with torch.no_grad():
            out = self.hf_block.gate(x)
        ints = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        if not ints:
            raise MoeA2AError(f"{type(self.hf_block.gate).__name__} returned no expert indices")
        return ReferenceRouting(ints[-1].reshape(x.shape[0], -1).long(), scores, False)


def compare_rows(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor,
                 ordered: bool) -> Dict[str, int]:
    """Rows ``[N, K]`` of captured vs reference ids with the reference's scores ``[N, E]``:
    ``{"exact", "ties", "mismatches"}`` row counts."""
    got = got.long()
    if not ordered:
        got, want = got.sort(-1).values, want.sort(-1).values
    exact = (got == want).all(-1)
    valid = (got >= 0).all(-1) & (got < scores.shape[-1]).all(-1)
    got_scores = scores.gather(-1, got.clamp(0, scores.shape[-1] - 1))
    want_scores = scores.gather(-1, want.clamp(0, scores.shape[-1] - 1))
    if not ordered:
        got_scores, want_scores = got_scores.sort(-1).values, want_scores.sort(-1).values
    tie = ~exact & valid & ((got_scores - want_scores).abs() <= TIE_TOL).all(-1)
    n = int(exact.numel())
    return {"exact": int(exact.sum()), "ties": int(tie.sum()),
            "mismatches": n - int(exact.sum()) - int(tie.sum())}


class CaptureJob:
    """The routed-experts part of one rank of ``moe-a2a run``."""

    def __init__(self, step_tokens: Sequence[int], *, args: Any, seed: int, dp_rank: int,
                 max_step: int, num_layers: int) -> None:
        self.step_tokens = list(step_tokens)
        self.offsets = [sum(self.step_tokens[:s]) for s in range(len(self.step_tokens))]
        self.dp_rank = dp_rank
        self.requests = simulate_requests(step_tokens, seed=seed, dp_rank=dp_rank,
                                          max_step=max_step)
        self.table = RequestTable(self.requests, seed=seed, dp_rank=dp_rank)
        self.sizes: CaptureSizes = capture_sizes(args, num_token_slots=self.table.num_slots,
                                                 max_step_tokens=max(1, max_step))
        self.num_layers = num_layers
        # by KV slot, allocated at the first expectation: [S, L, K] ids, [S, L, E] scores
        self.expected: Optional[torch.Tensor] = None
        self.scores: Optional[torch.Tensor] = None
        self.ordered = True
        self._oracles: Dict[int, RouterOracle] = {}

    def step_slots(self, step: int) -> torch.Tensor:
        """``[T]`` int64 KV slots of this DP rank's tokens in ``step``."""
        start = self.offsets[step]
        return self.table.stream[start:start + self.step_tokens[step]]

    def expect(self, step: int, column: int, oracle: Any, x: torch.Tensor) -> None:
        """Route layer ``column``'s input ``x [T, H]`` with the oracle; store it by slot."""
        if x.shape[0] == 0:
            return
        ref = self._oracle(column, oracle)(x)
        if self.expected is None or self.scores is None:  # allocated together
            self.expected = torch.full((self.table.num_slots, self.num_layers, ref.ids.shape[1]),
                                       -1, dtype=torch.int64)
            self.scores = torch.zeros((self.table.num_slots, self.num_layers, ref.scores.shape[1]))
        slots = self.step_slots(step)
        self.expected[slots, column] = ref.ids.cpu()
        self.scores[slots, column] = ref.scores.cpu()
        self.ordered = ref.ordered

    def _oracle(self, column: int, oracle: Any) -> RouterOracle:
        if column not in self._oracles:
            self._oracles[column] = RouterOracle(oracle.weights, oracle.router, oracle.hf_block)
        return self._oracles[column]

    def check(self, capturer: RoutedExpertsCapturer) -> "CaptureReport":
        """Collect every request and compare it with the oracle."""
        report = CaptureReport()
        results = capturer.collect([r.to_request() for r in self.requests], self.table.req_to_token)
        for sim, rows in zip(self.requests, results):
            report.add(sim, rows, self)
        return report


@dataclass
class CaptureReport:
    """Counts over one rank's requests, and their records for ``--routed-experts-output``."""

    requests: int = 0
    rows: int = 0
    ties: int = 0
    mismatches: int = 0
    rejected: int = 0
    wrongly_rejected: int = 0
    wrongly_accepted: int = 0

    def __post_init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.first_problem: Optional[str] = None

    def add(self, sim: SimRequest, rows: RequestRows, job: CaptureJob) -> None:
        self.requests += 1
        record: Dict[str, Any] = {"dp_rank": job.dp_rank, "req_pool_idx": sim.req_pool_idx,
                                  "seqlen": sim.length + 1, "prompt_len": sim.prompt_len,
                                  "start_len": sim.start_len, "prefix_of": sim.prefix_of,
                                  "shared_prefix": sim.shared}
        self.records.append(record)
        if not sim.valid:
            if rows.ok:
                self.wrongly_accepted += 1
                self._problem(f"request {sim.req_pool_idx}: start_len {sim.start_len} outside "
                              f"[0, {sim.prompt_len}] was accepted")
            else:
                self.rejected += 1
            record["error"] = rows.error
            return
        if not rows.ok:
            self.wrongly_rejected += 1
            self._problem(f"request {sim.req_pool_idx} was rejected: {rows.error}")
            record["error"] = rows.error
            return
        start, end = min(sim.start_len, sim.length), sim.length
        slots = job.table.req_to_token[sim.req_pool_idx, start:end]
        got = rows.ids
        if got is None or job.expected is None or job.scores is None:
            self.mismatches += max(1, end - start)
            self._problem(f"request {sim.req_pool_idx}: " + (
                "accepted without ids" if got is None else "checked before any step ran"))
            return
        want, scores = job.expected[slots], job.scores[slots]
        if (rows.start, rows.end) != (start, end) or tuple(got.shape) != tuple(want.shape):
            self.mismatches += max(1, end - start)
            self._problem(f"request {sim.req_pool_idx}: rows [{rows.start}, {rows.end}) of shape "
                          f"{tuple(got.shape)}; expected [{start}, {end}) {tuple(want.shape)}")
            return
        flat = compare_rows(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]),
                            scores.reshape(-1, scores.shape[-1]), job.ordered)
        blob = rows.encode()
        back = decode_routed_experts(blob)
        if not (torch.equal(back.ids, got) and (back.start, back.end) == (start, end)):
            flat["mismatches"] += 1
            self._problem(f"request {sim.req_pool_idx}: the wire round trip changed the rows")
        self.rows += end - start
        self.ties += flat["ties"]
        self.mismatches += flat["mismatches"]
        if flat["mismatches"]:
            self._problem(f"request {sim.req_pool_idx}: {flat['mismatches']} (position, layer) "
                          f"rows differ from the reference router")
        record.update(start=start, end=end, rows=end - start,
                      blob=base64.b64encode(blob).decode("ascii"))

    def _problem(self, text: str) -> None:
        if self.first_problem is None:
            self.first_problem = text

    @property
    def failures(self) -> int:
        return self.mismatches + self.wrongly_accepted + self.wrongly_rejected


def finish(job: Optional[CaptureJob], capturer: Optional[RoutedExpertsCapturer], *, args: Any,
           attn_tp_rank: int, world_size: int, device: torch.device,
           output: Optional[str], rank: int) -> Dict[str, Any]:
    """Check this rank's requests, reduce the counts over the job, write the output on rank 0.

    Every rank checks its own copy (attention-TP ranks of one DP rank must all hold the same
    rows); rows and requests are counted once per DP rank, failures on every rank.
    """
    if job is None or capturer is None:
        return {"routed_experts_checked": 0, "routed_experts_gather": None}
    report = job.check(capturer)
    once = 1 if attn_tp_rank == 0 else 0
    counts = torch.tensor([report.rows * once, report.requests * once, report.rejected * once,
                           report.ties * once, report.failures], dtype=torch.float64)
    records = report.records if once else []
    gathered: List[Any] = [records]
    problems: List[Any] = [report.first_problem]
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
        gathered = [None] * world_size
        problems = [None] * world_size
        dist.all_gather_object(gathered, records)
        dist.all_gather_object(problems, report.first_problem)
    rows, requests, rejected, ties, failures = (int(v) for v in counts.tolist())
    summary = {
        "routed_experts_checked": rows,
        "routed_experts_gather": args.routed_experts_gather,
        "routed_experts_requests": requests,
        "routed_experts_rejected": rejected,
        "routed_experts_ties": ties,
        "routed_experts_failures": failures,
        "routed_experts_collectives": capturer.collectives,
        "routed_experts_first_problem": next((p for p in problems if p), None),
    }
    if output and rank == 0:
        write_output(output, [r for part in gathered for r in part], capturer, args)
        summary["routed_experts_output"] = output
    return summary


def write_output(path: str, records: List[Dict[str, Any]], capturer: RoutedExpertsCapturer,
                 args: Any) -> None:
    """One JSON file: the wire-format blobs (base64) with an index of what each one holds."""
    from moe_a2a.routed_experts_wire import VERSION

    doc = {
        "format": "moe-a2a routed experts",
        "wire_version": VERSION,
        "encoding": "base64 of the wire blob (https://github.com/moe-a2a/moe-a2a/blob/main/docs/"
                    "routed-experts.md#wire-format)",
        "num_experts": capturer.num_experts,
        "num_layers": capturer.num_layers,
        "top_k": capturer.top_k,
        "layer_ids": list(capturer.layer_ids),
        "gather": args.routed_experts_gather,
        "backend": args.moe_a2a_backend,
        "requests": sorted(records, key=lambda r: (r["dp_rank"], r["req_pool_idx"])),
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


__all__ = ["CaptureJob", "CaptureReport", "ReferenceRouting", "RequestTable", "RouterOracle",
           "SimRequest", "TIE_TOL", "compare_rows", "finish", "simulate_requests", "write_output"]
