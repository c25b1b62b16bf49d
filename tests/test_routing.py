"""Routing rules, validation, default groups, and equality with transformers' gate modules."""

import pytest
import torch

from moe_a2a.errors import MoeA2AError
from moe_a2a.routing import RouterConfig, compute_router_logits, default_groups, route


def _sorted_by_id(ids, weights):
    order = torch.argsort(ids, dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, needles", [
    (dict(num_experts=4, top_k=5), ["top_k=5", "num_experts=4"]),
    (dict(num_experts=0, top_k=1), ["num_experts=0", ">= 1"]),
    (dict(num_experts=8, top_k=2, scoring="relu"), ["'relu'", "softmax", "sigmoid"]),
    (dict(num_experts=10, top_k=2, n_group=4, topk_group=2), ["n_group=4", "num_experts=10", "dividing"]),
    (dict(num_experts=8, top_k=2, n_group=2, topk_group=3), ["topk_group=3", "n_group=2"]),
    (dict(num_experts=16, top_k=5, n_group=8, topk_group=2), ["top_k=5", "topk_group=2", ">= 3"]),
    (dict(num_experts=8, top_k=2, routed_scaling_factor=0.0), ["routed_scaling_factor=0.0", "> 0"]),
    (dict(num_experts=8, top_k=2, routed_scaling_factor=float("nan")), ["routed_scaling_factor=nan"]),
    (dict(num_experts=8, top_k=2, renormalize=1), ["renormalize=1", "bool"]),
])
def test_config_validation_names_value_and_fix(kwargs, needles):
    with pytest.raises(MoeA2AError) as info:
        RouterConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in str(info.value)


def test_route_input_validation():
    cfg = RouterConfig(num_experts=8, top_k=2)
    with pytest.raises(MoeA2AError, match=r"\[T, 8\]"):
        route(torch.randn(3, 7), cfg)
    with pytest.raises(MoeA2AError, match="has_correction_bias=False"):
        route(torch.randn(3, 8), cfg, torch.zeros(8))
    biased = RouterConfig(num_experts=8, top_k=2, scoring="sigmoid", has_correction_bias=True)
    with pytest.raises(MoeA2AError, match="correction_bias is None"):
        route(torch.randn(3, 8), biased)
    with pytest.raises(MoeA2AError, match=r"expected \[8\]"):
        route(torch.randn(3, 8), biased, torch.zeros(4))


# ---------------------------------------------------------------- default groups


def test_default_groups_always_valid():
    for e in range(1, 41):
        for k in range(1, e + 1):
            n_group, topk_group = default_groups(e, k)
            RouterConfig(num_experts=e, top_k=k, scoring="sigmoid", n_group=n_group, topk_group=topk_group)
            if n_group > 1:
                assert e // n_group >= 2
    for e, k in [(256, 8), (512, 64), (1024, 256)]:
        default_groups(e, k)


def test_default_groups_values():
    assert default_groups(256, 8) == (8, 4)
    assert default_groups(16, 4) == (8, 4)
    assert default_groups(16, 10) == (8, 5)  # keeps enough groups for top_k
    assert default_groups(16, 16) == (8, 8)
    assert default_groups(12, 2) == (4, 2)
    assert default_groups(6, 2) == (2, 1)
    assert default_groups(7, 3) == (1, 1)
    assert default_groups(1, 1) == (1, 1)
    with pytest.raises(MoeA2AError, match="top_k=9"):
        default_groups(8, 9)


# ---------------------------------------------------------------- rules


def test_softmax_topk_rules():
    torch.manual_seed(0)
    logits = torch.randn(20, 8)
    probs = torch.softmax(logits, dim=-1)
    top_v, top_i = probs.topk(3, dim=-1)
    plain = route(logits, RouterConfig(num_experts=8, top_k=3))
    assert plain.ids.dtype == torch.int64 and plain.weights.dtype == torch.float32
    assert plain.ids.shape == (20, 3) and torch.equal(plain.ids, top_i)
    torch.testing.assert_close(plain.weights, top_v)
    norm = route(logits, RouterConfig(num_experts=8, top_k=3, renormalize=True, routed_scaling_factor=2.0))
    torch.testing.assert_close(norm.weights, 2.0 * top_v / top_v.sum(-1, keepdim=True))
    torch.testing.assert_close(norm.weights.sum(-1), torch.full((20,), 2.0))


def test_bf16_logits_are_routed_in_float32():
    logits = torch.randn(5, 8).to(torch.bfloat16)
    out = route(logits, RouterConfig(num_experts=8, top_k=2))
    assert out.weights.dtype == torch.float32
    assert torch.equal(out.ids, torch.softmax(logits.float(), -1).topk(2, -1)[1])


def test_grouped_topk_hand_example():
    # 4 experts, 2 groups {0,1} {2,3}; keep 1 group; sigmoid scoring with a bias.
    logits = torch.tensor([[2.0, -3.0, 1.5, 1.4]])
    cfg = RouterConfig(num_experts=4, top_k=2, scoring="sigmoid", n_group=2, topk_group=1,
                       renormalize=False, has_correction_bias=True)
    s = torch.sigmoid(logits)[0]
    # group scores (top-2 sums): g0 = s0 + s1 ≈ 0.93, g1 = s2 + s3 ≈ 1.62 → group 1 wins
    out = route(logits, cfg, torch.zeros(4))
    assert sorted(out.ids[0].tolist()) == [2, 3]
    # a bias on expert 1 lifts group 0; the weights stay the unbiased scores
    out = route(logits, cfg, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert out.ids[0].tolist() == [1, 0]
    torch.testing.assert_close(out.weights[0], torch.stack([s[1], s[0]]))


def test_grouped_selection_stays_in_kept_groups():
    torch.manual_seed(1)
    cfg = RouterConfig(num_experts=32, top_k=6, scoring="sigmoid", n_group=8, topk_group=3,
                       renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)
    out = route(torch.randn(64, 32), cfg, torch.randn(32) * 0.1)
    groups = out.ids // 4
    assert max(len(set(row.tolist())) for row in groups) <= 3
    assert all(len(set(row)) == 6 for row in out.ids.tolist())
    torch.testing.assert_close(out.weights.sum(-1), torch.full((64,), 2.5))


def test_top_k_equals_num_experts_and_empty():
    cfg = RouterConfig(num_experts=4, top_k=4, renormalize=True)
    out = route(torch.randn(3, 4), cfg)
    assert sorted(out.ids[0].tolist()) == [0, 1, 2, 3]
    empty = route(torch.zeros(0, 4), cfg)
    assert empty.ids.shape == (0, 4) and empty.weights.shape == (0, 4)
    grouped = RouterConfig(num_experts=8, top_k=2, scoring="sigmoid", n_group=4, topk_group=2,
                           has_correction_bias=True)
    assert route(torch.zeros(0, 8), grouped, torch.zeros(8)).ids.shape == (0, 2)


# ---------------------------------------------------------------- against transformers' gates


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("n_group, topk_group, top_k, norm", [(4, 2, 4, True), (8, 3, 6, False), (1, 1, 3, True)])
def test_matches_deepseek_v3_router(transformers, n_group, topk_group, top_k, norm):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=top_k,
                                        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                        routed_scaling_factor=2.5)
    gate = DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(n_group * 10 + top_k)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(16, 32, generator=gen) / 32 ** 0.5)
        gate.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.1)
    x = torch.randn(50, 32, generator=gen)
    _, hf_w, hf_i = gate(x)
    router = RouterConfig(num_experts=16, top_k=top_k, scoring="sigmoid", n_group=n_group,
                          topk_group=topk_group, renormalize=norm, routed_scaling_factor=2.5,
                          has_correction_bias=True)
    ours = route(compute_router_logits(x, gate.weight), router, gate.e_score_correction_bias)
    hi, hw = _sorted_by_id(hf_i, hf_w)
    oi, ow = _sorted_by_id(ours.ids, ours.weights)
    assert torch.equal(oi, hi)
    torch.testing.assert_close(ow, hw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_matches_qwen3_moe_router(transformers, norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = transformers.Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm)
    gate = Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():
        gate.weight.normal_(0, 32 ** -0.5)
    x = torch.randn(40, 32)
    _, hf_w, hf_i = gate(x)
    ours = route(compute_router_logits(x, gate.weight), RouterConfig(num_experts=8, top_k=3, renormalize=norm))
    assert torch.equal(ours.ids, hf_i)
    torch.testing.assert_close(ours.weights, hf_w, rtol=1e-6, atol=1e-6)


def test_matches_mixtral_router(transformers):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = transformers.MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    gate = MixtralTopKRouter(cfg)
    with torch.no_grad():
        gate.weight.normal_(0, 32 ** -0.5)
    x = torch.randn(40, 32)
    _, hf_w, hf_i = gate(x)
    ours = route(compute_router_logits(x, gate.weight), RouterConfig(num_experts=8, top_k=2, renormalize=True))
    assert torch.equal(ours.ids, hf_i)
    torch.testing.assert_close(ours.weights, hf_w, rtol=1e-6, atol=1e-6)
