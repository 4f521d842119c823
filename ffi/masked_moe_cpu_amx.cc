// The CPU kernel built for x86-64 with AVX512-BF16 and AMX (CMake adds -mamx-tile -mamx-bf16 to the
// AVX512-BF16 flags for this file only): the AVX512-BF16 build, with the packed decode projections
// (PackedProduct in masked_moe_cpu_kernel.h) and the bf16 weight streaming of 8-64 rows (the
// experts' segments, rows_matmul: StreamRowsColsAmx) on AMX tiles. masked_moe_cpu.cc calls it when the
// processor has AMX-BF16 and the kernel lets this process use the tile data (arch_prctl).
#define BEAM_CPU_NS cpu_amx
#include "masked_moe_cpu_kernel.h"
#include "decode_attention_cpu_kernel.h"
