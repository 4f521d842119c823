// CPU decode attention (DecodeAttentionProblem in masked_moe.h): one query per sequence against its KV
// cache, compiled once per instruction set like the expert kernel (each masked_moe_cpu*.cc includes this
// after masked_moe_cpu_kernel.h, whose ParallelFor, ThreadBuffer and element conversions it uses).
//
// A bf16 cache under AVX512-BF16 (the serving case) runs DecodeAttentionDp: one ParallelFor over units (sequence,
// KV head, block of its query heads), each computing its scores, softmax and value sums with vdpbf16ps on the cache
// rows as they lie, in its own thread's buffers (see there). Every other dtype and build runs four passes:
//
// The cache is [B, L, Hkv, D]: one slot's rows of every KV head lie together, so work is split by slots, not by
// head, and each unit reads one contiguous run of the cache. Four passes, each a ParallelFor:
//   1. scores, units (sequence b, chunk of kAttnChunk slots): S[b, i, l] = scale * <q[b, i], k[b, l, i / G]> for
//      every query head i (G = H / Hkv per KV head) and allowed slot l, in blocks of kAttnBlock slots whose rows
//      are converted to f32 once and serve all G heads of their KV head;
//   2. softmax, units (b, i): over the allowed slots, in f32, rounded to the element type (the reference casts
//      the probabilities to the value dtype before their product with v, as transformers' eager path does), zero
//      at the other slots of the span from the first allowed slot to the last (nothing reads past it);
//   3. value sums, units (b, chunk): part[b, chunk, i] = sum over the chunk's slots of P[b, i, l] * v[b, l, i / G];
//   4. out[b, i] = the parts of the chunks the span covers summed in chunk order, rounded once.
// Sums run in a fixed order whatever the thread count. A sequence with no allowed slot gets the reference's
// answer: every slot at the same (lowest) score, so the mean of all L value rows.

namespace beam {
namespace BEAM_CPU_NS {
namespace {

constexpr int64_t kAttnChunk = 64;  // slots of one unit of passes 1 and 3
constexpr int64_t kAttnBlock = 8;   // slots converted and multiplied together

// <a, b> over n floats: 16 independent lanes, then the lanes and the tail in a fixed order.
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

// n elements to f32, zero-padded to n_pad.
template <typename T>
inline void RowToF32Padded(const T* __restrict src, int64_t n, int64_t n_pad, float* __restrict dst) {
  int64_t i = 0;
#if BEAM_CPU_USE_AVX2
  for (; i + 16 <= n; i += 16) {
    __m256 lo, hi;
    Load16(src + i, lo, hi);
    _mm256_storeu_ps(dst + i, lo);
    _mm256_storeu_ps(dst + i + 8, hi);
  }
#endif
  for (; i < n; ++i) dst[i] = ToFloat(src[i]);
  for (; i < n_pad; ++i) dst[i] = 0.0f;
}

// Prefetch the cache rows of slots[0..n) (each `bytes` long at base + slot * bytes) into L1: issued for the next
// block before the current one is multiplied, so its rows arrive while this one computes (without it, each block
// waits on its own rows: a unit's run is short and broken by compute, so the hardware prefetchers lag). One hint per
// 128 bytes (the adjacent-line prefetcher brings the pair; one per line measured 7% slower, none 8-16%).
inline void PrefetchSlots(const char* base, const int64_t* slots, int64_t n, int64_t bytes) {
#if BEAM_CPU_USE_AVX2
  for (int64_t j = 0; j < n; ++j)
    for (int64_t off = 0; off < bytes; off += 128) _mm_prefetch(base + slots[j] * bytes + off, _MM_HINT_T0);
#else
  (void)base, (void)slots, (void)n, (void)bytes;
#endif
}


// One block of passes 1 and 3 (the f32 loops): prefetches the next block's rows, then converts the cache rows of
// slots[j0 .. j0 + nb) of sequence b (cache_b: [L, Hkv, D]) to f32 as rows[j][h][0..d_pad) (zero past D, and whole
// zero rows past nb). Returns nb = min(kAttnBlock, n - j0).
template <typename T>
int64_t BlockRowsToF32(const T* cache_b, int64_t Hkv, int64_t D, int64_t d_pad, const int64_t* slots, int64_t j0,
                       int64_t n, float* rows) {
  const int64_t nb = std::min(kAttnBlock, n - j0), row = Hkv * d_pad;
  if (j0 + nb < n)
    PrefetchSlots(reinterpret_cast<const char*>(cache_b), slots + j0 + nb, std::min(kAttnBlock, n - j0 - nb),
                  Hkv * D * int64_t(sizeof(T)));
  for (int64_t j = 0; j < kAttnBlock; ++j) {
    if (j >= nb) {
      std::fill(rows + j * row, rows + (j + 1) * row, 0.0f);
      continue;
    }
    const T* src = cache_b + slots[j0 + j] * Hkv * D;
    for (int64_t h = 0; h < Hkv; ++h) RowToF32Padded(src + h * D, D, d_pad, rows + j * row + h * d_pad);
  }
  return nb;
}

#if BEAM_CPU_USE_AVX2
// The eight sums of a[0..8) as one vector, in order.
inline __m256 HorizontalSums8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h23 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20), _mm256_permute2f128_ps(h01, h23, 0x31));
}

// sums[i * NG + g] = <kf + (key0 + i) * ldk, qf + (g0 + g) * ldq> for i < NK keys and g < NG heads (NK * NG = 8
// accumulators in flight), over d floats (a multiple of 8).
template <int NK, int NG>
inline __m256 ScoreTile(const float* qf, int64_t ldq, int64_t g0, const float* kf, int64_t ldk, int64_t key0,
                        int64_t d) {
  static_assert(NK * NG == 8, "eight accumulators");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    __m256 kv[NK];
    for (int i = 0; i < NK; ++i) kv[i] = _mm256_loadu_ps(kf + (key0 + i) * ldk + c);
    for (int g = 0; g < NG; ++g) {
      const __m256 qv = _mm256_loadu_ps(qf + (g0 + g) * ldq + c);
      for (int i = 0; i < NK; ++i) acc[i * NG + g] = _mm256_fmadd_ps(qv, kv[i], acc[i * NG + g]);
    }
  }
  return HorizontalSums8(acc);
}

// acc[g0 + g][c0 .. c0 + 8 NV) += sum over j < kAttnBlock of P[(g0 + g) * kAttnBlock + j] * vf[j * ldv + ...] for
// g < NG (NG * NV = 8 accumulators); acc rows lda floats apart.
template <int NG, int NV>
inline void ValueTile(const float* P, int64_t g0, const float* vf, int64_t ldv, int64_t c0, float* acc,
                      int64_t lda) {
  static_assert(NG * NV == 8, "eight accumulators");
  __m256 a[8];
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < NV; ++v) a[g * NV + v] = _mm256_loadu_ps(acc + (g0 + g) * lda + c0 + 8 * v);
  for (int64_t j = 0; j < kAttnBlock; ++j) {
    __m256 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = _mm256_loadu_ps(vf + j * ldv + c0 + 8 * v);
    for (int g = 0; g < NG; ++g) {
      const __m256 pv = _mm256_broadcast_ss(P + (g0 + g) * kAttnBlock + j);
      for (int v = 0; v < NV; ++v) a[g * NV + v] = _mm256_fmadd_ps(pv, vv[v], a[g * NV + v]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + (g0 + g) * lda + c0 + 8 * v, a[g * NV + v]);
}

// exp(x) for x <= 0 (Cephes' expf: Cody-Waite reduction by ln 2, a degree-5 polynomial; about 1 ulp), flushed to
// zero below -87.
inline __m256 ExpNonPositive(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, f), f, _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// 8 bools as an all-ones / zero lane mask.
inline __m256 BoolMask8(const bool* b) {
  int64_t bits;
  std::memcpy(&bits, b, 8);
  const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bits));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
}

// v rounded to T and back to f32.
template <typename T>
inline __m256 RoundTo(__m256 v) {
  if constexpr (std::is_same_v<T, bf16_t>) {  // round to nearest even (the values here are finite)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u))));
  } else if constexpr (std::is_same_v<T, f16_t>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}
#endif

// dst[0..n) = src[0..n) rounded to T, as FromFloat<T> rounds (bf16 and f32 eight at a time under AVX2; a NaN sends
// the rest of the row to the scalar loop, which keeps it quiet).
template <typename T>
inline void StoreRounded(const float* src, int64_t n, T* dst) {
  int64_t d = 0;
#if BEAM_CPU_USE_AVX2
  if constexpr (std::is_same_v<T, bf16_t>) {
    for (; d + 8 <= n; d += 8) {
      const __m256 v = _mm256_loadu_ps(src + d);
      if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) break;
      const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(RoundTo<bf16_t>(v)), 16);  // 0 .. 0xffff
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                       _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
  } else if constexpr (std::is_same_v<T, float>) {
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(dst + d, _mm256_loadu_ps(src + d));
  }
#endif
  for (; d < n; ++d) dst[d] = FromFloat<T>(src[d]);
}

// Pass 1 for one block of n (<= kAttnBlock) slots: rows holds their keys as f32, [kAttnBlock][Hkv][dk] (zero
// past n); S_b[i * L + slots[j]] = scale * <qf[i], key j of head i / G>.
inline void ScoreBlock(const float* qf, const float* rows, int64_t Hkv, int64_t G, int64_t dk, int64_t Dk,
                       float scale, const int64_t* slots, int64_t n, float* S_b, int64_t L) {
  for (int64_t h = 0; h < Hkv; ++h) {
    const float* kf = rows + h * dk;
    const int64_t ldk = Hkv * dk;
    const float* qh = qf + h * G * dk;
    float* Sh = S_b + h * G * L;
#if BEAM_CPU_USE_AVX2
    alignas(32) float sums[8];
    int64_t g = 0;
    for (; g + 4 <= G; g += 4)
      for (int64_t i = 0; i < kAttnBlock; i += 2) {
        _mm256_store_ps(sums, ScoreTile<2, 4>(qh, dk, g, kf, ldk, i, dk));
        for (int64_t t = 0; t < 8; ++t)
          if (i + t / 4 < n) Sh[(g + t % 4) * L + slots[i + t / 4]] = sums[t] * scale;
      }
    for (; g < G; ++g) {
      _mm256_store_ps(sums, ScoreTile<8, 1>(qh, dk, g, kf, ldk, 0, dk));
      for (int64_t t = 0; t < n; ++t) Sh[g * L + slots[t]] = sums[t] * scale;
    }
#else
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < n; ++j) Sh[g * L + slots[j]] = DotF32(qh + g * dk, kf + j * ldk, Dk) * scale;
#endif
  }
}

// Pass 3 for one block: rows holds the slots' values as f32, [kAttnBlock][Hkv][dv] (zero past the block's slots);
// Pb[i * kAttnBlock + j] the probability of query head i for the block's slot j (zero past them);
// acc[i][0..dv) += sum over j of Pb[i][j] * value j of head i / G.
inline void ValueBlock(const float* Pb, const float* rows, int64_t Hkv, int64_t G, int64_t dv, int64_t Dv,
                       float* acc) {
  for (int64_t h = 0; h < Hkv; ++h) {
    const float* vf = rows + h * dv;
    const int64_t ldv = Hkv * dv;
    const float* Ph = Pb + h * G * kAttnBlock;
    float* acc_h = acc + h * G * dv;
#if BEAM_CPU_USE_AVX2
    int64_t g = 0;
    if (G % 4 == 0)
      for (; g < G; g += 4)
        for (int64_t c = 0; c < dv; c += 16) ValueTile<4, 2>(Ph, g, vf, ldv, c, acc_h, dv);
    for (; g < G; ++g)
      for (int64_t c = 0; c < dv; c += 64) ValueTile<1, 8>(Ph, g, vf, ldv, c, acc_h, dv);
#else
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < kAttnBlock; ++j) {
        const float pg = Ph[g * kAttnBlock + j];
        float* __restrict a = acc_h + g * dv;
        const float* __restrict vr = vf + j * ldv;
        for (int64_t d = 0; d < Dv; ++d) a[d] += pg * vr[d];
      }
#endif
  }
}

// Pass 2 for one query head: s[0..L) holds its scores at the allowed slots; becomes the probabilities rounded to
// T, zero at the other slots (uniform: 1 / L everywhere).
template <typename T>
void SoftmaxRow(float* s, const bool* allowed, int64_t L, bool uniform) {
  if (uniform) {
    std::fill(s, s + L, ToFloat(FromFloat<T>(1.0f / float(L))));
    return;
  }
  int64_t l = 0;
  float m = -INFINITY, sum = 0.0f;
#if BEAM_CPU_USE_AVX2
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (; l + 8 <= L; l += 8)
    mv = _mm256_max_ps(mv, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + l), BoolMask8(allowed + l)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  for (int j = 0; j < 8; ++j) m = std::max(m, lanes[j]);
#endif
  for (; l < L; ++l)
    if (allowed[l]) m = std::max(m, s[l]);
  l = 0;
#if BEAM_CPU_USE_AVX2
  __m256 sv = _mm256_setzero_ps();
  const __m256 mb = _mm256_set1_ps(m);
  for (; l + 8 <= L; l += 8) {
    const __m256 e = _mm256_and_ps(ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(s + l), mb)), BoolMask8(allowed + l));
    _mm256_storeu_ps(s + l, e);
    sv = _mm256_add_ps(sv, e);
  }
  _mm256_store_ps(lanes, sv);
  for (int j = 0; j < 8; ++j) sum += lanes[j];
#endif
  for (; l < L; ++l) sum += (s[l] = allowed[l] ? std::exp(s[l] - m) : 0.0f);
  const float inv = 1.0f / sum;
  l = 0;
#if BEAM_CPU_USE_AVX2
  for (; l + 8 <= L; l += 8)
    _mm256_storeu_ps(s + l, RoundTo<T>(_mm256_mul_ps(_mm256_loadu_ps(s + l), _mm256_set1_ps(inv))));
#endif
  for (; l < L; ++l) s[l] = ToFloat(FromFloat<T>(s[l] * inv));
}

#if BEAM_CPU_USE_AVX512BF16
// bfloat16 under AVX512-BF16: both products through vdpbf16ps (pairs of bf16 multiplied and summed into f32 lanes)
// on the cache rows as they lie, with no conversion: the scores pair consecutive dims of q and k, the value sums
// consecutive slots (two value rows interleaved in registers, as StreamRowsColsDp interleaves two weight rows; the
// probabilities are bf16 already, rounded as the reference rounds them).

// S[g * lds + i] = scale * <k row i, q row g> for NK keys and NG query heads (NK * NG a multiple of 8; NK 4 or 8):
// head-major sums, so each head's NK scores are one store. Writes whole groups of NK: S has room past the last key.
template <int NK, int NG>
inline void ScoreTileDp(const bf16_t* const* kr, const bf16_t* const* qr, int64_t d, float scale, float* S,
                        int64_t lds) {
  constexpr int N = NK * NG;
  static_assert(N % 8 == 0 && (NK == 4 || NK == 8), "whole groups of eight sums");
  __m512 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 32) {  // every load masked (free on these processors): no branch per chunk
    const __mmask32 m = d - c >= 32 ? ~__mmask32(0) : __mmask32((1u << (d - c)) - 1);
    __m512bh kv[NK];
    for (int i = 0; i < NK; ++i) kv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, kr[i] + c);
    for (int g = 0; g < NG; ++g) {
      const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, qr[g] + c);
      for (int i = 0; i < NK; ++i) acc[g * NK + i] = _mm512_dpbf16_ps(acc[g * NK + i], qv, kv[i]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int t = 0; t < N; t += 8) {  // sums t .. t + 8: head t / NK, keys t % NK ..
    __m256 h[8];
    for (int j = 0; j < 8; ++j)
      h[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[t + j]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[t + j]), 1)));
    const __m256 sums = _mm256_mul_ps(HorizontalSums8(h), sc);
    if constexpr (NK == 8) {
      _mm256_storeu_ps(S + (t / 8) * lds, sums);
    } else {
      _mm_storeu_ps(S + (t / 4) * lds, _mm256_castps256_ps128(sums));
      _mm_storeu_ps(S + (t / 4 + 1) * lds, _mm256_extractf128_ps(sums, 1));
    }
  }
}

// acc[g][c0 + ...] += sum over j < n of P[g][j] * row j, for NG query heads and NBLK blocks of 32 columns from c0
// (columns past Dv read as zero); rows vr[j] (bf16), probabilities pb[g][j] (bf16 bits). Slots go in pairs (an odd
// last slot pairs with itself at probability zero).
template <int NG, int NBLK>
inline void ValueTileDp(const bf16_t* const* vr, const uint16_t* const* pb, int64_t n, int64_t c0, int64_t Dv,
                        float* const* acc) {
  __m512 lo[NG][NBLK], hi[NG][NBLK];
  for (int g = 0; g < NG; ++g)
    for (int k = 0; k < NBLK; ++k) lo[g][k] = hi[g][k] = _mm512_setzero_ps();
  __mmask32 mask[NBLK];  // the columns of each block inside Dv
  for (int k = 0; k < NBLK; ++k) {
    const int64_t m = std::max<int64_t>(0, std::min<int64_t>(32, Dv - c0 - 32 * k));
    mask[k] = m == 32 ? ~__mmask32(0) : __mmask32((1u << m) - 1);
  }
  for (int64_t j = 0; j < n; j += 2) {
    const bool pair = j + 1 < n;
    const bf16_t* r0 = vr[j];
    const bf16_t* r1 = pair ? vr[j + 1] : vr[j];
    __m512bh wl[NBLK], wh[NBLK];
    for (int k = 0; k < NBLK; ++k) {
      const int64_t c = c0 + 32 * k;
      const __m512i a = _mm512_maskz_loadu_epi16(mask[k], r0 + c), b = _mm512_maskz_loadu_epi16(mask[k], r1 + c);
      wl[k] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      wh[k] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int g = 0; g < NG; ++g) {
      const uint32_t bits = uint32_t(pb[g][j]) | (pair ? uint32_t(pb[g][j + 1]) << 16 : 0u);
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(int(bits));
      for (int k = 0; k < NBLK; ++k) {
        lo[g][k] = _mm512_dpbf16_ps(lo[g][k], pv, wl[k]);
        hi[g][k] = _mm512_dpbf16_ps(hi[g][k], pv, wh[k]);
      }
    }
  }
  // The unpacked order holds columns {0-3, 8-11, 16-19, 24-27} in lo and {4-7, ...} in hi; back to column order.
  const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < NG; ++g)
    for (int k = 0; k < NBLK; ++k) {
      float* a = acc[g] + c0 + 32 * k;
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_permutex2var_ps(lo[g][k], idx0, hi[g][k])));
      _mm512_storeu_ps(a + 16,
                       _mm512_add_ps(_mm512_loadu_ps(a + 16), _mm512_permutex2var_ps(lo[g][k], idx1, hi[g][k])));
    }
}

// The bf16 decode step as one ParallelFor (RunDecodeAttention with a bf16 cache under AVX512-BF16; the passes below
// serve the other dtypes and builds). Units (sequence b, KV head h, block of that head's query heads): a unit
// computes its heads' scores over b's allowed slots, their softmax and their value sums in buffers of its own
// thread, and writes its rows of out. Nothing crosses threads: the four passes hand every score and partial sum from
// the core that wrote it to whichever core runs the next pass (at batch 32, 512 KB of scores and 1 MB of sums a
// step), and wait at each pass boundary. A unit reads its KV head's rows of the cache, Hkv apart (each a run of
// whole lines), prefetching the next block's keys into L1 and the values it will need into L2 as it goes.

// Softmax of s[0..n) into bf16 probabilities p[0..n) (round to nearest even by vcvtneps2bf16, as the reference casts
// them): max, exp (Exp16) and sum in f32, 16 lanes at a time.
inline void SoftmaxToBf16(const float* s, int64_t n, uint16_t* p, float* e) {
  auto lanes = [n](int64_t j) { return n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1); };
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(j);
    mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, s + j));
  }
  const __m512 mb = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
  __m512 sv = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(j);
    const __m512 x = _mm512_maskz_mov_ps(m, Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), mb)));
    _mm512_storeu_ps(e + j, x);  // e has room for whole vectors
    sv = _mm512_add_ps(sv, x);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sv));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(j);
    _mm256_mask_storeu_epi16(p + j, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(e + j), inv)));
  }
}

void DecodeAttentionDp(const DecodeAttentionProblem& p, const Runner& runner) {
  const int64_t B = p.B, L = p.L, H = p.H, Hkv = p.Hkv, Dk = p.Dk, Dv = p.Dv, G = H / Hkv;
  const bf16_t* q = static_cast<const bf16_t*>(p.q);
  const bf16_t* k = static_cast<const bf16_t*>(p.k);
  const bf16_t* v = static_cast<const bf16_t*>(p.v);
  bf16_t* out = static_cast<bf16_t*>(p.out);
  const int64_t dv = RoundUp(Dv, 32), krow = Hkv * Dk, vrow = Hkv * Dv;  // a slot's keys / values, every head
  // Each sequence's allowed slots in order (every slot where none is allowed: the reference's uniform answer).
  std::vector<int64_t> slots(static_cast<size_t>(B * L)), count(static_cast<size_t>(B));
  std::vector<char> uniform(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t l = 0; l < L; ++l)
      if (p.allowed[b * L + l]) slots[b * L + n++] = l;
    uniform[b] = n == 0;
    if (uniform[b])
      for (; n < L; ++n) slots[b * L + n] = n;
    count[b] = n;
  }
  // Query heads per unit: the whole group, or a part of it where the (b, h) pairs are fewer than two per thread.
  const int64_t want = 2 * std::max(1, runner.num_threads);
  const int64_t parts = B * Hkv >= want ? 1 : std::min(G, (want + B * Hkv - 1) / (B * Hkv));
  const int64_t gb = (G + parts - 1) / parts, gblocks = (G + gb - 1) / gb;
  const bf16_t one_over_l = FromFloat<bf16_t>(1.0f / float(L));

  ParallelFor(runner, B * Hkv * gblocks, [&](int64_t unit) {
    const int64_t b = unit / (Hkv * gblocks), h = unit / gblocks % Hkv, g0 = unit % gblocks * gb;
    const int64_t ng = std::min(gb, G - g0), n = count[b], n16 = RoundUp(n, 16);
    const int64_t* sl = slots.data() + b * L;
    const bf16_t* k_bh = k + b * L * krow + h * Dk;  // slot l's key of head h: k_bh + l * krow
    const bf16_t* v_bh = v + b * L * vrow + h * Dv;
    const bf16_t* q_bh = q + (b * H + h * G + g0) * Dk;  // the unit's query heads, Dk apart
    thread_local std::vector<float> fbuf;                // scores [ng][n16], exp [n16], sums [ng][dv]
    thread_local std::vector<uint16_t> pbuf;             // probabilities [ng][n16 + 2] as bf16 bits
    thread_local std::vector<const bf16_t*> rbuf;        // value rows [n]
    const size_t nf = size_t((ng + 1) * n16 + ng * dv), np = size_t(ng * (n16 + 2));
    if (fbuf.size() < nf) fbuf.resize(nf);
    if (pbuf.size() < np) pbuf.resize(np);
    if (rbuf.size() < size_t(n)) rbuf.resize(size_t(n));
    float* S = fbuf.data();
    float* e = S + ng * n16;
    float* acc = e + n16;
    uint16_t* P = pbuf.data();
    const int64_t ldp = n16 + 2;
    const char* vbytes = reinterpret_cast<const char*>(v_bh);
    const int64_t vrow_bytes = vrow * int64_t(sizeof(bf16_t));
    if (uniform[b]) {
      for (int64_t g = 0; g < ng; ++g) std::fill(P + g * ldp, P + g * ldp + n, one_over_l.bits);
    } else {
      // Scores, 8 slots at a time: 4 slots x 4 heads per tile, then the heads past the last 4 one at a time (the
      // rows have room for the whole last block: n16 >= RoundUp(n, 8)).
      const char* kbytes = reinterpret_cast<const char*>(k_bh);
      const int64_t krow_bytes = krow * int64_t(sizeof(bf16_t));
      for (int64_t j0 = 0; j0 < n; j0 += kAttnBlock) {
        const int64_t nb = std::min(kAttnBlock, n - j0);
        for (int64_t j = j0 + kAttnBlock; j < std::min(n, j0 + 2 * kAttnBlock); ++j) {
          for (int64_t off = 0; off < Dk * int64_t(sizeof(bf16_t)); off += 128)
            _mm_prefetch(kbytes + sl[j] * krow_bytes + off, _MM_HINT_T0);
          for (int64_t off = 0; off < Dv * int64_t(sizeof(bf16_t)); off += 128)
            _mm_prefetch(vbytes + sl[j] * vrow_bytes + off, _MM_HINT_T1);
        }
        const bf16_t* kr[kAttnBlock];
        for (int64_t j = 0; j < kAttnBlock; ++j) kr[j] = k_bh + sl[j0 + std::min(j, nb - 1)] * krow;
        const bf16_t* qr[4];
        int64_t g = 0;
        for (; g + 4 <= ng; g += 4) {
          for (int t = 0; t < 4; ++t) qr[t] = q_bh + (g + t) * Dk;
          for (int64_t i = 0; i < nb; i += 4) ScoreTileDp<4, 4>(kr + i, qr, Dk, p.scale, S + g * n16 + j0 + i, n16);
        }
        for (; g < ng; ++g) {
          qr[0] = q_bh + g * Dk;
          ScoreTileDp<8, 1>(kr, qr, Dk, p.scale, S + g * n16 + j0, n16);
        }
      }
      for (int64_t g = 0; g < ng; ++g) SoftmaxToBf16(S + g * n16, n, P + g * ldp, e);
    }
    // Value sums: acc[g] = sum over the slots of P[g][j] * value row j, in slot order (pairs of slots).
    for (int64_t j = 0; j < n; ++j) rbuf[j] = v_bh + sl[j] * vrow;
    std::fill(acc, acc + ng * dv, 0.0f);
    for (int64_t c0 = 0; c0 < Dv; c0 += 128) {
      const int64_t blocks = std::min<int64_t>(4, (Dv - c0 + 31) / 32);
      int64_t g = 0;
      auto run = [&](auto ngc) {
        constexpr int NG = decltype(ngc)::value;
        const uint16_t* pb[NG];
        float* ar[NG];
        for (int t = 0; t < NG; ++t) pb[t] = P + (g + t) * ldp, ar[t] = acc + (g + t) * dv;
        switch (blocks) {
          case 1: ValueTileDp<NG, 1>(rbuf.data(), pb, n, c0, Dv, ar); break;
          case 2: ValueTileDp<NG, 2>(rbuf.data(), pb, n, c0, Dv, ar); break;
          case 3: ValueTileDp<NG, 3>(rbuf.data(), pb, n, c0, Dv, ar); break;
          default: ValueTileDp<NG, 4>(rbuf.data(), pb, n, c0, Dv, ar); break;
        }
      };
      for (; g + 2 <= ng; g += 2) run(std::integral_constant<int, 2>{});
      if (g < ng) run(std::integral_constant<int, 1>{});
    }
    for (int64_t g = 0; g < ng; ++g) StoreRounded(acc + g * dv, Dv, out + (b * H + h * G + g0 + g) * Dv);
  });
}
#endif

template <typename T>
void RunDecodeAttention(const DecodeAttentionProblem& p, const Runner& runner) {
  const int64_t B = p.B, L = p.L, H = p.H, Hkv = p.Hkv, Dk = p.Dk, Dv = p.Dv, G = H / Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
#if BEAM_CPU_USE_AVX512BF16
  if constexpr (std::is_same_v<T, bf16_t>) {  // the vdpbf16ps loops, one pass
    DecodeAttentionDp(p, runner);
    return;
  }
#endif
  // Scratch rows padded to whole vectors (zeros), the value rows to whole value tiles.
  const int64_t dk = RoundUp(Dk, 8), dv = RoundUp(Dv, G % 4 == 0 ? 16 : 64);
  const int64_t chunks = (L + kAttnChunk - 1) / kAttnChunk;
  // The call's shared scratch (the calling thread's, grown as needed): scores then probabilities S [B, H, L], the
  // chunks' value sums [B, chunks, H, dv], which sequences attend uniformly.
  thread_local std::vector<float> shared;
  const size_t n_shared = size_t(B * H * L + B * chunks * H * dv);
  if (shared.size() < n_shared) shared.resize(n_shared);
  float* S = shared.data();
  float* part = S + B * H * L;
  // Which sequences attend uniformly (no slot allowed), and each one's span of allowed slots [lo, hi) with the
  // chunks [c_lo, c_hi) that hold it (every slot and chunk where it attends uniformly): passes 2 to 4 work inside
  // them, as nothing reads a score or a chunk's sum outside (a decode step's span is the filled part of the cache).
  std::vector<char> uniform(B);
  std::vector<int64_t> lo(B), hi(B), c_lo(B), c_hi(B);
  for (int64_t b = 0; b < B; ++b) {
    const bool* a = p.allowed + b * L;
    int64_t first = 0, last = L;
    while (first < L && !a[first]) ++first;
    while (last > first && !a[last - 1]) --last;
    uniform[b] = first == L;
    lo[b] = uniform[b] ? 0 : first;
    hi[b] = uniform[b] ? L : last;
    c_lo[b] = lo[b] / kAttnChunk;
    c_hi[b] = (hi[b] - 1) / kAttnChunk + 1;
  }
  auto in_span = [&](int64_t b, int64_t c) { return c >= c_lo[b] && c < c_hi[b]; };

  // The slots of chunk c that sequence b attends to (every slot when it attends uniformly).
  auto chunk_slots = [&](int64_t b, int64_t c, int64_t* slots) {
    int64_t n = 0;
    for (int64_t l = c * kAttnChunk; l < std::min(L, (c + 1) * kAttnChunk); ++l)
      if (uniform[b] || p.allowed[b * L + l]) slots[n++] = l;
    return n;
  };

  // 1. Scores.
  ParallelFor(runner, B * chunks, [&](int64_t unit) {
    const int64_t b = unit / chunks, c = unit % chunks;
    if (uniform[b] || !in_span(b, c)) return;
    int64_t slots[kAttnChunk];
    const int64_t n = chunk_slots(b, c, slots);
    if (n == 0) return;
    const int64_t row = Hkv * dk;
    float* qf = ThreadBuffer(0, size_t(H * dk + kAttnBlock * row));
    float* rows = qf + H * dk;
    for (int64_t i = 0; i < H; ++i) RowToF32Padded(q + (b * H + i) * Dk, Dk, dk, qf + i * dk);
    for (int64_t j0 = 0; j0 < n; j0 += kAttnBlock) {
      const int64_t nb = BlockRowsToF32(k + b * L * Hkv * Dk, Hkv, Dk, dk, slots, j0, n, rows);
      ScoreBlock(qf, rows, Hkv, G, dk, Dk, p.scale, slots + j0, nb, S + b * H * L, L);
    }
  });

  // 2. Softmax per (sequence, query head).
  ParallelFor(runner, B * H, [&](int64_t unit) {
    const int64_t b = unit / H;
    SoftmaxRow<T>(S + unit * L + lo[b], p.allowed + b * L + lo[b], hi[b] - lo[b], uniform[b]);
  });

  // 3. Value sums per (sequence, chunk).
  ParallelFor(runner, B * chunks, [&](int64_t unit) {
    const int64_t b = unit / chunks, c = unit % chunks;
    if (!in_span(b, c)) return;
    float* acc = part + unit * H * dv;
    std::fill(acc, acc + H * dv, 0.0f);
    int64_t slots[kAttnChunk];
    const int64_t n = chunk_slots(b, c, slots);
    const int64_t row = Hkv * dv;
    float* rows = ThreadBuffer(0, size_t(kAttnBlock * row + H * kAttnBlock));
    float* Pb = rows + kAttnBlock * row;
    const float* S_b = S + b * H * L;
    for (int64_t j0 = 0; j0 < n; j0 += kAttnBlock) {
      const int64_t nb = BlockRowsToF32(v + b * L * Hkv * Dv, Hkv, Dv, dv, slots, j0, n, rows);
      for (int64_t j = 0; j < kAttnBlock; ++j)
        for (int64_t i = 0; i < H; ++i) Pb[i * kAttnBlock + j] = j < nb ? S_b[i * L + slots[j0 + j]] : 0.0f;
      ValueBlock(Pb, rows, Hkv, G, dv, Dv, acc);
    }
  });

  // 4. The chunks' sums in chunk order, rounded into out.
  ParallelFor(runner, B * H, [&](int64_t unit) {
    const int64_t b = unit / H, i = unit % H;
    float* sum = part + ((b * chunks + c_lo[b]) * H + i) * dv;  // the span's first chunk's part, then the running sum
    for (int64_t c = c_lo[b] + 1; c < c_hi[b]; ++c) {
      const float* __restrict pc = part + ((b * chunks + c) * H + i) * dv;
      for (int64_t d = 0; d < Dv; ++d) sum[d] += pc[d];
    }
    StoreRounded(sum, Dv, out + unit * Dv);
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
