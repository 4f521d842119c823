"""End-to-end decode throughput of `beam_jax.generate`: Top-K against BEAM, with the memory-bandwidth floor.

    flock /tmp/beam-bench.lock python bench/serve_jax.py                      # Qwen3-30B-A3B-shaped + tiny
    python bench/serve_jax.py --models qwen3 --batches 1 --kept 0.15 --quick  # a quick look

Two models:

- ``qwen3``: a random Qwen3-MoE with Qwen3-30B-A3B layer shapes (d 2048, 128 experts, K 8, expert width 768,
  GQA 32/4 heads of 128) but 2 layers and vocab 8192, bfloat16, saved with transformers' `save_pretrained` and
  given random BEAM mask routers in the exported layout of `convert.to_vllm` (``mask_router.safetensors`` and a
  ``beam`` section in config.json), so `beam_jax.load_pretrained` and vLLM's plugin both read it.
  Serving tau is calibrated per target kept ratio (`calibrate_tau`).
- ``tiny``: the shipped ``beam_jax/assets/tiny-moe`` with the mask routers of a trained ``tiny.py`` run
  (``--run``; skipped when that run is missing).

For each (model, batch, policy) the script reports tokens/s of a greedy `generate` (prompt 16, 48 new tokens by
default), the steady decode-step time, the kept ratio actually realised during decoding, the weight bytes one
decode step reads (`step_bytes`: every non-expert weight, plus each expert that at least one kept pair of the
step uses), the bandwidth floor (those bytes / the measured copy bandwidth) and the ideal speed-up (Top-K step
bytes / BEAM step bytes). Functions are importable (bench/serve.py reuses them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "beam_jax" / "assets" / "tiny-moe"

QWEN3_30B_A3B_SHAPES = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                            norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, mlp_only_layers=[],
                            decoder_sparse_step=1, tie_word_embeddings=False, max_position_embeddings=4096,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---- model making -----------------------------------------------------------------------------------------

def make_qwen3_shaped(path, *, num_layers: int = 2, vocab_size: int = 8192, seed: int = 0,
                      mask_std: float | None = None, tau: float = 0.738, overwrite: bool = False,
                      **shapes) -> Path:
    """Save a random bfloat16 Qwen3-MoE with Qwen3-30B-A3B layer shapes (`QWEN3_30B_A3B_SHAPES`, any of them
    overridable through `shapes`) to `path` in the BEAM export layout (`make_random_moe`)."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=vocab_size, num_hidden_layers=num_layers,
                                      **{**QWEN3_30B_A3B_SHAPES, **shapes})
    return make_random_moe(path, cfg, seed=seed, mask_std=mask_std, tau=tau, overwrite=overwrite)


# DeepSeek-V2-Lite's layer shapes (d 2048, 64 routed experts of width 1408, K 6, 2 shared experts, MLA with a 512
# latent, 16 heads), every layer MoE (first_k_dense_replace 0)
DEEPSEEK_V2_LITE_SHAPES = dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                               num_experts_per_tok=6, num_attention_heads=16, num_key_value_heads=16,
                               kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                               v_head_dim=128, first_k_dense_replace=0, moe_layer_freq=1, norm_topk_prob=False,
                               topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                               intermediate_size=10944,
                               rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_deepseek_v2_lite_shaped(path, *, num_layers: int = 2, vocab_size: int = 8192, seed: int = 0,
                                 tau: float = 0.738, overwrite: bool = False, **shapes) -> Path:
    """Save a random bfloat16 DeepSeek-V2 with DeepSeek-V2-Lite layer shapes (`DEEPSEEK_V2_LITE_SHAPES`: routed
    and shared experts) to `path` in the BEAM export layout (`make_random_moe`)."""
    import transformers

    cfg = transformers.DeepseekV2Config(vocab_size=vocab_size, num_hidden_layers=num_layers,
                                        **{**DEEPSEEK_V2_LITE_SHAPES, **shapes})
    return make_random_moe(path, cfg, seed=seed, tau=tau, overwrite=overwrite)


def make_random_moe(path, cfg, *, seed: int = 0, mask_std: float | None = None, tau: float = 0.738,
                    overwrite: bool = False) -> Path:
    """Save a random bfloat16 model of the transformers MoE config `cfg` to `path` in the BEAM export layout.

    The weights are initialised in bfloat16 directly (normal(0, 0.02), norms 1, as transformers' init), the
    mask routers W_m [E, d] float32 are normal(0, mask_std) with mask_std = 1/sqrt(d) by default (then about
    15% of Top-K pairs pass tau 0.738 on RMS-normalised inputs), stored as `model.layers.N.<moe>.mask_router.weight`
    with <moe> the block that holds the checkpoint's router (`mlp`, or Mixtral's `block_sparse_moe`). Returns
    `path`; an existing complete directory is reused unless `overwrite`.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "config.json").is_file() and (path / "mask_router.safetensors").is_file() and not overwrite:
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                _fill_normal_chunks(p, gen, 0.02)
    model.config.dtype = "bfloat16"
    model.save_pretrained(path)
    del model
    lone = path / "model.safetensors"
    if lone.is_file():  # as convert.to_vllm does: transformers reads a lone model.safetensors, ignoring the index
        lone.rename(path / "model-00001-of-00001.safetensors")
    d = cfg.hidden_size
    E = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or cfg.n_routed_experts
    std = 1.0 / np.sqrt(d) if mask_std is None else mask_std
    rs = np.random.RandomState(seed + 1)
    blocks = _moe_blocks(path)
    mask = {f"model.layers.{i}.{blocks[i]}.mask_router.weight":
            torch.from_numpy(rs.normal(0, std, (E, d)).astype(np.float32)) for i in sorted(blocks)}
    save_file(mask, str(path / "mask_router.safetensors"), metadata={"format": "pt"})
    _write_beam_config(path, tau, sorted(blocks), E, cfg.num_experts_per_tok)
    return path


def _moe_blocks(path: Path) -> dict[int, str]:
    """{layer: name of its MoE block} from a saved checkpoint's router tensors `model.layers.N.<block>.gate.weight`
    (a router is [E, d]; Qwen's shared-expert gate is [1, d] and is not one)."""
    from safetensors import safe_open

    blocks = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for key in h.keys():
                parts = key.split(".")
                if (len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[4:] == ["gate", "weight"]
                        and h.get_slice(key).get_shape()[0] > 1):
                    blocks[int(parts[2])] = parts[3]
    if not blocks:
        raise RuntimeError(f"{path}: no MoE router (model.layers.N.<block>.gate.weight) in the saved checkpoint")
    return blocks


def _fill_normal_chunks(p, gen, std):
    import torch

    flat = p.view(-1)
    step = 2**24
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i:i + n] = (torch.randn(n, generator=gen, dtype=torch.float32) * std).to(p.dtype)


def _write_beam_config(path: Path, tau: float, layers: list[int], E: int, K: int):
    """Turn a saved base checkpoint into the `convert.to_vllm` layout: beam section, Beam* architecture, index."""
    from safetensors import safe_open

    raw = json.loads((path / "config.json").read_text())
    base_arch = raw["architectures"][0]
    raw["architectures"] = ["Beam" + base_arch]
    raw["model_type"] = "beam_" + raw["model_type"]
    raw["beam"] = {"tau": float(tau), "renormalize": False, "layers": list(layers), "num_experts": E,
                   "top_k": K, "mask_router": {"file": "mask_router.safetensors", "dtype": "float32", "bias": False},
                   "base_architecture": base_arch, "run": "random mask routers (bench/serve_jax.py)"}
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    weight_map = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            weight_map.update(dict.fromkeys(h.keys(), f.name))
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def load_tiny_with_run(run) -> object | None:
    """The shipped tiny model with what a trained tiny.py run trained (its mask routers; every weight for
    train.trainable=all), or None when `run`/ckpt is missing."""
    import beam_jax
    from beam_jax.checkpoint import restore_trainable

    if run is None or not (Path(run) / "ckpt").is_dir():
        return None
    model = beam_jax.load_pretrained(TINY_MODEL)
    restore_trainable(Path(run) / "ckpt", model)
    return model


# ---- routing: kept-ratio calibration and the bytes a decode step reads -------------------------------------

def beam_scores(model, seqs, mask=None):
    """m_hat of every Top-K candidate: one full forward of `seqs` [B, S] -> [layers, B, S, K] float32 (numpy)."""
    from beam_jax.routing import BeamHook

    out = model(np.asarray(seqs), attention_mask=None if mask is None else np.asarray(mask), mask_hook=BeamHook(0.5),
                impl="kernel")
    B, S = np.shape(seqs)
    return np.stack([np.asarray(m.m_hat, np.float32).reshape(B, S, -1) for m in out.moe])


def calibrate_tau(model, seqs, kept: float, start: int = 0, stop: int | None = None) -> float:
    """The tau at which a fraction `kept` of the Top-K (token, expert) pairs of `seqs` [B, S] at positions
    [start, stop) passes BEAM's mask (kept pairs: m_hat >= tau), from one full forward. For decoding, pass a
    Top-K generation and its decode positions (the kept ratio of random prompts differs from that of generated
    tokens)."""
    if not 0.0 < kept <= 1.0:
        raise ValueError(f"kept must be in (0, 1], got {kept}")
    m = beam_scores(model, seqs)[:, :, start:stop].ravel()
    return 0.0 if kept >= 1.0 else float(np.quantile(m, 1.0 - kept))


def param_bytes(model) -> dict:
    """{"experts": bytes of one expert per MoE layer (gate + up + down), "dense": every other weight a decode
    step reads (attention, norms, routers, LM head; not the embedding table, of which a step reads B rows),
    "mask_router": BEAM's mask routers (read only under BEAM), "embedding_row": one embedding row}."""
    from flax import nnx

    _, state = nnx.split(model)
    dense = mask = emb = expert = 0
    for path, var in nnx.to_flat_state(state):
        keys = [str(k) for k in path]
        a = var.get_value()
        nbytes = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        if "experts" in keys and keys[-1] in ("w_gate", "w_up", "w_down"):
            expert += nbytes // a.shape[0]
        elif "mask_router" in keys:
            mask += nbytes
        elif keys[0] == "embed_tokens":
            emb = nbytes // a.shape[0]
            if model.lm_head is None:  # tied: the LM head reads the whole table
                dense += nbytes
        else:
            dense += nbytes
    n_moe = sum(model.cfg.moe_layers)
    return {"expert_per_layer": expert // max(n_moe, 1), "dense": dense, "mask_router": mask, "embedding_row": emb}


def decode_routing(model, seqs, prompt_len: int, hook):
    """Routing of the decode steps of a generated `seqs` [B, S + N] (one full forward): step i (1..N-1) reads token
    S + i - 1. Returns (ids [layers, N-1, B, K], keep [layers, N-1, B, K] bool)."""
    out = model(np.asarray(seqs), mask_hook=hook, impl="kernel")
    ids = np.stack([np.asarray(m.topk_ids) for m in out.moe])[:, :, prompt_len:-1]  # [L, B, N-1, K]
    keep = np.stack([np.asarray(m.kept) for m in out.moe])
    keep = keep[:, :, prompt_len:-1]
    return ids.transpose(0, 2, 1, 3), keep.transpose(0, 2, 1, 3)


def expert_step_bytes(model, ids, keep) -> float:
    """Mean bytes of the experts one decode step reads: every expert at least one kept pair of the step uses, each
    read once. ids, keep [layers, steps, B, K]."""
    L, N, B, K = ids.shape
    distinct = np.zeros(N)
    for layer in range(L):
        for t in range(N):
            distinct[t] += len(np.unique(ids[layer, t][keep[layer, t]]))
    return float(distinct.mean() * param_bytes(model)["expert_per_layer"])


def step_bytes(model, ids, keep, beam: bool, experts: float | None = None) -> float:
    """Mean weight bytes of one decode step: the dense weights, B embedding rows, the mask routers under BEAM, and
    the experts (`expert_step_bytes`, or `experts` where the caller has it). ids, keep [layers, steps, B, K]."""
    pb = param_bytes(model)
    experts = expert_step_bytes(model, ids, keep) if experts is None else experts
    return float(pb["dense"] + ids.shape[2] * pb["embedding_row"] + (pb["mask_router"] if beam else 0) + experts)


def memory_bandwidth(nbytes: int = 512 << 20, threads: int | None = None, repeat: int = 5) -> float:
    """Copy bandwidth in bytes/s (bytes read + bytes written per second) of a large numpy copy split over `threads`
    (default: every core), best of `repeat`."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros_like(src)
    edges = np.linspace(0, nbytes, threads + 1).astype(np.int64)  # not np.arange(nbytes): 8 bytes per byte copied
    bounds = list(zip(edges[:-1], edges[1:]))
    best = float("inf")
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeat):
            t = time.perf_counter()
            list(ex.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
            best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 512 << 20, threads: int | None = None, repeat: int = 5,
                   src: np.ndarray | None = None) -> float:
    """Read bandwidth in bytes/s: a large float32 array's max (numpy's vectorised reduction, no writes) split over
    `threads` (default: every core), best of `repeat`. A decode step reads its weights and writes next to nothing,
    so this, not a copy's read + write rate, is what its weight reads can reach. `src`: the array to read (a 1-D
    float32 one), instead of a new one of `nbytes`."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    src = np.ones(nbytes // 4, np.float32) if src is None else src
    edges = np.linspace(0, src.size, threads + 1).astype(np.int64)
    bounds = list(zip(edges[:-1], edges[1:]))
    best = float("inf")
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeat):
            t = time.perf_counter()
            list(ex.map(lambda b: src[b[0]:b[1]].max(), bounds))
            best = min(best, time.perf_counter() - t)
    return src.nbytes / best


# ---- timing ----------------------------------------------------------------------------------------------------

def time_generate(model, prompt, hook, new_tokens: int, *, short: int = 8, repeat: int = 3,
                  impl: str = "kernel") -> dict:
    """Best-of-`repeat` greedy `beam_jax.generate` (no eos) of `new_tokens` and of `short` tokens, each length run
    once first (its compilation: the two may fall in different cache buckets): {"tokens_per_s" (B * new_tokens /
    wall time, prefill included), "step_s" (steady decode step: the difference of the two runs over
    new_tokens - short), "seconds", "short_seconds", "first_call_s" (compile + run of `short`), "tokens"
    [B, S + new_tokens]}. `impl`: the expert path (`beam_jax.generate`'s; "none" from `common.register_no_expert_path`
    times the step without expert compute)."""
    import beam_jax

    if not 0 < short < new_tokens:
        raise ValueError(f"need 0 < short < new_tokens, got short={short}, new_tokens={new_tokens}")

    def run(n):
        t = time.perf_counter()
        out = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=n, eos_token_id=(), mask_hook=hook,
                                           impl=impl))
        return time.perf_counter() - t, out

    compile_s = run(short)[0]
    run(new_tokens)
    long_s, out = min((run(new_tokens) for _ in range(repeat)), key=lambda r: r[0])
    short_s = min(run(short)[0] for _ in range(repeat))
    return {"tokens_per_s": prompt.shape[0] * new_tokens / long_s, "seconds": long_s, "short_seconds": short_s,
            "step_s": (long_s - short_s) / (new_tokens - short), "first_call_s": compile_s, "tokens": out}


def time_generate_interleaved(model, prompt, hooks: dict, new_tokens: int, *, short: int = 1, repeat: int = 3,
                              impl: str = "kernel") -> dict:
    """`time_generate` for several mask hooks on one prompt, their runs interleaved (hook a, b, c, a, b, c, ...) so
    that a drift of this machine's speed during the measurement moves every policy alike and their ratios hold.
    hooks {name: hook} -> {name: time_generate's dict}; each hook's two lengths are compiled (run once) first."""
    import beam_jax

    if not 0 < short < new_tokens:
        raise ValueError(f"need 0 < short < new_tokens, got short={short}, new_tokens={new_tokens}")

    def run(hook, n):
        t = time.perf_counter()
        out = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=n, eos_token_id=(), mask_hook=hook,
                                           impl=impl))
        return time.perf_counter() - t, out

    first = {name: run(hook, short)[0] for name, hook in hooks.items()}
    for hook in hooks.values():
        run(hook, new_tokens)
    best_long = {name: (float("inf"), None) for name in hooks}
    best_short = {name: float("inf") for name in hooks}
    for _ in range(repeat):
        for name, hook in hooks.items():
            r = run(hook, new_tokens)
            if r[0] < best_long[name][0]:
                best_long[name] = r
        for name, hook in hooks.items():
            best_short[name] = min(best_short[name], run(hook, short)[0])
    out = {}
    for name in hooks:
        long_s, tokens = best_long[name]
        out[name] = {"tokens_per_s": prompt.shape[0] * new_tokens / long_s, "seconds": long_s,
                     "short_seconds": best_short[name], "step_s": (long_s - best_short[name]) / (new_tokens - short),
                     "first_call_s": first[name], "tokens": tokens}
    return out


def bench_model(name, model, batches, kept_targets, *, prompt_len, new_tokens, bandwidth, fixed_taus=(), seed=0):
    """Rows for one model: per batch, Top-K then BEAM at each calibrated kept target (and each fixed tau)."""
    from beam_jax.routing import BeamHook, TopKHook

    rows = []
    V = model.cfg.vocab_size
    for B in batches:
        prompt = np.random.RandomState(seed + B).randint(3, V, size=(B, prompt_len)).astype(np.int32)
        policies = [("topk", None, None)]
        policies += [("beam", None, k) for k in kept_targets]
        policies += [("beam", float(t), None) for t in fixed_taus]
        base = topk_tokens = None
        for policy, tau, target in policies:
            if policy == "topk":
                hook = TopKHook()
            else:
                if tau is None:  # calibrated on the Top-K generation's decode steps
                    tau = calibrate_tau(model, topk_tokens, target, prompt_len, -1)
                hook = BeamHook(tau)
            r = time_generate(model, prompt, hook, new_tokens)
            if policy == "topk":
                topk_tokens = r["tokens"]
            ids, keep = decode_routing(model, r.pop("tokens"), prompt_len, hook)
            nbytes = step_bytes(model, ids, keep, policy == "beam")
            row = {"model": name, "batch": B, "policy": policy, "tau": tau, "kept_target": target,
                   "kept_ratio": float(keep.mean()), "tokens_per_s": r["tokens_per_s"],
                   "step_ms": 1e3 * r["step_s"], "first_call_s": r["first_call_s"],
                   "step_weight_bytes": nbytes, "floor_ms": 1e3 * nbytes / bandwidth}
            row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
            if base is None:
                base = row
            row["speedup_vs_topk"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["step_speedup_vs_topk"] = base["step_ms"] / row["step_ms"]
            row["ideal_speedup"] = base["step_weight_bytes"] / nbytes
            row["fraction_of_ideal"] = row["step_speedup_vs_topk"] / row["ideal_speedup"]
            rows.append(row)
            print(f"{name:6s} B={B} {policy:4s} tau={'-' if tau is None else f'{tau:.3f}':6s} "
                  f"kept {row['kept_ratio']:.3f}  {row['tokens_per_s']:7.1f} tok/s  step {row['step_ms']:6.1f} ms "
                  f"(floor {row['floor_ms']:5.1f}, x{row['step_over_floor']:.2f})  "
                  f"speed-up x{row['speedup_vs_topk']:.2f}"
                  f" step x{row['step_speedup_vs_topk']:.2f} / ideal x{row['ideal_speedup']:.2f}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3,tiny", help="comma list of qwen3, tiny")
    ap.add_argument("--qwen3-dir", default="/tmp/beam_bench/qwen3-30b-a3b-shaped-2l",
                    help="where the Qwen3-shaped model is made (reused if present)")
    ap.add_argument("--run", default="/tmp/sj/tiny_run", help="a trained tiny.py workdir (mask routers) for tiny")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--kept", default="0.15,0.5", help="kept-ratio targets; tau is calibrated for each")
    ap.add_argument("--tiny-taus", default="0.5", help="fixed taus for the tiny model's trained mask routers")
    ap.add_argument("--qwen3-taus", default="", help="fixed taus for the Qwen3-shaped model (e.g. 1.01: nothing kept, "
                    "the dense part alone)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_jax_cpu.json"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import jax

    import beam_jax

    batches = [int(b) for b in args.batches.split(",")]
    kept = [float(k) for k in args.kept.split(",") if k]
    bw = memory_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write) | {machine()}", flush=True)
    rows, notes = [], {}
    for name in args.models.split(","):
        if name == "qwen3":
            path = make_qwen3_shaped(args.qwen3_dir)
            model = beam_jax.load_pretrained(path)
        elif name == "tiny":
            model = load_tiny_with_run(args.run)
            if model is None:
                notes["tiny"] = f"skipped: no trained run at {args.run} (python -m beam_jax.train --config tiny.py)"
                print(notes["tiny"])
                continue
        else:
            raise SystemExit(f"unknown model {name!r}: qwen3 or tiny")
        taus = [float(t) for t in (args.tiny_taus if name == "tiny" else args.qwen3_taus).split(",") if t]
        rows += bench_model(name, model, batches, kept, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                            bandwidth=bw, fixed_taus=taus)
        del model
    bw2 = memory_bandwidth()
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__,
              "command": "flock /tmp/beam-bench.lock python bench/serve_jax.py " + " ".join(argv or sys.argv[1:]),
              "copy_bandwidth_GBps": [bw / 1e9, bw2 / 1e9], "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "greedy": True, "impl": "kernel (beam_jax.masked_moe, FFI)",
              "definitions": {
                  "tokens_per_s": "B * new_tokens / wall time of one generate call (prefill included), best of 3",
                  "step_ms": "steady decode step: (t(48 tokens) - t(8 tokens)) / 40, same compiled function",
                  "step_weight_bytes": "dense weights + B embedding rows + mask routers (BEAM) + each expert used by "
                                       "a kept pair of the step, mean over the decode steps",
                  "floor_ms": "step_weight_bytes / copy bandwidth (read + write bytes per second, all cores)",
                  "ideal_speedup": "Top-K step_weight_bytes / this row's", "kept_ratio": "kept / Top-K pairs "
                                   "during decoding"},
              "rows": rows, **({"notes": notes} if notes else {})}
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
