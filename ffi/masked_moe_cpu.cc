// CPU FFI handler of the masked-expert MoE.
//
// Layers, as in jax's examples/ffi: the compute lives in masked_moe_cpu_kernel.h (a plain templated
// function, built here portably, in masked_moe_cpu_avx2.cc for AVX2 and in
// masked_moe_cpu_avx512bf16.cc for AVX512-BF16); MaskedMoeCpu checks the
// buffers, picks the element type and instruction set in one place; the XLA_FFI_DEFINE_HANDLER_SYMBOL
// bindings at the bottom declare the signature.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <thread>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "masked_moe.h"
#include "xla/ffi/api/ffi.h"

#define BEAM_CPU_NS cpu_generic
#include "masked_moe_cpu_kernel.h"
#include "decode_attention_cpu_kernel.h"

namespace ffi = xla::ffi;

namespace beam {

namespace {
// Whether this process may use AMX tile data: the processor has AMX-TILE and AMX-BF16 and Linux grants
// the XTILEDATA state on request (arch_prctl(ARCH_REQ_XCOMP_PERM), once per process; torch asks the same
// where it uses AMX). Without the grant the first tile instruction faults.
bool AmxUsable() {
#if defined(BEAM_JAX_HAVE_AMX_TU) && defined(__linux__) && defined(SYS_arch_prctl)
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
}  // namespace

// The best build compiled in and supported by the processor (AVX2 needs FMA and F16C too;
// AVX512-BF16 needs AVX512F and BW; AMX needs AMX-TILE, AMX-BF16 and the kernel's leave, AmxUsable).
CpuIsa BestCpuIsa() {
  static const CpuIsa best = [] {
    CpuIsa b = CpuIsa::kGeneric;
#if defined(BEAM_JAX_HAVE_AVX2_TU) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      b = CpuIsa::kAvx2;
#if defined(BEAM_JAX_HAVE_AVX512BF16_TU)
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512bf16")) {
        b = CpuIsa::kAvx512Bf16;
        if (AmxUsable()) b = CpuIsa::kAmx;
      }
#endif
    }
#endif
    return b;
  }();
  return best;
}

namespace {
CpuIsa ParseCpuIsa(const std::string& name) {
  return name == "generic"      ? CpuIsa::kGeneric
         : name == "avx2"       ? CpuIsa::kAvx2
         : name == "avx512bf16" ? CpuIsa::kAvx512Bf16
                                : CpuIsa::kAmx;
}
// The selected build: BEAM_JAX_CPU_ISA at first use, SetCpuIsa afterwards.
std::atomic<int>& Selected() {
  static std::atomic<int> isa{[] {
    const char* want = std::getenv("BEAM_JAX_CPU_ISA");
    const CpuIsa cap = want == nullptr ? CpuIsa::kAmx : ParseCpuIsa(want);
    return int(std::min(BestCpuIsa(), cap));
  }()};
  return isa;
}
}  // namespace

CpuIsa SelectedCpuIsa() { return CpuIsa(Selected().load(std::memory_order_relaxed)); }

CpuIsa SetCpuIsa(const std::string& name) {
  const CpuIsa isa = std::min(BestCpuIsa(), ParseCpuIsa(name));
  Selected().store(int(isa), std::memory_order_relaxed);
  return isa;
}

const char* CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAmx: return "amx";
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
    case CpuIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// Builds CMake left out run the next one down.
#define BEAM_CPU_FORWARD(ns, to)                                                                     \
  namespace ns {                                                                                     \
  void MaskedMoe(const Problem& p, const Runner& runner) { to::MaskedMoe(p, runner); }             \
  void MaskedMoeBwd(const BwdProblem& p, const Runner& runner) { to::MaskedMoeBwd(p, runner); }    \
  void RowsMatmul(const RowsProblem& p, const Runner& runner) { to::RowsMatmul(p, runner); }       \
  void PackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner) {                        \
    to::PackedRowsMatmul(p, runner);                                                               \
  }                                                                                                \
  void DecodeAttention(const DecodeAttentionProblem& p, const Runner& runner) {                    \
    to::DecodeAttention(p, runner);                                                                \
  }                                                                                                \
  }
#ifndef BEAM_JAX_HAVE_AVX2_TU
BEAM_CPU_FORWARD(cpu_avx2, cpu_generic)
#endif
#ifndef BEAM_JAX_HAVE_AVX512BF16_TU
BEAM_CPU_FORWARD(cpu_avx512bf16, cpu_avx2)
#endif
#ifndef BEAM_JAX_HAVE_AMX_TU
BEAM_CPU_FORWARD(cpu_amx, cpu_avx512bf16)
#endif
#undef BEAM_CPU_FORWARD

#define BEAM_CPU_DISPATCH(fn, problem)                                     \
  switch (SelectedCpuIsa()) {                                               \
    case CpuIsa::kAmx: cpu_amx::fn(problem, runner); break;                 \
    case CpuIsa::kAvx512Bf16: cpu_avx512bf16::fn(problem, runner); break;   \
    case CpuIsa::kAvx2: cpu_avx2::fn(problem, runner); break;               \
    default: cpu_generic::fn(problem, runner);                              \
  }
void CpuMaskedMoe(const Problem& p, const Runner& runner) { BEAM_CPU_DISPATCH(MaskedMoe, p) }
void CpuMaskedMoeBwd(const BwdProblem& p, const Runner& runner) {
  BEAM_CPU_DISPATCH(MaskedMoeBwd, p)
}
void CpuRowsMatmul(const RowsProblem& p, const Runner& runner) { BEAM_CPU_DISPATCH(RowsMatmul, p) }
void CpuPackedRowsMatmul(const PackedRowsProblem& p, const Runner& runner) {
  BEAM_CPU_DISPATCH(PackedRowsMatmul, p)
}
void CpuDecodeAttention(const DecodeAttentionProblem& p, const Runner& runner) {
  BEAM_CPU_DISPATCH(DecodeAttention, p)
}
#undef BEAM_CPU_DISPATCH

std::string DimsString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Checks the operands (the Python wrapper checks them first, with friendlier messages) and fills a
// Problem. Shared with the CUDA handler's checks through the same rules.
ffi::Error CheckAndDescribe(ffi::AnyBuffer x, ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up,
                            ffi::AnyBuffer w_down, ffi::Buffer<ffi::S32> expert_ids,
                            ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::PRED> keep,
                            const ffi::AnyBuffer& y, Problem* p) {
  auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(),
       dd = w_down.dimensions(), id = expert_ids.dimensions(), wd = weights.dimensions(),
       kd = keep.dimensions(), yd = y.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [T, d], got " + DimsString(xd));
  if (gd.size() != 3)
    return ffi::Error::InvalidArgument("w_gate must be [E, d, f], got " + DimsString(gd));
  const int64_t T = xd[0], d = xd[1], E = gd[0], f = gd[2];
  if (gd[1] != d)
    return ffi::Error::InvalidArgument("w_gate " + DimsString(gd) + " does not match x " +
                                       DimsString(xd));
  if (ud.size() != 3 || ud[0] != E || ud[1] != d || ud[2] != f)
    return ffi::Error::InvalidArgument("w_up must be [E, d, f] = " + DimsString(gd) + ", got " +
                                       DimsString(ud));
  if (dd.size() != 3 || dd[0] != E || dd[1] != f || dd[2] != d)
    return ffi::Error::InvalidArgument("w_down must be [E, f, d], got " + DimsString(dd));
  if (id.size() != 2 || id[0] != T)
    return ffi::Error::InvalidArgument("expert_ids must be [T, K], got " + DimsString(id));
  const int64_t K = id[1];
  if (wd.size() != 2 || wd[0] != T || wd[1] != K)
    return ffi::Error::InvalidArgument("weights must be [T, K], got " + DimsString(wd));
  if (kd.size() != 2 || kd[0] != T || kd[1] != K)
    return ffi::Error::InvalidArgument("keep must be [T, K], got " + DimsString(kd));
  if (yd.size() != 2 || yd[0] != T || yd[1] != d)
    return ffi::Error::InvalidArgument("y must be [T, d], got " + DimsString(yd));
  const ffi::DataType t = x.element_type();
  if (w_gate.element_type() != t || w_up.element_type() != t || w_down.element_type() != t ||
      y.element_type() != t)
    return ffi::Error::InvalidArgument("x, w_gate, w_up, w_down and y must share one dtype");
  if (!ElemTypeOf(t, &p->type))
    return ffi::Error::InvalidArgument("unsupported dtype: x must be float32, bfloat16 or float16");
  p->T = T; p->K = K; p->E = E; p->d = d; p->f = f;
  p->x = x.untyped_data();
  p->w_gate = w_gate.untyped_data();
  p->w_up = w_up.untyped_data();
  p->w_down = w_down.untyped_data();
  p->expert_ids = expert_ids.typed_data();
  p->weights = weights.typed_data();
  p->keep = keep.typed_data();
  p->y = y.untyped_data();
  return ffi::Error::Success();
}

namespace {

ffi::Error CheckSame(const char* name, const ffi::AnyBuffer& b, ffi::DataType t,
                     std::initializer_list<int64_t> dims) {
  auto bd = b.dimensions();
  bool ok = b.element_type() == t && bd.size() == dims.size();
  size_t i = 0;
  for (int64_t v : dims) ok = ok && bd[i++] == v;
  if (!ok)
    return ffi::Error::InvalidArgument(std::string(name) + " must have x's dtype and shape [" +
                                       [&] {
                                         std::string s;
                                         for (int64_t v : dims) s += (s.empty() ? "" : ", ") + std::to_string(v);
                                         return s;
                                       }() + "], got " + DimsString(bd));
  return ffi::Error::Success();
}

}  // namespace

ffi::Error CheckAndDescribeBwd(ffi::AnyBuffer x, ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up,
                               ffi::AnyBuffer w_down, ffi::Buffer<ffi::S32> expert_ids,
                               ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::PRED> keep,
                               ffi::AnyBuffer dy, ffi::AnyBuffer* dx, ffi::Buffer<ffi::F32>* dweights,
                               ffi::AnyBuffer* dw_gate, ffi::AnyBuffer* dw_up, ffi::AnyBuffer* dw_down,
                               BwdProblem* bp) {
  Problem& p = bp->fwd;
  // dy plays the forward's y in the checks: [T, d] in x's dtype.
  if (ffi::Error err = CheckAndDescribe(x, w_gate, w_up, w_down, expert_ids, weights, keep, dy, &p);
      err.failure())
    return err;
  const ffi::DataType t = x.element_type();
  if (ffi::Error err = CheckSame("dx", *dx, t, {p.T, p.d}); err.failure()) return err;
  auto wdims = dweights->dimensions();
  if (wdims.size() != 2 || wdims[0] != p.T || wdims[1] != p.K)
    return ffi::Error::InvalidArgument("dweights must be [T, K], got " + DimsString(wdims));
  if (dw_gate != nullptr) {
    if (ffi::Error err = CheckSame("dw_gate", *dw_gate, t, {p.E, p.d, p.f}); err.failure()) return err;
    if (ffi::Error err = CheckSame("dw_up", *dw_up, t, {p.E, p.d, p.f}); err.failure()) return err;
    if (ffi::Error err = CheckSame("dw_down", *dw_down, t, {p.E, p.f, p.d}); err.failure()) return err;
    bp->dw_gate = dw_gate->untyped_data();
    bp->dw_up = dw_up->untyped_data();
    bp->dw_down = dw_down->untyped_data();
  }
  bp->dy = dy.untyped_data();
  bp->dx = dx->untyped_data();
  bp->dweights = dweights->typed_data();
  return ffi::Error::Success();
}

Runner MakeRunner(ffi::ThreadPool& pool) {
  Runner runner;
  const int64_t pool_threads = pool.num_threads();
  if (pool_threads > 0) {
    runner.num_threads = int(pool_threads);
    runner.schedule = [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); };
  } else {
    runner.num_threads = 1;  // no intra-op pool: run on the caller's thread
  }
  return runner;
}

namespace {

ffi::Error MaskedMoeCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_gate,
                        ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                        ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                        ffi::Buffer<ffi::PRED> keep, ffi::Result<ffi::AnyBuffer> y) {
  Problem p;
  if (ffi::Error err = CheckAndDescribe(x, w_gate, w_up, w_down, expert_ids, weights, keep, *y, &p);
      err.failure())
    return err;
  if (p.T == 0 || p.d == 0) return ffi::Error::Success();
  Runner runner = MakeRunner(pool);
  CpuMaskedMoe(p, runner);
  return ffi::Error::Success();
}

// The backward; dw_gate, dw_up and dw_down are null for the variant without expert-weight gradients.
ffi::Error MaskedMoeBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_gate,
                            ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                            ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                            ffi::Buffer<ffi::PRED> keep, ffi::AnyBuffer dy, ffi::AnyBuffer* dx,
                            ffi::Buffer<ffi::F32>* dweights, ffi::AnyBuffer* dw_gate,
                            ffi::AnyBuffer* dw_up, ffi::AnyBuffer* dw_down) {
  BwdProblem bp;
  if (ffi::Error err = CheckAndDescribeBwd(x, w_gate, w_up, w_down, expert_ids, weights, keep, dy, dx,
                                           dweights, dw_gate, dw_up, dw_down, &bp);
      err.failure())
    return err;
  Runner runner = MakeRunner(pool);
  CpuMaskedMoeBwd(bp, runner);
  return ffi::Error::Success();
}

ffi::Error MaskedMoeBwdCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_gate,
                           ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                           ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                           ffi::Buffer<ffi::PRED> keep, ffi::AnyBuffer dy,
                           ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dweights) {
  return MaskedMoeBwdImpl(pool, x, w_gate, w_up, w_down, expert_ids, weights, keep, dy, &*dx,
                          &*dweights, nullptr, nullptr, nullptr);
}

ffi::Error MaskedMoeBwdFullCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_gate,
                               ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                               ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                               ffi::Buffer<ffi::PRED> keep, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dx,
                               ffi::Result<ffi::Buffer<ffi::F32>> dweights,
                               ffi::Result<ffi::AnyBuffer> dw_gate,
                               ffi::Result<ffi::AnyBuffer> dw_up,
                               ffi::Result<ffi::AnyBuffer> dw_down) {
  return MaskedMoeBwdImpl(pool, x, w_gate, w_up, w_down, expert_ids, weights, keep, dy, &*dx,
                          &*dweights, &*dw_gate, &*dw_up, &*dw_down);
}

ffi::Error MaskedMoeCpuAliased(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_gate,
                               ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                               ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                               ffi::Buffer<ffi::PRED> keep, ffi::AnyBuffer /*y_init*/,
                               ffi::Result<ffi::AnyBuffer> y) {
  return MaskedMoeCpu(pool, x, w_gate, w_up, w_down, expert_ids, weights, keep, y);
}

// The forward on packed expert weights (Problem::packed): x, y [T, d] bf16 (d even); w_gate, w_up
// [E, ceil(f / 32), d / 2, 32, 2] and w_down [E, ceil(d / 32), f / 2, 32, 2] bf16, f = 2 * w_down.shape[2].
ffi::Error MaskedMoePackedCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_gate,
                              ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                              ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::F32> weights,
                              ffi::Buffer<ffi::PRED> keep, ffi::Result<ffi::AnyBuffer> y) {
  const std::string who = "masked_moe (packed experts): ";
  for (auto [name, b] : {std::pair<const char*, ffi::AnyBuffer*>{"x", &x}, {"w_gate", &w_gate}, {"w_up", &w_up},
                         {"w_down", &w_down}, {"y", &*y}})
    if (b->element_type() != ffi::DataType::BF16)
      return ffi::Error::InvalidArgument(who + name + " must be bfloat16");
  auto xd = x.dimensions(), dd = w_down.dimensions(), id = expert_ids.dimensions();
  if (xd.size() != 2 || xd[1] % 2 != 0)
    return ffi::Error::InvalidArgument(who + "x must be [T, d] with d even, got " + DimsString(xd));
  if (dd.size() != 5 || dd[3] != kPackedCols || dd[4] != 2)
    return ffi::Error::InvalidArgument(who + "w_down must be [E, ceil(d / 32), f / 2, 32, 2], got " +
                                       DimsString(dd));
  const int64_t T = xd[0], d = xd[1], E = dd[0], f = 2 * dd[2];
  const int64_t fb = (f + kPackedCols - 1) / kPackedCols, db = (d + kPackedCols - 1) / kPackedCols;
  auto same = [](ffi::AnyBuffer::Dimensions got, std::initializer_list<int64_t> want) {
    if (got.size() != want.size()) return false;
    size_t i = 0;
    for (int64_t v : want) if (got[i++] != v) return false;
    return true;
  };
  auto want = [](std::initializer_list<int64_t> v) {
    std::string s = "[";
    for (int64_t n : v) s += (s.size() > 1 ? ", " : "") + std::to_string(n);
    return s + "]";
  };
  if (!same(dd, {E, db, f / 2, kPackedCols, 2}))
    return ffi::Error::InvalidArgument(who + "w_down must be " + want({E, db, f / 2, kPackedCols, 2}) +
                                       " for x " + DimsString(xd) + ", got " + DimsString(dd));
  for (auto [name, b] : {std::pair<const char*, ffi::AnyBuffer*>{"w_gate", &w_gate}, {"w_up", &w_up}})
    if (!same(b->dimensions(), {E, fb, d / 2, kPackedCols, 2}))
      return ffi::Error::InvalidArgument(who + name + " must be " + want({E, fb, d / 2, kPackedCols, 2}) +
                                         ", got " + DimsString(b->dimensions()));
  if (id.size() != 2 || id[0] != T)
    return ffi::Error::InvalidArgument(who + "expert_ids must be [T, K], got " + DimsString(id));
  const int64_t K = id[1];
  if (!same(weights.dimensions(), {T, K}) || !same(keep.dimensions(), {T, K}))
    return ffi::Error::InvalidArgument(who + "weights and keep must be [T, K] = " + DimsString(id));
  if (!same(y->dimensions(), {T, d}))
    return ffi::Error::InvalidArgument(who + "y must be [T, d] = " + DimsString(xd));
  Problem p;
  p.T = T; p.K = K; p.E = E; p.d = d; p.f = f;
  p.type = ElemType::kBF16;
  p.packed = true;
  p.x = x.untyped_data();
  p.w_gate = w_gate.untyped_data();
  p.w_up = w_up.untyped_data();
  p.w_down = w_down.untyped_data();
  p.expert_ids = expert_ids.typed_data();
  p.weights = weights.typed_data();
  p.keep = keep.typed_data();
  p.y = y->untyped_data();
  if (T == 0 || d == 0) return ffi::Error::Success();
  Runner runner = MakeRunner(pool);
  CpuMaskedMoe(p, runner);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace beam

// (x, w_gate, w_up, w_down: same float dtype; expert_ids s32 [T,K]; weights f32 [T,K];
//  keep pred [T,K]) -> y [T,d] in x's dtype
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeCpu, beam::MaskedMoeCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_gate
                                  .Arg<ffi::AnyBuffer>()        // w_up
                                  .Arg<ffi::AnyBuffer>()        // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Ret<ffi::AnyBuffer>());       // y

// Same on packed expert weights (Problem::packed), bfloat16 only.
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoePackedCpu, beam::MaskedMoePackedCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_gate (packed)
                                  .Arg<ffi::AnyBuffer>()        // w_up (packed)
                                  .Arg<ffi::AnyBuffer>()        // w_down (packed)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Ret<ffi::AnyBuffer>());       // y

// Same, plus y_init [T,d] aliased to y by the caller (contents ignored).
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeCpuAliased, beam::MaskedMoeCpuAliased,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_gate
                                  .Arg<ffi::AnyBuffer>()        // w_up
                                  .Arg<ffi::AnyBuffer>()        // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Arg<ffi::AnyBuffer>()        // y_init (aliased to y)
                                  .Ret<ffi::AnyBuffer>());       // y

// Backward: (forward operands, dy [T,d] in x's dtype) -> (dx [T,d] x's dtype, dweights [T,K] f32)
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeBwdCpu, beam::MaskedMoeBwdCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_gate
                                  .Arg<ffi::AnyBuffer>()        // w_up
                                  .Arg<ffi::AnyBuffer>()        // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Arg<ffi::AnyBuffer>()        // dy
                                  .Ret<ffi::AnyBuffer>()        // dx
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dweights

// Same, plus the expert-weight gradients dw_gate, dw_up [E,d,f] and dw_down [E,f,d] (x's dtype).
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamMaskedMoeBwdFullCpu, beam::MaskedMoeBwdFullCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_gate
                                  .Arg<ffi::AnyBuffer>()        // w_up
                                  .Arg<ffi::AnyBuffer>()        // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Arg<ffi::AnyBuffer>()        // dy
                                  .Ret<ffi::AnyBuffer>()        // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dweights
                                  .Ret<ffi::AnyBuffer>()        // dw_gate
                                  .Ret<ffi::AnyBuffer>()        // dw_up
                                  .Ret<ffi::AnyBuffer>());       // dw_down
