"""The ranks of a tensor-parallel worker group, as seen from inside one worker process.

`mpirun -np TP python -m handlers.worker ...` starts TP copies of the worker. Each finds its
rank in OpenMPI's environment, and all of them join one torch.distributed process group (gloo
on CPU, nccl on GPU) at MASTER_ADDR:MASTER_PORT, which the front end chose. Rank 0 alone talks
to the front end; it hands the other ranks what they need over this group.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys

log = logging.getLogger("lmc.worker")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the group size, from OpenMPI's variables (or torchrun's)."""
    env = os.environ
    rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("RANK", "0")))
    world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    return rank, world


class RankGroup:
    """torch.distributed set up for this group, plus the few collectives the worker needs."""

    def __init__(self, rank: int, world: int) -> None:
        import torch
        import torch.distributed as dist

        self.rank, self.world = rank, world
        local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", str(rank))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=local)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(local))
        # Long timeout: followers wait in a collective while rank 0 is idle between requests.
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(days=1))
        self._dist = dist
        log.info("rank %d of %d joined the group (%s at %s:%s)", rank, world, backend,
                 os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT"))

    def broadcast(self, obj=None):
        """Rank 0's `obj` on every rank (plain Python objects)."""
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        out = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the group once every rank is done with it."""
        self._dist.barrier()  # nobody tears the group down while another rank still uses it
        self._dist.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """End a tensor-parallel process after a clean shutdown without C++ static teardown, which
    with gloo sometimes aborts ("terminate called without an active exception", no Python frame
    on any thread). Everything the process writes must be written before this."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
