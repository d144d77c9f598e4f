"""Tensor parallelism for the native engine (Megatron-style, over torch.distributed).

The worker has already joined every rank of the group to the default process group (gloo on
CPU, nccl on GPU) with world size == the TP degree. Each rank holds a slice of every layer:

    attention   column-parallel by KV-head groups: num_kv_heads / TP key/value heads and the
                num_heads / TP query heads that read them; o_proj row-parallel + all_reduce
    MLP         gate/up column-parallel, down row-parallel + all_reduce
    embedding   vocab-parallel: rows [r * Vp, (r + 1) * Vp), Vp = ceil(V / TP), zero-padded;
                ids outside a rank's rows give zeros, and an all_reduce sums the one real row
    LM head     vocab-parallel: each rank computes its Vp logits; rank 0 gathers them

Rank 0 alone schedules and samples. Every step it broadcasts the StepPlan (plain data) over a
gloo group, so even on GPU the control messages never touch NCCL; the other ranks sit in
`NativeEngine.follow()`, running each plan until Shutdown.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

# A follower waits in a broadcast for as long as rank 0 is idle; rank 0 sends a Keepalive well
# within this, so only a dead or stuck rank 0 ends the wait with an error.
CONTROL_TIMEOUT = datetime.timedelta(hours=1)
KEEPALIVE_S = 300.0


class TensorParallel:
    """This rank's place in the TP group, and the collectives the engine uses."""

    def __init__(self, tp_size: int) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"tensor_parallel_degree={tp_size} needs torch.distributed "
                               f"initialised on every rank (the worker does this under mpirun)")
        world = dist.get_world_size()
        if world != tp_size:
            raise ValueError(f"tensor_parallel_degree={tp_size} but the process group has "
                             f"{world} ranks; the TP group must be the whole process group")
        self.rank = dist.get_rank()
        self.size = tp_size
        # Control messages (plans, block counts) go over gloo even when compute uses NCCL:
        # pickled objects on CPU, no device sync. Every rank builds its engine, so every rank
        # takes part in creating the group.
        if dist.get_backend() == "gloo":
            self.control = dist.group.WORLD
        else:
            self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's even share of n (n divisible by size)."""
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `x` [..., n] concatenated on rank 0: [..., size * n]; None elsewhere."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_leader else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast(self, message: object) -> None:
        """Rank 0: send one control message (StepPlan, Keepalive, Shutdown) to every rank."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def receive(self) -> object:
        """Ranks > 0: the next control message from rank 0."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]
