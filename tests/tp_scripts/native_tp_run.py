"""One rank of a tensor-parallel native engine group, for tests/test_native_tp.py.

    mpirun -np 2 python tests/tp_scripts/native_tp_run.py CASES_JSON OUT_DIR MASTER_PORT

Each rank takes its rank and the group size from OpenMPI's variables, joins a gloo process group
(as the worker does), and for every case builds the engine with start_native_engine(tp_size =
group size). Rank 0 runs the case's workload through the EngineLoop and shuts the engine down;
the other ranks sit in follow() until then. Rank 0 writes OUT_DIR/results.json (one list of
per-request results per case); every rank writes OUT_DIR/rank<r>.json with what it did.

A case: {"model_dir", "engine": NativeEngine kwargs, "prompts": [[ids]], "params": [dicts of
SamplingParams], "stagger": k, "adapters": {name: LoRA adapter dir}, "which": [adapter name or
null per prompt]}. With stagger > 0 the first k requests start alone, and the rest are added
while those are still generating. Adapters are registered on rank 0 only: the other ranks load
their shards of an adapter when a step's plan puts it in a slot.
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import os
import sys
from pathlib import Path


def run_case(loop, case: dict) -> list[dict]:
    """The case's workload on an EngineLoop; the same function gives the TP=1 reference."""
    from engines.types import SamplingParams, collect_results

    prompts = case["prompts"]
    params = [SamplingParams(**p) for p in case["params"]]
    lens = [len(p) for p in prompts]
    k = case.get("stagger", 0)
    for name, path in case.get("adapters", {}).items():
        loop.add_adapter(name, path)
    if case.get("which"):
        results = loop.generate(prompts, params, case["which"])
    elif k:
        first = loop.generate_stream(prompts[:k], params[:k])
        early = [next(first) for _ in range(3)]  # the first requests are generating now
        second = loop.generate_stream(prompts[k:], params[k:])
        joined = [next(second)]  # added while the first ones still run
        results = (collect_results(itertools.chain(early, first), params[:k], lens[:k])
                   + collect_results(itertools.chain(joined, second), params[k:], lens[k:]))
    else:
        results = loop.generate(prompts, params)
    return [{"token_ids": r.token_ids,
             "log_probs": [t.log_prob for t in r.tokens],
             "prefill_log_probs": None if r.prefill is None else [t.log_prob for t in r.prefill],
             "finish_reason": r.finish_reason.value} for r in results]


def main() -> None:
    faulthandler.enable()  # a crash in a collective shows each thread's Python stack
    cases_path, out_dir, port = sys.argv[1:4]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

    import torch
    from handlers.ranks import RankGroup, exit_without_teardown, rank_and_world

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)  # tiny models; the ranks share a small box
    group = RankGroup(*rank_and_world())  # exactly as the worker joins its group
    rank, world = group.rank, group.world

    from engines.native.loop import start_native_engine

    cases = json.loads(Path(cases_path).read_text())
    out = Path(out_dir)
    results, did = [], []
    for case in cases:
        loop = start_native_engine(case["model_dir"], tp_size=world, **case["engine"])
        if rank == 0:
            results.append(run_case(loop, case))
            loop.shutdown()
            did.append("led")
        else:
            loop.follow()  # returns once rank 0 shuts down
            did.append("followed")
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    (out / f"rank{rank}.json").write_text(json.dumps(did))
    group.close()
    exit_without_teardown(0)


if __name__ == "__main__":
    main()
