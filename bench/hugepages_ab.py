"""Same-process A/B of `beam_jax.hugepages`: decode steps over weights on 4 KiB pages against 2 MiB pages.

    flock /tmp/beam-bench.lock python bench/hugepages_ab.py [--batches 1,8] [--rounds 3] [--out FILE]

Loads the Qwen3-shaped bfloat16 model of `bench/serve.py` (2 layers, 2.6 GB; made by `serve_jax.make_qwen3_shaped`
where absent) twice: copy A with ``BEAM_JAX_HUGEPAGES=0`` at its first `generate` (its arrays stay on the 4 KiB
pages `malloc` gave them), copy B as `generate` leaves it (moved onto huge pages once). Then, in rounds, each batch
alternates A and B (Top-K and BEAM at the tau that keeps about 0.15 of the pairs, interleaved within each copy),
and reports every round's decode step and B's speed-up over A. Also a two-thread read of 768 MB (a numpy `max`)
over each kind of page, alternated. Writes bench/results/hugepages_ab_cpu.json (or --out). About 4 minutes on
2 cores, 6 GB of memory. Process-to-process speed on a shared VM moves 10-25%: compare A and B of one round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

TAU_015 = 0.7404  # bench/serve.py's calibration on this model: about 0.15 of the Top-K pairs kept


def read_rates(rounds: int, nbytes: int = 768 << 20) -> list[dict]:
    """GB/s of a two-thread numpy max (`serve_jax.read_bandwidth`) over a 4 KiB-page array and over a huge-page one,
    alternated."""
    from numpy._core.multiarray import _set_madvise_hugepage

    import serve_jax
    from beam_jax import hugepages

    _set_madvise_hugepage(False)  # numpy advises huge pages for its own large arrays by default
    small = np.ones(nbytes // 4, np.float32)
    huge = np.ones(nbytes // 4, np.float32)
    _set_madvise_hugepage(True)
    if hugepages.collapse_buffer(huge.ctypes.data, huge.nbytes) == 0:
        return []
    return [{"4k_GBps": serve_jax.read_bandwidth(threads=2, repeat=3, src=small) / 1e9,
             "2m_GBps": serve_jax.read_bandwidth(threads=2, repeat=3, src=huge) / 1e9} for _ in range(rounds)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/beam_bench/qwen3-30b-a3b-shaped-2l")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    from flax import nnx

    import beam_jax
    import serve_jax
    from beam_jax import hugepages
    from beam_jax.routing import BeamHook, TopKHook
    from common import machine, write_result

    if not hugepages.available():
        raise SystemExit("transparent huge pages unavailable here (not Linux, 'never', or BEAM_JAX_HUGEPAGES=0)")
    path = Path(args.model)
    if not (path / "config.json").exists():
        serve_jax.make_qwen3_shaped(path)
    batches = [int(b) for b in args.batches.split(",")]
    reads = read_rates(args.rounds)
    for r in reads:
        print(f"read 768 MB: 4 KiB pages {r['4k_GBps']:.1f} GB/s, 2 MiB pages {r['2m_GBps']:.1f} GB/s", flush=True)

    copies, moved = {}, {}
    for name, flag in (("4k", "0"), ("2m", "1")):
        os.environ["BEAM_JAX_HUGEPAGES"] = flag
        model = beam_jax.load_pretrained(path)
        t = time.perf_counter()
        beam_jax.generate(model, np.ones((1, 4), np.int32), max_new_tokens=2, eos_token_id=())  # packs, pages
        moved[name] = {"first_generate_s": time.perf_counter() - t,
                       "state_bytes": sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))}
        copies[name] = model
    os.environ["BEAM_JAX_HUGEPAGES"] = "1"
    rss = {line.split(":")[0]: line.split(":")[1].strip() for line in open("/proc/self/smaps_rollup")
           if line.startswith(("Rss", "AnonHugePages"))}
    print(f"copies loaded; this process: {rss}", flush=True)

    hooks = {"topk": TopKHook(), "beam_0.15": BeamHook(TAU_015)}
    V = copies["4k"].cfg.vocab_size
    rounds = []
    for rnd in range(args.rounds):
        for B in batches:
            prompt = np.random.default_rng(B).integers(0, V, (B, 16), dtype=np.int32)
            steps = {}
            for name, model in copies.items():
                res = serve_jax.time_generate_interleaved(model, prompt, hooks, args.new_tokens, short=1, repeat=2)
                steps[name] = {h: 1e3 * v["step_s"] for h, v in res.items()}
            row = {"round": rnd, "batch": B, "step_ms": steps,
                   "speedup_2m": {h: steps["4k"][h] / steps["2m"][h] for h in hooks}}
            rounds.append(row)
            print(f"round {rnd} batch {B}: " + "; ".join(
                f"{h} {steps['4k'][h]:.2f} -> {steps['2m'][h]:.2f} ms (x{row['speedup_2m'][h]:.3f})" for h in hooks),
                flush=True)
    summary = {f"{B}/{h}": statistics.median(r["speedup_2m"][h] for r in rounds if r["batch"] == B)
               for B in batches for h in hooks}
    print("median speed-up of 2 MiB pages: " + ", ".join(f"batch {k}: x{v:.3f}" for k, v in summary.items()))
    cmd = "flock /tmp/beam-bench.lock python bench/hugepages_ab.py " + " ".join(argv if argv is not None else
                                                                             sys.argv[1:])
    payload = {"command": cmd.strip(), "host": machine(), "model": str(path), "new_tokens": args.new_tokens,
               "read_rates": reads, "copies": moved, "rounds": rounds, "median_speedup_2m": summary}
    out = write_result("hugepages_ab", payload, args.out)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
