"""A PEFT LoRA adapter directory, read and checked without torch.

    adapter_config.json          PEFT's LoraConfig (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    lora_A / lora_B weights (else adapter_model.bin)

`read_adapter` refuses, at registration and naming the field or module, everything LMC cannot
apply exactly: DoRA, modules_to_save, LoRA on embeddings or the LM head, per-module rank or alpha
patterns, biases, a rank above option.max_lora_rank, weights whose shapes do not fit the base
model. An adapter is never silently served as the base model.

The front end runs these checks before any worker sees the adapter (the safetensors header is
plain JSON, so shapes are checked here too); a `.bin` adapter's shapes are checked by the worker
after loading it (engines/lora/weights.py), with the same `check_shapes`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from engines.contracts.errors import InvalidAdapter
from engines.native.spec import ModelSpec, UnsupportedModel, read_spec

# The Llama-family linear modules an adapter may target, in the order the native engine fuses
# them (q|k|v, o, gate|up, down).
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# PEFT's key for one LoRA matrix: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

# LoraConfig fields that change what the adapter computes in ways LMC does not implement:
# any truthy value is refused by name. (field -> what it is, for the message)
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layers_to_transform": "LoRA on a subset of layers (layers_to_transform)",
    "layer_replication": "layer replication",
    "fan_in_fan_out": "transposed (Conv1D-style) weights",
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
}


@dataclass(frozen=True)
class AdapterSpec:
    """What LMC applies: ΔW = scale · B A on each targeted module."""

    path: str
    rank: int
    alpha: float
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    targets: tuple[str, ...]  # in MODULES order
    weights_file: str
    base_model: str | None  # base_model_name_or_path, informational


def _fail(field: str, message: str) -> InvalidAdapter:
    return InvalidAdapter(field, message)


def read_adapter(path: str | Path, *, max_rank: int,
                 base: ModelSpec | str | Path | None = None) -> AdapterSpec:
    """The adapter at `path`, checked against option.max_lora_rank and (when given: a spec or a
    model dir) the base model's shapes. Raises InvalidAdapter naming what cannot be applied."""
    path = Path(path)
    where = f"adapter {path}"
    if not path.is_dir():
        raise _fail("src", f"{where} is not a directory (a PEFT LoRA adapter is a directory with "
                           f"{CONFIG_FILE} and {SAFETENSORS_FILE})")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise _fail("src", f"{where} has no {CONFIG_FILE}: not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise _fail(CONFIG_FILE, f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _fail(CONFIG_FILE, f"{cfg_path} must hold a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _fail("peft_type", f"{where}: peft_type={peft_type} is not a LoRA adapter; only "
                                 f"LORA adapters can be served")
    for name, what in _UNSUPPORTED.items():
        if cfg.get(name):
            raise _fail(name, f"{where}: {name}={cfg[name]!r}: {what} is not supported; retrain "
                              f"without it (or merge the adapter into the model)")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise _fail("bias", f"{where}: bias={bias!r}: LoRA bias training is not supported "
                            f"(bias must be 'none')")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _fail("r", f"{where}: r={rank!r} must be an integer >= 1")
    if rank > max_rank:
        raise _fail("r", f"{where}: rank r={rank} is above option.max_lora_rank={max_rank}; "
                         f"raise option.max_lora_rank to at least {rank}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail("lora_alpha", f"{where}: lora_alpha={alpha!r} must be a number")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    declared = _declared_targets(cfg.get("target_modules"), where)

    weights = path / SAFETENSORS_FILE
    shapes: dict[str, list[int]] | None = None
    if weights.is_file():
        shapes = safetensors_shapes(weights)
    elif (path / BIN_FILE).is_file():
        weights = path / BIN_FILE  # shapes are checked after loading (weights_only=True)
    else:
        raise _fail("src", f"{where} has no {SAFETENSORS_FILE} (or {BIN_FILE})")
    targets = declared
    if shapes is not None:
        found = check_keys(shapes, where)
        extra = sorted(set(found) - set(declared)) if declared else []
        if extra:
            raise _fail("target_modules", f"{where}: weights for {extra[0]} but target_modules "
                                          f"is {list(declared)}")
        targets = tuple(m for m in MODULES if m in found)
    if not targets:
        raise _fail("target_modules", f"{where}: the adapter targets none of {', '.join(MODULES)}")
    spec = AdapterSpec(str(path), rank, float(alpha), float(scale), targets, str(weights),
                       cfg.get("base_model_name_or_path"))
    if base is not None and shapes is not None:
        check_shapes(spec, shapes, _base_spec(base))
    return spec


def _declared_targets(value, where: str) -> tuple[str, ...]:
    """target_modules as module names; () when it is a regex (the weights then say)."""
    if value in ("all-linear", None):
        return MODULES if value == "all-linear" else ()
    if isinstance(value, str):
        return ()  # a regex over module names: the weight keys are authoritative
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise _fail("target_modules", f"{where}: target_modules={value!r} must be a list of "
                                      f"module names")
    for m in value:
        short = m.rsplit(".", 1)[-1]
        if short not in MODULES:
            raise _fail("target_modules", f"{where}: target module {m!r} is not supported; "
                                          f"LoRA applies to {', '.join(MODULES)}")
    return tuple(mod for mod in MODULES if mod in {m.rsplit('.', 1)[-1] for m in value})


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (8-byte length + JSON)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise _fail("src", f"{path} is not a readable safetensors file: {e}") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_keys(shapes: dict[str, list[int]], where: str) -> dict[str, int]:
    """Every weight must be a lora_A/lora_B of a supported module; module -> its count."""
    found: dict[str, int] = {}
    for key in shapes:
        m = _KEY.match(key)
        if m is None:
            what = ("a DoRA magnitude vector" if "lora_magnitude_vector" in key
                    else "LoRA on embeddings" if "lora_embedding" in key else "a weight")
            raise _fail("target_modules", f"{where}: {key!r} is {what} LMC cannot apply; LoRA "
                                          f"applies to {', '.join(MODULES)} of the decoder layers")
        _, parent, module, _ = m.groups()
        if module not in MODULES or _PARENT[module] != parent:
            raise _fail("target_modules", f"{where}: target module {parent}.{module} is not "
                                          f"supported; LoRA applies to {', '.join(MODULES)}")
        found[module] = found.get(module, 0) + 1
    return found


def module_dims(base: ModelSpec) -> dict[str, tuple[int, int]]:
    """module -> (in_features, out_features) of the base model's linear layers."""
    q = base.num_heads * base.head_dim
    kv = base.num_kv_heads * base.head_dim
    h, ff = base.hidden_size, base.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}


def check_shapes(spec: AdapterSpec, shapes: dict[str, list[int]] | dict[str, tuple],
                 base: ModelSpec) -> None:
    """Each lora_A is [r, in] and each lora_B [out, r] of the base model's module, in a layer the
    base model has; else InvalidAdapter naming the weight and both shapes."""
    dims = module_dims(base)
    where = f"adapter {spec.path}"
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if m is None:
            continue  # check_keys has refused it already (or a .bin without one)
        layer, _, module, ab = m.groups()
        if int(layer) >= base.num_layers:
            raise _fail("base_model", f"{where}: {key} is for layer {layer}, but the base model "
                                      f"has {base.num_layers} layers: a different base model")
        fan_in, fan_out = dims[module]
        want = [spec.rank, fan_in] if ab == "A" else [fan_out, spec.rank]
        if list(shape) != want:
            raise _fail("base_model", f"{where}: {key} has shape {list(shape)} but this base "
                                      f"model needs {want} (r={spec.rank}, {module} is "
                                      f"{fan_in} -> {fan_out}): the adapter was trained for "
                                      f"another base model or rank")


def _base_spec(base: ModelSpec | str | Path) -> ModelSpec:
    if isinstance(base, ModelSpec):
        return base
    return read_spec(base)[0]


def base_spec_or_none(model_dir: str | Path) -> ModelSpec | None:
    """The base model's spec when it is a Llama-family model the shape checks understand."""
    try:
        return read_spec(model_dir)[0]
    except (UnsupportedModel, OSError, KeyError, ValueError):
        return None
