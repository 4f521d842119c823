"""Evaluation: quality against routed-expert FLOPs for BEAM and every comparison policy.

`task_sweep(model, selection, test, ...)` is the benchmark: every policy point is scored on the validation
split's tasks (`beam_jax.tasks`: next-token accuracy, greedy line completion, multiple choice), the points
`select_test_rows` chooses there are scored on the test split, retention = mean over tasks of the ratio to
Top-K with a 95% bootstrap CI over documents.

`evaluate(model, batches, hook)` gives next-token loss, perplexity, top-1 accuracy, experts per token
(overall and per layer), how often each Top-K rank is dropped, and the routed-expert FLOPs reduction
`1 - mean(K_eff) / K`; `sweep(...)` runs it over BEAM's tau and each baseline's knob; `pareto_plot` and
`markdown_table` present the result. Shared-expert, attention and router FLOPs are reported apart by
`flops_breakdown`, never folded into the headline.
"""

from __future__ import annotations

import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import flops, policies
from .data import BatchIterator
from . import tasks as tasks_lib
from .routing import TOPK, BeamHook, PolicyHook, make_hook


@partial(nnx.jit, static_argnames=("impl",))
def _eval_batch(model, input_ids, targets, loss_mask, hook, impl):
    out = model(input_ids, mask_hook=hook, impl=impl)
    logits = out.logits
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    m = loss_mask.astype(jnp.float32)
    valid = m.reshape(-1) > 0
    kept = [r.kept.reshape(valid.shape[0], -1) for r in out.moe]
    kept = jnp.stack(kept) if kept else jnp.zeros((0, valid.shape[0], 1), bool)  # [L, T, K]
    w = valid.astype(jnp.float32)
    return {"nll": jnp.sum(nll * m), "correct": jnp.sum(correct * m), "tokens": jnp.sum(m),
            "kept_per_layer": jnp.sum(kept.sum(-1) * w, -1),  # [L] sum over tokens of K_eff
            "kept_per_rank": jnp.sum(kept * w[None, :, None], 1)}  # [L, K] (candidates sorted by weight)


def evaluate(model, batches, hook=TOPK, impl: str = "dense") -> dict:
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


def _jobs(model, taus, policy_names, calib_batches, impl, renormalize):
    """(policy, knob name, value, hook) for Top-K, BEAM at each tau and each baseline over its default grid;
    dynamic skipping's per-layer betas are calibrated on `calib_batches` (one job per calibration quantile)."""
    K = model.cfg.num_experts_per_tok
    jobs = [("topk", None, None, TOPK)]
    jobs += [("beam", "tau", t, BeamHook(float(t), renormalize=renormalize)) for t in taus]
    for name in policy_names:
        pol = policies.POLICIES[name]
        if name == "dynamic_skip" and calib_batches is not None:
            for q in pol.calibration.grid:
                betas = calibrate_dynamic_skip(model, calib_batches, q, impl)
                jobs.append((name, "quantile", q, PolicyHook(name, per_layer=betas)))
        else:
            jobs += [(name, pol.knob, v, make_hook(name, knob=v)) for v in pol.grid(K)]
    return jobs


def sweep(model, batches, *, taus=(), policy_names=(), calib_batches=None, impl: str = "dense",
          base: dict | None = None, progress: bool = True, beam_model=None, renormalize: bool = False) -> list[dict]:
    """Evaluate Top-K (the reference), BEAM at each tau and each baseline over its default grid, on next-token
    accuracy of `batches` only (`task_sweep` is the benchmark with validation selection and CIs).

    `model` is the base model: Top-K and the training-free baselines run on it. BEAM runs on `beam_model`
    (default `model`, which then holds the trained mask routers); they differ when training also changed the
    base (`train.trainable` mask+router or all). Each knob is a traced leaf of its hook, so a sweep compiles
    once per policy. Each row: policy, knob, value, and `evaluate`'s metrics + retention against Top-K."""
    from tqdm.auto import tqdm

    batches = list(batches)
    beam_model = model if beam_model is None else beam_model
    jobs = _jobs(model, taus, policy_names, calib_batches, impl, renormalize)
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


def select_test_rows(rows: list[dict], levels) -> tuple[dict[int, list[float]], int | None]:
    """Which validation rows go to the test split, and BEAM's headline row. Pure: reads policy,
    moe_flops_reduction and retention.

    -> ({row index: [levels it was chosen at]}, headline index or None). Row 0 (Top-K, the reference) is
    always chosen. For every other policy and every level s: the row of that policy with the highest
    retention among those saving at least s of the routed-expert FLOPs (ties: the one saving more). BEAM's
    headline: its row chosen at the highest level BEAM reaches; if it reaches none, its best-retaining row."""
    chosen: dict[int, list[float]] = {0: []}
    headline, head_level = None, -1.0
    for name in dict.fromkeys(r["policy"] for r in rows[1:]):
        idx = [i for i, r in enumerate(rows) if i and r["policy"] == name]
        for s in sorted(levels):
            ok = [i for i in idx if rows[i]["moe_flops_reduction"] >= s - 1e-9]
            if not ok:
                continue
            best = max(ok, key=lambda i: (_finite(rows[i]["retention"]), rows[i]["moe_flops_reduction"]))
            chosen.setdefault(best, []).append(float(s))
            if name == "beam" and s > head_level:
                headline, head_level = best, s
        if name == "beam" and headline is None and idx:
            headline = max(idx, key=lambda i: (_finite(rows[i]["retention"]), rows[i]["moe_flops_reduction"]))
            chosen.setdefault(headline, [])
    return dict(sorted(chosen.items())), headline


def _finite(x):
    return x if x == x else float("-inf")


def _with_retention(rows, pers, ref_per, resamples, split):
    for r, per in zip(rows, pers):
        b = tasks_lib.bootstrap_retention(per, ref_per, resamples=resamples)
        r["retention"] = b["retention"]
        r["retention_ci95"] = b["ci95"]
        r["task_retention"] = {t: v["ratio"] for t, v in b["tasks"].items()}
        r["task_retention_ci95"] = {t: v["ci95"] for t, v in b["tasks"].items()}
        r["task_scores_ci95"] = {t: v["score_ci95"] for t, v in b["tasks"].items()}
        r["bootstrap"] = {"documents": b["documents"], "resamples": b["resamples"], "skipped": b["skipped"]}
        r["split"] = split
    ref = rows[0]
    for r in rows:
        r["loss_increase"] = r["loss"] - ref["loss"]
        r["accuracy_retention"] = r["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan")
    return rows


def task_sweep(model, selection, test, *, taus=(), policy_names=(), calib_batches=None, impl: str = "dense",
               beam_model=None, renormalize: bool = False, test_savings=(0.5, 0.75, 0.85), resamples: int = 1000,
               progress: bool = True) -> dict:
    """The benchmark: every job of `_jobs` scored on the `selection` TaskSet (validation split), the rows
    `select_test_rows` picks there scored on the `test` TaskSet, each with retention = mean over the tasks
    of (score / Top-K score) and its 95% bootstrap CI over documents (`beam_jax.tasks`).

    -> {"validation": rows, "test": rows (each with "validation": its selection figures and "selected_at":
    the FLOPs-saved levels it was chosen at), "headline": index of BEAM's headline row in "test" or None}."""
    from tqdm.auto import tqdm

    beam_model = model if beam_model is None else beam_model
    jobs = _jobs(model, taus, policy_names, calib_batches, impl, renormalize)

    def run(job_list, ts, desc):
        rows, pers = [], []
        for name, knob, value, hook in tqdm(job_list, desc=desc, disable=not progress, dynamic_ncols=True):
            r = tasks_lib.score(beam_model if name == "beam" else model, ts, hook, impl)
            pers.append(r.pop("per_document"))
            rows.append({"policy": name, "knob": knob, "value": value, **r})
        return _with_retention(rows, pers, pers[0], resamples, ts.split)

    val = run(jobs, selection, f"{selection.split} sweep")
    chosen, headline = select_test_rows(val, test_savings)
    test_rows = run([jobs[i] for i in chosen], test, f"{test.split} (chosen rows)")
    for r, (i, levels) in zip(test_rows, chosen.items()):
        r["selected_at"] = levels
        r["validation"] = {k: val[i][k] for k in ("retention", "retention_ci95", "moe_flops_reduction",
                                                  "experts_per_token", "task_scores")}
    head = list(chosen).index(headline) if headline is not None else None
    return {"validation": val, "test": test_rows, "headline": head}


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


def _ci_text(r):
    ci = r.get("retention_ci95")
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and ci[0] == ci[0] else ""


def _retention_cell(x) -> str:
    """A retention as a percentage; 'undefined' where a Top-K task score of 0 leaves nothing to retain."""
    return f"{100 * x:.1f}%" if math.isfinite(x) else "undefined"


def markdown_table(rows: list[dict]) -> str:
    """One line per row; with task scores (rows of `task_sweep`) also each task's score and retention's 95% CI."""
    names = list(rows[0].get("task_scores", {})) if rows else []
    head = "| policy | knob | value | experts/token | MoE FLOPs saved | loss | accuracy | "
    head += "".join(f"{t} | " for t in names) + "retention [95% CI] |\n"
    head += "|---" * (8 + len(names)) + "|\n"
    lines = []
    for r in rows:
        v = "" if r["value"] is None else (f"{r['value']:.3g}" if isinstance(r["value"], float) else str(r["value"]))
        tasks = "".join(f"{r['task_scores'][t]:.4f} | " for t in names)
        lines.append(f"| {r['policy']} | {r['knob'] or ''} | {v} | {r['experts_per_token']:.2f} | "
                     f"{100 * r['moe_flops_reduction']:.1f}% | {r['loss']:.4f} | {r['accuracy']:.4f} | {tasks}"
                     f"{_retention_cell(r['retention'])}{_ci_text(r)} |")
    return head + "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], path, title: str = "", background: list[dict] | None = None) -> None:
    """Retention against FLOPs saved, one line per policy; 95% CIs as error bars where rows have them;
    `background` rows (e.g. the validation sweep) drawn faint and dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"beam": ("tab:red", "o", 2.5), "top_p": ("tab:blue", "s", 1.2), "dynamic_skip": ("tab:green", "^", 1.2),
              "static_topk": ("tab:purple", "D", 1.2), "entropy": ("tab:orange", "v", 1.2)}
    for name in dict.fromkeys(r["policy"] for r in background or []):
        if name == "topk":
            continue
        pts = sorted((r["moe_flops_reduction"], 100 * r["retention"]) for r in background if r["policy"] == name)
        c, m, lw = styles.get(name, ("gray", ".", 1))
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], ls=":", color=c, lw=0.8, alpha=0.45)
    seen = []
    for name in dict.fromkeys(r["policy"] for r in rows):
        sel = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["moe_flops_reduction"])
        x = [100 * r["moe_flops_reduction"] for r in sel]
        y = [100 * r["retention"] for r in sel]
        ci = [r.get("retention_ci95") for r in sel]
        err = None
        if all(c is not None for c in ci):
            err = np.array([[max(0.0, v - 100 * c[0]) for v, c in zip(y, ci)],
                            [max(0.0, 100 * c[1] - v) for v, c in zip(y, ci)]])
        if name == "topk":
            ax.scatter(x, y, color="black", marker="*", s=120, zorder=5, label="Top-K (original)")
            continue
        c, m, lw = styles.get(name, ("gray", ".", 1))
        if name.startswith("beam@"):  # BEAM runs at several targets (beam_jax.curve)
            shades = ("tab:red", "darkred", "salmon", "tab:pink", "maroon")
            c, m, lw = shades[sum(n.startswith("beam@") for n in seen) % len(shades)], "o", 2.0
            seen.append(name)
        ax.errorbar(x, y, yerr=err, marker=m, color=c, lw=lw, capsize=3, label=name)
    ax.axhline(98, color="gray", ls=":", lw=1)
    ax.axvline(85, color="gray", ls=":", lw=1)
    ax.set_xlabel("routed-expert FLOPs saved (%)  = 1 - mean K_eff / K")
    ax.set_ylabel("quality retained (% of Top-K)" + (", 95% CI" if rows and "retention_ci95" in rows[0] else ""))
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


def run_benchmark(original, trained, tokenizer, examples: dict, validation, *, eval_cfg, data_cfg, beam_cfg,
                  impl: str, seed: int) -> dict:
    """The benchmark of a run: tasks of the validation and test splits (`beam_jax.tasks`), dynamic skipping
    calibrated on validation rows, `task_sweep` over them.

    Takes the config sections it reads: `eval_cfg` (config.eval: taus, policies, task sizes, test_savings,
    resamples), `data_cfg` (config.data: seq_len, batch_size, eval_batches), `beam_cfg` (config.beam: tau,
    renormalize); `impl` is the evaluation expert path (`experts.eval_impl(config.model.impl)`), `seed` the
    tasks' seed. -> task_sweep's result plus "selection_tasks" / "test_tasks" (their sizes and construction)
    and "seconds" per part."""
    e, d, b = eval_cfg, data_cfg, beam_cfg
    t0 = time.perf_counter()
    V = original.cfg.vocab_size
    sel = tasks_lib.build_tasks(examples["validation"], tokenizer, d.seq_len, d.batch_size, split="validation",
                            max_batches=e.selection_batches, mc_items=e.selection_mc_items, seed=seed,
                            vocab_size=V)
    test = tasks_lib.build_tasks(examples["test"], tokenizer, d.seq_len, d.batch_size, split="test",
                             max_batches=d.eval_batches, mc_items=e.mc_items, seed=seed, vocab_size=V)
    calib = calibration_batches(validation, d.batch_size, 4)
    t1 = time.perf_counter()
    taus = tuple(dict.fromkeys(tuple(e.taus) + (b.tau,))) if e.taus else (b.tau,)
    out = task_sweep(original, sel, test, taus=taus, policy_names=tuple(e.policies), calib_batches=calib,
                        impl=impl, beam_model=trained, renormalize=b.renormalize,
                        test_savings=tuple(e.test_savings), resamples=e.resamples)
    t2 = time.perf_counter()
    out["selection_tasks"] = {**sel.sizes(), **sel.construction}
    out["test_tasks"] = {**test.sizes(), **test.construction}
    out["seconds"] = {"build_tasks": t1 - t0, "sweep_and_test": t2 - t1,
                      "rows": {"validation": len(out["validation"]), "test": len(out["test"])}}
    return out


def calibration_batches(packed, batch_size: int, max_batches: int) -> list[dict]:
    """The first `max_batches` batches of a packed split in order (0 = all; the last one may be short)."""
    it = BatchIterator(packed, batch_size, shuffle=False, num_epochs=1, drop_remainder=False)
    out = []
    for b in it:
        out.append(b)
        if max_batches and len(out) >= max_batches:
            break
    return out
