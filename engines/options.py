"""Every configuration key LMC reads, declared once: its serving.properties key, environment
variables, type, default, accepted values and meaning.

One frozen dataclass per consumer:

    ServerOptions     the process: port, request size, cache dir, ... (environment only)
    ServingOptions    per model, read by the front end: queue, batching, workers, timeouts, TP
    HandlerOptions    per model, read by the default LLM handler: entry point, output format, ...
    NativeOptions, HFOptions, DeepSpeedOptions, VLLMOptions, TRTLLMOptions, NeuronXOptions
                      per engine (ENGINE_OPTIONS maps name -> class)

Values arrive as strings (serving.properties, OPTION_* variables, the register API) and are
parsed here, once, at startup in the front end, strictly: a bad value is a ConfigError naming
the key, the value and where it came from. Which keys a model may use, and the check that the
chosen engine reads each of them, are in container/config.py; the README's option tables are
generated from these classes (`python -m engines.options --markdown`; a test keeps them equal).

Torch-free: the front end imports this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A configuration problem found at startup; the message names the key, value and source."""


@dataclass(frozen=True, slots=True)
class Setting:
    value: str
    source: str  # human-readable origin, used in error messages
    name: str | None = None  # what the user wrote, when not the key (an env-only variable)


@dataclass(frozen=True, slots=True)
class Opt:
    """How one dataclass field is configured."""

    key: str  # serving.properties key, e.g. "option.dtype" or "batch_size"
    meaning: str
    env: tuple[str, ...] = ()  # environment variables besides OPTION_<NAME> / SERVING_<NAME>
    choices: tuple[str, ...] = ()  # accepted values (case-insensitive), canonical spelling
    aliases: Mapping[str, str] = field(default_factory=dict)  # other spelling -> choice
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    parse: Callable[[str], Any] | None = None  # a custom parser; raises ValueError(why)
    default_text: str | None = None  # how the default reads in the docs, when not plain


def opt(key: str, default: Any, meaning: str, **kw: Any) -> Any:
    """A dataclass field configured by `key` (see Opt for the keywords)."""
    return field(default=default, metadata={"opt": Opt(key, meaning, **kw)})


def did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- value parsing ---------------------------------------------------------------------------


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError("is not an integer" if kind is int else "is not a number") from None


def _check_range(value: float, o: Opt) -> None:
    if o.minimum is not None:
        if o.exclusive_minimum and not value > o.minimum:
            raise ValueError(f"must be > {o.minimum:g}")
        if not o.exclusive_minimum and value < o.minimum:
            raise ValueError(f"must be >= {o.minimum:g}")
    if o.maximum is not None and value > o.maximum:
        raise ValueError(f"must be <= {o.maximum:g}")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise ValueError("is not true or false")
    return value == "true"


def _parse_choice(text: str, o: Opt) -> str:
    value = text.strip()
    by_lower = {c.lower(): c for c in o.choices}
    by_lower.update({a.lower(): c for a, c in o.aliases.items()})
    if value.lower() not in by_lower:
        raise ValueError(f"is not one of {', '.join(o.choices)}")
    return by_lower[value.lower()]


def parse_tp(text: str) -> int | str:
    """option.tensor_parallel_degree: an integer >= 1, or "max" (every device)."""
    if text.strip().lower() == "max":
        return "max"
    value = _number(text, int)
    if value < 1:
        raise ValueError("must be >= 1 (or max)")
    return value


def parse_networks(text: str) -> str:
    """LMC_MANAGEMENT_ALLOW: CIDRs, comma-separated, or "any"; checked here, kept as text."""
    import ipaddress

    if text.strip().lower() == "any":
        return "any"
    try:
        nets = [ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise ValueError(f"is not a list of CIDRs ({e}); e.g. 127.0.0.0/8,10.0.0.0/8, or any") \
            from None
    return ",".join(map(str, nets))


def parse_value(o: Opt, kind: str, text: str) -> Any:
    """`text` as the field's type; ValueError says why not (without the key)."""
    if o.parse is not None:
        return o.parse(text)
    if o.choices:
        return _parse_choice(text, o)
    if kind == "bool":
        return _parse_bool(text)
    if kind in ("int", "float"):
        value = _number(text, int if kind == "int" else float)
        _check_range(value, o)
        return value
    return text.strip()


# ---- the schema machinery --------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str  # the dataclass attribute
    kind: str  # bool | int | float | str
    default: Any
    opt: Opt


_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


def _kind(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return next((_KINDS[a] for a in args if a in _KINDS), "str")


@functools.cache
def fields_of(cls: type) -> tuple[FieldSpec, ...]:
    """The configured fields of an options class, in declaration order."""
    hints = typing.get_type_hints(cls)
    return tuple(FieldSpec(f.name, _kind(hints[f.name]), f.default, f.metadata["opt"])
                 for f in dataclasses.fields(cls) if "opt" in f.metadata)


@functools.cache
def keys_of(cls: type) -> frozenset[str]:
    return frozenset(f.opt.key for f in fields_of(cls))


def parse_options(cls: type[T], settings: Mapping[str, Setting], **resolved: Any) -> T:
    """An instance of `cls` from the settings it declares (other keys are not its business).
    `resolved` sets fields whose value was decided elsewhere (e.g. TP "max" -> a number)."""
    values: dict[str, Any] = {}
    for f in fields_of(cls):
        s = settings.get(f.opt.key)
        if s is None:
            continue
        try:
            values[f.name] = parse_value(f.opt, f.kind, s.value)
        except ValueError as e:
            raise ConfigError(f"{s.name or f.opt.key}={s.value!r} {e} (from {s.source})") from None
    values.update(resolved)
    return cls(**values)


def to_wire(options: Any) -> dict[str, Any]:
    """JSON-ready field values (ints, floats, bools, strings, None)."""
    return dataclasses.asdict(options)


# ---- the process: environment only ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    host: str = opt("server.host", "0.0.0.0", "bind address (`--host`)")
    port: int = opt("server.port", 8080, "listen port (`--port`)", env=("SAGEMAKER_BIND_TO_PORT",),
                    minimum=1, maximum=65535)
    max_request_size: int = opt("server.max_request_size", 64 * 1024 * 1024,
                                "largest request body in bytes (413 above)",
                                env=("SAGEMAKER_MAX_REQUEST_SIZE",), minimum=1,
                                default_text="64 MiB")
    body_timeout_s: float = opt("server.body_timeout", 60.0,
                                "s for a request body to arrive in full (408 after)",
                                env=("LMC_BODY_TIMEOUT",), minimum=0.001)
    metrics: bool = opt("server.metrics", True, "serve Prometheus metrics at GET /metrics",
                        env=("LMC_METRICS",))
    header_timeout_s: float = opt("server.header_timeout", 20.0,
                                  "s for a request's headers to arrive in full (408, closed)",
                                  env=("LMC_HEADER_TIMEOUT",), minimum=0.001)
    max_payload_mb: int | None = opt("server.max_payload_in_mb", None,
                                     "largest request body in MiB, if the byte size is unset",
                                     env=("SAGEMAKER_MAX_PAYLOAD_IN_MB",), minimum=1)
    cache_dir: str = opt("server.cache_dir", str(Path.home() / ".cache" / "lmc"),
                         "where converted and downloaded models are kept", env=("LMC_CACHE",),
                         default_text="~/.cache/lmc")
    kernel_cache: str | None = opt("server.kernel_cache", None,
                                   "where the native engine's C++ CPU kernels are built, once "
                                   "per source, torch version and CPU", env=("LMC_KERNEL_CACHE",),
                                   default_text="$LMC_CACHE/cpu_kernels")
    log_level: str = opt("server.log_level", "INFO", "logging level", env=("LMC_LOG_LEVEL",),
                         choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = opt("server.log_format", "text",
                          "text | json: log lines as text or one JSON object each",
                          env=("LMC_LOG_FORMAT",), choices=("text", "json"))
    access_log: bool = opt("server.access_log", True, "one INFO line per request (lmc.access)",
                           env=("LMC_ACCESS_LOG",))
    cpu_devices: int | None = opt("server.cpu_devices", None,
                                  "CPU rank slots to plan TP groups on", env=("LMC_CPU_DEVICES",),
                                  minimum=1, default_text="the TP degree: one group")
    mpirun: str | None = opt("server.mpirun", None, "mpirun that launches TP groups",
                             env=("LMC_MPIRUN",), default_text="mpirun on PATH")
    load_models: str | None = opt("server.load_models", None,
                                  "models to serve: comma list of [name=]path or name::E=url",
                                  env=("SERVING_LOAD_MODELS",))
    model_store: str | None = opt("server.model_store", None,
                                  "directory whose subfolders are models, one each",
                                  env=("SERVING_MODEL_STORE",))
    # The management API loads and runs a model dir's model.py: by default only this machine may
    # call it, and only from the model roots (TorchServe's management-API CVEs, "ShellTorch").
    management_allow: str = opt("server.management_allow", "127.0.0.0/8,::1/128",
                                "client networks (CIDR, comma-separated) or any that may call "
                                "the management API", env=("LMC_MANAGEMENT_ALLOW",),
                                parse=parse_networks)
    vllm_python: str | None = opt("server.vllm_python", None,
                                  "python that runs vllm workers (option.rolling_batch=vllm)",
                                  env=("LMC_VLLM_PYTHON",),
                                  default_text="this one if it has vllm, else .venv-vllm's")
    allowed_urls: str | None = opt("server.allowed_urls", None,
                                   "directories (comma-separated) POST /models may register from",
                                   env=("LMC_ALLOWED_URLS",),
                                   default_text="the model store and /opt/ml/model")


def load_server_options(env: Mapping[str, str] | None = None, *, host: str | None = None,
                        port: int | None = None) -> ServerOptions:
    env = os.environ if env is None else env
    settings = {f.opt.key: Setting(env[name], f"environment variable {name}", name)
                for f in fields_of(ServerOptions) for name in f.opt.env if env.get(name)}
    options = parse_options(ServerOptions, settings)
    changes: dict[str, Any] = {}
    if host:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if options.max_payload_mb is not None and "SAGEMAKER_MAX_REQUEST_SIZE" not in env:
        changes["max_request_size"] = options.max_payload_mb * 1024 * 1024
    return dataclasses.replace(options, **changes) if changes else options


# ---- per model, read by the front end ---------------------------------------------------------

DJL_ENGINES = ("Python", "MPI", "DeepSpeed")


@dataclass(frozen=True, kw_only=True)
class ServingOptions:
    engine: str = opt("engine", "Python", "how workers run: MPI and DeepSpeed launch mpirun",
                      env=("OPTION_ENGINE",), choices=DJL_ENGINES)
    job_queue_size: int = opt("job_queue_size", 1000, "requests queued per model (503 beyond)",
                              env=("SERVING_JOB_QUEUE_SIZE", "MAX_CONCURRENT_REQUESTS"), minimum=1)
    batch_size: int = opt("batch_size", 1, "dynamic batch size (> 1 turns rolling batch off)",
                          env=("SERVING_BATCH_SIZE",), minimum=1)
    max_batch_delay_ms: int = opt("max_batch_delay", 100, "ms to wait filling a dynamic batch",
                                  env=("SERVING_MAX_BATCH_DELAY",), minimum=0)
    max_idle_time_s: int = opt("max_idle_time", 60, "s before an idle extra worker stops",
                               env=("SERVING_MAX_IDLE_TIME",), minimum=0)
    min_workers: int = opt("minWorkers", 1, "permanent workers (`cpu.`/`gpu.` prefix wins)",
                           env=("SERVING_MIN_WORKERS", "SAGEMAKER_NUM_MODEL_WORKERS"), minimum=0)
    max_workers: int = opt("maxWorkers", 1, "workers under load (`cpu.`/`gpu.` prefix wins)",
                           env=("SERVING_MAX_WORKERS", "SAGEMAKER_NUM_MODEL_WORKERS"), minimum=1)
    retry_threshold: int = opt("retry_threshold", 10,
                               "worker crashes in a row tolerated; one more is FAILED (DJL)",
                               env=("SERVING_RETRY_THRESHOLD",), minimum=0)
    predict_timeout_s: float = opt("option.predict_timeout", 120.0,
                                   "s for a request's first byte (504 after)",
                                   env=("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",),
                                   minimum=0.001)
    model_loading_timeout_s: float = opt("option.model_loading_timeout", 1800.0,
                                         "s to load the model", env=("SAGEMAKER_STARTUP_TIMEOUT",),
                                         minimum=0.001)
    tensor_parallel_degree: int | str = opt(
        "option.tensor_parallel_degree", 1, "ranks per worker group: an integer or max",
        env=("TENSOR_PARALLEL_DEGREE", "SM_NUM_GPUS"), parse=parse_tp)


# ---- per model, read by the default LLM handler -----------------------------------------------

# option.rolling_batch values and the engine each picks (engines/selection.py decides).
ROLLING_BATCH = ("auto", "native", "lmi-dist", "scheduler", "disable", "deepspeed", "vllm",
                 "trtllm", "neuronx")
_ROLLING_ALIASES = {"lmi_dist": "lmi-dist", "false": "disable", "hf": "disable",
                    "tensorrt-llm": "trtllm", "tensorrt_llm": "trtllm", "neuron": "neuronx",
                    "tnx": "neuronx"}


def _parse_rolling_batch(text: str) -> str:
    value = text.strip().lower()
    value = _ROLLING_ALIASES.get(value, value)
    if value not in ROLLING_BATCH:
        raise ValueError(f"is not one of {', '.join(ROLLING_BATCH)}")
    return value


OUTPUT_FORMATS = ("json", "jsonlines", "sse", "json_chat", "jsonlines_chat", "sse_chat", "none")


@dataclass(frozen=True, kw_only=True)
class HandlerOptions:
    entry_point: str | None = opt("option.entryPoint", None,
                                  "handler: a file, a module or an LMI built-in name",
                                  env=("OPTION_ENTRYPOINT",))
    model_id: str | None = opt("option.model_id", None,
                               "the model: a local dir, s3:// prefix, .tar.gz or hub id",
                               env=("HF_MODEL_ID",), default_text="the model dir")
    revision: str | None = opt("option.revision", None,
                               "hub revision (branch, tag or commit) of a hub id",
                               env=("HF_REVISION",))
    # Accepted so LMI configs load; LMC loads models with transformers' own classes and never
    # runs code shipped with a model, whatever this says.
    trust_remote_code: bool = opt("option.trust_remote_code", False,
                                  "accepted for LMI compatibility; model code is never run",
                                  env=("HF_MODEL_TRUST_REMOTE_CODE",))
    rolling_batch: str = opt("option.rolling_batch", "auto", "which engine (see Engines)",
                             choices=ROLLING_BATCH, parse=_parse_rolling_batch)
    output_formatter: str = opt("option.output_formatter", "json",
                                f"{' | '.join(OUTPUT_FORMATS)} | module:function")
    tgi_compat: bool = opt("option.tgi_compat", False, "true: TGI-shaped answers")
    # LMI's switch for its async (vLLM/TRT-LLM) services; the default handler already serves
    # many requests at once on every engine, so it changes nothing here.
    async_mode: bool = opt("option.async_mode", False,
                           "accepted for LMI compatibility: requests run concurrently either way")
    # SageMaker stateful sessions (handlers/sessions.py), LMI's keys and defaults.
    enable_stateful_sessions: bool = opt(
        "option.enable_stateful_sessions", True,
        "requestType NEW_SESSION / CLOSE and the X-Amzn-SageMaker-Session-Id header")
    sessions_path: str | None = opt("option.sessions_path", None,
                                    "where sessions are kept (one dir shared by the workers)",
                                    default_text="/dev/shm/djl_sessions")
    sessions_expiration: int = opt("option.sessions_expiration", 1200,
                                   "s a session lives after it is created", minimum=1)


# ---- per engine --------------------------------------------------------------------------------

DTYPES = ("auto", "fp32", "fp16", "bf16")
# option.quantize of the native engine (engines/native/quant.py says what each one stores).
# option.attention_backend of the native engine: decode attention.
ATTENTION_BACKENDS = ("auto", "triton", "torch", "cpp")
# option.cpu_matmul of the native engine: how unquantized CPU weights are multiplied.
CPU_MATMUL = ("auto", "onednn", "torch")
QUANTIZE_METHODS = ("int8", "int4", "int4_g64", "int4_g128", "bf16", "fp16", "fp8")
_DTYPE = dict(key="option.dtype", default="auto",
              meaning="auto | fp32 | fp16 | bf16 (auto: fp32 on CPU, the checkpoint's on GPU)",
              choices=DTYPES, aliases={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"})
_TP = dict(key="option.tensor_parallel_degree", default=1,
           meaning="ranks sharing one model copy", parse=parse_tp,
           env=("TENSOR_PARALLEL_DEGREE", "SM_NUM_GPUS"))


# LoRA (engines/lora/): read by the engines that serve adapters, native and hf.
_ENABLE_LORA = dict(key="option.enable_lora", default=False,
                    meaning="serve LoRA adapters (see Multi-LoRA)")
_MAX_LORAS = dict(key="option.max_loras", default=4,
                  meaning="adapters in one batch (device weight slots)", minimum=1)
_MAX_CPU_LORAS = dict(key="option.max_cpu_loras", default=None,
                      meaning="adapters kept loaded in host memory (LRU)", minimum=1,
                      default_text="max_loras")
_MAX_LORA_RANK = dict(key="option.max_lora_rank", default=16,
                      meaning="largest adapter rank accepted", minimum=1, maximum=1024)


def _lora_kwargs(o: Any) -> dict[str, Any]:
    """The engines' LoRA constructor arguments; none while LoRA is off."""
    if not o.enable_lora:
        return {}
    return {"enable_lora": True, "max_loras": o.max_loras,
            "max_cpu_loras": max(o.max_cpu_loras or o.max_loras, o.max_loras),
            "max_lora_rank": o.max_lora_rank}


def _opt(spec: dict[str, Any], **override: Any) -> Any:
    spec = {**spec, **override}
    return opt(spec.pop("key"), spec.pop("default"), spec.pop("meaning"), **spec)


@dataclass(frozen=True, kw_only=True)
class NativeOptions:
    """LMC's continuous-batching engine (engines/native/)."""

    dtype: str = _opt(_DTYPE)
    tensor_parallel_degree: int | str = _opt(_TP)
    max_rolling_batch_size: int | None = opt(
        "option.max_rolling_batch_size", None, "most requests running at once",
        env=("MAX_BATCH_SIZE",), minimum=1, default_text="32 (256 on GPU)")
    max_rolling_batch_prefill_tokens: int = opt(
        "option.max_rolling_batch_prefill_tokens", 4096, "token budget of one step", minimum=1)
    cpu_kv_cache_gb: float | None = opt(
        "option.cpu_kv_cache_gb", None, "KV cache size in GiB", minimum=0, exclusive_minimum=True,
        default_text="2 on CPU; on GPU see gpu_memory_utilization")
    gpu_memory_utilization: float = opt(
        "option.gpu_memory_utilization", 0.9, "share of free GPU memory for the KV cache",
        minimum=0, exclusive_minimum=True, maximum=1)
    enable_prefix_caching: bool = opt("option.enable_prefix_caching", True,
                                      "reuse the KV cache of shared prompt prefixes")
    attention_backend: str = opt("option.attention_backend", "auto",
                                 "decode attention: triton (paged kernel, GPU), cpp (C++ "
                                 "kernel, CPU) or torch; auto: triton on GPU, cpp on CPU where "
                                 "it builds", choices=ATTENTION_BACKENDS)
    enforce_eager: bool = opt("option.enforce_eager", False, "true: no CUDA graphs")
    enable_lora: bool = _opt(_ENABLE_LORA)
    max_loras: int = _opt(_MAX_LORAS)
    max_cpu_loras: int | None = _opt(_MAX_CPU_LORAS)
    max_lora_rank: int = _opt(_MAX_LORA_RANK)
    quantize: str | None = opt(
        "option.quantize", None,
        "low-bit weights (engines/native/quant.py): int8 (per channel), int4 (groups of 32; "
        "int4_g64, int4_g128), fp16 (fp32 compute), bf16 (bf16 GEMM, fp32 accumulation); "
        "fp8 on GPU (int8 maps to it there)", choices=QUANTIZE_METHODS)
    cpu_matmul: str = opt(
        "option.cpu_matmul", "auto",
        "CPU matmuls of unquantized fp32/bf16 weights: onednn (weights reordered once into "
        "oneDNN's layout; what auto picks where torch has oneDNN) or torch (x @ W, MKL)",
        choices=CPU_MATMUL)

    def engine_kwargs(self) -> dict[str, Any]:
        """NativeEngine's constructor arguments."""
        assert isinstance(self.tensor_parallel_degree, int), "TP max is resolved at selection"
        assert self.max_rolling_batch_size is not None, "the default is resolved at selection"
        kw: dict[str, Any] = dict(
            dtype=self.dtype, max_num_seqs=self.max_rolling_batch_size,
            max_num_batched_tokens=self.max_rolling_batch_prefill_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            attention_backend=self.attention_backend,
            gpu_memory_utilization=self.gpu_memory_utilization)
        if self.tensor_parallel_degree > 1:
            kw["tp_size"] = self.tensor_parallel_degree
        if self.cpu_kv_cache_gb is not None:
            kw["kv_cache_gb"] = self.cpu_kv_cache_gb
        if self.enforce_eager:
            kw["cuda_graphs"] = False
        kw.update(_lora_kwargs(self))
        if self.quantize is not None:
            kw["quantize"] = self.quantize
        if self.cpu_matmul != "auto":
            kw["cpu_matmul"] = self.cpu_matmul
        return kw


@dataclass(frozen=True, kw_only=True)
class HFOptions:
    """transformers, one static batch per call (engines/hf/)."""

    dtype: str = _opt(_DTYPE)
    enable_lora: bool = _opt(_ENABLE_LORA)
    max_loras: int = _opt(_MAX_LORAS)
    max_cpu_loras: int | None = _opt(_MAX_CPU_LORAS)
    max_lora_rank: int = _opt(_MAX_LORA_RANK)

    def engine_kwargs(self) -> dict[str, Any]:
        return {"dtype": self.dtype, **_lora_kwargs(self)}


@dataclass(frozen=True, kw_only=True)
class DeepSpeedOptions:
    """transformers sharded by DeepSpeed AutoTP over the MPI group (engines/deepspeed/)."""

    dtype: str = _opt(_DTYPE)
    tensor_parallel_degree: int | str = _opt(_TP)

    def engine_kwargs(self) -> dict[str, Any]:
        assert isinstance(self.tensor_parallel_degree, int), "TP max is resolved at selection"
        return {"dtype": self.dtype, "tp_size": self.tensor_parallel_degree}


# vLLM's engine arguments under LMI's names (engines/vllm/). vLLM spawns its own TP workers.
VLLM_QUANTIZE = ("awq", "gptq", "fp8", "compressed-tensors", "bitsandbytes", "gguf")


@dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """vLLM's AsyncLLM in the worker (engines/vllm/), under its own interpreter."""

    dtype: str = _opt(_DTYPE)
    tensor_parallel_degree: int | str = _opt(_TP)
    max_rolling_batch_size: int = opt("option.max_rolling_batch_size", 32,
                                      "max_num_seqs: most requests running at once",
                                      env=("MAX_BATCH_SIZE",), minimum=1)
    max_rolling_batch_prefill_tokens: int | None = opt(
        "option.max_rolling_batch_prefill_tokens", None, "max_num_batched_tokens", minimum=1,
        default_text="vLLM's")
    max_model_len: int | None = opt("option.max_model_len", None,
                                    "most tokens (prompt + output) per sequence", minimum=1,
                                    default_text="the model's")
    gpu_memory_utilization: float = opt(
        "option.gpu_memory_utilization", 0.9, "share of GPU memory vLLM may use", minimum=0,
        exclusive_minimum=True, maximum=1)
    cpu_kv_cache_gb: float | None = opt(
        "option.cpu_kv_cache_gb", None, "VLLM_CPU_KVCACHE_SPACE (GiB, rounded up) on CPU",
        minimum=0, exclusive_minimum=True, default_text="2")
    enable_prefix_caching: bool = opt("option.enable_prefix_caching", True,
                                      "reuse the KV cache of shared prompt prefixes")
    enforce_eager: bool | None = opt("option.enforce_eager", None, "true: no CUDA graphs / "
                                     "torch.compile", default_text="true on CPU")
    quantize: str | None = opt("option.quantize", None,
                               f"vLLM's quantization: {' | '.join(VLLM_QUANTIZE)}",
                               choices=VLLM_QUANTIZE)

    def engine_kwargs(self) -> dict[str, Any]:
        assert isinstance(self.tensor_parallel_degree, int), "TP max is resolved at selection"
        return dict(dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_degree,
                    max_num_seqs=self.max_rolling_batch_size,
                    max_num_batched_tokens=self.max_rolling_batch_prefill_tokens,
                    max_model_len=self.max_model_len,
                    gpu_memory_utilization=self.gpu_memory_utilization,
                    cpu_kv_cache_gb=self.cpu_kv_cache_gb,
                    enable_prefix_caching=self.enable_prefix_caching,
                    enforce_eager=self.enforce_eager, quantization=self.quantize)


@dataclass(frozen=True, kw_only=True)
class TRTLLMOptions:
    """TensorRT-LLM's LLM API, PyTorch backend (engines/trtllm/): NVIDIA GPUs only."""

    dtype: str = _opt(_DTYPE)
    tensor_parallel_degree: int | str = _opt(_TP)
    max_rolling_batch_size: int = opt("option.max_rolling_batch_size", 64, "max_batch_size",
                                      env=("MAX_BATCH_SIZE",), minimum=1)
    max_model_len: int | None = opt("option.max_model_len", None, "max_seq_len", minimum=1,
                                    default_text="the model's")
    enable_prefix_caching: bool = opt("option.enable_prefix_caching", True,
                                      "KV cache block reuse")

    def engine_kwargs(self) -> dict[str, Any]:
        assert isinstance(self.tensor_parallel_degree, int), "TP max is resolved at selection"
        return dict(dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_degree,
                    max_batch_size=self.max_rolling_batch_size, max_seq_len=self.max_model_len,
                    enable_block_reuse=self.enable_prefix_caching)


@dataclass(frozen=True, kw_only=True)
class NeuronXOptions:
    """neuronx-distributed-inference on AWS Trainium / Inferentia2 (engines/neuronx/)."""

    dtype: str = _opt(_DTYPE)
    tensor_parallel_degree: int | str = _opt(_TP)
    max_rolling_batch_size: int = opt("option.max_rolling_batch_size", 4,
                                      "batch_size the model is compiled for",
                                      env=("MAX_BATCH_SIZE",), minimum=1)
    n_positions: int = opt("option.n_positions", 2048, "seq_len the model is compiled for",
                           minimum=1)
    neuronx_compiled_path: str | None = opt(
        "option.neuronx_compiled_path", None, "where the compiled model is kept (compiled there "
        "on first load)", default_text="<model dir>/neuronx-compiled")

    def engine_kwargs(self) -> dict[str, Any]:
        assert isinstance(self.tensor_parallel_degree, int), "TP max is resolved at selection"
        return dict(dtype=self.dtype, tp_degree=self.tensor_parallel_degree,
                    batch_size=self.max_rolling_batch_size, seq_len=self.n_positions,
                    compiled_path=self.neuronx_compiled_path)


ENGINE_OPTIONS: dict[str, type] = {"native": NativeOptions, "hf": HFOptions,
                                   "deepspeed": DeepSpeedOptions, "vllm": VLLMOptions,
                                   "trtllm": TRTLLMOptions, "neuronx": NeuronXOptions}

# Every option.* key the default LLM handler and its engines may read.
LLM_OPTION_KEYS = frozenset().union(
    keys_of(HandlerOptions), {k for k in keys_of(ServingOptions) if k.startswith("option.")},
    *(keys_of(c) for c in ENGINE_OPTIONS.values()))


# ---- environment --------------------------------------------------------------------------------

# OPTION_* names whose key is not simply the lower-cased suffix.
OPTION_ENV_SPECIAL = {"OPTION_ENTRYPOINT": "option.entryPoint", "OPTION_ENGINE": "engine"}
# SERVING_* variables that DJL/LMI images set for the JVM; harmless here, so ignored by name
# rather than reported as unknown.
IGNORED_SERVING_ENV = frozenset({"SERVING_OPTS", "SERVING_FEATURES", "SERVING_HOME"})
# Environment variables that stand for a model key, lowest precedence first where two map to
# one key (SM_NUM_GPUS only fills in when TENSOR_PARALLEL_DEGREE is absent).
_MODEL_CLASSES = (ServingOptions, HandlerOptions, *ENGINE_OPTIONS.values())
MODEL_ENV: dict[str, str] = {name: f.opt.key for cls in _MODEL_CLASSES for f in fields_of(cls)
                             for name in f.opt.env if name not in OPTION_ENV_SPECIAL}
# SAGEMAKER_NUM_MODEL_WORKERS sets both worker counts.
MODEL_ENV["SAGEMAKER_NUM_MODEL_WORKERS"] = "minWorkers+maxWorkers"
_ENV_ORDER = {"SM_NUM_GPUS": 0, "TENSOR_PARALLEL_DEGREE": 1}


def environment_settings(env: Mapping[str, str]) -> dict[str, Setting]:
    """Model-level keys from the environment (the lowest-precedence source)."""
    out: dict[str, Setting] = {}
    for name in sorted(env, key=lambda n: _ENV_ORDER.get(n, 0)):
        value = env[name]
        src = f"environment variable {name}"
        if name.startswith("OPTION_"):
            key = OPTION_ENV_SPECIAL.get(name, "option." + name[len("OPTION_"):].lower())
            out[key] = Setting(value, src)
            continue
        key = MODEL_ENV.get(name)
        if key == "minWorkers+maxWorkers":
            out["minWorkers"] = out["maxWorkers"] = Setting(value, src)
        elif key is not None:
            out[key] = Setting(value, src)
        elif (name.startswith("SERVING_") and name not in IGNORED_SERVING_ENV
              and name not in _SERVER_ENV):  # server-level (SERVING_LOAD_MODELS): not a model's
            known = sorted(n for n in all_env_vars() if n.startswith("SERVING_"))
            raise ConfigError(f"unknown {src}{did_you_mean(name, known)}; "
                              f"known SERVING_* variables: {', '.join(known)}")
    return out


_SERVER_ENV = frozenset(name for f in fields_of(ServerOptions) for name in f.opt.env)


def all_env_vars() -> dict[str, str]:
    """Every environment variable LMC reads for configuration -> the key it sets."""
    out = {name: f.opt.key for f in fields_of(ServerOptions) for name in f.opt.env}
    out.update(MODEL_ENV)
    out.update(OPTION_ENV_SPECIAL)
    return out


# ---- documentation ------------------------------------------------------------------------------

_TABLES = (("Server (environment)", ServerOptions), ("Per model, front end", ServingOptions),
           ("Default LLM handler", HandlerOptions), ("native engine", NativeOptions),
           ("hf engine", HFOptions), ("deepspeed engine", DeepSpeedOptions),
           ("vllm engine", VLLMOptions), ("trtllm engine", TRTLLMOptions),
           ("neuronx engine", NeuronXOptions))


def _default_text(f: FieldSpec) -> str:
    if f.opt.default_text is not None:
        return f.opt.default_text
    if f.default is None:
        return "unset"
    if isinstance(f.default, bool):
        return str(f.default).lower()
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def markdown_tables() -> str:
    """The README's option tables."""
    out = []
    for title, cls in _TABLES:
        out += [f"**{title}**", "", "| key | environment | default | meaning |",
                "| --- | --- | --- | --- |"]
        for f in fields_of(cls):
            key = f.opt.key[len("server."):] if f.opt.key.startswith("server.") else f.opt.key
            env = ", ".join(f"`{e}`" for e in f.opt.env)
            meaning = f.opt.meaning.replace("|", "\\|")
            out.append(f"| `{key}` | {env} | {_default_text(f)} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m engines.options --markdown")
    sys.stdout.write(markdown_tables())
