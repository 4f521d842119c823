"""Benchmark one MoE layer's routed experts: the masked-expert kernel against the JAX paths.

For Mixtral-8x7B (d 4096, f 14336, E 8, K 2) and Qwen3-30B-A3B (d 2048, f 768, E 128, K 8) layer
shapes, token counts 1 .. 4096 and kept ratios 1.0 / 0.5 / 0.15 (the fraction of routed pairs
BEAM keeps), times in one run:

  ffi        beam_jax.masked_moe(backend="ffi"): the fused kernel (CPU or CUDA)
  grouped    beam_jax.experts.experts_grouped: sort + jax.lax.ragged_dot
  tokamax    experts_grouped with tokamax's ragged_dot (GPU only, if tokamax imports)
  reference  beam_jax.experts.experts_reference: per-pair gather of expert weights

and writes a table to stdout and JSON to bench/results/. Paths whose estimated memory or time is
out of reach on the machine are skipped with the reason (the reference gathers [T, K, d, f]).

CPU: defaults to reduced shapes (d and f scaled down; E and K kept) because the full layers are
several GB in float32; --shapes full runs the real ones. It also measures a plain float32 matmul's
GFLOP/s and reports the ffi path's GFLOP/s on the FLOPs actually needed (6 * kept pairs * d * f),
its share of the matmul rate, and its time relative to the all-kept case.
GPU: full shapes in bfloat16; reports a bandwidth floor from a measured device-to-device copy
(the bytes of the experts actually read) and TFLOP/s against a measured bfloat16 matmul.

  python bench/moe_layer.py                       # this machine's defaults
  python bench/moe_layer.py --tokens 1,64 --kept 1.0,0.15 --models qwen3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from beam_jax import kernel as mm
from beam_jax.experts import experts_grouped, experts_reference

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, timeit, write_result  # noqa: E402

MODELS = {  # name: (d, f, E, K)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
}
# CPU defaults: d and f scaled so a layer fits a small machine and a sweep takes minutes.
REDUCED = {
    "mixtral": ((1024, 3584, 8, 2), "d and f / 4"),
    "qwen3": ((1024, 384, 128, 8), "d and f / 2"),
}


# --- machine -------------------------------------------------------------------------------------


def measure_matmul(dtype, n):
    a = jnp.ones((n, n), dtype)
    t = timeit(jax.jit(jnp.matmul), a, a, repeat=5)
    return 2 * n**3 / t


def measure_copy_bandwidth(nbytes=1 << 30):
    """Bytes moved per second (read + write) by a device-to-device copy."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0)  # one read, one write per element (not elided like a copy)
    t = timeit(f, a, repeat=10)
    return 2 * nbytes / t


# --- problem -------------------------------------------------------------------------------------


def make_layer(d, f, E, dtype, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    wg = (jax.random.normal(k[0], (E, d, f), jnp.float32) * d**-0.5).astype(dtype)
    wu = (jax.random.normal(k[1], (E, d, f), jnp.float32) * d**-0.5).astype(dtype)
    wd = (jax.random.normal(k[2], (E, f, d), jnp.float32) * f**-0.5).astype(dtype)
    return wg, wu, wd


def make_routing(T, d, E, K, kept_ratio, dtype, seed=1):
    rng = np.random.default_rng(seed + T)
    x = jnp.asarray(rng.standard_normal((T, d)), dtype)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)  # K distinct experts
    logits = rng.standard_normal((T, K))
    weights = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    n_keep = int(round(kept_ratio * T * K))
    n_keep = max(1, n_keep) if kept_ratio > 0 else 0
    keep = np.zeros(T * K, bool)
    keep[rng.permutation(T * K)[:n_keep]] = True
    keep = keep.reshape(T, K)
    return x, jnp.asarray(ids), jnp.asarray(weights, jnp.float32), jnp.asarray(keep)


@contextlib.contextmanager
def _ragged_dot_from(fn):
    """experts_grouped traced with another ragged_dot (it looks jax.lax.ragged_dot up per call)."""
    orig = jax.lax.ragged_dot
    jax.lax.ragged_dot = fn
    try:
        yield
    finally:
        jax.lax.ragged_dot = orig


def tokamax_ragged_dot():
    try:
        import tokamax  # noqa: PLC0415
    except Exception as err:  # noqa: BLE001
        return None, f"tokamax not importable ({type(err).__name__})"
    fn = getattr(tokamax, "ragged_dot", None)
    if fn is None:
        return None, "tokamax has no ragged_dot"
    return (lambda lhs, rhs, group_sizes, **kw: fn(lhs, rhs, group_sizes)), None


# --- one case ------------------------------------------------------------------------------------


def backend_fns(on_gpu):
    fns = {
        "ffi": jax.jit(lambda *a: mm.masked_moe(*a, backend="ffi")),
        "grouped": jax.jit(lambda *a: experts_grouped(*a)),
        "reference": jax.jit(lambda *a: experts_reference(*a)),
    }
    skip = {}
    if not mm.ffi_available():
        skip["ffi"] = "extension not built for this platform"
    if on_gpu:
        rd, why = tokamax_ragged_dot()
        if rd is None:
            skip["tokamax"] = why
        else:
            inner = jax.jit(lambda *a: experts_grouped(*a))

            def tok(*a, _inner=inner, _rd=rd):
                with _ragged_dot_from(_rd):
                    return _inner(*a)

            fns["tokamax"] = tok
    else:
        skip["tokamax"] = "GPU only"
    return fns, skip


def too_big(name, T, d, f, E, K, itemsize, on_gpu, mem_cap, time_cap):
    pairs = T * K
    if name == "reference":  # gathers [T, K, d, f] (twice) and [T, K, f, d]
        need = 3 * pairs * d * f * itemsize
        if need > mem_cap:
            return f"needs ~{need / 2**30:.1f} GiB (gathered weights)"
    if name == "grouped" and not on_gpu:  # XLA:CPU lowers ragged_dot densely over all groups
        flops = 6 * pairs * d * f * E
        if flops / 4e9 > time_cap:
            return f"~{flops / 4e9:.0f} s per call (dense ragged_dot on CPU)"
        need = pairs * E * max(d, f) * 4 * 2
        if need > mem_cap:
            return f"needs ~{need / 2**30:.1f} GiB (dense ragged_dot on CPU)"
    return None


def run(args):
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    shapes = args.shapes or ("full" if on_gpu else "reduced")
    host = machine()
    print(f"machine: {host}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, dtype {dtype.name}, "
          f"masked_moe default backend: {mm.default_backend()}"
          + (f", CPU kernel: {mm._ffi.cpu_isa()}" if mm._ffi is not None and not on_gpu else ""))

    env = {"platform": jax.default_backend(), "jax": jax.__version__,
           "dtype": dtype.name, "shapes": shapes, "time": _dt.datetime.now().isoformat()}
    if on_gpu:
        env["copy_bytes_per_s"] = measure_copy_bandwidth()
        env["bf16_matmul_flops"] = measure_matmul(jnp.bfloat16, 8192)
        print(f"device copy: {env['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write); "
              f"bf16 matmul 8192^3: {env['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    else:
        env["f32_matmul_flops"] = measure_matmul(jnp.float32, 2048)
        print(f"plain float32 matmul 2048^3: {env['f32_matmul_flops'] / 1e9:.1f} GFLOP/s")

    fns, skip = backend_fns(on_gpu)
    backends = [b for b in args.backends.split(",") if b]
    mem_cap = args.mem_cap_gb * 2**30
    rows = []
    for model in args.models.split(","):
        if shapes == "full":
            (d, f, E, K), note = MODELS[model], "full"
        else:
            (d, f, E, K), note = REDUCED[model]
            note = f"reduced: {note} of {MODELS[model]}"
        layer_bytes = 3 * E * d * f * dtype.itemsize
        print(f"\n== {model}: d {d}, f {f}, E {E}, K {K} ({note}); "
              f"expert weights {layer_bytes / 2**30:.2f} GiB in {dtype.name}")
        wg, wu, wd = make_layer(d, f, E, dtype)
        for T in [int(t) for t in args.tokens.split(",")]:
            base_ffi = None
            for r in [float(v) for v in args.kept.split(",")]:
                x, ids, w, keep = make_routing(T, d, E, K, r, dtype)
                kept = int(keep.sum())
                active = int(np.unique(np.asarray(ids)[np.asarray(keep)]).size)
                flops = 6 * kept * d * f
                row = {"model": model, "d": d, "f": f, "E": E, "K": K, "tokens": T,
                       "kept_ratio": r, "kept_pairs": kept, "active_experts": active,
                       "flops": flops, "times_s": {}, "skipped": {}}
                for b in backends:
                    why = skip.get(b) or too_big(b, T, d, f, E, K, dtype.itemsize, on_gpu,
                                                 mem_cap, args.time_cap_s)
                    if b not in fns and why is None:
                        why = "unknown backend"
                    if why:
                        row["skipped"][b] = why
                        continue
                    try:
                        t = timeit(fns[b], x, wg, wu, wd, ids, w, keep, repeat=args.repeats,
                                   budget_s=args.time_cap_s)
                    except Exception as err:  # noqa: BLE001 - report and go on
                        row["skipped"][b] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                        continue
                    row["times_s"][b] = t
                t_ffi = row["times_s"].get("ffi")
                if t_ffi is not None:
                    row["ffi_flops_per_s"] = flops / t_ffi if t_ffi > 0 else None
                    if r == 1.0:
                        base_ffi = t_ffi
                    if base_ffi:
                        row["ffi_time_vs_all_kept"] = t_ffi / base_ffi
                    if on_gpu:
                        bytes_read = 3 * active * d * f * dtype.itemsize
                        row["bandwidth_floor_s"] = bytes_read / (env["copy_bytes_per_s"] / 2)
                        row["compute_floor_s"] = flops / env["bf16_matmul_flops"]
                    else:
                        row["ffi_share_of_matmul"] = row["ffi_flops_per_s"] / env["f32_matmul_flops"]
                    # Weights of the experts actually used, per second (the bound at few tokens).
                    row["ffi_weight_bytes_per_s"] = 3 * active * d * f * dtype.itemsize / t_ffi
                rows.append(row)
                print_row(row, on_gpu, backends)
    out = {"env": env, "rows": rows}
    if args.out is None:
        path = write_result("moe_layer", out)  # bench/results/moe_layer_<platform>.json
    else:
        path = args.out
        with open(path, "w") as fh:
            json.dump({"machine": host, **out}, fh, indent=1)
    print(f"\nwrote {path}")
    return out


_HEADER_DONE = set()


def print_row(row, on_gpu, backends):
    key = (row["model"],)
    if key not in _HEADER_DONE:
        _HEADER_DONE.add(key)
        cols = "".join(f"{b + ' ms':>13}" for b in backends)
        extra = ("  TFLOP/s  %matmul  bw-floor ms  x floor" if on_gpu
                 else "  GFLOP/s  %matmul  t/t(all kept)  weights GB/s")
        print(f"{'tokens':>6} {'kept':>5} {'pairs':>6} {'experts':>7}{cols}{extra}")
    cells = ""
    for b in backends:
        t = row["times_s"].get(b)
        cells += f"{t * 1e3:13.2f}" if t is not None else f"{'skip':>13}"
    line = f"{row['tokens']:6d} {row['kept_ratio']:5.2f} {row['kept_pairs']:6d} {row['active_experts']:7d}{cells}"
    if row.get("ffi_flops_per_s") is not None:
        if on_gpu:
            fl = row["ffi_flops_per_s"]
            floor = max(row["bandwidth_floor_s"], row["compute_floor_s"])
            share = fl / (row["flops"] / row["compute_floor_s"]) if row["compute_floor_s"] else 0
            line += (f"  {fl / 1e12:7.1f}  {100 * share:6.1f}%  {row['bandwidth_floor_s'] * 1e3:11.3f}"
                     f"  {row['times_s']['ffi'] / floor if floor else float('nan'):7.1f}")
        else:
            line += (f"  {row['ffi_flops_per_s'] / 1e9:7.1f}  {100 * row['ffi_share_of_matmul']:6.1f}%"
                     f"  {row.get('ffi_time_vs_all_kept', float('nan')):13.2f}"
                     f"  {row['ffi_weight_bytes_per_s'] / 1e9:12.1f}")
    print(line, flush=True)
    for b, why in row["skipped"].items():
        if b in backends and why not in ("GPU only",):
            print(f"{'':>28}{b}: skipped, {why}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mixtral,qwen3", help="comma list of: " + ",".join(MODELS))
    p.add_argument("--tokens", default="1,8,64,512,4096")
    p.add_argument("--kept", default="1.0,0.5,0.15", help="kept ratios (1.0 first for t/t(all))")
    p.add_argument("--backends", default="ffi,grouped,tokamax,reference")
    p.add_argument("--shapes", choices=["full", "reduced"], default=None,
                   help="full model shapes or the reduced CPU set (default: full on GPU, "
                        "reduced on CPU)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 "
                                                 "(default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="skip paths estimated to need more (default 4 on CPU, 40 on GPU)")
    p.add_argument("--time-cap-s", type=float, default=30.0,
                   help="skip paths estimated slower than this per call; stop repeats past it")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/moe_layer_<platform>.json)")
    args = p.parse_args(argv)
    if args.mem_cap_gb is None:
        args.mem_cap_gb = 40.0 if jax.devices()[0].platform == "gpu" else 4.0
    run(args)


if __name__ == "__main__":
    sys.exit(main())
