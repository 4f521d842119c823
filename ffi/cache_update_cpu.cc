// XLA FFI handler beam_cache_update (CPU): a KV cache's rows written in place.
//
//   out = cache with update written at slots [start, start + S) of axis 1, start = clamp(index, 0, L - S)
//   cache, out [B, L, ...], update [B, S, ...] (one dtype, any), index: int32 scalar; out aliases cache.
//
// The same result as lax.dynamic_update_slice_in_dim(cache, update, index, axis=1) (its start clamped the same
// way). Why a handler: XLA:CPU (jaxlib 0.10) normalizes a bfloat16 / float16 dynamic-update-slice to float32 (its
// float support keeps only some ops in bfloat16), so `beam_jax.generate`'s cache write became a convert of the
// whole cache to float32, the update, and a convert back, every decode step: O(L) bytes per step where O(S)
// suffice. A custom call is left in the low-precision type, and with the output aliased to the cache operand
// (input_output_aliases) XLA hands it the cache's own buffer, so only the S new slots are written.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "masked_moe.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace beam {
namespace {

ffi::Error CacheUpdateCpu(ffi::AnyBuffer cache, ffi::AnyBuffer update, ffi::Buffer<ffi::S32> index,
                          ffi::Result<ffi::AnyBuffer> out) {
  auto cd = cache.dimensions(), ud = update.dimensions(), od = out->dimensions();
  const std::string where = "cache update: ";
  if (cd.size() < 2) return ffi::Error::InvalidArgument(where + "cache must be [B, L, ...], got " + DimsString(cd));
  if (ud.size() != cd.size() || ud[0] != cd[0] || ud[1] > cd[1])
    return ffi::Error::InvalidArgument(where + "update must be [B, S, ...] with B = " + std::to_string(cd[0]) +
                                       " and S <= L = " + std::to_string(cd[1]) + " (cache " + DimsString(cd) +
                                       "), got " + DimsString(ud));
  int64_t row = 1;  // elements of one slot
  for (size_t i = 2; i < cd.size(); ++i) {
    if (ud[i] != cd[i])
      return ffi::Error::InvalidArgument(where + "update " + DimsString(ud) + " must match cache " +
                                         DimsString(cd) + " past axis 1");
    row *= cd[i];
  }
  if (od.size() != cd.size() || !std::equal(od.begin(), od.end(), cd.begin()))
    return ffi::Error::InvalidArgument(where + "out must be the cache's shape " + DimsString(cd) + ", got " +
                                       DimsString(od));
  if (update.element_type() != cache.element_type() || out->element_type() != cache.element_type())
    return ffi::Error::InvalidArgument(where + "cache, update and out must share one dtype");
  if (index.element_count() != 1) return ffi::Error::InvalidArgument(where + "index must be one int32");
  const int64_t B = cd[0], L = cd[1], S = ud[1];
  const size_t itemsize = cache.size_bytes() / std::max<size_t>(1, cache.element_count());
  const size_t slot = size_t(row) * itemsize;
  auto* dst = static_cast<char*>(out->untyped_data());
  const auto* src = static_cast<const char*>(update.untyped_data());
  // Without the alias (XLA always gives it here) the output starts as a copy of the cache.
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const int64_t start = std::min<int64_t>(std::max<int64_t>(index.typed_data()[0], 0), L - S);
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(dst + size_t(b * L + start) * slot, src + size_t(b * S) * slot, size_t(S) * slot);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace beam

XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamCacheUpdateCpu, beam::CacheUpdateCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // cache
                                  .Arg<ffi::AnyBuffer>()          // update
                                  .Arg<ffi::Buffer<ffi::S32>>()   // index (scalar)
                                  .Ret<ffi::AnyBuffer>());        // out (aliases cache)
