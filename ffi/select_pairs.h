// The vLLM plugin's CPU helpers (select_pairs_cpu.cc): BEAM's mask and the compaction of the kept
// (token, expert) pairs into the rows of a top_k = 1 expert call, and the sum of those rows back per
// token. Host pointers, checked and allocated by the caller (convert/vllm_plugin/moe.py).

#pragma once

#include <cstdint>

namespace beam {

// logits [T, E] float32 (rows ldl apart: the mask router's x @ W_m^T), weights [T, K] float32 and
// ids [T, K] (int64 when ids64, else int32; each in [0, E)) contiguous: the Top-K routing. x's row t
// starts at x + t * x_stride bytes and is row_bytes long. For each pair with
// m_hat = sigmoid(logits[t, ids[t, k]]) >= tau, in row-major (t, k) order, writes token[n] = t,
// rows_x[n] = x's row t (row_bytes), rows_w[n] = its weight (renormalised over the token's kept
// pairs when `renormalize`, 0 for a token whose kept weights sum to eps or less) and
// rows_id[n] = ids[t, k]; returns N, the number of kept pairs. Outputs hold T * K entries.
// std::out_of_range for an id outside [0, E).
int64_t SelectPairs(const float* logits, int64_t ldl, const float* weights, const void* ids,
                    bool ids64, int64_t T, int64_t K, int64_t E, float tau, bool renormalize,
                    float eps, const char* x, int64_t x_stride, int64_t row_bytes, int64_t* token,
                    char* rows_x, float* rows_w, void* rows_id);

// out [T, d] = for each t the sum of rows [N, d] with token[n] = t (0 where none), accumulated in
// float32 and rounded once; rows and out are bfloat16 when `bf16`, else float32, contiguous.
// std::out_of_range for a token outside [0, T).
void SumRows(const void* rows, int64_t N, const int64_t* token, int64_t T, int64_t d, bool bf16,
             void* out);

}  // namespace beam
