"""A DeepSeek-V3-shaped transformers model whose MoE layers run on moe-a2a, under torchrun.

Every rank builds the same small ``DeepseekV3ForCausalLM`` (DeepSeek-V3's routing: 256 routed
experts, top-8, 8 groups of which 4 are kept, sigmoid scores with a correction bias, scaling
2.5, one shared expert; its hidden and expert sizes are shrunk so that it runs on a CPU), keeps
an untouched copy as the reference, and replaces each MoE block (``model.layers[i].mlp``) with
an ``EPMoE`` layer built from that block (``moe_a2a.hf.extract_moe``, what ``EPMoE.from_hf``
does) inside one ``MoEStack``. Tokens really move between the ranks over torch.distributed
(gloo on CPU, NCCL with ``--device cuda``), and every step's logits are compared with
transformers' own forward of the copy. EPLB flags (``--enable-eplb`` ...) build the stack with
``moe_a2a.eplb.build_eplb_stack``: hot experts are replicated and moved between ranks while
the model runs, and the logits must not change.

    torchrun --standalone --nproc-per-node 2 examples/deepseek_v3_model.py
    torchrun --standalone --nproc-per-node 2 examples/deepseek_v3_model.py --enable-eplb \\
        --ep-num-redundant-experts 2 --eplb-rebalance-num-iterations 2
    python examples/deepseek_v3_model.py --tp-size 1          # one process, no torchrun

Server flags are moe-a2a's (``moe-a2a config --help``); this script's defaults are
``--moe-a2a-backend alltoall`` and ``--tp-size`` = the number of processes. Every rank resolves
the same command line and environment (torchrun gives all of them the same), so they agree.
Exit status: 0 when every step matches, 1 when one does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist

from moe_a2a.errors import user_error_types
from moe_a2a.eplb import build_eplb_stack
from moe_a2a.hf import extract_moe, load_hf_config
from moe_a2a.parallel import (ParallelSizes, default_backend, destroy_distributed,
                              init_distributed, make_parallel_context)
from moe_a2a.server_args import ConfigError, add_arguments, read_launch_env, resolve_namespace

#: DeepSeek-V3's MoE routing, with small hidden/expert sizes and 3 decoder layers, the first
#: dense (``first_k_dense_replace``) as in the real model.
CONFIG = {
    "model_type": "deepseek_v3",
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "vocab_size": 512, "max_position_embeddings": 256, "hidden_act": "silu",
}


class EPMoEBlock(torch.nn.Module):
    """Stands in for a transformers MoE block: ``[batch, seq, H]`` in and out."""

    def __init__(self, moe: torch.nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden.reshape(-1, hidden.shape[-1])).reshape(hidden.shape)


def build_model(seed: int) -> torch.nn.Module:
    """The model with seeded weights (the same on every rank). A real deployment loads a
    checkpoint instead: ``AutoModelForCausalLM.from_pretrained(path)``."""
    from transformers import DeepseekV3ForCausalLM

    config = load_hf_config(CONFIG)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()  # from_config initialises every weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:  # trained biases are not zero: make them matter here too
                gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, generator=gen) * 0.1)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="forward passes (batch sizes vary)")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_arguments(parser)
    ns = parser.parse_args(argv)

    launch = read_launch_env()  # None outside torchrun: one process
    rank, world = (launch.rank, launch.world_size) if launch else (0, 1)
    args = resolve_namespace(ns, defaults={"moe_a2a_backend": "alltoall", "tp_size": world})
    if launch:
        launch.check_world(args.tp_size)
    elif args.tp_size != 1:
        raise ConfigError(f"--tp-size {args.tp_size} needs {args.tp_size} processes; fix: launch "
                          f"with torchrun --nproc-per-node {args.tp_size}, or pass --tp-size 1")
    device = torch.device("cpu")
    if ns.device == "cuda":
        device = torch.device("cuda", launch.local_rank if launch else 0)
        torch.cuda.set_device(device)
    torch.set_num_threads(1)  # the ranks share the host's cores
    init_distributed(rank, world, backend=default_backend(device),
                     init_method=launch.init_method if launch else "env://", device=device)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, device)

    reference = build_model(ns.seed).to(device)
    model = copy.deepcopy(reference)
    moe_ids = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    weights, routers = zip(*(extract_moe(model.model.layers[i].mlp) for i in moe_ids))
    stack, eplb = build_eplb_stack(list(weights), list(routers), args, ctx)
    for i, moe in zip(moe_ids, stack.layers):
        model.model.layers[i].mlp = EPMoEBlock(moe)  # the transformers block is dropped

    worst = 0.0
    gen = torch.Generator().manual_seed(ns.seed + 1 + ctx.groups.dp_rank)  # one batch per DP rank
    with torch.no_grad():
        for step in range(ns.steps):
            batch = 1 + (step + ctx.groups.dp_rank) % 3  # uneven across steps and DP ranks
            ids = torch.randint(0, CONFIG["vocab_size"], (batch, ns.seq_len), generator=gen).to(device)
            with stack.step(num_tokens=ids.numel()):
                logits = model(ids).logits
            expected = reference(ids).logits
            err = float((logits - expected).abs().max() / expected.abs().max())
            worst = max(worst, err)

    local_experts = stack.layers[0].experts.num_local_experts
    out = torch.tensor([worst], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    worst = float(out)
    passed = worst < 1e-4
    if rank == 0:
        print(f"{'PASSED' if passed else 'FAILED'}: DeepSeek-V3-shaped model, {len(moe_ids)} MoE "
              f"layers on backend {args.moe_a2a_backend}, {world} rank(s) (ep {args.ep_size}, "
              f"{local_experts} expert slots per rank), {ns.steps} steps: logits vs transformers' "
              f"forward, max relative error {worst:.2e}")
        if eplb is not None and eplb.manager is not None:
            for r in eplb.manager.reports:
                print(f"  rebalance after forward {r.forward}: utilisation "
                      f"{r.utilization_before:.3f} -> {r.utilization_predicted:.3f} predicted, "
                      f"layers changed {list(r.layers_changed)}" + (f" ({r.skipped})" if r.skipped else ""))
    stack.close()
    destroy_distributed()
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except user_error_types() as exc:  # bad input (flags, shapes, backend): one line, exit 2
        print(f"deepseek_v3_model.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
