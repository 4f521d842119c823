// The CPU kernel built for x86-64 with AVX2, FMA and F16C (CMake adds -mavx2 -mfma -mf16c to this
// file only); masked_moe_cpu.cc calls it when the processor has them.
#define BEAM_CPU_NS cpu_avx2
#include "masked_moe_cpu_kernel.h"
#include "decode_attention_cpu_kernel.h"
