"""The `deepspeed` engine (LMI's `engine=DeepSpeed`): HFEngine with its model sharded by DeepSpeed
AutoTP across the ranks of a tensor-parallel worker group.

How a group runs it: the worker has already joined every rank to one torch.distributed group
(handlers/ranks.py: gloo on CPU, nccl on GPU). Each rank reads the whole checkpoint on the host,
then `deepspeed.init_inference(..., replace_with_kernel_inject=False)` (AutoTP) keeps the rank's
slice of every attention/MLP projection, adds an all-reduce after the row-parallel ones and
moves the slice to the rank's device. Every rank then runs the same calls with the same inputs
in lockstep (TPMode.REPLICATE: rank 0 broadcasts each request batch, only rank 0 answers);
each forward pass meets the other ranks in those all-reduces.

Lockstep needs every rank to choose the same tokens:
- logits are the output of an all-reduce, so they are the same on every rank;
- a sampling request without a seed gets one drawn on rank 0 and broadcast (one tiny
  collective per call, only when such a request is in the batch), so the per-request generators
  agree; requests with a seed and greedy ones need nothing.
Callers must drive `generate_stream` identically on every rank (same number of steps; stopping
early on one rank only would leave the others waiting in an all-reduce).

With one rank (no process group) this is HFEngine run through `init_inference(tp_size=1)`.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path

import torch

from engines.contracts.engine import Capabilities, TPMode
from engines.hf.engine import HFEngine
from engines.types import SamplingParams

log = logging.getLogger("lmc.engines")


class DeepSpeedEngine(HFEngine):
    """HFEngine whose model is DeepSpeed AutoTP-sharded over the torch.distributed world."""

    def __init__(self, model_dir: str, *, dtype: str = "auto", tp_size: int | None = None) -> None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        tp = world if tp_size is None else tp_size
        if tp != world:
            raise ValueError(
                f"tensor_parallel_degree={tp}, but this worker group has {world} rank(s); the "
                f"DeepSpeed engine shards over the whole group, so start it with {tp} ranks "
                f"(mpirun -np {tp}) or set option.tensor_parallel_degree={world}")
        self.tp_size = tp
        self.rank = dist.get_rank() if world > 1 else 0
        # With a group, every rank runs every call with the same inputs (the worker replicates
        # requests to them); only rank 0's results are returned to clients.
        self.capabilities = Capabilities(
            max_concurrency=1, tp_mode=TPMode.REPLICATE if tp > 1 else TPMode.NONE)
        # The device the shard ends on; the checkpoint is read on the host first, so no device
        # ever holds the whole model (only the rank's slice is moved).
        self._target_is_cpu = not torch.cuda.is_available()
        super().__init__(model_dir, dtype=dtype, device="cpu")

        import deepspeed

        if world > 1 and self._target_is_cpu:
            _use_gloo_all_reduce(deepspeed)
        ds_engine = deepspeed.init_inference(
            self.model,
            tensor_parallel={"tp_size": tp},
            dtype=self.model.dtype,
            # AutoTP: plain torch modules sliced per rank. Kernel injection needs DeepSpeed's
            # CUDA ops, which this build does not compile (DS_BUILD_OPS=0).
            replace_with_kernel_inject=False,
        )
        self._ds_engine = ds_engine  # holds the process-group state AutoTP set up
        # AutoTP replaced the layers inside the module in place; calling the module directly
        # keeps HFEngine's forward (past_key_values, logits_to_keep) as it is.
        self.model = ds_engine.module
        self.model.eval()
        self.device = next(self.model.parameters()).device
        log.info("deepspeed AutoTP: rank %d of %d, %s on %s", self.rank, tp, self.dtype,
                 self.device)

    # ---- lockstep ------------------------------------------------------------------------------

    def follow(self) -> None:
        raise RuntimeError("the deepspeed engine's ranks replicate every call "
                           "(TPMode.REPLICATE); none of them runs follow()")

    def _new_rows(self, prompts: list[str | list[int]], params: list[SamplingParams]) -> list:
        return super()._new_rows(prompts, self._shared_seeds(params))

    def _shared_seeds(self, params: list[SamplingParams]) -> list[SamplingParams]:
        """`params` with rank 0's random seed on every sampling request that has none."""
        unseeded = [i for i, p in enumerate(params) if not p.greedy and p.seed is None]
        if not unseeded or self.tp_size == 1:
            return params
        import torch.distributed as dist

        box = [[secrets.randbits(63) for _ in unseeded]]  # only rank 0's draw survives
        dist.broadcast_object_list(box, src=0)
        seeded = list(params)
        for i, seed in zip(unseeded, box[0]):
            seeded[i] = replace(params[i], seed=seed)
        return seeded

    # ---- loading -------------------------------------------------------------------------------

    def _resolve_dtype(self, path: Path, dtype: str) -> torch.dtype | str:
        # The model is read on the host, but "auto" should pick what suits the device it ends
        # on: the checkpoint's dtype on a GPU, fp32 on CPU.
        if dtype == "auto" and not self._target_is_cpu:
            return "auto"
        return super()._resolve_dtype(path, dtype)


def _use_gloo_all_reduce(deepspeed) -> None:
    """Keep AutoTP's CPU all-reduce on the gloo process group, unless LOCAL_SIZE says otherwise.

    On CPU DeepSpeed JIT-compiles a shared-memory all-reduce (tens of seconds and a C++ compiler
    on first start) and uses it for every AutoTP all-reduce; but it sets its shared memory up
    only when LOCAL_SIZE (set by DeepSpeed's own launcher, not by mpirun) equals the world size,
    and without it the kernel segfaults (deepspeed 0.19.8). A user who runs all ranks on one host
    and wants that kernel sets LOCAL_SIZE; otherwise gloo's all-reduce serves.
    """
    if os.environ.get("LOCAL_SIZE"):
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
