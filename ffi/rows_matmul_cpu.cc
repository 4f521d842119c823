// CPU FFI handlers of the rows matmul, the decode-time projections y[M, N] = x[M, Kd] @ w[Kd, N] for
// a few rows M (beam_jax/rows_matmul.py sends them here), and of its packed-weight form
// (PackedRowsProblem: beam_jax.generate's projections). The compute is RunRows / RunPackedRows in
// masked_moe_cpu_kernel.h (RunRows shares the experts' weight-streaming loop); this file checks the
// buffers and picks the instruction set, as masked_moe_cpu.cc does for the experts.

#include <cstdint>

#include "masked_moe.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace beam {
namespace {

ffi::Error RowsMatmulCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K], got " + DimsString(xd));
  if (wd.size() != 2 || wd[0] != xd[1])
    return ffi::Error::InvalidArgument("w must be [K, N] with K = " + std::to_string(xd[1]) +
                                       " (x's columns), got " + DimsString(wd));
  if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[1])
    return ffi::Error::InvalidArgument("y must be [M, N] = [" + std::to_string(xd[0]) + ", " +
                                       std::to_string(wd[1]) + "], got " + DimsString(yd));
  const ffi::DataType t = x.element_type();
  if (w.element_type() != t || y->element_type() != t)
    return ffi::Error::InvalidArgument("x, w and y must share one dtype");
  RowsProblem p;
  if (!ElemTypeOf(t, &p.type))
    return ffi::Error::InvalidArgument("unsupported dtype: x must be float32, bfloat16 or float16");
  p.M = xd[0];
  p.Kd = xd[1];
  p.N = wd[1];
  p.x = x.untyped_data();
  p.w = w.untyped_data();
  p.y = y->untyped_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  Runner runner = MakeRunner(pool);
  CpuRowsMatmul(p, runner);
  return ffi::Error::Success();
}

ffi::Error PackedRowsMatmulCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer wp,
                               ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (x.element_type() != ffi::DataType::BF16 || wp.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("packed rows matmul: x, wp and y must be bfloat16");
  if (xd.size() != 2 || xd[1] % 2 != 0)
    return ffi::Error::InvalidArgument("packed rows matmul: x must be [M, K] with K even, got " +
                                       DimsString(xd));
  if (yd.size() != 2 || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("packed rows matmul: y must be [M, N] with M = " +
                                       std::to_string(xd[0]) + ", got " + DimsString(yd));
  const int64_t blocks = (yd[1] + kPackedCols - 1) / kPackedCols;
  if (wd.size() != 4 || wd[0] != blocks || wd[1] != xd[1] / 2 || wd[2] != kPackedCols || wd[3] != 2)
    return ffi::Error::InvalidArgument(
        "packed rows matmul: wp must be [ceil(N / 32), K / 2, 32, 2] = [" + std::to_string(blocks) +
        ", " + std::to_string(xd[1] / 2) + ", 32, 2], got " + DimsString(wd));
  PackedRowsProblem p;
  p.M = xd[0];
  p.Kd = xd[1];
  p.N = yd[1];
  p.x = x.untyped_data();
  p.wp = wp.untyped_data();
  p.y = y->untyped_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  Runner runner = MakeRunner(pool);
  CpuPackedRowsMatmul(p, runner);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace beam

// (x [M, K], w [K, N]: one float dtype) -> y [M, N] in that dtype
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamRowsMatmulCpu, beam::RowsMatmulCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // w
                                  .Ret<ffi::AnyBuffer>());  // y

// (x [M, K] bf16, wp [ceil(N / 32), K / 2, 32, 2] bf16) -> y [M, N] bf16
XLA_FFI_DEFINE_HANDLER_SYMBOL(BeamPackedRowsMatmulCpu, beam::PackedRowsMatmulCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // wp
                                  .Ret<ffi::AnyBuffer>());  // y
