"""The end-of-run report: report.json, sweep.md, and PNG plots (experts per token per layer, how often
each Top-K rank is dropped, loss curves, the Pareto comparison with 95% CIs)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax

from . import evaluate as ev


def _plot_run(workdir: Path, beam: dict, log: list[dict], K: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    per_layer = beam["experts_per_token_per_layer"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(per_layer)), per_layer, color="tab:red")
    ax.axhline(K, color="black", ls="--", lw=1, label=f"Top-K (K={K})")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("experts per token")
    ax.set_title("BEAM: routed experts per token, by layer")
    ax.legend()
    fig.tight_layout()
    files.append(workdir / "experts_per_layer.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    drop = beam["rank_drop_rate"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for li, row in enumerate(drop):
        ax.plot(range(1, len(row) + 1), [100 * v for v in row], marker="o", label=f"layer {li}")
    ax.set_xlabel("Top-K rank of the candidate (1 = highest router weight)")
    ax.set_ylabel("dropped (%)")
    ax.set_title("how often each Top-K rank is dropped")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(workdir / "rank_drop.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    train = [r for r in log if r.get("split") == "train"]
    if train:
        fig, ax1 = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in train]
        ax1.plot(steps, [r["lm_loss"] for r in train], label="LM loss", color="tab:blue")
        ax1.set_xlabel("step")
        ax1.set_ylabel("LM loss")
        ax2 = ax1.twinx()
        ax2.plot(steps, [r.get("experts_per_token", K) for r in train], color="tab:red", label="experts/token")
        ax2.set_ylabel("experts per token")
        ax1.set_title("training")
        fig.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        files.append(workdir / "loss_curves.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


_SUMMARY = ("loss", "perplexity", "accuracy", "tokens", "experts_per_token", "retention", "retention_ci95",
            "task_scores")


def write_report(workdir, config, cfg, bench: dict, summary: dict, num_trainable: int) -> dict:
    """report.json, sweep.md (the test rows, then the validation sweep) and the plots from `evaluate.run_benchmark`'s
    result. Every quality figure is on the test split; which point of each policy is shown, and BEAM's
    headline tau, were chosen on the validation split (`evaluate.select_test_rows`)."""
    workdir = Path(workdir)
    K = cfg.num_experts_per_tok
    rows, val = bench["test"], bench["validation"]
    base = rows[0]
    beam = rows[bench["headline"]] if bench["headline"] is not None else base
    files = _plot_run(workdir, beam, summary.get("log", []), K)
    ev.pareto_plot(rows, workdir / "pareto.png", background=val,
                   title=f"{Path(config.model.path).name}: test split (points chosen on validation, dotted)")
    files.append(workdir / "pareto.png")
    test_sizes, sel_sizes = bench["test_tasks"], bench["selection_tasks"]
    note = (f"Test split: {test_sizes['tokens']:,} next-token targets, {test_sizes['line_completion_items']:,} "
            f"line-completion items, {test_sizes['multiple_choice_items']:,} multiple-choice items, "
            f"{test_sizes['documents']} documents; retention = mean over the tasks of score / Top-K score, 95% CI "
            f"from {config.eval.resamples} bootstrap resamples of documents. Rows chosen on the validation split "
            f"({sel_sizes['tokens']:,} tokens, {sel_sizes['multiple_choice_items']:,} multiple-choice items, "
            f"{sel_sizes['documents']} documents): per policy the best-retaining point saving at least each of "
            f"{', '.join(f'{100 * s:.0f}%' for s in config.eval.test_savings)} of the routed-expert FLOPs.\n\n")
    table = note + ev.markdown_table(rows) + "\n## Validation sweep (selection)\n\n" + ev.markdown_table(val)
    (workdir / "sweep.md").write_text(table)
    files.append(workdir / "sweep.md")
    report = {
        "model": str(config.model.path), "architecture": cfg.architecture, "top_k": K, "num_experts": cfg.num_experts,
        "tau": beam["value"] if beam["policy"] == "beam" else config.beam.tau, "train_tau": config.beam.tau,
        "tau_selection": "BEAM's row chosen on the validation split at the highest FLOPs-saved level of "
                         "eval.test_savings it reaches (its best-retaining row if none)",
        "trainable": config.train.trainable, "trainable_parameters": num_trainable,
        "eval_split": "test", "selection_split": "validation", "calibration_split": "validation",
        "eval_tokens": test_sizes["tokens"], "eval_documents": test_sizes["documents"],
        "tasks": dict(base["task_scores"]),
        "tasks_ci95": dict(base.get("task_scores_ci95", {})),
        "task_sizes": {"test": test_sizes, "validation": sel_sizes},
        "base": {k: base[k] for k in _SUMMARY if k in base},
        "beam": {k: beam[k] for k in _SUMMARY if k in beam},
        "quality_retention": beam["retention"],
        "quality_retention_ci95": beam["retention_ci95"],
        "accuracy_retention": beam["accuracy_retention"],
        "loss_increase": beam["loss"] - base["loss"],
        "moe_flops_reduction": beam["moe_flops_reduction"],
        "experts_per_token": {"overall": beam["experts_per_token"], "per_layer": beam["experts_per_token_per_layer"]},
        "rank_drop_rate": beam["rank_drop_rate"],
        "flops_per_token_per_moe_layer": ev.flops_breakdown(cfg, beam["experts_per_token"], config.data.seq_len),
        "train_tokens_per_s": summary["train_tokens_per_s"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "final_beta": summary.get("beta"),
        "final_train_metrics": {k: v for k, v in summary.get("final", {}).items() if not isinstance(v, list)},
        "retention_at_85pct_flops_saved": {p: ev.retention_at(rows, p, 0.85)
                                           for p in dict.fromkeys(r["policy"] for r in rows)},
        "sweep": rows,
        "selection_sweep": val,
        "benchmark_seconds": bench.get("seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
                   f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
    }
    files.append(workdir / "report.json")
    report["files"] = [str(f) for f in files]
    tmp = workdir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    os.replace(tmp, workdir / "report.json")
    return report
