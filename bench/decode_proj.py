"""Decode-time dense projections on CPU: `beam_jax.rows_matmul` (and its packed form) against XLA's product.

    python bench/decode_proj.py [--rows 1,2,4,8,16] [--dtype bfloat16] [--repeat 7]

For each projection of a Qwen3-30B-A3B decoder layer (q, k/v, o, a dense LM head of 8192 words) and each
number of rows M (the decode batch), the time of ``x [M, K] @ w [K, N]`` through

- ``xla``: what `beam_jax.attention.matmul` runs without the FFI target (``dot_general`` with float32
  accumulation, one row padded to two: XLA:CPU's fastest path for bfloat16);
- ``rows``: `beam_jax.rows_matmul.rows_matmul` (the FFI target streaming w once) under the best CPU kernel
  build this processor has, and ``rows_<isa>`` under each lower build but the generic one (``rows_avx2`` on an
  AVX512-BF16 processor), switched in the same process through ``_ffi.set_cpu_isa``;
- ``packed``: `rows_matmul.packed_rows_matmul` on `pack_weight(w)` (what `beam_jax.generate` runs), in bfloat16
  under the AVX512-BF16 build, or the AMX build (tile products) with ``packed_avx512bf16`` beside it;

with the floor, the larger of w's bytes over the read bandwidth and the product's FLOPs (2 M K N) over the float32
multiply-add rate of numpy's matmul (its BLAS on every core), both measured in the same run: a few rows are bound by
the weight reads, many by the multiply-adds (bfloat16 products run in float32 on AVX2; `vdpbf16ps` does twice the
float32 rate, so there the FLOP floor is conservative by up to 2x). At least six distinct weight matrices,
96 MB in all, are cycled so no product finds its matrix in cache (the L3 holds 32 MB). Checks
`rows_matmul.rows_max`: the largest M where
``rows`` wins on every shape. Writes bench/results/decode_proj_cpu.json (``--out`` another path).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from serve_jax import memory_bandwidth, read_bandwidth  # noqa: E402

# (name, K, N): Qwen3-30B-A3B's attention projections (d 2048, 32 query / 4 kv heads of 128) and an LM head
SHAPES = [("q_proj", 2048, 4096), ("k_proj", 2048, 512), ("o_proj", 4096, 2048), ("lm_head", 2048, 8192)]


def _time(fn, x, ws, repeat: int) -> float:
    for w in ws:
        fn(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for w in ws:
            fn(x, w).block_until_ready()
        best = min(best, (time.perf_counter() - t) / len(ws))
    return best


def flop_rate(n: int = 2048, repeat: int = 3) -> float:
    """FLOP/s of numpy's float32 [n, n] @ [n, n] (its BLAS, every core), best of `repeat`: about the vector units'
    multiply-add peak, what a product bound by its multiply-adds can reach. Not `moe_layer.measure_matmul` (XLA's
    float32 matmul): on the 2-core Zen 3 that ran 114-126 GFLOP/s against BLAS's 136-159, a floor too loose."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None, help="result file (default bench/results/decode_proj_cpu.json)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from beam_jax import rows_matmul as rm
    from beam_jax.rows_matmul import rows_matmul

    def xla(x, w):
        rows = x.shape[0]
        x2 = jnp.concatenate([x, x]) if rows == 1 else x
        y = jax.lax.dot_general(x2, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return y[:rows].astype(x.dtype)

    from beam_jax import _ffi

    best = _ffi.best_cpu_isa()
    isas = {"rows": best, **({"rows_avx2": "avx2"} if best in rm.DP_ISAS else {})}

    def on(isa, fn):
        def run(x, w):
            _ffi.set_cpu_isa(isa)
            return fn(x, w)
        return run

    rows_fn = jax.jit(rows_matmul)
    paths = {"xla": jax.jit(xla), **{name: on(isa, rows_fn) for name, isa in isas.items()}}
    dt = jnp.dtype(args.dtype)
    if best in rm.PACKED_ISAS and dt == jnp.bfloat16 and "beam_packed_rows_matmul" in _ffi.registrations():
        paths["packed"] = on(best, jax.jit(rm.packed_rows_matmul))
        if best == "amx":  # the vdpbf16ps loop the AMX tiles replace
            paths["packed_avx512bf16"] = on("avx512bf16", jax.jit(rm.packed_rows_matmul))
    bw, read_bw, rate = memory_bandwidth(), read_bandwidth(), flop_rate()
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s, read bandwidth {read_bw / 1e9:.1f} GB/s, float32 matmul "
          f"{rate / 1e9:.0f} GFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for name, K, N in SHAPES:
        nbytes = K * N * dt.itemsize
        ws = [jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.02, dt)
              for _ in range(max(6, -(-(96 << 20) // nbytes)))]
        packed = [rm.pack_weight(w) for w in ws] if "packed" in paths else None
        operands = {p: packed if p.startswith("packed") else ws for p in paths}
        for M in rows_list:
            x = jnp.asarray(rng.standard_normal((M, K), np.float32), dt)
            t = {p: _time(f, x, operands[p], args.repeat) for p, f in paths.items()}
            read_floor, flop_floor = nbytes / read_bw, 2 * M * K * N / rate
            row = {"shape": name, "K": K, "N": N, "rows": M, "floor_ms": 1e3 * max(read_floor, flop_floor),
                   "read_floor_ms": 1e3 * read_floor, "flop_floor_ms": 1e3 * flop_floor,
                   "copy_floor_ms": 1e3 * nbytes / bw,
                   **{f"{p}_ms": 1e3 * s for p, s in t.items()},
                   **{f"{p}_GBps": nbytes / s / 1e9 for p, s in t.items()},
                   "rows_over_xla": t["xla"] / t["rows"],
                   **({"rows_over_rows_avx2": t["rows_avx2"] / t["rows"]} if "rows_avx2" in t else {}),
                   **({"packed_over_rows": t["rows"] / t["packed"], "packed_over_xla": t["xla"] / t["packed"]}
                      if "packed" in t else {}),
                   **({"packed_over_packed_avx512bf16": t["packed_avx512bf16"] / t["packed"]}
                      if "packed_avx512bf16" in t else {})}
            fastest = min(t.values())
            row["fastest_over_floor"] = fastest / max(read_floor, flop_floor)
            results.append(row)
            others = "".join(f"  {p} {row[p + '_ms']:.3f} ms ({row[p + '_GBps']:.1f} GB/s)" for p in t
                             if p not in ("xla", "rows"))
            print(f"{name:8s} M={M:3d}  xla {row['xla_ms']:.3f} ms ({row['xla_GBps']:.1f} GB/s)  rows "
                  f"{row['rows_ms']:.3f} ms ({row['rows_GBps']:.1f} GB/s)  x{row['rows_over_xla']:.2f}{others}  "
                  f"floor {row['floor_ms']:.3f} ms ({'reads' if read_floor >= flop_floor else 'FLOPs'}; fastest "
                  f"{row['fastest_over_floor']:.2f}x it)", flush=True)
    wins = [M for M in rows_list if all(r["rows_over_xla"] > 1 for r in results if r["rows"] == M)]
    best_max = max((M for M in rows_list if all(m in wins for m in rows_list if m <= M)), default=0)
    print(f"rows_matmul wins on every shape up to M = {best_max}")
    _ffi.set_cpu_isa(best)
    write_result("decode_proj", {"dtype": args.dtype, "copy_bandwidth_GBps": bw / 1e9,
                                 "read_bandwidth_GBps": read_bw / 1e9, "float32_matmul_GFLOPs": rate / 1e9,
                                 "cpu_isa": best, "command": "python bench/decode_proj.py " + " ".join(sys.argv[1:]),
                                 "rows_max_winning": best_max, "results": results}, args.out)


if __name__ == "__main__":
    main()
