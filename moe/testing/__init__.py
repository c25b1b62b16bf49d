"""Helpers for testing code built on moe-a2a on a CPU: a reusable pool of gloo ranks."""

from moe_a2a.testing.distributed import RankFailed, RankPool

__all__ = ["RankFailed", "RankPool"]
