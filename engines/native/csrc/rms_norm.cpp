// RMSNorm on CPU for the native engine, as transformers' Llama computes it, in one op instead
// of eight (a decode step at batch 1 runs 61 of them, ~10 us each as torch ops):
//
//   rms_norm(x, w, eps)           = w * to_dtype(xf * rsqrt(mean(xf^2) + eps)),  xf = fp32(x)
//   add_rms_norm_(x, delta, w, eps): x += delta (in x's dtype, in place), then rms_norm(x)
//
// x [T, H] and delta [T, H] fp32 or bf16 with contiguous rows; w [H] in x's dtype. For bf16
// the normalized row is rounded to bf16 before the weight multiplies it, as in transformers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using lmc::as_float;
inline float round_to(float x, float) { return x; }
inline float round_to(float x, c10::BFloat16) { return static_cast<float>(c10::BFloat16(x)); }

template <typename T>
void norm_rows(T* x, const T* delta, int64_t ds, const T* w, T* out, int64_t T_, int64_t H,
               int64_t xs, double eps) {
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* xr = x + t * xs;
      if (delta != nullptr) {
        const T* dr = delta + t * ds;
        for (int64_t i = 0; i < H; ++i) xr[i] = static_cast<T>(as_float(xr[i]) + as_float(dr[i]));
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += as_float(xr[i]) * as_float(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      T* orow = out + t * H;
      for (int64_t i = 0; i < H; ++i)
        orow[i] = static_cast<T>(as_float(w[i]) * round_to(as_float(xr[i]) * inv, T{}));
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), op,
              ": x [T, H] and w [H]");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), op, ": rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, ": x and w must both be fp32 or both bf16");
}

at::Tensor run(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& w, double eps) {
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  const int64_t ds = delta ? delta->stride(0) : 0;
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x.data_ptr<float>(), delta ? delta->data_ptr<float>() : nullptr, ds,
                     w.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                     x.stride(0), eps);
  } else {
    using B = c10::BFloat16;
    norm_rows<B>(x.data_ptr<B>(), delta ? delta->data_ptr<B>() : nullptr, ds, w.data_ptr<B>(),
                 out.data_ptr<B>(), x.size(0), x.size(1), x.stride(0), eps);
  }
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x, w, "rms_norm");
  // Read-only: the x pointer is only written with a delta.
  return run(x, nullptr, w, eps);
}

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w,
                         double eps) {
  check(x, w, "add_rms_norm_");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type() &&
                  delta.stride(1) == 1,
              "add_rms_norm_: delta must match x in shape and dtype, rows contiguous");
  return run(x, &delta, w, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmc_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor w, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmc_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
}
