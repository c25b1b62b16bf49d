"""Where one rank's dispatch + combine spends its time on one GPU: torch.profiler over ten
calls of ``alltoall`` and ``none`` (hidden 7168, 256 experts, top-8, bf16, 128 and 4096
tokens), printing the kernels by GPU time and the host synchronisations.

    python benchmarks/profile_dispatch.py          # needs: a GPU (one rank, NCCL)

GPU time per call is "Self CUDA time total" / 10; compare it with ``moe-a2a bench``'s comm time
for the same size: the difference is host time the one device-to-host read exposes.
"""
import os, torch, torch.distributed as dist
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
dev = torch.device("cuda", 0); torch.cuda.set_device(dev)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
from moe_a2a.server_args import resolve
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.layer import EPMoE
from moe_a2a.routing import RouterConfig, route
from moe_a2a.weights import MoEWeights
from moe_a2a.dispatchers import ForwardMode, agree_batch, CombineInput
from torch.profiler import profile, ProfilerActivity
E, H, I, K = 256, 7168, 256, 8
router = RouterConfig(num_experts=E, top_k=K, scoring="sigmoid", n_group=8, topk_group=4, renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)
w = MoEWeights.random(E, H, I, seed=0, with_correction_bias=True)
for backend in ("alltoall", "none"):
    args = resolve(env={}, moe_a2a_backend=backend, tp_size=1)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, dev)
    layer = EPMoE.build(w, router, args, ctx, dtype=torch.bfloat16)
    for T in (128, 4096):
        x = torch.randn(T, H, device=dev).to(torch.bfloat16)
        topk = route(x.float() @ layer.gate.t(), router, layer.correction_bias)
        phys = layer.remap.to_physical(topk, 0)
        batch = agree_batch(ctx.groups, num_tokens=T, forward_mode=ForwardMode.PREFILL, device=dev)
        def comm():
            d = layer.dispatcher.dispatch(x, phys, batch=batch)
            return layer.dispatcher.combine(CombineInput(expert_output=d.hidden_states, dispatch_output=d), batch=batch)
        for _ in range(5): comm()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10): comm()
            torch.cuda.synchronize()
        print(f"===== {backend} T={T}")
        print(prof.key_averages().table(sort_by=os.environ.get("SORT", "self_cuda_time_total"), row_limit=int(os.environ.get("ROWS", "14")), max_name_column_width=60))
        ev = prof.key_averages()
        syncs = [e for e in ev if "Synchronize" in e.key or "DtoH" in e.key or "item" in e.key or "_local_scalar_dense" in e.key]
        print("sync-ish:", [(e.key, e.count) for e in syncs])
    layer.close()
dist.destroy_process_group()
