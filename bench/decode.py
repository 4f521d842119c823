"""Decode throughput with a KV cache, Top-K against BEAM, side by side in one run.

    python bench/decode.py --run runs/tiny      # the tiny model with the trained BEAM run of tiny.py

Mixtral-shaped decode (tokens 1 to 64 through one layer) is measured by bench/moe_layer.py.

Generation runs the experts through `beam_jax.masked_moe` (impl="kernel": the FFI kernel where built), so
dropped (token, expert) pairs cost nothing; the ratio BEAM / Top-K is the decode speed-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402


def tokens_per_s(model, prompt, hook, new_tokens, impl, repeat=3):
    import beam_jax

    beam_jax.generate(model, prompt, max_new_tokens=4, eos_token_id=(), mask_hook=hook, impl=impl)  # compile
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        out = beam_jax.generate(model, prompt, max_new_tokens=new_tokens, eos_token_id=(), mask_hook=hook, impl=impl)
        np.asarray(out)
        best = max(best, prompt.shape[0] * new_tokens / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny", help="a beam_jax.train workdir (its ckpt/ and config)")
    ap.add_argument("--model", default=str(Path(__file__).parents[1] / "beam_jax" / "assets" / "tiny-moe"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--taus", default="0.5,0.7")
    ap.add_argument("--impl", default="kernel")
    args = ap.parse_args()

    import beam_jax
    from beam_jax.routing import BeamHook, TopKHook
    from beam_jax.checkpoint import restore_trainable

    model = beam_jax.load_pretrained(args.model)
    restore_trainable(Path(args.run) / "ckpt", model)
    prompt = np.random.RandomState(0).randint(3, model.cfg.vocab_size, size=(args.batch, args.prompt_len))
    rows = [{"policy": "topk", "tokens_per_s": tokens_per_s(model, prompt, TopKHook(), args.new_tokens, args.impl)}]
    for tau in map(float, args.taus.split(",")):
        rows.append({"policy": "beam", "tau": tau,
                     "tokens_per_s": tokens_per_s(model, prompt, BeamHook(tau), args.new_tokens, args.impl)})
    for r in rows:
        r["speedup_vs_topk"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{r['policy']:5s} tau={r.get('tau', '-')!s:4s} {r['tokens_per_s']:8.1f} tok/s  "
              f"x{r['speedup_vs_topk']:.2f}")
    print(machine())
    out = write_result("decode", {"model": args.model, "run": args.run, "batch": args.batch,
                                  "new_tokens": args.new_tokens, "impl": args.impl, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
