"""Which engine serves a model, from the LMI options (option.rolling_batch and friends).

LMI's `option.rolling_batch`: auto (default) and our own `native` (also under LMI's name
`lmi-dist` and `scheduler`) pick the native continuous-batching engine when it supports the
architecture, else the `hf` engine with a log line saying why; `disable` (or batch_size > 1,
which means dynamic batching) picks `hf`. Engines that are not part of this build are a clear
startup error rather than a silent substitute.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("lmc.engines")

NATIVE_NAMES = {"auto", "native", "lmi-dist", "lmi_dist", "scheduler"}
HF_NAMES = {"disable", "false", "hf"}
NOT_IN_THIS_BUILD = {"vllm", "trtllm", "tensorrt-llm", "tensorrt_llm", "deepspeed", "neuron",
                     "neuronx", "tnx"}


@dataclass(frozen=True)
class EngineChoice:
    name: str  # a name in engines.registry
    kwargs: dict = field(default_factory=dict)
    reason: str = ""


def _int(options: Mapping[str, str], key: str, default: int) -> int:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"option.{key}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"option.{key}={value} must be >= 1")
    return value


def _float(options: Mapping[str, str], key: str) -> float | None:
    raw = options.get(key)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"option.{key}={raw!r} is not a number") from None


def choose_engine(model_dir: str, options: Mapping[str, str], *, cuda: bool) -> EngineChoice:
    """`options`: the init properties (option.* without prefix, batch_size, ...)."""
    dtype = options.get("dtype") or "auto"
    rolling = (options.get("rolling_batch") or "auto").strip().lower()
    if rolling in NOT_IN_THIS_BUILD:
        raise ValueError(f"option.rolling_batch={rolling} needs an engine that is not part of "
                         f"this build; use auto, native (alias lmi-dist) or disable")
    if rolling not in NATIVE_NAMES | HF_NAMES:
        raise ValueError(f"option.rolling_batch={rolling!r} is not one of auto, native, "
                         f"lmi-dist, scheduler, disable")
    if int(options.get("batch_size") or 1) > 1:
        return EngineChoice("hf", {"dtype": dtype}, "batch_size > 1 selects dynamic batching")
    if rolling in HF_NAMES:
        return EngineChoice("hf", {"dtype": dtype}, f"option.rolling_batch={rolling}")

    from engines.native.model import UnsupportedModel, read_spec

    try:
        read_spec(model_dir)
    except UnsupportedModel as e:
        if rolling == "native":
            raise ValueError(f"option.rolling_batch=native: {e}") from None
        log.info("the native engine cannot serve this model (%s); using the hf engine", e)
        return EngineChoice("hf", {"dtype": dtype}, str(e))
    kwargs = {
        "dtype": dtype,
        "max_num_seqs": _int(options, "max_rolling_batch_size", 256 if cuda else 32),
        "max_num_batched_tokens": _int(options, "max_rolling_batch_prefill_tokens", 4096),
        "enable_prefix_caching": (options.get("enable_prefix_caching") or "true").lower()
        != "false",
    }
    kv_gb = _float(options, "cpu_kv_cache_gb")
    if kv_gb is not None:
        kwargs["kv_cache_gb"] = kv_gb
    util = _float(options, "gpu_memory_utilization")
    if util is not None:
        kwargs["gpu_memory_utilization"] = util
    return EngineChoice("native", kwargs, f"option.rolling_batch={rolling}")
