"""q, k and v of a decode step as one packed product against three (`attention.project_fused`).

    python bench/qkv_fused.py [--rows 1,8,32] [--repeat 9] [--model DIR --batches 1,8 --tau 0.7352 --rounds 3]

`beam_jax.generate` packs an attention's q, k and v kernels side by side (`generate.decode_packs`) and multiplies a
decode step's rows by them in one call of ``beam_packed_rows_matmul``; before, each had its own packed copy and call.
At Qwen3-30B-A3B's shapes (d 2048; q 4096 columns, k and v 512 each: 2 MB, whose call costs as much in fixed
overhead as in bytes) this times, in one process and interleaved round by round, a jitted function making the three
products against one making the fused product and slicing it, on at least 96 MB of distinct weights cycled so no
product finds its matrix in cache, with the floor (the three matrices' bytes over the copy bandwidth measured in the
same run). Then the same in `beam_jax.generate` (`--model`, default bench/serve.py's Qwen3-30B-A3B-shaped 2-layer
model, made by `bench/serve.py`): its decode step ((t(64 new) - t(1 new)) / 63) with the fused packs against the same
packs with q, k and v packed one by one, the two interleaved run by run in one process, per batch, for Top-K and BEAM
at `--tau`; the ratio is each round's, their median reported. Needs the AVX512-BF16 or AMX build
(`rows_matmul.packing_available`). Writes bench/results/qkv_fused_cpu.json.
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

D, NQ, NKV = 2048, 4096, 512  # Qwen3-30B-A3B: d, 32 query heads and 4 kv heads of 128
DEFAULT_MODEL = "/tmp/beam_bench/qwen3-30b-a3b-shaped-2l"


def generate_ab(model_dir: str, batches, tau: float, rounds: int, new: int = 64) -> list[dict]:
    """`beam_jax.generate`'s decode step with q/k/v fused ("fused", as it runs) and one by one ("three"),
    interleaved: [{batch, policy, fused_ms, three_ms (best of the rounds), speedups (three / fused per round)}]."""
    import importlib

    import beam_jax

    gen = importlib.import_module("beam_jax.generate")  # the module (beam_jax.generate is also the function)
    from beam_jax import rows_matmul as rm
    from beam_jax.routing import BeamHook, TopKHook

    model = beam_jax.load_pretrained(model_dir)
    fused = gen.decode_packs(model)
    three = {k: v for k, v in fused.items() if not k.endswith("self_attn")}
    for i, layer in enumerate(model.layers):
        if f"layers/{i}/self_attn" in fused:
            for p in ("q_proj", "k_proj", "v_proj"):
                three[f"layers/{i}/self_attn/{p}"] = rm.pack_weight(getattr(layer.self_attn, p).kernel[...])
    variants = {"fused": fused, "three": three}
    real = gen.decode_packs
    out = []
    try:
        for B in batches:
            prompt = np.random.RandomState(B).randint(3, model.cfg.vocab_size, size=(B, 16)).astype(np.int32)
            for policy, hook in (("topk", TopKHook()), (f"beam_{tau}", BeamHook(tau))):
                def run(name, n):
                    gen.decode_packs = lambda m: variants[name]
                    t = time.perf_counter()
                    np.asarray(beam_jax.generate(model, prompt, max_new_tokens=n, eos_token_id=(), mask_hook=hook))
                    return time.perf_counter() - t

                for name in variants:  # compile both lengths of both
                    run(name, 1), run(name, new)
                steps = {name: [] for name in variants}
                for _ in range(rounds):
                    for name in variants:
                        long = min(run(name, new) for _ in range(2))
                        short = min(run(name, 1) for _ in range(2))
                        steps[name].append((long - short) / (new - 1))
                ratios = [t / f for t, f in zip(steps["three"], steps["fused"])]
                row = {"batch": B, "policy": policy, "fused_ms": 1e3 * min(steps["fused"]),
                       "three_ms": 1e3 * min(steps["three"]), "speedups": ratios,
                       "speedup_median": float(np.median(ratios))}
                out.append(row)
                print(f"generate B={B:2d} {policy:10s} fused {row['fused_ms']:.3f} ms  three {row['three_ms']:.3f} ms"
                      f"  x{row['speedup_median']:.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    finally:
        gen.decode_packs = real
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a BEAM checkpoint for the generate A/B ('' skips it)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tau", type=float, default=0.7352)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from beam_jax import rows_matmul as rm

    if not rm.packing_available():
        raise SystemExit("qkv_fused: packing is off here (needs the AVX512-BF16 or AMX build of beam_jax._ffi)")

    def three(x, q, k, v):
        return tuple(rm.packed_rows_matmul(x, w) for w in (q, k, v))

    def fused(x, qkv):
        y = rm.packed_rows_matmul(x, qkv)
        return y[:, :NQ], y[:, NQ:NQ + NKV], y[:, NQ + NKV:]

    def chain(proj):
        """One compiled function over every weight set, each set's input made from the previous outputs (as a
        decode step's next products wait for these): the time is the products', not a dispatch per call."""
        @jax.jit
        def run(x, sets):
            for s in sets:
                q, k, v = proj(x, *s)
                x = x + (q[:, :D] + jnp.tile(k + v, (1, D // NKV))) * jnp.bfloat16(1e-3)
            return x
        return run

    nbytes = D * (NQ + 2 * NKV) * 2
    sets = max(6, -(-(96 << 20) // nbytes))
    rng = np.random.default_rng(0)
    weights = []
    for _ in range(sets):
        ws = [jnp.asarray(rng.standard_normal((D, n), np.float32) * 0.02, jnp.bfloat16) for n in (NQ, NKV, NKV)]
        weights.append(([rm.pack_weight(w) for w in ws], rm.pack_weight(jnp.concatenate(ws, axis=1))))
    bw = memory_bandwidth()
    results = []
    for M in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((M, D), np.float32), jnp.bfloat16)
        # checked: the fused product's slices are the three products
        for a, b in zip(three(x, *weights[0][0]), fused(x, weights[0][1])):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        runs = {"three": (chain(three), [tuple(w[0]) for w in weights]),
                "fused": (chain(fused), [(w[1],) for w in weights])}
        for fn, sets in runs.values():
            fn(x, sets).block_until_ready()  # compiled
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeat):  # interleaved: both see the VM's speed of the same moments
            for name, (fn, sets) in runs.items():
                t = time.perf_counter()
                fn(x, sets).block_until_ready()
                best[name] = min(best[name], (time.perf_counter() - t) / len(weights))
        row = {"rows": M, "floor_ms": 1e3 * nbytes / bw, "three_ms": 1e3 * best["three"],
               "fused_ms": 1e3 * best["fused"], "fused_speedup": best["three"] / best["fused"]}
        results.append(row)
        print(f"M={M:3d}  three {row['three_ms']:.3f} ms  fused {row['fused_ms']:.3f} ms  "
              f"x{row['fused_speedup']:.2f}  floor {row['floor_ms']:.3f} ms", flush=True)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    gen = (generate_ab(args.model, [int(b) for b in args.batches.split(",")], args.tau, args.rounds)
           if args.model else [])
    from beam_jax import _ffi

    write_result("qkv_fused", {"copy_bandwidth_GBps": bw / 1e9, "cpu_isa": _ffi.cpu_isa(), "shapes": [D, NQ, NKV],
                               "command": "python bench/qkv_fused.py " + " ".join(sys.argv[1:]), "results": results,
                               "generate": gen})


if __name__ == "__main__":
    main()
