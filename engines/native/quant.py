"""Weight-only quantization of the native engine's linear layers (option.quantize).

Every matmul of the decoder (qkv, o, gate_up, down) and the LM head can hold its weight in
fewer bits; activations, norms, attention, the KV cache and the residual stream keep the
model dtype. The kernels are torch's own CPU ops:

    int8      per-output-channel symmetric int8, scale = max|w| / 127; the native engine's
              C++ kernel (csrc/int8_linear.cpp: one byte read per weight, widened to fp32 in
              registers), or torch.ops.aten._weight_int8pack_mm where the kernels cannot be
              built.
    int4      group-wise asymmetric 4-bit (groups of 32 input features along K, a scale and a
              zero per group, as llama.cpp's Q4_1); the LM head int8, as llama.cpp's shipped
              Q4_1 file keeps its output/embedding matrix Q8_0.
              torch.ops.aten._weight_int4pack_mm_for_cpu on _convert_weight_to_int4pack_for_cpu.
    int4_g64, int4_g128   the same with larger groups (less memory, less accurate).
    fp16      fp16 weights, fp32 activations and accumulation: FBGEMM's packed fp16 GEMM
              (torch.ops.quantized.linear_dynamic_fp16). The fastest path measured here, and
              as accurate as fp16 weights can be.
    bf16      bf16 weights and the matmul's input rounded to bf16, fp32 accumulation
              (oneDNN's bf16 GEMM, AVX-512 BF16 where the CPU has it); its output is rounded
              to bf16 (torch's CPU mm has no fp32 output for bf16 inputs), then back to fp32.
    fp8       CUDA only (compute capability 8.9+): e4m3 weights with a per-channel scale,
              activations quantized per row on the fly, torch._scaled_mm. On a GPU `int8` maps
              to it as well.

The embedding table stays in the model dtype (one row is read per token). LoRA deltas
(engines/native/lora.py) are added to the quantized matmul's output, so adapters work
unchanged on top of any method.

Shapes: M = rows of the step, K = input features, N = output features.
"""

from __future__ import annotations

import torch

from engines.native import cpu_kernels
from engines.options import QUANTIZE_METHODS as METHODS
_INT4_GROUP = {"int4": 32, "int4_g64": 64, "int4_g128": 128}


class QuantizeError(ValueError):
    """option.quantize cannot run on this device or model; the message says what to change."""


class Linear:
    """A quantized weight: `lin(x)` is `x @ W` for x [M, K] in the model dtype, giving [M, N]."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values()
                   if isinstance(t, torch.Tensor))


class Int8Linear(Linear):
    """Per-output-channel symmetric int8. On CPU, where the native engine's C++ kernels build
    (cpu_kernels.py), the weights sit in panels of 64 channels for csrc/int8_linear.cpp, which
    reads one byte a weight and widens it in registers; elsewhere torch's _weight_int8pack_mm
    (20-50x slower than fp32 on the CPUs measured here)."""

    def __init__(self, w: torch.Tensor) -> None:  # w [K, N], the model's stored layout
        wt = w.t().float()  # [N, K]
        self.in_features, self.out_features = w.shape
        scale = wt.abs().amax(dim=1).clamp(min=1e-12) / 127  # [N]
        q = torch.round(wt / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
        self.kernel = cpu_kernels.op(w.device, "int8_linear")
        if self.kernel is not None:
            self.q = _panel_rows(q).transpose(1, 2).contiguous()  # [P, K, 64]
            self.scale = _panel_rows(scale.float()).reshape(-1)  # [P * 64], zero past N
        else:
            self.q = q.contiguous()  # [N, K]
            self.scale = scale.to(w.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x.contiguous(), self.q, self.scale, self.out_features)  # [M, N]
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)  # [M, N]

    def dequantized(self) -> torch.Tensor:
        """The weight as the kernel reads it, [K, N] fp32."""
        if self.kernel is not None:
            k, n = self.in_features, self.out_features
            w = self.q.float() * self.scale.view(-1, 1, PANEL)  # [P, K, 64]
            return w.transpose(0, 1).reshape(k, -1)[:, :n]
        return (self.q.float() * self.scale.float()[:, None]).t()

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


PANEL = 64  # output channels per weight panel of the C++ kernels (csrc/cpu_common.h kPanel)


def _panel_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] padded with zero rows to a multiple of PANEL, as [P, PANEL, ...]."""
    n, panels = t.shape[0], -(-t.shape[0] // PANEL)
    out = t.new_zeros((panels * PANEL, *t.shape[1:]))
    out[:n] = t
    return out.view(panels, PANEL, *t.shape[1:])


class Int4Linear(Linear):
    """Group-wise asymmetric 4-bit: w = q * scale + low per group of `group_size` inputs and
    output channel, q in 0..15 (llama.cpp's Q4_1). On CPU where the native engine's C++ kernels
    build: csrc/int4_linear.cpp over 64-channel panels; elsewhere torch's
    _weight_int4pack_mm_for_cpu (which, on the CPUs measured here, is 20-50x slower than fp32)."""

    def __init__(self, w: torch.Tensor, group_size: int) -> None:  # w [K, N]
        k, n = w.shape
        if k % group_size:
            raise QuantizeError(f"int4 with groups of {group_size} needs every matmul's input "
                                f"width to divide by {group_size}; this model has one of {k}")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        wg = w.t().float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
        lo, hi = wg.amin(-1), wg.amax(-1)  # [N, K/G]
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
        q = q.to(torch.uint8).reshape(n, k)  # [N, K]
        self.kernel = cpu_kernels.op(w.device, "int4_linear")
        if self.kernel is not None:
            qp = _panel_rows(q)  # [P, 64, K]
            qp = qp.view(qp.shape[0], 2, PANEL // 2, k).permute(0, 3, 1, 2)  # [P, K, 2, 32]
            # Byte i of a row: channel i in the low nibble, channel i + 32 in the high one.
            self.packed = (qp[:, :, 0] | (qp[:, :, 1] << 4)).contiguous()  # [P, K, 32]
            # [N, K/G] -> [P, K/G, 64]
            self.scale, self.low = (_panel_rows(t.float()).transpose(1, 2).contiguous()
                                    for t in (scale, lo))
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32), 1)  # [N, K/2] uint8, the kernel's tiling
            # That kernel dequantizes (q - 8) * scale + zero, so zero is the value of q = 8.
            zero = lo + 8 * scale
            self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(w.dtype).contiguous()
            # [K/G, N, 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x.contiguous(), self.packed, self.scale, self.low,
                               self.out_features)  # [M, N]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scale_zero)  # [M, N]


class HalfLinear(Linear):
    """bf16: bf16 weights; the matmul's input is rounded to bf16 and oneDNN's bf16 GEMM
    accumulates in fp32 (AVX-512 BF16 where the CPU has it). Other dtypes: the weight is
    upcast to the input's dtype for the GEMM."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype) -> None:  # w [K, N]
        self.in_features, self.out_features = w.shape
        self.w = w.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w.dtype == torch.bfloat16 and x.device.type == "cpu":
            return (x.to(torch.bfloat16) @ self.w).to(x.dtype)  # [M, N]
        return x @ self.w.to(x.dtype)  # [M, N]


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


class OneDnnLinear(Linear):
    """A CPU weight held in oneDNN's blocked layout, reordered once at load
    (torch.ops.mkldnn._reorder_linear_weight) and multiplied with oneDNN's matmul
    (_linear_pointwise), the path vLLM's CPU backend takes. torch's `x @ W` goes to MKL, which
    on the AMD CPUs measured here runs ~3x slower at 32 rows and ~1.5x slower at 1 row
    (README, "Where the time goes"). Any M works with one packed weight; HINT only picks the
    blocking oneDNN tunes for (32 was as fast as 1 at one row, and faster at 32).

    fp32 weights: fp32 in and out, fp32 accumulation (the results differ from MKL's only in
    summation order). bf16 weights (option.quantize=bf16, or option.dtype=bf16): the input is
    rounded to bf16, oneDNN accumulates in fp32 and rounds its output to bf16."""

    HINT = 32  # rows of a batch-32 decode step

    def __init__(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> None:  # w [K, N]
        self.in_features, self.out_features = w.shape
        wt = w.t().to(dtype or w.dtype).contiguous()  # [N, K], what oneDNN's linear takes
        self.dtype = wt.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(wt, self.HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [],
                                               "")
        return y.to(x.dtype)  # [M, N]

    def nbytes(self) -> int:
        return self.in_features * self.out_features * self.packed.element_size()


def onednn_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether unquantized weights of `dtype` on `device` go to OneDnnLinear."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and \
        onednn_available()


class Fp16Linear(Linear):
    """fp16 weights, fp32 activations and accumulation: FBGEMM's packed fp16 GEMM
    (torch.ops.quantized.linear_dynamic_fp16), which widens the weight in registers."""

    def __init__(self, w: torch.Tensor) -> None:  # w [K, N]
        self.in_features, self.out_features = w.shape
        self.packed = torch.ops.quantized.linear_prepack_fp16(w.t().float().contiguous(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).to(x.dtype)

    def nbytes(self) -> int:
        return self.in_features * self.out_features * 2


def _fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class Fp8Linear(Linear):
    def __init__(self, w: torch.Tensor) -> None:  # w [K, N] on a CUDA device
        self.in_features, self.out_features = w.shape
        wt = w.t().float()  # [N, K]
        fmax = torch.finfo(torch.float8_e4m3fn).max
        scale = wt.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / fmax  # [N, 1]
        # _scaled_mm wants the second operand column-major: [K, N] with K contiguous.
        self.q = (wt / scale).to(torch.float8_e4m3fn).t()  # [K, N]
        self.scale = scale.t().contiguous()  # [1, N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fmax = torch.finfo(torch.float8_e4m3fn).max
        sx = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / fmax  # [M, 1]
        xq = (x.float() / sx).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, self.q, scale_a=sx, scale_b=self.scale,
                                out_dtype=x.dtype)  # [M, N]


def resolve_method(method: str, device: torch.device) -> str:
    """The method that runs on `device`: on CUDA int8 becomes fp8; what cannot run fails here,
    at startup, naming the option."""
    if method not in METHODS:
        raise QuantizeError(f"option.quantize={method!r} is not one of {', '.join(METHODS)}")
    if device.type == "cpu":
        if method == "fp8":
            raise QuantizeError("option.quantize=fp8 needs a CUDA GPU (compute capability 8.9+);"
                                " on CPU use int8, int4 or bf16")
        return method
    if device.type != "cuda":
        raise QuantizeError(f"option.quantize={method} is not supported on {device.type}")
    if method in ("bf16", "fp16"):
        return method
    if method.startswith("int4"):
        raise QuantizeError(f"option.quantize={method} runs on CPU only; on a GPU use fp8")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise QuantizeError(f"option.quantize={method} maps to fp8 on a GPU, which needs compute "
                            f"capability 8.9+ (this GPU is {major}.{minor}); use option.dtype "
                            "instead")
    return "fp8"


def quantize_linear(w: torch.Tensor, method: str, *, lm_head: bool = False) -> Linear:
    """`w` [K, N] as `method` stores it (method as resolve_method returns it)."""
    if method == "int8" or (lm_head and method in _INT4_GROUP):
        return Int8Linear(w)
    if method in _INT4_GROUP:
        return Int4Linear(w, _INT4_GROUP[method])
    if method == "fp16" and w.device.type == "cpu" and _fbgemm():
        return Fp16Linear(w)
    if method == "bf16" and w.device.type == "cpu" and onednn_available():
        return OneDnnLinear(w, torch.bfloat16)
    if method in ("bf16", "fp16"):
        return HalfLinear(w, torch.bfloat16 if method == "bf16" else torch.float16)
    if method == "fp8":
        return Fp8Linear(w)
    raise AssertionError(method)


def matmul(x: torch.Tensor, w: torch.Tensor | Linear) -> torch.Tensor:
    """x [M, K] @ w: a plain [K, N] weight or a quantized one."""
    return x @ w if isinstance(w, torch.Tensor) else w(x)
