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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float f16v __attribute__((vector_size(64)));  // 16 fp32 lanes

constexpr int64_t kPanel = 64;
constexpr int64_t kRows = 4;

inline float as_float(float x) { return x; }
inline float as_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline f16v load(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

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
  f16v a[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = f16v{};
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const float* s = scale + (g0 / G) * kPanel;
    const float* z = low + (g0 / G) * kPanel;
    const f16v s0 = load(s), s1 = load(s + 16), s2 = load(s + 32), s3 = load(s + 48);
    const f16v z0 = load(z), z1 = load(z + 16), z2 = load(z + 32), z3 = load(z + 48);
    for (int64_t k = g0; k < g0 + G; ++k) {
      f16v w0, w1, w2, w3;
      widen4(q + k * (kPanel / 2), w0, w1, w2, w3);
      w0 = w0 * s0 + z0;
      w1 = w1 * s1 + z1;
      w2 = w2 * s2 + z2;
      w3 = w3 * s3 + z3;
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * K + k];
        a[r][0] += xv * w0;
        a[r][1] += xv * w1;
        a[r][2] += xv * w2;
        a[r][3] += xv * w3;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) std::memcpy(acc + r * kPanel + j * 16, &a[r][j], sizeof(f16v));
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
  const int64_t M = x.size(0), K = x.size(1), panels = q.size(0);
  const int64_t groups = scale.size(1), G = K / groups;
  const T* xp = x.data_ptr<T>();
  const int64_t xs = x.stride(0);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = low.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = as_float(xp[m * xs + k]);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kRows * kPanel);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t rows = std::min(kRows, M - m0);
        panel(xf.data() + m0 * K, rows, K, G, qp + p * K * (kPanel / 2),
              sp + p * groups * kPanel, zp + p * groups * kPanel, acc.data());
        for (int64_t r = 0; r < rows; ++r) {
          T* dst = yp + (m0 + r) * N + n0;
          for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<T>(acc[r * kPanel + j]);
        }
      }
    }
  });
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
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, q, scale, low, n, y);
  } else if (x.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(x, q, scale, low, n, y);
  } else {
    TORCH_CHECK(false, "int4_linear: x must be fp32 or bf16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmc_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale, Tensor low, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmc_cpu, CPU, m) { m.impl("int4_linear", &int4_linear); }
