"""Which engine serves a model, from the LMI options (option.rolling_batch and friends).

LMI's `option.rolling_batch`: auto (default) and our own `native` (also under LMI's name
`lmi-dist` and `scheduler`) pick the native continuous-batching engine when it supports the
architecture, else the `hf` engine with a log line saying why; `disable` (or batch_size > 1,
which means dynamic batching) picks `hf`. Engines that are not part of this build are a clear
startup error rather than a silent substitute.

`option.tensor_parallel_degree` (an int, or "max": the whole process group) goes to the native
engine as tp_size; the `hf` engine has no tensor parallelism, so TP > 1 never falls back to it.

`engine=DeepSpeed` (serving.properties) or `option.rolling_batch=deepspeed` picks the `deepspeed`
engine (HF model, DeepSpeed AutoTP over the worker group, static batches: it serves both dynamic
batching and batch_size 1 the way `hf` does).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("lmc.engines")

NATIVE_NAMES = {"auto", "native", "lmi-dist", "lmi_dist", "scheduler"}
HF_NAMES = {"disable", "false", "hf"}
NOT_IN_THIS_BUILD = {"vllm", "trtllm", "tensorrt-llm", "tensorrt_llm", "neuron", "neuronx", "tnx"}


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


def _bool(options: Mapping[str, str], key: str) -> bool | None:
    raw = options.get(key)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"option.{key}={raw!r} is not true or false")
    return value == "true"


def _tp_size(options: Mapping[str, str]) -> int:
    if (options.get("tensor_parallel_degree") or "").strip().lower() == "max":
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return _int(options, "tensor_parallel_degree", 1)


def _hf(dtype: str, reason: str, tp_size: int) -> EngineChoice:
    if tp_size > 1:
        raise ValueError(f"tensor_parallel_degree={tp_size} needs the native engine, but {reason}; "
                         f"use option.rolling_batch=auto or native with a model it supports, "
                         f"engine=DeepSpeed, or tensor_parallel_degree=1")
    return EngineChoice("hf", {"dtype": dtype}, reason)


def _deepspeed(dtype: str, rolling: str, tp_size: int) -> EngineChoice:
    if rolling not in {"auto", "deepspeed"} | HF_NAMES:
        raise ValueError(f"engine=DeepSpeed cannot run option.rolling_batch={rolling}; use "
                         f"option.rolling_batch=deepspeed (or leave it unset), or another engine")
    return EngineChoice("deepspeed", {"dtype": dtype, "tp_size": tp_size},
                        "engine=DeepSpeed" if rolling != "deepspeed"
                        else "option.rolling_batch=deepspeed")


def choose_engine(model_dir: str, options: Mapping[str, str], *, cuda: bool) -> EngineChoice:
    """`options`: the init properties (option.* without prefix, batch_size, ...)."""
    dtype = options.get("dtype") or "auto"
    tp_size = _tp_size(options)
    rolling = (options.get("rolling_batch") or "auto").strip().lower()
    if (options.get("engine") or "").strip().lower() == "deepspeed" or rolling == "deepspeed":
        return _deepspeed(dtype, rolling, tp_size)
    if rolling in NOT_IN_THIS_BUILD:
        raise ValueError(f"option.rolling_batch={rolling} needs an engine that is not part of "
                         f"this build; use auto, native (alias lmi-dist) or disable")
    if rolling not in NATIVE_NAMES | HF_NAMES:
        raise ValueError(f"option.rolling_batch={rolling!r} is not one of auto, native, "
                         f"lmi-dist, scheduler, disable")
    if int(options.get("batch_size") or 1) > 1:
        return _hf(dtype, "batch_size > 1 selects dynamic batching", tp_size)
    if rolling in HF_NAMES:
        return _hf(dtype, f"option.rolling_batch={rolling}", tp_size)

    from engines.native.model import UnsupportedModel, read_spec

    try:
        spec, _ = read_spec(model_dir)
    except UnsupportedModel as e:
        if rolling == "native":
            raise ValueError(f"option.rolling_batch=native: {e}") from None
        log.info("the native engine cannot serve this model (%s); using the hf engine", e)
        return _hf(dtype, str(e), tp_size)
    if tp_size > 1:
        from engines.native.parallel import check_divisible

        check_divisible(num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                        intermediate_size=spec.intermediate_size, tp_size=tp_size)
    kwargs = {
        "dtype": dtype,
        "max_num_seqs": _int(options, "max_rolling_batch_size", 256 if cuda else 32),
        "max_num_batched_tokens": _int(options, "max_rolling_batch_prefill_tokens", 4096),
        "enable_prefix_caching": (options.get("enable_prefix_caching") or "true").lower()
        != "false",
    }
    if tp_size > 1:
        kwargs["tp_size"] = tp_size
    kv_gb = _float(options, "cpu_kv_cache_gb")
    if kv_gb is not None:
        kwargs["kv_cache_gb"] = kv_gb
    backend = options.get("attention_backend")
    if backend:
        from engines.native.runner import check_attention_backend

        kwargs["attention_backend"] = check_attention_backend(backend)
    if _bool(options, "enforce_eager"):
        kwargs["cuda_graphs"] = False
    util = _float(options, "gpu_memory_utilization")
    if util is not None:
        kwargs["gpu_memory_utilization"] = util
    return EngineChoice("native", kwargs, f"option.rolling_batch={rolling}")
