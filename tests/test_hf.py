"""transformers blocks: config loading, seeded blocks, extraction, forward equivalence."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from moe_a2a.errors import MoeA2AError  # noqa: E402
from moe_a2a.hf import (HF_MODEL_TYPES, build_hf_block, example_hf_config, extract_moe,  # noqa: E402
                    hf_forward, load_hf_config)
from moe_a2a.reference import reference_moe  # noqa: E402
from moe_a2a.routing import compute_router_logits, route  # noqa: E402


@pytest.fixture(scope="module", params=HF_MODEL_TYPES)
def block(request):
    return build_hf_block(load_hf_config(example_hf_config(request.param)), seed=1)


def test_shipped_configs_load():
    for model_type in HF_MODEL_TYPES:
        path = example_hf_config(model_type)
        assert path.is_file()
        cfg = load_hf_config(path)
        assert cfg.model_type == model_type and cfg.hidden_size == 64
        assert load_hf_config(str(path)).to_dict() == cfg.to_dict()


def test_reference_matches_transformers_forward(block):
    weights, router = extract_moe(block)
    x = torch.randn(41, 64, generator=torch.Generator().manual_seed(0))
    ref, _ = reference_moe(x, weights, router)
    torch.testing.assert_close(ref, hf_forward(block, x), rtol=1e-5, atol=1e-5)
    assert hf_forward(block, x[:0]).shape == (0, 64)


def test_routing_matches_the_gate(block):
    weights, router = extract_moe(block)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    _, hf_w, hf_i = block.gate(x)
    ours = route(compute_router_logits(x, weights.gate), router, weights.correction_bias)
    order_hf, order_ours = hf_i.argsort(-1), ours.ids.argsort(-1)
    assert torch.equal(ours.ids.gather(1, order_ours), hf_i.gather(1, order_hf))
    torch.testing.assert_close(ours.weights.gather(1, order_ours), hf_w.float().gather(1, order_hf),
                               rtol=1e-6, atol=1e-6)


def test_deepseek_extraction_is_meaningful():
    blk = build_hf_block(example_hf_config("deepseek_v3"), seed=2)
    weights, router = extract_moe(blk)
    assert (router.scoring, router.n_group, router.topk_group, router.top_k) == ("sigmoid", 4, 2, 4)
    assert router.renormalize and router.routed_scaling_factor == 2.5 and router.has_correction_bias
    assert weights.shared is not None and weights.shared.intermediate_size == 32
    assert weights.correction_bias.abs().min() > 0
    x = torch.randn(200, 64)
    logits = compute_router_logits(x, weights.gate)
    biased = route(logits, router, weights.correction_bias).ids.sort(-1)[0]
    unbiased = route(logits, router, torch.zeros(16)).ids.sort(-1)[0]
    assert not torch.equal(biased, unbiased)  # the bias changes some choices
    ungrouped = type(router)(**{**router.__dict__, "n_group": 1, "topk_group": 1})
    assert not torch.equal(biased, route(logits, ungrouped, weights.correction_bias).ids.sort(-1)[0])


def test_block_is_seeded_and_typed():
    a = build_hf_block(example_hf_config("mixtral"), seed=5)
    b = build_hf_block(example_hf_config("mixtral"), seed=5)
    c = build_hf_block(example_hf_config("mixtral"), seed=6)
    assert torch.equal(a.experts.gate_up_proj, b.experts.gate_up_proj)
    assert not torch.equal(a.experts.gate_up_proj, c.experts.gate_up_proj)
    ds = build_hf_block(example_hf_config("deepseek_v3"), seed=0, dtype=torch.bfloat16)
    assert ds.experts.gate_up_proj.dtype == torch.bfloat16
    assert ds.gate.weight.dtype == torch.float32 and ds.gate.e_score_correction_bias.dtype == torch.float32
    weights, router = extract_moe(ds)
    assert weights.dtype == torch.bfloat16 and weights.gate.dtype == torch.float32
    x = torch.randn(30, 64).to(torch.bfloat16)
    ref, _ = reference_moe(x, weights, router)
    got = hf_forward(ds, x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_load_errors_name_file_and_types(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(MoeA2AError, match="nope.json"):
        load_hf_config(missing)
    bad = tmp_path / "llama.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(MoeA2AError) as info:
        load_hf_config(bad)
    assert "llama.json" in str(info.value) and "'llama'" in str(info.value)
    assert all(t in str(info.value) for t in HF_MODEL_TYPES)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MoeA2AError, match="broken.json"):
        load_hf_config(broken)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(example_hf_config("qwen3_moe").read_text())
    assert load_hf_config(tmp_path / "model").model_type == "qwen3_moe"
    cfg = load_hf_config({"model_type": "mixtral", "hidden_size": 32, "num_local_experts": 4})
    assert cfg.num_local_experts == 4
    with pytest.raises(MoeA2AError, match="not a supported MoE block"):
        extract_moe(torch.nn.Linear(2, 2))
    with pytest.raises(MoeA2AError, match="hidden_act='gelu'"):
        build_hf_block({"model_type": "mixtral", "hidden_size": 32, "hidden_act": "gelu"})
