"""Training-step throughput and peak memory for each expert path, side by side, at two expert ratios.

    python bench/train_step.py [--repeat 3] [--model beam_jax/assets/tiny-moe] [--impls dense,kernel,...]

Reports tokens/s of one BEAM training step (mask routers trainable, base frozen) and of a forward-only
evaluation step per expert path, as ratios to the dense path, in one run, for three shapes:

- ``tiny``: the pretrained tiny model (32 experts, K 6: E/K = 5.3);
- ``tiny-e24k6``: the same architecture with 24 experts, K 6 (E/K = 4, issue 12's yardstick), random weights;
- ``tiny-e32k2``: the same architecture with 32 experts and K 2 (E/K = 16), random weights: what a
  wider expert pool costs each path (dense does E experts' work, the others K).

Paths: ``dense`` (every expert on every token), ``grouped`` (`jax.lax.ragged_dot`, which XLA:CPU lowers
to a dense per-group product), ``reference`` (per-pair weight gather, on a smaller batch), ``kernel``
(`beam_jax.masked_moe` on the FFI kernel with its custom VJP: only the Top-K pairs, forward and backward).
``none`` is not a model: the experts replaced by ``x * sum(weights)`` (no expert GEMMs), the step's time
without expert compute, so ``dense / none`` bounds what any expert path can gain over dense on this model.
``impl="auto"`` trains with ``kernel`` on CPU where the extension's backward is built (see
`beam_jax.experts.training_impl`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, register_no_expert_path, timeit, write_result  # noqa: E402

SHAPES = {"tiny": {}, "tiny-e24k6": {"num_experts": 24, "num_experts_per_tok": 6},
          "tiny-e32k2": {"num_experts": 32, "num_experts_per_tok": 2}}


def build_model(path, overrides):
    import beam_jax
    from flax import nnx

    if not overrides:
        return beam_jax.load_pretrained(path)
    from beam_jax.loading import read_config
    from beam_jax.model import MoECausalLM

    cfg = read_config(path)[0].replace(**overrides)
    return MoECausalLM(cfg, rngs=nnx.Rngs(0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(__file__).parents[1] / "beam_jax" / "assets" / "tiny-moe"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--impls", default="dense,kernel,grouped,reference,none")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()

    from beam_jax.configs import tiny
    from beam_jax.experts import training_impl

    register_no_expert_path()  # the lower bound (see the module docstring)
    from beam_jax.routing import BeamHook
    from beam_jax.metrics import peak_memory_bytes
    from beam_jax.trainer import LossConfig, Trainer

    cfg = tiny.get_config()
    rs = np.random.RandomState(0)
    load0 = os.getloadavg()[0]
    results = []
    for shape in args.shapes.split(","):
        model0 = build_model(args.model, SHAPES[shape])
        mc = model0.cfg
        ids = rs.randint(3, mc.vocab_size, size=(args.batch, args.seq + 1)).astype(np.int32)
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                 "loss_mask": np.ones((args.batch, args.seq), np.float32)}
        rows = []
        print(f"{shape}: {mc.num_experts} experts, K {mc.num_experts_per_tok}, d {mc.hidden_size}, "
              f"f {mc.moe_intermediate_size}", flush=True)
        for impl in args.impls.split(","):
            if impl == "reference" and args.batch * args.seq > 2048:
                b = {k: v[:2, :256] for k, v in batch.items()}  # the gather path materialises [T, K, d, f]
            else:
                b = batch
            n = b["input_ids"].size
            model = build_model(args.model, SHAPES[shape])
            tr = Trainer(model, "mask", cfg.train, LossConfig(hook=BeamHook(0.5, train=True), impl=impl))
            t_train = timeit(lambda: tr.step(b, 0.1)["loss"], repeat=args.repeat)
            t_eval = timeit(lambda: tr.evaluate(b)["loss"], repeat=args.repeat)
            rows.append({"impl": impl, "tokens": n, "train_tokens_per_s": n / t_train,
                         "eval_tokens_per_s": n / t_eval})
            print(f"  {impl:10s} train {n / t_train:9.0f} tok/s   eval {n / t_eval:9.0f} tok/s", flush=True)
        dense = next((r["train_tokens_per_s"] for r in rows if r["impl"] == "dense"), None)
        for r in rows:
            r["train_speed_vs_dense"] = r["train_tokens_per_s"] / dense if dense else None
            if dense:
                print(f"  {r['impl']:10s} train x{r['train_speed_vs_dense']:.2f} of dense")
        results.append({"shape": shape, "num_experts": mc.num_experts, "top_k": mc.num_experts_per_tok,
                        "hidden_size": mc.hidden_size, "moe_intermediate_size": mc.moe_intermediate_size,
                        "rows": rows})
    peak = peak_memory_bytes()
    print(f"peak memory {peak / 2**20:.0f} MiB | {machine()} | impl=auto trains with {training_impl()!r} here")
    out = write_result("train_step", {"model": args.model, "batch": args.batch, "seq": args.seq,
                                      "auto_training_impl": training_impl(), "shapes": results,
                                      "peak_memory_bytes": peak,
                                      "load_average_1min": [load0, os.getloadavg()[0]],
                                      "note": "ratios measured side by side in one run "
                                              "(flock -x /tmp/beam-bench.lock); "
                                              "'reference' on a 2 x 256 batch; 'none' is the no-expert-compute "
                                              "lower bound, not a model"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
