"""Run under `mpirun -np N`: build a DeepSpeedEngine on every rank and generate in lockstep.

    mpirun -np 2 python tests/ds_scripts/generate.py MODEL_DIR OUT_DIR PORT REQUESTS_JSON

REQUESTS_JSON: a list of {"prompt": str, "params": {SamplingParams fields}}. Every rank writes
OUT_DIR/rank{R}.json: {"world", "tp_size", "q_proj_rows", "results": [{"token_ids", "text", "finish_reason"}],
"stream": [token ids per request from generate_stream]}. The group is set up the way the worker
does it (handlers/ranks.py): OpenMPI's variables → RANK/WORLD_SIZE/LOCAL_RANK, gloo, env://.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# Run as a script from anywhere: the repo root holds the `engines` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engines.deepspeed import DeepSpeedEngine  # noqa: E402
from engines.types import SamplingParams  # noqa: E402
from handlers.ranks import RankGroup, exit_without_teardown, rank_and_world  # noqa: E402


def main() -> None:
    model_dir, out_dir, port, requests_json = sys.argv[1:5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)  # two ranks on a 2-core box: one thread each
    group = RankGroup(*rank_and_world())  # exactly as the worker joins its group
    rank, world = group.rank, group.world

    engine = DeepSpeedEngine(model_dir, dtype="fp32")
    requests = json.loads(requests_json)
    prompts = [r["prompt"] for r in requests]
    params = [SamplingParams(**r["params"]) for r in requests]
    results = engine.generate(prompts, params)
    stream: list[list[int]] = [[] for _ in prompts]
    for events in engine.generate_stream(prompts, params):
        for event in events:
            stream[event.index].append(event.token.id)

    report = {
        "world": world,
        "tp_size": engine.tp_size,
        # Rows of the first layer's q_proj on this rank: a share of the heads if AutoTP split it.
        "q_proj_rows": engine.model.model.layers[0].self_attn.q_proj.weight.shape[0],
        "results": [{"token_ids": r.token_ids, "text": r.text,
                     "finish_reason": r.finish_reason.value} for r in results],
        "stream": stream,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    group.close()
    exit_without_teardown(0)


if __name__ == "__main__":
    main()
