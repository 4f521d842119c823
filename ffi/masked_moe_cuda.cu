// CUDA FFI handler of the masked-expert MoE (float32, bfloat16, float16; f32 accumulation).
//
// Everything runs on the handler's stream with no host synchronisation; the number of kept pairs
// is only known on the device, so grids are sized for the worst case and blocks read the counts:
//   1. CountKernel:   kept pairs per expert (atomics).
//   2. ScanKernel:    row offsets per expert and M-tile offsets per expert (prefix sums).
//   3. ScatterKernel: pair indices into their expert's rows (order within an expert is free: each
//                     row's result depends on that row alone).
//   4. GroupedGemm<gated>: per (M tile, f tile) block, finds its expert from the tile offsets,
//                     gathers x rows of its pairs, computes x @ w_gate and x @ w_up and writes
//                     H = silu(gate) * up (rounded to the input type, as the reference does).
//   5. GroupedGemm<down>: per (M tile, d tile), H @ w_down, scaled by the pair's weight, written to
//                     O[pair] (f32). Blocks past the real tile count exit at once.
//   6. CombineKernel: y[t] = sum_k O[t, k] over kept pairs, in k order: deterministic, and every row
//                     of y is written.
// Half types use tensor cores (WMMA 16x16x16, f32 accumulators); float32 uses a SIMT tile.
// Temporary memory comes from the FFI scratch allocator (one allocation per call). An expert
// without kept pairs gets no tile, so its weights are never read. The backward targets (below,
// "Backward") reuse the grouping and the tiles.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "masked_moe.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace beam {
namespace cuda {
namespace {

constexpr int BM = 64;         // rows (pairs) per block
constexpr int BN = 64;         // output columns per block
constexpr int BK = 32;         // reduction slice per step
constexpr int kThreads = 128;  // 4 warps, each a 32 x 32 sub-tile
constexpr int APAD = 8, BPAD = 8, CPAD = 4;  // smem padding (keeps WMMA pointers 32-byte aligned)

__device__ __forceinline__ float ToF(float v) { return v; }
__device__ __forceinline__ float ToF(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T FromF(float v);
template <> __device__ __forceinline__ float FromF<float>(float v) { return v; }
template <> __device__ __forceinline__ __half FromF<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> struct IsHalf : std::false_type {};
template <> struct IsHalf<__half> : std::true_type {};
template <> struct IsHalf<__nv_bfloat16> : std::true_type {};

// ------------------------------------------------------------------------------------------------
// Grouping.

__global__ void CountKernel(const int32_t* __restrict__ ids, const bool* __restrict__ keep,
                            int64_t num_pairs, int E, int* __restrict__ counts) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < num_pairs;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = ids[q];
    if (keep[q] && e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
}

// One thread: E is small (tens to hundreds of experts).
__global__ void ScanKernel(const int* __restrict__ counts, int E, int* __restrict__ offsets,
                           int* __restrict__ tile_offsets) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int rows = 0, tiles = 0;
  offsets[0] = 0;
  tile_offsets[0] = 0;
  for (int e = 0; e < E; ++e) {
    const int c = counts[e];
    rows += c;
    tiles += (c + BM - 1) / BM;
    offsets[e + 1] = rows;
    tile_offsets[e + 1] = tiles;
  }
}

__global__ void ScatterKernel(const int32_t* __restrict__ ids, const bool* __restrict__ keep,
                              int64_t num_pairs, int E, const int* __restrict__ offsets,
                              int* __restrict__ cursor, int* __restrict__ sorted) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < num_pairs;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = ids[q];
    if (keep[q] && e >= 0 && e < E) sorted[offsets[e] + atomicAdd(&cursor[e], 1)] = int(q);
  }
}

// ------------------------------------------------------------------------------------------------
// Grouped GEMM.

template <typename T>
struct GemmArgs {
  const T* x;           // gated: [T, Kd] activations (rows gathered through `sorted`)
  const T* h;           // down:  [rows, Kd] H in sorted-row order
  const T* b0;          // [E, Kd, N]: w_gate (gated) or w_down
  const T* b1;          // [E, Kd, N]: w_up (gated only)
  int64_t Kd, N;
  int E, topk;
  const int* offsets;       // [E + 1] row offsets
  const int* tile_offsets;  // [E + 1] M-tile offsets
  const int* sorted;        // [rows] pair index of each sorted row
  const float* weights;     // [T * topk]
  T* h_out;                 // gated: [rows, N]
  float* ab_out;            // gated, backward: [rows, 2N] pre-activations (gate | up) instead of H
  float* o_out;             // down:  [T * topk, N], indexed by pair
};

template <typename T, int NMAT>
struct alignas(128) OperandSmem {
  T a[BM][BK + APAD];
  T b[NMAT][BK][BN + BPAD];
};
template <int NMAT>
struct alignas(128) EpilogueSmem {
  float c[NMAT][BM][BN + CPAD];
};

// Per thread: 16 elements of the A tile and 16 of each B tile, staged in registers so the next
// slice's global loads overlap the current slice's math.
constexpr int kStage = BM * BK / kThreads;
static_assert(kStage == BK * BN / kThreads, "A and B tiles must stage the same count");

// A tile [BM x BK] from row pointers (null: a row past the tile's rows), reduction length Kd.
template <typename T, bool kVec>
__device__ __forceinline__ void LoadA(int64_t Kd, const T* const* arow, int64_t k0,
                                      T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int r = v / (BK / VW), c = (v % (BK / VW)) * VW;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (arow[r] != nullptr && k0 + c < Kd)
        val = *reinterpret_cast<const uint4*>(arow[r] + k0 + c);
      *reinterpret_cast<uint4*>(&st[i * VW]) = val;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      const int r = idx / BK, c = idx % BK;
      st[i] = (arow[r] != nullptr && k0 + c < Kd) ? arow[r][k0 + c] : FromF<T>(0.0f);
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void StoreA(T (*sa)[BK + APAD], const T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int r = v / (BK / VW), c = (v % (BK / VW)) * VW;
      *reinterpret_cast<uint4*>(&sa[r][c]) = *reinterpret_cast<const uint4*>(&st[i * VW]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      sa[idx / BK][idx % BK] = st[i];
    }
  }
}

// B tile [BK x BN] of a row-major [Kd x N] matrix b.
template <typename T, bool kVec>
__device__ __forceinline__ void LoadB(int64_t Kd, int64_t N, const T* b, int64_t k0, int64_t n0,
                                      T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int r = v / (BN / VW), c = (v % (BN / VW)) * VW;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (k0 + r < Kd && n0 + c < N)
        val = *reinterpret_cast<const uint4*>(b + (k0 + r) * N + n0 + c);
      *reinterpret_cast<uint4*>(&st[i * VW]) = val;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      const int r = idx / BN, c = idx % BN;
      st[i] = (k0 + r < Kd && n0 + c < N) ? b[(k0 + r) * N + n0 + c] : FromF<T>(0.0f);
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void StoreB(T (*sb)[BN + BPAD], const T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int r = v / (BN / VW), c = (v % (BN / VW)) * VW;
      *reinterpret_cast<uint4*>(&sb[r][c]) = *reinterpret_cast<const uint4*>(&st[i * VW]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      sb[idx / BN][idx % BN] = st[i];
    }
  }
}

// Math on one BK slice held in shared memory, accumulating into registers.
template <typename T, int NMAT, bool kTensorCore = IsHalf<T>::value>
struct TileMath;

template <typename T, int NMAT>
struct TileMath<T, NMAT, true> {  // tensor cores: warp tile 32 x 32 = 2 x 2 fragments per matrix
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  Acc acc[NMAT][2][2];
  __device__ void Init() {
#pragma unroll
    for (int m = 0; m < NMAT; ++m)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[m][i][j], 0.0f);
  }
  __device__ void Step(const OperandSmem<T, NMAT>& s) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], &s.a[wm + i * 16][kk], BK + APAD);
#pragma unroll
      for (int m = 0; m < NMAT; ++m) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
          wmma::load_matrix_sync(bf, &s.b[m][kk][wn + j * 16], BN + BPAD);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[m][i][j], af[i], bf, acc[m][i][j]);
        }
      }
    }
  }
  __device__ void Store(EpilogueSmem<NMAT>& e) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int m = 0; m < NMAT; ++m)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(&e.c[m][wm + i * 16][wn + j * 16], acc[m][i][j], BN + CPAD,
                                  wmma::mem_row_major);
  }
};

template <typename T, int NMAT>
struct TileMath<T, NMAT, false> {  // SIMT: each thread an 8 x 4 patch per matrix
  static constexpr int TM = 8, TN = 4;
  float acc[NMAT][TM][TN];
  __device__ void Init() {
#pragma unroll
    for (int m = 0; m < NMAT; ++m)
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[m][i][j] = 0.0f;
  }
  __device__ void Step(const OperandSmem<T, NMAT>& s) {
    const int r0 = (threadIdx.x / (BN / TN)) * TM, c0 = (threadIdx.x % (BN / TN)) * TN;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = ToF(s.a[r0 + i][kk]);
#pragma unroll
      for (int m = 0; m < NMAT; ++m) {
        float b[TN];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = ToF(s.b[m][kk][c0 + j]);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[m][i][j] = fmaf(a[i], b[j], acc[m][i][j]);
      }
    }
  }
  __device__ void Store(EpilogueSmem<NMAT>& e) {
    const int r0 = (threadIdx.x / (BN / TN)) * TM, c0 = (threadIdx.x % (BN / TN)) * TN;
#pragma unroll
    for (int m = 0; m < NMAT; ++m)
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) e.c[m][r0 + i][c0 + j] = acc[m][i][j];
  }
};
static_assert((BM / 8) * (BN / 4) == kThreads, "SIMT patches must cover the tile");

// The M tile `tile` of the grouped rows: its expert (the last e with tile_offsets[e] <= tile), its
// first sorted row and its row count (at most BM).
struct TileRows {
  int e;
  int64_t row0;
  int rows;
};
__device__ __forceinline__ TileRows FindTile(const int* offsets, const int* tile_offsets, int E,
                                             int tile) {
  int lo = 0, hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_offsets[mid] <= tile) lo = mid; else hi = mid;
  }
  const int64_t row0 = offsets[lo] + int64_t(tile - tile_offsets[lo]) * BM;
  return {lo, row0, int(min(int64_t(BM), int64_t(offsets[lo + 1]) - row0))};
}

// kGated: A = x rows of the tile's pairs, B = (w_gate, w_up), writes H = silu(gate) * up.
// else:   A = H rows, B = w_down, writes O[pair] = weight * (H @ w_down).
// kVec: 16-byte loads (rows of A and B 16-byte aligned), else element loads.
template <typename T, bool kGated, bool kVec>
__global__ void __launch_bounds__(kThreads) GroupedGemm(GemmArgs<T> g) {
  constexpr int NMAT = kGated ? 2 : 1;
  const int tile = blockIdx.x;
  const int total_tiles = g.tile_offsets[g.E];
  if (tile >= total_tiles) return;  // grid sized for the worst case
  const TileRows tr = FindTile(g.offsets, g.tile_offsets, g.E, tile);
  const int e = tr.e;
  const int64_t row0 = tr.row0;
  const int rows = tr.rows;
  const int64_t n0 = int64_t(blockIdx.y) * BN;

  union Smem {
    OperandSmem<T, NMAT> op;
    EpilogueSmem<NMAT> ep;
  };
  __shared__ Smem smem;
  __shared__ const T* arow[BM];
  if (threadIdx.x < BM) {
    const int r = threadIdx.x;
    const T* p = nullptr;
    if (r < rows) {
      p = kGated ? g.x + int64_t(g.sorted[row0 + r] / g.topk) * g.Kd : g.h + (row0 + r) * g.Kd;
    }
    arow[r] = p;
  }
  const T* b[NMAT];
  b[0] = g.b0 + int64_t(e) * g.Kd * g.N;
  if constexpr (kGated) b[NMAT - 1] = g.b1 + int64_t(e) * g.Kd * g.N;
  __syncthreads();

  TileMath<T, NMAT> math;
  math.Init();
  alignas(16) T sa[kStage];  // 16-byte aligned: read and written as uint4
  alignas(16) T sb[NMAT][kStage];
  LoadA<T, kVec>(g.Kd, arow, 0, sa);
#pragma unroll
  for (int m = 0; m < NMAT; ++m) LoadB<T, kVec>(g.Kd, g.N, b[m], 0, n0, sb[m]);
  for (int64_t k0 = 0; k0 < g.Kd; k0 += BK) {
    StoreA<T, kVec>(smem.op.a, sa);
#pragma unroll
    for (int m = 0; m < NMAT; ++m) StoreB<T, kVec>(smem.op.b[m], sb[m]);
    __syncthreads();
    if (k0 + BK < g.Kd) {  // next slice's loads in flight during this slice's math
      LoadA<T, kVec>(g.Kd, arow, k0 + BK, sa);
#pragma unroll
      for (int m = 0; m < NMAT; ++m) LoadB<T, kVec>(g.Kd, g.N, b[m], k0 + BK, n0, sb[m]);
    }
    math.Step(smem.op);
    __syncthreads();
  }
  math.Store(smem.ep);
  __syncthreads();

  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int r = idx / BN, c = idx % BN;
    if (r >= rows || n0 + c >= g.N) continue;
    if constexpr (kGated) {
      const float gate = smem.ep.c[0][r][c], up = smem.ep.c[1][r][c];
      if (g.ab_out != nullptr) {
        g.ab_out[(row0 + r) * 2 * g.N + n0 + c] = gate;
        g.ab_out[(row0 + r) * 2 * g.N + g.N + n0 + c] = up;
        continue;
      }
      const float h = gate / (1.0f + __expf(-gate)) * up;
      g.h_out[(row0 + r) * g.N + n0 + c] = FromF<T>(h);
    } else {
      const int q = g.sorted[row0 + r];
      g.o_out[int64_t(q) * g.N + n0 + c] = g.weights[q] * smem.ep.c[0][r][c];
    }
  }
}

// y[t, j] = sum over the kept pairs of t (k order) of O[t * K + k, j]; every element written.
template <typename T>
__global__ void CombineKernel(const float* __restrict__ o, const int32_t* __restrict__ ids,
                              const bool* __restrict__ keep, int64_t T_, int64_t K, int64_t d,
                              int E, T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < T_ * d;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / d, j = i % d;
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t q = t * K + k;
      const int32_t e = ids[q];
      if (keep[q] && e >= 0 && e < E) s += o[q * d + j];
    }
    y[i] = FromF<T>(s);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward (formulas: BwdProblem in masked_moe.h). With the pairs grouped as in the forward:
//   a. GroupedGemm<gated> with ab_out: AB = x @ [gate_e | up_e] per sorted row (f32, recomputed).
//   b. BwdGemm<kGd>: GD = dy[token] @ down_e^T per sorted row (f32).
//   c. SwigluBwdKernel: per sorted row, h = silu(a) * b, dweights[pair] = <GD, h> (one block per
//      row: a fixed sum order), DAB = [w GD b silu'(a) | w GD silu(a)] (input type, the operand of
//      the next GEMMs) and, for the weight gradients, the row's x, h and w * dy (input type).
//   d. BwdGemm<kDx>: O[pair] = DAB @ [gate_e | up_e]^T (f32); CombineKernel sums a token's kept
//      pairs in k order into dx (every row written).
//   e. Weight gradients only when asked, BwdGemm<kDw> per (expert, 64 x 64 tile), the reduction
//      over the expert's rows: [dw_gate_e | dw_up_e] = X^T DAB, dw_down_e = H^T (w dy). Every
//      element is written (zero for an expert without kept pairs).
// Work follows the kept pairs, as in the forward: K experts per token, never E. dx and dweights are
// deterministic; the weight gradients sum an expert's rows in the order the scatter's atomics left
// them, so they can differ between runs by float32 rounding.

enum class BwdMode { kGd, kDx, kDw };

template <typename T>
struct BwdGemmArgs {
  const T* a;   // kGd: dy [T, Kd], rows gathered by token; kDx: DAB [rows, Kd]; kDw: [rows, M]
  const T* b0;  // kGd: w_down [E, N, Kd] (transposed); kDx: w_gate [E, N, split] (transposed,
                // k < split); kDw: [rows, N] row-major
  const T* b1;  // kDx: w_up [E, N, split] (transposed, k >= split); else b0
  int64_t Kd, N, M;  // reduction length (kGd, kDx), output columns, output rows (kDw)
  int64_t split;     // kGd: Kd; kDx: f; kDw: columns < split go to out0, the others to out1
  int E, topk;
  const int* offsets;       // [E + 1] row offsets
  const int* tile_offsets;  // [E + 1] M-tile offsets
  const int* sorted;        // [rows] pair index of each sorted row
  float* out_f32;           // kGd: [rows, N] in sorted-row order; kDx: [pairs, N] by pair
  T* out0;                  // kDw: [E, M, split]
  T* out1;                  // kDw: [E, M, N - split] or null
};

// B tile [BK x BN] of a matrix used transposed: B(k, n) = W(n, k) with W row-major [N, ld], W
// taken from b0 for k < split and from b1 (at k - split) above; the expert's slab is e * N * ld.
template <typename T, bool kVec>
__device__ __forceinline__ void LoadBT(const BwdGemmArgs<T>& g, int e, int64_t k0, int64_t n0,
                                       T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  const int64_t ld = g.split, slab = int64_t(e) * g.N * ld;
  if constexpr (kVec) {  // VW consecutive k of one n (never across split: split % VW == 0)
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int n = v / (BK / VW), c = (v % (BK / VW)) * VW;
      const int64_t k = k0 + c;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (k < g.Kd && n0 + n < g.N) {
        const T* w = (k < g.split ? g.b0 + k : g.b1 + (k - g.split)) + slab;
        val = *reinterpret_cast<const uint4*>(w + (n0 + n) * ld);
      }
      *reinterpret_cast<uint4*>(&st[i * VW]) = val;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      const int n = idx / BK, c = idx % BK;
      const int64_t k = k0 + c;
      T val = FromF<T>(0.0f);
      if (k < g.Kd && n0 + n < g.N)
        val = (k < g.split ? g.b0 + k : g.b1 + (k - g.split))[slab + (n0 + n) * ld];
      st[i] = val;
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void StoreBT(T (*sb)[BN + BPAD], const T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int n = v / (BK / VW), c = (v % (BK / VW)) * VW;
#pragma unroll
      for (int j = 0; j < VW; ++j) sb[c + j][n] = st[i * VW + j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      sb[idx % BK][idx / BK] = st[i];
    }
  }
}

// A tile [BM x BK] of a matrix used transposed, A(m, k) = S(k, m0 + m) with S row-major [rows x M]:
// loaded as LoadB's [BK x BN] tile of S (BM == BN), then stored transposed by StoreAT.
static_assert(BM == BN, "LoadB stages the transposed A tile");

template <typename T, bool kVec>
__device__ __forceinline__ void StoreAT(T (*sa)[BK + APAD], const T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int k = v / (BM / VW), c = (v % (BM / VW)) * VW;
#pragma unroll
      for (int j = 0; j < VW; ++j) sa[c + j][k] = st[i * VW + j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      sa[idx % BM][idx / BM] = st[i];
    }
  }
}

// kGd, kDx: one block per (M tile of an expert's sorted rows, N tile), as GroupedGemm.
// kDw: one block per (expert, M tile x N tile of its gradient), reducing over the expert's rows.
template <typename T, BwdMode MODE, bool kVec>
__global__ void __launch_bounds__(kThreads) BwdGemm(BwdGemmArgs<T> g) {
  int e;
  int64_t row0, rows, m0 = 0, n0;
  if constexpr (MODE == BwdMode::kDw) {
    e = blockIdx.x;
    const int64_t ntn = (g.N + BN - 1) / BN;
    m0 = int64_t(blockIdx.y / ntn) * BM;
    n0 = int64_t(blockIdx.y % ntn) * BN;
    row0 = g.offsets[e];
    rows = g.offsets[e + 1] - row0;  // the reduction length
  } else {
    const int tile = blockIdx.x;
    if (tile >= g.tile_offsets[g.E]) return;  // grid sized for the worst case
    const TileRows tr = FindTile(g.offsets, g.tile_offsets, g.E, tile);
    e = tr.e;
    row0 = tr.row0;
    rows = tr.rows;
    n0 = int64_t(blockIdx.y) * BN;
  }

  union Smem {
    OperandSmem<T, 1> op;
    EpilogueSmem<1> ep;
  };
  __shared__ Smem smem;
  __shared__ const T* arow[BM];
  if constexpr (MODE != BwdMode::kDw) {
    if (threadIdx.x < BM) {
      const int r = threadIdx.x;
      const T* p = nullptr;
      if (r < rows)
        p = MODE == BwdMode::kGd ? g.a + int64_t(g.sorted[row0 + r] / g.topk) * g.Kd
                                 : g.a + (row0 + r) * g.Kd;
      arow[r] = p;
    }
    __syncthreads();
  }
  const int64_t Kred = MODE == BwdMode::kDw ? rows : g.Kd;
  const T* a_src = g.a + row0 * g.M;   // kDw: the expert's first row
  const T* b_src = g.b0 + row0 * g.N;  // kDw

  TileMath<T, 1> math;
  math.Init();
  alignas(16) T sa[kStage];
  alignas(16) T sb[kStage];
  auto load = [&](int64_t k0) {
    if constexpr (MODE == BwdMode::kDw) {
      LoadB<T, kVec>(Kred, g.M, a_src, k0, m0, sa);
      LoadB<T, kVec>(Kred, g.N, b_src, k0, n0, sb);
    } else {
      LoadA<T, kVec>(g.Kd, arow, k0, sa);
      LoadBT<T, kVec>(g, e, k0, n0, sb);
    }
  };
  if (Kred > 0) load(0);
  for (int64_t k0 = 0; k0 < Kred; k0 += BK) {
    if constexpr (MODE == BwdMode::kDw) {
      StoreAT<T, kVec>(smem.op.a, sa);
      StoreB<T, kVec>(smem.op.b[0], sb);
    } else {
      StoreA<T, kVec>(smem.op.a, sa);
      StoreBT<T, kVec>(smem.op.b[0], sb);
    }
    __syncthreads();
    if (k0 + BK < Kred) load(k0 + BK);
    math.Step(smem.op);
    __syncthreads();
  }
  math.Store(smem.ep);
  __syncthreads();

  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int r = idx / BN, c = idx % BN;
    const int64_t n = n0 + c;
    if (n >= g.N) continue;
    const float v = smem.ep.c[0][r][c];
    if constexpr (MODE == BwdMode::kGd) {
      if (r < rows) g.out_f32[(row0 + r) * g.N + n] = v;
    } else if constexpr (MODE == BwdMode::kDx) {
      if (r < rows) g.out_f32[int64_t(g.sorted[row0 + r]) * g.N + n] = v;
    } else {
      const int64_t m = m0 + r;
      if (m >= g.M) continue;
      if (n < g.split)
        g.out0[(int64_t(e) * g.M + m) * g.split + n] = FromF<T>(v);
      else
        g.out1[(int64_t(e) * g.M + m) * (g.N - g.split) + (n - g.split)] = FromF<T>(v);
    }
  }
}

// Step c, one block per sorted row (blocks past the kept rows exit).
template <typename T>
__global__ void SwigluBwdKernel(const float* __restrict__ ab, const float* __restrict__ gd,
                                const int* __restrict__ offsets, int E,
                                const int* __restrict__ sorted, int topk,
                                const float* __restrict__ weights, const T* __restrict__ x,
                                const T* __restrict__ dy, int64_t d, int64_t f,
                                T* __restrict__ dab, float* __restrict__ dweights,
                                T* __restrict__ xs, T* __restrict__ hs, T* __restrict__ wdy) {
  const int64_t r = blockIdx.x;
  if (r >= offsets[E]) return;
  const int q = sorted[r];
  const int64_t t = q / topk;
  const float w = weights[q];
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < f; j += blockDim.x) {
    const float a = ab[r * 2 * f + j], b = ab[r * 2 * f + f + j], g = gd[r * f + j];
    const float s = 1.0f / (1.0f + __expf(-a));
    const float sa = a * s;  // silu(a)
    const float hv = sa * b;
    acc += g * hv;
    const float dh = w * g;
    dab[r * 2 * f + j] = FromF<T>(dh * b * (s + sa * (1.0f - s)));  // silu'(a) = s (1 + a (1 - s))
    dab[r * 2 * f + f + j] = FromF<T>(dh * sa);
    if (hs != nullptr) hs[r * f + j] = FromF<T>(hv);
  }
  if (xs != nullptr) {
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      xs[r * d + j] = x[t * d + j];
      wdy[r * d + j] = FromF<T>(w * ToF(dy[t * d + j]));
    }
  }
  // Block sum of acc (blockDim.x a multiple of 32, at most 1024).
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int i = 0; i < int(blockDim.x / 32); ++i) total += part[i];
    dweights[q] = total;
  }
}

// ------------------------------------------------------------------------------------------------

ffi::Error LaunchError(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("masked_moe CUDA: ") + what + ": " +
                              cudaGetErrorString(err));
}

// Temporary memory: one scratch allocation per call, carved into 256-byte aligned pieces (XLA's FFI
// allocator accepts alignments of at most 16 bytes, so the base is aligned here). `carve` runs twice:
// once to measure (null base), once to hand out the pointers it stores.
struct Carver {
  char* base = nullptr;
  size_t used = 0;
  template <typename P>
  P* Take(int64_t count) {
    const size_t off = used;
    used += (size_t(std::max<int64_t>(count, 1)) * sizeof(P) + 255) / 256 * 256;
    return base == nullptr ? nullptr : reinterpret_cast<P*>(base + off);
  }
};

template <typename F>
ffi::Error CarveScratch(ffi::ScratchAllocator& scratch, F&& carve) {
  Carver measure;
  carve(measure);
  const size_t bytes = measure.used + 256;
  auto mem = scratch.Allocate(bytes, 16);
  if (!mem.has_value())
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "masked_moe CUDA: scratch allocation of " + std::to_string(bytes) +
                          " bytes failed (XLA's diagnostic says why)");
  Carver give;
  give.base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(*mem) + 255) & ~uintptr_t(255));
  carve(give);
  return ffi::Error::Success();
}

inline int GridFor(int64_t n, int threads) {
  return int(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

// Steps 1-3 of the header: kept pairs grouped by expert. ints = counts | cursor | offsets (E + 1)
// | tile_offsets (E + 1); sorted [num_pairs].
ffi::Error GroupPairs(cudaStream_t stream, const Problem& p, int* ints, int* sorted) {
  const int64_t num_pairs = p.T * p.K;
  const int E = int(p.E);
  int* counts = ints;
  int* cursor = ints + E;
  int* offsets = ints + 2 * E;
  int* tile_offsets = ints + 3 * E + 1;
  if (cudaMemsetAsync(ints, 0, sizeof(int) * size_t(2 * E), stream) != cudaSuccess)
    return LaunchError("memset counts");
  const int g_pairs = GridFor(num_pairs, 256);
  CountKernel<<<g_pairs, 256, 0, stream>>>(p.expert_ids, p.keep, num_pairs, E, counts);
  if (auto err = LaunchError("count"); err.failure()) return err;
  ScanKernel<<<1, 1, 0, stream>>>(counts, E, offsets, tile_offsets);
  if (auto err = LaunchError("scan"); err.failure()) return err;
  ScatterKernel<<<g_pairs, 256, 0, stream>>>(p.expert_ids, p.keep, num_pairs, E, offsets, cursor,
                                             sorted);
  return LaunchError("scatter");
}

// Worst case of the M tiles over all experts: sum_e ceil(n_e / BM) <= ceil(P / BM) + (experts with
// a pair).
inline int64_t MaxTiles(int64_t num_pairs, int64_t E) {
  return (num_pairs + BM - 1) / BM + std::min<int64_t>(E, num_pairs);
}

template <typename T>
ffi::Error Run(cudaStream_t stream, ffi::ScratchAllocator& scratch, const Problem& p) {
  const int64_t T_ = p.T, K = p.K, d = p.d, f = p.f;
  const int E = int(p.E);
  T* y = static_cast<T*>(p.y);
  if (T_ == 0 || d == 0) return ffi::Error::Success();
  const int64_t num_pairs = T_ * K;
  if (num_pairs == 0 || E == 0 || f == 0) {
    if (cudaMemsetAsync(y, 0, size_t(T_ * d) * sizeof(T), stream) != cudaSuccess)
      return LaunchError("memset y");
    return ffi::Error::Success();
  }
  if (num_pairs > INT32_MAX || E > INT32_MAX / 2)
    return ffi::Error::InvalidArgument("masked_moe CUDA: T * K must fit in int32");

  int *ints = nullptr, *sorted = nullptr;
  T* h = nullptr;
  float* o = nullptr;
  if (ffi::Error err = CarveScratch(scratch, [&](Carver& c) {
        ints = c.Take<int>(4 * int64_t(E) + 2);  // counts | cursor | offsets | tile offsets
        sorted = c.Take<int>(num_pairs);
        h = c.Take<T>(num_pairs * f);
        o = c.Take<float>(num_pairs * d);
      });
      err.failure())
    return err;
  const int* offsets = ints + 2 * E;
  const int* tile_offsets = ints + 3 * E + 1;
  if (ffi::Error err = GroupPairs(stream, p, ints, sorted); err.failure()) return err;

  const int64_t max_tiles = MaxTiles(num_pairs, E);
  constexpr int VW = 16 / sizeof(T);
  auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };

  GemmArgs<T> g1{};
  g1.x = static_cast<const T*>(p.x);
  g1.b0 = static_cast<const T*>(p.w_gate);
  g1.b1 = static_cast<const T*>(p.w_up);
  g1.Kd = d;
  g1.N = f;
  g1.E = E;
  g1.topk = int(K);
  g1.offsets = offsets;
  g1.tile_offsets = tile_offsets;
  g1.sorted = sorted;
  g1.weights = p.weights;
  g1.h_out = h;
  const dim3 grid1(unsigned(max_tiles), unsigned((f + BN - 1) / BN));
  if (d % VW == 0 && f % VW == 0 && aligned(p.x) && aligned(p.w_gate) && aligned(p.w_up))
    GroupedGemm<T, true, true><<<grid1, kThreads, 0, stream>>>(g1);
  else
    GroupedGemm<T, true, false><<<grid1, kThreads, 0, stream>>>(g1);
  if (auto err = LaunchError("gate/up GEMM"); err.failure()) return err;

  GemmArgs<T> g2 = g1;
  g2.x = nullptr;
  g2.h = h;
  g2.b0 = static_cast<const T*>(p.w_down);
  g2.b1 = nullptr;
  g2.Kd = f;
  g2.N = d;
  g2.h_out = nullptr;
  g2.o_out = o;
  const dim3 grid2(unsigned(max_tiles), unsigned((d + BN - 1) / BN));
  if (f % VW == 0 && d % VW == 0 && aligned(p.w_down))  // H: scratch is 256-byte aligned
    GroupedGemm<T, false, true><<<grid2, kThreads, 0, stream>>>(g2);
  else
    GroupedGemm<T, false, false><<<grid2, kThreads, 0, stream>>>(g2);
  if (auto err = LaunchError("down GEMM"); err.failure()) return err;

  CombineKernel<T><<<GridFor(T_ * d, 256), 256, 0, stream>>>(o, p.expert_ids, p.keep, T_, K, d,
                                                            E, y);
  return LaunchError("combine");
}

template <typename T>
ffi::Error RunBwd(cudaStream_t stream, ffi::ScratchAllocator& scratch, const BwdProblem& bp) {
  const Problem& p = bp.fwd;
  const int64_t T_ = p.T, K = p.K, d = p.d, f = p.f;
  const int E = int(p.E);
  const bool wgrad = bp.dw_gate != nullptr;
  const int64_t num_pairs = T_ * K;
  // Zeros first: dropped pairs, tokens without kept pairs (dx is fully written by the combine when
  // there are pairs), and every gradient when nothing is kept.
  if (num_pairs > 0 &&
      cudaMemsetAsync(bp.dweights, 0, size_t(num_pairs) * sizeof(float), stream) != cudaSuccess)
    return LaunchError("memset dweights");
  if (num_pairs == 0 || E == 0 || f == 0 || d == 0) {
    if (T_ * d > 0 && cudaMemsetAsync(bp.dx, 0, size_t(T_ * d) * sizeof(T), stream) != cudaSuccess)
      return LaunchError("memset dx");
    if (wgrad && int64_t(E) * d * f > 0) {
      const size_t nw = size_t(E) * size_t(d * f) * sizeof(T);
      if (cudaMemsetAsync(bp.dw_gate, 0, nw, stream) != cudaSuccess ||
          cudaMemsetAsync(bp.dw_up, 0, nw, stream) != cudaSuccess ||
          cudaMemsetAsync(bp.dw_down, 0, nw, stream) != cudaSuccess)
        return LaunchError("memset weight gradients");
    }
    return ffi::Error::Success();
  }
  if (num_pairs > INT32_MAX || E > INT32_MAX / 2)
    return ffi::Error::InvalidArgument("masked_moe CUDA: T * K must fit in int32");

  int *ints = nullptr, *sorted = nullptr;
  float *ab = nullptr, *gd = nullptr, *o = nullptr;
  T *dab = nullptr, *xs = nullptr, *hs = nullptr, *wdy = nullptr;
  if (ffi::Error err = CarveScratch(scratch, [&](Carver& c) {
        ints = c.Take<int>(4 * int64_t(E) + 2);
        sorted = c.Take<int>(num_pairs);
        ab = c.Take<float>(num_pairs * 2 * f);
        gd = c.Take<float>(num_pairs * f);
        dab = c.Take<T>(num_pairs * 2 * f);
        o = c.Take<float>(num_pairs * d);
        if (wgrad) {
          xs = c.Take<T>(num_pairs * d);
          hs = c.Take<T>(num_pairs * f);
          wdy = c.Take<T>(num_pairs * d);
        }
      });
      err.failure())
    return err;
  const int* offsets = ints + 2 * E;
  const int* tile_offsets = ints + 3 * E + 1;
  if (ffi::Error err = GroupPairs(stream, p, ints, sorted); err.failure()) return err;

  const int64_t max_tiles = MaxTiles(num_pairs, E);
  constexpr int VW = 16 / sizeof(T);
  auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  const bool vec = d % VW == 0 && f % VW == 0 && aligned(p.x) && aligned(p.w_gate) &&
                   aligned(p.w_up) && aligned(p.w_down) && aligned(bp.dy);
  const T* wg = static_cast<const T*>(p.w_gate);
  const T* wu = static_cast<const T*>(p.w_up);
  const T* wd = static_cast<const T*>(p.w_down);

  // a. AB = x @ [gate | up] (the forward's first GEMM, pre-activations kept).
  GemmArgs<T> g1{};
  g1.x = static_cast<const T*>(p.x);
  g1.b0 = wg;
  g1.b1 = wu;
  g1.Kd = d;
  g1.N = f;
  g1.E = E;
  g1.topk = int(K);
  g1.offsets = offsets;
  g1.tile_offsets = tile_offsets;
  g1.sorted = sorted;
  g1.weights = p.weights;
  g1.ab_out = ab;
  const dim3 grid_f(unsigned(max_tiles), unsigned((f + BN - 1) / BN));
  if (vec)
    GroupedGemm<T, true, true><<<grid_f, kThreads, 0, stream>>>(g1);
  else
    GroupedGemm<T, true, false><<<grid_f, kThreads, 0, stream>>>(g1);
  if (auto err = LaunchError("backward gate/up GEMM"); err.failure()) return err;

  // b. GD = dy @ down^T.
  BwdGemmArgs<T> g2{};
  g2.a = static_cast<const T*>(bp.dy);
  g2.b0 = wd;
  g2.b1 = wd;
  g2.Kd = d;
  g2.N = f;
  g2.split = d;
  g2.E = E;
  g2.topk = int(K);
  g2.offsets = offsets;
  g2.tile_offsets = tile_offsets;
  g2.sorted = sorted;
  g2.out_f32 = gd;
  if (vec)
    BwdGemm<T, BwdMode::kGd, true><<<grid_f, kThreads, 0, stream>>>(g2);
  else
    BwdGemm<T, BwdMode::kGd, false><<<grid_f, kThreads, 0, stream>>>(g2);
  if (auto err = LaunchError("backward dy @ down^T GEMM"); err.failure()) return err;

  // c. SwiGLU backward, dweights.
  SwigluBwdKernel<T><<<unsigned(num_pairs), 256, 0, stream>>>(
      ab, gd, offsets, E, sorted, int(K), p.weights, static_cast<const T*>(p.x),
      static_cast<const T*>(bp.dy), d, f, dab, bp.dweights, xs, hs, wdy);
  if (auto err = LaunchError("backward SwiGLU"); err.failure()) return err;

  // d. O = DAB @ [gate | up]^T per pair, summed into dx.
  BwdGemmArgs<T> g3 = g2;
  g3.a = dab;
  g3.b0 = wg;
  g3.b1 = wu;
  g3.Kd = 2 * f;
  g3.N = d;
  g3.split = f;
  g3.out_f32 = o;
  const dim3 grid_d(unsigned(max_tiles), unsigned((d + BN - 1) / BN));
  if (vec)
    BwdGemm<T, BwdMode::kDx, true><<<grid_d, kThreads, 0, stream>>>(g3);
  else
    BwdGemm<T, BwdMode::kDx, false><<<grid_d, kThreads, 0, stream>>>(g3);
  if (auto err = LaunchError("backward dx GEMM"); err.failure()) return err;
  CombineKernel<T><<<GridFor(T_ * d, 256), 256, 0, stream>>>(o, p.expert_ids, p.keep, T_, K, d, E,
                                                            static_cast<T*>(bp.dx));
  if (auto err = LaunchError("backward combine"); err.failure()) return err;
  if (!wgrad) return ffi::Error::Success();

  // e. [dw_gate | dw_up] = X^T DAB and dw_down = H^T (w dy), per expert.
  BwdGemmArgs<T> g4 = g2;
  g4.a = xs;
  g4.b0 = dab;
  g4.b1 = dab;
  g4.M = d;
  g4.N = 2 * f;
  g4.split = f;
  g4.out0 = static_cast<T*>(bp.dw_gate);
  g4.out1 = static_cast<T*>(bp.dw_up);
  const int64_t tiles_gu = ((d + BM - 1) / BM) * ((2 * f + BN - 1) / BN);
  const int64_t tiles_dn = ((f + BM - 1) / BM) * ((d + BN - 1) / BN);
  if (tiles_gu > 65535 || tiles_dn > 65535)
    return ffi::Error::InvalidArgument("masked_moe CUDA backward: d * f too large for the grid");
  if (vec)
    BwdGemm<T, BwdMode::kDw, true><<<dim3(unsigned(E), unsigned(tiles_gu)), kThreads, 0, stream>>>(g4);
  else
    BwdGemm<T, BwdMode::kDw, false><<<dim3(unsigned(E), unsigned(tiles_gu)), kThreads, 0, stream>>>(g4);
  if (auto err = LaunchError("backward dw_gate/dw_up GEMM"); err.failure()) return err;
  BwdGemmArgs<T> g5 = g4;
  g5.a = hs;
  g5.b0 = wdy;
  g5.b1 = wdy;
  g5.M = f;
  g5.N = d;
  g5.split = d;
  g5.out0 = static_cast<T*>(bp.dw_down);
  g5.out1 = nullptr;
  if (vec)
    BwdGemm<T, BwdMode::kDw, true><<<dim3(unsigned(E), unsigned(tiles_dn)), kThreads, 0, stream>>>(g5);
  else
    BwdGemm<T, BwdMode::kDw, false><<<dim3(unsigned(E), unsigned(tiles_dn)), kThreads, 0, stream>>>(g5);
  return LaunchError("backward dw_down GEMM");
}

ffi::Error MaskedMoeBwdCudaImpl(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                                ffi::AnyBuffer x, ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up,
                                ffi::AnyBuffer w_down, ffi::Buffer<ffi::S32> expert_ids,
                                ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::PRED> keep,
                                ffi::AnyBuffer dy, ffi::AnyBuffer* dx,
                                ffi::Buffer<ffi::F32>* dweights, ffi::AnyBuffer* dw_gate,
                                ffi::AnyBuffer* dw_up, ffi::AnyBuffer* dw_down) {
  BwdProblem bp;
  if (ffi::Error err = CheckAndDescribeBwd(x, w_gate, w_up, w_down, expert_ids, weights, keep, dy, dx,
                                           dweights, dw_gate, dw_up, dw_down, &bp);
      err.failure())
    return err;
  const Problem& p = bp.fwd;
  if (p.f > (int64_t(65535) * BN) || p.d > (int64_t(65535) * BN))
    return ffi::Error::InvalidArgument("masked_moe CUDA: d and f must be below 65535 * 64");
  switch (p.type) {
    case ElemType::kF32: return RunBwd<float>(stream, scratch, bp);
    case ElemType::kBF16: return RunBwd<__nv_bfloat16>(stream, scratch, bp);
    case ElemType::kF16: return RunBwd<__half>(stream, scratch, bp);
  }
  return ffi::Error::InvalidArgument("masked_moe CUDA: unsupported dtype");
}

ffi::Error MaskedMoeBwdCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                            ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                            ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                            ffi::Buffer<ffi::PRED> keep, ffi::AnyBuffer dy,
                            ffi::Result<ffi::AnyBuffer> dx,
                            ffi::Result<ffi::Buffer<ffi::F32>> dweights) {
  return MaskedMoeBwdCudaImpl(stream, scratch, x, w_gate, w_up, w_down, expert_ids, weights, keep, dy,
                              &*dx, &*dweights, nullptr, nullptr, nullptr);
}

ffi::Error MaskedMoeBwdFullCuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                ffi::AnyBuffer x, ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up,
                                ffi::AnyBuffer w_down, ffi::Buffer<ffi::S32> expert_ids,
                                ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::PRED> keep,
                                ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                                ffi::Result<ffi::Buffer<ffi::F32>> dweights,
                                ffi::Result<ffi::AnyBuffer> dw_gate,
                                ffi::Result<ffi::AnyBuffer> dw_up,
                                ffi::Result<ffi::AnyBuffer> dw_down) {
  return MaskedMoeBwdCudaImpl(stream, scratch, x, w_gate, w_up, w_down, expert_ids, weights, keep, dy,
                              &*dx, &*dweights, &*dw_gate, &*dw_up, &*dw_down);
}

ffi::Error MaskedMoeCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                         ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                         ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                         ffi::Buffer<ffi::PRED> keep, ffi::Result<ffi::AnyBuffer> y) {
  Problem p;
  if (ffi::Error err = CheckAndDescribe(x, w_gate, w_up, w_down, expert_ids, weights, keep, *y, &p);
      err.failure())
    return err;
  if (p.f > (int64_t(65535) * BN) || p.d > (int64_t(65535) * BN))
    return ffi::Error::InvalidArgument("masked_moe CUDA: d and f must be below 65535 * 64");
  switch (p.type) {
    case ElemType::kF32: return Run<float>(stream, scratch, p);
    case ElemType::kBF16: return Run<__nv_bfloat16>(stream, scratch, p);
    case ElemType::kF16: return Run<__half>(stream, scratch, p);
  }
  return ffi::Error::InvalidArgument("masked_moe CUDA: unsupported dtype");
}

ffi::Error MaskedMoeCudaAliased(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                ffi::AnyBuffer x, ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up,
                                ffi::AnyBuffer w_down, ffi::Buffer<ffi::S32> expert_ids,
                                ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::PRED> keep,
                                ffi::AnyBuffer /*y_init*/, ffi::Result<ffi::AnyBuffer> y) {
  return MaskedMoeCuda(stream, std::move(scratch), x, w_gate, w_up, w_down, expert_ids, weights,
                       keep, y);
}

}  // namespace
}  // namespace cuda
}  // namespace beam

// (x, w_gate, w_up, w_down: same float dtype; expert_ids s32 [T,K]; weights f32 [T,K];
//  keep pred [T,K]) -> y [T,d] in x's dtype. Not marked command-buffer compatible: it allocates
// scratch memory per call.
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeCuda, beam::cuda::MaskedMoeCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::AnyBuffer>()         // w_gate
                                  .Arg<ffi::AnyBuffer>()         // w_up
                                  .Arg<ffi::AnyBuffer>()         // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Ret<ffi::AnyBuffer>());       // y

// Same, plus y_init [T,d] aliased to y by the caller (contents ignored).
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeCudaAliased, beam::cuda::MaskedMoeCudaAliased,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::AnyBuffer>()         // w_gate
                                  .Arg<ffi::AnyBuffer>()         // w_up
                                  .Arg<ffi::AnyBuffer>()         // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Arg<ffi::AnyBuffer>()         // y_init (aliased to y)
                                  .Ret<ffi::AnyBuffer>());       // y

// Backward: (forward operands, dy [T,d] in x's dtype) -> (dx [T,d] x's dtype, dweights [T,K] f32).
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeBwdCuda, beam::cuda::MaskedMoeBwdCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::AnyBuffer>()         // w_gate
                                  .Arg<ffi::AnyBuffer>()         // w_up
                                  .Arg<ffi::AnyBuffer>()         // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Arg<ffi::AnyBuffer>()         // dy
                                  .Ret<ffi::AnyBuffer>()         // dx
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dweights

// Same, plus dw_gate, dw_up [E,d,f] and dw_down [E,f,d] in x's dtype.
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeBwdFullCuda, beam::cuda::MaskedMoeBwdFullCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::AnyBuffer>()         // w_gate
                                  .Arg<ffi::AnyBuffer>()         // w_up
                                  .Arg<ffi::AnyBuffer>()         // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Arg<ffi::AnyBuffer>()         // dy
                                  .Ret<ffi::AnyBuffer>()         // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dweights
                                  .Ret<ffi::AnyBuffer>()         // dw_gate
                                  .Ret<ffi::AnyBuffer>()         // dw_up
                                  .Ret<ffi::AnyBuffer>());       // dw_down
