"""Configuration: serving.properties + environment, merged and parsed once into frozen objects.

LMI precedence: a key in `<model_dir>/serving.properties` wins over the same key from the
environment, and the management API's register call wins over both. Every value remembers where
it came from, so an error can say "batch_size='abc' is not an integer (from
/opt/ml/model/serving.properties line 3)".

What each key means, its type, default and environment variables are declared once, in
engines/options.py; this module reads the sources, rejects keys nobody reads, and decides at
startup (before any worker starts) which engine serves a model, so that a wrong option or engine
choice fails here, naming the key, the value and the file or variable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from container.groups import count_gpus, resolve_tp
from engines import sources
from engines.contracts.names import LMI_BUILTIN_ENTRY_POINTS
from engines.options import (ENGINE_OPTIONS, LLM_OPTION_KEYS, ConfigError, HandlerOptions,
                             ServingOptions, Setting, did_you_mean, environment_settings,
                             keys_of, load_server_options, parse_options)
from engines.selection import EngineChoice, LLMPlan, resolve_model_dir, select_engine

log = logging.getLogger("lmc.config")

PROPERTIES_FILE = "serving.properties"


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

# Non-option keys LMC understands (+ the cpu./gpu. worker counts). Anything else that is not
# `option.*` is a startup error.
_SERVER_KEYS = tuple(sorted(k for k in keys_of(ServingOptions) if not k.startswith("option."))) + (
    "gpu.minWorkers", "gpu.maxWorkers", "cpu.minWorkers", "cpu.maxWorkers")
_FRONT_END_OPTION_KEYS = frozenset(k for k in keys_of(ServingOptions) if k.startswith("option."))


def uses_default_llm_handler(model_dir: Path, entry_point: str | None) -> bool:
    """Whether the default LLM handler will serve this model dir (no custom model.py)."""
    if entry_point:
        return entry_point in LMI_BUILTIN_ENTRY_POINTS
    return not (model_dir / "model.py").is_file()


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ServingOptions):
    """One model's configuration: the front end's typed keys (ServingOptions) plus what goes to
    the worker."""

    name: str
    model_dir: str
    # Every option.* key without its prefix, as given: LMI hands them all to the handler.
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The default LLM handler's options and engine, decided at startup; None for a custom
    # model.py (or a model dir with nothing the default handler can load: the worker says so).
    llm: LLMPlan | None = None
    # The GPUs counted when the config was loaded: the engine plan and the worker layout use
    # the same list (and nvidia-smi runs once).
    gpus: tuple[str, ...] = ()

    @property
    def tp(self) -> int:
        """tensor_parallel_degree resolved against the devices ("max": all of them)."""
        return resolve_tp(self.tensor_parallel_degree, len(self.gpus))

    def init_properties(self) -> dict[str, str]:
        """What the handler's warm-up call receives (LMI: options without prefix + basics)."""
        props = dict(self.options)
        props.update(model_dir=self.model_dir, model_name=self.name, engine=self.engine,
                     batch_size=str(self.batch_size))
        return props


def _check_server_keys(settings: Mapping[str, Setting]) -> None:
    for key, s in settings.items():
        if key.startswith("option.") or key in _SERVER_KEYS:
            continue
        raise ConfigError(f"unknown key {key!r} in {s.source}{did_you_mean(key, _SERVER_KEYS)}; "
                          f"known keys: {', '.join(_SERVER_KEYS)} and option.*")


def _worker_counts(settings: Mapping[str, Setting], device: str) -> dict[str, Setting]:
    """The worker-count settings in effect: device-specific keys win, as in DJL."""
    out = {}
    for plain in ("minWorkers", "maxWorkers"):
        for key in (f"{device}.{plain}", plain):
            if key in settings:
                out[plain] = settings[key]
                break
    return out


def _link_workers(serving: ServingOptions, given: Mapping[str, Setting]) -> ServingOptions:
    lo, hi = serving.min_workers, serving.max_workers
    if "maxWorkers" not in given and "minWorkers" in given:
        hi = max(1, lo)
    if "minWorkers" not in given and "maxWorkers" in given:
        lo = min(1, hi)
    if lo > hi:
        raise ConfigError(f"minWorkers={lo} is greater than maxWorkers={hi}")
    return dataclasses.replace(serving, min_workers=lo, max_workers=hi)


def _llm_plan(model_dir: str, serving: ServingOptions, settings: Mapping[str, Setting], *,
              gpus: list[str]) -> LLMPlan | None:
    """The default LLM handler's plan, checking every option.* key against what it and the
    chosen engine read."""
    options = {k: s for k, s in settings.items() if k.startswith("option.")}
    for key, s in options.items():
        if key not in LLM_OPTION_KEYS:
            raise ConfigError(
                f"unknown key {key!r} in {s.source}{did_you_mean(key, LLM_OPTION_KEYS)}; the "
                f"default LLM handler reads: {', '.join(sorted(LLM_OPTION_KEYS))} (a custom "
                f"model.py may use any option.* key)")
    handler = parse_options(HandlerOptions, settings)
    engine_dir = resolve_model_dir(model_dir, handler)
    if engine_dir is None:
        return None
    tp = resolve_tp(serving.tensor_parallel_degree, len(gpus))  # as ModelConfig.tp
    choice = select_engine(engine_dir, handler, settings, djl_engine=serving.engine,
                           batch_size=serving.batch_size, tp=tp, cuda=bool(gpus))
    _check_engine_reads(choice, options)
    return LLMPlan(handler, choice)


_SELECT_HINT = {"native": "option.rolling_batch=native", "hf": "option.rolling_batch=disable",
                "deepspeed": "engine=DeepSpeed", "vllm": "option.rolling_batch=vllm",
                "trtllm": "option.rolling_batch=trtllm", "neuronx": "option.rolling_batch=neuronx"}


def _check_engine_reads(choice: EngineChoice, options: Mapping[str, Setting]) -> None:
    """An option only another engine reads would be silently ignored: refuse it instead."""
    read = keys_of(HandlerOptions) | _FRONT_END_OPTION_KEYS | keys_of(type(choice.options))
    for key, s in options.items():
        if key in read:
            continue
        readers = [name for name, cls in ENGINE_OPTIONS.items() if key in keys_of(cls)]
        hint = " or ".join(_SELECT_HINT[r] for r in readers)
        raise ConfigError(
            f"{key}={s.value!r} (from {s.source}) is read by the {', '.join(readers)} "
            f"engine{'s' if len(readers) > 1 else ''}, but this model is served by the {choice.name} engine ({choice.reason}); "
            f"remove the key, or select the engine that reads it ({hint})")


def _fetched(value: str, source: str, cache_dir: str, revision: Setting | None) -> Path:
    """A remote model fetched, checked to hold something LMC can serve. `revision`
    (HF_REVISION / option.revision) pins a hub id's revision."""
    local = sources.fetch(value, cache_dir=cache_dir, source=source,
                          revision=revision.value if revision else None)
    if not any((local / f).is_file() for f in ("config.json", "model.py", PROPERTIES_FILE)):
        raise sources.SourceError(
            f"{source}={value}: what arrived ({local}) has no config.json, no model.py and no "
            f"serving.properties; point it at the folder that holds the model's files")
    return local


def build_model_config(name: str, model_dir: str | Path, settings: Mapping[str, Setting], *,
                       device: str = "cpu", gpus: list[str] | None = None) -> ModelConfig:
    """Turn merged settings into a ModelConfig, rejecting unknown keys and bad values."""
    _check_server_keys(settings)
    workers = _worker_counts(settings, device)
    serving = _link_workers(parse_options(ServingOptions, {**settings, **workers}), workers)
    options = {k[len("option."):]: s.value for k, s in settings.items() if k.startswith("option.")}
    gpus = [] if gpus is None else gpus
    llm = None
    entry = settings.get("option.entryPoint")
    if uses_default_llm_handler(Path(model_dir), entry.value if entry else None):
        llm = _llm_plan(str(model_dir), serving, settings, gpus=gpus)
    return ModelConfig(**vars(serving), name=name, model_dir=str(model_dir),
                       options=MappingProxyType(options), llm=llm, gpus=tuple(gpus))


def load_model_config(name: str, model_dir: str | Path, env: Mapping[str, str] | None = None,
                      *, overrides: Mapping[str, str] | None = None,
                      device: str | None = None, gpus: list[str] | None = None,
                      source: str = "model", cache_dir: str | None = None) -> ModelConfig:
    """serving.properties in `model_dir` over the environment; `overrides` (e.g. from the
    management API's register call) win over both. `gpus`: the GPUs this server may use
    (default: counted from the environment).

    A `model_dir` or option.model_id that names a remote source (s3://, .tar.gz, a hub id) is
    fetched here first, into `cache_dir` (default $LMC_CACHE); this blocks, so the front end
    calls it on a thread. Fetch failures raise SourceError."""
    env = os.environ if env is None else env
    cache_dir = cache_dir or load_server_options(env).cache_dir
    settings = environment_settings(env)
    revision = settings.get("option.revision")
    if sources.is_remote(str(model_dir)):
        model_dir = _fetched(str(model_dir), source, cache_dir, revision)
    settings.update(read_properties_file(Path(model_dir)))
    for k, v in (overrides or {}).items():
        settings[k] = Setting(str(v), "the register request")
    model_id = settings.get("option.model_id")
    if model_id is not None and model_id.value and sources.is_remote(model_id.value):
        local = _fetched(model_id.value, "option.model_id", cache_dir,
                         settings.get("option.revision"))
        settings["option.model_id"] = Setting(str(local), f"{model_id.source}, fetched from "
                                                          f"{model_id.value}")
    gpus = count_gpus(env) if gpus is None else gpus
    return build_model_config(name, model_dir, settings, gpus=gpus,
                              device=device or ("gpu" if gpus else "cpu"))


# ---------------------------------------------------------------------------------------------
# Which models to serve
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_dir: str  # a local directory, or a source to fetch first (engines/sources)
    source: str = "--model-dir"  # where the user named it, for messages


SAGEMAKER_MODEL_DIR = "/opt/ml/model"


def _local_dir(value: str, source: str) -> Path:
    path = Path(value[len("file://"):] if value.startswith("file://") else value).expanduser()
    if path.is_dir():
        return path.resolve()
    raise ConfigError(f"{source}={value!r} is not a directory")


def _model_source(value: str, source: str) -> str:
    """A local model dir (resolved), or a source fetched at registration: s3://, a .tar.gz,
    a hub id."""
    if sources.is_remote(value):
        return value
    path = _local_dir(value, source)
    return str(path)


def _name_for(value: str) -> str:
    stem = value.rstrip("/").rsplit("/", 1)[-1]
    for suffix in sources.ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[:-len(suffix)]
    return re.sub(r"[^\w.-]", "_", stem) or "model"


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
        where = _model_source(entry, "SERVING_LOAD_MODELS entry")
        specs.append(ModelSpec(name or _name_for(where), where, "SERVING_LOAD_MODELS entry"))
    return specs


def resolve_models(*, model_dir: str | None, model_store: str | None,
                   env: Mapping[str, str] | None = None,
                   sagemaker_dir: str = SAGEMAKER_MODEL_DIR) -> list[ModelSpec] | None:
    """Which models to serve, in order: --model-dir, HF_MODEL_ID, /opt/ml/model if it holds
    anything, SERVING_LOAD_MODELS / a model store. None means: serve the default model."""
    env = os.environ if env is None else env
    if model_dir:
        where = _model_source(model_dir, "--model-dir")
        return [ModelSpec(_name_for(where), where, "--model-dir")]
    if env.get("HF_MODEL_ID"):
        where = _model_source(env["HF_MODEL_ID"], "HF_MODEL_ID")
        return [ModelSpec(_name_for(where), where, "HF_MODEL_ID")]
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
                specs.append(ModelSpec(_name_for(str(sub)), str(sub.resolve()), "model store"))
        if not specs:
            raise ConfigError(f"model store {root} has no model folders")
    return specs or None
