"""Decode attention on CPU: `beam_jax.decode_attention` (the FFI target) against XLA's `attention.attend`.

    python bench/decode_attention.py [--batches 1,8,32] [--lengths 128,512,2048] [--dtype bfloat16] [--repeat 5]

One decode step's attention in one layer of Qwen3-30B-A3B's shape (32 query heads, 4 KV heads of 128): each of B
sequences has one query and L cached slots, all allowed (the query at the last slot). Both paths take the same
operands: ``xla`` is `attention.attend` jitted (what a decode step ran before the target; the cache is transposed
and the values converted to float32 inside it), ``kernel`` is `decode_attention.decode_attention` under the best CPU
kernel build, and ``kernel_<isa>`` under each lower build but the generic one, switched in the same process through
``_ffi.set_cpu_isa``. Rounds alternate between the paths; best of `repeat`. Several caches, 96 MB in all, are cycled
so no call finds its cache in the L3. The floor: the cache bytes read (keys and values of the L slots) over the
copy bandwidth measured in the same run. Writes bench/results/decode_attention_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from serve_jax import memory_bandwidth  # noqa: E402

H, HKV, D = 32, 4, 128  # Qwen3-30B-A3B's attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from beam_jax import _ffi
    from beam_jax.attention import AttentionContext, attend
    from beam_jax.decode_attention import decode_attention

    dt = jnp.dtype(args.dtype)
    best = _ffi.best_cpu_isa()
    isas = {"kernel": best, **({"kernel_avx2": "avx2"} if best == "avx512bf16" else {})}
    scale = 1.0 / np.sqrt(D)

    def xla(q, k, v, valid):
        L = k.shape[1]
        ctx = AttentionContext(cos=None, sin=None, kv_valid=valid, q_slot=jnp.asarray([L - 1], jnp.int32),
                               index=jnp.int32(L - 1))
        return attend(q[:, None], k, v, ctx, scale)[:, 0]

    def kern(q, k, v, valid):
        return decode_attention(q, k, v, valid, scale)

    def on(isa, fn):
        def run(*a):
            _ffi.set_cpu_isa(isa)
            return fn(*a)
        return run

    paths = {"xla": jax.jit(xla), **{name: on(isa, jax.jit(kern)) for name, isa in isas.items()}}
    bw = memory_bandwidth()
    rng = np.random.default_rng(0)
    results = []
    for B in [int(b) for b in args.batches.split(",")]:
        for L in [int(n) for n in args.lengths.split(",")]:
            nbytes = 2 * B * L * HKV * D * dt.itemsize
            caches = [(jnp.asarray(rng.standard_normal((B, L, HKV, D), np.float32), dt),
                       jnp.asarray(rng.standard_normal((B, L, HKV, D), np.float32), dt))
                      for _ in range(max(3, -(-(96 << 20) // nbytes)))]
            q = jnp.asarray(rng.standard_normal((B, H, D), np.float32), dt)
            valid = jnp.ones((B, L), bool)
            for f in paths.values():
                for k, v in caches:
                    f(q, k, v, valid).block_until_ready()
            t = {p: float("inf") for p in paths}
            for _ in range(args.repeat):
                for p, f in paths.items():
                    s = time.perf_counter()
                    for k, v in caches:
                        f(q, k, v, valid).block_until_ready()
                    t[p] = min(t[p], (time.perf_counter() - s) / len(caches))
            out = {p: np.asarray(paths[p](q, *caches[0], valid), np.float32) for p in paths}
            err = max(float(np.abs(out[p] - out["xla"]).max()) for p in paths)
            row = {"batch": B, "slots": L, "cache_MB": nbytes / 1e6, "floor_ms": 1e3 * nbytes / bw,
                   **{f"{p}_ms": 1e3 * s for p, s in t.items()},
                   **{f"{p}_over_xla": t["xla"] / s for p, s in t.items() if p != "xla"},
                   "kernel_over_floor": t["kernel"] * bw / nbytes, "max_abs_diff": err}
            results.append(row)
            others = "".join(f"  {p} {row[p + '_ms']:.3f} ms (x{row[p + '_over_xla']:.2f})" for p in t if p != "xla")
            print(f"B={B:3d} L={L:5d} ({row['cache_MB']:.1f} MB)  xla {row['xla_ms']:.3f} ms{others}  floor "
                  f"{row['floor_ms']:.3f} ms  max |diff| {err:.2g}", flush=True)
    _ffi.set_cpu_isa(best)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    write_result("decode_attention", {"dtype": args.dtype, "copy_bandwidth_GBps": bw / 1e9, "cpu_isa": best,
                                      "heads": H, "kv_heads": HKV, "head_dim": D,
                                      "command": "python bench/decode_attention.py " + " ".join(sys.argv[1:]),
                                      "results": results})


if __name__ == "__main__":
    main()
