"""Expert-parallel load balancing (EPLB) and fused shared experts.

* ``location``: ``ExpertLocation`` (physical → logical ``[L, P]``, logical → all physical
  ``[L, E, R]``, replica counts), trivial / mapping / counts initialisation.
* ``rebalance``: the DeepSeek-style algorithm (replicate, then balanced packing; hierarchical
  by node).
* ``dispatch``: ``static`` / ``dynamic`` replica choice (``ReplicaDispatch``).
* ``shared``: the interleaved layout of fused shared experts (``fuse_shared_experts``).
* ``waterfill``: each token's shared expert on the least-loaded rank.
* ``remap``: ``EPLBRemap``, the ``TopKRemap`` that chains them per layer.
* ``recorder``: ``ExpertDistributionRecorder``, the logical-count observer.
* ``manager`` / ``transfer``: rebalance every N forwards, moving weights between ranks.
* ``runtime``: ``build_eplb_stack``, all of it wired from the server arguments.

See docs/eplb.md.
"""

from moe_a2a.eplb.dispatch import ReplicaDispatch, static_dispatch_table
from moe_a2a.eplb.location import ExpertLocation, initial_location, physical_count_error, utilization
from moe_a2a.eplb.manager import EPLBManager, RebalanceReport
from moe_a2a.eplb.rebalance import balanced_packing, choose_algorithm, rebalance, replicate
from moe_a2a.eplb.recorder import DistributionDump, ExpertDistributionRecorder
from moe_a2a.eplb.remap import EPLBRemap, RemapState, SharedColumns
from moe_a2a.eplb.runtime import EPLBConfig, EPLBRuntime, build_eplb, build_eplb_stack
from moe_a2a.eplb.shared import FusedTopK, fuse_shared_experts, shared_column_weight
from moe_a2a.eplb.waterfill import waterfill_ranks

__all__ = [
    "DistributionDump", "EPLBConfig", "EPLBManager", "EPLBRemap", "EPLBRuntime", "ExpertDistributionRecorder",
    "ExpertLocation", "FusedTopK", "RebalanceReport", "RemapState", "ReplicaDispatch", "SharedColumns",
    "balanced_packing", "build_eplb", "build_eplb_stack", "choose_algorithm", "fuse_shared_experts",
    "initial_location", "physical_count_error", "rebalance", "replicate", "shared_column_weight",
    "static_dispatch_table", "utilization", "waterfill_ranks",
]
