"""Where a vLLM-CPU decode step's MoE time goes: the BEAM plugin at tau 0 against vLLM's own model (issue 16).

    python bench/serve.py --models qwen3 --engines jax --batches 1     # makes the two model directories once
    flock /tmp/beam-bench.lock python bench/profile_vllm_moe.py {native,plugin} BATCH {torch,cprofile} [TAU]

One engine per process (as bench/serve.py runs them), on the Qwen3-30B-A3B-shaped 2-layer model of
bench/serve.py (`/tmp/beam_bench/qwen3-30b-a3b-shaped-2l`, `-base` for native vLLM; with
`PROFILE_MODEL=/tmp/beam_bench/tiny-beam` the tiny model, in its own dtype), enforce_eager (`PROFILE_EAGER=0`:
compiled, vLLM's default, as bench/serve.py runs it; a model with shared experts, DeepSeek-V2-Lite-shaped:
`python -c "import sys; sys.path[:0] = ['bench']; import serve, serve_jax; p = serve_jax.make_deepseek_v2_lite_shaped(
'/tmp/beam_bench/deepseek-v2-lite-shaped-2l'); serve.make_base_dir(p)"`, then
`PROFILE_MODEL=/tmp/beam_bench/deepseek-v2-lite-shaped-2l`; BEAM_JAX_PACKED_EXPERTS=0: the plugin on vLLM's
expert kernel), torch threads =
the cores; the plugin serves at TAU (default 0: Top-K; 0.74 keeps about 0.15 of the pairs with bench/serve.py's
random mask routers). Prints the steady decode step (best of 3, (t(33 new) - t(1 new)) / 32), then a profile of one
more generation: `torch` = torch.profiler's table by self CPU time over 33 new tokens (the expert kernel is
`_C::cpu_fused_moe`), `cprofile` = Python's cumulative times over 65 new tokens (the plugin's own functions are in
convert/vllm_plugin/moe.py). Compare per-call times, not totals: the kernel's own time varies 10-20% from process
to process on this machine.
"""

import json
import os
import sys
import time

CORES = str(os.cpu_count() or 1)
os.environ.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": CORES})
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]
MODEL = os.environ.get("PROFILE_MODEL", "/tmp/beam_bench/qwen3-30b-a3b-shaped-2l")  # or /tmp/beam_bench/tiny-beam
EAGER = os.environ.get("PROFILE_EAGER", "1") != "0"


def main(engine: str, batch: int, tool: str, tau: float = 0.0):
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    if engine not in ("native", "plugin") or tool not in ("torch", "cprofile"):
        raise SystemExit(__doc__)
    path = MODEL + ("-base" if engine == "native" else "")
    if not os.path.isdir(path):
        raise SystemExit(f"{path}: not there; make it with bench/serve.py (see {__file__}'s docstring)")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    llm = LLM(model=path, dtype=dtype, max_model_len=256, seed=0, enforce_eager=EAGER, skip_tokenizer_init=True,
              enable_prefix_caching=False, max_num_seqs=32, max_num_batched_tokens=1024,
              hf_overrides=None if engine == "native" else {"beam_tau": tau})
    prompts = np.random.RandomState(0).randint(3, config["vocab_size"], (batch, 16)).tolist()

    def gen(n):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t

    gen(33), gen(1)
    best = {n: min(gen(n) for _ in range(3)) for n in (1, 33)}
    label = f"{engine} tau {tau}" if engine == "plugin" else engine
    kept = ""
    if engine == "plugin":
        from convert.vllm_plugin import moe

        moe.reset_pair_counts()
        gen(33)
        c = moe.pair_counts()
        kept = (f", kept {c['computed'] / c['offered']:.3f} of the pairs (prefill included), expert calls packed "
                f"{moe.PACKED_CALLS[0]} / vLLM's {moe.DIRECT_CALLS[0]} so far")
    print(f"{label} batch {batch}: decode step {(best[33] - best[1]) / 32 * 1e3:.2f} ms, torch threads "
          f"{torch.get_num_threads()}{kept}", flush=True)
    if tool == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen(33)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    else:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        gen(65)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *(float(a) for a in sys.argv[4:]))
