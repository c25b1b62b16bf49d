"""EPLB on one process: placements, rebalancing, replica dispatch, fused shared experts,
Waterfill, the recorder, weight moves; property tests with hypothesis."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.dispatchers.batch import BatchInfo
from moe_a2a.eplb import (
    EPLBConfig,
    ExpertDistributionRecorder,
    ExpertLocation,
    ReplicaDispatch,
    RemapState,
    SharedColumns,
    balanced_packing,
    build_eplb_stack,
    choose_algorithm,
    fuse_shared_experts,
    initial_location,
    physical_count_error,
    rebalance,
    replicate,
    shared_column_weight,
    static_dispatch_table,
    utilization,
    waterfill_ranks,
)
from moe_a2a.eplb.manager import better_location
from moe_a2a.eplb.shared import fused_physical_weights, shared_slots_needed
from moe_a2a.eplb.transfer import move_expert_weights, plan_moves
from moe_a2a.errors import MoeA2AError
from moe_a2a.experts import swiglu
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.routing import LogicalTopK, RouterConfig
from moe_a2a.server_args import resolve
from moe_a2a.step import RowSpan, StepContext
from moe_a2a.weights import MoEWeights

# ---- the physical expert count ---------------------------------------------------------------


def test_physical_count_error_names_the_nearest_valid_counts():
    message = physical_count_error(16, 3, 4)
    assert "16 + ep_num_redundant_experts 3 = 19 physical experts cannot be split over ep 4" in message
    assert message.endswith("use ep_num_redundant_experts 0 or 4")
    assert physical_count_error(16, 1, 4).endswith("0 or 4")
    assert physical_count_error(18, 0, 4).endswith("use ep_num_redundant_experts 2")  # no -2
    assert physical_count_error(16, 0, 4) is None and physical_count_error(16, 8, 4) is None


# ---- locations -------------------------------------------------------------------------------


def test_trivial_location_tables():
    loc = ExpertLocation.trivial(2, 4, 4, 4)
    assert loc.physical_to_logical.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2
    assert loc.logical_to_all_physical[0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert loc.replica_counts.tolist() == [[2, 2, 2, 2]] * 2
    assert (loc.num_layers, loc.num_physical_experts, loc.num_local_physical_experts) == (2, 8, 2)
    one = ExpertLocation.trivial(1, 6, 2, 4)
    assert one.logical_to_all_physical[0].tolist() == [[0, 6], [1, 7], [2, -1], [3, -1], [4, -1], [5, -1]]


def test_mapping_is_checked():
    with pytest.raises(MoeA2AError, match="layer 0 has no replica of logical expert 3"):
        ExpertLocation.from_mapping([[0, 1, 2, 2]], 4, 2)
    with pytest.raises(MoeA2AError, match=r"\[0\]\[1\] = 9 is not a logical expert id"):
        ExpertLocation.from_mapping([[0, 9, 2, 3]], 4, 2)
    with pytest.raises(MoeA2AError, match="5 physical experts cannot be split over ep 2"):
        ExpertLocation.from_mapping([[0, 1, 2, 3, 0]], 4, 2)
    with pytest.raises(MoeA2AError, match="has 1 layers but the model has 2"):
        ExpertLocation.from_mapping([[0, 1, 2, 3]], 4, 2, num_layers=2)
    with pytest.raises(MoeA2AError, match="dtype"):
        ExpertLocation.from_mapping([[0.0, 1.0]], 2, 2)
    row = ExpertLocation.from_mapping([3, 2, 1, 0], 4, 2, num_layers=3)  # one row for every layer
    assert row.physical_to_logical.tolist() == [[3, 2, 1, 0]] * 3
    assert row.logical_to_all_physical[:, :, 0].tolist() == [[3, 2, 1, 0]] * 3


def test_initial_location_from_text_json_and_pt(tmp_path):
    mapping = {"physical_to_logical_map": [[1, 0, 2, 3, 1, 0]] * 2}
    loc = initial_location(json.dumps(mapping), num_layers=2, num_logical_experts=4,
                           num_redundant=2, ep_size=2)
    assert loc.physical_to_logical.tolist() == mapping["physical_to_logical_map"]
    counts = {"logical_count": [[[50, 1, 1, 1]] * 2, [[50, 1, 1, 1]] * 2]}  # [steps, layers, E]
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(counts))
    by_counts = initial_location(str(path), num_layers=2, num_logical_experts=4, num_redundant=2,
                                 ep_size=2)
    assert by_counts.replica_counts[:, 0].tolist() == [3, 3]
    pt = tmp_path / "map.pt"
    torch.save({"physical_to_logical_map": torch.tensor(mapping["physical_to_logical_map"])}, pt)
    assert torch.equal(initial_location(str(pt), num_layers=2, num_logical_experts=4,
                                        num_redundant=2, ep_size=2).physical_to_logical,
                       loc.physical_to_logical)
    with pytest.raises(MoeA2AError, match="fix: set --ep-num-redundant-experts 2"):
        initial_location(json.dumps(mapping), num_layers=2, num_logical_experts=4, num_redundant=0,
                         ep_size=2)
    with pytest.raises(MoeA2AError, match="needs physical_to_logical_map or logical_count"):
        initial_location('{"x": 1}', num_layers=2, num_logical_experts=4, num_redundant=0, ep_size=2)
    with pytest.raises(MoeA2AError, match="19 physical experts cannot be split over ep 4"):
        initial_location("trivial", num_layers=1, num_logical_experts=16, num_redundant=3, ep_size=4)


def test_gpu_load_and_utilization():
    loc = ExpertLocation.from_mapping([[0, 0, 1, 2]], 3, 2)  # expert 0 on both slots of GPU 0
    share = loc.gpu_share()
    assert torch.allclose(share.sum(-1), torch.ones(1, 3, dtype=torch.float64))
    load = loc.gpu_load(torch.tensor([[10, 4, 6]]))
    assert load.tolist() == [[10.0, 10.0]]
    assert utilization(load).tolist() == [1.0]
    assert utilization(torch.tensor([[8.0, 0, 0, 0]])).tolist() == [0.25]
    assert utilization(torch.zeros(1, 4)).tolist() == [1.0]  # nothing ran: no imbalance


# ---- rebalancing -----------------------------------------------------------------------------


def test_replicate_gives_slots_to_the_highest_load_per_replica():
    slot_expert, replicas = replicate(torch.tensor([[10.0, 1, 1, 1]]), 6)
    assert slot_expert.tolist() == [[0, 1, 2, 3, 0, 0]] and replicas.tolist() == [[3, 1, 1, 1]]
    slot_expert, replicas = replicate(torch.tensor([[6.0, 5, 1]]), 5)
    # 6/1 → expert 0; then 5/1 > 6/2 → expert 1; then 6/2 = 3 > 5/2
    assert slot_expert.tolist() == [[0, 1, 2, 0, 1]] and replicas.tolist() == [[2, 2, 1]]


def test_balanced_packing_heaviest_first_onto_the_lightest_pack():
    pack, position = balanced_packing(torch.tensor([[4.0, 4, 1, 3, 3, 3]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0, 1, 0]]
    assert position.tolist() == [[0, 0, 2, 1, 1, 2]]
    with pytest.raises(MoeA2AError, match="cannot fill 4 equal packs"):
        balanced_packing(torch.ones(1, 6), 4)


def test_choose_algorithm():
    assert choose_algorithm("auto", 8, 2) == "deepseek_hierarchical"
    assert choose_algorithm("auto", 6, 4) == "deepseek"
    assert choose_algorithm("auto", None, 1) == "deepseek"
    assert choose_algorithm("deepseek", 8, 1) == "deepseek"
    with pytest.raises(MoeA2AError, match="unknown"):
        choose_algorithm("greedy", 8, 1)


def test_hierarchical_keeps_each_group_and_its_replicas_in_one_node():
    gen = torch.Generator().manual_seed(3)
    load = torch.rand(3, 16, generator=gen) * 100
    load[:, 5] = 1000.0
    p2l = rebalance(load, 24, 4, num_groups=4, num_nodes=2)
    loc = ExpertLocation.from_mapping(p2l, 16, 4)
    per_node = 24 // 2
    for layer in range(3):
        node_of = {}
        for slot, expert in enumerate(p2l[layer].tolist()):
            node_of.setdefault(expert // 4, set()).add(slot // per_node)  # group → nodes
        assert all(len(nodes) == 1 for nodes in node_of.values())
    assert (loc.replica_counts[:, 5] >= 2).all()
    with pytest.raises(MoeA2AError, match="cannot be split over 3 nodes"):
        rebalance(load, 24, 4, num_groups=4, num_nodes=3)


def test_rebalance_spreads_a_hot_expert():
    load = torch.tensor([[100.0] + [1.0] * 15])
    trivial = ExpertLocation.trivial(1, 16, 4, 4)
    new = ExpertLocation.from_counts(load, 20, 4, algorithm="deepseek")
    assert int(new.replica_counts[0, 0]) == 5
    assert float(utilization(new.gpu_load(load))) > float(utilization(trivial.gpu_load(load)))


@st.composite
def _placements(draw):
    ep = draw(st.sampled_from([1, 2, 4]))
    experts = ep * draw(st.integers(1, 4))
    redundant = ep * draw(st.integers(0, 2))
    layers = draw(st.integers(1, 3))
    counts = draw(st.lists(st.lists(st.integers(0, 1000), min_size=experts, max_size=experts),
                           min_size=layers, max_size=layers))
    return ep, experts, redundant, torch.tensor(counts, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(_placements(), st.sampled_from(["deepseek", "auto"]))
def test_property_every_logical_expert_has_a_replica_and_results_repeat(case, algorithm):
    ep, experts, redundant, counts = case
    groups = 2 if experts % 2 == 0 else 1
    a = ExpertLocation.from_counts(counts, experts + redundant, ep, algorithm=algorithm, num_groups=groups)
    b = ExpertLocation.from_counts(counts.clone(), experts + redundant, ep, algorithm=algorithm,
                                   num_groups=groups)
    assert (a.replica_counts >= 1).all() and (a.replica_counts.sum(1) == experts + redundant).all()
    assert torch.equal(a.physical_to_logical, b.physical_to_logical)  # deterministic


@settings(max_examples=60, deadline=None)
@given(_placements(), _placements())
def test_property_a_rebalance_never_raises_the_busiest_gpu(first, second):
    ep, experts, redundant, counts = first
    current = ExpertLocation.from_counts(counts, experts + redundant, ep)
    other = second[3]
    new_counts = (other.repeat(1, experts)[:, :experts] if other.shape[1] < experts
                  else other[:, :experts])[:1].repeat(current.num_layers, 1)
    new = better_location(current, new_counts, algorithm="deepseek", num_groups=None, num_nodes=1)
    before = current.gpu_load(new_counts).max(dim=1).values
    after = new.gpu_load(new_counts).max(dim=1).values
    assert (after <= before).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=3, max_size=8), st.integers(0, 6))
def test_property_more_replicas_never_raise_the_load_per_replica(load, extra):
    load = torch.tensor([load], dtype=torch.float64)
    worst = []
    for slots in range(load.shape[1], load.shape[1] + extra + 1):
        _, replicas = replicate(load, slots)
        worst.append(float((load / replicas).max()))
    assert all(b <= a for a, b in zip(worst, worst[1:]))


# ---- replica dispatch ------------------------------------------------------------------------


def _two_copies():
    # ep 4, 2 slots per GPU: logical 0 on slots 2 (GPU 1) and 6 (GPU 3)
    return ExpertLocation.from_mapping([[1, 2, 0, 3, 4, 5, 0, 6]], 7, 4)


def test_static_prefers_the_same_gpu_then_spreads_over_the_node():
    loc = _two_copies()
    tables = [static_dispatch_table(loc, r)[0].tolist() for r in range(4)]
    assert tables[1][0] == 2 and tables[3][0] == 6          # own copies
    assert {tables[0][0], tables[2][0]} == {2, 6}           # spread, not both to the first copy
    for table in tables:  # every logical expert maps to one of its own slots
        assert [int(loc.physical_to_logical[0, p]) for p in table] == list(range(7))
    two_nodes = [static_dispatch_table(loc, r, num_nodes=2)[0, 0].item() for r in range(4)]
    assert two_nodes == [2, 2, 6, 6]                        # same node first
    with pytest.raises(MoeA2AError, match="cannot be split over 3 nodes"):
        static_dispatch_table(loc, 0, num_nodes=3)


def test_replicated_layout_choices_do_not_depend_on_the_rank():
    loc = _two_copies()
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 4]])
    for algorithm in ("static", "dynamic"):
        picks = [ReplicaDispatch(loc, algorithm=algorithm, per_rank=False, ep_rank=r)(ids, 0, 5)
                 for r in range(4)]
        assert all(torch.equal(p, picks[0]) for p in picks)
        assert (loc.physical_to_logical[0][picks[0]] == ids).all()
    static = ReplicaDispatch(loc, algorithm="static", per_rank=False, ep_rank=0)(ids, 0, 0)
    assert set(static[:, 0].tolist()) == {2, 6}             # rows take turns


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 1000))
def test_property_dynamic_is_deterministic_by_seed_and_step(seed, step):
    loc = _two_copies()
    ids = torch.zeros(256, 2, dtype=torch.int64)
    one = ReplicaDispatch(loc, algorithm="dynamic", per_rank=True, ep_rank=1, seed=seed)
    two = ReplicaDispatch(loc, algorithm="dynamic", per_rank=True, ep_rank=1, seed=seed)
    a, b = one(ids, 0, step), two(ids, 0, step)
    assert torch.equal(a, b)
    assert set(a.flatten().tolist()) == {2, 6}              # both replicas used
    assert 0.35 < float((a == 2).float().mean()) < 0.65     # about evenly
    assert not torch.equal(a, one(ids, 0, step + 1)) or not torch.equal(a, one(ids, 0, step + 2))


def test_dispatch_tables_update_in_place():
    dispatch = ReplicaDispatch(_two_copies(), algorithm="static", per_rank=True, ep_rank=0)
    tables = (dispatch.table, dispatch.all_physical, dispatch.counts)
    assert dispatch.all_physical.shape == (1, 7, 2)          # 1 + redundant replicas wide
    dispatch.update(ExpertLocation.from_mapping([[0, 0, 1, 2, 3, 4, 5, 6]], 7, 4))
    assert all(a is b for a, b in zip(tables, (dispatch.table, dispatch.all_physical, dispatch.counts)))
    assert dispatch(torch.tensor([[0, 6]]), 0, 0).tolist() == [[0, 7]]  # rank 0 now holds expert 0
    with pytest.raises(MoeA2AError, match="must keep the layers and physical experts"):
        dispatch.update(ExpertLocation.trivial(1, 7, 5, 4))


def test_unknown_dispatch_algorithm():
    with pytest.raises(MoeA2AError, match="unknown"):
        ReplicaDispatch(_two_copies(), algorithm="random", per_rank=True, ep_rank=0)


# ---- fused shared experts --------------------------------------------------------------------


def test_known_vector_ep8_rank7():
    ids = torch.tensor([[0, 33, 263]])
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    fused = fuse_shared_experts(ids, weights, num_physical_routed_experts=264, ep_size=8,
                                target_rank=7, shared_weight=shared_column_weight(2.5, True))
    assert fused.dispatch_ids.tolist() == [[0, 34, 270, 271]]
    assert fused.recorder_ids.tolist() == [[0, 33, 263]]
    assert torch.allclose(fused.dispatch_weights, torch.tensor([[0.5, 0.3, 0.2, 0.4]]))
    # this library's router already applies the scaling factor: the column weighs 1.0
    assert shared_column_weight(2.5) == 1.0


def test_fused_columns_follow_empty_tokens_and_several_slots():
    ids = torch.tensor([[5, -1], [-1, -1]])
    fused = fuse_shared_experts(ids, torch.ones(2, 2), num_physical_routed_experts=8, ep_size=2,
                                target_rank=torch.tensor([1, 0]), num_shared=2)
    # L = 4: routed 5 -> 5 + 1*2 = 7; rank 1's shared slots are 1*6 + 4 + {0, 1}
    assert fused.dispatch_ids.tolist() == [[7, -1, 10, 11], [-1, -1, -1, -1]]
    assert fused.dispatch_weights.tolist() == [[1, 0, 1, 1], [0, 0, 0, 0]]


def test_fused_physical_weights_cut_the_shared_expert_into_slots():
    weights = MoEWeights.random(4, 8, 4, 8, seed=1)  # Is = 2 * I: two slots per rank
    assert shared_slots_needed(weights) == 2
    fused = fused_physical_weights(weights, 2)
    assert fused.num_experts == 8 and fused.shared is None
    assert fused.physical_to_logical.tolist() == [0, 1, -1, -1, 2, 3, -1, -1]
    assert torch.equal(fused.w_gate[4], weights.w_gate[2])
    x = torch.randn(5, 8)
    s = weights.shared
    whole = swiglu(x, s.w_gate, s.w_up, s.w_down)
    parts = sum(swiglu(x, fused.w_gate[i], fused.w_up[i], fused.w_down[i]) for i in (6, 7))
    assert torch.allclose(whole, parts, atol=1e-6)
    with pytest.raises(MoeA2AError, match="not a multiple of 4"):
        shared_slots_needed(MoEWeights.random(4, 8, 4, 6))
    with pytest.raises(MoeA2AError, match="needs a shared expert"):
        shared_slots_needed(MoEWeights.random(4, 8, 4, 0))


def test_own_shared_placement_is_refused_under_the_replicated_layout():
    with pytest.raises(MoeA2AError, match="use placement 'spread'"):
        RemapState(groups=CommGroups.single(), num_routed_experts=4, per_rank=False,
                   shared=SharedColumns(placement="own"))
    with pytest.raises(MoeA2AError, match="unknown"):
        SharedColumns(placement="nearest")


def _single_stack(case_args, config=None, shared_intermediate=16, layers=2):
    args = resolve(env={}, **case_args)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, torch.device("cpu"))
    router = RouterConfig(num_experts=8, top_k=2, scoring="sigmoid", n_group=2, topk_group=1,
                          renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)
    weights = [MoEWeights.random(8, 16, 8, shared_intermediate, seed=i, with_correction_bias=True)
               for i in range(layers)]
    stack, eplb = build_eplb_stack(weights, router, args, ctx,
                                   config=config or EPLBConfig.from_server_args(args))
    return stack, eplb, weights, router


@pytest.mark.parametrize("case_args,config", [
    ({"moe_a2a_backend": "alltoall", "enforce_shared_experts_fusion": True}, None),
    ({"moe_a2a_backend": "none", "ep_num_redundant_experts": 3,
      "ep_dispatch_algorithm": "dynamic", "enforce_shared_experts_fusion": True}, None),
    ({"moe_a2a_backend": "alltoall", "ep_num_redundant_experts": 2,
      "expert_distribution_recorder_mode": "per_pass"}, None),
])
def test_one_rank_stack_matches_the_reference(case_args, config):
    stack, eplb, weights, router = _single_stack(case_args, config)
    layer = stack.layers[0]
    fused = eplb.state.shared is not None
    assert layer.experts.num_local_experts == eplb.state.num_physical_experts
    assert layer.get_moe_weights()[0].shape[0] == eplb.state.num_routed_experts  # no shared slot
    assert (layer.shared is None) == fused
    x = torch.randn(11, 16)
    out = stack(x)
    ref = x
    for w in weights:
        ref = ref + reference_moe(ref, w, router).output
    assert torch.allclose(out, ref, atol=1e-5)


def test_build_eplb_stack_without_eplb_is_a_plain_stack():
    stack, eplb, _, _ = _single_stack({"moe_a2a_backend": "alltoall"})
    assert eplb is None and type(stack.layers[0].remap).__name__ == "IdentityRemap"


def test_manager_needs_expert_parallelism():
    with pytest.raises(MoeA2AError, match="needs ep_size > 1"):
        _single_stack({"moe_a2a_backend": "alltoall"}, EPLBConfig(enable_rebalance=True))


# ---- Waterfill --------------------------------------------------------------------------------


def _skewed_ids(n, hot_rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hot = torch.randint(hot_rank * 4, hot_rank * 4 + 4, (n, 3), generator=gen)
    cold = torch.randint(0, 16, (n, 1), generator=gen)
    return torch.cat([hot, cold], 1)


def test_waterfill_fills_the_emptiest_ranks():
    ids = _skewed_ids(400, hot_rank=1)
    ranks = waterfill_ranks(ids, routed_per_rank=4, ep_size=4, ep_rank=1, min_batch=64)
    counts = torch.bincount(ranks, minlength=4)
    assert counts[1] == 0                      # the hot rank is far above the level
    assert torch.equal(ranks, waterfill_ranks(ids, routed_per_rank=4, ep_size=4, ep_rank=1))
    load = torch.bincount(torch.div(ids, 4, rounding_mode="floor").flatten(), minlength=4)
    assert (load + counts).max() < (load + torch.bincount(torch.full((400,), 1), minlength=4)).max()


def test_waterfill_keeps_small_batches_and_unfillable_loads_close():
    ids = _skewed_ids(10, hot_rank=2)
    assert (waterfill_ranks(ids, routed_per_rank=4, ep_size=4, ep_rank=3) == 3).all()
    # one rank far above the level: only this rank or ranks the token already visits
    ids = torch.tensor([[0, 1, 2, 3]] * 80 + [[0, 1, 2, 4]] * 20)
    ranks = waterfill_ranks(ids, routed_per_rank=4, ep_size=4, ep_rank=3, min_batch=8)
    visited = torch.div(ids, 4, rounding_mode="floor")
    assert ((visited == ranks.unsqueeze(1)).any(1) | (ranks == 3)).all()
    # level 125, loads [380, 20, 0, 0]: rows visiting only rank 0 stay here (own rank, below
    # the level), rows also visiting rank 1 may go there; rank 2 is not worth an extra trip
    assert set(ranks[:80].tolist()) == {3} and set(ranks[80:].tolist()) == {1, 3}


# ---- recorder ---------------------------------------------------------------------------------


def _step(index=0, attn_tp_rank=0):
    groups = CommGroups(attn_tp_rank=attn_tp_rank, attn_tp_size=2 if attn_tp_rank else 1)
    return StepContext(index=index, batch=BatchInfo.single(3), groups=groups)


def _topk(ids):
    ids = torch.tensor(ids)
    return LogicalTopK(ids=ids, weights=torch.ones(ids.shape))


def test_recorder_counts_windows_and_modes():
    rec = ExpertDistributionRecorder(num_layers=2, num_logical_experts=4, groups=CommGroups.single(),
                                     mode="per_token", buffer_size=2)
    rows = RowSpan.replicated(2)
    rec.on_step_begin(_step(0))
    rec.observe(0, _topk([[0, 1], [0, 2]]), rows, _step(0))   # not recording yet
    rec.on_step_end(_step(0))
    assert rec.num_steps == 0
    rec.start()
    for i in range(3):
        step = _step(i)
        rec.on_step_begin(step)
        rec.observe(0, _topk([[0, 1], [0, i]]), rows, step)
        rec.observe(1, _topk([[3, 2], [3, 3]]), rows, step)
        rec.on_step_end(step)
    dump = rec.dump()
    assert dump.num_steps == 2                                # bounded window: steps 1, 2
    assert dump.logical_count.tolist() == [[4, 3, 1, 0], [0, 0, 2, 6]]
    assert dump.step_counts.shape == (2, 2, 4)
    assert [(r.step, r.layer) for r in dump.token_records] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert dump.gpu_load.tolist() == [[8.0], [8.0]] and dump.mean_utilization == 1.0


def test_recorder_counts_replicated_rows_once_and_measures_utilisation():
    groups = CommGroups(ep_size=4)
    rec = ExpertDistributionRecorder(num_layers=1, num_logical_experts=8, groups=groups, buffer_size=-1)
    rec.start()
    for attn_tp_rank in (0, 1):  # the same rows seen by two attention-TP ranks
        step = _step(0, attn_tp_rank)
        rec.on_step_begin(step)
        rec.observe(0, _topk([[0, 1]] * 4), RowSpan.replicated(4), step)
        rec.on_step_end(step)
    dump = rec.dump()
    assert int(dump.logical_count.sum()) == 8                 # counted by rank 0 only
    assert dump.gpu_load.tolist() == [[8.0, 0.0, 0.0, 0.0]]   # experts 0, 1 live on GPU 0
    assert abs(dump.mean_utilization - 0.25) < 1e-12
    step = _step(1, 1)
    rec.on_step_begin(step)
    rec.observe(0, _topk([[7, 6]]), RowSpan.slice_of(2, 2, 1), step)  # scattered: own slice
    rec.on_step_end(step)
    assert rec.dump().logical_count[0].tolist() == [4, 4, 0, 0, 0, 0, 1, 1]
    with pytest.raises(MoeA2AError, match="unknown"):
        ExpertDistributionRecorder(num_layers=1, num_logical_experts=8, groups=groups, mode="x")


# ---- weight moves -----------------------------------------------------------------------------


def test_plan_prefers_local_copies_and_spreads_sources():
    old = ExpertLocation.from_mapping([[0, 1, 2, 3, 0, 1, 2, 3]], 4, 2)
    new = ExpertLocation.from_mapping([[0, 0, 1, 1, 0, 0, 2, 3]], 4, 2)
    moves = plan_moves(old, new, [0])
    assert len(moves) == 8
    by_slot = {(m.dst, m.slot): (m.src, m.src_slot) for m in moves}
    assert by_slot[(0, 0)] == (0, 0) and by_slot[(1, 2)] == (1, 2)  # local copies
    assert all(int(old.physical_to_logical[0, m.src * 4 + m.src_slot]) ==
               int(new.physical_to_logical[0, m.dst * 4 + m.slot]) for m in moves)


def test_moving_weights_on_one_rank_permutes_slots():
    old = ExpertLocation.from_mapping([[0, 1, 2, 3, 0, 1]], 4, 1)
    new = ExpertLocation.from_mapping([[3, 3, 2, 1, 0, 0]], 4, 1)
    experts = torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, 2, 3)
    views = [experts[old.physical_to_logical[0]].clone() for _ in range(3)]
    received = move_expert_weights({0: views}, plan_moves(old, new, [0]), ep_rank=0, ep_size=1,
                                   group=None)
    assert received == 0
    assert views[0][:, 0, 0].tolist() == [3, 3, 2, 1, 0, 0]
