"""Evaluation: quality against routed-expert FLOPs for BEAM and every comparison policy, on one held-out split.

`evaluate(model, batches, hook)` gives next-token loss, perplexity, top-1 accuracy, experts per token
(overall and per layer), how often each Top-K rank is dropped, and the routed-expert FLOPs reduction
`1 - mean(K_eff) / K`; `sweep(...)` runs it over BEAM's tau and each baseline's knob; `pareto_plot` and
`markdown_table` present the result. Shared-expert, attention and router FLOPs are reported apart by
`flops_breakdown`, never folded into the headline.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import beam, flops, policies
from .routing import BeamHook, PolicyHook, TopKHook, make_hook


@partial(nnx.jit, static_argnames=("impl",))
def _eval_batch(model, input_ids, targets, loss_mask, hook, impl):
    out = model(input_ids, mask_hook=hook, impl=impl)
    logits = out.logits
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    m = loss_mask.astype(jnp.float32)
    valid = m.reshape(-1) > 0
    kept = [r.aux.get("kept", jnp.ones(r.topk_ids.shape, bool)).reshape(valid.shape[0], -1) for r in out.moe]
    kept = jnp.stack(kept) if kept else jnp.zeros((0, valid.shape[0], 1), bool)  # [L, T, K]
    w = valid.astype(jnp.float32)
    return {"nll": jnp.sum(nll * m), "correct": jnp.sum(correct * m), "tokens": jnp.sum(m),
            "kept_per_layer": jnp.sum(kept.sum(-1) * w, -1),  # [L] sum over tokens of K_eff
            "kept_per_rank": jnp.sum(kept * w[None, :, None], 1)}  # [L, K] (candidates sorted by weight)


def evaluate(model, batches, hook=TopKHook(), impl: str = "dense") -> dict:
    """batches: iterable of dicts with input_ids, targets, loss_mask [B, S]. Returns host floats/lists."""
    acc = None
    for b in batches:
        r = _eval_batch(model, jnp.asarray(b["input_ids"]), jnp.asarray(b["targets"]), jnp.asarray(b["loss_mask"]),
                        hook, impl)
        r = jax.tree.map(np.asarray, r)
        acc = r if acc is None else jax.tree.map(np.add, acc, r)
    n = float(acc["tokens"])
    K = model.cfg.num_experts_per_tok
    per_layer = (acc["kept_per_layer"] / n).tolist()
    mean_k = float(np.mean(per_layer)) if per_layer else 0.0
    loss = float(acc["nll"]) / n
    return {
        "loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": float(acc["correct"]) / n, "tokens": int(n),
        "experts_per_token": mean_k, "experts_per_token_per_layer": per_layer,
        "rank_drop_rate": (1 - acc["kept_per_rank"] / n).tolist(),  # [L][K]: how often rank k is dropped
        "moe_flops_reduction": flops.moe_flops_reduction(mean_k, K) if K else 0.0,
    }


def calibrate_dynamic_skip(model, batches, quantile: float, impl: str = "dense") -> tuple[float, ...]:
    """Per-layer beta for dynamic skipping from calibration batches (Lu et al. 2024), indexed by layer id."""
    fwd = nnx.jit(lambda m, x: m(x, impl=impl))
    weights = {i: [] for i in model.cfg.moe_layer_ids}
    for b in batches:
        out = fwd(model, jnp.asarray(b["input_ids"]))
        valid = np.asarray(b["loss_mask"]).reshape(-1) > 0
        for layer, rec in zip(model.cfg.moe_layer_ids, out.moe):
            weights[layer].append(np.asarray(rec.topk_weights).reshape(valid.shape[0], -1)[valid])
    betas = [0.0] * model.cfg.num_hidden_layers
    for layer, ws in weights.items():
        betas[layer] = float(policies.calibrate_dynamic_skip_beta(jnp.asarray(np.concatenate(ws)), quantile=quantile))
    return tuple(betas)


def sweep(model, batches, *, taus=(), policy_names=(), calib_batches=None, impl: str = "dense",
          base: dict | None = None, progress: bool = True, beam_model=None, renormalize: bool = False) -> list[dict]:
    """Evaluate Top-K (the reference), BEAM at each tau and each baseline over its default grid.

    `model` is the base model: Top-K and the training-free baselines run on it. BEAM runs on `beam_model`
    (default `model`, which then holds the trained mask routers); they differ when training also changed the
    base (`train.trainable` mask+router or all). Each knob is a traced leaf of its hook, so a sweep compiles
    once per policy. Each row: policy, knob, value, and `evaluate`'s metrics + retention against Top-K."""
    from tqdm.auto import tqdm

    batches = list(batches)
    K = model.cfg.num_experts_per_tok
    beam_model = model if beam_model is None else beam_model
    jobs = [("topk", None, None, TopKHook())]
    jobs += [("beam", "tau", t, BeamHook(float(t), renormalize=renormalize)) for t in taus]
    for name in policy_names:
        pol = policies.POLICIES[name]
        if name == "dynamic_skip" and calib_batches is not None:
            for q in pol.calibration.grid:
                betas = calibrate_dynamic_skip(model, calib_batches, q, impl)
                jobs.append((name, "quantile", q, PolicyHook(name, per_layer=betas)))
        else:
            jobs += [(name, pol.knob, v, make_hook(name, knob=v)) for v in pol.grid(K)]
    rows = []
    for name, knob, value, hook in tqdm(jobs, desc="sweep", disable=not progress, dynamic_ncols=True):
        if name == "topk" and base is not None:
            r = dict(base)
        else:
            r = evaluate(beam_model if name == "beam" else model, batches, hook, impl)
        rows.append({"policy": name, "knob": knob, "value": value, **r})
    ref = rows[0]
    for r in rows:
        r["retention"] = r["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan")
        r["loss_increase"] = r["loss"] - ref["loss"]
    return rows


def pareto_front(rows: list[dict], x="moe_flops_reduction", y="accuracy") -> list[dict]:
    """Rows not dominated by another row of the same policy (higher x and higher y)."""
    out = []
    for r in rows:
        if not any(o is not r and o[x] >= r[x] and o[y] >= r[y] and (o[x] > r[x] or o[y] > r[y]) for o in rows):
            out.append(r)
    return sorted(out, key=lambda r: r[x])


def retention_at(rows: list[dict], policy: str, reduction: float) -> float | None:
    """Best retention a policy reaches at a FLOPs reduction of at least `reduction` (None: never reaches it)."""
    c = [r["retention"] for r in rows if r["policy"] == policy and r["moe_flops_reduction"] >= reduction]
    return max(c) if c else None


def markdown_table(rows: list[dict]) -> str:
    head = "| policy | knob | value | experts/token | MoE FLOPs saved | loss | accuracy | retention |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        v = "" if r["value"] is None else (f"{r['value']:.3g}" if isinstance(r["value"], float) else str(r["value"]))
        lines.append(f"| {r['policy']} | {r['knob'] or ''} | {v} | {r['experts_per_token']:.2f} | "
                     f"{100 * r['moe_flops_reduction']:.1f}% | {r['loss']:.4f} | {r['accuracy']:.4f} | "
                     f"{100 * r['retention']:.1f}% |")
    return head + "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"beam": ("tab:red", "o", 2.5), "top_p": ("tab:blue", "s", 1.2), "dynamic_skip": ("tab:green", "^", 1.2),
              "static_topk": ("tab:purple", "D", 1.2), "entropy": ("tab:orange", "v", 1.2)}
    for name in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["moe_flops_reduction"], 100 * r["retention"]) for r in rows if r["policy"] == name)
        if name == "topk":
            ax.scatter(*zip(*pts), color="black", marker="*", s=120, zorder=5, label="Top-K (original)")
            continue
        c, m, lw = styles.get(name, ("gray", ".", 1))
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker=m, color=c, lw=lw, label=name)
    ax.axhline(98, color="gray", ls=":", lw=1)
    ax.axvline(85, color="gray", ls=":", lw=1)
    ax.set_xlabel("routed-expert FLOPs saved (%)  = 1 - mean K_eff / K")
    ax.set_ylabel("quality retained (% of Top-K accuracy)")
    ax.set_title(title or "quality vs MoE FLOPs saved")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flops_breakdown(cfg, mean_k_eff: float, seq_len: int) -> dict:
    """Per-token FLOPs of one MoE layer by part (routed experts, shared experts, attention, routers)."""
    K = cfg.num_experts_per_tok
    if cfg.attention == "mla":
        attn = flops.mla_attention_flops(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank,
                                         cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, seq_len,
                                         q_lora_rank=cfg.q_lora_rank)
    else:
        attn = flops.attention_flops(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                     cfg.head_dim, seq_len)
    return {
        "routed_experts_topk": flops.routed_expert_flops(K, cfg.hidden_size, cfg.moe_intermediate_size),
        "routed_experts_beam": flops.routed_expert_flops(mean_k_eff, cfg.hidden_size, cfg.moe_intermediate_size),
        "shared_experts": flops.shared_expert_flops(cfg.hidden_size, cfg.shared_expert_intermediate_size,
                                                    gated=cfg.shared_expert_gate)
        if cfg.shared_expert_intermediate_size else 0.0,
        "attention": float(sum(attn.values())),
        **{k: float(v) for k, v in flops.router_flops(cfg.hidden_size, cfg.num_experts).items()},
    }
