// Weight-only 4-bit matmul on CPU for option.quantize=int4|int4_g64|int4_g128
// (engines/native/quant.py):
//
//   y [M, N] = x [M, K] @ W [K, N],  W[k, n] = q[k, n] * scale[k / G, n] + low[k / G, n]
//
// q is 4 bits a weight (0..15), with a scale and the group's minimum per group of G inputs
// and output channel (as llama.cpp's Q4_1). Weights sit in panels of 64 output channels:
// q [P, K, 32] bytes, byte i of row k holding channel i in its low nibble and channel i + 32 in
// its high nibble; scale and low [P, K / G, 64] fp32. For every k the 64 nibbles are widened
// to fp32 in registers, dequantized with one FMA per vector, and multiplied into up to 4 rows
// of x (16 accumulators, plus 8 registers of the group's scales and minimums).

#include <torch/library.h>

#include <immintrin.h>

#include "cpu_common.h"

namespace {

using lmc::f16v;
using lmc::kPanel;

constexpr int64_t kRows = 4;

// The 64 channels of one row k: bytes [0, 16) and [16, 32), low then high nibbles.
inline void widen4(const uint8_t* p, f16v& c0, f16v& c1, f16v& c2, f16v& c3) {
#if defined(__AVX512F__)
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  const __m512 v0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(a, mask)));
  const __m512 v1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
  const __m512 v2 =
      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(a, 4), mask)));
  const __m512 v3 =
      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  std::memcpy(&c0, &v0, sizeof c0);
  std::memcpy(&c1, &v1, sizeof c1);
  std::memcpy(&c2, &v2, sizeof c2);
  std::memcpy(&c3, &v3, sizeof c3);
#else
  for (int i = 0; i < 16; ++i) {
    c0[i] = static_cast<float>(p[i] & 0x0F);
    c1[i] = static_cast<float>(p[16 + i] & 0x0F);
    c2[i] = static_cast<float>(p[i] >> 4);
    c3[i] = static_cast<float>(p[16 + i] >> 4);
  }
#endif
}

template <int R>
void panel_rows(const float* x, int64_t K, int64_t G, const uint8_t* q /* [K, 32] */,
                const float* scale, const float* low /* [K / G, 64] */, float* acc) {
  lmc::PanelAcc<R> a;
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const float* s = scale + (g0 / G) * kPanel;
    const float* z = low + (g0 / G) * kPanel;
    const f16v s0 = lmc::load16(s), s1 = lmc::load16(s + 16), s2 = lmc::load16(s + 32),
               s3 = lmc::load16(s + 48);
    const f16v z0 = lmc::load16(z), z1 = lmc::load16(z + 16), z2 = lmc::load16(z + 32),
               z3 = lmc::load16(z + 48);
    for (int64_t k = g0; k < g0 + G; ++k) {
      f16v w0, w1, w2, w3;
      widen4(q + k * (kPanel / 2), w0, w1, w2, w3);
      a.fma(x, K, k, w0 * s0 + z0, w1 * s1 + z1, w2 * s2 + z2, w3 * s3 + z3);
    }
  }
  a.store(acc);
}

void panel(const float* x, int64_t R, int64_t K, int64_t G, const uint8_t* q, const float* s,
           const float* z, float* acc) {
  switch (R) {
    case 1: return panel_rows<1>(x, K, G, q, s, z, acc);
    case 2: return panel_rows<2>(x, K, G, q, s, z, acc);
    case 3: return panel_rows<3>(x, K, G, q, s, z, acc);
    default: return panel_rows<4>(x, K, G, q, s, z, acc);
  }
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
         const at::Tensor& low, int64_t N, at::Tensor& y) {
  const int64_t K = x.size(1), groups = scale.size(1), G = K / groups;
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = low.data_ptr<float>();
  lmc::panel_matmul<T, kRows>(
      x, N, q.size(0), nullptr,
      [&](int64_t p, const float* xr, int64_t rows, float* acc) {
        panel(xr, rows, K, G, qp + p * K * (kPanel / 2), sp + p * groups * kPanel,
              zp + p * groups * kPanel, acc);
      },
      y);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const at::Tensor& low, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 3 && q.size(2) == kPanel / 2 && scale.dim() == 3 &&
                  scale.size(2) == kPanel && scale.sizes() == low.sizes(),
              "int4_linear: x [M, K], q [P, K, 32], scale and low [P, K / G, 64]");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0) && scale.size(1) > 0 &&
                  q.size(1) % scale.size(1) == 0 && n > (q.size(0) - 1) * kPanel &&
                  n <= q.size(0) * kPanel,
              "int4_linear: x is [", x.size(0), ", ", x.size(1), "], q [", q.size(0), ", ",
              q.size(1), ", 32], scale [", scale.size(0), ", ", scale.size(1), ", 64], n = ", n);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(),
              "int4_linear: q must be contiguous uint8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && low.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && low.is_contiguous(),
              "int4_linear: scale and low must be contiguous fp32");
  TORCH_CHECK(x.stride(1) == 1, "int4_linear: x's rows must be contiguous");
  auto y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  lmc::for_x_dtype(x, "int4_linear", [&](auto t) { run<decltype(t)>(x, q, scale, low, n, y); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmc_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale, Tensor low, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmc_cpu, CPU, m) { m.impl("int4_linear", &int4_linear); }
