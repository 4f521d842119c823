// BEAM's mask on a layer's Top-K routing, the kept (token, expert) pairs gathered as the rows of a
// top_k = 1 expert call, and the sum of those rows back per token: the vLLM plugin's CPU path
// (convert/vllm_plugin/moe.py), one call each instead of the dozen small torch operations that
// cost more than the expert compute they save on small models; the mask router is evaluated at the
// K candidates only (K / E of the products of x @ W_m^T). Plain functions on host pointers (no
// torch, no XLA): the Python side checks devices, dtypes, shapes and contiguity and allocates.

#include "select_pairs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace beam {
namespace {

float Bf16ToFloat(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t FloatToBf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// m_hat's logit at one candidate: x's row (float32 or bfloat16) . W_m's row e, in float32 with eight
// partial sums (the compiler keeps them in vector registers).
float MaskLogit(const char* x, bool x_bf16, const float* wm, int64_t d_m) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  if (x_bf16) {
    const auto* xb = reinterpret_cast<const uint16_t*>(x);
    for (; j + 8 <= d_m; j += 8)
      for (int i = 0; i < 8; ++i) acc[i] += Bf16ToFloat(xb[j + i]) * wm[j + i];
    for (; j < d_m; ++j) acc[0] += Bf16ToFloat(xb[j]) * wm[j];
  } else {
    const auto* xf = reinterpret_cast<const float*>(x);
    for (; j + 8 <= d_m; j += 8)
      for (int i = 0; i < 8; ++i) acc[i] += xf[j + i] * wm[j + i];
    for (; j < d_m; ++j) acc[0] += xf[j] * wm[j];
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

}  // namespace

int64_t SelectPairs(const char* x, bool x_bf16, int64_t x_stride, int64_t row_bytes,
                    const float* mask_w, int64_t d_m, const float* weights, const void* ids,
                    bool ids64, int64_t T, int64_t K, int64_t E, float tau, bool renormalize,
                    float eps, int64_t* token, char* rows_x, float* rows_w, void* rows_id) {
  const auto* ids32 = static_cast<const int32_t*>(ids);
  const auto* ids64p = static_cast<const int64_t*>(ids);
  auto* out32 = static_cast<int32_t*>(rows_id);
  auto* out64 = static_cast<int64_t*>(rows_id);
  std::vector<float> g(static_cast<size_t>(K));
  std::vector<char> keep(static_cast<size_t>(K));
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* w = weights + t * K;
    float kept = 0.0f, total = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = ids64 ? ids64p[t * K + k] : int64_t(ids32[t * K + k]);
      if (e < 0 || e >= E)
        throw std::out_of_range("topk_ids[" + std::to_string(t) + ", " + std::to_string(k) +
                                "] = " + std::to_string(e) + " is not an expert of " +
                                std::to_string(E));
      const float logit = MaskLogit(x + t * x_stride, x_bf16, mask_w + e * d_m, d_m);
      const float m = 1.0f / (1.0f + std::exp(-logit));  // m_hat
      keep[k] = m >= tau;
      g[k] = keep[k] ? w[k] : 0.0f;
      kept += g[k];
      total += w[k];
    }
    if (renormalize) {  // beam_mask's: g * (total / kept) where kept > eps, else 0
      const float scale = total / std::max(kept, eps);
      for (int64_t k = 0; k < K; ++k) g[k] = kept > eps ? g[k] * scale : 0.0f;
    }
    for (int64_t k = 0; k < K; ++k) {
      if (!keep[k]) continue;
      if (token != nullptr) token[n] = t;
      if (rows_x != nullptr) std::memcpy(rows_x + n * row_bytes, x + t * x_stride, size_t(row_bytes));
      rows_w[n] = g[k];
      if (ids64) out64[n] = ids64p[t * K + k];
      else out32[n] = ids32[t * K + k];
      ++n;
    }
  }
  return n;
}

void SumRows(const void* rows, int64_t N, const int64_t* token, int64_t T, int64_t d, bool bf16,
             void* out) {
  std::vector<float> acc(static_cast<size_t>(T * d), 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = token[n];
    if (t < 0 || t >= T)
      throw std::out_of_range("token[" + std::to_string(n) + "] = " + std::to_string(t) +
                              " is not a row of the " + std::to_string(T) + "-token output");
    float* a = acc.data() + t * d;
    if (bf16) {
      const uint16_t* r = static_cast<const uint16_t*>(rows) + n * d;
      for (int64_t j = 0; j < d; ++j) a[j] += Bf16ToFloat(r[j]);
    } else {
      const float* r = static_cast<const float*>(rows) + n * d;
      for (int64_t j = 0; j < d; ++j) a[j] += r[j];
    }
  }
  if (bf16) {
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < T * d; ++i) o[i] = FloatToBf16(acc[size_t(i)]);
  } else {
    std::memcpy(out, acc.data(), size_t(T * d) * sizeof(float));
  }
}

}  // namespace beam
