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
// Temporary memory comes from the FFI scratch allocator. An expert without kept pairs gets no tile,
// so its weights are never read.

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

template <typename T, bool kVec>
__device__ __forceinline__ void LoadA(const GemmArgs<T>& g, const T* const* arow, int64_t k0,
                                      T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int r = v / (BK / VW), c = (v % (BK / VW)) * VW;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (arow[r] != nullptr && k0 + c < g.Kd)
        val = *reinterpret_cast<const uint4*>(arow[r] + k0 + c);
      *reinterpret_cast<uint4*>(&st[i * VW]) = val;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      const int r = idx / BK, c = idx % BK;
      st[i] = (arow[r] != nullptr && k0 + c < g.Kd) ? arow[r][k0 + c] : FromF<T>(0.0f);
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void StoreA(const GemmArgs<T>& g, T (*sa)[BK + APAD],
                                       const T (&st)[kStage]) {
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

template <typename T, bool kVec>
__device__ __forceinline__ void LoadB(const GemmArgs<T>& g, const T* b, int64_t k0, int64_t n0,
                                      T (&st)[kStage]) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < kStage / VW; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int r = v / (BN / VW), c = (v % (BN / VW)) * VW;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (k0 + r < g.Kd && n0 + c < g.N)
        val = *reinterpret_cast<const uint4*>(b + (k0 + r) * g.N + n0 + c);
      *reinterpret_cast<uint4*>(&st[i * VW]) = val;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      const int r = idx / BN, c = idx % BN;
      st[i] = (k0 + r < g.Kd && n0 + c < g.N) ? b[(k0 + r) * g.N + n0 + c] : FromF<T>(0.0f);
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void StoreB(const GemmArgs<T>& g, T (*sb)[BN + BPAD],
                                       const T (&st)[kStage]) {
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

// kGated: A = x rows of the tile's pairs, B = (w_gate, w_up), writes H = silu(gate) * up.
// else:   A = H rows, B = w_down, writes O[pair] = weight * (H @ w_down).
// kVec: 16-byte loads (rows of A and B 16-byte aligned), else element loads.
template <typename T, bool kGated, bool kVec>
__global__ void __launch_bounds__(kThreads) GroupedGemm(GemmArgs<T> g) {
  constexpr int NMAT = kGated ? 2 : 1;
  const int tile = blockIdx.x;
  const int total_tiles = g.tile_offsets[g.E];
  if (tile >= total_tiles) return;  // grid sized for the worst case
  // Expert of this tile: the last e with tile_offsets[e] <= tile.
  int lo = 0, hi = g.E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (g.tile_offsets[mid] <= tile) lo = mid; else hi = mid;
  }
  const int e = lo;
  const int64_t row0 = g.offsets[e] + int64_t(tile - g.tile_offsets[e]) * BM;
  const int rows = min(BM, int(g.offsets[e + 1] - row0));
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
  LoadA<T, kVec>(g, arow, 0, sa);
#pragma unroll
  for (int m = 0; m < NMAT; ++m) LoadB<T, kVec>(g, b[m], 0, n0, sb[m]);
  for (int64_t k0 = 0; k0 < g.Kd; k0 += BK) {
    StoreA<T, kVec>(g, smem.op.a, sa);
#pragma unroll
    for (int m = 0; m < NMAT; ++m) StoreB<T, kVec>(g, smem.op.b[m], sb[m]);
    __syncthreads();
    if (k0 + BK < g.Kd) {  // next slice's loads in flight during this slice's math
      LoadA<T, kVec>(g, arow, k0 + BK, sa);
#pragma unroll
      for (int m = 0; m < NMAT; ++m) LoadB<T, kVec>(g, b[m], k0 + BK, n0, sb[m]);
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

ffi::Error LaunchError(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("masked_moe CUDA: ") + what + ": " +
                              cudaGetErrorString(err));
}

template <typename P>
P* Alloc(ffi::ScratchAllocator& scratch, int64_t count, bool* ok) {
  if (!*ok) return nullptr;
  auto mem = scratch.Allocate(size_t(std::max<int64_t>(count, 1)) * sizeof(P), 256);
  if (!mem.has_value()) {
    *ok = false;
    return nullptr;
  }
  return static_cast<P*>(*mem);
}

inline int GridFor(int64_t n, int threads) {
  return int(std::min<int64_t>((n + threads - 1) / threads, 65535));
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

  bool ok = true;
  int* ints = Alloc<int>(scratch, 4 * int64_t(E) + 2, &ok);  // counts | cursor | offsets | tiles
  int* sorted = Alloc<int>(scratch, num_pairs, &ok);
  T* h = Alloc<T>(scratch, num_pairs * f, &ok);
  float* o = Alloc<float>(scratch, num_pairs * d, &ok);
  if (!ok) return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                             "masked_moe CUDA: scratch allocation failed");
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
  if (auto err = LaunchError("scatter"); err.failure()) return err;

  // Worst case: sum_e ceil(n_e / BM) <= ceil(P / BM) + (experts with a pair).
  const int64_t max_tiles = (num_pairs + BM - 1) / BM + std::min<int64_t>(E, num_pairs);
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
