"""Configuration: serving.properties + environment, parsed once into frozen objects.

LMI precedence: a key in `<model_dir>/serving.properties` wins over the same key from the
environment. Every value remembers where it came from, so an error can say
"batch_size='abc' from serving.properties (/opt/ml/model/serving.properties) is not an integer".

All environment variables LMC reads are declared in ENV_VARS below (name, key, meaning); nothing
else in the project reads os.environ for configuration.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from engines.contracts.names import LMI_BUILTIN_ENTRY_POINTS

log = logging.getLogger("lmc.config")

PROPERTIES_FILE = "serving.properties"


class ConfigError(Exception):
    """A configuration problem found at startup; the message names the key, value and source."""


# ---------------------------------------------------------------------------------------------
# Environment variables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvVar:
    name: str
    key: str  # the serving.properties key it maps to, or "server.<x>" for server-level settings
    meaning: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("HF_MODEL_ID", "option.model_id", "model: a local directory (s3:// and hub ids later)"),
    EnvVar("HF_REVISION", "option.revision", "model revision"),
    EnvVar("HF_MODEL_TRUST_REMOTE_CODE", "option.trust_remote_code", "allow model code"),
    EnvVar("TENSOR_PARALLEL_DEGREE", "option.tensor_parallel_degree", "ranks per group, int|max"),
    EnvVar("SM_NUM_GPUS", "option.tensor_parallel_degree", "SageMaker's GPU count (TP fallback)"),
    EnvVar("MAX_BATCH_SIZE", "option.max_rolling_batch_size", "max running requests"),
    EnvVar("MAX_CONCURRENT_REQUESTS", "job_queue_size", "bounded queue size per model"),
    EnvVar("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", "option.predict_timeout", "s per request"),
    EnvVar("SAGEMAKER_STARTUP_TIMEOUT", "option.model_loading_timeout", "s to load a model"),
    EnvVar("SAGEMAKER_NUM_MODEL_WORKERS", "minWorkers+maxWorkers", "fixed worker count"),
    EnvVar("SERVING_JOB_QUEUE_SIZE", "job_queue_size", "bounded queue size per model"),
    EnvVar("SERVING_BATCH_SIZE", "batch_size", "dynamic batch size"),
    EnvVar("SERVING_MAX_BATCH_DELAY", "max_batch_delay", "ms to wait filling a batch"),
    EnvVar("SERVING_MAX_IDLE_TIME", "max_idle_time", "s before an idle extra worker stops"),
    EnvVar("SERVING_MIN_WORKERS", "minWorkers", "permanent workers"),
    EnvVar("SERVING_MAX_WORKERS", "maxWorkers", "workers under load"),
    EnvVar("SERVING_RETRY_THRESHOLD", "retry_threshold", "worker crashes before FAILED"),
    EnvVar("SERVING_LOAD_MODELS", "server.load_models", "comma list of [name=]path|name::E=url"),
    EnvVar("SERVING_MODEL_STORE", "server.model_store", "dir whose subfolders are models"),
    EnvVar("SAGEMAKER_BIND_TO_PORT", "server.port", "listen port (default 8080)"),
    EnvVar("SAGEMAKER_MAX_REQUEST_SIZE", "server.max_request_size", "max body bytes"),
    EnvVar("SAGEMAKER_MAX_PAYLOAD_IN_MB", "server.max_request_size", "max body MiB"),
    EnvVar("LMC_CACHE", "server.cache_dir", "cache dir (default ~/.cache/lmc)"),
    EnvVar("LMC_LOG_LEVEL", "server.log_level", "logging level (default INFO)"),
    EnvVar("LMC_CPU_DEVICES", "server.cpu_devices", "CPU rank slots for TP groups (default TP)"),
    EnvVar("LMC_MPIRUN", "server.mpirun", "mpirun to launch TP groups (default: on PATH)"),
)

_ENV_BY_NAME = {e.name: e for e in ENV_VARS}

# SERVING_* variables that DJL/LMI images set for the JVM; harmless here, so ignored by name
# rather than reported as unknown.
_IGNORED_SERVING_ENV = {"SERVING_OPTS", "SERVING_FEATURES", "SERVING_HOME"}

# OPTION_* names whose key is not simply the lower-cased suffix.
_OPTION_ENV_SPECIAL = {"OPTION_ENTRYPOINT": "option.entryPoint", "OPTION_ENGINE": "engine"}


@dataclass(frozen=True)
class Setting:
    value: str
    source: str  # human-readable origin, used in error messages


def environment_settings(env: Mapping[str, str]) -> dict[str, Setting]:
    """Model-level keys from the environment (lowest precedence)."""
    out: dict[str, Setting] = {}
    # SM_NUM_GPUS only fills in when TENSOR_PARALLEL_DEGREE is absent, hence the order.
    for name in sorted(env, key=lambda n: n == "TENSOR_PARALLEL_DEGREE"):
        value = env[name]
        src = f"environment variable {name}"
        if name.startswith("OPTION_"):
            key = _OPTION_ENV_SPECIAL.get(name, "option." + name[len("OPTION_"):].lower())
            out[key] = Setting(value, src)
            continue
        var = _ENV_BY_NAME.get(name)
        if var is None:
            if name.startswith("SERVING_") and name not in _IGNORED_SERVING_ENV:
                known = [e.name for e in ENV_VARS if e.name.startswith("SERVING_")]
                raise ConfigError(f"unknown {src}{_did_you_mean(name, known)}; "
                                  f"known SERVING_* variables: {', '.join(known)}")
            continue
        if var.key.startswith("server."):
            continue
        if var.key == "minWorkers+maxWorkers":
            out["minWorkers"] = out["maxWorkers"] = Setting(value, src)
        else:
            out[var.key] = Setting(value, src)
    return out


# ---------------------------------------------------------------------------------------------
# serving.properties
# ---------------------------------------------------------------------------------------------


def parse_properties(text: str, source: str) -> dict[str, Setting]:
    """Java-properties subset used by serving.properties: `key=value` or `key: value` lines,
    `#`/`!` comments, blank lines, trailing-backslash continuation."""
    out: dict[str, Setting] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + lines[i].strip()
            i += 1
        if not line or line[0] in "#!":
            continue
        m = re.match(r"([^=:\s]+)\s*[=:]\s*(.*)$", line)
        if not m:
            raise ConfigError(f"{source} line {lineno}: cannot parse {line!r}; expected key=value")
        out[m.group(1)] = Setting(m.group(2).strip(), f"{source} line {lineno}")
    return out


def read_properties_file(model_dir: Path) -> dict[str, Setting]:
    path = model_dir / PROPERTIES_FILE
    if not path.is_file():
        return {}
    return parse_properties(path.read_text(encoding="utf-8"), str(path))


# ---------------------------------------------------------------------------------------------
# Typed model configuration
# ---------------------------------------------------------------------------------------------

ENGINES = ("Python", "MPI", "DeepSpeed")

# Non-option keys LMC understands. Anything else that is not `option.*` is a startup error.
_SERVER_KEYS = (
    "engine", "job_queue_size", "batch_size", "max_batch_delay", "max_idle_time",
    "minWorkers", "maxWorkers", "gpu.minWorkers", "gpu.maxWorkers", "cpu.minWorkers",
    "cpu.maxWorkers", "retry_threshold",
)



# option.* keys the default LLM handler and its engines read. A custom model.py may use any
# option (LMI passes them all to it), so this list only applies when the default handler runs.
LLM_OPTIONS: dict[str, str] = {
    "model_id": "local model directory (default: the model dir)",
    "revision": "model revision (set by HF_REVISION; unused for local directories)",
    # Accepted so LMI configs load; LMC loads models with transformers' own classes and never
    # runs code shipped with a model, whatever this says.
    "trust_remote_code": "accepted for LMI compatibility; model code is never run",
    "entryPoint": "handler: a file, a module or an LMI built-in name",
    "dtype": "auto | fp32 | fp16 | bf16",
    "tensor_parallel_degree": "ranks per worker group, int or max",
    "rolling_batch": "auto | native | lmi-dist | scheduler | deepspeed | disable",
    "max_rolling_batch_size": "most requests running at once (native engine)",
    "max_rolling_batch_prefill_tokens": "token budget per step (native engine)",
    "cpu_kv_cache_gb": "KV cache size on CPU (native engine)",
    "gpu_memory_utilization": "share of free GPU memory for the KV cache (native engine)",
    "enable_prefix_caching": "true | false (native engine)",
    "attention_backend": "auto | triton | torch: decode attention (native engine)",
    "enforce_eager": "true: no CUDA graphs (native engine)",
    "output_formatter": "json | jsonlines | sse | *_chat | none | module:function",
    "tgi_compat": "true: TGI-shaped answers",
    "predict_timeout": "s for a request's first byte",
    "model_loading_timeout": "s to load the model",
}


def uses_default_llm_handler(model_dir: Path, options: Mapping[str, str]) -> bool:
    """Whether the default LLM handler will serve this model dir (no custom model.py)."""
    entry = options.get("entryPoint")
    if entry:
        return entry in LMI_BUILTIN_ENTRY_POINTS
    return not (model_dir / "model.py").is_file()


def _check_llm_options(model_dir: Path, settings: Mapping[str, Setting]) -> None:
    options = {k[len("option."):]: s for k, s in settings.items() if k.startswith("option.")}
    if not uses_default_llm_handler(model_dir, {k: s.value for k, s in options.items()}):
        return
    for key, s in options.items():
        if key not in LLM_OPTIONS:
            known = [f"option.{k}" for k in LLM_OPTIONS]
            raise ConfigError(
                f"unknown key 'option.{key}' in {s.source}"
                f"{_did_you_mean('option.' + key, known)}; the default LLM handler reads: "
                f"{', '.join(known)} (a custom model.py may use any option.* key)")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model_dir: str
    engine: str = "Python"
    job_queue_size: int = 1000
    batch_size: int = 1
    max_batch_delay_ms: int = 100
    max_idle_time_s: int = 60
    min_workers: int = 1
    max_workers: int = 1
    retry_threshold: int = 10
    predict_timeout_s: float = 120.0
    model_loading_timeout_s: float = 1800.0
    # Every option.* key without its prefix; engines validate their own subset.
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def init_properties(self) -> dict[str, str]:
        """What the handler's warm-up call receives (LMI: options without prefix + basics)."""
        props = dict(self.options)
        props.update(model_dir=self.model_dir, model_name=self.name, engine=self.engine,
                     batch_size=str(self.batch_size))
        return props


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_number(key: str, s: Setting, conv, *, minimum):
    try:
        v = conv(s.value)
    except ValueError:
        kind = "an integer" if conv is int else "a number"
        raise ConfigError(f"{key}={s.value!r} from {s.source} is not {kind}") from None
    if v < minimum:
        raise ConfigError(f"{key}={s.value!r} from {s.source} must be >= {minimum}")
    return v


def _as_int(key: str, s: Setting, *, minimum: int = 0) -> int:
    return _as_number(key, s, int, minimum=minimum)


def _as_float(key: str, s: Setting, *, minimum: float = 0.0) -> float:
    return _as_number(key, s, float, minimum=minimum)


def _env_int(env: Mapping[str, str], name: str, *, minimum: int) -> int:
    return _as_int(name, Setting(env[name], f"environment variable {name}"), minimum=minimum)


def build_model_config(name: str, model_dir: str | Path, settings: Mapping[str, Setting], *,
                       device: str = "cpu") -> ModelConfig:
    """Turn merged settings into a ModelConfig, rejecting unknown keys and bad values."""
    for key, s in settings.items():
        if key.startswith("option.") or key in _SERVER_KEYS:
            continue
        raise ConfigError(f"unknown key {key!r} in {s.source}{_did_you_mean(key, _SERVER_KEYS)}; "
                          f"known keys: {', '.join(_SERVER_KEYS)} and option.*")

    kw: dict = {}
    if "engine" in settings:
        s = settings["engine"]
        match = {e.lower(): e for e in ENGINES}.get(s.value.lower())
        if match is None:
            raise ConfigError(f"engine={s.value!r} from {s.source} is not one of {', '.join(ENGINES)}")
        kw["engine"] = match
    ints = {"job_queue_size": ("job_queue_size", 1), "batch_size": ("batch_size", 1),
            "max_batch_delay": ("max_batch_delay_ms", 0), "max_idle_time": ("max_idle_time_s", 0),
            "retry_threshold": ("retry_threshold", 1)}
    for key, (attr, minimum) in ints.items():
        if key in settings:
            kw[attr] = _as_int(key, settings[key], minimum=minimum)

    # Device-specific worker counts win over the plain keys, as in DJL.
    for attr, plain in (("min_workers", "minWorkers"), ("max_workers", "maxWorkers")):
        for key in (f"{device}.{plain}", plain):
            if key in settings:
                kw[attr] = _as_int(key, settings[key], minimum=0 if attr == "min_workers" else 1)
                break
    if "max_workers" not in kw and "min_workers" in kw:
        kw["max_workers"] = max(1, kw["min_workers"])
    if "min_workers" not in kw and "max_workers" in kw:
        kw["min_workers"] = min(1, kw["max_workers"])
    if kw.get("min_workers", 1) > kw.get("max_workers", 1):
        raise ConfigError(f"minWorkers={kw['min_workers']} is greater than "
                          f"maxWorkers={kw['max_workers']}")

    options = {k[len("option."):]: s.value for k, s in settings.items() if k.startswith("option.")}
    for key, attr in (("predict_timeout", "predict_timeout_s"),
                      ("model_loading_timeout", "model_loading_timeout_s")):
        if key in options:
            kw[attr] = _as_float(f"option.{key}", settings[f"option.{key}"], minimum=0.001)
    if "tensor_parallel_degree" in options:
        s = settings["option.tensor_parallel_degree"]
        if s.value != "max":
            _as_int("option.tensor_parallel_degree", s, minimum=1)
    return ModelConfig(name=name, model_dir=str(model_dir), options=MappingProxyType(options), **kw)


def load_model_config(name: str, model_dir: str | Path, env: Mapping[str, str] | None = None,
                      *, overrides: Mapping[str, str] | None = None,
                      device: str = "cpu") -> ModelConfig:
    """serving.properties in `model_dir` over the environment; `overrides` (e.g. from the
    management API's register call) win over both."""
    env = os.environ if env is None else env
    settings = environment_settings(env)
    settings.update(read_properties_file(Path(model_dir)))
    for k, v in (overrides or {}).items():
        settings[k] = Setting(str(v), "the register request")
    config = build_model_config(name, model_dir, settings, device=device)
    _check_llm_options(Path(model_dir), settings)
    return config


# ---------------------------------------------------------------------------------------------
# Server configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    max_request_size: int = 64 * 1024 * 1024
    cache_dir: str = str(Path.home() / ".cache" / "lmc")
    log_level: str = "INFO"


def load_server_config(env: Mapping[str, str] | None = None, *, host: str | None = None,
                       port: int | None = None) -> ServerConfig:
    env = os.environ if env is None else env
    kw: dict = {}
    if host:
        kw["host"] = host
    if port is not None:
        kw["port"] = port
    elif "SAGEMAKER_BIND_TO_PORT" in env:
        kw["port"] = _env_int(env, "SAGEMAKER_BIND_TO_PORT", minimum=1)
    if "SAGEMAKER_MAX_REQUEST_SIZE" in env:
        kw["max_request_size"] = _env_int(env, "SAGEMAKER_MAX_REQUEST_SIZE", minimum=1)
    elif "SAGEMAKER_MAX_PAYLOAD_IN_MB" in env:
        kw["max_request_size"] = 1024 * 1024 * _env_int(env, "SAGEMAKER_MAX_PAYLOAD_IN_MB",
                                                        minimum=1)
    if env.get("LMC_CACHE"):
        kw["cache_dir"] = env["LMC_CACHE"]
    if env.get("LMC_LOG_LEVEL"):
        kw["log_level"] = env["LMC_LOG_LEVEL"].upper()
    return ServerConfig(**kw)


# ---------------------------------------------------------------------------------------------
# Which models to serve
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_dir: str


SAGEMAKER_MODEL_DIR = "/opt/ml/model"


def _local_dir(value: str, source: str) -> Path:
    path = Path(value[len("file://"):] if value.startswith("file://") else value).expanduser()
    if path.is_dir():
        return path.resolve()
    if value.startswith("s3://") or re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        raise ConfigError(f"{source}={value!r}: only local model directories can be served on "
                          f"this build (no access to S3 or the Hugging Face hub); mount the model "
                          f"and point to its directory, e.g. -v $PWD/model:{SAGEMAKER_MODEL_DIR}")
    raise ConfigError(f"{source}={value!r} is not a directory")


def _name_for(path: Path) -> str:
    return re.sub(r"[^\w.-]", "_", path.name) or "model"


def parse_load_models(value: str) -> list[ModelSpec]:
    """SERVING_LOAD_MODELS: comma-separated `path`, `name=path` or DJL's `name::Engine=url`."""
    specs = []
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name = None
        if "::" in entry:
            name, rest = entry.split("::", 1)
            entry = rest.split("=", 1)[1] if "=" in rest else rest
        elif "=" in entry and not entry.startswith(("/", ".", "file:")):
            name, entry = entry.split("=", 1)
        path = _local_dir(entry, "SERVING_LOAD_MODELS entry")
        specs.append(ModelSpec(name or _name_for(path), str(path)))
    return specs


def resolve_models(*, model_dir: str | None, model_store: str | None,
                   env: Mapping[str, str] | None = None,
                   sagemaker_dir: str = SAGEMAKER_MODEL_DIR) -> list[ModelSpec] | None:
    """Which models to serve, in order: --model-dir, HF_MODEL_ID, /opt/ml/model if it holds
    anything, SERVING_LOAD_MODELS / a model store. None means: serve the default model."""
    env = os.environ if env is None else env
    if model_dir:
        path = _local_dir(model_dir, "--model-dir")
        return [ModelSpec(_name_for(path), str(path))]
    if env.get("HF_MODEL_ID"):
        path = _local_dir(env["HF_MODEL_ID"], "HF_MODEL_ID")
        return [ModelSpec(_name_for(path), str(path))]
    sm = Path(sagemaker_dir)
    if sm.is_dir() and any(sm.iterdir()):
        return [ModelSpec("model", str(sm))]
    specs: list[ModelSpec] = []
    if env.get("SERVING_LOAD_MODELS"):
        specs += parse_load_models(env["SERVING_LOAD_MODELS"])
    store = model_store or env.get("SERVING_MODEL_STORE")
    if store:
        root = _local_dir(store, "model store")
        taken = {s.name for s in specs}
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name not in taken:
                specs.append(ModelSpec(_name_for(sub), str(sub.resolve())))
        if not specs:
            raise ConfigError(f"model store {root} has no model folders")
    return specs or None
