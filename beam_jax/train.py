"""`python -m beam_jax.train --config NAME_OR_PATH [--config.train.steps=200] [--workdir DIR] [--resume]`

Loads a Hugging Face MoE checkpoint, trains BEAM's mask routers (or more, `train.trainable`), then
benchmarks Top-K against BEAM and the comparison policies (`evaluate.run_benchmark`: every point on the validation
split's tasks, the points chosen there on the test split's, retention with 95% CIs) and writes, under WORKDIR:
ckpt/ (orbax, trainable parameters only), metrics.jsonl, tensorboard/, report.json, sweep.md and plots.
"""

from __future__ import annotations

import math
from pathlib import Path

from .pipeline import train_and_evaluate


def retention_text(report: dict) -> str:
    """The headline retention with its CI, or why there is none: retention divides by each task's Top-K score,
    undefined where that is 0 (e.g. a randomly initialised model answers nothing right)."""
    r, (lo, hi) = report["quality_retention"], report["quality_retention_ci95"]
    if math.isfinite(r):
        return (f"quality retained {100 * r:.1f}% [95% CI {100 * lo:.1f}, {100 * hi:.1f}] "
                f"over {len(report['tasks'])} tasks")
    zero = sorted(t for t, v in report["tasks"].items() if not v)
    return (f"quality retained: undefined (Top-K scores 0 on {', '.join(zero) or 'a task'}; the model predicts "
            f"nothing right there, so no share of it can be kept)")


def main(config, workdir: Path, resume: bool):
    report = train_and_evaluate(config, workdir, resume)
    print()
    print((Path(workdir) / "sweep.md").read_text())
    print(f"BEAM at tau={report['tau']} (chosen on {report['selection_split']}), on {report['eval_split']}: "
          f"{report['experts_per_token']['overall']:.2f} of {report['top_k']} experts per token, MoE FLOPs saved "
          f"{100 * report['moe_flops_reduction']:.1f}%, {retention_text(report)}")
    print("wrote:", ", ".join(sorted(str(p) for p in report["files"])))


if __name__ == "__main__":
    from .cli import run

    run(main, "tiny.py")
