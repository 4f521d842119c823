"""Evaluation: sweep rows and their FLOPs accounting, multiple-choice scoring, and the CLI's config errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

import beam_jax
from beam_jax import evaluate as ev
from beam_jax.data.errors import DataError
from beam_jax.eval import multiple_choice, read_multiple_choice
from beam_jax.routing import BeamHook, TopKHook, make_hook


def _batches(vocab=320, n=2, seed=0):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        ids = rs.randint(3, vocab, size=(2, 17))
        out.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((2, 16), np.float32)})
    return out


def test_evaluate_counts_experts(tiny_model_dir):
    model = beam_jax.load_pretrained(tiny_model_dir)
    b = _batches()
    base = ev.evaluate(model, b, TopKHook())
    assert base["experts_per_token"] == 3.0 and base["moe_flops_reduction"] == 0.0
    assert base["tokens"] == 64 and np.isfinite(base["loss"])
    one = ev.evaluate(model, b, make_hook("static_topk", knob=1))
    assert one["experts_per_token"] == 1.0
    assert one["moe_flops_reduction"] == pytest.approx(2 / 3)
    assert one["rank_drop_rate"][0] == [0.0, 1.0, 1.0]  # ranks 2 and 3 always dropped
    # a mask router pushed to large negative logits drops every candidate at tau=0.5
    for layer in model.layers:
        layer.mlp.mask_router.kernel[...] = -np.ones_like(layer.mlp.mask_router.kernel[...])
    none = ev.evaluate(model, b, BeamHook(0.5))
    assert none["experts_per_token"] < base["experts_per_token"]


def test_sweep_rows_and_pareto(tiny_model_dir):
    model = beam_jax.load_pretrained(tiny_model_dir)
    rows = ev.sweep(model, _batches(), taus=(0.5,), policy_names=("static_topk", "dynamic_skip"),
                    calib_batches=_batches(seed=1), progress=False)
    policies = [r["policy"] for r in rows]
    assert policies[:2] == ["topk", "beam"] and policies.count("static_topk") == 2
    assert policies.count("dynamic_skip") == 9  # one row per calibration quantile
    assert all(0.0 <= r["moe_flops_reduction"] <= 1.0 for r in rows)
    front = ev.pareto_front(rows)
    assert front and all(any(r is f for r in rows) for f in front)
    table = ev.markdown_table(rows)
    assert table.count("\n") == len(rows) + 2
    # a retention with no Top-K score to divide by (a random model's) reads 'undefined', not 'nan%'
    blank = ev.markdown_table([{**rows[1], "retention": float("nan"), "retention_ci95": [float("nan")] * 2}])
    assert "undefined |" in blank and "nan" not in blank
    assert "| 86.6% |" in ev.markdown_table([{**rows[1], "retention": 0.866}])


def test_multiple_choice(tiny_model_dir, tmp_path):
    import transformers

    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"context": "x = 1", "choices": [" + 1", " - 2"], "label": 1}) + "\n")
    items = read_multiple_choice(f)
    model = beam_jax.load_pretrained(tiny_model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    r = multiple_choice(model, tok, items, TopKHook())
    assert r["items"] == 1 and r["acc"] in (0.0, 1.0)
    f.write_text('{"context": "a", "choices": ["b"], "label": 3}\n')
    with pytest.raises(DataError, match=r"mc\.jsonl: line 1: field 'label'"):
        read_multiple_choice(f)
    f.write_text('{"context": "a"}\n')
    with pytest.raises(DataError, match=r"line 1: field 'choices'"):
        read_multiple_choice(f)


@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=3"], "unknown config key 'train.stepz'.*did you mean 'train.steps'"),
    (["--config", "nosuch.py"], "config 'nosuch.py': no such file"),
])
def test_cli_config_errors(args, message):
    r = subprocess.run([sys.executable, "-m", "beam_jax.train", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    import re

    assert re.search(message, r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
