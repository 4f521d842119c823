"""Training-step throughput and peak memory on the tiny config, for each expert path, side by side.

    python bench/train_step.py [--steps 5] [--model beam_jax/assets/tiny-moe]

Reports tokens/s of one BEAM training step (mask routers trainable, base frozen) and of a forward-only
evaluation step per expert path (dense / grouped / reference), as ratios to the fastest, in one run.
On XLA:CPU `jax.lax.ragged_dot` lowers to a dense per-group product, which is why `impl="auto"` trains
with the dense path there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, timeit, write_result  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(__file__).parents[1] / "beam_jax" / "assets" / "tiny-moe"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--impls", default="dense,grouped,reference")
    args = ap.parse_args()

    import jax.numpy as jnp

    import beam_jax
    from beam_jax.configs import tiny
    from beam_jax.routing import BeamHook
    from beam_jax.trainer import LossConfig, Trainer, peak_memory_bytes

    cfg = tiny.get_config()
    rs = np.random.RandomState(0)
    model0 = beam_jax.load_pretrained(args.model)
    V = model0.cfg.vocab_size
    ids = rs.randint(3, V, size=(args.batch, args.seq + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((args.batch, args.seq), np.float32)}
    tokens = args.batch * args.seq
    rows = []
    for impl in args.impls.split(","):
        if impl == "reference" and args.batch * args.seq > 2048:
            b = {k: v[:2, :256] for k, v in batch.items()}  # the gather path materialises [T, K, d, f]
        else:
            b = batch
        n = b["input_ids"].size
        model = beam_jax.load_pretrained(args.model)
        tr = Trainer(model, "mask", cfg.train, LossConfig(hook=BeamHook(0.5, train=True), impl=impl))
        t_train = timeit(lambda: tr.step(b, 0.1)["loss"], repeat=args.repeat)
        t_eval = timeit(lambda: tr.evaluate(b)["loss"], repeat=args.repeat)
        rows.append({"impl": impl, "tokens": n, "train_tokens_per_s": n / t_train, "eval_tokens_per_s": n / t_eval})
        print(f"{impl:10s} train {n / t_train:9.0f} tok/s   eval {n / t_eval:9.0f} tok/s", flush=True)
    best = max(r["train_tokens_per_s"] for r in rows)
    for r in rows:
        r["train_speed_vs_fastest"] = r["train_tokens_per_s"] / best
    peak = peak_memory_bytes()
    print(f"peak memory {peak / 2**20:.0f} MiB | {machine()}")
    out = write_result("train_step", {"model": args.model, "batch": args.batch, "seq": args.seq, "rows": rows,
                                      "peak_memory_bytes": peak})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
