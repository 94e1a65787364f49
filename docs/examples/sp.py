# sp.py -- run with: torchrun --nproc_per_node=2 sp.py
import torch
import torch.distributed as dist

from attnkit.distributed import sequence_parallel_linear_attention, shard_bounds

dist.init_process_group("gloo")  # "nccl" on GPUs (one GPU per process)
rank, world = dist.get_rank(), dist.get_world_size()
N = 8192  # the whole sequence; no rank ever holds it
lo, hi = shard_bounds(N, world, rank)  # this rank's contiguous tokens [lo, hi)
g = torch.Generator().manual_seed(rank)
q, k, v = (torch.randn(1, 4, hi - lo, 64, generator=g, requires_grad=True) for _ in range(3))
o, state = sequence_parallel_linear_attention(q, k, v, "elu", output_final_state=True)
o.sum().backward()  # every rank takes part in the backward pass
if rank == 0:
    print(f"rank 0 of {world}: tokens [{lo}, {hi}), output {tuple(o.shape)}")
dist.destroy_process_group()
