// Same-process A/B of the CPU weight-streaming loop (StreamRowsCols in ffi/masked_moe_cpu_kernel.h):
// the header at a base revision (BASE_HEADER) against the working tree's (HEAD_HEADER), both compiled
// into this one binary under different namespaces, timed in interleaved rounds on two threads.
// Built and run by bench/stream_ab.py, which writes the JSON this prints.
//
//   stream_ab experts ROWS NEXP        gate, up and down of NEXP random experts (Qwen3-30B-A3B: E 128,
//                                      d 2048, f 768), ROWS rows each, experts claimed by two threads
//   stream_ab proj K N M               x [M, K] @ w [K, N] split into slabs of K as rows_matmul splits it
//
// Every round reads weights the previous round did not (eight matrices cycled, or fresh random experts),
// so neither side finds the other's weights in the last-level cache. bfloat16 weights.

#define BEAM_CPU_NS cpu_base
#include BASE_HEADER
#undef BEAM_CPU_NS
#define BEAM_CPU_NS cpu_head
#include HEAD_HEADER
#undef BEAM_CPU_NS

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace beam {
namespace cpu_base { float* ThreadBuffer(int, size_t); }
namespace cpu_head { float* ThreadBuffer(int, size_t); }
}  // namespace beam

namespace {

using Bits = uint16_t;  // a bf16 weight as both headers' bf16_t hold it

void Stream(bool head, const float* const* a, int64_t rows, int64_t k0, int64_t k1, const Bits* W,
            int64_t ldw, int64_t j0, int64_t j1, float* C, int64_t ldc) {
  if (head)
    beam::cpu_head::StreamRowsCols<beam::cpu_head::bf16_t>(
        a, 1, rows, k0, k1, reinterpret_cast<const beam::cpu_head::bf16_t*>(W), ldw, j0, j1, C, ldc);
  else
    beam::cpu_base::StreamRowsCols<beam::cpu_base::bf16_t>(
        a, 1, rows, k0, k1, reinterpret_cast<const beam::cpu_base::bf16_t*>(W), ldw, j0, j1, C, ldc);
}

// Runs fn(unit) for unit < n on the caller and one more thread, units claimed through a counter.
template <typename F>
void TwoThreads(int64_t n, F&& fn) {
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t u; (u = next.fetch_add(1)) < n;) fn(u);
  };
  std::thread t(work);
  work();
  t.join();
}

std::vector<Bits> RandomWeights(size_t n, std::mt19937& rng) {
  std::vector<Bits> w(n);
  for (auto& v : w) v = Bits(0x3c00 + (rng() & 0x3ff));  // bf16 in [2^-7, 2^-6): finite, nonzero
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: stream_ab experts ROWS NEXP | proj K N M\n");
    return 2;
  }
  const std::string mode = argv[1];
  std::mt19937 rng(7);
  constexpr int kRounds = 40, kWarm = 4;
  double total[2] = {0, 0}, best[2] = {1e30, 1e30};
  double bytes = 0;
  std::string shape;
  if (mode == "experts" && argc == 4) {
    const int64_t E = 128, d = 2048, f = 768;
    const int rows = std::atoi(argv[2]), nexp = std::atoi(argv[3]);
    if (rows < 1 || rows > 8 || nexp < 1 || nexp > E) return 2;
    const auto wg = RandomWeights(size_t(E * d * f), rng), wu = RandomWeights(size_t(E * d * f), rng);
    const auto wd = RandomWeights(size_t(E * f * d), rng);
    std::vector<float> A(size_t(8 * d)), H(size_t(8 * f));
    for (auto& v : A) v = float(rng() % 2001) / 1000.0f - 1.0f;
    for (auto& v : H) v = float(rng() % 2001) / 1000.0f - 1.0f;
    const float *arow[8], *hrow[8];
    for (int r = 0; r < 8; ++r) arow[r] = A.data() + r * d, hrow[r] = H.data() + r * f;
    for (int round = 0; round < kRounds; ++round) {
      const bool head = round & 1;
      std::vector<int64_t> ex(nexp);
      for (auto& e : ex) e = int64_t(rng() % E);
      const auto t0 = std::chrono::steady_clock::now();
      TwoThreads(nexp, [&](int64_t i) {  // gate and up
        thread_local std::vector<float> C(size_t(8 * (d + 32)));
        const int64_t o = ex[i] * d * f;
        Stream(head, arow, rows, 0, d, wg.data() + o, f, 0, f, C.data(), f + 32);
        Stream(head, arow, rows, 0, d, wu.data() + o, f, 0, f, C.data(), f + 32);
      });
      TwoThreads(nexp, [&](int64_t i) {  // down
        thread_local std::vector<float> C(size_t(8 * (d + 32)));
        Stream(head, hrow, rows, 0, f, wd.data() + ex[i] * f * d, d, 0, d, C.data(), d + 32);
      });
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round >= kWarm) total[head] += s, best[head] = std::min(best[head], s);
    }
    bytes = double(nexp) * 3 * d * f * 2;
    shape = "\"case\": \"experts\", \"rows\": " + std::to_string(rows) + ", \"experts\": " +
            std::to_string(nexp) + ", \"d\": 2048, \"f\": 768";
  } else if (mode == "proj" && argc == 5) {
    const int64_t K = std::atoll(argv[2]), N = std::atoll(argv[3]);
    const int M = std::atoi(argv[4]);
    if (K < 1 || N < 1 || M < 1 || M > 64) return 2;
    constexpr int kMats = 8;
    const auto W = RandomWeights(size_t(kMats * K * N), rng);
    std::vector<float> A(size_t(M * K));
    for (auto& v : A) v = float(rng() % 2001) / 1000.0f - 1.0f;
    const float* arow[64];
    for (int r = 0; r < M; ++r) arow[r] = A.data() + r * K;
    // rows_matmul's split (RunRows): whole rows unless a group's accumulators outgrow 512 KB; K slabs,
    // one per thread from 8 rows on, four per thread below.
    const int64_t group = std::min(M, 64);
    const int64_t nb = std::min<int64_t>((N + 15) / 16 * 16, std::max<int64_t>(16, (1 << 17) / group / 16 * 16));
    const int64_t cblocks = (N + nb - 1) / nb;
    const int64_t want = ((M >= 8 ? 1 : 4) * 2 + cblocks - 1) / cblocks;
    int64_t slabs = std::max<int64_t>(1, std::min<int64_t>(want, std::max<int64_t>(1, K / 128)));
    const int64_t slab = std::max<int64_t>(4, ((K + slabs - 1) / slabs + 3) / 4 * 4);
    slabs = (K + slab - 1) / slab;
    const int64_t ldc = N + 32;
    std::vector<float> part(size_t(slabs * M * ldc));
    for (int round = 0; round < kRounds; ++round) {
      const bool head = round & 1;
      const Bits* w = W.data() + (round % kMats) * K * N;
      const auto t0 = std::chrono::steady_clock::now();
      TwoThreads(slabs * cblocks, [&](int64_t u) {
        const int64_t s = u / cblocks, j0 = (u % cblocks) * nb, j1 = std::min(N, j0 + nb);
        const int64_t k0 = std::min(K, s * slab), k1 = std::min(K, k0 + slab);
        for (int64_t g = 0; g < M; g += 64)
          Stream(head, arow + g, std::min<int64_t>(64, M - g), k0, k1, w, N, j0, j1,
                 part.data() + (s * M + g) * ldc + j0, ldc);
      });
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round >= kWarm) total[head] += s, best[head] = std::min(best[head], s);
    }
    bytes = double(K) * N * 2;
    shape = "\"case\": \"proj\", \"K\": " + std::to_string(K) + ", \"N\": " + std::to_string(N) +
            ", \"rows\": " + std::to_string(M);
  } else {
    std::fprintf(stderr, "usage: stream_ab experts ROWS NEXP | proj K N M\n");
    return 2;
  }
  const int n = (kRounds - kWarm) / 2;
  std::printf("{%s, \"rounds_each\": %d, \"base_best_ms\": %.4f, \"head_best_ms\": %.4f, "
              "\"base_GBps\": %.2f, \"head_GBps\": %.2f, \"head_speedup_mean\": %.4f}\n",
              shape.c_str(), n, best[0] * 1e3, best[1] * 1e3, bytes / best[0] / 1e9, bytes / best[1] / 1e9,
              total[0] / total[1]);
  return 0;
}
