// The CPU kernel built for x86-64 with AVX2, FMA, F16C and AVX512-BF16 (CMake adds -mavx512f
// -mavx512bw -mavx512bf16 to the AVX2 flags for this file only): bfloat16 weights stream through
// vdpbf16ps (StreamRowsColsDp in masked_moe_cpu_kernel.h); masked_moe_cpu.cc calls it when the
// processor has these instructions.
#define BEAM_CPU_NS cpu_avx512bf16
#include "masked_moe_cpu_kernel.h"
#include "decode_attention_cpu_kernel.h"
