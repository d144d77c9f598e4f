// Weight-only int8 matmul on CPU for option.quantize=int8 (engines/native/quant.py):
//
//   y [M, N] = (x [M, K] @ W [K, N]) * scale [N]
//
// W holds each weight as int8 with one fp32 scale per output channel, stored in panels of 64
// output channels, q [P, K, 64] (P = N / 64 rounded up, the last panel zero-padded), so that
// one task reads one contiguous block. x and y are fp32 or bf16, the arithmetic fp32. Decode
// steps have few rows, so the cost is reading W: one byte a weight instead of two (bf16) or
// four (fp32). For every k the panel's 64 int8 weights are widened to fp32 in registers and
// multiplied into up to 6 rows of x at a time (24 vector accumulators): no horizontal sums.
// torch's own _weight_int8pack_mm runs 20-50x slower than fp32 on the CPUs measured here.

#include <torch/library.h>

#include <immintrin.h>

#include "cpu_common.h"

namespace {

using lmc::f16v;
using lmc::kPanel;

typedef int8_t i16v __attribute__((vector_size(16)));  // 16 int8 lanes

constexpr int64_t kRows = 6;    // rows of x per pass: 6 x 4 accumulators

inline f16v widen(const int8_t* p) {
  // GCC scalarizes int8 -> fp32 vector conversions written portably, so: intrinsics.
  f16v out;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&out, &v, sizeof out);
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p))));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p + 8))));
  std::memcpy(&out, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof lo, &hi, sizeof hi);
#else
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(p[i]);
#endif
  return out;
}

// Rows [m0, m0 + R) of a full 64-wide panel at n0.
template <int R>
void panel_rows(const float* x, int64_t K, const int8_t* q /* [K, 64] */,
                float* acc /* [R][64] */) {
  lmc::PanelAcc<R> a;
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* w = q + k * kPanel;
    a.fma(x, K, k, widen(w), widen(w + 16), widen(w + 32), widen(w + 48));
  }
  a.store(acc);
}

void panel(const float* x, int64_t R, int64_t K, const int8_t* q, float* acc) {
  switch (R) {
    case 1: return panel_rows<1>(x, K, q, acc);
    case 2: return panel_rows<2>(x, K, q, acc);
    case 3: return panel_rows<3>(x, K, q, acc);
    case 4: return panel_rows<4>(x, K, q, acc);
    case 5: return panel_rows<5>(x, K, q, acc);
    default: return panel_rows<6>(x, K, q, acc);
  }
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t N,
         at::Tensor& y) {
  const int64_t K = x.size(1);
  const int8_t* qp = q.data_ptr<int8_t>();
  lmc::panel_matmul<T, kRows>(
      x, N, q.size(0), scale.data_ptr<float>(),
      [&](int64_t p, const float* xr, int64_t rows, float* acc) {
        panel(xr, rows, K, qp + p * K * kPanel, acc);
      },
      y);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       int64_t n) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 3 && q.size(2) == kPanel && scale.dim() == 1,
              "int8_linear: x [M, K], q [P, K, 64], scale [P * 64]");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0) * kPanel && n > 0 &&
                  n <= q.size(0) * kPanel && n > (q.size(0) - 1) * kPanel,
              "int8_linear: x is [", x.size(0), ", ", x.size(1), "], q [", q.size(0), ", ",
              q.size(1), ", 64], scale [", scale.size(0), "], n = ", n);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(),
              "int8_linear: q must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "int8_linear: scale must be contiguous fp32");
  TORCH_CHECK(x.stride(1) == 1, "int8_linear: x's rows must be contiguous");
  auto y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  lmc::for_x_dtype(x, "int8_linear", [&](auto t) { run<decltype(t)>(x, q, scale, n, y); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmc_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmc_cpu, CPU, m) { m.impl("int8_linear", &int8_linear); }
