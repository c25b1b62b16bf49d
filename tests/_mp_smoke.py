import torch, torch.distributed as dist
def allsum(rank, world, x):
    t = torch.tensor([rank + x]); dist.all_reduce(t); return int(t)
def boom(rank, world):
    if rank == 1: raise ValueError("boom")
    return rank
