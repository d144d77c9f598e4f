// Decode attention on CPU for the native engine (engines/native/cpu_kernels.py builds it).
//
// One query per sequence attends to that sequence's keys and values, held contiguously per
// (sequence, KV head) in the engine's decode buffers (keys [B, KV, D, C], values [B, KV, C, D]).
// Each (sequence, KV head) is one task on torch's intra-op thread pool: its G = H / KV query
// heads read every key and value once (fp32 or bf16 in memory, fp32 arithmetic), which is what
// makes the step memory-bound instead of bound by the per-call cost of many tiny batched
// matmuls.
//
//   q      [B, H, D]      the step's decode queries (any strides, D contiguous)
//   kbuf   [B, KV, D, C]  keys, transposed: position p of sequence b at [b, :, :, p]
//   vbuf   [B, KV, C, D]  values: position p of sequence b at [b, :, p]
//   lens   [B] int64      positions [0, lens[b]) are valid (with a sliding window W > 0 only
//                         the last W of them)
//   out    [B, H, D]      softmax(q k^T * scale) v, in q's dtype
//
// Query head h reads KV head h / G (grouped-query attention), as the model's heads are laid out.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using lmc::as_float;

// e^x for x <= 0 (scores after the max is subtracted), in plain arithmetic so the softmax loop
// vectorizes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^6 (relative
// error under 2e-7, about fp32's rounding), 2^n put in the exponent bits. Below -87 (e^x under
// fp32's smallest normal) it returns 0.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;  // x / ln2
  const float nf = (t + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23 trick
  const float r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // ln2 hi + lo
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? 0.f : p * scale;
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& kbuf, const at::Tensor& vbuf,
            const int64_t* lens, float scale, int64_t window, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KV = kbuf.size(1);
  const int64_t G = H / KV;
  const T* qp = q.data_ptr<T>();
  const T* kp = kbuf.data_ptr<T>();
  const T* vp = vbuf.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t ks0 = kbuf.stride(0), ks1 = kbuf.stride(1), ks2 = kbuf.stride(2);
  const int64_t vs0 = vbuf.stride(0), vs1 = vbuf.stride(1), vs2 = vbuf.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);

  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, inv(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, kvh = task % KV;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.resize(G * n);
      for (int64_t g = 0; g < G; ++g) {
        const T* src = qp + b * qs0 + (kvh * G + g) * qs1;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = as_float(src[d]) * scale;
      }
      // Scores. Keys are stored transposed, [D, C]: row d holds feature d of every position,
      // so the pass reads K as D sequential runs and adds q[g, d] * K[d, :] into G score rows
      // that stay in L1 (vector FMAs over positions, no horizontal sums).
      std::fill(scores.begin(), scores.end(), 0.f);
      const T* kbase = kp + b * ks0 + kvh * ks1 + first;
      for (int64_t d = 0; d < D; ++d) {
        const T* krow = kbase + d * ks2;
        for (int64_t g = 0; g < G; ++g) {
          const float qv = qf[g * D + d];
          float* sg = scores.data() + g * n;
#pragma omp simd
          for (int64_t l = 0; l < n; ++l) sg[l] += qv * as_float(krow[l]);
        }
      }
      // Softmax per query head, max-subtracted as torch's softmax is.
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t l = 0; l < n; ++l) mx = std::max(mx, sg[l]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < n; ++l) {
          sg[l] = exp_nonpositive(sg[l] - mx);
          sum += sg[l];
        }
        inv[g] = 1.f / sum;
      }
      // Weighted values, [C, D]: each value row is read once for all G query heads.
      std::fill(acc.begin(), acc.end(), 0.f);
      const T* vbase = vp + b * vs0 + kvh * vs1 + first * vs2;
      for (int64_t l = 0; l < n; ++l) {
        const T* vrow = vbase + l * vs2;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + l];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * as_float(vrow[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* dst = op + b * os0 + (kvh * G + g) * os1;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[g * D + d] * inv[g]);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kbuf, const at::Tensor& vbuf,
                            const at::Tensor& lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && kbuf.dim() == 4 && vbuf.dim() == 4,
              "decode_attention: q [B, H, D], kbuf [B, KV, D, C], vbuf [B, KV, C, D]");
  TORCH_CHECK(kbuf.size(0) == vbuf.size(0) && kbuf.size(1) == vbuf.size(1) &&
                  kbuf.size(2) == vbuf.size(3) && kbuf.size(3) == vbuf.size(2),
              "decode_attention: kbuf [B, KV, D, C] and vbuf [B, KV, C, D] disagree");
  TORCH_CHECK(q.size(0) <= kbuf.size(0) && q.size(2) == kbuf.size(2),
              "decode_attention: q and the buffers disagree on B or D");
  TORCH_CHECK(q.size(1) % kbuf.size(1) == 0, "decode_attention: H must be a multiple of KV");
  TORCH_CHECK(q.stride(2) == 1 && kbuf.stride(3) == 1 && vbuf.stride(3) == 1,
              "decode_attention: the last dims must be contiguous");
  TORCH_CHECK(q.scalar_type() == kbuf.scalar_type() && q.scalar_type() == vbuf.scalar_type(),
              "decode_attention: q, kbuf and vbuf must share a dtype");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.size(0) == q.size(0),
              "decode_attention: lens must be int64 [B]");
  auto lens_c = lens.contiguous();
  const int64_t* lp = lens_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= vbuf.size(2), "decode_attention: lens[", b, "] = ",
                lp[b], " outside [1, ", vbuf.size(2), "]");
  }
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat) {
    attend<float>(q, kbuf, vbuf, lp, static_cast<float>(scale), window, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    attend<c10::BFloat16>(q, kbuf, vbuf, lp, static_cast<float>(scale), window, out);
  } else {
    TORCH_CHECK(false, "decode_attention: fp32 or bf16 only, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lmc_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor kbuf, Tensor vbuf, Tensor lens, float scale, "
        "int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmc_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
