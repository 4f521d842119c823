"""Where a `beam_jax.generate` decode step spends its time: XLA:CPU's ops and the extension's FFI calls, per step.

    python bench/profile_generate.py [--model DIR] [--batch 8] [--tau 0.74] [--new 64] [--top 40] [--hlo]

Loads the model (default: bench/serve.py's Qwen3-30B-A3B-shaped 2-layer model, `/tmp/beam_bench/...`, made by
`bench/serve.py`), times the steady decode step as serve.py does ((t(N new) - t(1 new)) / (N - 1), best of 3), then
traces one generation of N new tokens with `jax.profiler.trace` and prints each op's time per step (ops seen a
multiple of N - 1 times: the while loop's body), the FFI calls first, then the XLA ops, and their sums. tau 0 is
Top-K; tau > 0 BEAM at that tau (the mask routers of the checkpoint); `--no-experts` replaces the expert compute by
x * sum(weights), as serve.py's MoE-share measure does. `--hlo DIR` also dumps the optimized HLO there, to map an op
name (`ffi_call.281`, `gather_bitcast_fusion`) to what it computes (grep the name in `*cpu_after_optimizations.txt`:
custom_call_target, shapes, `outer_dimension_partitions`). One process; numbers move with the VM's speed of the
moment, so compare ops within one trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

DEFAULT_MODEL = "/tmp/beam_bench/qwen3-30b-a3b-shaped-2l"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a BEAM checkpoint directory (beam_jax.load_pretrained)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tau", type=float, default=0.74, help="0: Top-K; > 0: BEAM at this serving tau")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new", type=int, default=64, help="new tokens of the traced generation")
    ap.add_argument("--top", type=int, default=40, help="ops listed")
    ap.add_argument("--no-experts", action="store_true", help="expert compute replaced by x * sum(weights)")
    ap.add_argument("--hlo", default=None, help="dump the optimized HLO into this directory")
    return ap.parse_args(argv)


def per_step_ops(trace_dir: str, steps: int) -> dict[str, float]:
    """{op name: microseconds per decode step} from a jax.profiler trace: complete events of the XLA:CPU ops and FFI
    calls (not the Python frames nor the thunk executor's own spans) seen a multiple of `steps` times."""
    files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not files:
        raise SystemExit(f"profile_generate: no trace written under {trace_dir}")
    events = json.load(gzip.open(files[0]))["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith("$") and "Thunk" not in name and not name.startswith("end: "):
            total[name] += e["dur"]
            count[name] += 1
    return {n: total[n] / steps for n in total if count[n] % steps == 0}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hlo:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.hlo} "
                                   "--xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$").strip()
    import jax
    import numpy as np

    import beam_jax
    from beam_jax.routing import BeamHook, TopKHook
    from serve_jax import time_generate

    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"profile_generate: {args.model} holds no config.json (make it with bench/serve.py, or pass "
                         "--model)")
    impl = "kernel"
    if args.no_experts:
        from common import register_no_expert_path

        impl = register_no_expert_path()
    model = beam_jax.load_pretrained(args.model)
    vocab = model.cfg.vocab_size
    prompt = np.random.RandomState(args.batch).randint(3, vocab, size=(args.batch, args.prompt_len)).astype(np.int32)
    hook = BeamHook(args.tau) if args.tau > 0 else TopKHook()

    # the steady step as serve.py times it (both lengths compiled first, best of 3 each)
    step_ms = time_generate(model, prompt, hook, args.new, short=1, repeat=3, impl=impl)["step_s"] * 1e3
    steps = args.new - 1
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            np.asarray(beam_jax.generate(model, prompt, max_new_tokens=args.new, eos_token_id=(), mask_hook=hook,
                                         impl=impl))
        ops = per_step_ops(tmp, steps)
    ffi = {n: t for n, t in ops.items() if n.startswith("ffi_call")}
    xla = {n: t for n, t in ops.items() if n not in ffi}
    policy = f"BEAM tau {args.tau}" if args.tau > 0 else "Top-K"
    print(f"{args.model}: batch {args.batch}, {policy}{', no expert compute' if args.no_experts else ''}; "
          f"steady step {step_ms:.3f} ms (timed); traced ops {sum(ops.values()) / 1e3:.3f} ms a step "
          f"(FFI {sum(ffi.values()) / 1e3:.3f}, {len(xla)} XLA ops {sum(xla.values()) / 1e3:.3f})")
    for name, us in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{us:9.1f} us/step  {name}")
    if args.hlo:
        print(f"HLO: {args.hlo} (grep an op's name in *generate_compiled*cpu_after_optimizations.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
