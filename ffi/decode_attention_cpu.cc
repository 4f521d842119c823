// CPU FFI handler of decode attention (DecodeAttentionProblem in masked_moe.h; the compute is
// decode_attention_cpu_kernel.h, built once per instruction set): checks the buffers, names what does not
// fit, and picks the build, as masked_moe_cpu.cc does for the experts.

#include <cstdint>
#include <string>

#include "masked_moe.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace beam {
namespace {

ffi::Error DecodeAttentionCpu(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                              ffi::Buffer<ffi::PRED> allowed, ffi::Result<ffi::AnyBuffer> out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ad = allowed.dimensions(),
       od = out->dimensions();
  const std::string where = "decode attention: ";
  if (qd.size() != 3) return ffi::Error::InvalidArgument(where + "q must be [B, H, Dk], got " + DimsString(qd));
  const int64_t B = qd[0], H = qd[1], Dk = qd[2];
  if (kd.size() != 4 || kd[0] != B || kd[3] != Dk)
    return ffi::Error::InvalidArgument(where + "k must be [B, L, Hkv, Dk] with B = " + std::to_string(B) +
                                       " and Dk = " + std::to_string(Dk) + " (q's), got " + DimsString(kd));
  const int64_t L = kd[1], Hkv = kd[2];
  if (Hkv == 0 || H % Hkv != 0)
    return ffi::Error::InvalidArgument(where + "q's " + std::to_string(H) +
                                       " heads are not a multiple of k's " + std::to_string(Hkv));
  if (vd.size() != 4 || vd[0] != B || vd[1] != L || vd[2] != Hkv)
    return ffi::Error::InvalidArgument(where + "v must be [B, L, Hkv, Dv] = [" + std::to_string(B) + ", " +
                                       std::to_string(L) + ", " + std::to_string(Hkv) + ", Dv], got " +
                                       DimsString(vd));
  const int64_t Dv = vd[3];
  if (ad.size() != 2 || ad[0] != B || ad[1] != L)
    return ffi::Error::InvalidArgument(where + "allowed must be [B, L] = [" + std::to_string(B) + ", " +
                                       std::to_string(L) + "], got " + DimsString(ad));
  if (od.size() != 3 || od[0] != B || od[1] != H || od[2] != Dv)
    return ffi::Error::InvalidArgument(where + "out must be [B, H, Dv] = [" + std::to_string(B) + ", " +
                                       std::to_string(H) + ", " + std::to_string(Dv) + "], got " +
                                       DimsString(od));
  const ffi::DataType t = q.element_type();
  if (k.element_type() != t || v.element_type() != t || out->element_type() != t)
    return ffi::Error::InvalidArgument(where + "q, k, v and out must share one dtype");
  DecodeAttentionProblem p;
  if (!ElemTypeOf(t, &p.type))
    return ffi::Error::InvalidArgument(where + "unsupported dtype: q must be float32, bfloat16 or float16");
  p.B = B; p.L = L; p.H = H; p.Hkv = Hkv; p.Dk = Dk; p.Dv = Dv;
  p.scale = scale;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.allowed = allowed.typed_data();
  p.out = out->untyped_data();
  if (B == 0 || H == 0 || Dv == 0) return ffi::Error::Success();
  if (L == 0) return ffi::Error::InvalidArgument(where + "the cache has no slot (L = 0)");
  Runner runner = MakeRunner(pool);
  CpuDecodeAttention(p, runner);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace beam

// (q [B, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv]: one float dtype; allowed [B, L] bool; scale) ->
// out [B, H, Dv] in q's dtype
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamDecodeAttentionCpu, beam::DecodeAttentionCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q
                                  .Arg<ffi::AnyBuffer>()           // k
                                  .Arg<ffi::AnyBuffer>()           // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // allowed
                                  .Ret<ffi::AnyBuffer>()           // out
                                  .Attr<float>("scale"));
