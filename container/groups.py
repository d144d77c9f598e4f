"""Worker-group layout: how many model copies fit the devices, and which devices each gets.

A worker group is TENSOR_PARALLEL_DEGREE ranks that hold one copy of the model between them.
Groups per model = devices / TP: 8 GPUs with TP=2 give 4 groups, each with its own slice of
CUDA_VISIBLE_DEVICES ("0,1", "2,3", ...). On CPU there are no devices to split; LMC_CPU_DEVICES
(default: TP, i.e. one group) says how many rank slots to plan for.

Pure functions; the front end never imports torch, so GPUs are counted from the environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


class LayoutError(ValueError):
    """The TP degree and the devices do not fit together."""


@dataclass(frozen=True)
class GroupSpec:
    index: int
    tp: int
    devices: tuple[str, ...]  # device ids for CUDA_VISIBLE_DEVICES; empty on CPU

    @property
    def visible_devices(self) -> str | None:
        return ",".join(self.devices) if self.devices else None


def count_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def resolve_tp(degree: int | str, num_devices: int) -> int:
    """option.tensor_parallel_degree as parsed (an int, or "max": all devices, 1 without)."""
    return max(1, num_devices) if degree == "max" else int(degree)


def plan_groups(*, tp: int, gpus: list[str], cpu_devices: int | None = None) -> list[GroupSpec]:
    """The groups one model gets: on GPUs, len(gpus) // tp groups of tp consecutive GPUs; on CPU,
    cpu_devices // tp groups (cpu_devices defaults to tp: one group)."""
    if tp < 1:
        raise LayoutError(f"tensor_parallel_degree={tp} must be >= 1")
    if gpus:
        if tp > len(gpus):
            raise LayoutError(f"tensor_parallel_degree={tp} needs {tp} GPUs but only "
                              f"{len(gpus)} are visible ({','.join(gpus)})")
        return [GroupSpec(i, tp, tuple(gpus[i * tp:(i + 1) * tp])) for i in range(len(gpus) // tp)]
    slots = tp if cpu_devices is None else cpu_devices
    if slots < tp:
        raise LayoutError(f"tensor_parallel_degree={tp} needs {tp} CPU rank slots but "
                          f"LMC_CPU_DEVICES={slots}")
    return [GroupSpec(i, tp, ()) for i in range(slots // tp)]
