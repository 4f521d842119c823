// The vLLM plugin's CPU helpers (select_pairs_cpu.cc): BEAM's mask and the compaction of the kept
// (token, expert) pairs into the rows of a top_k = 1 expert call, and the sum of those rows back per
// token. Host pointers, checked and allocated by the caller (convert/vllm_plugin/moe.py).

#pragma once

#include <cstdint>

namespace beam {

// x [T, *] float32 or bfloat16 (`x_bf16`): row t starts at x + t * x_stride bytes, its first d_m
// elements feed the mask router mask_w [E, d_m] float32 contiguous, and row_bytes of it are copied.
// weights [T, K] float32 and ids [T, K] (int64 when ids64, else int32; each in [0, E)) contiguous:
// the Top-K routing. For each pair with m_hat = sigmoid(x_t . mask_w[ids[t, k]]) >= tau (float32,
// eight partial sums), in row-major (t, k) order, writes token[n] = t, rows_x[n] = x's row t,
// rows_w[n] = its weight (renormalised over the token's kept pairs when `renormalize`, 0 for a token
// whose kept weights sum to eps or less) and rows_id[n] = ids[t, k]; returns N, the number of kept
// pairs. Outputs hold T * K entries; token and rows_x may be null (not written). std::out_of_range
// for an id outside [0, E).
int64_t SelectPairs(const char* x, bool x_bf16, int64_t x_stride, int64_t row_bytes,
                    const float* mask_w, int64_t d_m, const float* weights, const void* ids,
                    bool ids64, int64_t T, int64_t K, int64_t E, float tau, bool renormalize,
                    float eps, int64_t* token, char* rows_x, float* rows_w, void* rows_id);

// out [T, d] = for each t the sum of rows [N, d] with token[n] = t (0 where none), accumulated in
// float32 and rounded once; rows and out are bfloat16 when `bf16`, else float32, contiguous.
// std::out_of_range for a token outside [0, T).
void SumRows(const void* rows, int64_t N, const int64_t* token, int64_t T, int64_t d, bool bf16,
             void* out);

}  // namespace beam
