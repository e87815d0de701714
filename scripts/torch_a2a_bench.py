"""torch.distributed all-to-all of the same bytes as `moe-verify verify --gpus N --time-steps K`'s
dispatch (rank 0 sends BYTES/N to every rank, the others nothing), NCCL, one process per GPU.
Run with torchrun: torchrun --standalone --nproc-per-node 2 scripts/torch_a2a_bench.py BYTES [ITERS]
Prints the median wall time (host-synchronised) of ITERS calls after one warm-up, from rank 0."""
import os
import statistics
import sys
import time

for var, want in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    if os.environ.get(var) != want:
        sys.exit(f"{var} must be {want} (NVLink multicast stays off on shared GPUs)")

import torch
import torch.distributed as dist


def main() -> None:
    total = int(sys.argv[1])
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    per = total // world // 8  # f64 elements per destination
    send_splits = [per] * world if rank == 0 else [0] * world
    recv_splits = [per if src == 0 else 0 for src in range(world)]
    send = torch.full((sum(send_splits),), 0.5, dtype=torch.float64, device="cuda")
    recv = torch.empty((sum(recv_splits),), dtype=torch.float64, device="cuda")
    times = []
    for i in range(iters + 1):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send, recv_splits, send_splits)
        torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print(f"torch all_to_all_single of {per * 8 * world} bytes from rank 0 (device-resident): "
              f"median {statistics.median(times) * 1e3:.3f} ms of {iters}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
