"""Benchmark tasks (beam_jax.tasks): deterministic construction, scores that match a direct computation
(greedy decoding for line completion, a cache-free forward for multiple choice, `evaluate` for next-token
accuracy), the bootstrap's properties, and the validation-side row selection."""

import numpy as np
import pytest

from beam_jax import evaluate as ev
from beam_jax import tasks
from beam_jax.configs import tiny


@pytest.fixture(scope="module")
def shipped():
    import transformers

    import beam_jax

    return beam_jax.load_pretrained(tiny.TINY_MODEL), transformers.AutoTokenizer.from_pretrained(tiny.TINY_MODEL)


@pytest.fixture(scope="module")
def docs():
    from beam_jax import corpus

    return corpus.stdlib_corpus().examples("validation")[:6]


def test_construction_is_deterministic_and_well_formed(shipped, docs):
    model, tok = shipped
    a = tasks.build_tasks(docs, tok, 128, 4, max_batches=2, mc_items=24, vocab_size=4096)
    b = tasks.build_tasks(docs, tok, 128, 4, max_batches=2, mc_items=24, vocab_size=4096)
    assert len(a.batches) == 2 and a.sizes() == b.sizes()
    for x, y in zip(a.batches, b.batches):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    sizes = a.sizes()
    assert sizes["tokens"] == sum(int(x["loss_mask"].sum()) for x in a.batches) > 0
    assert 0 < sizes["multiple_choice_items"] <= 24 and sizes["line_completion_items"] > 0
    for bt in a.batches:
        for i in np.flatnonzero(bt["lc_doc"] >= 0):  # a line: n tokens, then the line-end token
            r, p, n = bt["lc_row"][i], bt["lc_pos"][i], bt["lc_len"][i]
            assert a.line_end[bt["input_ids"][r, p]] and a.line_end[bt["targets"][r, p + n]]
            assert not a.line_end[bt["targets"][r, p:p + n]].any()
            assert (bt["doc"][r, p:p + n + 1] == bt["lc_doc"][i]).all()
        for i in np.flatnonzero(bt["mc_doc"] >= 0):
            r, p, n, lab = bt["mc_row"][i], bt["mc_pos"][i], bt["mc_len"][i], bt["mc_label"][i]
            ch = bt["mc_choices"][i]
            np.testing.assert_array_equal(ch[lab, :n], bt["targets"][r, p:p + n])  # the true line
            assert len({tuple(c[:n]) for c in ch}) == tasks.NUM_CHOICES  # distinct choices, same length
            assert (ch[:, n:] == 0).all()
    other = tasks.build_tasks(docs, tok, 128, 4, max_batches=2, mc_items=24, vocab_size=4096, seed=1)
    assert not all(np.array_equal(x["mc_label"], y["mc_label"]) for x, y in zip(a.batches, other.batches))


def test_hand_made_lines():
    """Line-end tokens and lines on a tiny hand-made row: ids 10 = newline, 11 = blank, others code."""
    line_end = np.zeros(16, bool)
    line_end[10] = True
    blank = np.zeros(16, bool)
    blank[11] = True
    tokens = np.array([1, 10, 5, 6, 10, 11, 10, 7, 10, 8, 9])  # lines: [5 6], [11] (blank), [7], then [8 9] open
    docs = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    loss = np.ones(10, bool)
    assert tasks._rows_lines(tokens, docs, loss, line_end, blank, 0) == [(1, 2, 0), (6, 1, 0)]
    assert tasks._rows_lines(tokens, docs, loss, line_end, blank, 3) == [(6, 1, 0)]  # min_context
    docs[7:] = 1  # a line may not span documents
    assert tasks._rows_lines(tokens, docs, loss, line_end, blank, 0) == [(1, 2, 0)]


def test_scores_match_direct_computation(shipped, docs):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from beam_jax.routing import TopKHook, make_hook

    model, tok = shipped
    ts = tasks.build_tasks(docs, tok, 128, 4, max_batches=2, mc_items=12, vocab_size=4096)
    for hook in (TopKHook(), make_hook("static_topk", knob=1)):
        r = tasks.score(model, ts, hook, "dense")
        # next-token accuracy and experts/token as `evaluate` gives them on the same rows
        e = ev.evaluate(model, [{k: b[k] for k in ("input_ids", "targets", "loss_mask")} for b in ts.batches], hook,
                        "dense")
        assert r["tokens"] == e["tokens"] and r["experts_per_token"] == e["experts_per_token"]
        assert r["accuracy"] == pytest.approx(e["accuracy"], abs=2 / e["tokens"])
        num, den = r["per_document"]["next_token"]
        assert den.sum() == e["tokens"] and num.sum() / den.sum() == r["accuracy"]
    # the direct computations: one jitted full forward over a right-padded sequence (no cache)
    L = 128 + 8
    fwd = nnx.jit(lambda m, ids, mask: jax.nn.log_softmax(m(ids, attention_mask=mask, impl="dense").logits, -1))

    def logp(seq):
        ids = np.zeros((1, L), np.int32)
        ids[0, :len(seq)] = seq
        return np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(np.arange(L)[None] < len(seq))))[0]

    b = ts.batches[0]
    items = np.flatnonzero(b["lc_doc"] >= 0)[:4]
    exact_lc = 0
    for i in items:  # greedy decoding from the row's prefix until a line-end token
        row, pos, n = b["lc_row"][i], b["lc_pos"][i], b["lc_len"][i]
        seq = list(b["input_ids"][row, :pos + 1])
        out = []
        for _ in range(n + 1):
            out.append(int(np.argmax(logp(seq)[len(seq) - 1])))
            seq.append(out[-1])
            if ts.line_end[out[-1]]:
                break
        exact_lc += out[:-1] == list(b["targets"][row, pos:pos + n]) and bool(ts.line_end[out[-1]])
    one = {"lc_doc": np.where(np.isin(np.arange(b["lc_doc"].size), items), b["lc_doc"], -1)}
    sub = tasks.TaskSet(ts.split, ts.documents, ({**b, **one},), ts.line_end, ts.construction)
    assert tasks.score(model, sub, TopKHook(), "dense")["per_document"]["line_completion"][0].sum() == exact_lc
    got = np.asarray(tasks._score_batch(model, {k: jnp.asarray(v) for k, v in b.items()}, TopKHook(), "dense")["mc_ll"])
    for i in np.flatnonzero(b["mc_doc"] >= 0)[:2]:  # multiple choice: log p(choice | context), no shared cache
        row, pos, n = b["mc_row"][i], b["mc_pos"][i], b["mc_len"][i]
        lls = []
        for ch in b["mc_choices"][i]:
            lp = logp(np.concatenate([b["input_ids"][row, :pos + 1], ch[:n]]))
            lls.append(sum(lp[pos + j, ch[j]] for j in range(n)))
        np.testing.assert_allclose(got[i], lls, rtol=1e-4, atol=1e-3)


def _synthetic(D, p, rng):
    n = rng.integers(50, 150, D).astype(float)
    return rng.binomial(n.astype(int), p).astype(float), n


def test_bootstrap_properties():
    rng = np.random.default_rng(0)
    widths = []
    for D in (20, 200, 2000):
        ref = {"a": _synthetic(D, 0.5, rng), "b": _synthetic(D, 0.2, rng)}
        pol = {"a": _synthetic(D, 0.45, rng), "b": _synthetic(D, 0.2, rng)}  # true retention (0.9 + 1.0) / 2
        out = tasks.bootstrap_retention(pol, ref, resamples=500, seed=0)
        lo, hi = out["ci95"]
        assert lo < 0.95 < hi, (D, out["ci95"])
        assert lo <= out["retention"] <= hi and out["documents"] == D
        assert out["tasks"]["a"]["ci95"][0] < 0.9 < out["tasks"]["a"]["ci95"][1]
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]  # more documents, a narrower interval
    same = tasks.bootstrap_retention(ref, ref, resamples=200)
    assert same["retention"] == 1.0 and same["ci95"] == [1.0, 1.0]  # paired: Top-K against itself
    again = tasks.bootstrap_retention(pol, ref, resamples=500, seed=0)
    assert again == out  # fixed seed: deterministic
    # documents without any item are not resampled; a task Top-K scores 0 on is left out, by name
    ref0 = {"a": (np.r_[ref["a"][0], 0.0], np.r_[ref["a"][1], 0.0]), "c": (np.zeros(D + 1), np.ones(D + 1))}
    pol0 = {"a": (np.r_[pol["a"][0], 0.0], np.r_[pol["a"][1], 0.0]), "c": (np.zeros(D + 1), np.ones(D + 1))}
    z = tasks.bootstrap_retention(pol0, ref0, resamples=100)
    assert z["skipped"] == ["c"] and z["documents"] == D + 1
    only = tasks.bootstrap_retention({"a": pol0["a"]}, {"a": ref0["a"]}, resamples=100)
    assert only["documents"] == D


def test_select_test_rows():
    rows = [{"policy": "topk", "moe_flops_reduction": 0.0, "retention": 1.0},
            {"policy": "beam", "moe_flops_reduction": 0.6, "retention": 0.99},
            {"policy": "beam", "moe_flops_reduction": 0.8, "retention": 0.97},
            {"policy": "beam", "moe_flops_reduction": 0.9, "retention": 0.90},
            {"policy": "top_p", "moe_flops_reduction": 0.5, "retention": 0.995},
            {"policy": "top_p", "moe_flops_reduction": 0.75, "retention": 0.98}]
    chosen, head = ev.select_test_rows(rows, (0.5, 0.75, 0.85))
    assert chosen == {0: [], 1: [0.5], 2: [0.75], 3: [0.85], 4: [0.5], 5: [0.75]} and head == 3
    chosen, head = ev.select_test_rows(rows, (0.95,))  # BEAM reaches no level: its best-retaining row
    assert chosen == {0: [], 1: []} and head == 1
