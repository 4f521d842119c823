"""Training recipes for BEAM on the shipped tiny model, compared on the validation split (issue 12).

    python bench/recipes.py NAME [section.key=value ...] [mask_bias=1] [router_init=S]
    python bench/recipes.py --baselines
    python bench/recipes.py --summary          # bench/results/recipes_cpu.md from the .jsonl

One run: `tiny.py` with the overrides, trained as `python -m beam_jax.train` trains (same Trainer and fit), then
next-token accuracy of the first 8 validation batches (12 x 256 tokens each) under BEAM at taus 0.05-0.8, as a
share of the *loaded* model's Top-K accuracy (what the report compares against), with the routed-expert FLOPs
saved. `--baselines` scores the training-free policies the same way. Results are appended to
bench/results/recipes_cpu.jsonl; bench/results/recipes_cpu.md summarises them (retention interpolated at 80% and
85% saved). A selection tool: accuracy only, validation only, no confidence intervals; the report of
`beam_jax.train` is the benchmark.

Two switches exist only here, to test ideas the model does not support: `mask_bias=1` gives every mask router a
bias, `router_init=S` starts W_m at S * (router kernel - its mean over experts) instead of zeros.
"""

from __future__ import annotations

import ast
import json
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import transformers

from beam_jax import beam as beam_lib
from beam_jax import evaluate
from beam_jax.configs import tiny
from beam_jax.data import BatchIterator
from beam_jax.experts import eval_impl, expert_impl
from beam_jax.loading import load_pretrained
from beam_jax.routing import TOPK, BeamHook, beam_hook
from beam_jax.run_data import load_splits, split_examples_of
from beam_jax.trainer import LossConfig, Trainer, fit

OUT = Path(__file__).resolve().parent / "results" / "recipes_cpu.jsonl"
TAUS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
VALIDATION_BATCHES = 8
SAVINGS = (0.5, 0.6, 0.8, 0.83, 0.85)  # the summary's columns: shares of routed-expert FLOPs saved


def _value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string value (e.g. train.trainable=all)


def _data(c):
    tok = transformers.AutoTokenizer.from_pretrained(c.model.path)
    splits = load_splits(c.data, tok, split_examples_of(c.data))
    return splits, evaluate.calibration_batches(splits["validation"], c.data.batch_size, VALIDATION_BATCHES)


def _row(name, r, top):
    return {"name": name, "saved": r["moe_flops_reduction"], "accuracy": r["accuracy"],
            "retention": r["accuracy"] / top, "loss": r["loss"],
            "experts_per_layer": r["experts_per_token_per_layer"]}


def baselines():
    c = tiny.get_config()
    model = load_pretrained(c.model.path, dtype=c.model.dtype)
    _, vb = _data(c)
    rows = evaluate.sweep(model, vb, policy_names=("top_p", "dynamic_skip", "static_topk"), calib_batches=vb[:4],
                          impl=eval_impl(c.model.impl), progress=False)
    top = rows[0]["accuracy"]
    return {"name": "baselines", "overrides": [], "topk_accuracy": top,
            "rows": [{**_row(f"{r['policy']} {r['value']}", r, top), "policy": r["policy"]} for r in rows[1:]]}


def run(name, overrides):
    c = tiny.get_config()
    extra = {"mask_bias": 0, "router_init": 0.0}
    for kv in overrides:
        key, _, text = kv.partition("=")
        key = "beam.distill" if key == "distill" else key  # the records' older spelling
        if key in extra:
            extra[key] = _value(text)
            continue
        section, field = key.split(".")
        c[section][field] = _value(text)
    loaded = load_pretrained(c.model.path, dtype=c.model.dtype)
    model = load_pretrained(c.model.path, dtype=c.model.dtype,
                            param_dtype=None if c.train.trainable == "mask" else "float32")
    for layer in model.layers:
        if not layer.is_moe:
            continue
        if extra["mask_bias"]:
            from beam_jax.moe import MaskRouter

            layer.mlp.mask_router = MaskRouter(model.cfg.hidden_size, model.cfg.num_experts, bias=True)
        if extra["router_init"]:
            w = jnp.asarray(layer.mlp.gate.kernel[...], jnp.float32)
            layer.mlp.mask_router.kernel[...] = extra["router_init"] * (w - w.mean(1, keepdims=True))
    splits, vb = _data(c)
    impl = eval_impl(c.model.impl)
    top = evaluate.evaluate(loaded, vb, TOPK, impl)["accuracy"]
    lc = LossConfig(alpha=c.beam.alpha, balance=c.beam.balance, hook=beam_hook(c.beam, train=True),
                    impl=expert_impl(c.model.impl), distill=float(c.beam.distill))
    tr = Trainer(model, c.train.trainable, c.train, lc)
    controller = beam_lib.BetaController() if c.beam.target_ratio > 0 else None
    t0 = time.time()
    with tempfile.TemporaryDirectory() as wd:
        summary = fit(tr, BatchIterator(splits["train"], c.data.batch_size, seed=c.seed), Path(wd), c.train,
                      beta=c.beam.beta, controller=controller, target=c.beam.target_ratio,
                      controller_rate=c.beam.controller_rate, per_layer_beta=c.beam.controller == "per_layer",
                      desc=name)
    seconds = time.time() - t0
    trained = tr.model()
    rows = [{**_row(f"beam tau {t}", evaluate.evaluate(trained, vb, BeamHook(t), impl), top), "tau": t} for t in TAUS]
    return {"name": name, "overrides": overrides, "topk_accuracy": top, "train_seconds": seconds,
            "trained_topk_accuracy": evaluate.evaluate(trained, vb, TOPK, impl)["accuracy"],
            "final_beta": summary["beta"], "rows": rows}


def retention_at(rows, saved):
    """Retention interpolated at a saving inside the rows' range (None outside it)."""
    xs = np.array([r["saved"] for r in rows])
    ys = np.array([r["retention"] for r in rows])
    order = np.argsort(xs)
    return float(np.interp(saved, xs[order], ys[order])) if xs.min() <= saved <= xs.max() else None


def summary(path=OUT) -> str:
    """The markdown table of every recorded run (the last record of each name), baselines per policy."""
    recs = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        recs[rec["name"]] = rec
    lines = ["| run | settings (on top of tiny.py's data, 150 steps, target 0.15 unless set) | retention at 50% saved "
             "| at 60% | at 80% | at 83% | at 85% | trained model's Top-K accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for name, rec in recs.items():
        if name == "baselines":
            for policy in dict.fromkeys(r["policy"] for r in rec["rows"]):
                rows = [r for r in rec["rows"] if r["policy"] == policy]
                lines.append(f"| {policy} | training-free | "
                             + " | ".join(pct(retention_at(rows, x)) for x in SAVINGS) + " | - |")
            continue
        lines.append(f"| {name} | `{' '.join(rec['overrides'])}` | "
                     + " | ".join(pct(retention_at(rec["rows"], x)) for x in SAVINGS)
                     + f" | {rec.get('trained_topk_accuracy', 0):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if argv and argv[0] == "--summary":
        print(summary(), end="")
        return
    if argv and argv[0] == "--baselines":
        rec = baselines()
    elif argv and not argv[0].startswith("-"):
        rec = run(argv[0], argv[1:])
    else:
        raise SystemExit(__doc__)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(rec, default=float) + "\n")
    for r in rec["rows"]:
        print(f"{r['name']:22s} saved {r['saved'] * 100:5.1f}%  accuracy {r['accuracy']:.4f}  "
              f"retention {r['retention'] * 100:5.1f}%")
    at = {s: retention_at(rec["rows"], s) for s in SAVINGS}
    print(f"{rec['name']}: " + ", ".join(f"{s:.0%} saved: {'-' if v is None else f'{v:.1%}'}" for s, v in at.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
