"""Which engine serves a model, decided once at startup in the front end (torch-free: it reads
the model's config.json, never its weights).

LMI's `option.rolling_batch`: auto (default) and our own `native` (also under LMI's names
`lmi-dist` and `scheduler`) pick the native continuous-batching engine when it supports the
architecture, else the `hf` engine with a log line saying why; `disable` (or batch_size > 1,
which means dynamic batching) picks `hf`. `vllm`, `trtllm` and `neuronx` pick those
engines; without their package (or device) that is a startup error naming both, never a silent
substitute.

`engine=DeepSpeed` (serving.properties) or `option.rolling_batch=deepspeed` picks the `deepspeed`
engine (HF model, DeepSpeed AutoTP over the worker group, static batches).

The result, an `LLMPlan` (the handler's options and the engine choice with its typed options),
travels to the worker in the Init frame as plain JSON; the worker builds the engine from it
without parsing a string again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engines.options import (ENGINE_OPTIONS, ConfigError, DeepSpeedOptions, HandlerOptions,
                             HFOptions, NativeOptions, NeuronXOptions, ServingOptions, Setting,
                             TRTLLMOptions, VLLMOptions, parse_options, to_wire)

log = logging.getLogger("lmc.engines")

# option.rolling_batch values served by an engine from another project's package.
EXTERNAL_ENGINES = ("vllm", "trtllm", "neuronx")

EngineOptions = (NativeOptions | HFOptions | DeepSpeedOptions | VLLMOptions | TRTLLMOptions
                 | NeuronXOptions)


@dataclass(frozen=True)
class EngineChoice:
    name: str  # a name in engines/registry.py
    model_dir: str  # the checkpoint the engine loads
    options: EngineOptions
    reason: str = ""

    @property
    def kwargs(self) -> dict[str, Any]:
        """The engine constructor's keyword arguments."""
        return self.options.engine_kwargs()


@dataclass(frozen=True)
class LLMPlan:
    """What the default LLM handler needs from the startup configuration."""

    handler: HandlerOptions
    engine: EngineChoice

    def to_wire(self) -> dict[str, Any]:
        return {"handler": to_wire(self.handler), "engine": {
            "name": self.engine.name, "model_dir": self.engine.model_dir,
            "reason": self.engine.reason, "options": to_wire(self.engine.options)}}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> LLMPlan:
        e = data["engine"]
        options = ENGINE_OPTIONS[e["name"]](**e["options"])
        return cls(HandlerOptions(**data["handler"]),
                   EngineChoice(e["name"], e["model_dir"], options, e["reason"]))


def resolve_model_dir(model_dir: str, handler: HandlerOptions) -> str | None:
    """The checkpoint to load: option.model_id when it is a local dir, else the model dir when it
    holds a config.json; None when there is nothing to load (the worker says so)."""
    if handler.model_id and os.path.isdir(handler.model_id):
        return handler.model_id
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return model_dir
    if handler.model_id:
        raise ConfigError(
            f"option.model_id={handler.model_id} is not a local directory and {model_dir} has "
            "no config.json; point option.model_id at a local model dir (hub downloads are off)")
    return None


def select_engine(model_dir: str, handler: HandlerOptions, settings: Mapping[str, Setting], *,
                  djl_engine: str, batch_size: int, tp: int, cuda: bool) -> EngineChoice:
    """The engine for `model_dir` and its options parsed from `settings` (strictly: a bad value
    is a ConfigError). `tp` is the resolved tensor-parallel degree."""
    rolling = handler.rolling_batch
    if djl_engine == "DeepSpeed" or rolling == "deepspeed":
        if rolling not in ("auto", "deepspeed", "disable"):
            raise ConfigError(f"engine=DeepSpeed cannot run option.rolling_batch={rolling}; use "
                              f"option.rolling_batch=deepspeed (or leave it unset), or another "
                              f"engine")
        why = "engine=DeepSpeed" if rolling != "deepspeed" else "option.rolling_batch=deepspeed"
        return _choice("deepspeed", model_dir, settings, why, tensor_parallel_degree=tp)
    if rolling in EXTERNAL_ENGINES:
        # vLLM, TensorRT-LLM, NeuronX: their own package (and device) or a startup error that
        # names both (engines/backends/requirements.py).
        from engines.backends.requirements import check_available

        check_available(rolling, cuda=cuda)
        return _choice(rolling, model_dir, settings, f"option.rolling_batch={rolling}",
                       tensor_parallel_degree=tp)
    if batch_size > 1:
        return _hf(model_dir, settings, "batch_size > 1 selects dynamic batching", tp)
    if rolling == "disable":
        return _hf(model_dir, settings, "option.rolling_batch=disable", tp)

    from engines.native.spec import UnsupportedModel, check_divisible, read_spec

    try:
        spec, _ = read_spec(model_dir)
    except UnsupportedModel as e:
        if rolling == "native":
            raise ConfigError(f"option.rolling_batch=native: {e}") from None
        log.info("the native engine cannot serve this model (%s); using the hf engine", e)
        return _hf(model_dir, settings, f"auto: {e}", tp)
    if tp > 1:
        try:
            check_divisible(num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                            intermediate_size=spec.intermediate_size, tp_size=tp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    choice = _choice("native", model_dir, settings, f"option.rolling_batch={rolling}",
                     tensor_parallel_degree=tp)
    if choice.options.max_rolling_batch_size is None:
        options = dataclasses.replace(choice.options, max_rolling_batch_size=256 if cuda else 32)
        choice = dataclasses.replace(choice, options=options)
    return choice


def _choice(name: str, model_dir: str, settings: Mapping[str, Setting], reason: str,
            **resolved: Any) -> EngineChoice:
    return EngineChoice(name, model_dir, parse_options(ENGINE_OPTIONS[name], settings, **resolved),
                        reason)


def _hf(model_dir: str, settings: Mapping[str, Setting], reason: str, tp: int) -> EngineChoice:
    if tp > 1:
        raise ConfigError(f"tensor_parallel_degree={tp} needs the native engine, but {reason}; "
                          f"use option.rolling_batch=auto or native with a model it supports, "
                          f"engine=DeepSpeed, or tensor_parallel_degree=1")
    return _choice("hf", model_dir, settings, reason)


def _settings(properties: Mapping[str, str]) -> dict[str, Setting]:
    """Init properties (option keys without their prefix, plus engine and batch_size) as
    settings; other properties (model_dir, ...) are declared by no options class."""
    return {(k if k in ("engine", "batch_size") else f"option.{k}"):
            Setting(str(v), f"init property {k}") for k, v in properties.items()}


def _select(model_dir: str, handler: HandlerOptions, settings: Mapping[str, Setting], *,
            cuda: bool, tp: int | None) -> EngineChoice:
    serving = parse_options(ServingOptions, settings)
    degree = serving.tensor_parallel_degree
    return select_engine(model_dir, handler, settings, djl_engine=serving.engine,
                         batch_size=serving.batch_size,
                         tp=degree if isinstance(degree, int) else (tp or 1), cuda=cuda)


def choose_engine(model_dir: str, options: Mapping[str, str], *, cuda: bool,
                  tp: int | None = None) -> EngineChoice:
    """select_engine over plain strings, as in a handler's init properties. `tp`: the group
    size, for TP "max"."""
    settings = _settings(options)
    return _select(model_dir, parse_options(HandlerOptions, settings), settings, cuda=cuda,
                   tp=tp)


def plan_from_properties(properties: Mapping[str, str], *, cuda: bool,
                         tp: int | None = None) -> LLMPlan:
    """The plan for a default handler the front end did not plan: a model.py whose
    @input_formatter/@output_formatter run on it (the front end never imports a model.py).
    Unknown option keys are the model.py's own, as in LMI."""
    settings = _settings(properties)
    handler = parse_options(HandlerOptions, settings)
    given = properties.get("model_dir") or "."
    model_dir = resolve_model_dir(given, handler)
    if model_dir is None:
        raise ConfigError(f"no model to load: {given} has no config.json and option.model_id "
                          f"is not set")
    return LLMPlan(handler, _select(model_dir, handler, settings, cuda=cuda, tp=tp))
