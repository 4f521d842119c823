"""`python -m beam_jax.eval --config NAME_OR_PATH --workdir RUN_DIR [--config.eval.multiple_choice=FILE]`

Benchmarks a trained run (its latest checkpoint's mask routers on the base model it references) as
training does (`evaluate.run_benchmark`): Top-K, BEAM at every tau of `eval.taus` and each baseline of
`eval.policies` over its knob, all scored on the validation split's tasks (`beam_jax.tasks`: next-token
accuracy, greedy line completion, multiple choice), the points chosen there scored on the test split, with
retention (mean over tasks of score / Top-K score) and its 95% bootstrap CI, experts per token per layer and
routed-expert FLOPs reduction (shared-expert, attention and router FLOPs apart); optionally multiple-choice accuracy on
a local JSONL file of {"context", "choices", "label"} items scored by log-likelihood (lm-eval-harness style:
`acc` on the summed log-probability, `acc_norm` divided by the choice's length in bytes).
Writes eval.json, eval_sweep.md and eval_pareto.png into the run directory.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import evaluate as ev
from .checkpoint import restore_trainable
from .data.errors import DataError
from .loading import load_pretrained
from .routing import TOPK, beam_hook
from .run_data import fingerprint_diff, load_splits, model_fingerprint, split_examples_of


def read_multiple_choice(path) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                it = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"not JSON ({e.msg})", where=f"line {n}") from None
            for field, typ in (("context", str), ("choices", list), ("label", int)):
                if not isinstance(it.get(field), typ):
                    raise DataError(path, f"missing or not {typ.__name__}", where=f"line {n}", field=field)
            if not 0 <= it["label"] < len(it["choices"]):
                raise DataError(path, f"{it['label']} is outside the {len(it['choices'])} choices", where=f"line {n}",
                                field="label")
            items.append(it)
    if not items:
        raise DataError(path, "no items")
    return items


@partial(nnx.jit, static_argnames=("hook", "impl"))
def _loglik(model, ids, mask, score_mask, hook, impl):
    logits = model(ids, attention_mask=mask, mask_hook=hook, impl=impl).logits
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(tok * score_mask[:, 1:], -1)


def multiple_choice(model, tokenizer, items, hook, impl="dense") -> dict:
    """Accuracy of picking the choice with the highest log p(choice | context)."""
    correct = correct_norm = 0
    for it in items:
        ctx = tokenizer(it["context"], add_special_tokens=False)["input_ids"]
        seqs, spans = [], []
        for ch in it["choices"]:
            c = tokenizer(ch, add_special_tokens=False)["input_ids"]
            seqs.append(ctx + c)
            spans.append((len(ctx), len(ctx) + len(c)))
        L = max(map(len, seqs))
        ids = np.zeros((len(seqs), L), np.int32)
        mask = np.zeros((len(seqs), L), np.int32)
        score = np.zeros((len(seqs), L), np.float32)
        for i, (s, (a, b)) in enumerate(zip(seqs, spans)):  # right padding: positions stay 0..len-1
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
            score[i, a:b] = 1
        ll = np.asarray(_loglik(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(score), hook, impl))
        norm = ll / np.array([max(len(ch.encode()), 1) for ch in it["choices"]])
        correct += int(np.argmax(ll) == it["label"])
        correct_norm += int(np.argmax(norm) == it["label"])
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


def main(config, workdir: Path, resume: bool):
    import transformers

    from .experts import eval_impl

    model = load_pretrained(config.model.path, dtype=config.model.dtype)
    meta = restore_trainable(Path(workdir) / "ckpt", model)
    # Top-K and the baselines run on the base as loaded; it differs from `model` when training changed more
    # than the mask routers
    original = model if meta.get("trainable", "mask") == "mask" else load_pretrained(config.model.path,
                                                                                     dtype=config.model.dtype)
    diffs = fingerprint_diff(meta.get("base_model", {}), model_fingerprint(config.model.path))
    if diffs:
        raise SystemExit(f"error: {workdir}/ckpt was trained on another base model than {config.model.path}: "
                         + "; ".join(diffs))
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.path)
    examples = split_examples_of(config.data)
    splits = load_splits(config.data, tokenizer, examples)
    impl = eval_impl(config.model.impl)
    bench = ev.run_benchmark(original, model, tokenizer, examples, splits["validation"], eval_cfg=config.eval,
                             data_cfg=config.data, beam_cfg=config.beam, impl=impl, seed=config.seed)
    rows = bench["test"]
    head = rows[bench["headline"]] if bench["headline"] is not None else None
    tau = head["value"] if head is not None else config.beam.tau
    result = {"checkpoint_step": meta["step"], "eval_split": "test", "selection_split": "validation",
              "eval_tokens": bench["test_tasks"]["tokens"], "tasks": dict(rows[0]["task_scores"]),
              "task_sizes": {"test": bench["test_tasks"], "validation": bench["selection_tasks"]}, "tau": tau,
              "sweep": rows, "selection_sweep": bench["validation"],
              "flops_per_token_per_moe_layer": ev.flops_breakdown(model.cfg, rows[0]["experts_per_token"],
                                                                  config.data.seq_len)}
    if config.eval.multiple_choice:
        items = read_multiple_choice(config.eval.multiple_choice)
        result["multiple_choice"] = {"topk": multiple_choice(original, tokenizer, items, TOPK, impl),
                                     "beam": multiple_choice(model, tokenizer, items, beam_hook(config.beam, tau=tau),
                                                             impl)}
    workdir = Path(workdir)
    (workdir / "eval_sweep.md").write_text(ev.markdown_table(rows) + "\n## Validation sweep (selection)\n\n"
                                          + ev.markdown_table(bench["validation"]))
    ev.pareto_plot(rows, workdir / "eval_pareto.png", background=bench["validation"])
    tmp = workdir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    os.replace(tmp, workdir / "eval.json")
    print(ev.markdown_table(rows))
    if "multiple_choice" in result:
        print("multiple choice:", json.dumps(result["multiple_choice"]))
    print(f"wrote {workdir / 'eval.json'}, {workdir / 'eval_sweep.md'}, {workdir / 'eval_pareto.png'}")


if __name__ == "__main__":
    from .cli import run

    run(main, "tiny.py")
