"""One communicator per process (per EP group and backend): the owner of backend resources.

Kernel libraries allocate large, registered buffers (a DeepEP ``Buffer`` holds NVLink and
RDMA memory; Mega-MoE a symmetric-memory buffer). Such a buffer must exist once per process,
be shared by every MoE layer, and be released explicitly. A :class:`Communicator` is that
owner: the model-level runner builds one, every layer's dispatcher is a thin view of it, and
``close()`` (or leaving its ``with`` block) frees it.

The base class also keeps grow-only scratch buffers (:meth:`scratch`) so that per-step index
and count tensors are allocated once, not once per layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.groups import CommGroups


@dataclass(frozen=True, kw_only=True)
class CommSetup:
    """What a communicator is sized for; every layer it serves must fit it.

    Attributes:
        groups: this process's groups (the EP group is the one the buffers span).
        device: this process's device.
        num_experts: physical experts over all ranks (``E``).
        top_k: columns per token (routed + fused shared columns).
        hidden_size: ``H``.
        dtype: activation dtype.
        settings: the backend's typed settings (a ``moe_a2a.backends.BackendSettings``),
            or None for backends without any.
    """

    groups: CommGroups
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_experts: int
    top_k: int
    hidden_size: int
    dtype: torch.dtype = torch.float32
    settings: Any = None


class Communicator:
    """Per-process resources of one backend; shared by all layers; closed explicitly."""

    def __init__(self, setup: CommSetup) -> None:
        self.setup = setup
        self._scratch: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self._free: Dict[Tuple[Any, ...], List[torch.Tensor]] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self, who: str) -> None:
        if self._closed:
            raise DispatcherError(
                f"{who}: the communicator was closed; fix: build a new MoE stack (a closed "
                f"communicator's buffers are gone)")

    def check_serves(self, groups: CommGroups, device: torch.device, who: str) -> None:
        """A layer may share this communicator only with the same groups and device."""
        if groups is not self.setup.groups and groups != self.setup.groups:
            raise DispatcherError(f"{who}: built for other process groups than its communicator; "
                                  f"fix: build every layer of a stack with the same parallel context")
        if torch.device(device) != torch.device(self.setup.device):
            raise DispatcherError(f"{who}: on device {device} but the communicator is on "
                                  f"{self.setup.device}; fix: build every layer on one device")

    def scratch(self, key: Any, numel: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A reusable flat buffer of at least ``numel`` elements (contents undefined).

        Callers must not hand the buffer (or a view of it) to their caller: it is reused by
        the next call with the same ``key``, possibly from another layer.
        """
        self.check_open("Communicator.scratch")
        slot = (key, dtype, torch.device(device))
        buf = self._scratch.get(slot)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(int(numel), 64), dtype=dtype, device=device)
            self._scratch[slot] = buf
        return buf[:numel]

    def arange(self, n: int, device: torch.device) -> torch.Tensor:
        """``torch.arange(n)`` (int64) from a cached, grow-only grid."""
        slot = ("__arange__", torch.int64, torch.device(device))
        buf = self._scratch.get(slot)
        if buf is None or buf.numel() < n:
            buf = torch.arange(max(int(n), 64), dtype=torch.int64, device=device)
            self._scratch[slot] = buf
        return buf[:n]

    def lease(self, key: Any, numel: int, dtype: torch.dtype,
              device: torch.device) -> "BufferLease":
        """A flat buffer of at least ``numel`` elements that the caller holds until it calls
        ``release()`` on the lease; released buffers are handed to later leases of ``key``.

        For buffers that outlive a call (a dispatcher's received rows, released by its
        ``combine``): two leases held at once never share memory, so overlapping micro-batches
        stay safe, while steady-state steps reuse the same memory (on CPU a fresh large tensor
        costs a page fault per 4 KiB page on first touch; CUDA's caching allocator hides that).
        """
        self.check_open("Communicator.lease")
        free = self._free.setdefault((key, dtype, torch.device(device)), [])
        while free:
            buf = free.pop()
            if buf.numel() >= numel:
                return BufferLease(buf[:numel], free)
        return BufferLease(torch.empty(max(int(numel), 64), dtype=dtype, device=device)[:numel], free)

    def close(self) -> None:
        """Release every resource; idempotent. Subclasses release theirs, then call this."""
        self._scratch.clear()
        self._free.clear()
        self._closed = True

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BufferLease:
    """A buffer held by its caller until ``release()`` (idempotent) gives it back.

    Attributes:
        buffer: the flat buffer (exactly the requested number of elements; a view of a
            possibly larger allocation). Do not use it after ``release()``.
    """

    #: released buffers kept per key (more in flight at once are simply allocated)
    MAX_FREE = 4

    __slots__ = ("buffer", "_free")

    def __init__(self, buffer: torch.Tensor, free: List[torch.Tensor]) -> None:
        self.buffer = buffer
        self._free: Optional[List[torch.Tensor]] = free

    def release(self) -> None:
        free, self._free = self._free, None
        if free is not None and len(free) < self.MAX_FREE:
            base = self.buffer._base if self.buffer._base is not None else self.buffer
            free.append(base)


__all__ = ["BufferLease", "CommSetup", "Communicator"]
