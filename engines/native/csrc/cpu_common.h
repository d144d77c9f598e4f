// Helpers shared by the native engine's C++ CPU kernels (engines/native/csrc/*.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lmc {

inline float as_float(float x) { return x; }
inline float as_float(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift the compiler vectorizes.
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

typedef float f16v __attribute__((vector_size(64)));  // 16 fp32 lanes (2 AVX2 registers)

inline f16v load16(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

constexpr int64_t kPanel = 64;  // output channels per weight panel: 4 vectors

// The accumulators of one 64-channel panel over R rows of x: zeroed, then for each k
// a[r] += x[r, k] * w (w: the panel's row k widened to fp32), then stored to acc [R, 64].
template <int R>
struct PanelAcc {
  f16v a[R][4] = {};

  inline void fma(const float* x, int64_t K, int64_t k, f16v w0, f16v w1, f16v w2, f16v w3) {
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * K + k];
      a[r][0] += xv * w0;
      a[r][1] += xv * w1;
      a[r][2] += xv * w2;
      a[r][3] += xv * w3;
    }
  }

  inline void store(float* acc) const {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) std::memcpy(acc + r * kPanel + j * 16, &a[r][j], sizeof(f16v));
  }
};

// The driver of the weight-only matmuls: y [M, N] from x [M, K] (fp32 or bf16, rows
// contiguous), with the weights in `panels` panels of 64 output channels. x is widened to fp32
// once; each task is one panel, run over the rows `Rows` at a time:
// panel(p, x_rows [rows, K], rows, acc [rows, 64]) fills acc, and y = acc * col_scale[n] (or
// acc where col_scale is null), rounded to x's dtype.
template <typename T, int64_t Rows, typename Panel>
void panel_matmul(const at::Tensor& x, int64_t N, int64_t panels, const float* col_scale,
                  Panel panel, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  const int64_t xs = x.stride(0);
  T* yp = y.data_ptr<T>();
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = as_float(xp[m * xs + k]);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Rows * kPanel);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += Rows) {
        const int64_t rows = std::min(Rows, M - m0);
        panel(p, xf.data() + m0 * K, rows, acc.data());
        for (int64_t r = 0; r < rows; ++r) {
          T* dst = yp + (m0 + r) * N + n0;
          for (int64_t j = 0; j < width; ++j) {
            const float v = acc[r * kPanel + j];
            dst[j] = static_cast<T>(col_scale ? v * col_scale[n0 + j] : v);
          }
        }
      }
    }
  });
}

// f(T{}) with T = x's dtype, float or c10::BFloat16; any other dtype is an error naming `op`.
template <typename F>
void for_x_dtype(const at::Tensor& x, const char* op, F f) {
  if (x.scalar_type() == at::kFloat) {
    f(float{});
  } else if (x.scalar_type() == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(false, op, ": x must be fp32 or bf16, got ", x.scalar_type());
  }
}

}  // namespace lmc
