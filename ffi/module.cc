// Python module beam_jax._ffi: hands the FFI handlers to jax as capsules.
//
//   registrations()       -> {target name: capsule} for platform "cpu" (forward and backward, and
//                            beam_rows_matmul / beam_packed_rows_matmul: the decode-time projections, and
//                            beam_decode_attention and beam_cache_update, CPU only)
//   cuda_registrations()  -> {target name: capsule} for platform "CUDA" (empty without CUDA)
//   cuda_compiled()       -> whether the CUDA kernels were built into this module
//   cpu_isa()             -> "amx", "avx512bf16", "avx2" or "generic": which CPU kernel build runs here
//   best_cpu_isa()        -> the best build this processor supports
//   set_cpu_isa(name)     -> select a build (capped at the best); returns the one now selected
//   packed_rows_matmul(...) the packed-weight projection on raw pointers, for the vLLM plugin's dense
//                            layers (convert/vllm_plugin/linear.py), on `threads` OpenMP threads
//   masked_moe_packed(...)  the masked-expert MoE on packed experts (beam_masked_moe_packed's kernel) on raw
//                            pointers, for the vLLM plugin's BEAM experts (convert/vllm_plugin/moe.py)
// A target has the same name on both platforms, so one ffi_call lowers on either; the backward
// targets (beam_masked_moe_bwd, beam_masked_moe_bwd_full) exist on both, beam_rows_matmul,
// beam_packed_rows_matmul, beam_decode_attention and beam_cache_update on CPU only. beam_jax.kernel reads which
// are there.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <functional>

#include "masked_moe.h"
#include "select_pairs.h"

namespace py = pybind11;

namespace {

// The runner of calls from Python (no XLA intra-op pool there): OpenMP's team of `threads`, which in a
// process that has loaded torch is torch's intra-op team (both use the one libgomp.so.1 loaded); without
// OpenMP in the build, the caller's thread alone.
beam::Runner PythonRunner(int threads) {
  beam::Runner r;
#ifdef BEAM_JAX_HAVE_OPENMP
  r.num_threads = std::max(1, threads);
  r.fork = [](int count, const std::function<void()>& work) {
#pragma omp parallel num_threads(count)
    work();
  };
#else
  (void)threads;
#endif
  return r;
}

template <typename Fn>
py::capsule Capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "Fn must be an XLA FFI handler");
  return py::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

PYBIND11_MODULE(_ffi, m) {
  m.doc() = "XLA FFI kernels of beam_jax (masked-expert MoE)";
  m.def("registrations", []() {
    py::dict d;
    d["beam_masked_moe"] = Capsule(BeamMaskedMoeCpu);
    d["beam_masked_moe_aliased"] = Capsule(BeamMaskedMoeCpuAliased);
    d["beam_masked_moe_packed"] = Capsule(BeamMaskedMoePackedCpu);
    d["beam_masked_moe_bwd"] = Capsule(BeamMaskedMoeBwdCpu);
    d["beam_masked_moe_bwd_full"] = Capsule(BeamMaskedMoeBwdFullCpu);
    d["beam_rows_matmul"] = Capsule(BeamRowsMatmulCpu);
    d["beam_packed_rows_matmul"] = Capsule(BeamPackedRowsMatmulCpu);
    d["beam_decode_attention"] = Capsule(BeamDecodeAttentionCpu);
    d["beam_cache_update"] = Capsule(BeamCacheUpdateCpu);
    return d;
  });
  m.def("cuda_registrations", []() {
    py::dict d;
#ifdef BEAM_JAX_WITH_CUDA
    d["beam_masked_moe"] = Capsule(BeamMaskedMoeCuda);
    d["beam_masked_moe_aliased"] = Capsule(BeamMaskedMoeCudaAliased);
    d["beam_masked_moe_bwd"] = Capsule(BeamMaskedMoeBwdCuda);
    d["beam_masked_moe_bwd_full"] = Capsule(BeamMaskedMoeBwdFullCuda);
#endif
    return d;
  });
  m.def("cuda_compiled", []() {
#ifdef BEAM_JAX_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // The vLLM plugin's CPU path (convert/vllm_plugin/moe.py passes torch tensors' data pointers, after checking
  // them): see select_pairs.h.
  m.def(
      "select_pairs",
      [](uintptr_t x, bool x_bf16, int64_t x_stride, int64_t row_bytes, uintptr_t mask_w, int64_t d_m,
         uintptr_t weights, uintptr_t ids, bool ids64, int64_t T, int64_t K, int64_t E, float tau, bool renormalize,
         float eps, uintptr_t token, uintptr_t rows_x, uintptr_t rows_w, uintptr_t rows_id) {
        return beam::SelectPairs(reinterpret_cast<const char*>(x), x_bf16, x_stride, row_bytes,
                                 reinterpret_cast<const float*>(mask_w), d_m, reinterpret_cast<const float*>(weights),
                                 reinterpret_cast<const void*>(ids), ids64, T, K, E, tau, renormalize, eps,
                                 reinterpret_cast<int64_t*>(token), reinterpret_cast<char*>(rows_x),
                                 reinterpret_cast<float*>(rows_w), reinterpret_cast<void*>(rows_id));
      });
  m.def("sum_rows", [](uintptr_t rows, int64_t N, uintptr_t token, int64_t T, int64_t d, bool bf16, uintptr_t out) {
    beam::SumRows(reinterpret_cast<const void*>(rows), N, reinterpret_cast<const int64_t*>(token), T, d, bf16,
                  reinterpret_cast<void*>(out));
  });
  // y [M, N] bf16 = x [M, K] bf16 @ the packed w (wp [ceil(N / 32), K / 2, 32, 2] bf16), all contiguous; the
  // caller (convert/vllm_plugin/linear.py) checks shapes and dtypes.
  m.def(
      "packed_rows_matmul",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t wp, int64_t N, uintptr_t y, int threads) {
        beam::PackedRowsProblem p;
        p.M = M;
        p.Kd = K;
        p.N = N;
        p.x = reinterpret_cast<const void*>(x);
        p.wp = reinterpret_cast<const void*>(wp);
        p.y = reinterpret_cast<void*>(y);
        if (M > 0 && N > 0) beam::CpuPackedRowsMatmul(p, PythonRunner(threads));
      },
      py::call_guard<py::gil_scoped_release>());
  // y [T, d] bf16 = the masked MoE of x [T, d] bf16 (d even) over the packed experts (w_gate, w_up
  // [E, ceil(f / 32), d / 2, 32, 2], w_down [E, ceil(d / 32), f / 2, 32, 2] bf16, f even), routing ids [T, K] int32,
  // weights [T, K] f32, keep [T, K] bool; all contiguous. The caller (convert/vllm_plugin/moe.py) checks them.
  m.def(
      "masked_moe_packed",
      [](uintptr_t x, int64_t T, int64_t d, int64_t f, int64_t E, int64_t K, uintptr_t w_gate, uintptr_t w_up,
         uintptr_t w_down, uintptr_t ids, uintptr_t weights, uintptr_t keep, uintptr_t y, int threads) {
        beam::Problem p;
        p.T = T; p.K = K; p.E = E; p.d = d; p.f = f;
        p.type = beam::ElemType::kBF16;
        p.packed = true;
        p.x = reinterpret_cast<const void*>(x);
        p.w_gate = reinterpret_cast<const void*>(w_gate);
        p.w_up = reinterpret_cast<const void*>(w_up);
        p.w_down = reinterpret_cast<const void*>(w_down);
        p.expert_ids = reinterpret_cast<const int32_t*>(ids);
        p.weights = reinterpret_cast<const float*>(weights);
        p.keep = reinterpret_cast<const bool*>(keep);
        p.y = reinterpret_cast<void*>(y);
        if (T > 0 && d > 0) beam::CpuMaskedMoe(p, PythonRunner(threads));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("cpu_isa", []() { return beam::CpuIsaName(beam::SelectedCpuIsa()); });
  m.def("best_cpu_isa", []() { return beam::CpuIsaName(beam::BestCpuIsa()); });
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        if (name != "generic" && name != "avx2" && name != "avx512bf16" && name != "amx")
          throw py::value_error("cpu isa must be 'generic', 'avx2', 'avx512bf16' or 'amx', got '" +
                                name + "'");
        return beam::CpuIsaName(beam::SetCpuIsa(name));
      },
      py::arg("name"));
}
