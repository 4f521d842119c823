// CPU decode attention (DecodeAttentionProblem in masked_moe.h): one query per sequence against its KV
// cache, compiled once per instruction set like the expert kernel (each masked_moe_cpu*.cc includes this
// after masked_moe_cpu_kernel.h, whose ParallelFor, ThreadBuffer and element conversions it uses).
//
// Work units are (sequence b, KV head h): the G = H / Hkv query heads of a group share every key and value
// row, so each row is read from the cache and converted to f32 once per unit.
//   1. scores s[g][l] = scale * <q[b, hG + g], k[b, l, h]> for the allowed slots l (f32 products and sums);
//   2. p[g][l] = softmax over the allowed slots, rounded to the cache's dtype (the reference casts the
//      probabilities to the value dtype before their product with v, as transformers' eager path does);
//   3. out[b, hG + g] = sum over allowed l of p[g][l] * v[b, l, h], accumulated in f32, rounded once.
// A sequence with no allowed slot gets the reference's answer: every slot at the same (lowest) score, so
// the mean of all L value rows. Units own disjoint output rows; the sum order is fixed.

namespace beam {
namespace BEAM_CPU_NS {
namespace {

// <a, b> over n floats: 16 independent lanes (vectorised by the compiler for the build's instruction set),
// then the lanes and the tail in a fixed order.
inline float DotF32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += lanes[j];
  return s;
}

template <typename T>
inline void RowToF32(const T* __restrict src, int64_t n, float* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ToFloat(src[i]);
}

constexpr int64_t kAttnBlock = 8;  // cached rows converted and multiplied together (AVX2 path)

#if BEAM_CPU_USE_AVX2
// n elements of a cached row to f32, zero-padded to n_pad (a multiple of 8).
template <typename T>
inline void RowToF32Padded(const T* __restrict src, int64_t n, int64_t n_pad, float* __restrict dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 lo, hi;
    Load16(src + i, lo, hi);
    _mm256_storeu_ps(dst + i, lo);
    _mm256_storeu_ps(dst + i + 8, hi);
  }
  for (; i < n; ++i) dst[i] = ToFloat(src[i]);
  for (; i < n_pad; ++i) dst[i] = 0.0f;
}

// The eight sums of a[0..8) as one vector, in order.
inline __m256 HorizontalSums8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h23 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20), _mm256_permute2f128_ps(h01, h23, 0x31));
}

// sums[i * NG + g] = <kf[key0 + i], qf[g0 + g]> for i < NK keys and g < NG heads (NK * NG = 8 accumulators in
// flight), rows of d (a multiple of 8) floats, ld floats apart.
template <int NK, int NG>
inline __m256 ScoreTile(const float* qf, int64_t g0, const float* kf, int64_t key0, int64_t d, int64_t ld) {
  static_assert(NK * NG == 8, "eight accumulators");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    __m256 kv[NK];
    for (int i = 0; i < NK; ++i) kv[i] = _mm256_loadu_ps(kf + (key0 + i) * ld + c);
    for (int g = 0; g < NG; ++g) {
      const __m256 qv = _mm256_loadu_ps(qf + (g0 + g) * ld + c);
      for (int i = 0; i < NK; ++i) acc[i * NG + g] = _mm256_fmadd_ps(qv, kv[i], acc[i * NG + g]);
    }
  }
  return HorizontalSums8(acc);
}

// acc[g0 + g][c0 .. c0 + 8 NV) += sum over j < kAttnBlock of P[g0 + g][j0 + j] * vf[j][...] for g < NG (NG * NV
// = 8 accumulators); acc rows lda floats apart, P rows ldp apart, vf rows ldv apart.
template <int NG, int NV>
inline void ValueTile(const float* P, int64_t ldp, int64_t j0, int64_t g0, const float* vf, int64_t ldv,
                      int64_t c0, float* acc, int64_t lda) {
  static_assert(NG * NV == 8, "eight accumulators");
  __m256 a[8];
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < NV; ++v) a[g * NV + v] = _mm256_loadu_ps(acc + (g0 + g) * lda + c0 + 8 * v);
  for (int64_t j = 0; j < kAttnBlock; ++j) {
    __m256 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = _mm256_loadu_ps(vf + j * ldv + c0 + 8 * v);
    for (int g = 0; g < NG; ++g) {
      const __m256 pv = _mm256_broadcast_ss(P + (g0 + g) * ldp + j0 + j);
      for (int v = 0; v < NV; ++v) a[g * NV + v] = _mm256_fmadd_ps(pv, vv[v], a[g * NV + v]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + (g0 + g) * lda + c0 + 8 * v, a[g * NV + v]);
}
#endif

template <typename T>
void RunDecodeAttention(const DecodeAttentionProblem& p, const Runner& runner) {
  const int64_t B = p.B, L = p.L, H = p.H, Hkv = p.Hkv, Dk = p.Dk, Dv = p.Dv, G = H / Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  // Row lengths in scratch: padded to whole vectors (zeros), and for the value tiles to whole tiles.
  const int64_t dk = RoundUp(Dk, 8), dv = RoundUp(Dv, G % 4 == 0 ? 16 : 64);
  const int64_t n_block = RoundUp(L, kAttnBlock);
  ParallelFor(runner, B * Hkv, [&](int64_t unit) {
    const int64_t b = unit / Hkv, h = unit % Hkv;
    const bool* allowed = p.allowed + b * L;
    // Scratch: q rows [G][dk], probabilities [G][n_block], converted cache rows
    // [kAttnBlock][max(dk, dv)], accumulators [G][dv].
    const int64_t ld_row = std::max(dk, dv);
    float* qf = ThreadBuffer(0, size_t(G * dk + G * n_block + kAttnBlock * ld_row + G * dv));
    float* P = qf + G * dk;
    float* rows = P + G * n_block;
    float* acc = rows + kAttnBlock * ld_row;
    thread_local std::vector<int64_t> slot_buffer;
    if (int64_t(slot_buffer.size()) < L) slot_buffer.resize(size_t(L));
    int64_t* slots = slot_buffer.data();
    int64_t n = 0;
    for (int64_t l = 0; l < L; ++l)
      if (allowed[l]) slots[n++] = l;
    const bool uniform = n == 0;  // nothing allowed: the mean of every slot (see the header)
    if (uniform)
      for (int64_t l = 0; l < L; ++l) slots[n++] = l;
    auto k_row = [&](int64_t l) { return k + ((b * L + l) * Hkv + h) * Dk; };
    auto v_row = [&](int64_t l) { return v + ((b * L + l) * Hkv + h) * Dv; };
    for (int64_t g = 0; g < G; ++g) {
      RowToF32(q + ((b * H) + h * G + g) * Dk, Dk, qf + g * dk);
      std::fill(qf + g * dk + Dk, qf + (g + 1) * dk, 0.0f);
    }

    // 1. Scores P[g][j] = scale * <q_g, k[slots[j]]>.
    if (!uniform) {
#if BEAM_CPU_USE_AVX2
      for (int64_t j0 = 0; j0 < n; j0 += kAttnBlock) {
        const int64_t nb = std::min(kAttnBlock, n - j0);
        for (int64_t i = 0; i < kAttnBlock; ++i) {
          if (i < nb) RowToF32Padded(k_row(slots[j0 + i]), Dk, dk, rows + i * dk);
          else std::fill(rows + i * dk, rows + (i + 1) * dk, 0.0f);
        }
        alignas(32) float sums[8];
        int64_t g = 0;
        for (; g + 4 <= G; g += 4)
          for (int64_t i = 0; i < kAttnBlock; i += 2) {
            _mm256_store_ps(sums, ScoreTile<2, 4>(qf, g, rows, i, dk, dk));
            for (int64_t t = 0; t < 8; ++t) P[(g + t % 4) * n_block + j0 + i + t / 4] = sums[t] * p.scale;
          }
        for (; g < G; ++g) {
          _mm256_store_ps(sums, ScoreTile<8, 1>(qf, g, rows, 0, dk, dk));
          for (int64_t t = 0; t < 8; ++t) P[g * n_block + j0 + t] = sums[t] * p.scale;
        }
      }
#else
      for (int64_t j = 0; j < n; ++j) {
        RowToF32(k_row(slots[j]), Dk, rows);
        for (int64_t g = 0; g < G; ++g) P[g * n_block + j] = DotF32(qf + g * dk, rows, Dk) * p.scale;
      }
#endif
    }

    // 2. Softmax over the n slots, rounded to T; zeros past n (the padding of the last block).
    for (int64_t g = 0; g < G; ++g) {
      float* pg = P + g * n_block;
      if (uniform) {
        std::fill(pg, pg + n, 1.0f / float(L));
      } else {
        float m = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) m = std::max(m, pg[j]);
        for (int64_t j = 0; j < n; ++j) sum += (pg[j] = std::exp(pg[j] - m));
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < n; ++j) pg[j] *= inv;
      }
      for (int64_t j = 0; j < n; ++j) pg[j] = ToFloat(FromFloat<T>(pg[j]));
      std::fill(pg + n, pg + n_block, 0.0f);
    }

    // 3. acc[g] = sum over the slots of P[g][j] * v[slots[j]], then rounded into out.
    std::fill(acc, acc + G * dv, 0.0f);
#if BEAM_CPU_USE_AVX2
    for (int64_t j0 = 0; j0 < n; j0 += kAttnBlock) {
      const int64_t nb = std::min(kAttnBlock, n - j0);
      for (int64_t i = 0; i < kAttnBlock; ++i) {
        if (i < nb) RowToF32Padded(v_row(slots[j0 + i]), Dv, dv, rows + i * dv);
        else std::fill(rows + i * dv, rows + (i + 1) * dv, 0.0f);
      }
      int64_t g = 0;
      if (G >= 4)
        for (; g + 4 <= G; g += 4)
          for (int64_t c = 0; c < dv; c += 16) ValueTile<4, 2>(P, n_block, j0, g, rows, dv, c, acc, dv);
      for (; g < G; ++g)
        for (int64_t c = 0; c < dv; c += 64) ValueTile<1, 8>(P, n_block, j0, g, rows, dv, c, acc, dv);
    }
#else
    for (int64_t j = 0; j < n; ++j) {
      RowToF32(v_row(slots[j]), Dv, rows);
      for (int64_t g = 0; g < G; ++g) {
        const float pg = P[g * n_block + j];
        float* __restrict a = acc + g * dv;
        for (int64_t d = 0; d < Dv; ++d) a[d] += pg * rows[d];
      }
    }
#endif
    for (int64_t g = 0; g < G; ++g) {
      T* o = out + ((b * H) + h * G + g) * Dv;
      for (int64_t d = 0; d < Dv; ++d) o[d] = FromFloat<T>(acc[g * dv + d]);
    }
  });
}

}  // namespace

void DecodeAttention(const DecodeAttentionProblem& p, const Runner& runner) {
  switch (p.type) {
    case ElemType::kF32: RunDecodeAttention<float>(p, runner); break;
    case ElemType::kBF16: RunDecodeAttention<bf16_t>(p, runner); break;
    case ElemType::kF16: RunDecodeAttention<f16_t>(p, runner); break;
  }
}

}  // namespace BEAM_CPU_NS
}  // namespace beam
