// Shared declarations of the masked-expert (BEAM) MoE kernel.
//
//   masked_moe(x[T,d], w_gate[E,d,f], w_up[E,d,f], w_down[E,f,d],
//              expert_ids[T,K] s32, weights[T,K] f32, keep[T,K] pred) -> y[T,d]
//
//   y[t] = sum_k keep[t,k] * weights[t,k] * down_e(silu(x[t] @ gate_e) * (x[t] @ up_e)),
//          e = expert_ids[t,k]
//
// A pair whose id lies outside [0, E) is treated as dropped. Every row of y is written (zero for a
// token without kept pairs); an expert that no kept pair uses is never read.
#ifndef BEAM_JAX_FFI_MASKED_MOE_H_
#define BEAM_JAX_FFI_MASKED_MOE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace beam {

enum class ElemType { kF32, kBF16, kF16 };

// One call's operands, already checked by the FFI handler (shapes, dtypes).
struct Problem {
  int64_t T = 0, K = 0, E = 0, d = 0, f = 0;
  ElemType type = ElemType::kF32;
  const void* x = nullptr;       // [T, d]
  const void* w_gate = nullptr;  // [E, d, f]
  const void* w_up = nullptr;    // [E, d, f]
  const void* w_down = nullptr;  // [E, f, d]
  const int32_t* expert_ids = nullptr;  // [T, K]
  const float* weights = nullptr;       // [T, K]
  const bool* keep = nullptr;           // [T, K]
  void* y = nullptr;                    // [T, d], same element type as x
  // bf16 only: the expert weights packed per expert as PackedRowsProblem::wp is (beam_jax.packed_experts):
  // w_gate, w_up [E, ceil(f / 32), d / 2, 32, 2] and w_down [E, ceil(d / 32), f / 2, 32, 2]; d and f even.
  bool packed = false;
};

// The backward of one call: the forward's operands plus the output cotangent dy, and the gradients
// to write. With keep[t,k] and e = expert_ids[t,k] in [0, E), a = x[t] @ gate_e, b = x[t] @ up_e,
// h = silu(a) * b and g = down_e @ dy[t] (so that <dy[t], h @ down_e> = <g, h>):
//   dweights[t,k] = <g, h>                          (0 for a dropped pair)
//   da = weights[t,k] * g * b * silu'(a),  db = weights[t,k] * g * silu(a)
//   dx[t]        += da @ gate_e^T + db @ up_e^T
//   dw_gate[e]   += x[t]^T da,  dw_up[e] += x[t]^T db,  dw_down[e] += h^T (weights[t,k] * dy[t])
// The expert-weight gradients are optional (null pointers: not computed); when asked, every element
// is written (zero for experts without kept pairs).
struct BwdProblem {
  Problem fwd;                   // x, weights, routing (fwd.y unused)
  const void* dy = nullptr;      // [T, d], x's element type
  void* dx = nullptr;            // [T, d], x's element type
  float* dweights = nullptr;     // [T, K] f32
  void* dw_gate = nullptr;       // [E, d, f] or null
  void* dw_up = nullptr;         // [E, d, f] or null
  void* dw_down = nullptr;       // [E, f, d] or null
};

// The decode-time projections (CPU): y[M, N] = x[M, Kd] @ w[Kd, N], one element type, accumulated
// in f32. Streams w once at memory bandwidth for a few rows of x (XLA:CPU's dot reads a bf16 matrix
// at a quarter of it); ffi/rows_matmul_cpu.cc binds it.
struct RowsProblem {
  int64_t M = 0, Kd = 0, N = 0;
  ElemType type = ElemType::kF32;
  const void* x = nullptr;  // [M, Kd]
  const void* w = nullptr;  // [Kd, N]
  void* y = nullptr;        // [M, N]
};

// The decode-time projections with the weights packed for vdpbf16ps (beam_jax.rows_matmul.pack_weight, once
// per weight): y[M, N] = x[M, Kd] @ w[Kd, N] in bfloat16, accumulated in f32, with w given as
// wp[ceil(N / 32), Kd / 2, 32, 2]: block b of 32 columns, pair p of rows, column c of the block, then
// w[2p, 32b + c] and w[2p + 1, 32b + c] side by side (zeros past column N; Kd even). Each block is one
// contiguous run that one 64-byte load per 16 columns feeds to vdpbf16ps without a shuffle, so eight
// rows of x cost what one does (the [Kd, N] loop interleaves two rows of w per step in registers and
// reads 8-32 rows of w at once); ffi/rows_matmul_cpu.cc binds it.
struct PackedRowsProblem {
  int64_t M = 0, Kd = 0, N = 0;
  const void* x = nullptr;   // [M, Kd] bf16
  const void* wp = nullptr;  // [ceil(N / 32), Kd / 2, 32, 2] bf16
  void* y = nullptr;         // [M, N] bf16
};
constexpr int64_t kPackedCols = 32;  // columns of one packed block

// Decode attention (CPU): one query per sequence against its KV cache (beam_jax.decode_attention, the decode
// steps of beam_jax.generate), for the three element types; scores, softmax and the value sum in f32, the
// probabilities rounded to the element type before the value sum (as the reference does):
//   out[b, i] = sum_l softmax_l(scale * <q[b, i], k[b, l, i / G]> over allowed[b, l]) * v[b, l, i / G]
// with G = H / Hkv query heads per KV head; ffi/decode_attention_cpu.cc binds it.
struct DecodeAttentionProblem {
  int64_t B = 0, L = 0, H = 0, Hkv = 0, Dk = 0, Dv = 0;
  ElemType type = ElemType::kF32;
  float scale = 1.0f;
  const void* q = nullptr;        // [B, H, Dk]
  const void* k = nullptr;        // [B, L, Hkv, Dk]
  const void* v = nullptr;        // [B, L, Hkv, Dv]
  const bool* allowed = nullptr;  // [B, L]: the slots each query may attend to
  void* out = nullptr;            // [B, H, Dv]
};

// How the CPU kernel runs work in parallel: `schedule(task)` runs `task` on another thread (or
// inline), `num_threads` is how many threads may work at once (the caller's included).
// Or, where set, `fork(count, work)` runs `work` on `count` threads at once (the caller's included) and
// returns when every one has returned: the Python entry points use OpenMP's team, which is torch's own
// when torch is loaded (one libgomp per process), so no second pool competes with its threads.
struct Runner {
  int num_threads = 1;
  std::function<void(std::function<void()>)> schedule;
  std::function<void(int, const std::function<void()>&)> fork;
};

// CPU kernels, one per instruction set; `masked_moe_cpu.cc` picks one at run time.
namespace cpu_generic {
void MaskedMoe(const Problem& p, const Runner& runner);
void MaskedMoeBwd(const BwdProblem& p, const Runner& runner);
void RowsMatmul(const RowsProblem& p, const Runner& runner);
void PackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner);
void DecodeAttention(const DecodeAttentionProblem& p, const Runner& runner);
}
namespace cpu_avx2 {
void MaskedMoe(const Problem& p, const Runner& runner);
void MaskedMoeBwd(const BwdProblem& p, const Runner& runner);
void RowsMatmul(const RowsProblem& p, const Runner& runner);
void PackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner);
void DecodeAttention(const DecodeAttentionProblem& p, const Runner& runner);
}
namespace cpu_avx512bf16 {
void MaskedMoe(const Problem& p, const Runner& runner);
void MaskedMoeBwd(const BwdProblem& p, const Runner& runner);
void RowsMatmul(const RowsProblem& p, const Runner& runner);
void PackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner);
void DecodeAttention(const DecodeAttentionProblem& p, const Runner& runner);
}
namespace cpu_amx {
void MaskedMoe(const Problem& p, const Runner& runner);
void MaskedMoeBwd(const BwdProblem& p, const Runner& runner);
void RowsMatmul(const RowsProblem& p, const Runner& runner);
void PackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner);
void DecodeAttention(const DecodeAttentionProblem& p, const Runner& runner);
}

// The instruction set the CPU kernels run: the best build this processor supports, capped by
// BEAM_JAX_CPU_ISA (generic | avx2 | avx512bf16 | amx, read at first use; the tests use it to run each
// build) or later by SetCpuIsa (the benchmarks compare builds side by side in one process).
enum class CpuIsa { kGeneric, kAvx2, kAvx512Bf16, kAmx };
CpuIsa BestCpuIsa();
CpuIsa SelectedCpuIsa();
CpuIsa SetCpuIsa(const std::string& name);  // returns the build now selected (capped by BestCpuIsa)
const char* CpuIsaName(CpuIsa isa);
// The kernels of the selected build.
void CpuMaskedMoe(const Problem& p, const Runner& runner);
void CpuMaskedMoeBwd(const BwdProblem& p, const Runner& runner);
void CpuRowsMatmul(const RowsProblem& p, const Runner& runner);
void CpuPackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner);
void CpuDecodeAttention(const DecodeAttentionProblem& p, const Runner& runner);

// The intra-op runner of a CPU FFI call (XLA's thread pool; the caller's thread alone without one).
Runner MakeRunner(xla::ffi::ThreadPool& pool);

// "[a, b, ...]" for error messages.
std::string DimsString(xla::ffi::AnyBuffer::Dimensions dims);

// The kernels' element type of an FFI dtype; false for any dtype but float32, bfloat16 and float16.
inline bool ElemTypeOf(xla::ffi::DataType t, ElemType* type) {
  switch (t) {
    case xla::ffi::DataType::F32: *type = ElemType::kF32; return true;
    case xla::ffi::DataType::BF16: *type = ElemType::kBF16; return true;
    case xla::ffi::DataType::F16: *type = ElemType::kF16; return true;
    default: return false;
  }
}

// Checks the FFI operands (shapes, matching E/d/f, one float dtype for x, the weights and y) and
// fills `p`; defined in masked_moe_cpu.cc, used by the CPU and CUDA handlers.
xla::ffi::Error CheckAndDescribe(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer w_gate,
                                 xla::ffi::AnyBuffer w_up, xla::ffi::AnyBuffer w_down,
                                 xla::ffi::Buffer<xla::ffi::S32> expert_ids,
                                 xla::ffi::Buffer<xla::ffi::F32> weights,
                                 xla::ffi::Buffer<xla::ffi::PRED> keep,
                                 const xla::ffi::AnyBuffer& y, Problem* p);

// The backward's checks (dy [T, d] and dx in x's dtype, dweights [T, K] f32, and the expert-weight
// gradients where given, else null) and its BwdProblem; shared by the CPU and CUDA handlers.
xla::ffi::Error CheckAndDescribeBwd(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer w_gate,
                                    xla::ffi::AnyBuffer w_up, xla::ffi::AnyBuffer w_down,
                                    xla::ffi::Buffer<xla::ffi::S32> expert_ids,
                                    xla::ffi::Buffer<xla::ffi::F32> weights,
                                    xla::ffi::Buffer<xla::ffi::PRED> keep, xla::ffi::AnyBuffer dy,
                                    xla::ffi::AnyBuffer* dx, xla::ffi::Buffer<xla::ffi::F32>* dweights,
                                    xla::ffi::AnyBuffer* dw_gate, xla::ffi::AnyBuffer* dw_up,
                                    xla::ffi::AnyBuffer* dw_down, BwdProblem* bp);

}  // namespace beam

// FFI handler symbols (bound in masked_moe_cpu.cc / masked_moe_cuda.cu).
// Signature of every target:
//   (x, w_gate, w_up, w_down, expert_ids s32, weights f32, keep pred) -> y
// The "_aliased" variants take one more operand, y_init [T, d], that the caller aliases to y
// (input_output_aliases): its contents are ignored, so a poisoned y_init shows unwritten rows.
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeCpuAliased);
// (x [T, d] bf16, the packed w_gate, w_up, w_down (Problem::packed), expert_ids, weights, keep) -> y [T, d] bf16
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoePackedCpu);
// Backward targets (CPU and CUDA):
//   beam_masked_moe_bwd:      (x, w_gate, w_up, w_down, expert_ids, weights, keep, dy)
//                             -> (dx [T,d] x's dtype, dweights [T,K] f32)
//   beam_masked_moe_bwd_full: same operands -> (dx, dweights, dw_gate, dw_up, dw_down) (x's dtype)
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeBwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeBwdFullCpu);
// beam_rows_matmul (CPU): (x [M, Kd], w [Kd, N], one float dtype) -> y [M, N] in that dtype.
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamRowsMatmulCpu);
// beam_packed_rows_matmul (CPU): (x [M, Kd] bf16, wp [ceil(N / 32), Kd / 2, 32, 2] bf16) -> y [M, N] bf16.
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamPackedRowsMatmulCpu);
// beam_decode_attention (CPU): (q [B, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv], one float dtype; allowed
// [B, L] bool; attribute scale) -> out [B, H, Dv] in q's dtype.
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamDecodeAttentionCpu);
// beam_cache_update (CPU): (cache [B, L, ...], update [B, S, ...] one dtype, index int32 scalar) -> the cache
// with update at slots [index, index + S) (clamped), the output aliasing the cache.
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamCacheUpdateCpu);
#ifdef BEAM_JAX_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeCudaAliased);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeBwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BeamMaskedMoeBwdFullCuda);
#endif

#endif  // BEAM_JAX_FFI_MASKED_MOE_H_
