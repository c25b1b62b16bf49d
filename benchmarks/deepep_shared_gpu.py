"""Real DeepEP through moe-a2a's DeepEPDispatcher on ONE GPU, checked against a reference.

    python benchmarks/deepep_shared_gpu.py normal cuda 0 /tmp/out        # real deep_ep
    python benchmarks/deepep_shared_gpu.py low_latency cuda 0 /tmp/out
    python benchmarks/deepep_shared_gpu.py normal cpu 1 /tmp/out          # the CPU emulation

Two processes share cuda:0 (DeepEP's intranode kernels need 2, 4 or 8 ranks; on one GPU the
two contexts are time-sliced, so the printed seconds mean nothing); a gloo group carries
DeepEP's handshakes. Four steps per mode (96 tokens, an empty rank, one token, 96 tokens) go
through dispatch, the reference experts and combine, and are compared with an fp32 reference
of the same routing. Args: mode, device (cuda/cpu), emulate (1 = moe_a2a.testing's stand-in),
output prefix (one JSON per mode and rank).
"""
import os, sys, json, time, datetime, contextlib
import torch, torch.distributed as dist

def worker(rank, world, port, mode, device_type, emulate, out_path):
    from moe_a2a.testing import emulate_kernels
    ctx = emulate_kernels(("deep_ep",)) if emulate else contextlib.nullcontext()
    with ctx:
        _work(rank, world, port, mode, device_type, out_path)

def _work(rank, world, port, mode, device_type, out_path):
    from moe_a2a.backends import DeepEPSettings
    from moe_a2a.dispatchers import BatchInfo, CombineInput, DispatcherSetup, ForwardMode, PhysicalTopK
    from moe_a2a.dispatchers.deepep import DeepEPDispatcher
    from moe_a2a.experts import ReferenceExperts
    from moe_a2a.parallel import ParallelSizes, build_comm_groups
    from moe_a2a.weights import MoEWeights
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=240))
    groups = build_comm_groups(ParallelSizes(tp_size=world, ep_size=world), rank)
    E, H, I, K, T = 16, 2048, 256, 4, 96
    settings = DeepEPSettings(mode=mode, num_max_dispatch_tokens_per_rank=128)
    setup = DispatcherSetup(groups=groups, num_experts=E, top_k=K, hidden_size=H, dtype=torch.bfloat16,
                            device=device, settings=settings)
    result = {"rank": rank, "mode": mode}
    try:
        disp = DeepEPDispatcher(setup)
        comm = disp.comm
        result["buffer"] = {"nvl": comm.num_nvl_bytes, "rdma": comm.num_rdma_bytes, "qps": comm.num_qps_per_rank}
        weights = MoEWeights.random(E, H, I, 0, seed=5, dtype=torch.bfloat16)
        local = weights.shard(disp.placement).to(device)
        runner = ReferenceExperts()
        worst, steps = 0.0, []
        for step, n in enumerate([T, 0 if rank == 1 else T // 3, 1, T]):
            g = torch.Generator().manual_seed(100 * step + rank)
            x = (torch.randn(n, H, generator=g)).to(torch.bfloat16)
            ids = torch.rand(n, E, generator=g).argsort(dim=1)[:, :K]
            w = torch.rand(n, K, generator=g)
            fm = ForwardMode.PREFILL if mode == "normal" else ForwardMode.DECODE
            batch = BatchInfo(forward_mode=fm, num_tokens=n * world, dp_num_tokens=(T * world,), dp_forward_modes=(fm,))
            t0 = time.perf_counter()
            d = disp.dispatch(x.to(device), PhysicalTopK(ids=ids.to(device), weights=w.to(device)), batch=batch)
            y = runner(d, local)
            out = disp.combine(CombineInput(expert_output=y, dispatch_output=d), batch=batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            # reference: every expert in fp32
            ref = torch.zeros(n, H)
            xf = x.float()
            for k in range(K):
                for e in range(E):
                    m = ids[:, k] == e
                    if m.any():
                        xe = xf[m]
                        he = torch.nn.functional.silu(xe @ weights.w_gate[e].float().T) * (xe @ weights.w_up[e].float().T)
                        ref[m] += w[m, k:k+1] * (he @ weights.w_down[e].float().T)
            err = float((out.float().cpu() - ref).abs().max()) if n else 0.0
            scale = float(ref.abs().max()) if n else 0.0
            worst = max(worst, err / max(1.0, scale))
            steps.append({"tokens": n, "type": type(d).__name__, "err": err, "scale": scale, "s": round(dt, 3)})
        result.update(ok=worst <= 0.03, worst_rel=worst, steps=steps)
        comm.close()
    except Exception as exc:
        import traceback
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-1500:])
    with open(f"{out_path}.{mode}.{rank}.json", "w") as fh:
        json.dump(result, fh)
    print(json.dumps(result)[:1500], flush=True)
    try:
        dist.barrier()
    except Exception:
        pass
    dist.destroy_process_group()

if __name__ == "__main__":
    mode, device_type, emulate, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    torch.multiprocessing.spawn(worker, args=(2, port, mode, device_type, emulate, out), nprocs=2, join=True)
