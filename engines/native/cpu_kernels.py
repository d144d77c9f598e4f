"""The native engine's C++ CPU kernels (csrc/), built on first use with the system compiler.

    decode_attention(q [B, H, D], kbuf [B, KV, D, C], vbuf [B, KV, C, D], lens [B] int64,
        scale, window) -> [B, H, D]: one query per sequence over its decode buffer (fp32 or
        bf16 in memory, fp32 arithmetic); see csrc/decode_attention.cpp.
    int8_linear(x [M, K], q [P, K, 64] int8, scale [P * 64] fp32, n) -> [M, N]: weight-only
        int8 matmul (option.quantize=int8), fp32 arithmetic; see csrc/int8_linear.cpp.
    int4_linear(x, q [P, K, 32] uint8, scale, low [P, K/G, 64], n) -> [M, N]: group-wise 4-bit
        (option.quantize=int4*); see csrc/int4_linear.cpp.
    rms_norm(x, w, eps), add_rms_norm_(x, delta, w, eps): transformers' RMSNorm in one op (the
        second adds the residual into x first); see csrc/rms_norm.cpp.

The sources are compiled with -O3 -march=native through torch.utils.cpp_extension into
$LMC_KERNEL_CACHE (default $LMC_CACHE/cpu_kernels)/<digest of the sources, torch's version and
this CPU's flags>/, once per machine (10-20 s; later processes load the built library). Where
they cannot be built (no C++ compiler, say) `load()` logs why once and returns None, and the
engine keeps torch's ops: option.attention_backend=auto falls back, =cpp fails at startup with
that reason.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = tuple(Path(__file__).parent / "csrc" / f
                 for f in ("decode_attention.cpp", "int8_linear.cpp", "int4_linear.cpp",
                           "rms_norm.cpp"))
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_dir() -> Path:
    from engines.options import load_server_options

    h = hashlib.sha256()
    for src in (*_SOURCES, _SOURCES[0].parent / "cpu_common.h"):
        h.update(src.read_bytes())
    h.update(f"{torch.__version__}|{platform.machine()}|{_cpu_flags()}".encode())
    opts = load_server_options()
    root = Path(opts.kernel_cache or Path(opts.cache_dir) / "cpu_kernels").expanduser()
    return root / h.hexdigest()[:16]


def load() -> object | None:
    """torch.ops.lmc_cpu once the library is built and loaded; None (with the reason in
    `error()`) where it cannot be."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops = None
        try:
            from torch.utils.cpp_extension import load as build

            where = _build_dir()
            where.mkdir(parents=True, exist_ok=True)
            build(name="lmc_cpu_kernels", sources=[str(s) for s in _SOURCES],
                  # -fopenmp: at::parallel_for is OpenMP pragmas in torch's headers (without
                  # it the kernel runs on one thread). libgomp.so.1 resolves to the copy torch
                  # has already loaded (same soname), so there is one OpenMP runtime.
                  extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                  build_directory=str(where), is_python_module=False, verbose=False)
            ops = torch.ops.lmc_cpu
            ops.decode_attention  # noqa: B018  (raises if the library did not register)
        except Exception as e:  # noqa: BLE001  (a compiler's failure has no common type)
            reason = str(e).strip().splitlines()
            _state["error"] = f"{type(e).__name__}: {reason[-1] if reason else ''}"[:500]
            log.warning("native engine: C++ CPU kernels unavailable (%s); attention, norms "
                        "and int8/int4 matmuls stay on torch ops", _state["error"])
            ops = None
        _state["ops"] = ops
        return ops


def op(device: torch.device, name: str):
    """torch.ops.lmc_cpu.<name> for tensors on `device`: None off the CPU or where the kernels
    cannot be built."""
    if device.type != "cpu":
        return None
    ops = load()
    return None if ops is None else getattr(ops, name)


def error() -> str | None:
    """Why `load()` returned None (None if it has not failed)."""
    return _state.get("error")  # type: ignore[return-value]
