"""`python -m beam_jax.curve --config tiny.py --targets=0.5,0.3,0.15 [--workdir runs/curve]
[--config.eval.test_savings='(0.25,0.5,0.75,0.85,0.9)']`

BEAM over the whole budget: one BEAM training run per target ratio (`beam.target_ratio`, the fraction of
Top-K pairs the controller aims to keep), each benchmarked as `python -m beam_jax.train` does (every tau of
`eval.taus` on the validation split's tasks, the points chosen there at each level of `eval.test_savings`
scored on the test split, 95% bootstrap CIs). The baselines do not depend on the target and run once, with the
first target. Writes WORKDIR/target_<t>/ (each run's own report) and WORKDIR/curve.md, curve.json, curve.png:
every run's BEAM test rows (policy `beam@<t>`) against every baseline's, one table and one plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

flags.DEFINE_list("targets", ["0.5", "0.3", "0.15"], "BEAM target ratios (kept fraction of Top-K pairs), one run each")


def main(config, workdir: Path, resume: bool):
    from ml_collections import ConfigDict

    from . import evaluate as ev
    from .pipeline import train_and_evaluate

    workdir = Path(workdir)
    targets = [float(t) for t in flags.FLAGS.targets]
    rows, background, runs = [], [], {}
    for n, t in enumerate(targets):
        c = ConfigDict(config.to_dict())
        c.beam.target_ratio = t
        if n:
            c.eval.policies = ()  # the baselines ran with the first target, on the same base model
        report = train_and_evaluate(c, workdir / f"target_{t:g}", resume)
        runs[f"{t:g}"] = {k: report[k] for k in ("tau", "quality_retention", "quality_retention_ci95",
                                                 "moe_flops_reduction", "final_beta", "benchmark_seconds")}
        for src, dst in ((report["sweep"], rows), (report["selection_sweep"], background)):
            for r in src:
                if r["policy"] == "beam":
                    dst.append({**r, "policy": f"beam@{t:g}", "target_ratio": t})
                elif n == 0:
                    dst.append(r)
    rows.sort(key=lambda r: (r["policy"] != "topk", not r["policy"].startswith("beam"), r["policy"],
                             r["moe_flops_reduction"]))
    title = f"{Path(config.model.path).name}: BEAM at targets {', '.join(map(str, targets))} (test split)"
    ev.pareto_plot(rows, workdir / "curve.png", title=title, background=background)
    (workdir / "curve.md").write_text(ev.markdown_table(rows))
    out = {"targets": targets, "runs": runs, "eval_split": "test", "selection_split": "validation",
           "test_savings": list(config.eval.test_savings), "sweep": rows, "selection_sweep": background}
    (workdir / "curve.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(ev.markdown_table(rows))
    print(f"wrote {workdir / 'curve.md'}, {workdir / 'curve.json'}, {workdir / 'curve.png'}")


if __name__ == "__main__":
    from .cli import run

    run(main, "tiny.py")
