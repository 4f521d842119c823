"""The C++ extension's CPU builds (`beam_jax._ffi.cpu_isa()`), named once for the JAX side and the vLLM plugin; no
jax import, so the plugin reads them without it."""

CPU_ISAS = ("generic", "avx2", "avx512bf16", "amx")  # the CPU kernel's builds, lowest first
DP_ISAS = ("avx512bf16", "amx")  # the builds with vdpbf16ps (amx: the same build, its packed product on AMX tiles)
PACKED_ISAS = ("avx2", "avx512bf16", "amx")  # the builds with a fast loop for the packed layouts (not generic)
