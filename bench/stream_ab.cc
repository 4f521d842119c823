// Same-process A/B of the CPU weight-streaming loops (StreamRowsCols and the packed products in
// ffi/masked_moe_cpu_kernel.h) and of decode attention (ffi/decode_attention_cpu_kernel.h): the headers at a base
// revision (BASE_HEADER, BASE_ATTN_HEADER) against the working tree's (HEAD_HEADER, HEAD_ATTN_HEADER), compiled
// into this one binary under different namespaces, each driven through its own public entry points (MaskedMoe,
// RowsMatmul, PackedRowsMatmul, DecodeAttention) with a two-thread runner, timed in interleaved rounds.
// Built and run by bench/stream_ab.py, which writes the JSON this prints.
//
//   stream_ab experts T       the expert kernel on T tokens x 8 random experts of Qwen3-30B-A3B's 128
//                             (d 2048, f 768): a decode step's MoE layer at batch T
//   stream_ab experts_packed T  the same on packed experts (Problem::packed, what beam_jax.generate and the
//                             vLLM plugin run)
//   stream_ab proj K N M      rows_matmul: x [M, K] @ w [K, N]
//   stream_ab packed K N M    the same product on the packed weight (PackedRowsMatmul; K even)
//   stream_ab attention B L N decode attention of Qwen3-30B-A3B's heads (32 query, 4 KV, dim 128) for B
//                             sequences over a cache of L slots, the first N of them allowed (a decode step's)
//
// Every round reads weights the rounds just before it did not (64 MB or more of matrices cycled, or fresh
// random experts), so neither side finds the other's in the last-level cache. bfloat16 weights and activations.

#define BEAM_CPU_NS cpu_base
#include BASE_HEADER
#include BASE_ATTN_HEADER
#undef BEAM_CPU_NS
#define BEAM_CPU_NS cpu_head
#include HEAD_HEADER
#include HEAD_ATTN_HEADER
#undef BEAM_CPU_NS

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using Bits = uint16_t;  // a bf16 value as both headers' bf16_t hold it

// XLA's runner in miniature: the caller plus one worker thread that runs scheduled tasks in order.
class TwoThreadRunner {
 public:
  TwoThreadRunner() : worker_([this] { Loop(); }) {
    runner_.num_threads = 2;
    runner_.schedule = [this](std::function<void()> task) {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
      cv_.notify_one();
    };
  }
  ~TwoThreadRunner() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    worker_.join();
  }
  const beam::Runner& runner() const { return runner_; }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  beam::Runner runner_;
  std::thread worker_;  // last: starts after the members it uses
};

std::vector<Bits> RandomBf16(size_t n, std::mt19937& rng) {
  std::vector<Bits> w(n);
  for (auto& v : w) v = Bits(0x3c00 + (rng() & 0x3ff) + ((rng() & 1) << 15));  // +-[2^-7, 2^-6)
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  std::mt19937 rng(7);
  TwoThreadRunner pool;
  const int kRounds = mode == "attention" ? 400 : 40, kWarm = 4;  // attention: calls of 20-600 us
  double total[2] = {0, 0}, best[2] = {1e30, 1e30}, bytes_sum = 0;
  std::string shape;
  auto timed = [](auto&& call) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  auto record = [&](int round, bool head, double s) {
    if (round >= kWarm) total[head] += s, best[head] = std::min(best[head], s);
  };
  double bytes = 0;
  if ((mode == "experts" || mode == "experts_packed") && argc == 3) {
    constexpr int64_t E = 128, d = 2048, f = 768, K = 8;
    const int64_t T = std::atoll(argv[2]);
    if (T < 1 || T > 4096) return 2;
    const auto wg = RandomBf16(size_t(E * d * f), rng), wu = RandomBf16(size_t(E * d * f), rng);
    const auto wd = RandomBf16(size_t(E * f * d), rng);
    const auto x = RandomBf16(size_t(T * d), rng);
    std::vector<Bits> y(size_t(T * d));
    std::vector<int32_t> ids(size_t(T * K));
    std::vector<float> weights(size_t(T * K), 0.125f);
    std::unique_ptr<bool[]> keep(new bool[size_t(T * K)]);
    std::fill(keep.get(), keep.get() + T * K, true);
    beam::Problem p;
    p.T = T, p.K = K, p.E = E, p.d = d, p.f = f, p.type = beam::ElemType::kBF16;
    p.packed = mode == "experts_packed";  // d and f multiples of 32: the packed buffers are as large
    p.x = x.data(), p.w_gate = wg.data(), p.w_up = wu.data(), p.w_down = wd.data();
    p.expert_ids = ids.data(), p.weights = weights.data(), p.keep = keep.get(), p.y = y.data();
    for (int round = 0; round < kRounds; ++round) {
      const bool head = round & 1;
      std::vector<bool> used(E, false);
      for (int64_t t = 0; t < T; ++t) {  // K distinct experts per token, fresh every round
        std::vector<int32_t> all(E);
        for (int32_t e = 0; e < E; ++e) all[e] = e;
        std::shuffle(all.begin(), all.end(), rng);
        for (int64_t k = 0; k < K; ++k) ids[t * K + k] = all[k], used[all[k]] = true;
      }
      const double s = timed([&] {
        if (head) beam::cpu_head::MaskedMoe(p, pool.runner());
        else beam::cpu_base::MaskedMoe(p, pool.runner());
      });
      record(round, head, s);
      if (round >= kWarm) bytes_sum += double(std::count(used.begin(), used.end(), true)) * 3 * d * f * 2;
    }
    bytes = bytes_sum / (kRounds - kWarm);  // mean expert bytes a round reads
    shape = "\"case\": \"" + mode + "\", \"tokens\": " + std::to_string(T) +
            ", \"K\": 8, \"E\": 128, \"d\": 2048, \"f\": 768";
  } else if ((mode == "proj" || mode == "packed") && argc == 5) {
    const int64_t K = std::atoll(argv[2]), N = std::atoll(argv[3]), M = std::atoll(argv[4]);
    const bool packed = mode == "packed";
    if (K < 1 || N < 1 || M < 1 || M > 4096 || (packed && K % 2)) return 2;
    const int64_t Np = packed ? (N + beam::kPackedCols - 1) / beam::kPackedCols * beam::kPackedCols : N;
    // Enough distinct matrices that the ones a round reads (64 MB or more) left the 32 MB L3 since.
    const int64_t kMats = std::max<int64_t>(2, (int64_t(64) << 20) / (K * Np * 2) + 1);
    const auto W = RandomBf16(size_t(kMats * K * Np), rng);
    const auto x = RandomBf16(size_t(M * K), rng);
    std::vector<Bits> y(size_t(M * N));
    beam::RowsProblem p;
    p.M = M, p.Kd = K, p.N = N, p.type = beam::ElemType::kBF16, p.x = x.data(), p.y = y.data();
    beam::PackedRowsProblem pp;
    pp.M = M, pp.Kd = K, pp.N = N, pp.x = x.data(), pp.y = y.data();
    for (int round = 0; round < kRounds; ++round) {
      const bool head = round & 1;
      p.w = pp.wp = W.data() + (round % kMats) * K * Np;
      record(round, head, timed([&] {
        if (packed && head) beam::cpu_head::PackedRowsMatmul(pp, pool.runner());
        else if (packed) beam::cpu_base::PackedRowsMatmul(pp, pool.runner());
        else if (head) beam::cpu_head::RowsMatmul(p, pool.runner());
        else beam::cpu_base::RowsMatmul(p, pool.runner());
      }));
    }
    bytes = double(K) * Np * 2;
    shape = "\"case\": \"" + mode + "\", \"K\": " + std::to_string(K) + ", \"N\": " + std::to_string(N) +
            ", \"rows\": " + std::to_string(M);
  } else if (mode == "attention" && argc == 5) {
    constexpr int64_t H = 32, Hkv = 4, D = 128;
    const int64_t B = std::atoll(argv[2]), L = std::atoll(argv[3]), N = std::atoll(argv[4]);
    if (B < 1 || L < 1 || N < 1 || N > L || B * L > (int64_t(1) << 20)) return 2;
    // Enough distinct caches that the ones a round reads (64 MB or more) left the 32 MB L3 since: in a decode
    // step the weights streamed between two layers' attention evict the cache.
    const int64_t cache = B * L * Hkv * D, kCaches = std::max<int64_t>(2, (int64_t(32) << 20) / cache + 1);
    const auto K = RandomBf16(size_t(kCaches * cache), rng), V = RandomBf16(size_t(kCaches * cache), rng);
    const auto q = RandomBf16(size_t(B * H * D), rng);
    std::vector<Bits> out(size_t(B * H * D));
    std::unique_ptr<bool[]> allowed(new bool[size_t(B * L)]);
    for (int64_t i = 0; i < B * L; ++i) allowed[i] = i % L < N;
    beam::DecodeAttentionProblem p;
    p.B = B, p.L = L, p.H = H, p.Hkv = Hkv, p.Dk = p.Dv = D, p.type = beam::ElemType::kBF16;
    p.scale = 0.088f, p.q = q.data(), p.allowed = allowed.get(), p.out = out.data();
    for (int round = 0; round < kRounds; ++round) {
      const bool head = round & 1;
      p.k = K.data() + (round % kCaches) * cache, p.v = V.data() + (round % kCaches) * cache;
      record(round, head, timed([&] {
        if (head) beam::cpu_head::DecodeAttention(p, pool.runner());
        else beam::cpu_base::DecodeAttention(p, pool.runner());
      }));
    }
    bytes = 2.0 * B * N * Hkv * D * 2;  // the allowed slots' keys and values
    shape = "\"case\": \"attention\", \"batch\": " + std::to_string(B) + ", \"slots\": " + std::to_string(L) +
            ", \"allowed\": " + std::to_string(N);
  } else {
    std::fprintf(stderr, "usage: stream_ab experts|experts_packed T | proj|packed K N M | attention B L N\n");
    return 2;
  }
  const int n = (kRounds - kWarm) / 2;
  std::printf("{%s, \"rounds_each\": %d, \"base_best_ms\": %.4f, \"head_best_ms\": %.4f, "
              "\"base_GBps\": %.2f, \"head_GBps\": %.2f, \"head_speedup_mean\": %.4f}\n",
              shape.c_str(), n, best[0] * 1e3, best[1] * 1e3, bytes / best[0] / 1e9, bytes / best[1] / 1e9,
              total[0] / total[1]);
  return 0;
}
